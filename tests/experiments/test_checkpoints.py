"""The workdir guard, checkpoint fallback and init_checkpoint loading (experiments.checkpoints)."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from experiments import checkpoints
from experiments.configs import smoke


def test_claim_workdir_refuses_another_config(tmp_path):
  config = smoke.get_config()
  checkpoints.claim_workdir(str(tmp_path), config)
  checkpoints.claim_workdir(str(tmp_path), config)  # the same config: fine
  config.unlock()
  config.inq.calibration = "mse"
  with pytest.raises(ValueError, match=r"inq.calibration: 'absmax' -> 'mse'"):
    checkpoints.claim_workdir(str(tmp_path), config)


def test_config_diff_names_every_changed_key():
  old = {"a": 1, "b": {"c": [1, 2], "d": "x"}, "experiment": {"inq": {}}}
  new = {"a": 2, "b": {"c": [1, 3], "e": 0}, "experiment": {"inq": {"calibration": "absmax"}}}
  assert checkpoints.config_diff(old, new) == [
      "a: 1 -> 2", "b.c: [1, 2] -> [1, 3]", "b.d: 'x' -> '<absent>'", "b.e: '<absent>' -> 0",
      "experiment.inq.calibration: '<absent>' -> 'absmax'"]


def _state(value):
  return {"w": jnp.full((3,), value, jnp.float32), "n": jnp.int32(value)}


def test_a_damaged_newest_checkpoint_falls_back_to_the_intact_one(tmp_path, caplog):
  ckpt = checkpoints.RunCheckpoints(str(tmp_path), max_to_keep=2)
  ckpt.save(_state(1), {"results": {"at": 1}, "seconds": 1.0})
  ckpt.save(_state(2), {"results": {"at": 2}, "seconds": 2.0})
  ckpt.close()
  damaged = [f for f in (tmp_path / "checkpoints" / "2" / "meta").iterdir()
             if f.name == "metadata"]
  assert damaged
  damaged[0].write_text("{not json")
  ckpt = checkpoints.RunCheckpoints(str(tmp_path), max_to_keep=2)
  state, meta = ckpt.restore(_state(0))
  assert meta["results"] == {"at": 1} and int(state["n"]) == 1
  np.testing.assert_array_equal(state["w"], np.ones(3, np.float32))
  assert "checkpoints/2" in caplog.text and "unreadable" in caplog.text
  # The damaged one is gone, so the next saves cannot push the intact one out.
  ckpt.save(_state(3), {"results": {"at": 3}, "seconds": 3.0})
  ckpt.close()
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["1", "2"]
  _, meta = checkpoints.RunCheckpoints(str(tmp_path)).restore(_state(0))
  assert meta["results"] == {"at": 3}


def test_a_workdir_of_another_trainer_version_is_refused(tmp_path):
  ckpt = checkpoints.RunCheckpoints(str(tmp_path))
  ckpt.save(_state(1), {"results": {}, "seconds": 0.0})
  ckpt.close()
  meta = tmp_path / "checkpoints" / "1" / "meta" / "metadata"
  data = json.loads(meta.read_text())
  del data["format"]
  meta.write_text(json.dumps(data))
  with pytest.raises(ValueError, match="another version of this trainer"):
    checkpoints.RunCheckpoints(str(tmp_path)).restore(_state(0))


def test_init_checkpoint_without_batch_stats_fits_a_bn_free_model(tmp_path):
  params = {"fc": {"kernel": jnp.ones((2, 3)), "bias": jnp.zeros(3)}}
  checkpoints.save_variables(str(tmp_path / "v"), {"params": params})
  got = checkpoints.load_variables(str(tmp_path / "v"), {"params": params, "batch_stats": {}})
  assert got["batch_stats"] == {}
  np.testing.assert_array_equal(got["params"]["fc"]["kernel"], np.ones((2, 3)))
  with pytest.raises(ValueError, match="no batch_stats but the model has BatchNorm"):
    checkpoints.load_variables(str(tmp_path / "v"), {"params": params,
                                                     "batch_stats": {"bn": jnp.ones(3)}})
  with pytest.raises(FileNotFoundError, match="does not exist"):
    checkpoints.load_variables(str(tmp_path / "missing"), {"params": params})
