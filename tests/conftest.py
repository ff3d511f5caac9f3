"""Shared fixtures."""

import pytest

DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


@pytest.fixture(scope="session")
def fmnist_data_dir(tmp_path_factory):
  """A TFDS data_dir for the real Fashion-MNIST, prepared on first use.

  scripts/setup.sh installs Debian's dataset-fashion-mnist, so CI always has the
  files; without them the end-to-end tests cannot run on real data.
  """
  from experiments import fashion_mnist_idx  # pylint: disable=g-import-not-at-top
  if not fashion_mnist_idx.has_idx_files(DEBIAN_FASHION_MNIST):
    pytest.fail(f"no Fashion-MNIST IDX files in {DEBIAN_FASHION_MNIST}: run "
                "`bash scripts/setup.sh` (apt-get install dataset-fashion-mnist)")
  return str(tmp_path_factory.mktemp("tfds"))
