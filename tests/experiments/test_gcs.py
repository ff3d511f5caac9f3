"""A run on `gs://`, against a real GCS JSON API: gcp-storage-emulator on 127.0.0.1.

The smoke config (shrunk) runs with --workdir=gs://BUCKET/run, is SIGKILLed
while a mid-phase checkpoint is being written, resumes from the bucket and must
end with the params of an uninterrupted local run, bit for bit; model.inq is
read back from the bucket (and evaluated by `experiments.tools.evaluate` with
--weights=gs://...).

The storage clients find the emulator through STORAGE_EMULATOR_HOST (gcsfs,
behind etils.epath), TENSORSTORE_GCS_HTTP_URL (tensorstore, behind orbax) and
CLOUD_STORAGE_EMULATOR_ENDPOINT (google-cloud-cpp, behind array_record's
GcsReader: TFDS data read from a gs:// data_dir).

A second test reads a TFDS dataset (the generated ImageNet, as the README's
TPU recipe reads ImageNet) from a gs:// data_dir and checks every batch
against the same dataset read from local disk.

The emulator's object download answers without the `x-goog-generation` header
and ignores the ifGenerationMatch / ifGenerationNotMatch preconditions, which
real GCS always sends and honours. tensorstore's OCDBT driver (orbax's default
checkpoint format) revalidates its cached manifest.ocdbt with
ifGenerationNotMatch=G: real GCS answers 304, the emulator 200 with no
generation header, which tensorstore reads as generation 0 and then refuses as
"Malformed StorageGeneration" on the next conditional write (the second
checkpoint save). `_serve` therefore starts the emulator with those three GCS
behaviours added (test-only; the trainer uses plain orbax/tensorstore).

Run as a program, this file is the emulator (`serve PORT BUCKET`), one run of
the config (`run WORKDIR DATA_DIR OUT [KILL_AT_SAVE]`) or the data reader
(`data LOCAL_DATA_DIR OUT`).
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BUCKET = "inq-test"
# The smoke config, shrunk: 16 steps per epoch, a 1-epoch baseline and two INQ
# phases. Checkpoint saves: 1 baseline epoch, 2 phase 1 quantized, 3 phase 1's
# epoch (killed while it is written: mid-phase, before phase 1's evaluation),
# 4 phase 2 quantized (portion 1: nothing left to retrain), 5 done.
OVERRIDES = {"dataset.train_split": "train[:1024]", "dataset.test_split": "test[:300]",
             "batch_size": 64, "eval_batch_size": 100, "baseline.epochs": 1,
             "inq.portions": (0.5, 1.0), "inq.epochs": 1}
KILL_AT_SAVE = 3


# ------------------------------------------------------------ the emulator


def _serve(port: int, bucket: str) -> None:
  """gcp-storage-emulator, in memory, with GCS's generation headers and preconditions."""
  from http import HTTPStatus  # pylint: disable=g-import-not-at-top
  from gcp_storage_emulator import server  # pylint: disable=g-import-not-at-top
  from gcp_storage_emulator.exceptions import NotFound  # pylint: disable=g-import-not-at-top
  from gcp_storage_emulator.handlers import objects  # pylint: disable=g-import-not-at-top

  def current(storage, bucket_name, name):
    try:
      return storage.get_file_obj(bucket_name, name)
    except NotFound:
      return None

  def failed(request, obj, reading: bool):
    """The status of a failed ifGeneration(Not)Match precondition, else None.

    As GCS: generation 0 stands for "no live object"; a read whose
    ifGenerationNotMatch holds answers 304 Not Modified, anything else 412.
    """
    gen = int(obj["generation"]) if obj else 0
    match = request.query.get("ifGenerationMatch")
    if match and int(match[0]) != gen:
      return HTTPStatus.PRECONDITION_FAILED
    not_match = request.query.get("ifGenerationNotMatch")
    if not_match and int(not_match[0]) == gen:
      return HTTPStatus.NOT_MODIFIED if reading else HTTPStatus.PRECONDITION_FAILED
    return None

  def read(original):
    def handler(request, response, storage, *args, **kwargs):
      obj = current(storage, request.params["bucket_name"], request.params["object_id"])
      status = obj and failed(request, obj, reading=True)
      if status:
        response.status = status
        return None
      # GCS serves a suffix range (the last N bytes, "bytes=-N", how riegeli reads
      # an array_record file's footer); the emulator would send the whole object.
      headers = request._request_handler.headers  # pylint: disable=protected-access
      suffix = re.fullmatch(r"\s*bytes=-(\d+)\s*", headers.get("range", ""))
      if obj and suffix:
        size = int(obj["size"])
        del headers["range"]
        headers["range"] = f"bytes={max(size - int(suffix.group(1)), 0)}-"
      out = original(request, response, storage, *args, **kwargs)
      if obj and response.status in (HTTPStatus.OK, HTTPStatus.PARTIAL_CONTENT):
        response["x-goog-generation"] = str(obj["generation"])
        response["x-goog-metageneration"] = str(obj["metageneration"])
      return out
    return handler

  def write(original, name_of):
    def handler(request, response, storage, *args, **kwargs):
      name = name_of(request)
      if name is not None:
        status = failed(request, current(storage, request.params["bucket_name"], name),
                        reading=False)
        if status:
          response.status = status
          return None
      return original(request, response, storage, *args, **kwargs)
    return handler

  def upload_name(request):
    if "upload_id" in request.query:  # a resumable upload's later request
      return None
    return request.query.get("name", [None])[0]

  patched = {objects.download: read(objects.download),
             objects.get: read(objects.get),
             objects.insert: write(objects.insert, upload_name),
             objects.delete: write(objects.delete, lambda r: r.params["object_id"])}
  objects.download = patched[objects.download]  # objects.get(alt=media) calls it
  objects.insert = patched[objects.insert]  # the router's fallback for uploads
  server.HANDLERS = tuple((regex, {method: patched.get(f, f) for method, f in routes.items()})
                          for regex, routes in server.HANDLERS)
  # Speed only: in memory the emulator still re-serialises every object's metadata
  # (to a .meta file that only a restart from disk would read) on every write.
  server.Storage._write_config_to_file = lambda self: None  # pylint: disable=protected-access
  emulator = server.create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket)
  emulator.run()


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


# ------------------------------------------------------------ one run


def _set(config, key, value):
  node = config
  *parents, leaf = key.split(".")
  for p in parents:
    node = node[p]
  node[leaf] = value


def _run(workdir: str, data_dir: str, out: str, kill_at: int = 0) -> None:
  """Runs the shrunk smoke config in `workdir`; writes what the test checks to `out`.

  out/final.npz: the final params read back from WORKDIR/final/; for a gs://
  workdir also out/inq.npz, the params of WORKDIR/model.inq (downloaded through
  epath, read by inq_jax.export), and out/evaluate.json, experiments.tools.evaluate
  on --weights=WORKDIR/model.inq. With kill_at=N it SIGKILLs itself while its
  N-th checkpoint save is being written.
  """
  import logging as pylogging  # pylint: disable=g-import-not-at-top
  import tempfile  # pylint: disable=g-import-not-at-top

  import numpy as np  # pylint: disable=g-import-not-at-top
  from absl import logging  # pylint: disable=g-import-not-at-top
  from etils import epath  # pylint: disable=g-import-not-at-top

  from experiments import checkpoints, train  # pylint: disable=g-import-not-at-top
  from experiments.configs import smoke  # pylint: disable=g-import-not-at-top
  from experiments.tools import evaluate  # pylint: disable=g-import-not-at-top
  from inq_jax import export  # pylint: disable=g-import-not-at-top
  from inq_jax.tree import leaves_with_paths  # pylint: disable=g-import-not-at-top

  logging.set_verbosity(logging.INFO)  # "resuming at ..." is what the test looks for
  # As experiments.main: orbax's warnings, not its INFO chatter about every save.
  pylogging.getLogger("absl").addFilter(
      lambda r: r.levelno >= pylogging.WARNING or "/orbax/" not in r.pathname)
  config = smoke.get_config()
  config.dataset.data_dir = data_dir
  for key, value in OVERRIDES.items():
    _set(config, key, value)

  import run_config  # pylint: disable=g-import-not-at-top  (this script's own folder)
  run_config.die_on_save(kill_at)

  results = train.train_and_evaluate(config, workdir)
  flat = lambda tree: {p: np.asarray(x) for p, x in leaves_with_paths(tree)[0]}
  variables, _ = checkpoints.load_final(workdir)
  np.savez(os.path.join(out, "final.npz"), **flat(variables["params"]))
  with open(os.path.join(out, "results.json"), "w") as f:
    json.dump(results, f)
  if "://" in workdir:
    with open(os.path.join(out, "listing.json"), "w") as f:
      json.dump(sorted(p.name for p in epath.Path(workdir).iterdir()), f)
    remote = epath.Path(workdir) / checkpoints.EXPORT_FILE
    with tempfile.TemporaryDirectory() as tmp:
      local = os.path.join(tmp, checkpoints.EXPORT_FILE)
      with open(local, "wb") as f:
        f.write(remote.read_bytes())
      np.savez(os.path.join(out, "inq.npz"), **flat(export.load(local)))
    with open(os.path.join(out, "evaluate.json"), "w") as f:
      json.dump(evaluate.evaluate(config, str(remote)), f)


def _read_data(local_dir: str, out: str) -> None:
  """Copies local_dir's prepared TFDS imagenet2012 to gs://BUCKET/tfds and reads both copies.

  out: an .npz, keyed 'local/...' and 'gs/...', of every batch the input
  pipeline makes from each copy (train augmented, validation, decoded in a
  worker process), and of the validation split loaded into memory as the
  Fashion-MNIST and CIFAR-10 pipelines load theirs.
  """
  import pathlib  # pylint: disable=g-import-not-at-top

  import ml_collections  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from etils import epath  # pylint: disable=g-import-not-at-top

  from experiments.data import input_pipeline  # pylint: disable=g-import-not-at-top

  remote = epath.Path(f"gs://{BUCKET}/tfds")
  for f in sorted((pathlib.Path(local_dir) / "imagenet2012").rglob("*")):
    if f.is_file():
      target = remote / f.relative_to(local_dir).as_posix()
      target.parent.mkdir(parents=True, exist_ok=True)
      target.write_bytes(f.read_bytes())

  arrays = {}
  for where, data_dir in (("local", local_dir), ("gs", os.fspath(remote))):
    data = input_pipeline.get_dataset(ml_collections.ConfigDict(dict(
        name="imagenet2012", data_dir=data_dir, train_split="train", test_split="validation",
        augment=True, image_size=32, workers=1)))
    for split, batches in (("train", data.train_batches(4, epoch=1, seed=3)),
                           ("test", data.test_batches(3))):
      for k, batch in enumerate(batches):
        for key, value in batch.items():
          arrays[f"{where}/{split}/{k}/{key}"] = value
    builder = tfds.builder("imagenet2012", data_dir=data_dir, file_format="array_record")
    images, labels = input_pipeline._load_split(builder, "validation")  # pylint: disable=protected-access
    arrays[f"{where}/in_memory/image"], arrays[f"{where}/in_memory/label"] = images, labels
  np.savez(out, **arrays)


if __name__ == "__main__":
  if sys.argv[1] == "serve":
    _serve(int(sys.argv[2]), sys.argv[3])
  elif sys.argv[1] == "run":
    _run(*sys.argv[2:5], *(int(a) for a in sys.argv[5:]))
  elif sys.argv[1] == "data":
    _read_data(*sys.argv[2:4])
  sys.exit(0)


# ------------------------------------------------------------ the test

import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
  """The emulator on a free 127.0.0.1 port: the environment that points the clients at it."""
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
    # GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false: gcsfs would otherwise ask the Storage
    # Control API (which the emulator lacks) for the bucket's layout before every
    # operation, fail, and fall back to the plain GCSFileSystem that it then uses.
    yield {"env": dict(os.environ, STORAGE_EMULATOR_HOST=url, TENSORSTORE_GCS_HTTP_URL=url,
                       CLOUD_STORAGE_EMULATOR_ENDPOINT=url,
                       GOOGLE_CLOUD_PROJECT="test", GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false",
                       PYTHONPATH=ROOT),
           "log": log}
  finally:
    if proc.poll() is None:
      os.kill(proc.pid, signal.SIGTERM)
      try:
        proc.wait(timeout=10)
      except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()


def _start(gcs, workdir, data_dir, out, kill_at=0):
  """Starts one `_run` as a subprocess; `_finish` waits for it."""
  os.makedirs(out, exist_ok=True)
  command = [sys.executable, os.path.abspath(__file__), "run", str(workdir), str(data_dir),
             str(out)] + ([str(kill_at)] if kill_at else [])
  proc = subprocess.Popen(command, env=gcs["env"], cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  return proc, time.monotonic(), f"{workdir} (kill_at={kill_at})"


def _finish(started):
  proc, start, what = started
  try:
    output, _ = proc.communicate(timeout=900)
  except subprocess.TimeoutExpired:
    proc.kill()
    output, _ = proc.communicate()
  print(f"{what}: {time.monotonic() - start:.1f}s")
  return proc.returncode, output


def _assert_same(want, got, what):
  assert sorted(want) == sorted(got), what
  for path in want:
    assert want[path].dtype == got[path].dtype and want[path].tobytes() == got[path].tobytes(), \
        f"{what}: {path}"


def test_gs_workdir_killed_mid_phase_resumes_bit_identically(gcs, fmnist_data_dir, tmp_path):
  workdir = f"gs://{BUCKET}/run"
  # The uninterrupted local run and the run killed on gs:// side by side (each is
  # mostly single-threaded compiling and I/O waits), once the data is prepared.
  from experiments.configs import smoke  # pylint: disable=g-import-not-at-top
  from experiments.data import input_pipeline  # pylint: disable=g-import-not-at-top
  data = smoke.get_config().dataset
  data.data_dir = str(fmnist_data_dir)
  input_pipeline.get_dataset(data)
  local = _start(gcs, tmp_path / "local", fmnist_data_dir, tmp_path / "out_local")
  try:
    killed = _start(gcs, workdir, fmnist_data_dir, tmp_path / "out_killed", KILL_AT_SAVE)
    rc, output = _finish(killed)
    assert rc == -signal.SIGKILL, output[-3000:]
    rc, output = _finish(local)
    assert rc == 0, output[-3000:]
  finally:
    if local[0].poll() is None:  # a failed assertion above: stop the local run too
      local[0].kill()
      local[0].wait()
  rc, output = _finish(_start(gcs, workdir, fmnist_data_dir, tmp_path / "out_gcs"))
  assert rc == 0, output[-3000:]
  # Save 2, phase 1 quantized (TrainState.phase counts the portions applied), nothing trained.
  assert "resuming at stage inq, phase 1, epoch 0" in output, output[-3000:]

  want = dict(np.load(tmp_path / "out_local" / "final.npz"))
  _assert_same(want, dict(np.load(tmp_path / "out_gcs" / "final.npz")), "gs:// final/")
  _assert_same(want, dict(np.load(tmp_path / "out_gcs" / "inq.npz")), "gs:// model.inq")
  results = json.loads((tmp_path / "out_gcs" / "results.json").read_text())
  local_results = json.loads((tmp_path / "out_local" / "results.json").read_text())
  assert results["final"] == local_results["final"]
  assert results["final"]["all_pow2"] and "export" in results["final"]
  # Everything a run writes is in the bucket.
  listing = set(json.loads((tmp_path / "out_gcs" / "listing.json").read_text()))
  assert {"config.json", "metrics.jsonl", "tensorboard", "results.json", "accuracy.png",
          "weights.png", "inq_start_layer.npz", "baseline_variables", "checkpoints", "final",
          "model.inq"} <= listing, listing
  assert not any(name.endswith(".tmp") for name in listing), listing
  evaluated = json.loads((tmp_path / "out_gcs" / "evaluate.json").read_text())
  assert evaluated["test_accuracy"] == results["final"]["test_accuracy"]
  assert evaluated["weights"] == f"{workdir}/model.inq"


def test_tfds_data_dir_on_gs_gives_the_local_batches(gcs, tmp_path):
  # The README's TPU recipe reads TFDS data from gs:// (array_record's GcsReader,
  # in worker processes for ImageNet): the same batches as from local disk.
  from experiments.data import synthetic_imagenet  # pylint: disable=g-import-not-at-top
  local = tmp_path / "tfds"
  synthetic_imagenet.prepare(str(local), train=8, validation=5, image_size=(120, 90))
  out = tmp_path / "batches.npz"
  proc = subprocess.run([sys.executable, os.path.abspath(__file__), "data", str(local), str(out)],
                        env=gcs["env"], cwd=ROOT, capture_output=True, text=True, timeout=900,
                        check=False)
  assert proc.returncode == 0, proc.stderr[-4000:]
  arrays = dict(np.load(out))
  local_keys = sorted(k[len("local/"):] for k in arrays if k.startswith("local/"))
  assert sorted(k[len("gs/"):] for k in arrays if k.startswith("gs/")) == local_keys
  # 8 train images in 2 batches of 4; 5 validation images in 2 batches of 3 (padded).
  assert {k.rsplit("/", 1)[0] for k in local_keys} == {
      "train/0", "train/1", "test/0", "test/1", "in_memory"}
  for key in local_keys:
    np.testing.assert_array_equal(arrays["gs/" + key], arrays["local/" + key], err_msg=key)
  assert arrays["local/in_memory/image"].shape == (5, 90, 120, 3)
  assert arrays["local/train/0/image"].shape == (4, 32, 32, 3)
