"""Exports a finished run as a compact `.inq` file of b-bit codes.

  python -m experiments.tools.export --workdir=workdirs/fashion_mnist_lenet \
      [--output=lenet_5bit.inq]

Reads WORKDIR/final/ (written by the training script at the end of every run,
`checkpoints.save_final`) and writes it with the trainer's own export,
`checkpoints.export_model`: the params (every quantized kernel as b-bit
codes, see `inq_jax.export`) and the batch statistics, and prints the size
statistics as one JSON line (with each quantized leaf's own width,
"layer_bits", and the average bits per quantized weight, "mean_bits"). The default output is WORKDIR/model.inq, the file
`python -m inq_jax.verify_file WORKDIR/model.inq` checks and that

  python -m experiments.tools.evaluate --config=CONFIG --weights=FILE

evaluates. Refuses (writing nothing) if any quantized kernel is not fully
quantized or holds a weight outside its codebook.
"""

import json

from absl import flags

from experiments import checkpoints, errors, reporting


def define_flags():
  """Defines this command's flags (only when run as a program, so that
  importing several experiment modules in one process never clashes)."""
  flags.DEFINE_string("workdir", None, "A finished run's directory (with final/).")
  flags.DEFINE_string("output", None, "The .inq file to write (default WORKDIR/model.inq).")
  flags.mark_flags_as_required(["workdir"])


FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise errors.UserError(f"unexpected arguments: {argv[1:]}")
  output = FLAGS.output or checkpoints.export_path(FLAGS.workdir)
  if FLAGS.output and not reporting.is_remote(output):
    target = reporting.abs_path(output)
    if target.is_dir() or not target.parent.is_dir():  # refused before the model is read
      raise errors.InputError(f"--output {output} must be a file in an existing directory")
  variables, inq_state = checkpoints.load_final(FLAGS.workdir)
  try:
    stats = checkpoints.export_model(output, variables, inq_state)
  except OSError as e:
    if errors.is_out_of_space(e):
      raise errors.out_of_space(output, e) from None
    raise errors.InputError(f"cannot write --output {output}: {e}") from None
  if stats is not None:
    print(json.dumps(stats, sort_keys=True), flush=True)


if __name__ == "__main__":
  define_flags()
  errors.run(main, "experiments.tools.export")
