"""experiments.tools.codebook_report against a numpy reading of the paper's Eq. 4."""

import numpy as np
import pytest

from experiments.tools import codebook_report


def np_round(w, n1, bits):
  """Eq. 4 with saturation: |w| < 2^(n2-1) -> 0, else the nearest 2^k (ties up)."""
  n2 = n1 + 1 - 2 ** (bits - 2)
  a = np.abs(w)
  k = np.clip(np.floor(np.log2(np.maximum(a, 1e-30) * 4 / 3)), n2, n1)
  return np.where(a >= 2.0 ** (n2 - 1), np.sign(w) * 2.0 ** k, 0.0)


def test_rows_match_numpy():
  rng = np.random.default_rng(0)
  w = (rng.standard_normal((300, 8)) * 0.03).astype(np.float32)
  w[0, 0] = 0.3  # a 10-std outlier sets the absmax n1
  params = {"dense": {"kernel": w, "bias": np.zeros(8, np.float32)}}
  table = codebook_report.rows(params, [3, 2])
  assert [(r["path"], r["bits"], r["calibration"]) for r in table] == [
      ("dense/kernel", b, c) for b in (3, 2) for c in ("absmax", "mse")]
  for r in table:
    n1_absmax = int(np.floor(np.log2(4 * 0.3 / 3)))
    if r["calibration"] == "absmax":
      assert r["n1"] == n1_absmax
    else:  # the best of every n1 at or below absmax's, by brute force
      errs = {n: np.sum((np_round(w, n, r["bits"]) - w) ** 2) for n in range(n1_absmax - 8, n1_absmax + 1)}
      assert r["n1"] == min(errs, key=lambda n: (errs[n], -n))
    q = np_round(w.astype(np.float64), r["n1"], r["bits"])
    assert np.isclose(r["zero_fraction"], np.mean(q == 0))
    assert np.isclose(r["relative_error"], np.linalg.norm(q - w) / np.linalg.norm(w), rtol=1e-5)
  by = {(r["bits"], r["calibration"]): r for r in table}
  assert by[(3, "mse")]["relative_error"] < by[(3, "absmax")]["relative_error"]
  assert "| dense/kernel |" in codebook_report.markdown(table)


def test_tail_is_max_abs_over_std_whatever_the_sign():
  rng = np.random.default_rng(1)
  w = (rng.standard_normal((200, 4)) * 0.02).astype(np.float32)
  w[3, 1] = -0.4  # the heavy tail is negative
  (row,) = codebook_report.rows({"fc": {"kernel": w}}, [4], calibrations=("absmax",))
  assert row["tail"] == pytest.approx(0.4 / w.std(), rel=1e-5)
  assert row["n1"] == int(np.floor(np.log2(4 * 0.4 / 3)))  # n1 from max |w| too
