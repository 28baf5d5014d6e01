"""The training system end to end on tiny runs of the real Fashion-MNIST data."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from resnet_jax import checkpoints, config as config_lib, data, parallel, prepare, reporting
from resnet_jax import sources, train
from resnet_jax import trainer as trainer_lib


# The suite's network, wherever the architecture is not what a test checks: the smallest CIFAR
# ResNet at a quarter of the filters (4, 8, 16), whose programs compile and step in about half
# the time of a quarter-width ResNet-20's.
TINY_MODEL = {"model.name": "resnet8", "model.width": 0.25}


def tiny_model() -> dict:
  """TINY_MODEL as a sweep's nested fields: {"name": ..., "width": ...}."""
  return {field.partition(".")[2]: value for field, value in TINY_MODEL.items()}


def tiny_config(data_dir: str, **overrides):
  """TINY_MODEL for a handful of steps at batch 16 on 2 CPU devices, evaluated on 64 images."""
  config = config_lib.default_config()
  overrides = {**TINY_MODEL, **overrides}
  config.dataset.data_dir = data_dir
  config.dataset.eval_split = "test[:64]"
  config.batch_size = 16
  config.eval_batch_size = 32
  config.num_steps = 4
  config.log_every = 2
  config.eval_every = 0
  config.checkpoint_every = 2
  config.optimizer.schedule = "constant"
  config.progress_bar = False
  for key, value in overrides.items():
    node = config
    *path, leaf = key.split(".")
    for part in path:
      node = node[part]
    node[leaf] = value
  return config


def final_params(workdir: str):
  step, state = checkpoints.read_state(os.path.join(workdir, "checkpoints"))
  return step, state["params"]


def test_run_writes_config_metrics_summary_and_checkpoints(prepared_data_dir, tmp_path):
  workdir = str(tmp_path / "run")
  summary = train.train_and_evaluate(tiny_config(prepared_data_dir), workdir)

  assert summary.status == "completed"
  assert summary.step == 4
  assert 0.0 <= summary.test_error <= 1.0
  assert summary.best_test_error == summary.test_error
  # ResNet-8 at widths 4, 8, 16, option A, 1 input channel, 10 classes: stem 3*3*1*4 + BN 2*4,
  # one block a stage of two 3x3 convs + 2 BNs (304, 896, 3520), head 16*10 + 10.
  assert summary.num_params == 44 + 304 + 896 + 3520 + 170
  assert json.load(open(os.path.join(workdir, "summary.json"))) == summary.to_dict()
  assert json.load(open(os.path.join(workdir, "config.json")))["model"]["name"] == "resnet8"
  events = reporting.read_metrics(workdir)
  assert [(e["event"], e["step"]) for e in events] == [("train", 2), ("train", 4), ("eval", 4)]
  assert events[0]["lr"] == pytest.approx(0.1)
  assert np.isfinite(events[1]["loss"]) and events[1]["img_per_s"] > 0
  assert "compile_s" in events[0]
  assert os.listdir(os.path.join(workdir, "tensorboard"))
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]


def test_diverging_run_stops_with_status_diverged(prepared_data_dir, tmp_path):
  config = tiny_config(prepared_data_dir, num_steps=20, log_every=2, checkpoint_every=0)
  config.optimizer.lr = 1e30
  workdir = str(tmp_path / "run")
  summary = train.train_and_evaluate(config, workdir)

  assert summary.status == "diverged"
  assert summary.step < 20
  assert "NaN/Inf" in summary.message
  assert json.load(open(os.path.join(workdir, "summary.json")))["status"] == "diverged"


def test_checkpoint_of_another_config_is_refused_and_nothing_is_overwritten(
    prepared_data_dir, tmp_path):
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(tiny_config(prepared_data_dir, num_steps=2), workdir)
  before = {name: open(os.path.join(workdir, name)).read()
            for name in ("summary.json", "config.json", "metrics.jsonl")}

  with pytest.raises(checkpoints.CheckpointMismatchError, match=r"model\.skip: checkpoint True"):
    train.train_and_evaluate(tiny_config(prepared_data_dir, num_steps=4, **{"model.skip": False}),
                             workdir)
  after = {name: open(os.path.join(workdir, name)).read() for name in before}
  assert after == before


def test_checkpoint_written_before_a_config_field_existed_counts_it_as_its_default():
  current = config_lib.default_config()
  stored = current.to_dict()
  del stored["optimizer"]["warmup_epochs"]  # A field added to resnet_jax after the checkpoint.

  assert checkpoints.config_mismatches(stored, current) == []
  current.optimizer.warmup_epochs = 2.0
  assert checkpoints.config_mismatches(stored, current) == [
      "optimizer.warmup_epochs: checkpoint 0.0, config 2.0"]


def test_bad_config_is_rejected_before_the_workdir_is_created(prepared_data_dir, tmp_path):
  config = tiny_config(prepared_data_dir, batch_size=13)  # Not divisible by 2 devices.
  config.model.name = "resnet21"
  workdir = tmp_path / "run"
  with pytest.raises(ValueError) as error:
    train.train_and_evaluate(config, str(workdir))
  assert "6n+2: 8, 20, 32, 44, 56, 110, 1202" in str(error.value)
  assert "config.batch_size (13) must be divisible by the number of devices (2)" in str(error.value)
  assert not workdir.exists()


# Fashion-MNIST's shapes with round normalisation constants, for steps on synthetic batches.
SYNTHETIC_INFO = data.DatasetInfo("fashion_mnist", num_classes=10, image_shape=(28, 28, 1),
                                  num_train=60_000, num_eval=64, mean=(0.5,), std=(0.25,))


def synthetic_trainer(config, mesh, batches: list[dict]) -> trainer_lib.Trainer:
  """The trainer of `config` fed `batches` (host arrays), in order, sharded over `mesh`."""
  sharded = NamedSharding(mesh, PartitionSpec("data"))
  on_devices = [jax.device_put(batch, sharded) for batch in batches]
  source = sources.DeviceBatches(iter(on_devices), sources.spec_of(on_devices[0]))
  return trainer_lib.build(config, SYNTHETIC_INFO, mesh, source)


def _run_steps(devices, config, batches):
  """Trains from the same initial state on `devices`; returns [(params, batch_stats)] per step."""
  trainer = synthetic_trainer(config, Mesh(np.array(devices), ("data",)), batches)
  state, totals = trainer.init_state(), trainer.zero_totals()
  history = []
  for _ in batches:
    state, totals, _ = trainer.train(state, totals)
    history.append(jax.device_get((state.params, state.batch_stats)))
  return history


@pytest.mark.slow
@pytest.mark.numerics
@pytest.mark.devices(8)
def test_same_global_batch_gives_same_parameters_on_1_and_8_devices():
  config = config_lib.default_config()
  config.num_steps = 10
  # A gentle rate: at 0.1 the second step amplifies a ReLU flip (below) to 15% of an update.
  config.optimizer.lr = 0.001
  rng = np.random.default_rng(0)
  batches = [{"image": rng.integers(0, 256, (16, 28, 28, 1), dtype=np.uint8),
              "label": rng.integers(0, 10, (16,), dtype=np.int32)} for _ in range(2)]
  (params_1, stats_1), (params_2, stats_2) = _run_steps(jax.devices()[:1], config, batches)
  _, (params_8, stats_8) = _run_steps(jax.devices()[:8], config, batches)
  max_diff = lambda a, b: max(float(np.max(np.abs(x - y)))
                              for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  # Global-batch BN and the all-reduced gradient make the two runs the same up to summation order.
  # But that order decides the sign of the odd ReLU input within ~1e-6 of 0, and the exact
  # gradient jumps there (1e-6 of input noise moves it by 2e-3 even in float64), so any CPU may
  # differ by more than rounding. The yardstick is therefore the last SGD step: input noise of
  # 1e-6 to 1e-5 moved the params by at most 2.5% of it and the running BN statistics (smooth in
  # the params) by 3e-5 of theirs; BN over each device's 2 examples moved them 210% and 7%.
  assert max_diff(params_2, params_8) < 0.1 * max_diff(params_1, params_2)
  assert max_diff(stats_2, stats_8) < 0.005 * max_diff(stats_1, stats_2)


@pytest.mark.slow
def test_streamed_imagenet_run_resumes_its_grain_iterator_exactly(tmp_path):
  # A synthetic imagenet2012 in the canonical TFDS format (resnet_jax.prepare), read as the real
  # one is: the stream reads its JPEG bytes undecoded, which TFDS's mock_data cannot serve
  # without TensorFlow.
  data_dir = str(tmp_path / "tfds")
  prepare.prepare_synthetic_imagenet(data_dir, num_examples=24, num_validation=24, threads=2)

  def config(num_steps):
    c = tiny_config(data_dir, num_steps=num_steps, **{"dataset.name": "imagenet2012",
                                                      "dataset.eval_split": "validation",
                                                      "dataset.image_size": 32,
                                                      "dataset.worker_count": 0,
                                                      "model.name": "resnet18",
                                                      # A quarter of the filters: the
                                                      # iterator's resumption is the point,
                                                      # not the size.
                                                      "model.width": 0.25})
    c.eval_batch_size = 16
    return c

  straight, interrupted = str(tmp_path / "straight"), str(tmp_path / "interrupted")
  summary = train.train_and_evaluate(config(4), straight)
  train.train_and_evaluate(config(2), interrupted)
  resumed = train.train_and_evaluate(config(4), interrupted)

  assert summary.status == resumed.status == "completed"
  # ResNet-18 at a quarter width and 1000 classes (at full width, 11,689,512 as torchvision:
  # tests/test_models.py).
  assert summary.num_params == 831_096
  assert os.path.isdir(os.path.join(interrupted, "checkpoints", "2", "data"))
  (_, params_a), (_, params_b) = final_params(straight), final_params(interrupted)
  jax.tree.map(np.testing.assert_array_equal, params_a, params_b)


def test_step_without_diagnostics_computes_none_of_their_norms():
  batch = {"image": np.zeros((8, 28, 28, 1), np.uint8), "label": np.zeros((8,), np.int32)}
  trainer = synthetic_trainer(config_lib.default_config(), parallel.make_mesh(), [batch])
  state, totals = trainer.init_state(), trainer.zero_totals()
  inputs = trainer.source.train_spec

  def sqrt_count(with_diagnostics):
    program = trainer.diagnostics_program if with_diagnostics else trainer.train_program
    return str(program.trace(state, totals, inputs).jaxpr).count(" sqrt ")

  # BN uses rsqrt and SGD no square roots: every sqrt is a diagnostics norm (9 blocks' activation
  # RMS, 11 gradient norms), and the plain step has none.
  assert sqrt_count(False) == 0
  assert sqrt_count(True) == 9 + 11


def test_train_step_is_the_same_program_with_instruments_on_or_off():
  batch = {"image": np.zeros((8, 28, 28, 1), np.uint8), "label": np.zeros((8,), np.int32)}

  def train_program(**instruments):
    config = config_lib.default_config()
    config.update(instruments)
    trainer = synthetic_trainer(config, parallel.make_mesh(), [batch])
    jaxpr = trainer.train_program.trace(
        trainer.abstract_state, trainer.zero_totals(), trainer.source.train_spec).jaxpr
    return str(jaxpr), sorted(trainer.instrument_programs)

  plain, no_instruments = train_program()
  with_instruments, instruments = train_program(sharpness_every=1, noise_scale_every=1)
  assert no_instruments == [] and instruments == ["noise_scale", "sharpness"]
  assert with_instruments == plain


@pytest.mark.slow
def test_bfloat16_run_trains_and_writes_the_requested_profile(prepared_data_dir, tmp_path):
  workdir = tmp_path / "run"
  config = tiny_config(prepared_data_dir, num_steps=4, profile_steps=2,
                       **{"model.dtype": "bfloat16"})
  summary = train.train_and_evaluate(config, str(workdir))

  assert summary.status == "completed"
  losses = [e["loss"] for e in reporting.read_metrics(str(workdir)) if e["event"] == "train"]
  assert len(losses) == 2 and all(np.isfinite(losses))
  traces = list((workdir / "profile").rglob("*.xplane.pb"))
  assert len(traces) == 1 and traces[0].stat().st_size > 0
  # Parameters stay float32 whatever the computation dtype.
  _, params = final_params(str(workdir))
  assert {p.dtype for p in jax.tree.leaves(params)} == {np.dtype(np.float32)}
