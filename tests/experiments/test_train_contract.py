"""The trainer's promises, tested as behaviour on whole runs of a tiny model on tiny data.

`train.train_and_evaluate` runs exactly as a user runs it (plan, segments,
phases, checkpoints, resume), from the stock smoke config; only the data (40
random 8x8 train images whose labels are their indices, 13 test images) and
the model (a conv, BatchNorm, dropout and a dense layer) are swapped for tiny
ones, so that a whole run takes seconds. A probe wraps the compiled train step
and records, before every step, what the step is given: the state (params,
batch statistics, the optimizer's momentum and step count, the learning rate
that count gives in the segment's schedule) and the batch. Every assertion is
about those records:

  * each segment trains, epoch by epoch, the pipeline's batches of its own data
    seed: every epoch a permutation of the split, no two epochs of the run
    alike, the images augmented;
  * the learning-rate schedule restarts at every segment (the stage's own rate
    first, the count from 0), and metrics.jsonl logs the rate actually used;
  * every pruning step and INQ phase starts with a fresh optimizer (zero
    momentum, count 0); with `inq.carry_optimizer_state` a phase after the
    first carries the previous phase's momentum, with its count reset;
  * the weights an INQ phase froze stay bit-identical through it (weight decay
    on, momentum carried in) and lie on the codebook;
  * the final finetune moves biases, BatchNorm and its statistics, no kernel;
  * BatchNorm statistics move in training, and not in evaluation;
  * a run killed anywhere resumes at its newest checkpoint and goes on with the
    uninterrupted run's learning rate, data, dropout and weights, bit for bit.
"""

import json

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest

from experiments import models, recipe, reporting, runner, steps, train
from experiments.configs import smoke
from experiments.data import input_pipeline as ip
from experiments.train_state import BASELINE, INQ, PRUNE
from inq_jax.tree import leaves_with_paths

SHAPE = (8, 8, 1)
TRAIN, TEST, BATCH = 40, 13, 8  # 5 steps per epoch; the last test batch is padded
STEPS_PER_EPOCH = TRAIN // BATCH
STAGE_KEY = {BASELINE: "baseline", PRUNE: "prune", INQ: "inq"}


class ContractNet(nn.Module):
  """Kernels to quantize, biases, BatchNorm and dropout: every kind of thing a run trains.

  Dense layers only: a conv's gradient takes XLA:CPU seconds to compile, and
  every segment compiles its own step.
  """
  num_classes: int

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Dense(16)(x.reshape(x.shape[0], -1))
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
    x = nn.Dropout(0.25, deterministic=not train)(nn.relu(x))
    return nn.Dense(self.num_classes)(x)


def tiny_dataset():
  """40 train examples labelled by their index (so a batch says which it holds), 13 test."""
  rng = np.random.default_rng(0)

  def source(n):
    return ip._ArraySource(rng.integers(0, 256, (n,) + SHAPE, np.uint8),  # pylint: disable=protected-access
                           np.arange(n, dtype=np.int32), "fashion_mnist")

  return ip.Dataset(name="fashion_mnist", num_classes=TRAIN, image_shape=SHAPE,
                    train_size=TRAIN, test_size=TEST, augment=True, train_source=source(TRAIN),
                    test_source=source(TEST))


DATA = tiny_dataset()


def config(**overrides):
  """The stock smoke config, with the tiny data's batch sizes (and what a test is about)."""
  c = smoke.get_config()
  c.batch_size = BATCH
  c.eval_batch_size = 5
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def host(tree):
  return jax.tree.map(np.asarray, jax.device_get(tree))


def base_part(opt_state, name):
  """The base optimizer's `trace` (momentum, a params tree) or `count`."""
  (found,) = optax.tree_utils.tree_get_all_with_path(opt_state["base"], name)
  return found[1]


class Probe:
  """Installs the recorders; also the run's callback, which can kill it.

  steps: one record per train step, in the order of execution, over every session.
  saves: one record per checkpoint saved.
  sessions: (len(steps), len(saves)) when each session (call of train_and_evaluate) began.
  """

  def __init__(self, kill_at_step=(), kill_at_event=()):
    self.steps, self.saves, self.sessions = [], [], []
    self.kill_at_step, self.kill_at_event = set(kill_at_step), set(kill_at_event)
    self._segment = self._schedule = None

  def __call__(self, event, **info):
    if event == "step":
      key = info["step"]
      found = key in self.kill_at_step
      self.kill_at_step.discard(key)
    else:
      key = (event, info.get("stage"), info.get("phase"), info.get("epoch"))
      found = key in self.kill_at_event
      self.kill_at_event.discard(key)
    if found:
      raise KeyboardInterrupt(f"simulated kill at {key}")

  def install(self, mp):
    mp.setattr(runner, "_get_dataset", lambda dataset_config: DATA)
    mp.setattr(models, "from_config", lambda c, num_classes: ContractNet(num_classes))
    for plot in ("plot_accuracy", "plot_weights"):  # seconds of matplotlib, tested elsewhere
      mp.setattr(reporting, plot, lambda *args, **kwargs: None)
    real_optimizer, real_compile, real_save = (runner.Run.optimizer, steps.compile_step,
                                               runner.Run.save)

    def optimizer(run, segment):
      tx, schedule = real_optimizer(run, segment)
      self._segment, self._schedule = segment, schedule
      return tx, schedule

    def compile_step(train_step, state, *args, **kwargs):
      compiled, seconds = real_compile(train_step, state, *args, **kwargs)
      segment, schedule = self._segment, self._schedule  # Run.train's own, just built

      def step(state, batch, *rest, **kwargs):
        count = int(base_part(state.opt_state, "count"))
        self.steps.append({
            "segment": (segment.stage, segment.index), "step": int(state.step),
            "epoch": int(state.epoch), "count": count, "lr": float(schedule(count)),
            "trace": host(base_part(state.opt_state, "trace")), "params": host(state.params),
            "batch_stats": host(state.batch_stats),
            "labels": np.asarray(batch["label"]), "images": np.asarray(batch["image"])})
        return compiled(state, batch, *rest, **kwargs)

      return step, seconds

    def save(run, state, *rest, **kwargs):
      self.saves.append({"at": (int(state.stage), int(state.phase), int(state.epoch)),
                         "step": int(state.step), "params": host(state.params),
                         "batch_stats": host(state.batch_stats),
                         "trace": host(base_part(state.opt_state, "trace")),
                         "count": int(base_part(state.opt_state, "count")),
                         "masks": None if state.inq_state is None
                         else host(state.inq_state.masks)})
      return real_save(run, state, *rest, **kwargs)

    mp.setattr(runner.Run, "optimizer", optimizer)
    mp.setattr(steps, "compile_step", compile_step)
    mp.setattr(runner.Run, "save", save)

  def run(self, c, workdir):
    self.sessions.append((len(self.steps), len(self.saves)))
    return train.train_and_evaluate(c, str(workdir), callback=self)

  def of(self, stage, index):
    return [r for r in self.steps if r["segment"] == (stage, index)]

  def advanced(self, stage, index):
    """The checkpoint a new pruning step or INQ phase saves before training (epoch 0)."""
    (found,) = [s for s in self.saves if s["at"] == (stage, index, 0)]
    return found


def run_once(tmp_path_factory, name, **overrides):
  probe = Probe()
  workdir = tmp_path_factory.mktemp(name)
  with pytest.MonkeyPatch.context() as mp:
    probe.install(mp)
    results = probe.run(config(**overrides), workdir)
  return probe, results, workdir


@pytest.fixture(scope="module")
def stock(tmp_path_factory):
  """The smoke config as it stands: 2 baseline epochs, 1 epoch per INQ phase, no finetune."""
  return run_once(tmp_path_factory, "stock")


CARRIED = {"prune.sparsity": ((".*", 0.5),), "prune.steps": 2,
           "inq.carry_optimizer_state": True, "inq.final_finetune_epochs": 1.0}


@pytest.fixture(scope="module")
def carried(tmp_path_factory):
  """Two pruning steps, momentum carried between INQ phases, a one-epoch final finetune."""
  return run_once(tmp_path_factory, "carried", **CARRIED)


def trained_segments(c):
  return [s for s in recipe.plan(c) if s.epochs > 0]


def flat(tree):
  return dict(leaves_with_paths(tree)[0])


# ------------------------------------------------------------ data


def test_each_segment_trains_the_pipelines_epochs_of_its_own_seed(stock):
  probe, _, _ = stock
  orders = {}
  for segment in trained_segments(config()):
    records = probe.of(segment.stage, segment.index)
    epochs = optimizer_epochs(segment)
    assert len(records) == sum(epochs), segment.desc
    at = 0
    for e, n in enumerate(epochs):
      fed = records[at:at + n]
      at += n
      assert {r["epoch"] for r in fed} == {e}
      want = list(DATA.train_batches(BATCH, e, segment.data_seed))[:n]
      for r, b in zip(fed, want):  # the pipeline's batches of (epoch, the segment's seed)
        np.testing.assert_array_equal(r["labels"], b["label"])
        np.testing.assert_array_equal(r["images"], b["image"])
      order = np.concatenate([r["labels"] for r in fed])
      assert len(np.unique(order)) == n * BATCH  # a permutation: nobody twice
      orders[segment.desc, e] = order
      # augmented: not the stored images
      stored = DATA.train_source.images[order]
      assert not np.array_equal(np.concatenate([r["images"] for r in fed]), stored)
  assert len(orders) == 5  # 2 baseline epochs and 3 phases of one
  for a in orders:
    for b in orders:
      if a < b:
        assert not np.array_equal(orders[a], orders[b]), f"{a} and {b} see the same order"


def optimizer_epochs(segment):
  """Steps of each epoch of a segment (independently of optimizer.epoch_steps)."""
  total = round(segment.epochs * STEPS_PER_EPOCH)
  return [STEPS_PER_EPOCH] * (total // STEPS_PER_EPOCH) + (
      [total % STEPS_PER_EPOCH] if total % STEPS_PER_EPOCH else [])


# ------------------------------------------------------------ learning rate


def cosine(base, total, i):
  return base * 0.5 * (1 + np.cos(np.pi * min(i, total) / total))


def test_the_learning_rate_schedule_restarts_at_every_segment(stock):
  probe, _, workdir = stock
  c = config()
  for segment in trained_segments(c):
    stage = c[STAGE_KEY[segment.stage]]
    assert stage.lr_schedule == "cosine" and stage.warmup_epochs == 0
    records = probe.of(segment.stage, segment.index)
    n = len(records)
    assert [r["count"] for r in records] == list(range(n)), segment.desc
    assert records[0]["lr"] == pytest.approx(stage.learning_rate, rel=1e-6), segment.desc
    for i, r in enumerate(records):
      assert r["lr"] == pytest.approx(cosine(stage.learning_rate, n, i), rel=1e-5, abs=1e-9)
  # metrics.jsonl: each epoch's line logs the rate its last step used.
  logged = [l for l in reporting.read_metrics(str(workdir)) if "lr" in l]
  assert len(logged) == 5
  for line in logged:
    key = (BASELINE, 0) if line["stage"] == "baseline" else (INQ, line["phase"])
    last = [r for r in probe.of(*key) if r["epoch"] == line["epoch"] - 1][-1]
    assert line["lr"] == pytest.approx(last["lr"], rel=1e-6), line


# ------------------------------------------------------------ optimizer state


def all_zero(tree):
  return all(not np.any(x) for x in jax.tree.leaves(tree))


def test_every_phase_starts_with_a_fresh_optimizer(stock):
  probe, _, _ = stock
  for segment in trained_segments(config()):
    first = probe.of(segment.stage, segment.index)[0]
    assert first["count"] == 0 and all_zero(first["trace"]), segment.desc
    last = probe.of(segment.stage, segment.index)[-1]
    assert not all_zero(last["trace"])  # momentum there was to carry


def test_carried_momentum_with_its_count_reset_and_fresh_pruning_steps(carried):
  probe, _, _ = carried
  c = config(**CARRIED)
  segments = trained_segments(c)
  assert [(s.stage, s.index) for s in segments] == [
      (BASELINE, 0), (PRUNE, 1), (PRUNE, 2), (INQ, 1), (INQ, 2), (INQ, 3), (INQ, 4)]
  for segment in segments:
    first = probe.of(segment.stage, segment.index)[0]
    assert first["count"] == 0, segment.desc  # the schedule restarts, carried or not
    if segment.stage != INQ or segment.index == 1:  # fresh: baseline, pruning, phase 1
      assert all_zero(first["trace"]), segment.desc
      continue
    # The momentum the previous phase ended with (its last epoch's checkpoint).
    (ended,) = [s for s in probe.saves if s["at"] == (INQ, segment.index - 1, 1)]
    assert not all_zero(ended["trace"])
    for a, b in zip(jax.tree.leaves(ended["trace"]), jax.tree.leaves(first["trace"])):
      assert a.tobytes() == b.tobytes(), segment.desc


# ------------------------------------------------------------ freezing


@pytest.mark.parametrize("run", ["stock", "carried"])
def test_frozen_weights_stay_bit_identical_through_each_phase(run, request):
  probe, results, _ = request.getfixturevalue(run)
  for k in (1, 2, 3, 4):
    start = probe.advanced(INQ, k)
    masks, params = flat(start["masks"]), flat(start["params"])
    kernels = [p for p in params if p.endswith("kernel")]
    assert len(kernels) == 2
    records = probe.of(INQ, k)
    after = [flat(r["params"]) for r in records[1:]]
    if records:  # and the phase's end: the last epoch's checkpoint
      (end,) = [s for s in probe.saves if s["at"][:2] == (INQ, k) and s["at"][2] > 0][-1:]
      after.append(flat(end["params"]))
    for p in kernels:
      m = masks[p]
      assert m.any(), (k, p)
      frozen = params[p][m]
      nonzero = np.abs(frozen[frozen != 0]).astype(np.float64)  # on the codebook: 0 or +-2^n
      np.testing.assert_array_equal(np.exp2(np.round(np.log2(nonzero))), nonzero)
      for later in after:
        assert later[p][m].tobytes() == frozen.tobytes(), (run, k, p)
      if not m.all() and records:  # the float rest trained
        assert np.any(after[-1][p][~m] != params[p][~m]), (run, k, p)
  assert results["final"]["all_pow2"] is True


def test_the_final_finetune_trains_biases_and_batchnorm_only(carried):
  probe, results, _ = carried
  start = probe.advanced(INQ, 4)
  assert all(m.all() for p, m in flat(start["masks"]).items() if p.endswith("kernel"))
  records = probe.of(INQ, 4)
  assert len(records) == STEPS_PER_EPOCH  # final_finetune_epochs = 1
  (end,) = [s for s in probe.saves if s["at"] == (INQ, 4, 1)]
  before, after = flat(start["params"]), flat(end["params"])
  for p in before:
    if p.endswith("kernel"):
      assert before[p].tobytes() == after[p].tobytes(), p
    else:  # Dense_0/bias, Dense_1/bias, BatchNorm_0/scale and /bias
      assert np.any(before[p] != after[p]), p
  for p, x in flat(start["batch_stats"]).items():
    assert np.any(x != flat(end["batch_stats"])[p]), p
  assert results["phases"][-1]["epoch_test_accuracy"] == [results["final"]["test_accuracy"]]


# ------------------------------------------------------------ batch statistics


def test_batch_statistics_move_in_training_not_in_evaluation(stock):
  probe, _, _ = stock
  for segment in trained_segments(config()):
    records = probe.of(segment.stage, segment.index)
    for a, b in zip(records, records[1:]):
      moved = jax.tree.map(lambda x, y: bool(np.any(x != y)), a["batch_stats"], b["batch_stats"])
      assert all(jax.tree.leaves(moved)), (segment.desc, a["step"])
  # Between two checkpoints with no train step in between, the run only evaluated
  # (and quantized): the statistics are the same, bit for bit.
  still = [(a, b) for a, b in zip(probe.saves, probe.saves[1:]) if a["step"] == b["step"]]
  assert len(still) >= 4  # baseline end -> phase 1, each phase's end -> the next, -> done
  for a, b in still:
    for x, y in zip(jax.tree.leaves(a["batch_stats"]), jax.tree.leaves(b["batch_stats"])):
      assert x.tobytes() == y.tobytes(), (a["at"], b["at"])


# ------------------------------------------------------------ resume


# Kill points of the stock run (5 steps per epoch): mid-way through baseline epoch 2,
# right after its last checkpoint, mid-way through phase 1, on phase 2's last step
# (before its checkpoint), right after phase 3's quantization was saved.
KILL_AT_STEP = (7, 12, 20)
KILL_AT_EVENT = (("epoch", "baseline", 0, 2), ("advance", None, 2, None))


def test_a_killed_run_resumes_where_it_stopped(stock, tmp_path):
  want, results, _ = stock
  probe = Probe(KILL_AT_STEP, KILL_AT_EVENT)
  workdir = tmp_path / "resumed"
  with pytest.MonkeyPatch.context() as mp:
    probe.install(mp)
    for _ in range(len(KILL_AT_STEP) + len(KILL_AT_EVENT)):
      saves = len(probe.saves)
      with pytest.raises(KeyboardInterrupt):
        probe.run(config(), workdir)
      assert len(probe.saves) > saves
    resumed = probe.run(config(), workdir)
  assert not probe.kill_at_step and not probe.kill_at_event  # every kill happened
  by_step = {r["step"]: r for r in want.steps}
  assert len(by_step) == len(want.steps) == 25
  for r in probe.steps:  # every step of every session: the uninterrupted run's step
    w = by_step[r["step"]]
    assert (r["segment"], r["epoch"], r["count"]) == (w["segment"], w["epoch"], w["count"])
    assert r["lr"] == w["lr"], r["step"]
    np.testing.assert_array_equal(r["labels"], w["labels"], err_msg=str(r["step"]))
    assert r["images"].tobytes() == w["images"].tobytes(), r["step"]
    for a, b in zip(jax.tree.leaves((r["params"], r["batch_stats"], r["trace"])),
                    jax.tree.leaves((w["params"], w["batch_stats"], w["trace"]))):
      assert a.tobytes() == b.tobytes(), r["step"]
  assert {r["step"] for r in probe.steps} == set(by_step)
  # Each session after a kill starts at the newest checkpoint the kill left.
  bounds = [i for i, _ in probe.sessions] + [len(probe.steps)]
  for i, (begin, saves_before) in enumerate(probe.sessions[1:], 1):
    if begin < bounds[i + 1]:  # the session trained
      assert probe.steps[begin]["step"] == probe.saves[saves_before - 1]["step"], i
  for a, b in zip(jax.tree.leaves(want.saves[-1]["params"]), jax.tree.leaves(
      probe.saves[-1]["params"])):
    assert a.tobytes() == b.tobytes()
  assert json.loads(json.dumps(resumed["final"])) == json.loads(json.dumps(results["final"]))
  assert [p["test_accuracy"] for p in resumed["phases"]] == \
      [p["test_accuracy"] for p in results["phases"]]
