"""Issue #29, the trainer's side: one run per workdir, every setting checked before
anything is written, a user's mistake as one message with exit status 2, clear
errors for every path a user can pass, a full disk reported once.

Classes of tests (each failed on ce7b596, the branch's start):
  * the workdir lock: two real `experiments.main` processes started together,
    and seconds apart; a SIGKILLed holder taken over; gs:// against the GCS
    emulator; a multi-host run (2 processes) refused everywhere at once;
  * the config schema: every key of base_config() has a rule, and every bad
    value (each rule's own, and generic ones by the stock value's type) is
    refused before the workdir is touched;
  * the commands: bad command lines get one `PROG: error:` line, the key, the
    value and exit status 2, never a traceback;
  * paths and the disk: init_checkpoint directories that are not checkpoints,
    truncated data, empty splits; a full disk during a checkpoint save;
  * a battery of further hostile inputs (`HOSTILE_*` below).

The commands run in subprocesses: `_run_cli` forks one prepared interpreter per
command line (importing jax and the trainer once), real training runs use
`DRIVER`, which can hold a run at its N-th checkpoint save (so that "a live
run" is live for as long as a test needs, with no sleeps) or make that save
run out of space (RLIMIT_FSIZE, the kernel's own refusal of the write).

Run as a program, this file is the GCS emulator with Cloud Storage's
preconditions on every upload (`serve PORT BUCKET`), a process holding a
workdir's lock (`hold WORKDIR`), one process of a 2-process claim (`claim2
WORKDIR`), or the forking command runner (`cli CASES_JSON OUT_DIR`).
"""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
BUCKET = "inq-guards"


# ------------------------------------------------------------ programs


def _serve(port: int, bucket: str) -> None:
  """tests/experiments/test_gcs.py's emulator, with preconditions on multipart uploads too.

  google-cloud-storage uploads small objects as multipart requests, whose object
  name is in the body, not the query; the emulator's precondition checks read
  the query's name, so the name is copied there (real GCS honours
  ifGenerationMatch on every kind of upload).
  """
  from gcp_storage_emulator import server  # pylint: disable=g-import-not-at-top
  import test_gcs  # pylint: disable=g-import-not-at-top  (this file's folder)

  plain = server.Request.query

  def query(self):
    q = plain.fget(self)
    if q.get("uploadType") == ["multipart"] and "name" not in q:
      meta = self.data.get("meta") if isinstance(self.data, dict) else None
      if meta and meta.get("name"):
        q["name"] = [meta["name"]]
    return q

  server.Request.query = property(query)
  test_gcs._serve(port, bucket)  # pylint: disable=protected-access


def _hold(workdir: str) -> None:
  """Takes `workdir`'s lock, says so, and holds it until killed."""
  from experiments import workdir_lock  # pylint: disable=g-import-not-at-top
  workdir_lock.acquire(workdir)
  print("HELD", os.getpid(), flush=True)
  while True:
    time.sleep(3600)


def _claim2(workdir: str) -> None:
  """One of 2 JAX processes claiming `workdir` (environment: JAX_* of the cluster)."""
  from experiments import checkpoints, distributed, errors  # pylint: disable=g-import-not-at-top
  from experiments.configs import smoke  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  distributed.initialize()
  try:
    lock = checkpoints.claim_workdir(workdir, smoke.get_config())
  except errors.WorkdirInUseError as e:
    print(f"REFUSED {jax.process_index()}: {e}", flush=True)
    sys.exit(2)
  print(f"CLAIMED {jax.process_index()} lock={lock is not None}", flush=True)
  if lock is not None:
    lock.release()


def _cli(cases_file: str, out_dir: str) -> None:
  """Runs each command of `cases_file` in a forked child of this prepared process.

  cases: [[module, argv...], ...]. Writes out_dir/{i}.json: {"rc", "out", "err"}.
  The trainer is imported once, here; each child defines only its command's flags.
  """
  import importlib  # pylint: disable=g-import-not-at-top
  modules = {m: importlib.import_module(m) for m in (
      "experiments.main", "experiments.study.sweep", "experiments.tools.evaluate",
      "experiments.tools.export", "experiments.tools.shift_check")}
  try:
    from experiments import errors  # pylint: disable=g-import-not-at-top
  except ImportError:  # the branch's start: absl's own app.run
    errors = None
  from absl import app  # pylint: disable=g-import-not-at-top
  with open(cases_file) as f:
    cases = json.load(f)
  for i, (module, *argv) in enumerate(cases):
    out, err = os.path.join(out_dir, f"{i}.out"), os.path.join(out_dir, f"{i}.err")
    pid = os.fork()
    if pid == 0:
      with open(out, "w") as o, open(err, "w") as e:
        os.dup2(o.fileno(), 1)
        os.dup2(e.fileno(), 2)
      sys.argv = [module, *argv]
      try:
        if module == "experiments.tools.codebook_report":
          sys.modules.pop(module, None)
          importlib.import_module(module).main()
        else:
          mod = modules[module]
          mod.define_flags()
          if errors is not None:
            errors.run(mod.main, module, argv=sys.argv)
          else:
            app.run(mod.main, argv=sys.argv)
      except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # pylint: disable=protected-access
      except BaseException:  # pylint: disable=broad-except
        import traceback  # pylint: disable=g-import-not-at-top
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)  # pylint: disable=protected-access
      sys.stdout.flush()
      os._exit(0)  # pylint: disable=protected-access
    _, status = os.waitpid(pid, 0)
    rc = os.waitstatus_to_exitcode(status)
    with open(os.path.join(out_dir, f"{i}.json"), "w") as f:
      json.dump({"rc": rc, "out": open(out).read(), "err": open(err).read()}, f)


if __name__ == "__main__":
  sys.path.insert(0, ROOT)
  {"serve": lambda: _serve(int(sys.argv[2]), sys.argv[3]),
   "hold": lambda: _hold(sys.argv[2]),
   "claim2": lambda: _claim2(sys.argv[2]),
   "cli": lambda: _cli(sys.argv[2], sys.argv[3])}[sys.argv[1]]()
  sys.exit(0)


# ------------------------------------------------------------ the tests

import math  # pylint: disable=g-import-not-at-top,wrong-import-position

import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position
import ml_collections  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

from experiments import checkpoints, recipe, train  # pylint: disable=g-import-not-at-top,wrong-import-position
try:  # pylint: disable=g-import-not-at-top,wrong-import-position
  from experiments import errors, workdir_lock
except ImportError:  # the branch's start (ce7b596): these tests must fail there, not vanish
  errors = workdir_lock = None
from experiments.configs import common, smoke, sweep_fashion_mnist  # pylint: disable=g-import-not-at-top,wrong-import-position
from experiments.data import input_pipeline  # pylint: disable=g-import-not-at-top,wrong-import-position
from experiments.study import sweep  # pylint: disable=g-import-not-at-top,wrong-import-position
from experiments.study import lowbit_options  # pylint: disable=g-import-not-at-top,wrong-import-position

CONFIG_DIR = os.path.join(ROOT, "experiments", "configs")
EXPERIMENT_CONFIGS = sorted(f[:-3] for f in os.listdir(CONFIG_DIR) if f.endswith(".py")
                            and f[:-3] not in ("__init__", "common", "imagenet_common")
                            and not f.startswith("sweep_"))
SWEEP_CONFIGS = sorted(f[:-3] for f in os.listdir(CONFIG_DIR) if f.startswith("sweep_"))

# A small run through the command: 10 steps an epoch; its checkpoint saves are
# 1-2 the baseline's epochs, 3 phase 1 quantized, 4 its epoch, 5 phase 2, 6 done.
TINY = {"dataset.train_split": "train[:640]", "dataset.test_split": "test[:200]",
        "batch_size": 64, "eval_batch_size": 100, "baseline.epochs": 2,
        "inq.portions": (0.5, 1.0), "inq.epochs": 1}


def _cli_value(v) -> str:
  if isinstance(v, tuple):
    return "(" + ",".join(map(str, v)) + ")"
  return str(v)


def tiny_flags(data_dir) -> list:
  return ([f"--config.{k}={_cli_value(v)}" for k, v in TINY.items()]
          + [f"--config.dataset.data_dir={data_dir}"])


def env(**extra) -> dict:
  out = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=1")
  for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
    out.pop(name, None)
  return {**out, **extra}


def _set(config: ml_collections.ConfigDict, key: str, value) -> ml_collections.ConfigDict:
  """A copy of `config` with `key` set to `value`, whatever its type (no type safety)."""
  data = config.to_dict()
  node = data
  *parents, leaf = key.split(".")
  for p in parents:
    node = node[p]
  node[leaf] = value
  return ml_collections.ConfigDict(data)


def _smoke(data_dir="/nonexistent/tfds", **overrides) -> ml_collections.ConfigDict:
  c = smoke.get_config()
  c.dataset.data_dir = str(data_dir)
  for k, v in {**TINY, **overrides}.items():
    c = _set(c, k, v)
  return c


def _no_traceback(text: str) -> bool:
  return "Traceback" not in text


# ------------------------------------------------------------ the config schema


def _generic_bad(stock) -> list:
  """Values wrong for any key whose stock value is `stock` (by its type)."""
  if isinstance(stock, bool):
    return [1, "True"]
  if isinstance(stock, int):
    return [1.5, "1"]
  if isinstance(stock, float):
    return [float("nan"), float("inf"), "x"]
  if isinstance(stock, str):
    return [3]
  if isinstance(stock, tuple):
    return ["x"]
  return [3.5]


def _flat(config, path=""):
  out = []
  for key in config.keys():
    value = config[key]
    if isinstance(value, ml_collections.ConfigDict) and len(value):
      out += _flat(value, f"{path}{key}.")
    else:
      out.append((f"{path}{key}", value))
  return out


def _schema_cases() -> list:
  """(key, bad value) for every key of base_config(): its rule's bad values and generic ones."""
  schema = getattr(recipe, "SCHEMA", {})  # none at the branch's start: generic values only
  cases = []
  for key, stock in _flat(common.base_config()):
    rule = schema.get(key)
    for value in list(rule.bad if rule else ()) + _generic_bad(stock):
      cases.append((key, value))
  return cases


SCHEMA_CASES = _schema_cases()


def test_every_setting_has_a_rule():
  # A new key in base_config() without a rule fails here (and at every run).
  base = common.base_config()
  keys = recipe.leaf_keys(base, recipe.SCHEMA)
  assert [k for k in keys if k not in recipe.SCHEMA] == []
  # ... and every rule is of a real key (none left behind by a removed one).
  assert [k for k in recipe.SCHEMA if k not in keys and not recipe.SCHEMA[k].optional] == []
  assert all(rule.bad for rule in recipe.SCHEMA.values())
  assert len(SCHEMA_CASES) >= 3 * len(keys)


def test_every_stock_config_passes_and_every_key_of_it_has_a_rule():
  import importlib  # pylint: disable=g-import-not-at-top
  for name in EXPERIMENT_CONFIGS:
    module = importlib.import_module(f"experiments.configs.{name}")
    config = module.get_config() if name != "fashion_mnist_lenet_lowbit" else \
        module.get_config("3")
    assert [k for k in recipe.leaf_keys(config, recipe.SCHEMA)
            if k not in recipe.SCHEMA] == [], name
    recipe.check_config(config)
  for name in SWEEP_CONFIGS:
    sc = importlib.import_module(f"experiments.configs.{name}").get_config()
    study = study_of(sc)
    assert [k for k in recipe.leaf_keys(sc, study.SCHEMA) if k not in study.SCHEMA] == [], name
    study.check_study_config(sc) if study is lowbit_options else study.check_sweep_config(sc)


def study_of(sc):
  """The study module that runs the study config `sc` (its docstring's command)."""
  return lowbit_options if "variants" in sc else sweep


@pytest.mark.parametrize("key,value", SCHEMA_CASES,
                         ids=[f"{k}={v!r}"[:70] for k, v in SCHEMA_CASES])
def test_every_bad_value_is_refused_before_the_workdir_is_touched(key, value, tmp_path):
  config = _set(_smoke(), key, value)
  workdir = tmp_path / "w"
  with pytest.raises(errors.ConfigError) as info:
    train.train_and_evaluate(config, str(workdir))
  message = str(info.value)
  assert info.value.key == key and message.startswith(key), message
  shown = [repr(value), str(value)] + ([repr(float(value))] if isinstance(value, int) and
                                       not isinstance(value, bool) else [])
  assert any(s in message for s in shown), message
  assert not workdir.exists()


def test_the_stock_values_are_accepted():
  recipe.check_config(_smoke())
  recipe.check_config(smoke.get_config())


def test_a_misspelt_or_missing_key_is_refused():
  config = _set(_smoke(), "inq.epoch", 3)  # a config file's typo: inq.epochs stays 2
  with pytest.raises(errors.ConfigError, match=r"inq\.epoch is not a setting.*did you mean "
                     r"inq\.epochs"):
    recipe.check_config(config)
  data = _smoke().to_dict()
  del data["momentum"]
  with pytest.raises(errors.ConfigError, match="momentum is missing from the config"):
    recipe.check_config(ml_collections.ConfigDict(data))


def test_dataset_workers_is_a_setting_of_every_config():
  # README (issue #33): --config.dataset.workers=N on every config.
  import importlib  # pylint: disable=g-import-not-at-top
  for name in EXPERIMENT_CONFIGS:
    module = importlib.import_module(f"experiments.configs.{name}")
    config = module.get_config() if name != "fashion_mnist_lenet_lowbit" else \
        module.get_config("3")
    config.dataset.workers = 2  # an int field: what --config.dataset.workers=2 sets
    recipe.check_config(config)
    assert config.dataset.workers == 2
  with pytest.raises(errors.ConfigError, match=r"dataset\.workers must be an int >= 0"):
    recipe.check_config(_set(_smoke(), "dataset.workers", -1))


def test_warmup_longer_than_its_stage_is_refused():
  with pytest.raises(errors.ConfigError, match=r"inq\.warmup_epochs must not exceed"):
    recipe.check_config(_set(_smoke(), "inq.warmup_epochs", 3.0))
  recipe.check_config(_set(_smoke(), "inq.warmup_epochs", 0.5))


# ------------------------------------------------------------ commands


def _run_cli(tmp_path, cases) -> list:
  """[{"rc", "out", "err"}] of each [module, argv...] in `cases` (see `_cli`)."""
  out = tmp_path / "cli"
  out.mkdir(exist_ok=True)
  (out / "cases.json").write_text(json.dumps(cases))
  proc = subprocess.run([sys.executable, os.path.abspath(__file__), "cli",
                         str(out / "cases.json"), str(out)], env=env(), cwd=ROOT,
                        capture_output=True, text=True, timeout=900, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return [json.loads((out / f"{i}.json").read_text()) for i in range(len(cases))]


def _error_line(result, prog) -> str:
  """The one `PROG: error: ...` line of a refused command (asserting there is one)."""
  lines = [line for line in result["err"].splitlines() if line.startswith(f"{prog}: error:")]
  assert len(lines) == 1 and _no_traceback(result["err"]), result["err"][-3000:]
  return lines[0]


MAIN = "experiments.main"


def _main_cases(tmp_path, data_dir):
  """(argv, [fragments the message must hold]) of bad `experiments.main` command lines."""
  w = str(tmp_path / "w")
  base = ["--config=experiments/configs/smoke.py", f"--workdir={w}",
          f"--config.dataset.data_dir={data_dir}"]
  file_dir = tmp_path / "file"
  file_dir.write_text("not a directory")
  return [
      (base + ["--config.momentum=-1"], ["momentum", "-1.0", "--config.momentum=0.9"]),
      (base + ["--config.inq.learning_rate=nan"], ["inq.learning_rate", "nan"]),
      (base + ["--config.inq.learning_rate=-0.01"], ["inq.learning_rate", "-0.01"]),
      (base + ["--config.inq.warmup_epochs=-1"], ["inq.warmup_epochs", "-1.0"]),
      (base + ["--config.max_checkpoints_to_keep=0"], ["max_checkpoints_to_keep", "0"]),
      (base + ["--config.baseline.step_factor=0"], ["baseline.step_factor", "0.0"]),
      (base + ["--config.dataset.image_size=-3"], ["dataset.image_size", "-3"]),
      (base + ["--config.dtype=float64"], ["dtype", "float64"]),
      (base + ["--config.model=lenett"], ["model", "lenett"]),
      (base + ["--config.dataset.name=mnist"], ["dataset.name", "mnist"]),
      (base + ["--config.dataset.test_split=test[::2]"], ["dataset.test_split", "test[::2]"]),
      (base + ["--config.seed=-1"], ["seed", "-1"]),
      (base + ["--config.inq.portions=(0.5,0.9)"], ["inq.portions", "0.9"]),
      (base + ["--config.batch_size=64000000"], ["batch_size", "64000000"]),
      (base + ["--config.dataset.workers=-2"], ["dataset.workers", "-2"]),
      (base + ["--config.inq.include=conv9"], ["inq.include", "conv9"]),
      (base + ["--config.plot_layer=conv9"], ["plot_layer", "conv9"]),
      (base + ["--config.inq.layer_bits=((\"^conv9/\",8),)"],
       ["inq.layer_bits", "'^conv9/'", "matches no quantized parameter"]),
      (base + ["--config.dataset.test_split=test[10000:]"], ["dataset.test_split",
                                                             "test[10000:]", "no example"]),
      (base + ["--config.dataset.train_split=train[:0]"], ["dataset.train_split",
                                                           "train[:0]"]),
      (base + ["--config.dataset.test_split=tset"], ["dataset.test_split", "tset"]),
      (base + ["--config.init_checkpoint=" + str(tmp_path / "nothere")],
       ["init_checkpoint", "nothere", "does not exist"]),
      (base + ["--config.nope=1"], ["--config.nope=1", "no key 'nope'"]),
      (base + ["--config.inq.epoch=1"], ["--config.inq.epoch=1", "did you mean 'epochs'"]),
      (base + ["--config.momentum=abc"], ["--config.momentum=abc"]),
      (["--config=experiments/configs/nothere.py", f"--workdir={w}"],
       ["--config", "nothere.py"]),
      (base[:1] + [f"--workdir={file_dir}", f"--config.dataset.data_dir={data_dir}"],
       [str(file_dir), "is a file"]),
      (base + ["stray"], ["unexpected arguments", "stray"]),
      (base + ["--num_processes=2"], ["--config.distributed=True"]),
      (base + ["--config.distributed=True", "--coordinator_address=127.0.0.1:1",
               "--num_processes=2", "--process_id=5"], ["--process_id=5", "[0, "]),
      (base + ["--config.distributed=True", "--coordinator_address=nonsense",
               "--num_processes=2", "--process_id=0"], ["--coordinator_address='nonsense'",
                                                         "HOST:PORT"]),
  ]


def test_main_refuses_a_bad_command_in_one_line_with_status_2(tmp_path, fmnist_data_dir):
  cases = _main_cases(tmp_path, fmnist_data_dir)
  results = _run_cli(tmp_path, [[MAIN, *argv] for argv, _ in cases])
  for (argv, fragments), result in zip(cases, results):
    assert result["rc"] == 2, (argv[-1], result["err"][-2000:])
    line = _error_line(result, MAIN)
    for fragment in fragments:
      assert fragment in line, (fragment, line)
  assert not (tmp_path / "w").exists()  # nothing written by any of them


def test_gs_without_credentials_is_one_line_naming_the_fix(tmp_path, fmnist_data_dir):
  # A gs:// workdir on a machine whose Google credentials are missing (here: a
  # credentials file that does not exist, the same on any machine): the set-up's
  # mistake, one line and status 1, not a traceback from google.auth.
  run_env = env(GOOGLE_APPLICATION_CREDENTIALS=str(tmp_path / "no_such_key.json"))
  for name in ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL",
               "CLOUD_STORAGE_EMULATOR_ENDPOINT"):
    run_env.pop(name, None)
  result = subprocess.run(
      [sys.executable, "-m", MAIN, "--config=experiments/configs/smoke.py",
       "--workdir=gs://inq-test-no-credentials/run",
       f"--config.dataset.data_dir={fmnist_data_dir}"],
      env=run_env, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 1, result.stderr[-2000:]
  assert "Traceback" not in result.stderr, result.stderr[-2000:]
  line = _error_line({"err": result.stderr}, MAIN)
  assert "cannot reach Cloud Storage" in line and "gcloud auth" in line, line


def test_sweep_and_tools_refuse_bad_commands_in_one_line(tmp_path, fmnist_data_dir):
  w = str(tmp_path / "w")
  weights = tmp_path / "garbage.inq"
  weights.write_bytes(b"not an inq file at all" * 10)
  (tmp_path / "dir.inq").mkdir()
  sweep_base = ["--config=experiments/configs/sweep_fashion_mnist.py", f"--workdir={w}",
                f"--config.experiment.dataset.data_dir={fmnist_data_dir}"]
  lenet = ["--config=experiments/configs/fashion_mnist_lenet.py",
           f"--config.dataset.data_dir={fmnist_data_dir}"]
  cases = [
      ("experiments.study.sweep", sweep_base + ["--config.seeds=(0,0)"], ["seeds", "(0, 0)"]),
      ("experiments.study.sweep", sweep_base + ["--config.inq_bits=(9,)"],
       ["inq_bits", "9"]),
      ("experiments.study.sweep", sweep_base + ["--config.experiment.momentum=-1"],
       ["experiment.momentum", "-1.0", "--config.experiment.momentum=0.9"]),
      ("experiments.study.sweep", sweep_base + ["--config.nope=1"], ["no key 'nope'"]),
      ("experiments.tools.export", [f"--workdir={tmp_path / 'empty'}"],
       ["holds no finished model"]),
      ("experiments.tools.export", [f"--workdir={weights}"], ["is a file"]),
      ("experiments.tools.export", [f"--workdir={w}", f"--output={tmp_path}/no/such/m.inq"],
       ["--output", "existing directory"]),
      ("experiments.tools.evaluate", lenet + [f"--weights={tmp_path / 'missing.inq'}"],
       ["--weights", "missing.inq", "does not exist"]),
      ("experiments.tools.evaluate", lenet + [f"--weights={weights}"],
       ["--weights", "garbage.inq"]),
      ("experiments.tools.evaluate", lenet + [f"--weights={tmp_path / 'dir.inq'}"],
       ["--weights", "dir.inq"]),
      ("experiments.tools.evaluate", lenet + [f"--weights={weights}", "--config.momentum=2"],
       ["momentum", "2.0"]),
      ("experiments.tools.shift_check", lenet + [f"--weights={weights}", "--limit=0"],
       ["--limit", "0"]),
      ("experiments.tools.shift_check", lenet + [f"--weights={weights}"],
       ["--weights", "garbage.inq"]),
      ("experiments.tools.shift_check",
       ["--config=experiments/configs/fashion_mnist_resnet20.py", f"--weights={weights}"],
       ["LeNet", "resnet20"]),
      ("experiments.tools.codebook_report", ["--variables", str(tmp_path / "none")],
       ["--variables", "none"]),
      ("experiments.tools.codebook_report", ["--variables", str(tmp_path), "--bits=9"],
       ["--bits=9"]),
  ]
  results = _run_cli(tmp_path, [[module, *argv] for module, argv, _ in cases])
  for (module, argv, fragments), result in zip(cases, results):
    assert result["rc"] == 2, (module, argv[-1], result["err"][-2000:])
    prog = "codebook_report.py" if module.endswith("codebook_report") else module
    if module.endswith("codebook_report"):  # argparse's own format: "PROG: error: ..."
      line = [ln for ln in result["err"].splitlines() if ": error:" in ln][0]
      assert _no_traceback(result["err"]), result["err"]
    else:
      line = _error_line(result, prog)
    for fragment in fragments:
      assert fragment in line, (fragment, line)
  assert not os.path.exists(w)


# ------------------------------------------------------------ real runs

# Runs experiments.main; can hold the run at its PAUSE_AT_SAVE-th checkpoint
# save until the file $GO exists (after writing $MARKERS/paused.PID), or make
# its FULL_AT_SAVE-th save run out of space: the kernel refuses writes past a
# 64 kB file size (RLIMIT_FSIZE) from then on, as a full disk refuses them.
DRIVER = textwrap.dedent("""
    import gc, os, resource, signal, sys, time
    from experiments import checkpoints, main
    pause_at = int(os.environ.get("PAUSE_AT_SAVE", "0"))
    full_at = int(os.environ.get("FULL_AT_SAVE", "0"))
    original, calls = checkpoints.RunCheckpoints.save, [0]
    def save(self, state, meta):
      calls[0] += 1
      if calls[0] == pause_at:
        open(os.path.join(os.environ["MARKERS"], f"paused.{os.getpid()}"), "w").close()
        while not os.path.exists(os.environ["GO"]):
          time.sleep(0.1)
      if calls[0] == full_at:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, resource.RLIM_INFINITY))
        try:
          return original(self, state, meta)
        finally:  # orbax's failed write tasks are collected now, not only if in time
          time.sleep(1)
          gc.collect()
      return original(self, state, meta)
    checkpoints.RunCheckpoints.save = save
    main.define_flags()
    argv = ["experiments.main"] + sys.argv[1:]
    try:
      from experiments import errors
      errors.run(main.main, "experiments.main", argv=argv)
    except ImportError:  # the branch's start
      from absl import app
      app.run(main.main, argv=argv)
""")


def start_main(workdir, data_dir, log, *flags, **environ):
  cmd = [sys.executable, "-c", DRIVER, "--config=experiments/configs/smoke.py",
         f"--workdir={workdir}", *tiny_flags(data_dir), *flags]
  with open(log, "w") as f:
    return subprocess.Popen(cmd, env=env(**environ), cwd=ROOT, stdout=f,
                            stderr=subprocess.STDOUT)


def wait_for(predicate, procs, what: str, limit: float = 600):
  """Polls `predicate` until true; fails if every process exits first (or after `limit`,
  a guard against a hang, not a timing requirement)."""
  deadline = time.monotonic() + limit
  while not predicate():
    if all(p.poll() is not None for p in procs) or time.monotonic() > deadline:
      pytest.fail(f"never happened: {what}")
    time.sleep(0.2)


def finish(proc, limit=900) -> int:
  try:
    return proc.wait(timeout=limit)
  except subprocess.TimeoutExpired:
    proc.kill()
    return proc.wait()


@pytest.fixture
def pause(tmp_path):
  markers = tmp_path / "markers"
  markers.mkdir()
  return {"MARKERS": str(markers), "GO": str(tmp_path / "go")}


def _paused(pause) -> list:
  return [int(n.split(".")[1]) for n in os.listdir(pause["MARKERS"])]


def test_two_runs_started_together_one_is_refused_naming_the_other(tmp_path, fmnist_data_dir,
                                                                   pause):
  workdir = tmp_path / "w"
  procs = [start_main(workdir, fmnist_data_dir, tmp_path / f"{i}.log", PAUSE_AT_SAVE="1",
                      **pause) for i in (0, 1)]
  try:
    # One holds the workdir (held at its first save); the other must be refused,
    # not wait for it, fail later or train beside it.
    wait_for(lambda: any(p.poll() is not None for p in procs) or len(_paused(pause)) == 2,
             procs, "one run refused")
    (tmp_path / "go").touch()
    codes = [finish(p) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  logs = [(tmp_path / f"{i}.log").read_text() for i in (0, 1)]
  assert sorted(codes) == [0, 2], (codes, [log[-2000:] for log in logs])
  winner, loser = (procs[0], logs[1]) if codes[0] == 0 else (procs[1], logs[0])
  line = [ln for ln in loser.splitlines() if ln.startswith("experiments.main: error:")]
  assert len(line) == 1 and _no_traceback(loser), loser[-3000:]
  assert f"is in use by another run: host {socket.gethostname()}, pid {winner.pid}" in line[0]
  assert "use another --workdir" in line[0]
  results = json.loads((workdir / "results.json").read_text())
  assert results["final"]["all_pow2"] is True
  assert not (workdir / workdir_lock.LOCK_FILE).exists()  # released at the end


def test_a_run_seconds_later_is_refused_and_a_killed_holder_is_taken_over(
    tmp_path, fmnist_data_dir, pause):
  workdir = tmp_path / "w"
  first = start_main(workdir, fmnist_data_dir, tmp_path / "first.log", PAUSE_AT_SAVE="2",
                     **pause)
  try:
    wait_for(lambda: _paused(pause), [first], "the first run at its 2nd checkpoint")
    # Seconds later, while the first one lives: refused at once.
    second = subprocess.run(
        [sys.executable, "-m", "experiments.main", "--config=experiments/configs/smoke.py",
         f"--workdir={workdir}", *tiny_flags(fmnist_data_dir)],
        env=env(), cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert second.returncode == 2, second.stderr[-3000:]
    line = _error_line({"err": second.stderr}, MAIN)
    assert f"pid {first.pid}" in line and "in use by another run" in line
    assert "Dataset" not in second.stderr and "fashion_mnist" not in second.stderr
    # The holder is SIGKILLed (no clean-up at all): the rerun takes the lock
    # over with a warning naming it, resumes from its checkpoint and finishes.
    first.kill()
    first.wait()
  finally:
    if first.poll() is None:
      first.kill()
      first.wait()
  assert (workdir / workdir_lock.LOCK_FILE).exists()
  rerun = subprocess.run(
      [sys.executable, "-m", "experiments.main", "--config=experiments/configs/smoke.py",
       f"--workdir={workdir}", *tiny_flags(fmnist_data_dir)],
      env=env(), cwd=ROOT, capture_output=True, text=True, timeout=900, check=False)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert f"taking over the lock of host {socket.gethostname()}, pid {first.pid}" in \
      rerun.stderr
  assert f"its process {first.pid} on this host is gone" in rerun.stderr
  assert "resuming at stage baseline, phase 0, epoch 1" in rerun.stderr
  assert json.loads((workdir / "results.json").read_text())["final"]["all_pow2"] is True


def test_a_full_disk_during_a_checkpoint_is_one_line_and_the_rerun_resumes(
    tmp_path, fmnist_data_dir):
  workdir = tmp_path / "w"
  proc = start_main(workdir, fmnist_data_dir, tmp_path / "full.log", FULL_AT_SAVE="2")
  assert finish(proc) == 1
  log = (tmp_path / "full.log").read_text()
  errors_ = [ln for ln in log.splitlines() if "error" in ln.lower()]
  assert _no_traceback(log) and len(errors_) == 1, log[-5000:]
  assert errors_[0].startswith("experiments.main: error: out of space while writing "
                               f"checkpoint {workdir}/checkpoints/2: the file size limit")
  assert "rerun the same command to resume" in errors_[0]
  assert not (workdir / workdir_lock.LOCK_FILE).exists()  # the failed run let go of it
  rerun = subprocess.run(
      [sys.executable, "-m", "experiments.main", "--config=experiments/configs/smoke.py",
       f"--workdir={workdir}", *tiny_flags(fmnist_data_dir)],
      env=env(), cwd=ROOT, capture_output=True, text=True, timeout=900, check=False)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert "resuming at stage baseline, phase 0, epoch 1" in rerun.stderr
  assert json.loads((workdir / "results.json").read_text())["final"]["all_pow2"] is True


SAVE_VARIABLES_FULL = textwrap.dedent("""
    import resource, signal, sys
    import numpy as np
    import jax.numpy as jnp
    from experiments import checkpoints, errors
    def main(argv):
      variables = {"params": {f"l{i}": {"kernel": jnp.asarray(
          np.random.default_rng(i).random((300, 300), np.float32))} for i in range(12)},
                   "batch_stats": {}}
      signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
      resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, resource.RLIM_INFINITY))
      checkpoints.save_variables(sys.argv[1], variables)
    errors.run(main, "save", argv=["save"])
""")


def test_a_full_disk_while_saving_variables_is_one_line(tmp_path):
  # The baseline's variables (and a converted init_checkpoint) go through
  # orbax too: a full disk there abandoned its writes with 7-10 tracebacks.
  target = tmp_path / "baseline_variables"
  proc = subprocess.run([sys.executable, "-c", SAVE_VARIABLES_FULL, str(target)], env=env(),
                        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 1, proc.stderr[-3000:]
  errors_ = [ln for ln in proc.stderr.splitlines() if "error" in ln.lower()]
  assert _no_traceback(proc.stderr) and len(errors_) == 1, proc.stderr[-5000:]
  assert errors_[0].startswith(f"save: error: out of space while writing {target}: the file "
                               "size limit was reached"), errors_[0]


def test_a_refused_setting_leaves_the_workdir_to_the_corrected_command(tmp_path,
                                                                       fmnist_data_dir):
  # Today a NaN learning rate fails late, after config.json is written, and the
  # corrected command is then refused as "a different config".
  workdir = tmp_path / "w"
  cases = [[MAIN, "--config=experiments/configs/smoke.py", f"--workdir={workdir}",
            *tiny_flags(fmnist_data_dir), flag] for flag in (
                "--config.inq.learning_rate=nan", "--config.momentum=-1",
                "--config.inq.include=conv9")]
  for result in _run_cli(tmp_path, cases):
    assert result["rc"] == 2, result["err"][-3000:]
    _error_line(result, MAIN)
  assert not workdir.exists()
  fixed = subprocess.run(
      [sys.executable, "-m", "experiments.main", "--config=experiments/configs/smoke.py",
       f"--workdir={workdir}", *tiny_flags(fmnist_data_dir)],
      env=env(), cwd=ROOT, capture_output=True, text=True, timeout=900, check=False)
  assert fixed.returncode == 0, fixed.stderr[-3000:]


# ------------------------------------------------------------ the lock, unit by unit


def _write_lock(workdir, **fields):
  holder = {"host": "another-host", "boot_id": "x", "pid": 4242, "start_ticks": None,
            "started": time.time() - 100, "heartbeat": time.time(), "run_id": "other",
            "what": "run", "command": "python -m experiments.main ..."}
  holder.update(fields)
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, workdir_lock.LOCK_FILE), "w") as f:
    json.dump(holder, f)
  return holder


def _dead_pid() -> int:
  proc = subprocess.Popen([sys.executable, "-c", "pass"])
  proc.wait()
  return proc.pid


@pytest.mark.parametrize("case", ["fresh_other_host", "stale_other_host", "dead_pid_here",
                                  "recycled_pid_here", "rebooted_here", "garbage", "empty"])
def test_a_stale_lock_is_taken_over_and_a_live_one_refused(tmp_path, case, caplog):
  workdir = str(tmp_path / "w")
  here = {"host": workdir_lock.HOST, "boot_id": workdir_lock.BOOT_ID}
  if case == "fresh_other_host":
    _write_lock(workdir)
    with pytest.raises(errors.WorkdirInUseError, match="host another-host, pid 4242"):
      workdir_lock.acquire(workdir)
    return
  if case == "stale_other_host":
    _write_lock(workdir, heartbeat=time.time() - workdir_lock.LEASE_SECONDS - 60)
    why = "has not been refreshed for"
  elif case == "dead_pid_here":
    _write_lock(workdir, pid=_dead_pid(), **here)
    why = "on this host is gone"
  elif case == "recycled_pid_here":  # our own parent's pid, but another start time
    _write_lock(workdir, pid=os.getppid(), start_ticks=1, **here)
    why = "on this host is gone"
  elif case == "rebooted_here":
    _write_lock(workdir, host=workdir_lock.HOST, boot_id="before-the-reboot", pid=os.getppid())
    why = "restarted since"
  else:
    os.makedirs(workdir)
    (tmp_path / "w" / workdir_lock.LOCK_FILE).write_text("{not json" if case == "garbage"
                                                         else "")
    why = "unreadable" if case == "garbage" else None
  lock = workdir_lock.acquire(workdir)
  try:
    held = json.loads((tmp_path / "w" / workdir_lock.LOCK_FILE).read_text())
    assert held["pid"] == os.getpid() and held["host"] == workdir_lock.HOST
    if why:
      assert "taking over the lock" in caplog.text and why in caplog.text
  finally:
    lock.release()
  assert not (tmp_path / "w" / workdir_lock.LOCK_FILE).exists()


def test_a_lock_taken_over_by_another_run_stops_this_one_before_it_writes(tmp_path):
  workdir = str(tmp_path / "w")
  checkpoints.claim_workdir(workdir, _smoke())
  ckpt = checkpoints.RunCheckpoints(workdir)
  state = {"w": jnp.ones(3), "n": jnp.int32(1)}
  ckpt.save(state, {"results": {}, "seconds": 0.0})
  # This run stalled past the lease on a shared disk; a run on another host took over.
  _write_lock(workdir, run_id="thief")
  workdir_lock.held(workdir).refresh()
  with pytest.raises(errors.WorkdirInUseError, match="taken over by another run.*another-host"):
    ckpt.save(state, {"results": {}, "seconds": 0.0})
  ckpt.close()
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["1"]
  assert json.loads((tmp_path / "w" / workdir_lock.LOCK_FILE).read_text())["run_id"] == "thief"


def test_the_heartbeat_is_refreshed_while_the_run_lives(tmp_path):
  workdir = str(tmp_path / "w")
  lock = workdir_lock.acquire(workdir)
  try:
    before = json.loads((tmp_path / "w" / workdir_lock.LOCK_FILE).read_text())["heartbeat"]
    lock.refresh()  # what the holder's thread does every REFRESH_SECONDS
    after = json.loads((tmp_path / "w" / workdir_lock.LOCK_FILE).read_text())["heartbeat"]
    assert after > before
  finally:
    lock.release()


def test_a_study_is_locked_too(tmp_path, monkeypatch):
  def ran(*args, **kwargs):
    raise AssertionError("the sweep ran its cells in a workdir another study holds")

  monkeypatch.setattr(sweep, "_run_cells", ran)
  workdir = str(tmp_path / "study")
  proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "hold", workdir],
                          env=env(), cwd=ROOT, stdout=subprocess.PIPE, text=True)
  try:
    assert proc.stdout.readline().startswith("HELD")
    with pytest.raises(errors.WorkdirInUseError, match=f"in use by another study.*pid {proc.pid}"):
      sweep.run_sweep(sweep_fashion_mnist.get_config(), workdir,
                      report_dir=str(tmp_path / "r"))
  finally:
    proc.kill()
    proc.wait()


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_a_multi_host_run_is_refused_on_every_process(tmp_path):
  # Process 0 takes the lock for the whole run; when it cannot, process 1 must
  # stop too (not wait forever in the run's first collective).
  workdir = str(tmp_path / "w")
  holder = subprocess.Popen([sys.executable, os.path.abspath(__file__), "hold", workdir],
                            env=env(), cwd=ROOT, stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().startswith("HELD")
    for expect in ("REFUSED", "CLAIMED"):
      port = _free_port()
      procs = [subprocess.Popen(
          [sys.executable, os.path.abspath(__file__), "claim2", workdir],
          env=env(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                  JAX_PROCESS_ID=str(i)), cwd=ROOT, stdout=subprocess.PIPE,
          stderr=subprocess.STDOUT, text=True) for i in (0, 1)]
      outs = [p.communicate(timeout=600)[0] for p in procs]
      if expect == "REFUSED":
        assert [p.returncode for p in procs] == [2, 2], outs
        assert f"pid {holder.pid}" in outs[0] and "process 0 could not claim" in outs[1]
        holder.kill()  # then the run claims it, once, on process 0
        holder.wait()
      else:
        assert [p.returncode for p in procs] == [0, 0], outs
        assert "CLAIMED 0 lock=True" in outs[0] and "CLAIMED 1 lock=False" in outs[1]
  finally:
    if holder.poll() is None:
      holder.kill()
      holder.wait()


# ------------------------------------------------------------ gs://


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
  """The emulator (with Cloud Storage's preconditions) on a free 127.0.0.1 port."""
  port = _free_port()
  log = tmp_path_factory.mktemp("gcs") / "emulator.log"
  with open(log, "wb") as out:
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "serve", str(port),
                             BUCKET], stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
  url = f"http://127.0.0.1:{port}"
  try:
    deadline = time.monotonic() + 60
    while True:
      try:
        with urllib.request.urlopen(url + "/", timeout=2) as response:
          if response.status == 200:
            break
      except OSError:
        pass
      if proc.poll() is not None or time.monotonic() > deadline:
        pytest.fail(f"the GCS emulator did not start: {log.read_text()[-3000:]}")
      time.sleep(0.2)
    names = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
             "CLOUD_STORAGE_EMULATOR_ENDPOINT": url, "GOOGLE_CLOUD_PROJECT": "test",
             "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
    saved = {k: os.environ.get(k) for k in names}
    os.environ.update(names)  # this process's gs:// clients too
    yield names
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
  finally:
    if proc.poll() is None:
      os.kill(proc.pid, signal.SIGTERM)
      try:
        proc.wait(timeout=10)
      except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()


def _gcs_lock(workdir):
  from google.cloud import storage  # pylint: disable=g-import-not-at-top
  bucket, _, key = workdir[len("gs://"):].partition("/")
  return storage.Client().bucket(bucket).blob(f"{key}/{workdir_lock.LOCK_FILE}")


def test_gs_workdir_live_holder_refused_killed_one_taken_over(gcs, tmp_path, caplog):
  workdir = f"gs://{BUCKET}/live"
  holder = subprocess.Popen([sys.executable, os.path.abspath(__file__), "hold", workdir],
                            env=env(**gcs), cwd=ROOT, stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().startswith("HELD")
    # The command itself is refused at once (before any data is read).
    result = _run_cli(tmp_path, [[MAIN, "--config=experiments/configs/smoke.py",
                                  f"--workdir={workdir}"]])[0]
    assert result["rc"] == 2 and f"pid {holder.pid}" in _error_line(result, MAIN)
    with pytest.raises(errors.WorkdirInUseError, match=f"pid {holder.pid}"):
      workdir_lock.acquire(workdir)
  finally:
    holder.kill()
    holder.wait()
  lock = workdir_lock.acquire(workdir)  # SIGKILLed on this host: taken over at once
  assert f"pid {holder.pid}" in caplog.text and "on this host is gone" in caplog.text
  assert json.loads(_gcs_lock(workdir).download_as_bytes())["pid"] == os.getpid()
  lock.release()
  assert not _gcs_lock(workdir).exists()


def test_gs_lock_of_another_host_refused_while_fresh_taken_over_once_stale(gcs, caplog):
  workdir = f"gs://{BUCKET}/other"
  blob = _gcs_lock(workdir)
  holder = {"host": "tpu-vm-7", "boot_id": "b", "pid": 99, "start_ticks": None,
            "started": time.time() - 500, "heartbeat": time.time(), "run_id": "r7",
            "command": "python -m experiments.main"}
  blob.upload_from_string(json.dumps(holder))
  with pytest.raises(errors.WorkdirInUseError, match="host tpu-vm-7, pid 99"):
    workdir_lock.acquire(workdir)
  holder["heartbeat"] = time.time() - workdir_lock.LEASE_SECONDS - 30
  blob.upload_from_string(json.dumps(holder))
  lock = workdir_lock.acquire(workdir)
  assert "taking over the lock of host tpu-vm-7, pid 99" in caplog.text
  # The old holder comes back (it was only stalled) and writes its lock again:
  # this run's next refresh sees it lost the lock, and stops before its next write.
  blob.upload_from_string(json.dumps({**holder, "heartbeat": time.time()}))
  lock.refresh()
  with pytest.raises(errors.WorkdirInUseError, match="taken over by another run"):
    lock.check()
  lock.release()
  assert json.loads(blob.download_as_bytes())["run_id"] == "r7"  # its lock, left alone


def test_gs_two_takeovers_of_one_stale_lock_exactly_one_wins(gcs, tmp_path):
  workdir = f"gs://{BUCKET}/race"
  stale = {"host": "gone-host", "boot_id": "b", "pid": 5, "start_ticks": None,
           "started": 0.0, "heartbeat": 0.0, "run_id": "old", "command": ""}
  _gcs_lock(workdir).upload_from_string(json.dumps(stale))
  procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "hold", workdir],
                            env=env(**gcs), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for _ in range(2)]
  try:
    first = [p.stdout.readline() for p in procs]  # "HELD pid" or "" (refused, exited)
    held = [p for p, line in zip(procs, first) if line.startswith("HELD")]
    refused = [p for p, line in zip(procs, first) if not line.startswith("HELD")]
    assert len(held) == 1 and len(refused) == 1, first
    err = refused[0].stderr.read()
    assert f"pid {held[0].pid}" in err and "WorkdirInUseError" in err, err[-2000:]
    assert json.loads(_gcs_lock(workdir).download_as_bytes())["pid"] == held[0].pid
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
      p.wait()


# ------------------------------------------------------------ paths


@pytest.fixture(scope="module")
def init_dirs(tmp_path_factory, fmnist_data_dir):
  """init_checkpoint candidates: a good one, and every hostile variant of it."""
  root = tmp_path_factory.mktemp("init")
  config = _smoke(fmnist_data_dir)
  from experiments import models  # pylint: disable=g-import-not-at-top
  model = models.from_config(config, 10)
  variables = models.init_variables(model, (1, 28, 28, 1), 0)
  params = jax_tree_map(np.asarray, variables["params"])
  checkpoints.save_variables(str(root / "good"), {"params": params})

  def variant(name, change):
    p = jax_tree_map(np.copy, params)
    change(p)
    checkpoints.save_variables(str(root / name), {"params": p})

  variant("nan", lambda p: p["fc1"]["kernel"].__setitem__((0, 0), np.nan))
  variant("inf_bias", lambda p: p["conv1"]["bias"].__setitem__(0, np.inf))
  variant("zero_kernel", lambda p: p["conv2"]["kernel"].__setitem__(Ellipsis, 0.0))
  variant("subnormal_kernel", lambda p: p["conv2"]["kernel"].__setitem__(Ellipsis, 1e-40))
  variant("extra_leaf", lambda p: p.__setitem__("fc3", {"kernel": np.ones((2, 2),
                                                                          np.float32)}))
  variant("missing_leaf", lambda p: p.pop("fc2"))
  variant("wrong_shape", lambda p: p["fc2"].__setitem__("kernel", np.ones((3, 3),
                                                                          np.float32)))
  (root / "empty").mkdir()
  (root / "a_file").write_text("x")
  # A run's workdir, its checkpoints/ and one of its saves, and its training state.
  run = root / "workdir"
  ckpt = checkpoints.RunCheckpoints(str(run))
  ckpt.save({"params": params, "opt_state": {"m": params}, "step": np.int32(1)},
            {"results": {}, "seconds": 0.0})
  ckpt.close()
  (run / "config.json").write_text("{}")
  # Truncated data: the good checkpoint with its largest data file cut short.
  import shutil  # pylint: disable=g-import-not-at-top
  shutil.copytree(root / "good", root / "truncated")
  files = [p for p in (root / "truncated").rglob("*") if p.is_file()]
  biggest = max(files, key=lambda p: p.stat().st_size)
  biggest.write_bytes(biggest.read_bytes()[:biggest.stat().st_size // 3])
  shutil.copytree(root / "good", root / "no_metadata")
  (root / "no_metadata" / "_METADATA").write_bytes(b"{\"tree_meta")
  return root


def jax_tree_map(f, tree):
  import jax  # pylint: disable=g-import-not-at-top
  return jax.tree.map(f, tree)


INIT_CASES = {  # name under init_dirs -> what the message says
    "empty": "is an empty directory",
    "a_file": "must be a directory, not a file",
    "workdir": "is a run's workdir; pass",
    "workdir/checkpoints": "is a run's checkpoints/ folder",
    "workdir/checkpoints/1": "is one save of a run's checkpoints/",
    "workdir/checkpoints/1/state": "is a run's training state",
    "truncated": "cannot be read: its data is truncated or damaged",
    "no_metadata": "holds no readable checkpoint metadata",
    "nan": "fc1/kernel holds 1 non-finite weights",
    "inf_bias": "params/conv1/bias holds 1 non-finite weights",
    "subnormal_kernel": "subnormal",
    "extra_leaf": "unexpected params/fc3/kernel",
    "missing_leaf": "missing params/fc2/bias",
    "wrong_shape": "params/fc2/kernel: (3, 3) in the checkpoint, (500, 10) in the model",
}


@pytest.mark.parametrize("name", sorted(INIT_CASES))
def test_an_unusable_init_checkpoint_is_refused_before_the_claim(init_dirs, fmnist_data_dir,
                                                                 tmp_path, name):
  config = _smoke(fmnist_data_dir, init_checkpoint=str(init_dirs / name))
  workdir = tmp_path / "w"
  with pytest.raises(errors.UserError) as info:
    train.train_and_evaluate(config, str(workdir))
  message = str(info.value)
  assert isinstance(info.value, errors.ConfigError) and info.value.key == "init_checkpoint"
  assert message.startswith("init_checkpoint") and str(init_dirs / name) in message
  assert INIT_CASES[name] in message, message
  assert not workdir.exists()


@pytest.mark.parametrize("name", ["good", "zero_kernel"])
def test_a_usable_init_checkpoint_is_accepted(init_dirs, fmnist_data_dir, tmp_path, name):
  # An all-zero layer is legal INQ input (the library keeps it all zero).
  config = _smoke(fmnist_data_dir, init_checkpoint=str(init_dirs / name))
  from experiments import runner  # pylint: disable=g-import-not-at-top
  run = runner.Run(config, str(tmp_path / "w"), None)  # every check passes; nothing claimed
  assert set(run.initial["params"]) == {"conv1", "conv2", "fc1", "fc2"}
  assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("key,split,says", [
    ("test_split", "test[10000:]", "selects no example"),
    ("test_split", "test[60%:20%]", "selects no example"),
    ("train_split", "train[:0]", "selects no example"),
    ("test_split", "test[:20000]", "incompatible with 10000 examples"),
    ("train_split", "TRAIN", "Unknown split"),
    ("train_split", "train+tset", "Unknown split"),
])
def test_an_empty_or_unknown_split_names_the_key(fmnist_data_dir, key, split, says):
  config = _smoke(fmnist_data_dir).dataset
  config[key] = split
  with pytest.raises(errors.ConfigError) as info:
    input_pipeline.get_dataset(config)
  assert info.value.key == f"dataset.{key}" and repr(split) in str(info.value)
  assert says in str(info.value)


def test_a_batch_larger_than_the_train_split_names_both(fmnist_data_dir, tmp_path):
  with pytest.raises(errors.ConfigError, match=r"batch_size=1024 is larger than the train "
                     r"split \(640 examples in 'train\[:640\]'\)"):
    train.train_and_evaluate(_smoke(fmnist_data_dir, batch_size=1024), str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()


def test_out_of_space_in_a_checkpoint_save_is_one_error_naming_it(tmp_path, monkeypatch):
  ckpt = checkpoints.RunCheckpoints(str(tmp_path))
  state = {"w": jnp.ones(3)}
  ckpt.save(state, {"results": {}, "seconds": 0.0})
  # What tensorstore raises (as orbax passes it on) when the disk is full.
  full = ValueError("RESOURCE_EXHAUSTED: Error writing \"w/0\" in OCDBT database at local "
                    "file ...: Failed to write 4096 bytes to file 14: No space left on "
                    "device [os_error_code='28']")

  def save(*args, **kwargs):
    raise full

  monkeypatch.setattr(ckpt._manager, "save", save)  # pylint: disable=protected-access
  with pytest.raises(errors.OutOfSpaceError) as info:
    ckpt.save(state, {"results": {}, "seconds": 0.0})
  assert str(info.value) == (
      f"out of space while writing checkpoint {tmp_path}/checkpoints/2: no space left on "
      "the device. Earlier checkpoints are intact: free some space and rerun the same "
      "command to resume")
  assert info.value.__cause__ is None and info.value.__suppress_context__
  ckpt.close()  # the failed save is not raised a second time
  assert checkpoints.RunCheckpoints(str(tmp_path)).restore(state)[1]["results"] == {}


def test_orbax_own_reports_of_a_full_disk_are_dropped(caplog):
  import logging as pylogging  # pylint: disable=g-import-not-at-top
  logger = pylogging.getLogger("absl")
  record = logger.makeRecord("absl", pylogging.ERROR, "/x/orbax/checkpoint/_src/a.py", 1,
                             "_SignalingThread.run() raised: %s", ("No space left on device",),
                             None)
  other = logger.makeRecord("absl", pylogging.ERROR, "/x/orbax/checkpoint/_src/a.py", 1,
                            "something else broke", (), None)
  elsewhere = logger.makeRecord("absl", pylogging.ERROR, "/home/user/mine.py", 1,
                                "No space left on device", (), None)
  assert all(f.filter(elsewhere) for f in logger.filters)
  assert [f.filter(record) for f in logger.filters if isinstance(
      f, checkpoints._QuietOutOfSpace)] == [False]  # pylint: disable=protected-access
  assert all(f.filter(other) for f in logger.filters)


def test_asyncio_reports_of_writes_a_full_disk_failed_are_dropped():
  # asyncio logs each failed task or future nobody awaited when it is collected:
  # the CI run of afcef0f printed three of orbax's write tasks beside the
  # one-line error, a later local run one bare tensorstore future (whose report
  # names no source). Through asyncio's own handler, as it happens there.
  import asyncio  # pylint: disable=g-import-not-at-top
  import logging as pylogging  # pylint: disable=g-import-not-at-top

  class Failed:
    def __init__(self, text):
      self.text = text

    def __repr__(self):
      return self.text

  seen = []
  handler = pylogging.Handler()
  handler.emit = seen.append
  root = pylogging.getLogger()
  root.addHandler(handler)
  loop = asyncio.new_event_loop()
  full = ValueError('OUT_OF_RANGE: Error writing "params.fc1.kernel/0.0": Failed to write '
                    "1418160 bytes to file 16: File too large [os_error_code='27']")
  task = ("<Task finished name='Task-172' coro=<write_fragment() done, defined at "
          "/venv/site-packages/orbax/checkpoint/_src/serialization/serialization.py:188>>")
  reports = [("Task exception was never retrieved", full, task),
             ("Future exception was never retrieved", full, f"<Future finished exception={full!r}>"),
             ("Task exception was never retrieved", ValueError("a bug"), task),
             ("Future exception was never retrieved", OSError(28, "No space left on device"),
              "<Future finished exception=OSError(28)>")]
  try:
    for message, exception, failed in reports:
      loop.default_exception_handler({"message": message, "exception": exception,
                                      "future": Failed(failed)})
  finally:
    loop.close()
    root.removeHandler(handler)
  assert [str(r.exc_info[1]) for r in seen] == ["a bug"]


# ------------------------------------------------------------ hostile workdirs


def test_hostile_workdirs(tmp_path, fmnist_data_dir):
  config = _smoke(fmnist_data_dir)
  # a workdir that is a file, or under one
  (tmp_path / "f").write_text("x")
  for workdir in (tmp_path / "f", tmp_path / "f" / "sub"):
    with pytest.raises(errors.WorkdirError, match="is a file|cannot create"):
      checkpoints.claim_workdir(str(workdir), config)
  # a workdir no one may write (a read-only file system even for root)
  with pytest.raises(errors.WorkdirError, match="cannot create --workdir /proc/inq_guards"):
    checkpoints.claim_workdir("/proc/inq_guards/w", config)
  # a corrupt config.json, and one that is JSON but not an object
  for i, text in enumerate(("{\"model\": \"lenet\"", "[1, 2]", "\xff\xfe")):
    workdir = tmp_path / f"corrupt{i}"
    workdir.mkdir()
    (workdir / "config.json").write_bytes(text.encode("latin-1"))
    with pytest.raises(errors.WorkdirError, match="config.json is damaged"):
      checkpoints.claim_workdir(str(workdir), config)
    assert not (workdir / workdir_lock.LOCK_FILE).exists()  # refused: let go
  # a workdir written before dataset.workers existed resumes (the key at its default) ...
  old = tmp_path / "old"
  old.mkdir()
  data = checkpoints.config_dict(config)
  del data["dataset"]["workers"]
  (old / "config.json").write_text(json.dumps(data))
  checkpoints.claim_workdir(str(old), config).release()
  # ... but not with the key set otherwise
  config.dataset.workers = 3
  with pytest.raises(errors.WorkdirError, match=r"dataset\.workers: None -> 3"):
    checkpoints.claim_workdir(str(old), config)


def test_a_workdir_of_an_older_run_format_is_refused_with_the_fix(tmp_path):
  ckpt = checkpoints.RunCheckpoints(str(tmp_path))
  ckpt.save({"n": jnp.int32(1)}, {"results": {}, "seconds": 0.0})
  ckpt.close()
  meta = tmp_path / "checkpoints" / "1" / "meta" / "metadata"
  meta.write_text(json.dumps({**json.loads(meta.read_text()), "format": 2}))
  with pytest.raises(errors.WorkdirError, match="another version of this trainer.*new "
                     "--workdir"):
    checkpoints.RunCheckpoints(str(tmp_path)).restore({"n": jnp.int32(0)})


HOSTILE_VALUES = [  # (key, value): huge, odd or subtly wrong; each refused before any write
    ("batch_size", 10**9), ("eval_batch_size", 2**40), ("baseline.epochs", 1e12),
    ("inq.epochs", 1e300), ("dataset.image_size", 10**6), ("inq.learning_rate", 1e30),
    ("max_checkpoints_to_keep", 10**9), ("seed", 2**64), ("dataset.workers", 10**6),
    ("momentum", 1.0), ("weight_decay", -1e-4), ("inq.step_epochs", 0.0),
    ("dataset.train_split", "train[:10%]+"), ("dataset.test_split", " "),
    ("model_kwargs", {"cpu_matmul_conv": "yes"}), ("model_kwargs", {"features": 3}),
    ("init_torchvision", "/tmp/resnet18.pth"), ("inq.exclude", ""),
    ("prune.sparsity", (("kernel", float("nan")),)), ("inq.portions", (0.5, 0.5, 1.0)),
    ("dataset.data_dir", "   "), ("plot_layer", "("),
]


@pytest.mark.parametrize("key,value", HOSTILE_VALUES,
                         ids=[f"{k}={v!r}"[:60] for k, v in HOSTILE_VALUES])
def test_hostile_values(fmnist_data_dir, tmp_path, key, value):
  config = _set(_smoke(fmnist_data_dir), key, value)
  with pytest.raises(errors.UserError) as info:
    train.train_and_evaluate(config, str(tmp_path / "w"))
  assert key.split(".")[0] in str(info.value)
  assert not (tmp_path / "w").exists()


def test_init_checkpoint_and_init_torchvision_together(tmp_path, init_dirs):
  config = _smoke(init_checkpoint=str(init_dirs / "good"))
  config = _set(_set(config, "model", "resnet18"), "model_kwargs", {})
  config = _set(config, "init_torchvision", str(tmp_path / "w.pth"))
  with pytest.raises(errors.ConfigError, match="init_torchvision cannot be set together"):
    recipe.check_config(config)


def test_the_counts_of_hostile_cases():
  # What this file tries, for the closing note of issue #29 (a floor, so that a
  # shrinking battery is noticed).
  counts = {"generated_config_values": len(SCHEMA_CASES), "hostile_values": len(HOSTILE_VALUES),
            "init_checkpoints": len(INIT_CASES)}
  print(counts)
  assert counts["generated_config_values"] >= 250 and math.prod(counts.values()) > 0
