"""The ResNet architectures by name: their depths, stages and filters, and the model's options.

One table per fact, read by models.py (which builds the networks) and by config.py (which
validates a run's `config.model` before any work starts). `OPTIONS` declares every model option
once, with its default and its check: `config.model` is made from it, and `model_errors`, the
one check of a model's options that config.validate and models.get_model both call, runs its
checks.

Imports no JAX or Flax, so that config.py, and the tools that import it (experiments/bench.py),
load without them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

NAME_PREFIX = "resnet"
# CIFAR ResNets (He et al. 2016, section 4.2): depth 6n+2, three stages of n basic blocks. The
# paper's depths, and ResNet-8 (n = 1), the family's smallest: a quick check of a change, and the
# test suite's network (it compiles and steps faster than ResNet-20; the README has figures).
CIFAR_DEPTHS = (8, 20, 32, 44, 56, 110, 1202)
# Blocks per stage for each named ImageNet depth (He et al. 2016, Table 1; ResNet-200 from
# "Identity Mappings").
IMAGENET_STAGE_SIZES = {
    18: (2, 2, 2, 2),
    34: (3, 4, 6, 3),
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
    152: (3, 8, 36, 3),
    200: (3, 24, 36, 3),
}
IMAGENET_DEPTHS = tuple(IMAGENET_STAGE_SIZES)
# ImageNet depths from this one up use bottleneck blocks; shallower ones, and CIFAR nets, basic.
BOTTLENECK_MIN_DEPTH = 50
# A bottleneck's last 1x1 conv has this many times the stage's filters.
BOTTLENECK_EXPANSION = 4
# Filters of each stage's branch convolutions at width 1 (the stem has the first stage's).
STAGE_FILTERS = {"cifar": (16, 32, 64), "imagenet": (64, 128, 256, 512)}

# "A" zero-pads (no parameters), "B" projects with a 1x1 conv + BN. ImageNet nets always use "B".
SHORTCUTS = ("A", "B")
# ImageNet family: "v1" strides a bottleneck's first 1x1 conv, "v1.5" its 3x3, "v2" is
# pre-activation.
VARIANTS = ("v1", "v1.5", "v2")
DTYPES = ("float32", "bfloat16")
# How BatchNorm takes a batch's variance (models.batch_norm): "two_pass" mean((x - mean)^2),
# "one_pass" E[x^2] - E[x]^2, "shifted" one pass around a per-channel shift.
BN_VARIANCES = ("two_pass", "one_pass", "shifted")
# How convolutions are computed (models.CONVOLUTIONS): "xla" lax.conv_general_dilated, "im2col"
# windows gathered by slices, then one matrix product (batched, not grouped, under vmap).
CONVS = ("xla", "im2col")


def _name_error(name: str, options: Mapping[str, Any]) -> str | None:
  """What is wrong with the model name `name`, or None if it names a network here."""
  del options
  allowed = ", ".join(f"{NAME_PREFIX}{d}" for d in CIFAR_DEPTHS + IMAGENET_DEPTHS)
  digits = name[len(NAME_PREFIX):] if isinstance(name, str) else ""
  if not (isinstance(name, str) and name.startswith(NAME_PREFIX) and digits.isdigit()):
    return f"name must be one of {allowed}; got {name!r}"
  if int(digits) not in CIFAR_DEPTHS + IMAGENET_DEPTHS:
    return (f"name {name!r}: CIFAR ResNet depth must be 6n+2: "
            f"{', '.join(map(str, CIFAR_DEPTHS))}; ImageNet ResNet depth must be one of "
            f"{', '.join(map(str, IMAGENET_DEPTHS))}")
  return None


def family_and_depth(name: str) -> tuple[str, int]:
  """`resnet56` -> ("cifar", 56), `resnet50` -> ("imagenet", 50).

  Raises ValueError naming the allowed names.
  """
  error = _name_error(name, {})
  if error:
    raise ValueError(error)
  depth = int(name[len(NAME_PREFIX):])
  return ("cifar" if depth in CIFAR_DEPTHS else "imagenet"), depth


def stage_sizes(family: str, depth: int) -> tuple[int, ...]:
  """Blocks per stage: (n, n, n) with depth = 6n + 2 for CIFAR nets, Table 1 for ImageNet ones."""
  if family == "cifar":
    n = (depth - 2) // 6
    return (n, n, n)
  return IMAGENET_STAGE_SIZES[depth]


def uses_bottleneck(family: str, depth: int) -> bool:
  return family == "imagenet" and depth >= BOTTLENECK_MIN_DEPTH


def _width_error(width: float, options: Mapping[str, Any]) -> str | None:
  """Unless `width` x each stage's filters of the named net's family is a whole number >= 1,
  what is wrong (nothing to say while the name is wrong)."""
  if _name_error(options["name"], options):
    return None
  filters = STAGE_FILTERS[family_and_depth(options["name"])[0]]
  products = [f * width for f in filters]
  if 0 < width < math.inf and all(p >= 1 and p == round(p) for p in products):
    return None
  return (f"width must be > 0 and make every stage's filter count {filters} a whole "
          f"number (e.g. 0.25, 0.5, 1, 2 for CIFAR nets); got {width!r}, which gives "
          f"{', '.join(f'{p:g}' for p in products)}")


def _zero_init_error(zero_init_residual: bool, options: Mapping[str, Any]) -> str | None:
  # The plain twin has no residual branch; zeroing its BN scales would cut the signal.
  if zero_init_residual and not options["skip"]:
    return "zero_init_residual=True needs skip=True: a plain net has no residual branch"
  return None


def _momentum_error(bn_momentum: float, options: Mapping[str, Any]) -> str | None:
  del options
  return None if 0.0 <= bn_momentum < 1.0 else f"bn_momentum must be in [0, 1); got {bn_momentum}"


def _epsilon_error(bn_epsilon: float, options: Mapping[str, Any]) -> str | None:
  del options
  if math.isfinite(bn_epsilon) and bn_epsilon > 0:
    return None
  return f"bn_epsilon must be finite and > 0; got {bn_epsilon!r}"


@dataclasses.dataclass(frozen=True)
class Option:
  """A model option: a field of `config.model`, passed by models.get_model to models.ResNet (a
  field of the same name there) or to the layout it picks (`name`, `variant`)."""
  default: Any
  allowed: tuple = ()  # Its values, if they are a list.
  # (value, every option) -> what is wrong, starting with the option's name; None if nothing.
  check: Callable[[Any, Mapping[str, Any]], str | None] | None = None


# Every model option, in config.model's order: its default, and what it may be.
OPTIONS: dict[str, Option] = {
    "name": Option("resnet20", check=_name_error),  # The net: resnet8 ... resnet200.
    "skip": Option(True),  # False = the plain twin: no shortcut additions, no projections.
    "shortcut": Option("A", SHORTCUTS),  # CIFAR family: "A" (zero-pad) or "B" (1x1 projection).
    "variant": Option("v1.5", VARIANTS),  # ImageNet family: "v1", "v1.5" or "v2".
    # Zero the last BN scale of every residual branch.
    "zero_init_residual": Option(False, check=_zero_init_error),
    # Decay of BN's running averages (Flax's convention: torchvision's 0.1 is 0.9 here).
    "bn_momentum": Option(0.9, check=_momentum_error),
    "bn_epsilon": Option(1e-5, check=_epsilon_error),  # Added to BN's variances.
    # BN batch variance: "two_pass", "one_pass" (faster, cancels where a channel's mean dwarfs
    # its spread) or "shifted" (one pass, exact); see models.batch_norm.
    "bn_variance": Option("two_pass", BN_VARIANCES),
    # "xla" or "im2col" (a matrix product: fast under vmap; models.im2col_conv).
    "conv": Option("xla", CONVS),
    "dtype": Option("float32", DTYPES),  # Computation dtype; parameters stay float32.
    # Multiplier on every stage's filters: 0.5 -> CIFAR stages of 8/16/32.
    "width": Option(1.0, check=_width_error),
}


def defaults() -> dict[str, Any]:
  """{option: its default}: what `config.model` starts from."""
  return {name: option.default for name, option in OPTIONS.items()}


def model_errors(options: Mapping[str, Any], prefix: str = "") -> list[str]:
  """Everything wrong with a model's options (`config.model`'s fields); [] if it can be built.

  Args:
    options: a value for every option of OPTIONS (`dtype` by name), and no other.
    prefix: put before each option's name in the messages: "config.model." from config.validate.

  Returns:
    One line per problem, saying what is allowed.
  """
  known = ", ".join(OPTIONS)
  errors = [f"{prefix}{name} is not a model option; the options are {known}"
            for name in options if name not in OPTIONS]
  errors += [f"{prefix}{name} is missing; the options are {known}"
             for name in OPTIONS if name not in options]
  if errors:
    return errors
  for name, option in OPTIONS.items():
    value = options[name]
    if option.allowed and value not in option.allowed:
      errors.append(f"{prefix}{name} must be one of {', '.join(option.allowed)}; got {value!r}")
    error = option.check(value, options) if option.check else None
    if error:
      errors.append(prefix + error)
  return errors
