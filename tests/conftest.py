"""Shared fixtures and the test-suite policies.

Skips (issue #17): with `CI=true` in the environment a skipped test fails the
run, naming why it skipped, so that a missing dependency or data set in CI can
never pass as green. Locally skips stay skips. Deselection (`-m "not slow"`,
the default in setup.cfg) is not skipping: deselected tests never run.

Data: tests that need the real Fashion-MNIST files take `fmnist_data_dir` or
`fmnist_idx_dir`; both FAIL (not skip) with the fix when the files are absent.
"""

import os
import tempfile

# One persistent XLA compilation cache for the whole run: every xdist worker
# and every subprocess a test starts (they inherit the environment). The
# trainer rebuilds its jitted step each phase and many tests train the same
# LeNet, so most long compilations are repeats; an entry is keyed by the
# program, the compile options and the jax/jaxlib versions, so a stale one is
# never used. Only programs that take at least a second to compile are stored:
# the suite's thousands of small ones would cost more to write than to
# compile. No size limit: with one, JAX rescans the whole folder on every write.
# (Two workers writing the same entry at once can let a third read it half-
# written; JAX then warns and compiles.) A JAX_COMPILATION_CACHE_DIR set by the
# caller wins.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), "inq_jax_tests_xla_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")
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


@pytest.fixture(scope="session")
def fmnist_data_dir(fmnist_idx_dir, tmp_path_factory):
  """A TFDS data_dir for the real Fashion-MNIST, prepared on first use.

  Fails (never skips) without the IDX files; see `fmnist_idx_dir`.
  """
  del fmnist_idx_dir  # Only its check.
  return str(tmp_path_factory.mktemp("tfds"))
