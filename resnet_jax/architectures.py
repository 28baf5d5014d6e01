"""The ResNet architectures by name: their depths, stages and filters, and the checks on a model.

One table per fact, read by models.py (which builds the networks) and by config.py (which
validates a run's `config.model` before any work starts). `model_errors` is the one check of a
model's options: config.validate and models.get_model both call it.

Imports no JAX or Flax, so that config.py, and the tools that import it (experiments/bench.py),
load without them.
"""

from __future__ import annotations

import math

NAME_PREFIX = "resnet"
# CIFAR ResNets (He et al. 2016, section 4.2): depth 6n+2, three stages of n basic blocks.
CIFAR_DEPTHS = (20, 32, 44, 56, 110, 1202)
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


def _name_error(name: str, prefix: str) -> str | None:
  """What is wrong with the model name `name`, or None if it names a network here."""
  allowed = ", ".join(f"{NAME_PREFIX}{d}" for d in CIFAR_DEPTHS + IMAGENET_DEPTHS)
  digits = name[len(NAME_PREFIX):] if isinstance(name, str) else ""
  if not (isinstance(name, str) and name.startswith(NAME_PREFIX) and digits.isdigit()):
    return f"{prefix}name must be one of {allowed}; got {name!r}"
  if int(digits) not in CIFAR_DEPTHS + IMAGENET_DEPTHS:
    return (f"{prefix}name {name!r}: CIFAR ResNet depth must be 6n+2: "
            f"{', '.join(map(str, CIFAR_DEPTHS))}; ImageNet ResNet depth must be one of "
            f"{', '.join(map(str, IMAGENET_DEPTHS))}")
  return None


def family_and_depth(name: str) -> tuple[str, int]:
  """`resnet56` -> ("cifar", 56), `resnet50` -> ("imagenet", 50).

  Raises ValueError naming the allowed names.
  """
  error = _name_error(name, prefix="")
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


def _width_error(family: str, width: float, prefix: str) -> str | None:
  """Unless `width` x each stage's filters of `family` is a whole number >= 1, what is wrong."""
  filters = STAGE_FILTERS[family]
  products = [f * width for f in filters]
  if 0 < width < math.inf and all(p >= 1 and p == round(p) for p in products):
    return None
  return (f"{prefix}width must be > 0 and make every stage's filter count {filters} a whole "
          f"number (e.g. 0.25, 0.5, 1, 2 for CIFAR nets); got {width!r}, which gives "
          f"{', '.join(f'{p:g}' for p in products)}")


def model_errors(*, name: str, skip: bool, shortcut: str, variant: str,
                 zero_init_residual: bool, bn_momentum: float, bn_epsilon: float,
                 bn_variance: str, conv: str, dtype: str, width: float,
                 prefix: str = "") -> list[str]:
  """Everything wrong with a model's options (`config.model`'s fields); [] if it can be built.

  Args:
    name, skip, ...: the fields of `config.model` (see config.default_config); `dtype` by name.
    prefix: put before each field's name in the messages: "config.model." from config.validate.

  Returns:
    One line per problem, saying what is allowed.
  """
  errors = []
  name_error = _name_error(name, prefix)
  if name_error:
    errors.append(name_error)
  else:
    width_error = _width_error(family_and_depth(name)[0], width, prefix)
    if width_error:
      errors.append(width_error)
  for field, value, allowed in (("shortcut", shortcut, SHORTCUTS), ("variant", variant, VARIANTS),
                                ("bn_variance", bn_variance, BN_VARIANCES), ("conv", conv, CONVS),
                                ("dtype", dtype, DTYPES)):
    if value not in allowed:
      errors.append(f"{prefix}{field} must be one of {', '.join(allowed)}; got {value!r}")
  if zero_init_residual and not skip:
    # The plain twin has no residual branch; zeroing its BN scales would cut the signal.
    errors.append(f"{prefix}zero_init_residual=True needs skip=True: a plain net has no "
                  f"residual branch")
  if not 0.0 <= bn_momentum < 1.0:
    errors.append(f"{prefix}bn_momentum must be in [0, 1); got {bn_momentum}")
  if not (math.isfinite(bn_epsilon) and bn_epsilon > 0):
    errors.append(f"{prefix}bn_epsilon must be finite and > 0; got {bn_epsilon!r}")
  return errors
