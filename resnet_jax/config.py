"""The run configuration: its defaults, its command-line arguments, and its validation.

Every run is described by one `ml_collections.ConfigDict`. `default_config()` lists every field
with its default; the files in `configs/` start from it and change a few fields. `validate()` checks
the whole config once, before any work starts, and raises one `ConfigError` that says what was
wrong and what is allowed. Code past that point trusts the config.

Lengths may be given in epochs (`num_epochs`, ...), so that no config hard-codes a dataset's size:
once the prepared train split's size is known, `resolve_epochs()` turns them into the steps the
rest of the code counts. The model's checks and tables live in resnet_jax/architectures.py.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import ml_collections

from resnet_jax import architectures

DATASETS = ("fashion_mnist", "mnist", "cifar10", "cifar100", "imagenet2012")
SCHEDULES = ("constant", "step", "cosine")
WARMUPS = ("linear", "constant")
WEIGHT_DECAY_MODES = ("coupled", "decoupled")
OPTIMIZERS = ("sgd", "lars")
# The arguments every config file's get_config accepts, with their types:
# `configs/cifar10.py:depth=56,skip=false` on the command line, {"depth": 56, "skip": False} from
# Python.
ARG_TYPES = {"depth": int, "skip": bool, "shortcut": str, "variant": str, "dtype": str,
             "width": float}
MODEL_ARGS = tuple(ARG_TYPES)
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

  # The model's options, their defaults and what each may be: architectures.OPTIONS.
  c.model = ml_collections.ConfigDict(architectures.defaults())

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
  c.optimizer.warmup_epochs = 0.0  # >0 replaces warmup_steps (see num_epochs).
  c.optimizer.warmup = "linear"  # "linear" (from 0 to the peak) or "constant" (a warm start).
  c.optimizer.warmup_factor = 0.1  # Constant warmup: lr * warmup_factor during warmup_steps.
  c.optimizer.lars_trust_coefficient = 0.001

  c.batch_size = 128  # Global, over all devices and hosts.
  c.eval_batch_size = 1000
  c.num_steps = 2000
  # >0 replaces num_steps with round(num_epochs * steps per epoch), a step per full batch of the
  # train split (see resolve_epochs); so does each *_epochs field its steps field.
  c.num_epochs = 0.0
  c.log_every = 100
  c.eval_every = 1000  # 0 = only at the end.
  c.eval_every_epochs = 0.0  # >0 replaces eval_every.
  c.checkpoint_every = 1000  # 0 = only at the end.
  c.checkpoint_every_epochs = 0.0  # >0 replaces checkpoint_every.
  c.keep_checkpoints = 3
  # Training steps per compiled call, logs, evaluations and checkpoints falling between calls;
  # 0 = by platform: 1 on CPU, 20 on GPU and TPU (trainer.resolve_steps_per_call says why).
  c.steps_per_call = 0
  c.profile_steps = 0  # >0: write a jax.profiler trace of this many steps after warm-up.
  c.diagnostics_every = 0  # >0: record per-block gradient and activation norms every k steps.
  # Instruments (resnet_jax/curvature.py), each its own compiled program beside the train step,
  # so with all of them off the step is the program it always was. Each measures the network
  # after 0, k, 2k, ... updates (the final one included); what each costs is in the README.
  c.sharpness_every = 0  # >0: record the training loss Hessian's top eigenvalues every k steps.
  c.sharpness_top = 1  # How many of the largest eigenvalues (Lanczos).
  c.sharpness_iters = 20  # Lanczos iterations (Hessian-vector products) per measurement.
  c.sharpness_batch_size = 0  # Examples of the fixed batch they are measured on; 0 = batch_size.
  c.noise_scale_every = 0  # >0: record the gradient noise scale B_simple every k steps.
  c.progress_bar = True  # Only drawn when stdout is a terminal.
  return c


@dataclasses.dataclass(frozen=True)
class Role:
  """What a config field is to the code past validate(). A field with no Role is compiled into
  the programs and fixed for a run's life: runs that differ in it share no program, and a run
  refuses a checkpoint written under another value."""
  step_input: bool = False  # An input of the programs (in the state): runs may share programs.
  bookkeeping: bool = False  # No program depends on it (and it is resumable).
  resumable: bool = False  # May change when a run resumes: how it is watched, or how long.
  every: bool = False  # An interval in steps (0: off): a call of several steps ends there.
  alone: bool = False  # Work only a run trained alone records: such runs are not packed.
  replaces: str = ""  # A length in epochs: when > 0 it replaces this steps field.


# Every field's role, by dotted path; fields() derives the lists the code needs from it.
ROLES: dict[str, Role] = {
    "seed": Role(step_input=True),
    "optimizer.lr": Role(step_input=True),
    "optimizer.momentum": Role(step_input=True),
    "optimizer.weight_decay": Role(step_input=True),
    "num_steps": Role(resumable=True),  # Not below the checkpoint's step (checkpoints.py).
    "num_epochs": Role(bookkeeping=True, replaces="num_steps"),
    "optimizer.warmup_epochs": Role(replaces="optimizer.warmup_steps"),
    "log_every": Role(bookkeeping=True, every=True),
    "eval_every": Role(bookkeeping=True, every=True),
    "eval_every_epochs": Role(bookkeeping=True, replaces="eval_every"),
    "checkpoint_every": Role(bookkeeping=True, every=True),
    "checkpoint_every_epochs": Role(bookkeeping=True, replaces="checkpoint_every"),
    "keep_checkpoints": Role(bookkeeping=True),
    "progress_bar": Role(bookkeeping=True),
    "profile_steps": Role(bookkeeping=True, alone=True),
    "diagnostics_every": Role(bookkeeping=True, every=True, alone=True),
    # The eval program's batch: the evaluation's sums come out the same up to rounding.
    "eval_batch_size": Role(resumable=True),
    # The loop program rounds in the last bits differently, as another CPU does.
    "steps_per_call": Role(resumable=True),
    "dataset.data_dir": Role(resumable=True),
    # The instruments measure the run without changing it; each is a program of its own.
    "sharpness_every": Role(resumable=True, every=True, alone=True),
    "sharpness_top": Role(resumable=True),
    "sharpness_iters": Role(resumable=True),
    "sharpness_batch_size": Role(resumable=True),
    "noise_scale_every": Role(resumable=True, every=True, alone=True),
}

# Top-level fields an older resnet_jax recorded that no longer mean anything: a recorded config
# drops them (upgrade_recorded), so its run resumes. noise_scale_parts split the batch whose
# gradient noise was measured into parts; the noise scale now takes two whole batches.
REMOVED = ("noise_scale_parts",)


def fields(role: str) -> tuple[str, ...]:
  """The fields that have `role` (a Role attribute): fields("every"), fields("resumable"),
  which counts the bookkeeping fields too."""
  if role not in {f.name for f in dataclasses.fields(Role)} - {"replaces"}:
    raise ValueError(f"no such role: {role!r}")
  return tuple(path for path, r in ROLES.items()
               if getattr(r, role) or role == "resumable" and r.bookkeeping)


def epoch_fields() -> dict[str, str]:
  """{epochs field: the steps field it replaces when > 0}."""
  return {path: r.replaces for path, r in ROLES.items() if r.replaces}


def upgrade_recorded(recorded: dict) -> dict:
  """A config that an older resnet_jax recorded (a checkpoint's, a run's config.json), in today's
  fields: a field since replaced becomes its replacement, one since removed (REMOVED) is
  dropped; the others are left as they are.

  model.bn_fast_variance (a bool until model.bn_variance replaced it) becomes bn_variance
  "one_pass" (True) or "two_pass" (False). Fields added since stay absent: callers count them as
  their defaults.
  """
  recorded = {k: v for k, v in recorded.items() if k not in REMOVED}
  model = recorded.get("model")
  if not isinstance(model, Mapping) or "bn_fast_variance" not in model:
    return recorded
  model = dict(model)
  model["bn_variance"] = "one_pass" if model.pop("bn_fast_variance") else "two_pass"
  return {**recorded, "model": model}


def flatten(tree: Mapping) -> dict[str, Any]:
  """{dotted path: value} of every leaf of a nested dict or ConfigDict: {"model.depth": 20}."""
  flat = {}
  for key, value in tree.items():
    if isinstance(value, (Mapping, ml_collections.ConfigDict)):
      flat.update({f"{key}.{k}": v for k, v in flatten(value).items()})
    else:
      flat[str(key)] = value
  return flat


def split_arg(arg: str | None) -> dict[str, str]:
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


def _typed(value: Any, kind: type) -> Any:
  """`value` as `kind`: text from the command line is parsed, typed values are checked."""
  if isinstance(value, str):
    return parse_bool(value) if kind is bool else kind(value)
  if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
    return float(value)
  if type(value) is not kind:  # bool is an int, but skip=1 or depth=True is a mistake.
    raise ValueError(f"expected {kind.__name__}; got {value!r}")
  return value


def parse_args(arg: str | Mapping[str, Any] | None,
               types: Mapping[str, type] = ARG_TYPES) -> dict[str, Any]:
  """A config file's argument as typed values: `depth=56,skip=false` or {"depth": 56, ...}.

  Text comes from the command line (`--config=configs/cifar10.py:depth=56`); a mapping from
  Python (sweeps), whose values may be typed already or text. Raises ConfigError naming the
  allowed arguments or the value that does not parse.
  """
  items = split_arg(arg) if isinstance(arg, str) or arg is None else dict(arg)
  out = {}
  for key, value in items.items():
    if key not in types:
      raise ConfigError(f"unknown config argument {key!r}; allowed: {', '.join(types)}")
    try:
      out[key] = _typed(value, types[key])
    except ValueError as e:  # int("2x"), float("half"), parse_bool("maybe").
      raise ConfigError(f"config argument {key}={value}: {e}") from None
  return out


def apply_model_args(config: ml_collections.ConfigDict,
                     arg: str | Mapping[str, Any] | None) -> ml_collections.ConfigDict:
  """Applies the arguments every config file accepts (MODEL_ARGS), e.g. `depth=56,skip=false`.

  `depth=56` names `resnet56`; validate() later checks it against the CIFAR and ImageNet depths.
  """
  for key, value in parse_args(arg).items():
    if key == "depth":
      config.model.name = f"resnet{value}"
    else:
      config.model[key] = value
  return config


# What validate() allows each of these fields, by dotted path: one of some names...
CHOICES = {"dataset.name": DATASETS, "optimizer.name": OPTIMIZERS,
           "optimizer.schedule": SCHEDULES, "optimizer.warmup": WARMUPS,
           "optimizer.weight_decay_mode": WEIGHT_DECAY_MODES,
           "optimizer.boundaries_unit": ("steps", "epochs")}
# ... a number > 0, or >= 0 where 0 means off or a default (the fields counted in steps or
# epochs are checked with the run's length).
ABOVE_ZERO = ("optimizer.lr", "optimizer.decay_factor", "optimizer.warmup_factor", "batch_size",
              "eval_batch_size", "log_every", "keep_checkpoints", "sharpness_top",
              "sharpness_iters")
ZERO_OR_MORE = ("optimizer.base_batch_size", "optimizer.weight_decay",
                "optimizer.grad_clip_norm", "profile_steps", "steps_per_call",
                "diagnostics_every", "dataset.crop_padding", "sharpness_every",
                "sharpness_batch_size", "noise_scale_every")


def _positive(errors: list[str], field: str, value, *, allow_zero: bool = False) -> None:
  """> 0 (>= 0 with allow_zero), and finite: inf and nan are never a setting."""
  if math.isfinite(value) and (value >= 0 if allow_zero else value > 0):
    return
  bound = (f"an integer >= {0 if allow_zero else 1}" if isinstance(value, int)
           else f"finite and {'>= 0' if allow_zero else '> 0'}")
  errors.append(f"{field} must be {bound}; got {value!r}")


def _strictly_increasing(values) -> bool:
  return all(a < b for a, b in zip(values, values[1:]))


def steps_per_epoch(train_size: int, batch_size: int) -> int:
  """Steps in one pass over `train_size` examples: full batches only (the data pipeline drops the
  last partial one), at least 1."""
  return max(train_size // batch_size, 1)


def epochs_to_steps(epochs: float, steps_per_epoch: int) -> int:
  """The step at which `epochs` epochs end, to the nearest step."""
  return round(epochs * steps_per_epoch)


def _set(config: ml_collections.ConfigDict, path: str, value) -> None:
  """config[path] = value for a dotted path such as `optimizer.warmup_steps`."""
  section, _, field = path.rpartition(".")
  (config[section] if section else config)[field] = value


def resolve_epochs(config: ml_collections.ConfigDict,
                   train_size: int) -> ml_collections.ConfigDict:
  """A copy of `config` with each steps field whose epochs field is > 0 set from it (Role.replaces).

  steps = epochs_to_steps(epochs, steps_per_epoch(train_size, config.batch_size)). The epochs
  fields are kept, so resolving the copy again changes nothing. Needs config.batch_size > 0 and
  finite epochs fields, which validate() checks.

  Args:
    config: the run's config.
    train_size: examples in the prepared training split.
  """
  resolved = copy.deepcopy(config)
  per_epoch = steps_per_epoch(train_size, config.batch_size)
  for epochs_field, steps_field in epoch_fields().items():
    if config[epochs_field] > 0:
      _set(resolved, steps_field, epochs_to_steps(config[epochs_field], per_epoch))
  return resolved


def validate(config: ml_collections.ConfigDict, *, num_devices: int = 1,
             train_size: int | None = None) -> None:
  """Checks the whole config; raises one ConfigError listing every problem found.

  Args:
    config: the run's config, its epochs fields resolved (resolve_epochs) or not.
    num_devices: devices the global batch is split over (jax.device_count()).
    train_size: examples in the training split, when known, to check the batch size, the steps
      the epochs fields give and the epoch boundaries against it. Until it is known, the checks
      of a steps field that an epochs field replaces are left out.
  """
  errors = type_errors(config)
  if errors:  # The checks below compare values with numbers and names: they need the types.
    raise ConfigError("invalid config:\n  " + "\n  ".join(errors))
  for path, allowed in CHOICES.items():
    if config[path] not in allowed:
      errors.append(f"config.{path} must be one of {', '.join(allowed)}; got {config[path]!r}")
  for path in ABOVE_ZERO + ZERO_OR_MORE:
    _positive(errors, f"config.{path}", config[path], allow_zero=path in ZERO_OR_MORE)
  if not -2**31 <= config.seed < 2**31:  # TrainState.seed is int32.
    errors.append(f"config.seed must be a 32-bit integer, in [-2**31, 2**31 - 1]; "
                  f"got {config.seed}")
  errors += architectures.model_errors(config.model, prefix="config.model.")

  opt = config.optimizer
  if not 0.0 <= opt.momentum < 1.0:
    errors.append(f"config.optimizer.momentum must be in [0, 1); got {opt.momentum}")
  if opt.name == "lars":
    _positive(errors, "config.optimizer.lars_trust_coefficient", opt.lars_trust_coefficient)
    # optax.lars decays the weights before its trust ratio; there is no decoupled LARS here.
    if opt.weight_decay_mode != "coupled":
      errors.append(f"config.optimizer.weight_decay_mode must be 'coupled' for LARS; "
                    f"got {opt.weight_decay_mode!r}")

  for field in ("batch_size", "eval_batch_size"):
    value = config[field]
    if value > 0 and value % num_devices:
      errors.append(f"config.{field} ({value}) must be divisible by the number of devices "
                    f"({num_devices})")
  if train_size is not None and config.batch_size > train_size:
    errors.append(f"config.batch_size ({config.batch_size}) must be at most the "
                  f"{train_size:,} examples of config.dataset.train_split "
                  f"{config.dataset.train_split!r}")
  errors += _instrument_errors(config, num_devices)
  errors += _step_errors(config, train_size)
  if errors:
    raise ConfigError("invalid config:\n  " + "\n  ".join(errors))


def type_errors(config: ml_collections.ConfigDict) -> list[str]:
  """Every field whose value is not of its default's kind: a bool, an integer, a number, a
  string, or a sequence of numbers (optimizer.boundaries). Fields default_config() lacks are
  left to their readers."""
  kinds = {bool: ("true or false", lambda v: isinstance(v, bool)),
           int: ("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)),
           float: ("a number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)),
           str: ("a string", lambda v: isinstance(v, str)),
           tuple: ("a list of numbers", lambda v: isinstance(v, (tuple, list)) and all(
               isinstance(x, (int, float)) and not isinstance(x, bool) for x in v))}
  defaults = flatten(default_config())
  errors = []
  for path, value in flatten(config).items():
    if path in defaults:
      kind, ok = kinds[type(defaults[path])]
      if not ok(value):
        errors.append(f"config.{path} must be {kind}; got {value!r}")
  return errors


def _instrument_errors(config: ml_collections.ConfigDict, num_devices: int) -> list[str]:
  """What is wrong with the instruments' fields beyond their bounds."""
  errors = []
  if config.sharpness_top > config.sharpness_iters > 0:
    errors.append(f"config.sharpness_top ({config.sharpness_top}) must be at most "
                  f"config.sharpness_iters ({config.sharpness_iters}): each Lanczos iteration "
                  "adds one eigenvalue estimate")
  if config.sharpness_every > 0 and config.sharpness_batch_size % num_devices:
    errors.append(f"config.sharpness_batch_size ({config.sharpness_batch_size}) must be "
                  f"divisible by the number of devices ({num_devices})")
  return errors


def _step_errors(config: ml_collections.ConfigDict, train_size: int | None) -> list[str]:
  """What is wrong with the fields counted in steps or epochs: the run's length, warmup,
  boundaries, eval and checkpoint intervals. validate()'s last part; `train_size` as there."""
  errors: list[str] = []
  epochs_given = {}  # steps field -> the epochs field that replaces it.
  for epochs_field, steps_field in epoch_fields().items():
    _positive(errors, f"config.{epochs_field}", config[epochs_field], allow_zero=True)
    if config[epochs_field] != 0:
      epochs_given[steps_field] = epochs_field
  per_epoch = None
  if train_size is not None and config.batch_size > 0:
    per_epoch = steps_per_epoch(train_size, config.batch_size)
  resolvable = per_epoch is not None and not errors
  resolved = resolve_epochs(config, train_size) if resolvable else config
  for steps_field, epochs_field in epochs_given.items():
    if resolvable and resolved[steps_field] == 0:
      errors.append(
          f"config.{epochs_field}={config[epochs_field]} gives 0 steps at {per_epoch} steps "
          f"per epoch ({train_size:,} examples // batch {config.batch_size}); it must give "
          f"at least 1, or be 0 to use config.{steps_field}")
  # A steps field set from epochs is >= 0 by construction, and > 0 where checked above.
  for field, allow_zero in (("num_steps", False), ("optimizer.warmup_steps", True),
                            ("eval_every", True), ("checkpoint_every", True)):
    if field not in epochs_given:
      _positive(errors, f"config.{field}", config[field], allow_zero=allow_zero)

  # None: given in epochs, unknown until train_size is (then checked again).
  num_steps, warmup_steps = (
      resolved[field] if resolvable or field not in epochs_given else None
      for field in ("num_steps", "optimizer.warmup_steps"))
  opt = resolved.optimizer
  if opt.schedule == "step" and not opt.boundaries:
    errors.append("config.optimizer.boundaries must list at least one step for schedule 'step'")
  boundaries = list(opt.boundaries)
  if not _strictly_increasing(boundaries) or any(b <= 0 for b in boundaries):
    errors.append(f"config.optimizer.boundaries must be positive and strictly increasing; "
                  f"got {boundaries}")
  if opt.boundaries_unit == "epochs":
    if per_epoch is not None:
      boundaries = [epochs_to_steps(b, per_epoch) for b in boundaries]
      if not _strictly_increasing(boundaries):
        errors.append(f"config.optimizer.boundaries {list(opt.boundaries)} epochs fall on the "
                      f"same steps {boundaries}; space them at least one step apart")
    else:
      boundaries = []  # Checked again once the dataset size is known.
  # The warmup ends at warmup_steps; a decay before that would be hidden inside it.
  if warmup_steps is not None and any(0 < b <= warmup_steps for b in boundaries):
    errors.append(f"config.optimizer.boundaries {list(opt.boundaries)} ({opt.boundaries_unit}) "
                  f"must lie after config.optimizer.warmup_steps={warmup_steps}")
  if num_steps is None:
    return errors  # The checks against the run's length wait until it is known.
  if any(b >= num_steps for b in boundaries):
    errors.append(f"config.optimizer.boundaries {list(opt.boundaries)} ({opt.boundaries_unit}) "
                  f"must lie inside the run of config.num_steps={num_steps} steps")
  if warmup_steps is not None and warmup_steps >= num_steps > 0:
    errors.append(f"config.optimizer.warmup_steps ({warmup_steps}) must be less than "
                  f"config.num_steps ({num_steps})")
  if num_steps > MAX_STEPS:
    errors.append(_too_many_steps(num_steps))
  return errors


def _too_many_steps(num_steps: int) -> str:
  # 1,000 steps a second is beyond any ResNet step today; MAX_STEPS of them take 25 days.
  years = num_steps / 1_000 / (365.25 * 24 * 3600)
  return (f"config.num_steps ({num_steps:,}) must be at most {MAX_STEPS:,}: the step counter is "
          f"int32, and {num_steps:,} steps would take {years:,.1f} years even at 1,000 steps/s")
