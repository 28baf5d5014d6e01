"""The config files, their arguments and validation (the command line's handling of bad input:
tests/test_faults.py)."""

from __future__ import annotations

import importlib.util
import os
import re

import pytest

from resnet_jax import config as config_lib
from resnet_jax import optim

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(path: str, arg: str | dict | None = None):
  spec = importlib.util.spec_from_file_location("config_file", os.path.join(REPO, path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


@pytest.mark.parametrize("path", ["configs/fashion_mnist.py", "configs/fashion_mnist_gpu.py",
                                  "configs/cifar10.py", "configs/cifar100.py",
                                  "configs/imagenet.py"])
def test_every_config_file_validates_and_says_its_command(path):
  config = load_config(path)
  config_lib.validate(config, num_devices=8)
  with open(os.path.join(REPO, path)) as f:
    assert "python -m resnet_jax.main --config=" + path in f.read()


def test_cifar10_config_is_the_papers_recipe():
  config = load_config("configs/cifar10.py", "depth=56,skip=false")
  assert (config.model.name, config.model.skip, config.model.shortcut) == ("resnet56", False, "A")
  assert (config.batch_size, config.num_steps) == (128, 64_000)
  opt = config.optimizer
  assert (opt.lr, opt.momentum, opt.weight_decay, opt.schedule) == (0.1, 0.9, 1e-4, "step")
  assert tuple(opt.boundaries) == (32_000, 48_000) and opt.warmup_steps == 0
  assert (config.dataset.crop_padding, config.dataset.flip) == (4, True)


def test_cifar10_resnet110_warms_up_at_a_tenth_of_the_rate_for_400_steps():
  opt = load_config("configs/cifar10.py", "depth=110").optimizer
  assert (opt.warmup, opt.warmup_steps, opt.warmup_factor) == ("constant", 400, 0.1)


def test_imagenet_config_scales_batch_and_epochs_with_the_devices():
  config = load_config("configs/imagenet.py", "devices=4,schedule=step,depth=101")
  assert config.batch_size == 1024 and config.optimizer.base_batch_size == 256
  assert config.model.name == "resnet101" and config.model.bn_variance == "one_pass"
  assert (config.num_epochs, config.optimizer.warmup_epochs) == (90, 5)
  assert tuple(config.optimizer.boundaries) == (30, 60, 80)
  assert config.optimizer.boundaries_unit == "epochs"


def test_imagenet_epochs_resolve_to_full_batches_of_the_train_split():
  config = load_config("configs/imagenet.py", "devices=4")
  resolved = config_lib.resolve_epochs(config, 1_281_167)
  steps_per_epoch = 1_281_167 // 1024
  assert steps_per_epoch == 1251
  assert resolved.num_steps == 90 * steps_per_epoch == 112_590
  assert resolved.optimizer.warmup_steps == 5 * steps_per_epoch
  assert resolved.eval_every == resolved.checkpoint_every == steps_per_epoch
  config_lib.validate(resolved, num_devices=4, train_size=1_281_167)


def test_resolving_epochs_again_changes_nothing_and_leaves_the_original_alone():
  config = load_config("configs/imagenet.py")
  resolved = config_lib.resolve_epochs(config, 1_281_167)
  assert config_lib.resolve_epochs(resolved, 1_281_167) == resolved
  assert resolved.num_epochs == 90.0
  assert config.num_steps == config_lib.default_config().num_steps == 2000


def test_epoch_fields_that_are_zero_leave_the_steps_fields_as_set():
  config = load_config("configs/cifar10.py")
  assert config_lib.resolve_epochs(config, 50_000) == config


def test_gpu_fashion_mnist_config_runs_15_epochs_at_the_scaled_rate_in_bfloat16():
  config = load_config("configs/fashion_mnist_gpu.py", "depth=56")
  assert (config.model.name, config.model.dtype, config.batch_size) == ("resnet56", "bfloat16", 256)
  assert config.num_epochs == 15
  assert config_lib.resolve_epochs(config, 60_000).num_steps == 15 * (60_000 // 256) == 3510
  assert optim.peak_learning_rate(config.optimizer, config.batch_size) == pytest.approx(0.2)


def test_an_epoch_field_that_resolves_to_no_step_is_rejected_naming_it():
  config = load_config("configs/imagenet.py", "devices=4")
  config.eval_every_epochs = 0.0001
  config_lib.validate(config, num_devices=4)  # Not known until the train split's size is.
  with pytest.raises(config_lib.ConfigError, match=re.escape(
      "config.eval_every_epochs=0.0001 gives 0 steps at 1251 steps per epoch (1,281,167 "
      "examples // batch 1024); it must give at least 1, or be 0 to use config.eval_every")):
    config_lib.validate(config, num_devices=4, train_size=1_281_167)


def test_warmup_epochs_past_the_run_are_rejected_once_the_train_size_is_known():
  config = load_config("configs/imagenet.py")
  config.optimizer.warmup_epochs = 90
  config_lib.validate(config, num_devices=8)
  with pytest.raises(config_lib.ConfigError, match=re.escape(
      "config.optimizer.warmup_steps (56250) must be less than config.num_steps (56250)")):
    config_lib.validate(config, num_devices=8, train_size=1_281_167)


def test_negative_or_infinite_epochs_are_rejected():
  config = config_lib.default_config()
  config.num_epochs = -1
  config.optimizer.warmup_epochs = float("inf")
  with pytest.raises(config_lib.ConfigError) as error:
    config_lib.validate(config, train_size=60_000)
  message = str(error.value)
  assert "config.num_epochs must be finite and >= 0; got -1.0" in message
  assert "config.optimizer.warmup_epochs must be finite and >= 0; got inf" in message


@pytest.mark.parametrize("path, text, typed", [
    ("configs/cifar10.py", "depth=110,skip=false,width=0.5",
     {"depth": 110, "skip": False, "width": 0.5}),
    ("configs/imagenet.py", "devices=4,schedule=step,depth=101,dtype=bfloat16",
     {"devices": 4, "schedule": "step", "depth": 101, "dtype": "bfloat16"}),
])
def test_a_typed_mapping_gives_the_config_its_command_line_string_gives(path, text, typed):
  assert load_config(path, typed) == load_config(path, text)


def test_unknown_config_argument_lists_the_allowed_ones():
  with pytest.raises(ValueError, match="unknown config argument 'deep'; allowed: depth, skip"):
    load_config("configs/cifar10.py", "deep=56")


def test_validation_reports_every_problem_at_once():
  config = config_lib.default_config()
  config.model.name = "resnet50x"
  config.optimizer.schedule = "linear"
  config.optimizer.momentum = 1.5
  with pytest.raises(ValueError) as error:
    config_lib.validate(config)
  message = str(error.value)
  assert "config.model.name must be one of resnet8, resnet20, resnet32" in message
  assert "config.optimizer.schedule must be one of constant, step, cosine; got 'linear'" in message
  assert "config.optimizer.momentum must be in [0, 1); got 1.5" in message


def test_narrow_width_argument_sets_a_fractional_multiplier_and_fractional_filters_are_rejected():
  assert load_config("configs/fashion_mnist.py", "width=0.5").model.width == 0.5
  config = load_config("configs/imagenet.py", "width=0.1")
  with pytest.raises(ValueError, match=r"width must be > 0 .*got 0.1, which gives 6.4, 12.8"):
    config_lib.validate(config)


def test_boundaries_past_the_end_of_the_run_are_rejected():
  config = load_config("configs/cifar10.py")
  config.num_steps = 40_000
  with pytest.raises(ValueError, match=r"boundaries \[32000, 48000\] \(steps\) must lie inside"):
    config_lib.validate(config)


def test_infinite_or_nan_hyperparameters_are_rejected():
  config = config_lib.default_config()
  config.optimizer.lr = float("inf")
  config.optimizer.weight_decay = float("nan")
  config.optimizer.momentum = float("nan")
  with pytest.raises(config_lib.ConfigError) as error:
    config_lib.validate(config)
  message = str(error.value)
  assert "config.optimizer.lr must be finite and > 0; got inf" in message
  assert "config.optimizer.weight_decay must be finite and >= 0; got nan" in message
  assert "config.optimizer.momentum must be in [0, 1); got nan" in message


def test_zero_init_residual_on_a_plain_twin_is_rejected_by_the_model_check():
  config = config_lib.default_config()
  config.model.update(skip=False, zero_init_residual=True)
  with pytest.raises(config_lib.ConfigError, match=re.escape(
      "config.model.zero_init_residual=True needs skip=True: a plain net has no residual branch")):
    config_lib.validate(config)


def test_batch_larger_than_the_train_split_is_rejected_once_its_size_is_known():
  config = config_lib.default_config()
  config.batch_size = 1024
  config_lib.validate(config, train_size=1024)
  with pytest.raises(config_lib.ConfigError, match=r"batch_size \(1024\) must be at most the "
                     r"1,000 examples of config.dataset.train_split 'train'"):
    config_lib.validate(config, train_size=1000)
