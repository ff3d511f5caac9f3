"""How well codebooks fit: `codebook_fit`, and the warnings of `init` and `advance`."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from inq_jax import quantize as inq


def heavy_tailed(seed=0):
  # A bulk of small weights under one large one: at 3 bits the paper's codebook
  # (anchored at max |w|) rounds nearly all of them to zero.
  rng = np.random.default_rng(seed)
  w = rng.normal(0, 0.08, (64, 32)).astype(np.float32)
  w[0, 0] = 1.0
  return {"tail": {"kernel": jnp.asarray(w)},
          "bulk": {"kernel": jnp.asarray(rng.normal(0, 0.1, (32, 16)), jnp.float32)}}


def reference_fit(w, n1, bits):
  """zero share, saturated share, relative error of rounding w, in float64 numpy."""
  w = np.asarray(w, np.float64)
  n2 = n1 + 1 - 2 ** (bits - 2)
  a = np.abs(w)
  k = np.clip(np.floor(np.log2(np.where(a > 0, a, 1) / 0.75)), n2, n1)
  q = np.where(a >= 2.0 ** (n2 - 1), np.sign(w) * 2.0 ** k, 0.0)
  return (np.mean(q == 0), np.mean(a >= 1.5 * 2.0 ** n1),
          np.linalg.norm(q - w) / np.linalg.norm(w))


@pytest.mark.parametrize("calibration", ["absmax", "mse"])
def test_codebook_fit_matches_a_float64_reference(calibration):
  params = heavy_tailed()
  config = inq.INQConfig(bits=3, calibration=calibration, layer_bits={"^bulk/": 5})
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", inq.CodebookFitWarning)
    state = inq.init(params, config)
  fit = inq.codebook_fit(params, state)
  assert set(fit) == {"tail/kernel", "bulk/kernel"}
  for path, bits in (("tail/kernel", 3), ("bulk/kernel", 5)):
    name = path.split("/")[0]
    f = fit[path]
    assert f.bits == bits and f.n1 == int(state.exponents[path])
    zero, sat, err = reference_fit(params[name]["kernel"], f.n1, bits)
    assert f.zero_share == pytest.approx(zero, abs=1e-12)
    assert f.saturated_share == pytest.approx(sat, abs=1e-12)
    assert f.relative_error == pytest.approx(err, rel=1e-5)
    # init recorded the same shares for the pretrained weights.
    np.testing.assert_allclose(np.asarray(state.fit[path]), [zero, sat], rtol=1e-6)


def test_init_warns_naming_each_mostly_zero_layer_and_the_fix():
  params = heavy_tailed()
  with pytest.warns(inq.CodebookFitWarning) as record:
    inq.init(params, inq.INQConfig(bits=3))
  (w,) = record
  text = str(w.message)
  assert "tail/kernel 100% (3-bit)" in text and "bulk/kernel" not in text
  assert "calibration='mse'" in text and "codebook_fit" in text
  assert w.filename == __file__  # points at the caller's line
  # With the mse codebook nothing is mostly zero: no warning.
  with warnings.catch_warnings():
    warnings.simplefilter("error", inq.CodebookFitWarning)
    inq.init(params, inq.INQConfig(bits=3, calibration="mse"))
    inq.init(params, inq.INQConfig(bits=5))


@pytest.mark.parametrize("scale, what", [(1000.0, "saturate"), (1e-4, "round to zero")])
def test_advance_warns_when_the_weights_scale_moved_since_init(scale, what):
  params = {"fc": {"kernel": jnp.asarray(np.random.default_rng(1).normal(0, 0.1, (64, 32)),
                                         jnp.float32)}}
  state = inq.init(params, inq.INQConfig(bits=5))
  rescaled = jax.tree.map(lambda w: w * scale, params)
  with pytest.warns(inq.CodebookFitWarning, match=rf"fc/kernel: \d+% of the weights {what} in "
                    r"its 5-bit codebook .*\(at init: \d+%\): the weights' scale has moved"):
    inq.advance(rescaled, state)
  with warnings.catch_warnings():  # the weights init saw: no warning
    warnings.simplefilter("error", inq.CodebookFitWarning)
    inq.advance(params, state)


def test_advance_does_not_repeat_inits_warning_for_a_layer_that_was_mostly_zero():
  params = heavy_tailed()
  with pytest.warns(inq.CodebookFitWarning):
    state = inq.init(params, inq.INQConfig(bits=3))
  with warnings.catch_warnings():
    warnings.simplefilter("error", inq.CodebookFitWarning)
    inq.advance(params, state)


def test_stale_params_warn_only_when_nothing_was_retrained():
  params = heavy_tailed()
  config = inq.INQConfig(bits=5)
  state = inq.init(params, config)
  p1, s1 = inq.advance(params, state)
  with pytest.warns(inq.StaleParamsWarning, match=r"bit-identical to what the previous advance "
                    r"returned \(step 1 of 4\).*nnx.state\(model, nnx.Param\)"):
    inq.advance(p1, s1)
  # One retrained float weight anywhere is enough.
  w = np.asarray(p1["bulk"]["kernel"]).copy()
  m = np.asarray(s1.masks["bulk"]["kernel"])
  w[np.argwhere(~m)[0][0], np.argwhere(~m)[0][1]] += 1e-3
  with warnings.catch_warnings():
    warnings.simplefilter("error", inq.StaleParamsWarning)
    inq.advance({**p1, "bulk": {"kernel": jnp.asarray(w)}}, s1)
    inq.advance(params, state)  # the first step has nothing before it to compare with
