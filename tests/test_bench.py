"""Smoke tests of experiments/bench.py: it measures, and its PyTorch twin is the same network."""

from __future__ import annotations

import math

import pytest

from experiments import bench


def test_jax_measurement_reports_finite_throughput_and_compile_time():
  spec = bench.BenchSpec(model="resnet20", batch_size=8, image_shape=(16, 16, 1), steps=2,
                         warmup=1, repeats=1)

  row = bench.measure_jax(spec)

  assert (row["framework"], row["model"], row["batch_size"]) == ("jax", "resnet20", 8)
  assert math.isfinite(row["images_per_s"]) and row["images_per_s"] > 0
  assert math.isfinite(row["compile_s"]) and row["compile_s"] > 0
  assert row["num_params"] == 269_434  # Option A, 1 input channel, 10 classes.


def test_torch_cifar_resnet20_has_the_flax_models_parameter_count():
  pytest.importorskip("torch")

  net = bench.torch_cifar_resnet(20, num_classes=10, in_channels=3)

  assert sum(p.numel() for p in net.parameters()) == 269_722
