"""Smoke tests of experiments/bench.py (it measures, with the knobs given, and its PyTorch twin is
the same network), of experiments/profile_step.py's reading of a trace, and of
experiments/step_speed.py's synthetic CIFAR-10 and goals table."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from experiments import bench, profile_step, step_speed
from resnet_jax import config as config_lib
from resnet_jax import data


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


def test_model_args_are_typed_by_the_config_fields_they_set():
  assert bench.parse_model_args("zero_init_residual=true,bn_momentum=0.99,width=2") == {
      "zero_init_residual": True, "bn_momentum": 0.99, "width": 2.0}
  with pytest.raises(config_lib.ConfigError, match="unknown config argument 'no_such_field'"):
    bench.parse_model_args("no_such_field=1")


@pytest.mark.slow
def test_worker_measures_with_the_knobs_given_and_records_each(tmp_path):
  # The first test's network and batch: zero_init_residual changes the initial parameters, not
  # the train program, which conftest's cache then holds.
  cache_dir = os.environ["JAX_COMPILATION_CACHE_DIR"]
  out = tmp_path / "bench.jsonl"

  code = bench.main(["--batch_size=8", "--image_size=16", "--channels=1", "--steps=2",
                     "--warmup=1", "--repeats=1", "--steps_per_call=1", "--torch=false",
                     "--model_args=zero_init_residual=true",
                     f"--compilation_cache_dir={cache_dir}", f"--json_out={out}"])

  assert code == 0
  [row] = [json.loads(line) for line in out.read_text().splitlines()]
  assert (row["steps_per_call"], row["model_args"]) == (1, {"zero_init_residual": True})
  assert row["compilation_cache_dir"] == cache_dir
  assert row["cache_hits"] + row["cache_misses"] == 1  # The train program, compiled once.
  assert row["xla_flags"] == os.environ["XLA_FLAGS"]
  assert row["framework_version"] == jax.__version__ and row["images_per_s"] > 0


def test_jax_workers_get_flags_after_the_callers_and_a_cache_that_keeps_every_program(
    monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_a=1")

  assert bench.jax_environment("--xla_b=2", "/cache") == {
      "XLA_FLAGS": "--xla_a=1 --xla_b=2", "JAX_COMPILATION_CACHE_DIR": "/cache",
      "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
  assert bench.jax_environment() == {}


def test_every_xla_flag_set_of_step_speed_parses_in_this_jaxlib():
  # XLA stops a process at start-up on an unknown flag or value; GPU flags parse on a CPU too.
  flags = " ".join(step_speed.XLA_FLAG_SETS.values())
  compute = "import jax; jax.numpy.zeros(1).block_until_ready()"
  proc = subprocess.run([sys.executable, "-c", compute], env={**os.environ, "XLA_FLAGS": flags},
                        capture_output=True, text=True, check=False)

  assert proc.returncode == 0, proc.stderr[-500:]


def test_synthetic_cifar10_reads_as_cifar10_with_its_shapes_classes_and_split_sizes(tmp_path):
  data_dir = str(tmp_path / "tfds")
  step_speed.synthetic_cifar10(data_dir, num_train=60, num_test=20)
  config = config_lib.default_config()
  config.dataset.name, config.dataset.data_dir = "cifar10", data_dir

  info = data.dataset_info(config.dataset)
  images, labels = data.load_split(config.dataset, "train")

  assert (info.image_shape, info.num_classes, info.num_train, info.num_eval) == (
      (32, 32, 3), 10, 60, 20)
  assert images.shape == (60, 32, 32, 3) and images.dtype == np.uint8
  assert labels.min() >= 0 and labels.max() < 10
  # Each image one colour: every pixel equals the first.
  assert (images == images[:, :1, :1, :]).all()


def _trace(*lanes):
  """A Chrome-format trace: process and thread names, then each lane's (name, ts, dur) ops."""
  events = [{"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/host:CPU"}},
            {"ph": "M", "pid": 2, "name": "process_name", "args": {"name": "/device:GPU:0"}}]
  for tid, (pid, thread, ops) in enumerate(lanes):
    events.append({"ph": "M", "pid": pid, "tid": tid, "name": "thread_name",
                   "args": {"name": thread}})
    events += [{"ph": "X", "pid": pid, "tid": tid, "name": name, "ts": ts, "dur": dur,
                "args": {"hlo_op": name}} for name, ts, dur in ops]
  return {"traceEvents": events}


def test_trace_summary_times_the_gpu_stream_lanes_and_their_union():
  trace = _trace(
      (2, "Stream #7(Compute,Memset)", [("conv.1", 0, 400), ("fusion.2", 500, 100)]),
      (2, "Stream #9(MemcpyD2D)", [("copy.3", 350, 100)]),  # Overlaps conv.1 by 50 us.
      (2, "XLA Ops", [("conv.1", 0, 400)]),  # A TPU's line; were it derived, the same ops again.
      (1, "python", [("host_op", 0, 5000)]))

  summary = profile_step.trace_summary(trace, steps=2, wall_s=0.002)

  assert summary["lanes"] == ["/device:GPU:0 / Stream #7(Compute,Memset)",
                              "/device:GPU:0 / Stream #9(MemcpyD2D)"]
  # Per step (ms): span 0..600 us, busy 550 us (0-450, 500-600), ops 600 us, wall 1 ms.
  assert summary["span_ms_per_step"] == pytest.approx(0.3)
  assert summary["busy_ms_per_step"] == pytest.approx(0.275)
  assert summary["idle_ms_per_step"] == pytest.approx(0.025)
  assert summary["op_sum_ms_per_step"] == pytest.approx(0.3)
  assert summary["wall_ms_per_step"] == pytest.approx(1.0)
  assert summary["ops_per_step"] == 1.5
  assert [op["name"] for op in summary["top_ops"]] == ["conv.1", "fusion.2", "copy.3"]
  assert [op["name"] for op in summary["top_kinds"]] == ["conv", "fusion", "copy"]


def test_profile_of_cpu_steps_finds_their_ops_inside_the_wall_time(tmp_path):
  spec = bench.BenchSpec(model="resnet20", batch_size=8, image_shape=(16, 16, 1), steps=2,
                         warmup=1, repeats=1)

  result = profile_step.profile(spec, str(tmp_path))

  assert result["steps_per_call"] == 1 and result["lanes"]  # The CPU's hlo_op threads.
  assert 0 < result["busy_ms_per_step"] <= result["span_ms_per_step"]
  assert result["span_ms_per_step"] <= result["wall_ms_per_step"]
  assert result["ops_per_step"] > 100  # Forward, backward and update of 21 layers.
  assert result["top_ops"][0]["ms_per_step"] > 0


def test_goals_table_puts_the_measured_figures_beside_the_goals():
  common = {"status": "ok", "framework": "jax", "framework_version": "0.11.2",
            "device": "1x NVIDIA H100 80GB HBM3", "ms_per_step": 1.0}
  rows = [
      {**common, "group": "goals", "case": "resnet20_b128", "variant": "defaults",
       "images_per_s": 101_234.5, "compile_s": 9.5},
      {**common, "group": "xla_flags", "case": "resnet20_b128", "variant": "xla_flags=a",
       "images_per_s": 120_000.0, "compile_s": 9.0},
      {**common, "group": "warm", "case": "resnet20_b128", "variant": "defaults, warm cache",
       "images_per_s": 99_000.0, "compile_s": 0.4},
      {**common, "group": "torch", "case": "resnet20_b128", "variant": "eager",
       "framework": "torch", "images_per_s": 14_200.0, "compile_s": 1.0},
      {"group": "goals", "case": "resnet50_b256", "variant": "defaults", "status": "skipped",
       "reason": "out of time"},
      {**common, "group": "recipe", "case": "cifar10_recipe", "variant": "configs/cifar10.py",
       "total_s": 150.2, "cut_off": True, "run_status": "preempted", "steps_done": 40_000,
       "num_steps": 64_000, "compile_s": 12.0, "train_s": 120.0,
       "train_images_per_s": 42_666.0, "evals": 20}]

  lines = step_speed.goals_table(rows).splitlines()

  assert lines[2] == ("| ResNet-20, batch 128, img/s | 42-52k | >= 100,000 | 101,234 | "
                      "120,000 (xla_flags=a) | 14,200 / - |")
  assert lines[4].startswith("| ResNet-50, 224², batch 256, img/s | 5.2-5.7k | >= 7,000 | - |")
  assert "cut off (preempted) after 150 s at 40,000 of 64,000 steps" in lines[5]
  assert "9.5 / - cold, 0.4 / - warm" in lines[6]
