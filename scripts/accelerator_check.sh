#!/usr/bin/env bash
# Runs the benchmarks and two short training runs on whatever JAX finds (GPU,
# TPU, or CPU), and prints ONE JSON line summarizing them.
#
#   bash scripts/accelerator_check.sh [--quick] [--data_dir=DIR] [--workdir=DIR]
#
#   step_overhead    python -m experiments.benchmarks.step_overhead
#   quantize_speed   python -m experiments.benchmarks.quantize_speed --width_divisor=1
#   smoke            python -m experiments.main --config=experiments/configs/smoke.py
#   resnet20         the same with --config.model=resnet20 (the CIFAR ResNet-20 of
#                    experiments/models/cnn.py, which takes any input size: here
#                    Fashion-MNIST's 28x28x1)
#
# --quick shrinks everything (fewer benchmark rounds, quantize_speed at 1/8 width,
# tiny data splits and epochs), so that the script can be checked on a CPU in a
# few minutes; its numbers are not benchmarks. --data_dir is the TFDS data dir
# holding Fashion-MNIST (default: TFDS's default, prepared from Debian's
# dataset-fashion-mnist files or downloaded; give it on a machine without
# network). --workdir (default: a new temporary directory) receives the runs
# and every command's log. PYTHON overrides the interpreter (default .venv/bin/python).
#
# The JSON line: device_kind, backend, num_devices, jax, quick, each benchmark's
# own JSON line, and for smoke and resnet20 their baseline and final test
# accuracy, all_pow2 and wall seconds; "errors" lists what failed (exit 1 then).
# Not part of the test suite.

set -uo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
QUICK=0
DATA_DIR=""
WORKDIR=""
for arg in "$@"; do
  case "$arg" in
    --quick) QUICK=1 ;;
    --data_dir=*) DATA_DIR=${arg#*=} ;;
    --workdir=*) WORKDIR=${arg#*=} ;;
    -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
    *) echo "unknown argument: $arg (see --help)" >&2; exit 2 ;;
  esac
done
WORKDIR=${WORKDIR:-$(mktemp -d /tmp/accelerator_check.XXXXXX)}
mkdir -p "$WORKDIR"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if [ "$QUICK" = 1 ]; then
  STEP_ARGS=(--batch=32 --repeats=3 --steps=3)
  QUANTIZE_ARGS=(--width_divisor=8)
  # The train split must hold one eval batch (500): the last, quantize-only phase
  # reports its loss on the train split.
  TRAIN_ARGS=(--config.dataset.train_split="train[:960]" --config.dataset.test_split="test[:200]"
              --config.baseline.epochs=1 --config.inq.epochs=0.5)
else
  STEP_ARGS=()
  QUANTIZE_ARGS=(--width_divisor=1)
  TRAIN_ARGS=()
fi
DATA_ARGS=()
[ -n "$DATA_DIR" ] && DATA_ARGS=(--config.dataset.data_dir="$DATA_DIR")

# run NAME CMD...: runs CMD with its output in $WORKDIR/NAME.log, its wall seconds
# in $WORKDIR/NAME.seconds and its exit status in $WORKDIR/NAME.rc.
run() {
  local name=$1; shift
  local start end
  echo "accelerator_check: $name: $*" >&2
  start=$(date +%s.%N)
  "$@" > "$WORKDIR/$name.log" 2>&1
  echo $? > "$WORKDIR/$name.rc"
  end=$(date +%s.%N)
  echo "$start $end" | awk '{printf "%.2f\n", $2 - $1}' > "$WORKDIR/$name.seconds"
}

run step_overhead "$PYTHON" -m experiments.benchmarks.step_overhead "${STEP_ARGS[@]}"
run quantize_speed "$PYTHON" -m experiments.benchmarks.quantize_speed "${QUANTIZE_ARGS[@]}"
run smoke "$PYTHON" -m experiments.main --config=experiments/configs/smoke.py \
    --workdir="$WORKDIR/smoke" "${DATA_ARGS[@]}" "${TRAIN_ARGS[@]}"
run resnet20 "$PYTHON" -m experiments.main --config=experiments/configs/smoke.py \
    --config.model=resnet20 --workdir="$WORKDIR/resnet20" "${DATA_ARGS[@]}" "${TRAIN_ARGS[@]}"

"$PYTHON" - "$WORKDIR" "$QUICK" <<'EOF'
import json
import os
import sys

workdir, quick = sys.argv[1], sys.argv[2] == "1"
summary = {"quick": quick, "workdir": workdir}
errors = []
try:
  import jax
  summary.update(backend=jax.default_backend(), device_kind=jax.devices()[0].device_kind,
                 num_devices=jax.device_count(), jax=jax.__version__)
except Exception as e:  # pylint: disable=broad-except
  errors.append(f"jax: {type(e).__name__}: {e}")


def read(name, suffix):
  with open(os.path.join(workdir, f"{name}.{suffix}")) as f:
    return f.read().strip()


def failed(name):
  rc = int(read(name, "rc"))
  if rc:
    tail = read(name, "log").splitlines()[-3:]
    errors.append(f"{name}: exit {rc}: {' | '.join(tail)[-500:]} (log: "
                  f"{os.path.join(workdir, name + '.log')})")
  return rc


for name in ("step_overhead", "quantize_speed"):
  if failed(name):
    summary[name] = None
    continue
  lines = [l for l in read(name, "log").splitlines() if l.startswith("{")]
  summary[name] = json.loads(lines[-1]) if lines else None
  if not lines:
    errors.append(f"{name}: printed no JSON line")
  elif isinstance(summary[name], dict):
    summary[name]["wall_seconds"] = float(read(name, "seconds"))

for name in ("smoke", "resnet20"):
  if failed(name):
    summary[name] = None
    continue
  with open(os.path.join(workdir, name, "results.json")) as f:
    results = json.load(f)
  summary[name] = {
      "model": results["config"]["model"],
      "baseline_test_accuracy": results["baseline"]["test_accuracy"],
      "final_test_accuracy": results["final"]["test_accuracy"],
      "all_pow2": results["final"]["all_pow2"],
      "num_devices": results.get("num_devices"),
      "wall_seconds": float(read(name, "seconds"))}
  if not results["final"]["all_pow2"]:
    errors.append(f"{name}: not every quantized weight is 0 or +-2^k")

summary["errors"] = errors
print(json.dumps(summary), flush=True)
sys.exit(1 if errors else 0)
EOF
