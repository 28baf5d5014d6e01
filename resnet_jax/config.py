"""The run configuration: its defaults, its command-line arguments, and its validation.

Every run is described by one `ml_collections.ConfigDict`. `default_config()` lists every field
with its default; the files in `configs/` start from it and change a few fields. `validate()` checks
the whole config once, before any work starts, and raises one `ConfigError` that says what was
wrong and what is allowed. Code past that point trusts the config.
"""

from __future__ import annotations

import math

import ml_collections

DATASETS = ("fashion_mnist", "mnist", "cifar10", "cifar100", "imagenet2012")
CIFAR_DEPTHS = (20, 32, 44, 56, 110, 1202)
IMAGENET_DEPTHS = (18, 34, 50, 101, 152, 200)
SCHEDULES = ("constant", "step", "cosine")
WARMUPS = ("linear", "constant")
WEIGHT_DECAY_MODES = ("coupled", "decoupled")
OPTIMIZERS = ("sgd", "lars")
DTYPES = ("float32", "bfloat16")
SHORTCUTS = ("A", "B")
VARIANTS = ("v1", "v1.5", "v2")
# Filters of each stage's branch convolutions at width 1 (the stem has the first stage's).
STAGE_FILTERS = {"cifar": (16, 32, 64), "imagenet": (64, 128, 256, 512)}
# The arguments every config file's get_config accepts: `configs/cifar10.py:depth=56,skip=false`.
MODEL_ARGS = ("depth", "skip", "shortcut", "variant", "dtype", "width")
# The step counter (TrainState.step, the data order, Optax's schedules) is int32.
MAX_STEPS = 2**31 - 1


class ConfigError(ValueError):
  """A config that cannot run, found before any work; the message says what is allowed."""


def default_config() -> ml_collections.ConfigDict:
  """The defaults every config starts from: a CIFAR ResNet-20 on Fashion-MNIST, CPU-sized."""
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.dataset = ml_collections.ConfigDict()
  c.dataset.name = "fashion_mnist"
  c.dataset.data_dir = ""  # "" = TFDS's default ($TFDS_DATA_DIR or ~/tensorflow_datasets).
  c.dataset.train_split = "train"
  c.dataset.eval_split = "test"
  c.dataset.crop_padding = 2  # Pixels of zero padding before the random crop; 0 = no crop.
  c.dataset.flip = True  # Random horizontal flip.
  c.dataset.image_size = 224  # Streaming (ImageNet) crops only.
  c.dataset.worker_count = 4  # Streaming only: Grain worker processes per host.

  c.model = ml_collections.ConfigDict()
  c.model.name = "resnet20"
  c.model.skip = True  # False = the plain twin: no shortcut additions, no projections.
  c.model.shortcut = "A"  # CIFAR family: "A" (zero-pad) or "B" (1x1 projection).
  c.model.variant = "v1.5"  # ImageNet family: "v1", "v1.5" or "v2" (pre-activation).
  c.model.zero_init_residual = False
  c.model.bn_momentum = 0.9
  c.model.bn_epsilon = 1e-5
  c.model.bn_fast_variance = False  # True: one-pass BN variance (faster; see models.ResNet).
  c.model.dtype = "float32"  # Computation dtype; parameters stay float32.
  c.model.width = 1.0  # Multiplier on every stage's filters: 0.5 -> CIFAR stages of 8/16/32.

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = "sgd"
  c.optimizer.lr = 0.1  # Peak learning rate at base_batch_size (see below).
  c.optimizer.base_batch_size = 0  # >0: linear scaling rule, lr * batch_size / base_batch_size.
  c.optimizer.momentum = 0.9
  c.optimizer.nesterov = False
  c.optimizer.weight_decay = 1e-4
  c.optimizer.weight_decay_mode = "coupled"  # "coupled" (L2 in the gradient) or "decoupled".
  c.optimizer.decay_bn_and_bias = False  # True also decays BN scales/offsets and biases.
  c.optimizer.grad_clip_norm = 0.0  # >0: clip gradients to this global norm.
  c.optimizer.schedule = "cosine"  # "constant", "step" or "cosine".
  c.optimizer.boundaries = ()  # Step schedule: where the lr is multiplied by decay_factor.
  c.optimizer.boundaries_unit = "steps"  # "steps" or "epochs".
  c.optimizer.decay_factor = 0.1
  c.optimizer.warmup_steps = 0
  c.optimizer.warmup = "linear"  # "linear" (from 0 to the peak) or "constant" (a warm start).
  c.optimizer.warmup_factor = 0.1  # Constant warmup: lr * warmup_factor during warmup_steps.
  c.optimizer.lars_trust_coefficient = 0.001

  c.batch_size = 128  # Global, over all devices and hosts.
  c.eval_batch_size = 1000
  c.num_steps = 2000
  c.log_every = 100
  c.eval_every = 1000  # 0 = only at the end.
  c.checkpoint_every = 1000  # 0 = only at the end.
  c.keep_checkpoints = 3
  c.profile_steps = 0  # >0: write a jax.profiler trace of this many steps after warm-up.
  c.diagnostics_every = 0  # >0: record per-block gradient and activation norms every k steps.
  c.progress_bar = True  # Only drawn when stdout is a terminal.
  return c


def parse_arg(arg: str | None) -> dict[str, str]:
  """Splits a config-file argument such as `depth=56,skip=false` into a dict of strings."""
  if not arg:
    return {}
  out = {}
  for item in arg.split(","):
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
      raise ConfigError(f"config argument must look like key=value[,key=value...]; got {arg!r}")
    out[key.strip()] = value.strip()
  return out


def parse_bool(text: str) -> bool:
  lowered = text.lower()
  if lowered in ("true", "1", "yes"):
    return True
  if lowered in ("false", "0", "no"):
    return False
  raise ConfigError(f"expected true or false; got {text!r}")


def apply_model_args(config: ml_collections.ConfigDict,
                     arg: str | None) -> ml_collections.ConfigDict:
  """Applies the arguments every config file accepts, e.g. `depth=56,skip=false`.

  `depth=56` names `resnet56`; validate() later checks it against the CIFAR and ImageNet depths.
  """
  for key, value in parse_arg(arg).items():
    if key not in MODEL_ARGS:
      raise ConfigError(f"unknown config argument {key!r}; allowed: {', '.join(MODEL_ARGS)}")
    try:
      if key == "depth":
        config.model.name = f"resnet{int(value)}"
      elif key == "skip":
        config.model.skip = parse_bool(value)
      elif key == "width":
        config.model.width = float(value)
      else:
        setattr(config.model, key, value)
    except ValueError as e:  # int("2x"), float("half"), parse_bool("maybe").
      raise ConfigError(f"config argument {key}={value}: {e}") from None
  return config


def _one_of(errors: list[str], field: str, value, allowed) -> None:
  if value not in allowed:
    errors.append(f"{field} must be one of {', '.join(map(str, allowed))}; got {value!r}")


def _positive(errors: list[str], field: str, value, *, allow_zero: bool = False) -> None:
  """Finite and > 0 (>= 0 with allow_zero): inf and nan are never a setting."""
  ok = math.isfinite(value) and (value >= 0 if allow_zero else value > 0)
  if not ok:
    errors.append(f"{field} must be finite and {'>= 0' if allow_zero else '> 0'}; "
                  f"got {value!r}")


def _strictly_increasing(values) -> bool:
  return all(a < b for a, b in zip(values, values[1:]))


def model_depth(name: str) -> tuple[str, int]:
  """`resnet56` -> ("cifar", 56). Raises ConfigError naming the allowed names."""
  allowed = ", ".join(f"resnet{d}" for d in CIFAR_DEPTHS + IMAGENET_DEPTHS)
  if not name.startswith("resnet") or not name[len("resnet"):].isdigit():
    raise ConfigError(f"config.model.name must be one of {allowed}; got {name!r}")
  depth = int(name[len("resnet"):])
  if depth in CIFAR_DEPTHS:
    return "cifar", depth
  if depth in IMAGENET_DEPTHS:
    return "imagenet", depth
  raise ConfigError(
      f"config.model.name {name!r}: CIFAR ResNet depth must be 6n+2: "
      f"{', '.join(map(str, CIFAR_DEPTHS))}; ImageNet ResNet depth must be one of "
      f"{', '.join(map(str, IMAGENET_DEPTHS))}")


def check_width(family: str, width: float) -> None:
  """Raises ConfigError unless `width` x each stage's filters of `family` is a whole number >= 1."""
  filters = STAGE_FILTERS[family]
  products = [f * width for f in filters]
  if not 0 < width < math.inf or any(p < 1 or p != round(p) for p in products):
    raise ConfigError(
        f"config.model.width must be > 0 and make every stage's filter count {filters} a whole "
        f"number (e.g. 0.25, 0.5, 1, 2 for CIFAR nets); got {width!r}, which gives "
        f"{', '.join(f'{p:g}' for p in products)}")


def validate(config: ml_collections.ConfigDict, *, num_devices: int = 1,
             train_size: int | None = None) -> None:
  """Checks the whole config; raises one ConfigError listing every problem found.

  Args:
    config: the run's config.
    num_devices: devices the global batch is split over (jax.device_count()).
    train_size: examples in the training split, when known, to check the batch size and epoch
      boundaries against it.
  """
  errors: list[str] = []
  _one_of(errors, "config.dataset.name", config.dataset.name, DATASETS)
  try:
    family, _ = model_depth(config.model.name)
    check_width(family, config.model.width)
  except ValueError as e:
    errors.append(str(e))
  _one_of(errors, "config.model.shortcut", config.model.shortcut, SHORTCUTS)
  _one_of(errors, "config.model.variant", config.model.variant, VARIANTS)
  _one_of(errors, "config.model.dtype", config.model.dtype, DTYPES)
  if not 0.0 <= config.model.bn_momentum < 1.0:
    errors.append(f"config.model.bn_momentum must be in [0, 1); got {config.model.bn_momentum}")
  _positive(errors, "config.model.bn_epsilon", config.model.bn_epsilon)

  opt = config.optimizer
  _one_of(errors, "config.optimizer.name", opt.name, OPTIMIZERS)
  _one_of(errors, "config.optimizer.schedule", opt.schedule, SCHEDULES)
  _one_of(errors, "config.optimizer.warmup", opt.warmup, WARMUPS)
  _one_of(errors, "config.optimizer.weight_decay_mode", opt.weight_decay_mode,
          WEIGHT_DECAY_MODES)
  _one_of(errors, "config.optimizer.boundaries_unit", opt.boundaries_unit, ("steps", "epochs"))
  _positive(errors, "config.optimizer.lr", opt.lr)
  _positive(errors, "config.optimizer.base_batch_size", opt.base_batch_size, allow_zero=True)
  if not 0.0 <= opt.momentum < 1.0:
    errors.append(f"config.optimizer.momentum must be in [0, 1); got {opt.momentum}")
  _positive(errors, "config.optimizer.weight_decay", opt.weight_decay, allow_zero=True)
  _positive(errors, "config.optimizer.grad_clip_norm", opt.grad_clip_norm, allow_zero=True)
  _positive(errors, "config.optimizer.warmup_steps", opt.warmup_steps, allow_zero=True)
  _positive(errors, "config.optimizer.decay_factor", opt.decay_factor)
  _positive(errors, "config.optimizer.warmup_factor", opt.warmup_factor)
  if opt.name == "lars":
    _positive(errors, "config.optimizer.lars_trust_coefficient", opt.lars_trust_coefficient)
    # optax.lars decays the weights before its trust ratio; there is no decoupled LARS here.
    if opt.weight_decay_mode != "coupled":
      errors.append(f"config.optimizer.weight_decay_mode must be 'coupled' for LARS; "
                    f"got {opt.weight_decay_mode!r}")

  _positive(errors, "config.batch_size", config.batch_size)
  _positive(errors, "config.eval_batch_size", config.eval_batch_size)
  _positive(errors, "config.num_steps", config.num_steps)
  _positive(errors, "config.log_every", config.log_every)
  _positive(errors, "config.eval_every", config.eval_every, allow_zero=True)
  _positive(errors, "config.checkpoint_every", config.checkpoint_every, allow_zero=True)
  _positive(errors, "config.keep_checkpoints", config.keep_checkpoints)
  _positive(errors, "config.profile_steps", config.profile_steps, allow_zero=True)
  _positive(errors, "config.diagnostics_every", config.diagnostics_every, allow_zero=True)
  _positive(errors, "config.dataset.crop_padding", config.dataset.crop_padding, allow_zero=True)
  for field in ("batch_size", "eval_batch_size"):
    value = config[field]
    if value > 0 and value % num_devices:
      errors.append(f"config.{field} ({value}) must be divisible by the number of devices "
                    f"({num_devices})")

  if opt.schedule == "step" and not opt.boundaries:
    errors.append("config.optimizer.boundaries must list at least one step for schedule 'step'")
  boundaries = list(opt.boundaries)
  if not _strictly_increasing(boundaries) or any(b <= 0 for b in boundaries):
    errors.append(f"config.optimizer.boundaries must be positive and strictly increasing; "
                  f"got {boundaries}")
  if opt.boundaries_unit == "epochs":
    if train_size is not None and config.batch_size > 0:
      steps_per_epoch = max(train_size // config.batch_size, 1)
      boundaries = [round(b * steps_per_epoch) for b in boundaries]
      if not _strictly_increasing(boundaries):
        errors.append(f"config.optimizer.boundaries {list(opt.boundaries)} epochs fall on the "
                      f"same steps {boundaries}; space them at least one step apart")
    else:
      boundaries = []  # Checked again once the dataset size is known.
  # The warmup ends at warmup_steps; a decay before that would be hidden inside it.
  early = [b for b in boundaries if 0 < b <= opt.warmup_steps]
  if early:
    errors.append(f"config.optimizer.boundaries {list(opt.boundaries)} ({opt.boundaries_unit}) "
                  f"must lie after config.optimizer.warmup_steps={opt.warmup_steps}")
  late = [b for b in boundaries if b >= config.num_steps]
  if late:
    errors.append(f"config.optimizer.boundaries {list(opt.boundaries)} ({opt.boundaries_unit}) "
                  f"must lie inside the run of config.num_steps={config.num_steps} steps")
  if opt.warmup_steps >= config.num_steps > 0:
    errors.append(f"config.optimizer.warmup_steps ({opt.warmup_steps}) must be less than "
                  f"config.num_steps ({config.num_steps})")
  if config.num_steps > MAX_STEPS:
    errors.append(_too_many_steps(config.num_steps))
  if train_size is not None and config.batch_size > train_size:
    errors.append(f"config.batch_size ({config.batch_size}) must be at most the "
                  f"{train_size:,} examples of config.dataset.train_split "
                  f"{config.dataset.train_split!r}")
  if errors:
    raise ConfigError("invalid config:\n  " + "\n  ".join(errors))


def _too_many_steps(num_steps: int) -> str:
  # 1,000 steps a second is beyond any ResNet step today; MAX_STEPS of them take 25 days.
  years = num_steps / 1_000 / (365.25 * 24 * 3600)
  return (f"config.num_steps ({num_steps:,}) must be at most {MAX_STEPS:,}: the step counter is "
          f"int32, and {num_steps:,} steps would take {years:,.1f} years even at 1,000 steps/s")
