"""Config comparison when a workdir is reused (checkpoints.claim_workdir)."""

import json

import pytest

from experiments import checkpoints
from experiments.configs import smoke


def test_config_recorded_before_a_key_existed_still_matches(tmp_path):
  config = smoke.get_config()
  checkpoints.claim_workdir(str(tmp_path), config)
  path = tmp_path / checkpoints.CONFIG_FILE
  old = json.loads(path.read_text())
  del old["inq"]["calibration"]  # as written before calibration and pruning existed
  del old["prune"]
  path.write_text(json.dumps(old))
  checkpoints.claim_workdir(str(tmp_path), config)  # absmax is what old runs did
  config.unlock()
  config.inq.calibration = "mse"
  with pytest.raises(ValueError, match=r"inq.calibration: '<absent>' -> 'mse'"):
    checkpoints.claim_workdir(str(tmp_path), config)
  config.inq.calibration = "absmax"
  config.prune.sparsity = (("fc1", 0.5),)
  with pytest.raises(ValueError, match=r"prune: '<absent>' -> "):
    checkpoints.claim_workdir(str(tmp_path), config)


def test_config_diff_names_every_changed_key():
  old = {"a": 1, "b": {"c": [1, 2], "d": "x"}, "experiment": {"inq": {}}}
  new = {"a": 2, "b": {"c": [1, 3], "e": 0}, "experiment": {"inq": {"calibration": "absmax"}}}
  assert checkpoints.config_diff(old, new) == [
      "a: 1 -> 2", "b.c: [1, 2] -> [1, 3]", "b.d: 'x' -> '<absent>'", "b.e: '<absent>' -> 0"]
