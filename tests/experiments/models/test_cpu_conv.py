"""experiments.models.cpu_conv and LeNet's pooling: the CPU fast paths compute what they replace,
and only where the model's options (a config's `model_kwargs`) turn them on.

References are independent: convolutions as float64 numpy sums over the
kernel taps, and nn.Conv / nn.max_pool (XLA's own convolution and
reduce-window) for the LeNet as a whole.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from experiments import models
from experiments.configs import fashion_mnist_lenet, fashion_mnist_resnet20, smoke
from experiments.models import cpu_conv, lenet


def numpy_conv(x, w):
  """Stride-1 VALID NHWC x HWIO convolution in float64, tap by tap."""
  x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
  kh, kw, _, f = w.shape
  b, h, wd, _ = x.shape
  out = np.zeros((b, h - kh + 1, wd - kw + 1, f))
  for i in range(kh):
    for j in range(kw):
      out += x[:, i:i + h - kh + 1, j:j + wd - kw + 1, :] @ w[i, j]
  return out


def rand(rng, *shape):
  return jnp.asarray(rng.standard_normal(shape), jnp.float32)


# (x shape, kernel shape): LeNet's two convs, a non-square kernel on a
# non-square image, a 1x1 kernel, a kernel as large as the image.
SHAPES = [((3, 28, 28, 1), (5, 5, 1, 20)), ((2, 12, 12, 20), (5, 5, 20, 50)),
          ((2, 9, 7, 3), (3, 2, 3, 4)), ((1, 4, 5, 2), (1, 1, 2, 3)),
          ((2, 4, 5, 2), (4, 5, 2, 3))]


@pytest.mark.parametrize("x_shape,w_shape", SHAPES)
def test_matches_float64_convolution(x_shape, w_shape):
  rng = np.random.default_rng(0)
  x, w = rand(rng, *x_shape), rand(rng, *w_shape)
  got = np.asarray(jax.jit(cpu_conv.conv_valid_matmul)(x, w), np.float64)
  want = numpy_conv(x, w)
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("x_shape,w_shape", SHAPES[1:3])
def test_gradients_match_xla_convolution(x_shape, w_shape):
  """Reverse mode (both arguments) and forward mode, against lax's convolution."""
  rng = np.random.default_rng(1)
  x, w = rand(rng, *x_shape), rand(rng, *w_shape)
  (b, h, wd, _), (kh, kw, _, f) = x_shape, w_shape
  cot = rand(rng, b, h - kh + 1, wd - kw + 1, f)
  ref = lambda x, w: lax.conv_general_dilated(x, w, (1, 1), "VALID",
                                              dimension_numbers=("NHWC", "HWIO", "NHWC"))
  loss = lambda conv: (lambda x, w: jnp.sum(conv(x, w) * cot))
  got = jax.jit(jax.grad(loss(cpu_conv.conv_valid_matmul), (0, 1)))(x, w)
  want = jax.grad(loss(ref), (0, 1))(x, w)
  for g, r in zip(got, want):
    np.testing.assert_allclose(g, r, rtol=0, atol=1e-5 * np.abs(r).max())
  tx, tw = rand(rng, *x_shape), rand(rng, *w_shape)
  _, got_t = jax.jvp(cpu_conv.conv_valid_matmul, (x, w), (tx, tw))
  _, want_t = jax.jvp(ref, (x, w), (tx, tw))
  np.testing.assert_allclose(got_t, want_t, rtol=0, atol=1e-5 * np.abs(want_t).max())


def test_param_only_gradient_has_no_input_convolution():
  """With the image held fixed (as in training), the backward pass is matrix products.

  The input's tangent is a symbolic zero: no XLA convolution is traced.
  """
  rng = np.random.default_rng(2)
  x, w = rand(rng, 2, 12, 12, 20), rand(rng, 5, 5, 20, 50)
  jaxpr = str(jax.make_jaxpr(jax.grad(lambda w: jnp.sum(cpu_conv.conv_valid_matmul(x, w))))(w))
  assert "conv_general_dilated" not in jaxpr and "dot_general" in jaxpr


def conv_args(**overrides):
  args = dict(window_strides=(1, 1), padding="VALID", lhs_dilation=(1, 1), rhs_dilation=(1, 1),
              dimension_numbers=lax.ConvDimensionNumbers((0, 3, 1, 2), (3, 2, 0, 1),
                                                         (0, 3, 1, 2)),
              feature_group_count=1)
  args.update(overrides)
  return args


@pytest.mark.parametrize("overrides", [
    {}, {"lhs_dilation": None, "rhs_dilation": None}, {"padding": ((0, 0), (0, 0))}])
def test_plain_valid_conv_takes_the_matmul_path(overrides):
  x, w = jnp.ones((2, 8, 8, 3)), jnp.ones((3, 3, 3, 4))
  jaxpr = str(jax.make_jaxpr(lambda x, w: cpu_conv.conv_general_dilated(
      x, w, **conv_args(**overrides)))(x, w))
  assert "conv_general_dilated" not in jaxpr and "dot_general" in jaxpr


@pytest.mark.parametrize("overrides", [
    {"window_strides": (2, 2)}, {"padding": "SAME"}, {"padding": ((1, 1), (1, 1))},
    {"lhs_dilation": (2, 2), "padding": ((0, 0), (0, 0))}, {"rhs_dilation": (2, 1)},
    {"feature_group_count": 3, "x_channels": 3, "w_in": 1},
    {"dimension_numbers": ("NCHW", "OIHW", "NCHW")},
    {"precision": lax.Precision.HIGHEST}, {"preferred_element_type": jnp.float32}])
def test_anything_else_is_lax_conv(overrides):
  """Each case gives lax.conv_general_dilated's own result (and its primitive)."""
  overrides = dict(overrides)
  c, w_in = overrides.pop("x_channels", 3), overrides.pop("w_in", 3)
  rng = np.random.default_rng(3)
  x, w = rand(rng, 2, 8, 8, c), rand(rng, 3, 3, w_in, 6)
  if "dimension_numbers" in overrides:  # NCHW / OIHW
    x, w = jnp.transpose(x, (0, 3, 1, 2)), jnp.transpose(w, (3, 2, 0, 1))
  args = conv_args(**overrides)
  jaxpr = str(jax.make_jaxpr(lambda x, w: cpu_conv.conv_general_dilated(x, w, **args))(x, w))
  assert "conv_general_dilated" in jaxpr
  np.testing.assert_array_equal(cpu_conv.conv_general_dilated(x, w, **args),
                                lax.conv_general_dilated(x, w, **args))


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_other_backends_get_lax_conv(monkeypatch, backend):
  monkeypatch.setattr(jax, "default_backend", lambda: backend)
  x, w = jnp.ones((2, 8, 8, 3)), jnp.ones((3, 3, 3, 4))
  jaxpr = str(jax.make_jaxpr(lambda x, w: cpu_conv.conv_general_dilated(x, w, **conv_args()))(
      x, w))
  assert "conv_general_dilated" in jaxpr


def test_the_host_does_not_choose(monkeypatch):
  """Same program on a host that gives the process one core: the config decides, not the host."""
  x, w = jnp.ones((2, 8, 8, 3)), jnp.ones((3, 3, 3, 4))
  trace = lambda: str(jax.make_jaxpr(lambda x, w: cpu_conv.conv_general_dilated(
      x, w, **conv_args()))(x, w))
  many = trace()
  monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0}, raising=False)
  monkeypatch.setattr("os.cpu_count", lambda: 1)
  assert trace() == many


def _lenet_jaxpr(**options):
  model = models.get_model("lenet", 10, **options)
  params = models.init_variables(model, (1, 28, 28, 1), jax.random.key(0))["params"]
  grad = jax.grad(lambda p, x: jnp.sum(model.apply({"params": p}, x)))
  return str(jax.make_jaxpr(grad)(params, jnp.zeros((2, 28, 28, 1))))


def test_lenet_speedups_are_options_off_by_default(monkeypatch):
  plain = _lenet_jaxpr()
  assert "conv_general_dilated" in plain and "select_and_scatter_add" in plain
  conv = _lenet_jaxpr(cpu_matmul_conv=True)
  assert "dot_general" in conv and "select_and_scatter_add" in conv
  pool = _lenet_jaxpr(cpu_select_pool=True)
  assert "select_and_scatter_add" not in pool and "conv_general_dilated" in pool
  both = _lenet_jaxpr(cpu_matmul_conv=True, cpu_select_pool=True)
  assert "select_and_scatter_add" not in both
  # Off the CPU backend the options change nothing: XLA's conv and nn.max_pool.
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert _lenet_jaxpr(cpu_matmul_conv=True, cpu_select_pool=True) == plain


def test_the_configs_say_where_the_speedups_are_on():
  on = {"cpu_matmul_conv": True, "cpu_select_pool": True}
  assert dict(fashion_mnist_lenet.get_config().model_kwargs) == on
  assert dict(smoke.get_config().model_kwargs) == on  # derived from the default job
  assert not dict(fashion_mnist_resnet20.get_config().model_kwargs)
  with pytest.raises(ValueError, match="model 'resnet20' has no option cpu_matmul_conv"):
    models.get_model("resnet20", 10, **on)


# ------------------------------------------------------------ LeNet's pooling


def test_max_pool_values_and_gradient_match_nn_max_pool():
  rng = np.random.default_rng(4)
  x = rand(rng, 3, 8, 6, 5)  # continuous values: no ties
  ref = lambda x: nn.max_pool(x, (2, 2), (2, 2))
  np.testing.assert_array_equal(lenet.select_max_pool_2x2(x), ref(x))
  cot = rand(rng, 3, 4, 3, 5)
  got = jax.grad(lambda x: jnp.sum(lenet.select_max_pool_2x2(x) * cot))(x)
  want = jax.grad(lambda x: jnp.sum(ref(x) * cot))(x)
  np.testing.assert_array_equal(got, want)


def test_max_pool_ties_send_the_gradient_to_the_first_tap():
  """Row-major first tap among equal maxima; every other tap gets zero."""
  window = np.array([[1.0, 3.0], [3.0, 3.0]], np.float32)  # three-way tie at 3
  x = jnp.asarray(window[None, :, :, None])
  grad = np.asarray(jax.grad(lambda x: jnp.sum(lenet.select_max_pool_2x2(x)))(x))[0, :, :, 0]
  np.testing.assert_array_equal(grad, [[0, 1], [0, 0]])
  x = jnp.full((1, 2, 2, 1), 2.0)  # four-way tie
  grad = np.asarray(jax.grad(lambda x: jnp.sum(lenet.select_max_pool_2x2(x)))(x))[0, :, :, 0]
  np.testing.assert_array_equal(grad, [[1, 0], [0, 0]])


# --------------------------------------------------------------- LeNet itself


class ReferenceLeNet(nn.Module):
  """The LeNet with XLA's convolution and nn.max_pool (relu before pooling)."""

  @nn.compact
  def __call__(self, x, train=False):
    del train
    for name, features in (("conv1", 20), ("conv2", 50)):
      x = nn.Conv(features, (5, 5), padding="VALID", name=name)(x)
      x = nn.max_pool(nn.relu(x), (2, 2), (2, 2))
    x = nn.relu(nn.Dense(500, name="fc1")(x.reshape(x.shape[0], -1)))
    return nn.Dense(10, name="fc2")(x)


def decision_margin(params, x):
  """Smallest gap, in float64, at which a pool, relu or fc1 relu could flip.

  Each gap (best minus second-best tap of a pooling window; a pre-relu value's
  distance from 0) is taken relative to its layer's largest |value|. Float32
  sums in another order move values by about 1e-6 of that, so above 1e-5 no
  CPU's summation order changes a decision, and the two gradients compare
  to rounding.
  """
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)

  def pool(a):
    b, h, w, c = a.shape
    taps = np.sort(a.reshape(b, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 5, 2, 4)
                   .reshape(b, h // 2, w // 2, c, 4), -1)
    return taps[..., -1], taps[..., -1] - taps[..., -2]

  gaps, a = [], np.asarray(x, np.float64)
  for name in ("conv1", "conv2"):
    a = numpy_conv(a, p[name]["kernel"]) + p[name]["bias"]
    top, gap = pool(a)
    gaps += [gap.min() / np.abs(a).max(), np.abs(top).min() / np.abs(a).max()]
    a = np.maximum(top, 0)
  h = a.reshape(len(a), -1) @ p["fc1"]["kernel"] + p["fc1"]["bias"]
  return min(gaps + [np.abs(h).min() / np.abs(h).max()])


def test_lenet_matches_the_xla_convolution_lenet():
  """Same params (tree, shapes, init values), same logits and gradients to float32 rounding."""
  fast = {"cpu_matmul_conv": True, "cpu_select_pool": True}
  jaxpr = str(jax.make_jaxpr(models.get_model("lenet", 10, **fast).init)(
      jax.random.key(0), jnp.zeros((1, 28, 28, 1))))
  assert "conv_general_dilated" not in jaxpr  # the matmul path is what is compared
  model, ref = models.get_model("lenet", 10, **fast), ReferenceLeNet()
  params = models.init_variables(model, (1, 28, 28, 1), jax.random.key(0))["params"]
  ref_params = models.init_variables(ref, (1, 28, 28, 1), jax.random.key(0))["params"]
  assert jax.tree.structure(params) == jax.tree.structure(ref_params)
  jax.tree.map(np.testing.assert_array_equal, params, ref_params)
  # Seed 20 of 40 tried at batch 4 has the widest margin (5.3e-5): with random
  # images at batch 16 some pooling window has its two best taps within
  # float32 rounding of each other, and which one wins depends on the CPU.
  rng = np.random.default_rng(20)
  x = rand(rng, 4, 28, 28, 1)
  labels = jnp.asarray(rng.integers(0, 10, 4))
  assert decision_margin(params, x) > 1e-5

  def loss(apply):
    return lambda p: -jnp.mean(jnp.take_along_axis(
        jax.nn.log_softmax(apply({"params": p}, x)), labels[:, None], 1))
  got_logits, want_logits = model.apply({"params": params}, x), ref.apply({"params": params}, x)
  np.testing.assert_allclose(got_logits, want_logits, rtol=0,
                             atol=1e-5 * np.abs(want_logits).max())
  got = jax.jit(jax.grad(loss(model.apply)))(params)
  want = jax.jit(jax.grad(loss(ref.apply)))(params)
  jax.tree_util.tree_map_with_path(
      lambda path, g, r: np.testing.assert_allclose(
          g, r, rtol=0, atol=1e-5 * np.abs(r).max(), err_msg=jax.tree_util.keystr(path)),
      got, want)
