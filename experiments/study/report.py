"""The sweep's report: sweep.json for machines, RESULTS.md and two plots for people."""

from __future__ import annotations

import datetime
import os
import platform
from typing import Optional

import jax
import numpy as np

from experiments import reporting

RESULTS_MD = "RESULTS.md"
SWEEP_JSON = "sweep.json"
DETAILS_JSON = "sweep_details.json"
BITS_PNG = "sweep_bits.png"
PHASES_PNG = "sweep_phases.png"
NOTES_MD = "notes.md"  # hand-written analysis in the report folder, included verbatim

# issue #4's targets: the INQ b-bit mean minus the fp32 mean, in points.
TARGETS = {5: 0.0, 4: -0.3, 3: -0.8, 2: -2.0}


def _cell(values, seconds) -> dict:
  values = [float(v) for v in values]
  std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
  return {"mean": float(np.mean(values)), "std": std, "values": values,
          "seconds": round(float(np.sum(seconds)), 1)}


def aggregate(finished: dict) -> tuple[dict, dict]:
  """(sweep.json, details): CELLs by kind and bits, seeds in order; phase curves."""
  groups = {}
  for cell, (results, seconds) in sorted(finished.items()):
    key = (cell.kind, cell.bits)
    acc = (results["baseline"] if cell.kind == "fp32" else results["final"])["test_accuracy"]
    groups.setdefault(key, []).append((cell.seed, acc, seconds, results))
  summary, details = {}, {"phases": {}, "seeds": {}}
  for (kind, bits), rows in sorted(groups.items()):
    cell = _cell([r[1] for r in rows], [r[2] for r in rows])
    details["seeds"][f"{kind}{bits or ''}"] = [r[0] for r in rows]
    if kind == "fp32":
      summary["fp32"] = cell
      continue
    # Mixed widths (inq.layer_bits): the average code width per quantized weight.
    mean_bits = float(np.mean([r[3]["final"].get("mean_bits", bits) for r in rows]))
    if abs(mean_bits - bits) > 1e-9:
      cell["mean_bits"] = mean_bits
    summary.setdefault(kind, {})[str(bits)] = cell
    fit = rows[0][3].get("codebook")  # the first seed's: the codebooks are fixed at init
    calibration = "mse" if "_mse" in kind else "absmax"
    if fit and kind != "channel":
      details.setdefault("codebook", {}).setdefault(f"{calibration} {bits}", fit)
    if not kind.startswith("ptq"):
      curves = np.array([[p["test_accuracy"] for p in r[3]["phases"]] for r in rows])
      if len(rows[0][3]["phases"]) > 1:
        details.setdefault("last_step", {}).setdefault(kind, {})[str(bits)] = _last_step(rows)
      details["phases"].setdefault(kind, {})[str(bits)] = {
          "portions": [p["portion"] for p in rows[0][3]["phases"]],
          "start": [r[3]["baseline"]["test_accuracy"] for r in rows],
          "mean": curves.mean(0).tolist(),
          "std": (curves.std(0, ddof=1) if len(rows) > 1 else 0 * curves[0]).tolist()}
  return summary, details


def _last_step(rows) -> dict:
  """Per seed: accuracy before the last quantization step, right after it, and after
  each final-finetune epoch (empty without a finetune)."""
  before, after, curves = [], [], []
  for _, _, _, results in rows:
    phases = results["phases"]
    before.append(phases[-2]["test_accuracy"])
    after.append(phases[-1].get("quantized_test_accuracy", float("nan")))
    curves.append(list(phases[-1].get("epoch_test_accuracy", [])))
  n = min(len(c) for c in curves)
  return {"portion_before": rows[0][3]["phases"][-2]["portion"], "before": before,
          "quantized": after, "finetune": [[c[e] for c in curves] for e in range(n)]}


def _baseline_of(summary: dict, seeds: Optional[dict], kind: str, bits) -> Optional[float]:
  """The mean fp32 accuracy of the seeds cell `kind``bits` ran with (its starting
  points); the mean of every baseline when `seeds` does not say."""
  fp32 = summary.get("fp32")
  if fp32 is None:
    return None
  base = dict(zip((seeds or {}).get("fp32", []), fp32["values"]))
  own = (seeds or {}).get(f"{kind}{bits}")
  if own and all(s in base for s in own):
    return float(np.mean([base[s] for s in own]))
  return fp32["mean"]


def target_checks(summary: dict, seeds: Optional[dict] = None) -> list:
  """(claim, measured, met) for every target whose cells have finished.

  `seeds` (details["seeds"]): when given, each cell is compared with the mean fp32
  baseline of its own seeds (a cell may have fewer seeds than the baseline).
  """
  out = []
  if "fp32" not in summary:
    return out
  baseline_of = lambda kind, bits: _baseline_of(summary, seeds, kind, bits)
  inq = summary.get("inq", {})
  for kind, label in (("inq", ""), ("inq_mse", " (calibration=mse, an extension)"),
                      ("inq_ft", " (final finetune)"),
                      ("inq_mse_ft", " (calibration=mse, final finetune)"),
                      ("tail", " (finer tail, final finetune)"),
                      ("tail_mse", " (calibration=mse, finer tail, final finetune)")):
    for bits, delta in TARGETS.items():
      if str(bits) in summary.get(kind, {}):
        d = 100 * (summary[kind][str(bits)]["mean"] - baseline_of(kind, bits))
        out.append((f"INQ {bits}-bit{label} >= fp32 {delta:+.1f} points", f"{d:+.2f} points",
                    d >= delta - 1e-9))
  rnd = summary.get("random", {}).get("5")
  if rnd and "5" in inq:
    d = 100 * (inq["5"]["mean"] - rnd["mean"])
    out.append(("magnitude partition above random (5-bit)", f"{d:+.2f} points", d > 0))
  # INQ vs no retraining, paired by seed: both cells of a seed start from the same
  # baseline, so the per-seed difference is the effect of retraining alone.
  for kind, ref, label in (("inq", "ptq", ""), ("inq_mse", "ptq_mse", ", calibration=mse")):
    for bits in (3, 2):
      a = summary.get(kind, {}).get(str(bits))
      b = summary.get(ref, {}).get(str(bits))
      if not a or not b or len(a["values"]) != len(b["values"]):
        continue
      diffs = [100 * (x - y) for x, y in zip(a["values"], b["values"])]
      out.append((f"INQ clearly above no-retraining at {bits} bits{label} (every seed, "
                  f"> 1 point)", f"{np.mean(diffs):+.2f} points (per seed "
                  + ", ".join(f"{d:+.2f}" for d in diffs) + ")", min(diffs) > 1.0))
  return out


def _plot_bits(summary, path, model="LeNet"):
  plt = reporting.pyplot()
  fig, ax = plt.subplots(figsize=(6.5, 4))
  if "fp32" in summary:
    m, s = 100 * summary["fp32"]["mean"], 100 * summary["fp32"]["std"]
    ax.axhspan(m - s, m + s, color="gray", alpha=0.2)
    ax.axhline(m, color="gray", ls="--", lw=1, label=f"fp32 {m:.2f}%")
  styles = {"inq": ("o-", "INQ (magnitude, per layer)"), "ptq": ("s--", "no retraining (PTQ)"),
            "channel": ("^-", "INQ, per-channel codebooks"), "random": ("D", "INQ, random partition"),
            "inq_mse": ("v-", "INQ, per layer, calibration=mse"),
            "ptq_mse": ("x--", "PTQ, calibration=mse")}
  for kind, (style, label) in styles.items():
    cells = summary.get(kind, {})
    if not cells:
      continue
    bits = sorted(cells, key=int, reverse=True)
    ax.errorbar([int(b) for b in bits], [100 * cells[b]["mean"] for b in bits],
                yerr=[100 * cells[b]["std"] for b in bits], fmt=style, capsize=3, label=label)
  ax.set_xlabel("bits per weight")
  ax.set_ylabel("test accuracy (%), mean +- std over seeds")
  ax.invert_xaxis()
  ax.grid(alpha=0.3)
  ax.legend(loc="lower left", fontsize=8)
  ax.set_title(f"{model} on Fashion-MNIST: accuracy vs bit width")
  fig.subplots_adjust(left=0.11, right=0.98, bottom=0.12, top=0.92)  # tight_layout is slow
  fig.savefig(path, dpi=120)
  plt.close(fig)


def _plot_phases(details, path):
  plt = reporting.pyplot()
  fig, ax = plt.subplots(figsize=(6.5, 4))
  for kind, by_bits in sorted(details["phases"].items()):
    for bits, c in sorted(by_bits.items(), key=lambda kv: -int(kv[0])):
      x = [0.0] + c["portions"]
      y = [100 * float(np.mean(c["start"]))] + [100 * v for v in c["mean"]]
      ls = {"inq": "-", "channel": "--", "random": ":", "inq_mse": "-."}.get(kind, "-")
      ax.plot(x, y, ls, marker="o", ms=3, label=f"{kind} {bits}-bit")
  ax.set_xlabel("accumulated portion quantized and frozen (0 = fp32)")
  ax.set_ylabel("test accuracy (%), mean over seeds")
  ax.grid(alpha=0.3)
  if details["phases"]:
    ax.legend(fontsize=8, ncol=2, loc="lower left")
  ax.set_title("Test accuracy after each INQ phase")
  fig.subplots_adjust(left=0.11, right=0.98, bottom=0.12, top=0.92)  # tight_layout is slow
  fig.savefig(path, dpi=120)
  plt.close(fig)


def _machine() -> str:
  cpu = platform.processor() or "unknown CPU"
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
  except (OSError, StopIteration):
    pass
  return (f"{jax.device_count()} x {jax.devices()[0].device_kind} (JAX {jax.__version__}, "
          f"backend {jax.default_backend()}); host: {cpu}, {os.cpu_count()} cores")


def _fmt(cell, fp32, seeds=None) -> tuple:
  if seeds is None:
    per_seed = ", ".join(f"{100 * v:.2f}" for v in cell["values"])
  else:  # some cells have fewer seeds than others: name them
    per_seed = ", ".join(f"{100 * v:.2f} (s{s})" for s, v in zip(seeds, cell["values"]))
  delta = f"{100 * (cell['mean'] - fp32):+.2f}" if fp32 is not None else ""
  return (f"{100 * cell['mean']:.2f} ± {100 * cell['std']:.2f}", per_seed, delta,
          f"{cell['seconds'] / 60:.1f}")


NAMES = {"inq": "INQ {b}-bit", "random": "INQ {b}-bit, random partition",
         "ptq": "no retraining (PTQ) {b}-bit", "channel": "INQ {b}-bit, per-channel",
         "inq_mse": "INQ {b}-bit, calibration=mse",
         "ptq_mse": "no retraining (PTQ) {b}-bit, calibration=mse",
         "inq_ft": "INQ {b}-bit, final finetune",
         "inq_mse_ft": "INQ {b}-bit, calibration=mse, final finetune",
         "tail": "INQ {b}-bit, finer tail, final finetune",
         "tail_mse": "INQ {b}-bit, calibration=mse, finer tail, final finetune"}


def _last_step_table(details, finetune_epochs) -> list:
  """What the last quantization step costs, and what each finetune epoch buys back."""
  last = details.get("last_step", {})
  if not finetune_epochs or not any(k in last for k in ("inq_ft", "inq_mse_ft", "tail",
                                                         "tail_mse")):
    return []
  mean = lambda v: f"{100 * float(np.mean(v)):.2f}"
  n = max(len(c["finetune"]) for by in last.values() for c in by.values())
  rows = []
  for kind in NAMES:
    for b, c in sorted(last.get(kind, {}).items(), key=lambda kv: -int(kv[0])):
      ft = [mean(v) for v in c["finetune"]] + [""] * (n - len(c["finetune"]))
      rows.append(f"| {NAMES[kind].format(b=b)} | {c['portion_before']:g} | "
                  f"{mean(c['before'])} | {mean(c['quantized'])} | "
                  f"{100 * (np.mean(c['quantized']) - np.mean(c['before'])):+.2f} | "
                  + " | ".join(ft) + " |")
  head = " | ".join(f"after finetune epoch {e + 1}" for e in range(n))
  return [
      "## The last step, and the final finetune",
      "",
      "Mean over seeds, test accuracy %: after retraining the phase before the last "
      "portion; right after quantizing the last portion (the result without a finetune); "
      "and after each epoch of the final finetune (every kernel frozen).",
      "",
      f"| cell | last portion before 1 | before the last step | right after it | cost | {head} |",
      "|---|---|---|---|---|" + "---|" * n,
      *rows,
      "",
  ]


def _codebook_table(details) -> list:
  """Per layer: the share each codebook rounds to zero and its relative rounding error."""
  fits = details.get("codebook", {})
  if not fits:
    return []
  keys = sorted(fits, key=lambda k: (k.split()[0], -int(k.split()[1])))
  layers = list(next(iter(fits.values())))
  cell = lambda f: (f"{100 * f['zero_fraction']:.0f}% / {f['relative_error']:.2f} "
                    f"(n1={f['n1']})")
  return [
      "## How each codebook fits the pretrained weights",
      "",
      "Per quantized layer, what rounding every fp32 weight at once would do (the "
      "first seed's baseline): the share rounded to zero / ||round(w) - w|| / ||w||, and "
      "the codebook's largest exponent n1. `init` warns when a codebook rounds more "
      "than half of a layer to zero.",
      "",
      "| layer | " + " | ".join(f"{k.split()[1]}-bit {k.split()[0]}" for k in keys) + " |",
      "|---|" + "---|" * len(keys),
      *[f"| `{layer}` | " + " | ".join(cell(fits[k][layer]) for k in keys) + " |"
        for layer in layers],
      "",
  ]


def markdown(sc, summary, details, workdir, report_dir: str = "results") -> str:
  e = sc.experiment
  rows = []
  seeds = details["seeds"]
  ragged = len({tuple(v) for v in seeds.values()}) > 1
  if "fp32" in summary:
    rows.append(("fp32 baseline", *_fmt(summary["fp32"], None,
                                        seeds["fp32"] if ragged else None)))
  # Mixed widths: a column of the average bits per quantized weight beside the accuracy.
  mixed = any(abs(c.get("mean_bits", int(b)) - int(b)) > 1e-9
              for kind in NAMES for b, c in summary.get(kind, {}).items())
  if "fp32" in summary and mixed:
    rows[-1] = (*rows[-1], "32")
  for kind in NAMES:
    for b, cell in sorted(summary.get(kind, {}).items(), key=lambda kv: -int(kv[0])):
      rows.append((NAMES[kind].format(b=b),
                   *_fmt(cell, _baseline_of(summary, seeds, kind, b),
                         seeds[f"{kind}{b}"] if ragged else None),
                   *((f"{cell.get('mean_bits', int(b)):.3f}",) if mixed else ())))
  done = sorted({s for v in seeds.values() for s in v})
  missing = [s for s in sc.seeds if s not in done]
  total = sum(c["seconds"] for c in _all_cells(summary))
  ft = sc.get("finetune_epochs", 0)
  lines = [
      "# " + sc.get("title", "INQ on Fashion-MNIST (LeNet): bit widths, partitions, "
                    "no-retraining, per-channel"),
      "",
      f"Written by `experiments/study/sweep.py` on {datetime.date.today().isoformat()} from "
      f"{len(done)} seed(s) {tuple(done)}"
      + (f" (seeds {tuple(missing)} not run yet; rerunning the command runs them)"
         if missing else "")
      + (", not every cell with every seed (the per-seed column names them)"
         if ragged else "") + "; the machine-readable "
      f"copy is [`{SWEEP_JSON}`]({SWEEP_JSON}) (accuracies as fractions; `seconds` is the "
      f"wall time summed over seeds). Every cell starts from its seed's fp32 baseline.",
      "",
      "| cell | test accuracy % (mean ± std) | per seed | Δ vs fp32 (points) | wall time (min, all seeds) |"
      + (" bits per weight (average) |" if mixed else ""),
      "|---|---|---|---|---|" + ("---|" if mixed else ""),
      *[f"| {' | '.join(r)} |" for r in rows],
      "",
      f"Total wall time: {total / 60:.1f} min.",
      "",
      *_last_step_table(details, ft),
      *_codebook_table(details),
      "## Targets (issue #4)",
      "",
      "| claim | measured | met |",
      "|---|---|---|",
      *[f"| {c} | {m} | {'yes' if ok else '**no**'} |"
        for c, m, ok in target_checks(summary, details["seeds"])],
      "",
      *([f"Why targets are missed, and what closes the gap: the notes at the end "
         f"([`{NOTES_MD}`]({NOTES_MD})).", ""]
        if os.path.exists(os.path.join(report_dir, NOTES_MD)) else []),
      "## Plots",
      "",
      f"![accuracy vs bits]({BITS_PNG})",
      "",
      f"![accuracy after each phase]({PHASES_PNG})",
      "",
      "## Settings",
      "",
      f"- data: real Fashion-MNIST ({e.dataset.train_split} / {e.dataset.test_split}), "
      f"augmentation {'on (2-pixel shifts, mirror images)' if e.dataset.augment else 'off'}",
      f"- model: {e.model}; batch {e.batch_size}; SGD momentum {e.momentum}, weight decay "
      f"{e.weight_decay}",
      f"- fp32 baseline: {e.baseline.epochs:g} epochs, lr {e.baseline.learning_rate} "
      f"({e.baseline.lr_schedule})",
      f"- every INQ phase: {e.inq.epochs:g} epochs of retraining, lr "
      f"{e.inq.learning_rate} ({e.inq.lr_schedule}, restarted each phase), fresh optimizer; "
      f"the last phase (portion 1) has {e.inq.final_finetune_epochs:g} epochs"
      + (f" ({ft:g} in the final-finetune cells: every kernel frozen, biases and BN "
         f"parameters train, the test split evaluated after each epoch)" if ft else ""),
      "- portions (the paper's ResNet-18 schedules): " + "; ".join(
          f"{k[1:]}-bit {tuple(v)}" for k, v in sorted(sc.portions.items(), reverse=True)),
      *(["- finer tails (the tail cells): " + "; ".join(
          f"{k[1:]}-bit {tuple(v)}" for k, v in sorted(sc.tail_portions.items(),
                                                       reverse=True))]
        if sc.get("tail_portions") else []),
      "- PTQ: portions (1,), the same codebooks (n1 from each layer's max |w|), no retraining",
      "- calibration=mse (an extension, `inq_jax.quantize.mse_exponent_bounds`): each "
      "layer's n1 is the one at or below the paper's that minimises the squared rounding "
      "error of the pretrained weights; weights above 1.5 * 2^n1 saturate to +-2^n1",
      "",
      "## Commands",
      "",
      "```",
      "bash scripts/setup.sh",
      ".venv/bin/python -m experiments.study.sweep \\",
      f"    --config={sc.get('command_config', 'experiments/configs/sweep_fashion_mnist.py')} \\",
      f"    --workdir={workdir}",
      "```",
      "",
      "Rerunning the command resumes an interrupted study and rewrites this file. One cell "
      "alone is an ordinary run, e.g. `python -m experiments.main --config=... "
      "--config.inq.bits=3 ...`; each cell's directory holds its results.json, "
      "metrics.jsonl and plots.",
      "",
      "## Machine",
      "",
      f"- {_machine()}",
  ]
  notes = os.path.join(report_dir, NOTES_MD)
  if os.path.exists(notes):
    with open(notes) as f:
      lines += ["", f.read().rstrip()]
  return "\n".join(lines) + "\n"


def _all_cells(summary):
  for key, value in summary.items():
    if key == "fp32":
      yield value
    else:
      yield from value.values()


def write(sc, workdir: str, report_dir: str, finished: dict) -> dict:
  """Writes sweep.json, sweep_details.json, the plots and RESULTS.md; returns sweep.json."""
  if jax.process_index() != 0 or not finished:
    return {}
  summary, details = aggregate(finished)
  os.makedirs(report_dir, exist_ok=True)
  reporting.atomic_write_json(os.path.join(report_dir, SWEEP_JSON), summary)
  reporting.atomic_write_json(os.path.join(report_dir, DETAILS_JSON), details)
  _plot_bits(summary, os.path.join(report_dir, BITS_PNG),
             {"lenet": "LeNet", "resnet20": "ResNet-20"}.get(sc.experiment.model,
                                                             sc.experiment.model))
  _plot_phases(details, os.path.join(report_dir, PHASES_PNG))
  reporting.atomic_write(os.path.join(report_dir, RESULTS_MD),
                         markdown(sc, summary, details, workdir, report_dir))
  return summary
