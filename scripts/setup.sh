#!/usr/bin/env bash
# One-time set-up on a fresh machine: the real Fashion-MNIST files (Debian), a
# virtual environment in .venv, and this package with its test extra. Safe to rerun.
#   bash scripts/setup.sh            # what the default experiment needs
#   bash scripts/setup.sh --tests    # plus PyTorch (CPU) for the torchvision parity test
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
.venv/bin/python -m pip install -q -e '.[test]'
if [ "${1:-}" = "--tests" ] && ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/python -m pip install -q torch==2.13.0 \
    || echo "note: torch not installed; the PyTorch parity tests will be skipped"
fi
