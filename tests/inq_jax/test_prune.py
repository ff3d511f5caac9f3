"""Pruning before INQ: counts, schedule, monotone masks, errors, INQ on a pruned model."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import inq_jax
from inq_jax import prune
from inq_jax import quantize as inq

FINE_PORTIONS = tuple(round(0.05 * i, 2) for i in range(1, 21))  # the paper's 0.05 .. 1.0


def params_(dtype=jnp.float32):
  k = jax.random.split(jax.random.key(1), 3)
  return {"encoder": {"layers": [{"kernel": jax.random.normal(k[0], (16, 32), dtype),
                                  "bias": jnp.full(32, 0.1, dtype)}]},
          "head": {"kernel": (jax.random.normal(k[1], (32, 5)) * 5).astype(dtype),
                   "scale": jnp.ones(5, dtype)}}


def flat(tree):
  return {inq_jax.tree.path_str(p): np.asarray(x)
          for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def reference_keep(w, keep, n_pruned):
  """Sort-based reference: prune earlier-pruned first, then smallest |w|, ties high index."""
  a = np.abs(np.asarray(w, np.float64)).ravel()
  a = np.where(np.asarray(keep).ravel(), a, -1.0)
  idx = np.arange(a.size)
  order = np.lexsort((-idx, a))  # ascending |w|, then descending index
  out = np.ones(a.size, bool)
  out[order[:n_pruned]] = False
  return out.reshape(np.shape(w))


def is_plus_zero(x):
  x = np.asarray(x, np.float32)
  return bool(np.all((x == 0) & ~np.signbit(x)))


# ------------------------------------------------------------------ config


def test_schedules():
  cubic = prune.PruneConfig(sparsity=0.9, steps=4)
  np.testing.assert_allclose([cubic.sparsity_at("k", t) for t in range(1, 5)],
                             [0.9 * (1 - (1 - t / 4) ** 3) for t in range(1, 5)])
  assert cubic.sparsity_at("k", 4) == 0.9  # exactly the target at the last step
  linear = prune.PruneConfig(sparsity=0.8, steps=4, schedule="linear")
  np.testing.assert_allclose([linear.sparsity_at("k", t) for t in range(1, 5)],
                             [0.2, 0.4, 0.6, 0.8])
  assert prune.PruneConfig(sparsity=0.5).ramp(1) == 1.0  # one-shot by default


def test_config_normalized_frozen_keyword_only():
  cfg = prune.PruneConfig(sparsity={"head": 0.5, ".*": 0.25}, steps=2)
  assert cfg.sparsity == (("head", 0.5), (".*", 0.25))
  assert cfg.patterns == ("head", ".*")
  assert cfg.target_sparsity("head/kernel") == 0.5  # first match wins
  assert cfg.target_sparsity("a/head_x") == 0.5
  assert cfg.target_sparsity("encoder/kernel") == 0.25
  assert prune.PruneConfig(sparsity=[["a", 0]]).sparsity == (("a", 0.0),)
  hash(cfg)
  with pytest.raises(dataclasses.FrozenInstanceError):
    cfg.steps = 3
  with pytest.raises(TypeError):
    prune.PruneConfig(0.5)  # pylint: disable=too-many-function-args
  assert inq.PruneConfig is prune.PruneConfig and inq.prune_masks is prune.prune_masks
  assert inq_jax.prune is prune


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(sparsity=1.0), ValueError, r"sparsity must be in \[0, 1\), got 1.0"),
    (dict(sparsity=-0.1), ValueError, "got -0.1"),
    (dict(sparsity=float("nan")), ValueError, "got nan"),
    (dict(sparsity=True), TypeError, "sparsity must be a float"),
    (dict(sparsity="0.5"), TypeError, "sparsity must be a float"),
    (dict(sparsity=None), TypeError, "sparsity must be a float"),
    (dict(sparsity=()), ValueError, "no \\(regex, float\\) pairs"),
    (dict(sparsity=(("(", 0.5),)), ValueError, "sparsity pattern='\\(' is not a valid regex"),
    (dict(sparsity=(("conv", 1.5),)), ValueError, "got 1.5 for pattern 'conv'"),
    (dict(sparsity=(("conv",),)), TypeError, "pairs must be \\(regex, float\\)"),
    (dict(sparsity=("conv",)), TypeError, "pairs must be \\(regex, float\\)"),
    (dict(sparsity=((3, 0.5),)), TypeError, "sparsity pattern must be a regex string"),
    (dict(sparsity=0.5, include="["), ValueError, "include='\\[' is not a valid regex"),
    (dict(sparsity=0.5, exclude="("), ValueError, "exclude='\\(' is not a valid regex"),
    (dict(sparsity=0.5, steps=0), ValueError, "steps must be >= 1, got 0"),
    (dict(sparsity=0.5, steps=1.5), TypeError, "steps must be an int"),
    (dict(sparsity=0.5, steps=True), TypeError, "steps must be an int"),
    (dict(sparsity=0.5, schedule="exp"), ValueError, "unknown pruning schedule 'exp'"),
])
def test_bad_config(kwargs, exc, match):
  with pytest.raises(exc, match=match):
    prune.PruneConfig(**kwargs)


def test_pruned_count_is_an_exact_floor():
  assert prune.pruned_count(100, 0.29) == 29  # float: 0.29 * 100 = 28.999999999999996
  assert prune.pruned_count(7, 0.5) == 3
  assert prune.pruned_count(1, 0.99) == 0
  assert prune.pruned_count(10, 0.0) == 0
  assert [prune.pruned_count(1000, 0.05 * i) for i in range(1, 20)] == \
      [50 * i for i in range(1, 20)]


# ------------------------------------------------------------------ masks


def test_exact_counts_and_magnitude_order_per_layer():
  params = params_()
  cfg = prune.PruneConfig(sparsity=(("head", 0.29), (".*", 0.9)))
  keep = prune.prune_masks(params, cfg, 1)
  f, p = flat(keep), flat(params)
  assert f["encoder/layers/0/bias"].shape == () and bool(f["encoder/layers/0/bias"])
  assert f["head/scale"].shape == () and bool(f["head/scale"])
  for path, s in (("encoder/layers/0/kernel", 0.9), ("head/kernel", 0.29)):
    size = p[path].size
    assert f[path].dtype == bool and f[path].shape == p[path].shape
    assert int((~f[path]).sum()) == int(np.floor(round(s * size, 6)))
    np.testing.assert_array_equal(f[path], reference_keep(p[path], np.ones(size, bool),
                                                          int(np.floor(round(s * size, 6)))))
    assert np.abs(p[path][f[path]]).min() >= np.abs(p[path][~f[path]]).max()
  assert prune.summary(keep)["head/kernel"] == prune.PruneSummary(total=160, pruned=46)
  assert prune.summary(keep)["encoder/layers/0/kernel"].sparsity == 460 / 512


def test_ties_are_deterministic():
  keep = prune.prune_masks({"k": jnp.ones(10)}, prune.PruneConfig(sparsity=0.3, include="k"), 1)
  np.testing.assert_array_equal(keep["k"], np.arange(10) < 7)  # highest indices pruned
  w = jnp.array([0.5, -0.5, 0.5, 2.0, -0.5, 0.1])
  keep = prune.prune_masks({"k": w}, prune.PruneConfig(sparsity=0.5, include="k"), 1)
  np.testing.assert_array_equal(keep["k"], [True, True, False, True, False, False])


@pytest.mark.parametrize("schedule", prune.SCHEDULES)
def test_iterative_masks_are_monotone(schedule):
  params = params_()
  cfg = prune.PruneConfig(sparsity=(("head", 0.5), (".*", 0.95)), steps=5, schedule=schedule)
  keep, prev_counts = None, {}
  rng = np.random.default_rng(0)
  for t in range(1, cfg.steps + 1):
    # "Retraining" moves every weight, including a pruned one back away from zero
    # (as if it had not been frozen): it must stay pruned anyway.
    params = jax.tree.map(lambda x: x * jnp.asarray(rng.uniform(0.5, 1.5, x.shape),
                                                    x.dtype) + 0.01, params)
    new = prune.prune_masks(params, cfg, t, previous=keep)
    f, p = flat(new), flat(params)
    for path in ("encoder/layers/0/kernel", "head/kernel"):
      n = prune.pruned_count(p[path].size, cfg.sparsity_at(path, t))
      assert int((~f[path]).sum()) == n
      old = np.ones(p[path].shape, bool) if keep is None else flat(keep)[path]
      assert not np.any(f[path] & ~old), "a pruned weight came back"
      np.testing.assert_array_equal(f[path], reference_keep(p[path], old, n))
      assert n >= prev_counts.get(path, 0)
      prev_counts[path] = n
    keep = new
  assert prev_counts == {"encoder/layers/0/kernel": int(0.95 * 512), "head/kernel": 80}


def test_kept_zero_ranks_above_a_pruned_weight():
  w = jnp.array([5.0, 0.0, 1.0, 2.0])  # index 0 was pruned but moved (not applied)
  cfg = prune.PruneConfig(sparsity=0.5, include="k")
  keep = prune.prune_masks({"k": w}, cfg, 1, previous={"k": jnp.array([False] + [True] * 3)})
  np.testing.assert_array_equal(keep["k"], [False, False, True, True])


def test_apply_zeroes_exactly_and_frozen_masks():
  params = params_(jnp.bfloat16)
  keep = prune.prune_masks(params, prune.PruneConfig(sparsity=0.7), 1)
  out = prune.apply(params, keep)
  f, o, p = flat(keep), flat(out), flat(params)
  for path in ("encoder/layers/0/kernel", "head/kernel"):
    assert out["head"]["kernel"].dtype == jnp.bfloat16
    assert is_plus_zero(o[path][~f[path]])  # +0.0, also where w was negative
    assert np.asarray(p[path][~f[path]] < 0).any()
    np.testing.assert_array_equal(o[path][f[path]], p[path][f[path]])
  assert out["head"]["scale"] is params["head"]["scale"]  # untouched, same object
  fr = flat(prune.frozen(keep))
  assert fr["head/scale"].shape == () and not fr["head/scale"]
  np.testing.assert_array_equal(fr["head/kernel"], ~f["head/kernel"])


def test_prune_retrain_with_momentum_and_weight_decay_keeps_zeros():
  params = params_()
  x = jax.random.normal(jax.random.key(2), (64, 16))
  y = jax.random.normal(jax.random.key(3), (64, 5))

  def loss_fn(p):
    h = jnp.tanh(x @ p["encoder"]["layers"][0]["kernel"] + p["encoder"]["layers"][0]["bias"])
    return jnp.mean(((h @ p["head"]["kernel"]) * p["head"]["scale"] - y) ** 2)

  cfg = prune.PruneConfig(sparsity=(("head", 0.5), (".*", 0.8)), steps=3)
  base = optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(1e-3, momentum=0.9))
  keep, opt_state = None, None
  for t in range(1, cfg.steps + 1):
    keep = prune.prune_masks(params, cfg, t, previous=keep)
    params = prune.apply(params, keep)
    tx = optax.chain(base, inq_jax.optim.elementwise_freeze(prune.frozen(keep)))
    # Momentum carried over from the previous step's retraining, new masks.
    opt_state = tx.init(params) if opt_state is None else (
        opt_state[0], inq_jax.optim.ElementwiseFreezeState(prune.frozen(keep)))

    @jax.jit
    def train_step(p, s, tx=tx):
      updates, s = tx.update(jax.grad(loss_fn)(p), s, p)
      return optax.apply_updates(p, updates), s

    before = flat(params)
    for _ in range(5):
      params, opt_state = train_step(params, opt_state)
    f, after = flat(keep), flat(params)
    for path in ("encoder/layers/0/kernel", "head/kernel"):
      assert is_plus_zero(after[path][~f[path]]), f"step {t}: a pruned weight of {path} moved"
      assert np.any(after[path][f[path]] != before[path][f[path]])
  assert int((~flat(keep)["head/kernel"]).sum()) == 80


def test_nnx_state():
  class Net(nnx.Module):
    def __init__(self, rngs):
      self.conv = nnx.Conv(1, 8, (3, 3), rngs=rngs)
      self.heads = nnx.List([nnx.Linear(8 * 36, 10, rngs=rngs)])

    def __call__(self, x):
      return self.heads[0](nnx.relu(self.conv(x)).reshape(x.shape[0], -1))

  model = Net(nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  cfg = prune.PruneConfig(sparsity=(("conv", 0.25), ("heads", 0.9)))
  keep = prune.prune_masks(params, cfg, 1)
  assert {k: (v.total, v.pruned) for k, v in prune.summary(keep).items()} == {
      "conv/kernel": (72, 18), "heads/0/kernel": (2880, 2592)}
  params = prune.apply(params, keep)
  nnx.update(model, params)
  assert int(jnp.sum(model.heads[0].kernel[...] == 0)) >= 2592
  state = inq.init(params, inq.INQConfig(portions=(0.5, 1.0)), pruned=keep)
  assert {k: int(v) for k, v in state.pruned.items()} == {"conv/kernel": 18,
                                                          "heads/0/kernel": 2592}
  params, state = inq.advance(params, state)
  assert int(jnp.sum(state.masks["heads"][0]["kernel"][...])) == 2592 + 144


# ------------------------------------------------------------------ bad input


def test_prune_masks_errors_name_path_and_value():
  params = params_()
  with pytest.raises(ValueError, match=r"step must be in \[1, 3\].*got 0"):
    prune.prune_masks(params, prune.PruneConfig(sparsity=0.5, steps=3), 0)
  with pytest.raises(ValueError, match="got 4"):
    prune.prune_masks(params, prune.PruneConfig(sparsity=0.5, steps=3), 4)
  with pytest.raises(TypeError, match="step must be an int"):
    prune.prune_masks(params, prune.PruneConfig(sparsity=0.5), 1.0)
  with pytest.raises(TypeError, match="config must be a PruneConfig"):
    prune.prune_masks(params, inq.INQConfig(), 1)
  with pytest.raises(ValueError, match="encoder/layers/0/kernel: matches none of the "
                     r"sparsity patterns \['head'\]"):
    prune.prune_masks(params, prune.PruneConfig(sparsity=(("head", 0.5),)), 1)
  with pytest.raises(ValueError, match="sparsity pattern 'conv' matches no selected"):
    prune.prune_masks(params, prune.PruneConfig(sparsity=(("conv", 0.5), (".*", 0.1))), 1)
  with pytest.raises(ValueError, match="include='Conv' matches no parameter"):
    prune.prune_masks(params, prune.PruneConfig(sparsity=0.5, include="Conv"), 1)
  with pytest.raises(ValueError, match="exclude='conv' matches no parameter"):
    prune.prune_masks(params, prune.PruneConfig(sparsity=0.5, exclude="conv"), 1)
  with pytest.raises(ValueError, match="leaves no parameter to prune"):
    prune.prune_masks(params, prune.PruneConfig(sparsity=0.5, exclude="kernel"), 1)
  ints = {"emb": {"kernel": jnp.arange(6)}, "d": {"kernel": jnp.ones(3)}}
  with pytest.raises(TypeError, match="emb/kernel: dtype int32 is not floating point"):
    prune.prune_masks(ints, prune.PruneConfig(sparsity=0.5), 1)
  bad = {**params, "head": {**params["head"],
                            "kernel": params["head"]["kernel"].at[3, 1].set(jnp.nan)}}
  with pytest.raises(ValueError, match=r"head/kernel: 1 non-finite .* at index \(3, 1\)"):
    prune.prune_masks(bad, prune.PruneConfig(sparsity=0.5), 1)


def test_previous_mask_errors():
  params = params_()
  cfg = prune.PruneConfig(sparsity=0.9, steps=3)
  last = prune.prune_masks(params, cfg, 3)
  with pytest.raises(ValueError, match=r"encoder/layers/0/kernel: `previous` already prunes "
                     r"460 of 512 weights, more than step 1's floor\(0\.633333 \* 512\) = 324"):
    prune.prune_masks(params, cfg, 1, previous=last)
  with pytest.raises(ValueError, match="previous: the keep mask's tree does not match params"):
    prune.prune_masks(params, cfg, 1, previous={"head": last["head"]})
  wrong = {**last, "head": {**last["head"], "kernel": jnp.ones((5, 32), bool)}}
  with pytest.raises(ValueError, match=r"previous: head/kernel: params have shape \(32, 5\) "
                     r"but the keep mask has shape \(5, 32\)"):
    prune.prune_masks(params, cfg, 3, previous=wrong)
  floats = {**last, "head": {**last["head"], "kernel": jnp.ones((32, 5))}}
  with pytest.raises(TypeError, match="previous: head/kernel: the keep mask must be bool"):
    prune.prune_masks(params, cfg, 3, previous=floats)
  with pytest.raises(ValueError, match="previous: head/kernel has pruned weights but this "
                     "PruneConfig does not select it"):
    prune.prune_masks(params, prune.PruneConfig(sparsity=0.9, exclude="head"), 1,
                      previous=last)
  with pytest.raises(ValueError, match="apply: the keep mask's tree does not match"):
    prune.apply(params, {"head": last["head"]})


# ------------------------------------------------------------------ INQ on a pruned model


def pruned_model(sparsity=(("head", 0.5), (".*", 0.8)), steps=2):
  params = params_()
  cfg = prune.PruneConfig(sparsity=sparsity, steps=steps)
  keep = None
  for t in range(1, steps + 1):
    keep = prune.prune_masks(params, cfg, t, previous=keep)
    params = prune.apply(params, keep)
  return params, keep


@pytest.mark.parametrize("strategy", ["magnitude", "random"])
def test_inq_on_pruned_model_fine_portions_with_retraining(strategy):
  params, keep = pruned_model()
  kf = flat(keep)
  x = jax.random.normal(jax.random.key(2), (64, 16))
  y = jax.random.normal(jax.random.key(3), (64, 5))

  def loss_fn(p):
    h = jnp.tanh(x @ p["encoder"]["layers"][0]["kernel"] + p["encoder"]["layers"][0]["bias"])
    return jnp.mean(((h @ p["head"]["kernel"]) * p["head"]["scale"] - y) ** 2)

  config = inq.INQConfig(bits=4, portions=FINE_PORTIONS, strategy=strategy)
  state = inq.init(params, config, pruned=keep)
  plain = inq.init(params, config)
  assert plain.pruned == {}
  for path in state.exponents:  # pruned zeros do not change n1
    np.testing.assert_array_equal(state.exponents[path], plain.exponents[path])
  kernels = ("encoder/layers/0/kernel", "head/kernel")
  pruned = {path: int((~kf[path]).sum()) for path in kernels}
  assert pruned == {"encoder/layers/0/kernel": 409, "head/kernel": 80}
  assert {p: int(v) for p, v in state.pruned.items()} == pruned
  for path in kernels:
    np.testing.assert_array_equal(flat(state.masks)[path], ~kf[path])  # frozen from step 0

  tx = optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(1e-3, momentum=0.9),
                   inq_jax.optim.elementwise_freeze(state.masks))

  @jax.jit
  def train_step(p, s):  # the masks live in the optimizer state: one compile
    updates, s = tx.update(jax.grad(loss_fn)(p), s, p)
    return optax.apply_updates(p, updates), s

  opt_state = tx.init(params)  # momentum carried across phases, masks replaced
  for n, sigma in enumerate(FINE_PORTIONS):
    old_masks, old = flat(state.masks), flat(params)
    params, state = inq.advance(params, state)
    masks, new = flat(state.masks), flat(params)
    for path in kernels:
      m, size, p = masks[path], masks[path].size, pruned[path]
      assert int(m.sum()) == p + inq.frozen_count(size - p, sigma) == \
          inq.frozen_count(size, sigma, pruned=p) == state.frozen_target(path, size, n + 1)
      assert m[old_masks[path]].all()
      assert m[~kf[path]].all() and is_plus_zero(new[path][~kf[path]])
      added, still = m & ~old_masks[path], ~m
      if strategy == "magnitude" and added.any() and still.any():
        # The largest |w| among the unpruned float weights are frozen first.
        assert np.abs(old[path][added]).min() >= np.abs(old[path][still]).max()
    if sigma < 1.0:
      opt_state = (*opt_state[:-1], inq_jax.optim.ElementwiseFreezeState(state.masks))
      before = flat(params)
      for _ in range(2):
        params, opt_state = train_step(params, opt_state)
      after = flat(params)
      for path in kernels:
        m = masks[path]
        assert before[path][m].tobytes() == after[path][m].tobytes()
        assert is_plus_zero(after[path][~kf[path]])
        assert np.any(before[path][~m] != after[path][~m])
  summary = inq.verify(params, state)
  for path in kernels:
    s = summary[path]
    assert s.frozen == s.total and s.zeros >= pruned[path]
    assert s.distinct_values <= inq.max_distinct_values(4)
    assert is_plus_zero(flat(params)[path][~kf[path]])
  assert state.done


def test_pruned_counts_cannot_be_read_off_the_masks():
  # Why INQState stores `pruned`: after a step, leaves with different pruned counts
  # can have the same number of frozen weights but need different next counts.
  assert inq.frozen_count(4, 0.5, pruned=1) == inq.frozen_count(4, 0.5, pruned=2) == 3
  assert inq.frozen_count(4, 0.75, pruned=1) == 3
  assert inq.frozen_count(4, 0.75, pruned=2) == 4
  assert inq.frozen_count(100, 0.3) == inq.frozen_count(100, 0.3, pruned=0) == 30


def test_state_with_pruned_counts_round_trips_and_rebuilt_without_fails():
  params, keep = pruned_model()
  state = inq.init(params, inq.INQConfig(portions=(0.5, 0.75, 1.0)), pruned=keep)
  params, state = inq.advance(params, state)
  leaves, treedef = jax.tree.flatten(state)
  again = jax.tree.unflatten(treedef, leaves)
  assert {p: int(v) for p, v in again.pruned.items()} == {"encoder/layers/0/kernel": 409,
                                                          "head/kernel": 80}
  assert int(jax.jit(lambda s: sum(s.pruned.values()))(state)) == 489
  # What a checkpoint must hold: every field; a state that lost its pruned counts
  # is refused by its seal, which binds them.
  inq.advance(params, jax.tree.unflatten(treedef, leaves))
  forgot = dataclasses.replace(state, pruned={})
  with pytest.raises(ValueError, match=r"exponents \(n1\) or pruned counts are not the ones "
                     r"init computed"):
    inq.advance(params, forgot)


def test_init_pruned_errors():
  params, keep = pruned_model()
  config = inq.INQConfig()
  unapplied = params_()
  with pytest.raises(ValueError, match=r"pruned: encoder/layers/0/kernel: 409 pruned weights "
                     r"\(keep mask False\) are not zero, first .* at index \(\d+, \d+\); zero "
                     r"them with inq_jax.prune.apply"):
    inq.init(unapplied, config, pruned=keep)
  inverted = jax.tree.map(jnp.logical_not, keep)  # the frozen-mask convention
  with pytest.raises(ValueError, match="encoder/layers/0/bias has 32 pruned weights.*"
                     "not its inverse"):
    inq.init(params, config, pruned=inverted)
  kernels_inverted = jax.tree.map(lambda m: ~m if m.ndim else m, keep)
  with pytest.raises(ValueError, match="are not zero.*not its inverse"):
    inq.init(params, config, pruned=kernels_inverted)
  with pytest.raises(ValueError, match="pruned: the keep mask's tree does not match params"):
    inq.init(params, config, pruned={"head": keep["head"]})
  wrong = {**keep, "head": {**keep["head"], "kernel": jnp.ones((5, 32), bool)}}
  with pytest.raises(ValueError, match=r"pruned: head/kernel: params have shape \(32, 5\)"):
    inq.init(params, config, pruned=wrong)
  ints = {**keep, "head": {**keep["head"], "kernel": keep["head"]["kernel"].astype(int)}}
  with pytest.raises(TypeError, match="pruned: head/kernel: the keep mask must be bool"):
    inq.init(params, config, pruned=ints)
  with pytest.raises(ValueError, match="pruned: head/kernel has 80 pruned weights but INQ "
                     "does not quantize it"):
    inq.init(params, inq.INQConfig(exclude="head"), pruned=keep)
  # Pruning a leaf INQ skips entirely (e.g. a bias) is refused the same way.
  both = prune.PruneConfig(sparsity=0.5, include="(kernel|bias)$")
  keep_b = prune.prune_masks(params, both, 1)
  with pytest.raises(ValueError, match="encoder/layers/0/bias has 16 pruned weights"):
    inq.init(prune.apply(params, keep_b), config, pruned=keep_b)


def test_unpruned_keep_mask_matches_no_pruning():
  params = params_()
  everything = jax.tree.map(lambda _: jnp.ones((), bool), params)
  a = inq.init(params, inq.INQConfig(), pruned=everything)
  b = inq.init(params, inq.INQConfig())
  assert {p: int(v) for p, v in a.pruned.items()} == {"encoder/layers/0/kernel": 0,
                                                      "head/kernel": 0}
  pa = pb = params
  for _ in range(4):
    pa, a = inq.advance(pa, a)
    pb, b = inq.advance(pb, b)
    for x, y in zip(jax.tree.leaves((pa, a.masks)), jax.tree.leaves((pb, b.masks))):
      np.testing.assert_array_equal(x, y)
