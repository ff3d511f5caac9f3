#!/usr/bin/env bash
# One-time set-up on a fresh machine: the real Fashion-MNIST files (Debian), a
# virtual environment in .venv, and this package (editable) with its experiments
# and test extras. Safe to rerun. experiments/ is not installed: run it from the
# repository root (python -m experiments.main), which puts it on sys.path.
#   bash scripts/setup.sh            # what the default experiment needs
#   bash scripts/setup.sh --tests    # plus PyTorch (CPU) for the torchvision parity tests;
#                                    # fails if it cannot be installed (they must not skip)
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  # Offline copy of the real dataset; without it TFDS downloads the files instead.
  ($SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist) \
    || echo "note: dataset-fashion-mnist not installed; Fashion-MNIST will be downloaded by TFDS"
fi

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[experiments,test]'
if [ "${1:-}" = "--tests" ]; then
  TORCH=2.13.0
  if ! .venv/bin/python -c "import torch, sys; sys.exit(not torch.__version__.startswith('$TORCH'))" 2>/dev/null; then
    # CPU wheel; the parity tests must run, so a failed install fails set-up.
    if ! .venv/bin/python -m pip install -q "torch==$TORCH"; then
      echo "error: could not install torch==$TORCH (CPU), which the PyTorch parity tests need" >&2
      exit 1
    fi
  fi
fi
