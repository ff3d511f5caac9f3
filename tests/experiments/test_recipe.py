"""experiments.recipe.plan: the segments a run trains, on the stock configs.

What the trainer and the sweep rely on: the baseline (none when the model
comes pretrained), each pruning step, each INQ phase in order with its portion;
`inq.epochs` for every phase but the last, which gets
`inq.final_finetune_epochs` (every kernel is frozen then); and a data seed of
its own for every segment (with the epoch, it fixes the order and the
augmentation), different for another `config.seed`.
"""

import itertools

import pytest

from experiments import recipe
from experiments.configs import fashion_mnist_lenet, fashion_mnist_lenet_pruned, imagenet_resnet18
from experiments.configs import smoke
from experiments.train_state import BASELINE, INQ, PRUNE


def layout(segments):
  return [(s.stage, s.index, s.epochs) for s in segments]


def test_the_stock_smoke_plan():
  c = smoke.get_config()
  segments = recipe.plan(c)
  assert layout(segments) == [(BASELINE, 0, 2.0), (INQ, 1, 1.0), (INQ, 2, 1.0), (INQ, 3, 1.0),
                              (INQ, 4, 0.0)]
  assert [s.record for s in segments] == [
      {"stage": "baseline"}] + [{"stage": "inq", "phase": k, "portion": p}
                                for k, p in enumerate((0.5, 0.75, 0.875, 1.0), 1)]
  assert len({s.data_seed for s in segments}) == len(segments)
  assert len({s.desc for s in segments}) == len(segments)


def test_the_stock_pruned_plan():
  c = fashion_mnist_lenet_pruned.get_config()
  segments = recipe.plan(c)
  assert layout(segments[:4]) == [(BASELINE, 0, c.baseline.epochs), (PRUNE, 1, 1.0),
                                  (PRUNE, 2, 1.0), (PRUNE, 3, 1.0)]
  assert [s.record for s in segments[1:4]] == [{"stage": "prune", "phase": t} for t in (1, 2, 3)]
  phases = segments[4:]
  assert [(s.stage, s.index) for s in phases] == [(INQ, k) for k in range(1, 21)]
  assert [s.record["portion"] for s in phases] == list(c.inq.portions)
  assert [s.epochs for s in phases] == [0.25] * 19 + [c.inq.final_finetune_epochs]
  # No two segments share their data: not a pruning step and the phase of its number.
  assert len({s.data_seed for s in segments}) == len(segments)


@pytest.mark.parametrize("finetune", [0.0, 0.5, 2.0])
def test_only_the_last_phase_is_the_final_finetune(finetune):
  c = fashion_mnist_lenet.get_config()
  c.inq.final_finetune_epochs = finetune
  phases = [s for s in recipe.plan(c) if s.stage == INQ]
  assert [s.epochs for s in phases] == [c.inq.epochs] * 3 + [finetune]


@pytest.mark.parametrize("source", ["init_checkpoint", "init_torchvision"])
def test_a_pretrained_model_trains_no_baseline(source):
  c = imagenet_resnet18.get_config()
  assert c.baseline.epochs > 0
  assert recipe.plan(c)[0].epochs == c.baseline.epochs
  c[source] = "/weights/resnet18"  # plan reads no file (check_config does)
  baseline, *rest = recipe.plan(c)
  assert (baseline.stage, baseline.epochs) == (BASELINE, 0)
  assert [s.epochs for s in rest] == [c.inq.epochs] * 3 + [c.inq.final_finetune_epochs]


def test_another_seed_gives_every_segment_other_data():
  plans = []
  for seed in (0, 1, 2):
    c = fashion_mnist_lenet_pruned.get_config()
    c.seed = seed
    plans.append({s.data_seed for s in recipe.plan(c)})
  for a, b in itertools.combinations(plans, 2):
    assert not a & b
