"""Smoke tests of experiments/stream_bench.py: one measurement of the stream, and the CPU time
it counts."""

from __future__ import annotations

import os
import time

from experiments import stream_bench
from resnet_jax import prepare


def test_tree_cpu_seconds_counts_this_process_working():
  before = stream_bench.tree_cpu_seconds(os.getpid())
  deadline = time.process_time() + 0.3
  while time.process_time() < deadline:
    pass
  assert stream_bench.tree_cpu_seconds(os.getpid()) - before >= 0.25


def test_a_measurement_reads_batches_of_the_model_size_without_tensorflow(tmp_path):
  data_dir = str(tmp_path)
  prepare.prepare_synthetic_imagenet(data_dir, num_examples=8, num_validation=1, threads=2)
  spec = {"tree": ".", "dataset": "full size", "data_dir": data_dir, "split": "train",
          "workers": 0, "batch_size": 4, "warmup": 1, "batches": 2, "repeat": 0}
  result = stream_bench.measure(spec)
  assert result["images"] == 8
  assert result["images_per_s"] > 0 and result["images_per_cpu_s"] > 0
  assert len(result["load_average_before"]) == 3
  assert result["tensorflow_imported"] is False
