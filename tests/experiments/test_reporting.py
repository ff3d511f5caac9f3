"""experiments.reporting: what a run leaves in its workdir, and how it writes there."""

import json
import os

import jax
import numpy as np
import pytest

from experiments import reporting
from inq_jax import quantize as inq


def test_paths():
  assert reporting.is_remote("gs://bucket/run") and not reporting.is_remote("/tmp/run")
  assert str(reporting.abs_path("gs://bucket/run")) == "gs://bucket/run"
  assert str(reporting.abs_path("run")) == os.path.join(os.getcwd(), "run")


def test_atomic_write_replaces_the_file_whole(tmp_path):
  target = tmp_path / "config.json"
  reporting.atomic_write(target, "first")
  reporting.atomic_write(target, "second")
  assert target.read_text() == "second"
  assert sorted(os.listdir(tmp_path)) == ["config.json"]  # no temporary left behind
  reporting.atomic_write_json(tmp_path / "r.json", {"b": 1, "a": [1.5]})
  assert (tmp_path / "r.json").read_text() == '{\n  "b": 1,\n  "a": [\n    1.5\n  ]\n}\n'


def test_atomic_write_to_a_remote_store_writes_the_object_directly(tmp_path, monkeypatch):
  monkeypatch.setattr(reporting, "is_remote", lambda p: True)
  reporting.atomic_write(tmp_path / "x.json", "{}")
  assert sorted(os.listdir(tmp_path)) == ["x.json"]  # no temporary and no rename


def test_written_and_read_locally(tmp_path, monkeypatch):
  target = str(tmp_path / "model.inq")
  with reporting.written_locally(target) as local:
    assert local == target  # a local target is written in place
  with reporting.read_locally(target) as local:
    assert local == target
  monkeypatch.setattr(reporting, "is_remote", lambda p: True)  # as for gs://
  with reporting.written_locally(target, companions=(".sha256", ".idx")) as local:
    assert local != target and os.path.basename(local) == "model.inq"
    with open(local, "wb") as f:
      f.write(b"payload")
    with open(local + ".sha256", "w") as f:  # a file the writer put beside it
      f.write("digest  model.inq\n")
  assert open(target, "rb").read() == b"payload" and not os.path.exists(local)
  assert open(target + ".sha256").read() == "digest  model.inq\n"
  assert not os.path.exists(target + ".idx")  # a companion the writer did not write
  with reporting.read_locally(target) as local:
    assert local != target and open(local, "rb").read() == b"payload"
  assert not os.path.exists(local)


def test_write_results_and_read_metrics(tmp_path):
  assert reporting.read_metrics(str(tmp_path)) == []
  reporting.write_results(str(tmp_path), {"final": {"bits": 5}})
  assert json.loads((tmp_path / reporting.RESULTS_FILE).read_text()) == {"final": {"bits": 5}}


def test_metric_writer_keeps_every_record_and_writes_tensorboard(tmp_path):
  writer = reporting.MetricWriter(str(tmp_path))
  writer.write(3, stage="baseline", epoch=1, train_loss=0.5, note="text")
  writer.close()
  again = reporting.MetricWriter(str(tmp_path))  # a resumed run appends
  again.write(6, stage="inq", phase=1, test_accuracy=0.9)
  again.close()
  records = reporting.read_metrics(str(tmp_path))
  assert [r["step"] for r in records] == [3, 6]
  assert records[0]["train_loss"] == 0.5 and records[0]["note"] == "text"
  assert records[1] == {"step": 6, "time": records[1]["time"], "stage": "inq", "phase": 1,
                        "test_accuracy": 0.9}
  assert any(f.startswith("events") for f in os.listdir(tmp_path / "tensorboard"))


def test_metric_writer_writes_only_on_process_0(tmp_path, monkeypatch):
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  writer = reporting.MetricWriter(str(tmp_path))
  writer.write(1, loss=1.0)
  writer.close()
  assert not os.listdir(tmp_path)


def test_summary_lines():
  results = {
      "baseline": {"test_accuracy": 0.9012},
      "phases": [{"portion": 0.5, "quantized_test_accuracy": 0.85, "test_accuracy": 0.895,
                  "train_loss": 0.31234, "seconds": 12.34},
                 {"portion": 1.0, "quantized_test_accuracy": 0.89, "test_accuracy": 0.89,
                  "train_loss": 0.3, "seconds": 0.04}],
      "final": {"bits": 5, "test_accuracy": 0.89, "all_pow2": True, "max_distinct_values": 17}}
  assert reporting.summary_lines(results) == [
      "baseline (fp32): test accuracy 90.12%",
      "phase 1: portion 0.5, test accuracy 85.00% quantized -> 89.50% retrained, train loss "
      "0.3123, 12.3s",
      "phase 2: portion 1, test accuracy 89.00% quantized -> 89.00% retrained, train loss "
      "0.3000, 0.0s",
      "final 5-bit: test accuracy 89.00%, all_pow2=True, max_distinct_values=17"]
  unfinished = {"baseline": {"test_accuracy": 0.5}, "phases": []}
  assert reporting.summary_lines(unfinished) == ["baseline (fp32): test accuracy 50.00%"]


def test_plots(tmp_path):
  results = {"config": {"model": "lenet", "dataset": {"name": "fashion_mnist"}},
             "baseline": {"test_accuracy": 0.9},
             "phases": [{"portion": 0.5, "quantized_test_accuracy": 0.8, "test_accuracy": 0.88},
                        {"portion": 1.0, "quantized_test_accuracy": 0.87,
                         "test_accuracy": 0.87}],
             "final": {"bits": 5}}
  assert os.path.getsize(reporting.plot_accuracy(str(tmp_path), results)) > 1000
  before = np.linspace(-1, 1, 101, dtype=np.float32)
  after = np.where(np.abs(before) < 0.2, 0, np.sign(before) * 0.5).astype(np.float32)
  hist = reporting.weight_histogram(before)
  assert hist["counts"].sum() == 101 and hist["size"] == 101
  assert -hist["edges"][0] == hist["edges"][-1] == pytest.approx(1.1)  # max |w| plus 10%
  out = reporting.plot_weights(str(tmp_path), "fc/kernel", hist, after, 0, -3)
  assert os.path.getsize(out) > 1000


def test_progress_bar_is_silent_off_a_terminal():
  bar = reporting.progress_bar(10, "x")
  assert bar.disable
  bar.close()


def test_codebook_entry_is_the_results_json_form():
  fit = {"a/kernel": inq.CodebookFit(bits=3, n1=np.asarray([-2, 0]), zero_share=0.7,
                                     saturated_share=0.0, relative_error=0.25),
         "b/kernel": inq.CodebookFit(5, -1, 0.1, 0.0, 0.125)}
  assert reporting.codebook_entry(fit) == {
      "a/kernel": {"bits": 3, "n1": 0, "zero_fraction": 0.7, "relative_error": 0.25},
      "b/kernel": {"bits": 5, "n1": -1, "zero_fraction": 0.1, "relative_error": 0.125}}


def test_pyplot_draws_without_a_display(tmp_path):
  plt = reporting.pyplot()
  assert plt.get_backend().lower() == "agg"
  fig, _ = plt.subplots()
  fig.savefig(tmp_path / "x.png")
  plt.close(fig)
  assert (tmp_path / "x.png").stat().st_size > 0
