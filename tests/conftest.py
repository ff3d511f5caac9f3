"""Shared fixtures and the test-suite policies.

Skips (issue #17): with `CI=true` in the environment a skipped test fails the
run, naming why it skipped, so that a missing dependency or data set in CI can
never pass as green. Locally skips stay skips. Deselection (`-m "not slow"`,
the default in setup.cfg) is not skipping: deselected tests never run.

Data: tests that need the real Fashion-MNIST files take `fmnist_data_dir` or
`fmnist_idx_dir`; both FAIL (not skip) with the fix when the files are absent.
"""

import contextlib
import fcntl
import os
import shutil
import subprocess
import sys
import tempfile

# One persistent XLA compilation cache for the whole run: every xdist worker
# and every subprocess a test starts (they inherit the environment). The
# trainer rebuilds its jitted step each phase, and the tests make dozens of
# trainer runs (many as fresh processes: the device-count, multi-process,
# kill/resume and GCS tests), so most compilations are repeats of one another;
# an entry is keyed by the program, the compile options and the jax/jaxlib
# versions, so a stale one is never used. Every program is stored, however
# fast it compiled: a smoke run compiles ~45 programs of ~0.1 s each, which a
# later process reads in milliseconds (side by side on a loaded 2-core
# machine, a warm smoke run took 30 s with every program cached against 34 s
# with only those over 1 s).
# No size limit: with one, JAX rescans the whole folder on every write. (Two
# workers writing the same entry at once can let a third read it half-written;
# JAX then warns and compiles.) A JAX_COMPILATION_CACHE_DIR set by the caller
# wins.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), "inq_jax_tests_xla_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

# In case JAX was imported before this file (a plugin): the same settings.
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs",
                  float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))
jax.config.update("jax_persistent_cache_min_entry_size_bytes",
                  int(os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"]))

DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"

_NO_FMNIST = (f"no Fashion-MNIST IDX files in {DEBIAN_FASHION_MNIST}: run "
              "`bash scripts/setup.sh` (apt-get install dataset-fashion-mnist)")


def in_ci() -> bool:
  return os.environ.get("CI") == "true"


def _skip_reason(longrepr) -> str:
  # A skip's longrepr is (path, lineno, "Skipped: reason").
  if isinstance(longrepr, tuple) and len(longrepr) == 3:
    path, lineno, reason = longrepr
    return f"{reason} ({path}:{lineno})"
  return str(longrepr)


def _fail_skip(report, what: str) -> None:
  report.outcome = "failed"
  report.longrepr = (f"{what} was skipped, and skips fail under CI=true (issue #17): "
                     f"{_skip_reason(report.longrepr)}")


# The test files that run full trainings, longest first (seconds of one worker
# on a 2-core CPU with an empty compilation cache, before the shared smoke
# reference and the caching of every program). They run first: with the
# README's `-n 2 --dist worksteal`, each worker starts with half the tests in
# order and an idle worker takes the back half of the other's queue, so the
# run ends on short tests instead of one worker finishing a 2-minute run
# alone. The 1-device smoke reference that test_distributed and
# test_multihost share (`smoke_reference`) is then made by the first of them
# while the other worker runs other tests, not waited for.
_LONGEST_FIRST = (
    "tests/experiments/test_multihost.py",  # 163 s
    "tests/experiments/test_distributed.py",  # 107
    "tests/experiments/study/test_sweep.py",  # 108
    "tests/experiments/test_train.py",  # 150 (14 tests)
    "tests/experiments/test_init_torchvision.py",  # 62
    "tests/experiments/test_gcs.py",  # 59
    "tests/experiments/test_configs.py",  # 48
    "tests/experiments/test_train_contract.py",  # 40 (tiny whole runs: 2 runs, 6 resumed sessions)
    "tests/test_packaging.py",  # 45
    "tests/experiments/test_benchmarks.py",  # 99 (6 tests)
)


def pytest_collection_modifyitems(session, config, items):
  del session, config
  rank = {path: i for i, path in enumerate(_LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
  outcome = yield
  report = outcome.get_result()
  # xfail reports as "skipped" with `wasxfail` set; an expected failure is not a skip.
  if in_ci() and report.skipped and not hasattr(report, "wasxfail"):
    _fail_skip(report, f"{item.nodeid} ({report.when})")


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
  outcome = yield
  report = outcome.get_result()
  # A module-level skip (pytest.importorskip / allow_module_level) at collection.
  if in_ci() and report.skipped:
    _fail_skip(report, f"collecting {collector.nodeid}")


def _has_fmnist_idx_files() -> bool:
  from experiments.data import fashion_mnist_idx  # pylint: disable=g-import-not-at-top
  return fashion_mnist_idx.has_idx_files(DEBIAN_FASHION_MNIST)


@pytest.fixture(scope="session")
def fmnist_idx_dir():
  """The directory holding the real Fashion-MNIST IDX files (Debian's package).

  scripts/setup.sh installs Debian's dataset-fashion-mnist, so CI always has the
  files; without them a test that needs them fails (never skips).
  """
  if not _has_fmnist_idx_files():
    pytest.fail(_NO_FMNIST)
  return DEBIAN_FASHION_MNIST


def _shared_path(tmp_path_factory, name: str):
  """A path every xdist worker of this test run shares (the run's own base folder without xdist)."""
  base = tmp_path_factory.getbasetemp()
  return (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / name


@contextlib.contextmanager
def _exclusive(path):
  """Holds an exclusive lock on `path`.lock: one process of the test run at a time."""
  with open(f"{path}.lock", "w") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


@pytest.fixture(scope="session")
def fmnist_data_dir(fmnist_idx_dir, tmp_path_factory):
  """A TFDS data_dir holding the real Fashion-MNIST, prepared once per test run.

  The xdist workers share it: the first to need it prepares it (all 70,000
  examples, ~10 s on 2 cores) while the others wait on a file lock, so no two
  processes ever prepare it at once. Fails (never skips) without the IDX files;
  see `fmnist_idx_dir`.
  """
  del fmnist_idx_dir  # Only its check.
  path = _shared_path(tmp_path_factory, "tfds")
  with _exclusive(path):
    from experiments.configs import smoke  # pylint: disable=g-import-not-at-top
    from experiments.data import input_pipeline  # pylint: disable=g-import-not-at-top
    config = smoke.get_config()
    config.dataset.data_dir = str(path)
    input_pipeline.get_dataset(config.dataset)  # prepares it where it is not yet
  return str(path)


def build_wheel(out_dir) -> str:
  """Builds the inq_jax wheel from a copy of the source into `out_dir`; returns its path."""
  import glob  # pylint: disable=g-import-not-at-top
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  src = os.path.join(out_dir, "src")
  os.makedirs(src)
  ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build", "dist")
  for name in ("pyproject.toml", "setup.cfg", "setup.py", "MANIFEST.in", "LICENSE",
               "README.md", "inq_jax", "experiments", "tests"):
    path = os.path.join(root, name)
    if os.path.isdir(path):
      shutil.copytree(path, os.path.join(src, name), ignore=ignore)
    elif os.path.isfile(path):
      shutil.copy2(path, os.path.join(src, name))
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
  proc = subprocess.run([sys.executable, "-m", "build", "--wheel", "--outdir", out_dir, src],
                        env=env, capture_output=True, text=True, timeout=600, check=False)
  if proc.returncode:
    pytest.fail(f"building the wheel failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
  (wheel,) = glob.glob(os.path.join(out_dir, "inq_jax-*.whl"))
  return wheel


@pytest.fixture(scope="session")
def inq_wheel(tmp_path_factory):
  """The wheel of this checkout, built once per test run (the xdist workers share it)."""
  path = _shared_path(tmp_path_factory, "wheel")
  with _exclusive(path):
    found = sorted(path.glob("inq_jax-*.whl")) if path.exists() else []
    if not found:
      if path.exists():
        shutil.rmtree(path)
      path.mkdir(parents=True)
      return build_wheel(str(path))
  return str(found[0])


@pytest.fixture(scope="session")
def smoke_reference(fmnist_data_dir, tmp_path_factory):
  """The workdir of the stock smoke config run on 1 (fake CPU) device, once per test run.

  The device-count and multi-process tests (tests/experiments/test_distributed.py,
  test_multihost.py) compare their runs with it and start them from its
  baseline (`baseline_variables`, as init_checkpoint). It runs in a subprocess,
  by tests/experiments/run_config.py (which also writes `masks.npz`), with only
  the data directory set; the first worker to need it runs it while the others
  wait on a file lock.
  """
  workdir = _shared_path(tmp_path_factory, "smoke_1_device")
  with _exclusive(workdir):
    if not (workdir / "results.json").is_file():
      if workdir.exists():  # a failed attempt by another worker: start afresh
        shutil.rmtree(workdir)
      root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
      env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
                 PYTHONPATH=root, JAX_PLATFORMS="cpu")
      proc = subprocess.run(
          [sys.executable, os.path.join(root, "tests", "experiments", "run_config.py"),
           "smoke", str(workdir), fmnist_data_dir], env=env, capture_output=True, text=True,
          timeout=900, check=False, cwd=root)
      if proc.returncode != 0:
        pytest.fail(f"the 1-device smoke reference run failed ({proc.returncode}):\n"
                    f"{proc.stderr[-4000:]}")
  return workdir
