"""experiments.optimizer: epochs cut into steps, the schedules, the chain and its freeze.

(test_steps.py has the first checks of these; here, the properties the
trainer relies on across a whole segment.)
"""

import itertools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from experiments import optimizer


def stage(**overrides):
  c = ml_collections.ConfigDict({"learning_rate": 0.1, "lr_schedule": "cosine",
                                 "step_epochs": 1.0, "step_factor": 0.1, "warmup_epochs": 0.0})
  c.update(overrides)
  return c


def run_config(opt="sgd"):
  return ml_collections.ConfigDict({"optimizer": opt, "momentum": 0.9, "nesterov": False,
                                    "weight_decay": 5e-4})


def test_epoch_steps_cut_a_segment_into_whole_epochs_and_a_last_part():
  for epochs, per_epoch in itertools.product(
      (0.0, 0.2, 0.25, 0.5, 1.0, 1.5, 2.0, 2.75, 3.0, 8.0), (1, 3, 7, 16, 390)):
    chunks = optimizer.epoch_steps(epochs, per_epoch)
    case = (epochs, per_epoch, chunks)
    assert sum(chunks) == round(epochs * per_epoch), case  # the segment's steps, to the nearest
    assert all(0 < n <= per_epoch for n in chunks), case  # no empty epoch
    assert all(n == per_epoch for n in chunks[:-1]), case  # only the last may be partial
    assert len(chunks) == -(-round(epochs * per_epoch) // per_epoch), case


@pytest.mark.parametrize("epochs,per_epoch", [(1.0, 5), (2.0, 10), (0.5, 12), (1.5, 4)])
def test_the_cosine_schedule_spans_exactly_the_segment(epochs, per_epoch):
  total = round(epochs * per_epoch)
  lr = optimizer.learning_rate(stage(), per_epoch, epochs)
  assert float(lr(0)) == pytest.approx(0.1)
  assert float(lr(total - 1)) > 0  # the last step still learns
  assert float(lr(total)) == pytest.approx(0.0, abs=1e-9)  # and the schedule ends there
  for i in range(total):
    assert float(lr(i)) == pytest.approx(0.05 * (1 + np.cos(np.pi * i / total)), rel=1e-5,
                                         abs=1e-9)


def test_the_step_schedule_divides_at_every_step_epochs_and_warmup_ramps():
  lr = optimizer.learning_rate(stage(lr_schedule="step", step_epochs=2.0, step_factor=0.5), 4,
                               6.0)
  assert [float(lr(i)) for i in range(24)] == pytest.approx(
      [0.1] * 8 + [0.05] * 8 + [0.025] * 8)
  warm = optimizer.learning_rate(stage(warmup_epochs=0.5), 8, 2.0)
  assert [float(warm(i)) for i in range(5)] == pytest.approx([0.0, 0.025, 0.05, 0.075, 0.1])


def frozen_masks(params, rng):
  return jax.tree.map(lambda p: rng.random(p.shape) < 0.5, params)


@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_frozen_weights_get_exactly_no_update_with_momentum_and_decay_built_up(opt):
  """Momentum (or Adam's moments) and weight decay are there when weights freeze: no move."""
  rng = np.random.default_rng(0)
  params = {"a": jnp.asarray(rng.normal(size=(5, 4)), jnp.float32),
            "b": jnp.asarray(rng.normal(size=7), jnp.float32)}
  tx = optimizer.make_optimizer(run_config(opt), optimizer.learning_rate(stage(), 10, 1.0))
  state = tx.init(params)
  none = jax.tree.map(lambda p: np.zeros(p.shape, bool), params)
  for _ in range(3):  # momentum builds up with nothing frozen
    grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
    updates, state = tx.update(grads, state, params, frozen_masks=none)
    params = optax.apply_updates(params, updates)
  masks = frozen_masks(params, rng)
  for _ in range(3):
    grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
    updates, state = tx.update(grads, state, params, frozen_masks=masks)
    moved = optax.apply_updates(params, updates)
    for key in params:
      m = masks[key]
      assert m.any() and not m.all()
      assert np.asarray(moved[key])[m].tobytes() == np.asarray(params[key])[m].tobytes()
      assert np.all(np.asarray(moved[key])[~m] != np.asarray(params[key])[~m])
    params = moved


def test_a_carried_state_restarts_its_schedule_and_keeps_its_momentum():
  """What a phase carries with inq.carry_optimizer_state: the trace, with the count at 0."""
  params = {"w": jnp.ones(3)}
  lr = optimizer.learning_rate(stage(), 4, 1.0)  # cosine over 4 steps: 0 at the 4th
  tx = optimizer.base_optimizer(run_config(), lr)
  state = tx.init(params)
  grads = {"w": jnp.asarray([1.0, -2.0, 0.5])}
  for _ in range(4):
    _, state = tx.update(grads, state, params)
  ended, _ = tx.update(grads, state, params)
  np.testing.assert_array_equal(ended["w"], 0.0)  # the schedule is over
  carried = optimizer.reset_count(state)
  updates, _ = tx.update(grads, carried, params)
  (trace,) = [t for _, t in optax.tree_utils.tree_get_all_with_path(state, "trace")]
  g = grads["w"] + 5e-4 * params["w"]
  np.testing.assert_allclose(updates["w"], -0.1 * (g + 0.9 * trace["w"]), rtol=1e-6)
