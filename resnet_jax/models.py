"""Residual networks and their plain (no-skip) twins: the CIFAR and ImageNet families.

Written in Flax linen because it gives what the training code needs and nothing else to learn:
`model.init` and `model.apply` are pure functions of (variables, inputs), so `jax.eval_shape`
on `init` gives shapes and parameter counts without allocating anything, and BatchNorm's running
statistics live in an explicit `batch_stats` collection that the pure train step threads
through like any other state. It is also the API of the Flax ImageNet example most JAX
researchers already know:

  variables = model.init(rng, x, train=False)             # {"params", "batch_stats"}
  logits, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
  logits = model.apply(variables, x, train=False)

`x` is float [B, H, W, C], already normalised, of any spatial size and channel count (28x28x1
Fashion-MNIST works for both families); logits are float32 [B, num_classes] whatever `dtype`.

Families (build them with `get_model`):
- CIFAR (He et al. 2016, section 4.2): 3x3 conv stem with 16 filters, three stages of n basic
  blocks with 16/32/64 filters, depth 6n+2. Shortcut option A is parameter-free (subsample by 2,
  zero-pad the new channels), option B a 1x1 projection conv + BN; both only where the shape
  changes, identity elsewhere.
- ImageNet: 7x7/2 stem + 3x3/2 max pool, four stages of 64/128/256/512 filters (x4 at the output
  of bottleneck blocks), projection (option B) shortcuts where the shape changes. Variant "v1.5"
  (default, torchvision's layout) strides the bottleneck's 3x3 conv, "v1" its first 1x1 conv;
  parameter counts equal torchvision's. "v2" is pre-activation (He et al., "Identity Mappings",
  2016) in big_vision's layout: the stem has no BN (each block normalises its own input), a
  projection reads the block's pre-activated input, and a final BN + ReLU (`head_bn`) precedes
  the pool.
- The plain twin (`skip=False`) is the same stack of layers with no shortcut addition and no
  projection layers.

Layout other modules rely on: the top-level submodules are, in input-to-output order, `stem`,
`stage{s}_block{b}` (1-based), [`head_bn`, v2 only,] `head` (the dense layer). A block of the
plain twin has the layers that would form one residual branch. Each block sows the RMS of its
output into the `intermediates` collection as `activation_rms` (free unless `intermediates` is
mutable). Projection layers are `shortcut_conv` and `shortcut_bn` inside their block.

BatchNorm takes no `axis_name`: the train step is one `jax.jit` over a device mesh with the batch
sharded on its `data` axis, so XLA (GSPMD) computes each mean and variance over the global batch
and inserts the cross-device reductions itself. `axis_name` is only for `pmap`/`shard_map`.

Two options change how the same network is computed, never its variables: `bn_variance`, how
BatchNorm takes a batch's variance (`batch_norm`), and `conv`, XLA's convolution or a matrix
product of gathered windows (`im2col_conv`), which stays a plain matrix product under `jax.vmap`
over a population of models.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from flax.linen import normalization as flax_normalization
from jax import lax

from resnet_jax import architectures

ModuleDef = Any
# One convolution of a residual branch: (kernel size, output filters, stride).
ConvSpec = tuple[int, int, int]

# He et al. 2015 initialisation, fan_out mode, as the ResNet paper and torchvision use.
he_normal_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def basic_branch(filters: int, stride: int) -> tuple[ConvSpec, ...]:
  """Two 3x3 convs; the first one strides."""
  return ((3, filters, stride), (3, filters, 1))


def bottleneck_branch(filters: int, stride: int, *, stride_on_3x3: bool) -> tuple[ConvSpec, ...]:
  """1x1 reduce, 3x3, 1x1 expand to 4x filters; v1.5 and v2 stride the 3x3, v1 the first 1x1."""
  return ((1, filters, 1 if stride_on_3x3 else stride),
          (3, filters, stride if stride_on_3x3 else 1),
          (1, architectures.BOTTLENECK_EXPANSION * filters, 1))


def branch_stride(branch: Sequence[ConvSpec]) -> int:
  return math.prod(stride for _, _, stride in branch)


def changes_shape(x, features: int, stride: int) -> bool:
  """Whether a block taking `x` to `features` channels at `stride` needs a non-identity shortcut."""
  return stride != 1 or x.shape[-1] != features


def conv_layer(conv: ModuleDef, spec: ConvSpec, name: str) -> nn.Module:
  """A conv with torchvision's symmetric padding (k // 2), so odd sizes halve like ceil(H / 2)."""
  kernel, filters, stride = spec
  return conv(filters, (kernel, kernel), (stride, stride), padding=kernel // 2, name=name)


def projected_shortcut(x, *, features: int, stride: int, kind: str, conv: ModuleDef,
                       norm: ModuleDef):
  """The shortcut where a block changes shape: x [B, H, W, C] -> [B, H/stride, W/stride, features].

  Called inside a block's compact `__call__`, so its layers belong to that block.
  Option "A" subsamples and zero-pads the new channels (no parameters); "B" is a 1x1 conv + BN.
  """
  if kind == "A":
    y = x[:, ::stride, ::stride, :]
    return jnp.pad(y, ((0, 0), (0, 0), (0, 0), (0, features - x.shape[-1])))
  y = conv_layer(conv, (1, features, stride), name="shortcut_conv")(x)
  return norm(name="shortcut_bn")(y)


def root_mean_square(y):
  """float32 scalar: the RMS of all of `y`, the activation size diagnostics track per block."""
  return jnp.sqrt(jnp.mean(jnp.square(y.astype(jnp.float32))))


def sow_activation_rms(block: nn.Module, y) -> None:
  """Records the RMS of a block's output, computing it only when diagnostics collect it."""
  if block.is_mutable_collection("intermediates"):
    block.sow("intermediates", "activation_rms", root_mean_square(y))


def im2col_conv(lhs, rhs, window_strides, padding, *, lhs_dilation=None, rhs_dilation=None,
                dimension_numbers=None, feature_group_count=1, precision=None):
  """lax.conv_general_dilated as nn.Conv calls it, computed as one matrix product (im2col).

  lhs: [N, H, W, C], rhs: [kh, kw, C, O] -> [N, H', W', O], H' = (H + pads - kh) // stride + 1.
  Each kernel offset (i, j) sees a strided slice of the zero-padded input; concatenated in (i, j)
  order along the channels, the slices are the patches [N, H', W', kh * kw * C], whose feature
  (i * kw + j) * C + c is where the row-major rhs.reshape(kh * kw * C, O) keeps rhs[i, j, c].
  One dot_general contracts them.

  Why: under jax.vmap over stacked kernels (a population of models, each its own input), XLA's
  convolution becomes a grouped convolution, slow on CPU and, in its backward, on GPU
  (jax-ml/jax#13800); slices have no weights, and the product becomes a batched matrix product.
  Not lax.conv_general_dilated_patches: it gathers the windows with a grouped convolution of its
  own (a one-hot kernel per channel). The README gives the measurements
  (experiments/population_conv.py). The costs: memory, as the patches are kh * kw times the
  input and the backward keeps them, and a longer compilation.

  Takes what the models pass: flax's NHWC/HWIO dimension numbers, no dilation, one group.
  """
  expected = lax.conv_dimension_numbers(lhs.shape, rhs.shape, ("NHWC", "HWIO", "NHWC"))
  dilations = (*(lhs_dilation or ()), *(rhs_dilation or ()))
  if (lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) != expected
      or feature_group_count != 1 or any(d != 1 for d in dilations)):
    raise NotImplementedError("im2col_conv takes NHWC inputs, HWIO kernels, no dilation and one "
                              f"group; got {dimension_numbers}, dilations {dilations}, "
                              f"{feature_group_count} groups")
  kh, kw, channels, features = rhs.shape
  if isinstance(padding, str):  # "SAME" or "VALID".
    padding = lax.padtype_to_pads(lhs.shape[1:3], (kh, kw), window_strides, padding)
  x = jnp.pad(lhs, ((0, 0), *padding, (0, 0)))
  sh, sw = window_strides
  out_h, out_w = (x.shape[1] - kh) // sh + 1, (x.shape[2] - kw) // sw + 1
  windows = [lax.slice(x, (0, i, j, 0),
                       (x.shape[0], i + (out_h - 1) * sh + 1, j + (out_w - 1) * sw + 1, channels),
                       (1, sh, sw, 1))
             for i in range(kh) for j in range(kw)]
  patches = jnp.concatenate(windows, axis=-1)
  return lax.dot_general(patches, rhs.reshape(kh * kw * channels, features),
                         (((3,), (0,)), ((), ())), precision=precision)


# config.model.conv -> the function nn.Conv convolves with (its `conv_general_dilated`).
CONVOLUTIONS = {"xla": lax.conv_general_dilated, "im2col": im2col_conv}


class ShiftedBatchNorm(nn.BatchNorm):
  """nn.BatchNorm whose batch statistics are summed in one pass, around a per-channel shift.

  With c a per-channel constant (no gradient flows into it) and d = x - c,
    mean = c + E[d],  var = E[d^2] - E[d]^2,
  identities for every c, so values and gradients are the two-pass form's. Both sums read x once,
  as the plain one-pass E[x^2] - E[x]^2 does; but over N terms, rounding them errs by up to about
  N eps (var + 2 (mean - c)^2) instead of N eps (var + 2 mean^2): with c near the mean there is
  no cancellation left. (Nor is there the two-pass form's own error where the spread nears
  float32's resolution of the mean: its rounded mean m adds (mean - m)^2 to E[(x - m)^2], which
  the shifted form subtracts.)

  c is the mean of the batch's first example (over its positions: 1/B of a pass). Of the B
  examples' means, whose average is the batch mean, none lies further than sqrt(B * var) from
  it (their squared deviations sum to at most B * var), so (mean - c)^2 <= B * var for every
  batch, at every step, the first included; on a typical batch it is about var. The running mean
  would cost nothing to read, but it starts at 0 and lags the batch mean by its momentum, so it
  cancels exactly where one pass does (at step 0) and after every fast change.
  Under the sharded train step example 0 lives on one device, so the shift is one more
  all-reduce of C floats per layer, before the sums': two in a row, as the two-pass form has
  (one pass has one).

  XLA's CPU reductions cannot fuse x - c, so it is written out once. The three forms' speeds are
  in the README.

  Variables, their names, shapes and dtypes, momentum, epsilon and the output dtype are
  nn.BatchNorm's: the statistics and the normalisation are flax's own helpers
  (`_compute_stats`, `_normalize`, as of flax 0.12), only the shift is added. No `axis_name`
  and no `mask` (the models use neither).
  """

  @nn.compact
  def __call__(self, x, use_running_average: bool | None = None):
    """x: [B, ..., C] -> normalised x, same shape; statistics over every axis but the last."""
    use_running_average = nn.merge_param("use_running_average", self.use_running_average,
                                         use_running_average)
    if self.axis_name is not None:
      raise NotImplementedError("ShiftedBatchNorm takes no axis_name: each device would shift by "
                                "its own first example")
    feature_axes = flax_normalization._canonicalize_axes(x.ndim, self.axis)
    reduction_axes = tuple(i for i in range(x.ndim) if i not in feature_axes)
    feature_shape = [x.shape[ax] for ax in feature_axes]
    stats_dtype = jnp.float32 if self.force_float32_reductions else self.param_dtype
    ra_mean = self.variable("batch_stats", "mean", lambda s: jnp.zeros(s, stats_dtype),
                            feature_shape)
    ra_var = self.variable("batch_stats", "var", lambda s: jnp.ones(s, stats_dtype),
                           feature_shape)
    if use_running_average:
      mean, var = (jnp.asarray(v.value, stats_dtype) for v in (ra_mean, ra_var))
    else:
      stats = functools.partial(flax_normalization._compute_stats, axes=reduction_axes,
                                dtype=self.dtype, use_fast_variance=True,
                                force_float32_reductions=self.force_float32_reductions)
      shift = lax.stop_gradient(stats(x[:1])[0])
      offset, var = stats(x - jnp.expand_dims(shift, reduction_axes))
      mean = shift + offset
      if not self.is_initializing():
        ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
        ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
    return flax_normalization._normalize(
        self, x, mean, var, reduction_axes, feature_axes, self.dtype, self.param_dtype,
        self.epsilon, self.use_bias, self.use_scale, self.bias_init, self.scale_init,
        self.force_float32_reductions)


def batch_norm(variance: str, **kwargs) -> ModuleDef:
  """The BatchNorm that takes a batch's variance as `variance` says, partially applied to
  nn.BatchNorm's `kwargs`; all three have nn.BatchNorm's variables.

  "two_pass" (the default): mean((x - mean)^2). The one pass, E[x^2] - E[x]^2 ("one_pass"),
  cancels badly on channels whose mean dwarfs their spread (the flat background of
  Fashion-MNIST), and then the summation order -- hence the device count -- changes the
  gradients by up to 1e-3. One pass reads each activation once less: "one_pass" trades that for
  speed, "shifted" (ShiftedBatchNorm) keeps the speed without the cancellation.
  """
  if variance == "shifted":
    return functools.partial(ShiftedBatchNorm, **kwargs)
  return functools.partial(nn.BatchNorm, use_fast_variance=variance == "one_pass", **kwargs)


class _Block(nn.Module):
  """What both kinds of block take: the branch's ConvSpecs, the network's partially applied
  nn.Conv / nn.BatchNorm, and the shortcut options."""
  branch: tuple[ConvSpec, ...]
  conv: ModuleDef
  norm: ModuleDef
  skip: bool = True
  shortcut: str = "B"
  zero_init_residual: bool = False

  def branch_norm(self, index: int) -> nn.Module:
    """BN `index` (1-based) of the branch, its scale zeroed if it is the last under
    zero_init_residual (so every block starts as its shortcut; Goyal et al. 2017)."""
    last = index == len(self.branch) and self.zero_init_residual
    return self.norm(scale_init=nn.initializers.zeros if last else nn.initializers.ones,
                     name=f"bn{index}")

  def add_shortcut(self, y, x, projection_input):
    """y + the shortcut of x (a projection of `projection_input` where the shape changes); y
    alone for the plain twin."""
    if not self.skip:
      return y
    features, stride = self.branch[-1][1], branch_stride(self.branch)
    if changes_shape(x, features, stride):
      x = projected_shortcut(projection_input, features=features, stride=stride,
                             kind=self.shortcut, conv=self.conv, norm=self.norm)
    return y + x


class PostActBlock(_Block):
  """A block of the original ResNet (CIFAR, v1, v1.5): [conv-BN-ReLU]*, conv-BN, add, ReLU.

  x: [B, H, W, C_in] -> [B, ceil(H / stride), ceil(W / stride), C_out], C_out and stride from
  `branch`.
  """

  @nn.compact
  def __call__(self, x):
    y = x
    for i, spec in enumerate(self.branch, start=1):
      y = conv_layer(self.conv, spec, name=f"conv{i}")(y)
      y = self.branch_norm(i)(y)
      if i < len(self.branch):
        y = nn.relu(y)
    y = nn.relu(self.add_shortcut(y, x, projection_input=x))
    sow_activation_rms(self, y)
    return y


class PreActBlock(_Block):
  """A pre-activation block (v2): [BN-ReLU-conv]*, add. Shapes as in `PostActBlock`.

  The first BN-ReLU also feeds a projection shortcut; an identity shortcut takes the raw input.
  """

  @nn.compact
  def __call__(self, x):
    y = x
    for i, spec in enumerate(self.branch, start=1):
      # Zeroing the last BN's scale zeroes the ReLU and so the last conv: the branch starts at 0.
      y = nn.relu(self.branch_norm(i)(y))
      if i == 1:
        preactivated = y
      y = conv_layer(self.conv, spec, name=f"conv{i}")(y)
    y = self.add_shortcut(y, x, projection_input=preactivated)
    sow_activation_rms(self, y)
    return y


class Stem(nn.Module):
  """conv(kernel, stride) [-BN-ReLU] [-3x3/2 max pool]: [B, H, W, C] -> [B, H', W', features]."""
  features: int
  conv: ModuleDef
  norm: ModuleDef
  kernel_size: int = 3
  stride: int = 1
  max_pool: bool = False
  normalize: bool = True  # False for pre-activation nets: the first block normalises.

  @nn.compact
  def __call__(self, x):
    x = conv_layer(self.conv, (self.kernel_size, self.features, self.stride), name="conv")(x)
    if self.normalize:
      x = nn.relu(self.norm(name="bn")(x))
    if self.max_pool:
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    return x


CIFAR_STEM = functools.partial(Stem, kernel_size=3, stride=1, max_pool=False)
IMAGENET_STEM = functools.partial(Stem, kernel_size=7, stride=2, max_pool=True)


_OPTIONS = architectures.OPTIONS


class ResNet(nn.Module):
  """Stem, stages of blocks, global average pool, dense: x [B, H, W, C] -> logits f32 [B, classes].

  The first stage keeps the stem's resolution; every later stage halves it in its first block.
  Stage filters and the stem's filters (the first stage's) are multiplied by `width`; get_model
  checks that every product is a whole number. get_model sets the architecture's fields from
  resnet_jax/architectures.py and the options from `config.model`; an option left out takes its
  default (architectures.OPTIONS).

  Attributes:
    stage_sizes: blocks per stage.
    stage_filters: filters of each stage's branch convs (x4 at a bottleneck's output).
    branch_convs: (filters, stride) -> the ConvSpecs of one block's branch.
    stem: a partially applied `Stem`.
    preact: pre-activation (v2) blocks, a stem without BN and a final BN + ReLU.
    num_classes: outputs of the dense head.
    skip, shortcut, zero_init_residual, bn_momentum, bn_epsilon, bn_variance, conv, dtype (a jnp
      dtype), width: the model options, each with its meaning and default in
      architectures.OPTIONS.
  """
  stage_sizes: Sequence[int]
  stage_filters: Sequence[int]
  branch_convs: Callable[[int, int], tuple[ConvSpec, ...]]
  stem: ModuleDef
  preact: bool
  num_classes: int
  # The model options (architectures.OPTIONS), with their defaults.
  skip: bool = _OPTIONS["skip"].default
  shortcut: str = _OPTIONS["shortcut"].default
  zero_init_residual: bool = _OPTIONS["zero_init_residual"].default
  bn_momentum: float = _OPTIONS["bn_momentum"].default
  bn_epsilon: float = _OPTIONS["bn_epsilon"].default
  bn_variance: str = _OPTIONS["bn_variance"].default
  conv: str = _OPTIONS["conv"].default
  dtype: Any = jnp.dtype(_OPTIONS["dtype"].default)
  width: float = _OPTIONS["width"].default

  @nn.compact
  def __call__(self, x, train: bool):
    conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype, param_dtype=jnp.float32,
                             kernel_init=he_normal_fan_out,
                             conv_general_dilated=CONVOLUTIONS[self.conv])
    norm = batch_norm(self.bn_variance, use_running_average=not train, momentum=self.bn_momentum,
                      epsilon=self.bn_epsilon, dtype=self.dtype, param_dtype=jnp.float32)
    block_cls = PreActBlock if self.preact else PostActBlock
    x = self.stem(features=round(self.stage_filters[0] * self.width), conv=conv, norm=norm,
                  normalize=not self.preact, name="stem")(x)
    for s, (size, filters) in enumerate(zip(self.stage_sizes, self.stage_filters), start=1):
      for b in range(1, size + 1):
        stride = 2 if s > 1 and b == 1 else 1
        x = block_cls(branch=self.branch_convs(round(filters * self.width), stride), conv=conv,
                      norm=norm, skip=self.skip, shortcut=self.shortcut,
                      zero_init_residual=self.zero_init_residual, name=f"stage{s}_block{b}")(x)
    if self.preact:
      x = nn.relu(norm(name="head_bn")(x))
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32, name="head")(x)
    return x.astype(jnp.float32)


def dtype_name(dtype) -> Any:
  """"bfloat16" for "bfloat16", jnp.bfloat16 or jnp.dtype("bfloat16"); `dtype` itself if jnp
  reads no dtype from it ("fp32"), for the error message."""
  try:
    return jnp.dtype(dtype).name
  except TypeError:
    return dtype


def get_model(name: str, *, num_classes: int, **options) -> ResNet:
  """The network `name`, built as `config.model` says: get_model(num_classes=10, **config.model).

  Args:
    name: CIFAR depths 8, 20, 32, 44, 56, 110, 1202; ImageNet depths 18, 34, 50, 101, 152, 200
      ("resnet8" ... "resnet1202", "resnet18" ... "resnet200").
    num_classes: outputs of the dense head.
    **options: the other model options (architectures.OPTIONS, config.model's fields); those
      left out take their defaults. `dtype` may be a name or a jnp dtype. `variant` picks the
      ImageNet layout; the others become ResNet's fields, but ImageNet nets always project their
      shortcuts ("B").

  Raises:
    ValueError: every problem architectures.model_errors finds (the check config.validate
      makes), e.g. an unknown option, name or depth, a width that leaves a fractional filter
      count, or zero_init_residual on a plain twin.
  """
  options = {**architectures.defaults(), **options, "name": name}
  options["dtype"] = dtype_name(options["dtype"])
  errors = architectures.model_errors(options)
  if errors:
    raise ValueError("invalid model:\n  " + "\n  ".join(errors))
  del options["name"]
  variant = options.pop("variant")
  family, depth = architectures.family_and_depth(name)
  if family == "cifar":
    layout = dict(stem=CIFAR_STEM, branch_convs=basic_branch, preact=False)
  else:
    if architectures.uses_bottleneck(family, depth):
      branch_convs = functools.partial(bottleneck_branch, stride_on_3x3=variant != "v1")
    else:
      branch_convs = basic_branch
    layout = dict(stem=IMAGENET_STEM, branch_convs=branch_convs, preact=variant == "v2",
                  shortcut="B")
  return ResNet(stage_sizes=architectures.stage_sizes(family, depth),
                stage_filters=architectures.STAGE_FILTERS[family], num_classes=num_classes,
                **{**options, **layout, "dtype": jnp.dtype(options["dtype"])})
