"""Specification of the two options that change how a network is computed, never its variables:
config.model.bn_variance (models.batch_norm) and config.model.conv (models.im2col_conv).

Tolerances come from float32 rounding, bounded or measured against a float64 reference, never
from what happened to pass: either an error bound written out (eps times the terms summed), or
the error that float32 rounding gives the reference computation itself (see rounding_ratio).
"""

from __future__ import annotations

import functools
import zlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from resnet_jax import checkpoints, config as config_lib, models
from resnet_jax.models import IMAGENET_STEM, ResNet, bottleneck_branch, get_model

EPS = float(np.finfo(np.float32).eps)


def normal(seed: int, shape, loc: float = 0.0, scale: float = 1.0) -> jax.Array:
  """float32 test data from numpy (jax.random would compile a program per shape)."""
  return jnp.asarray(np.random.default_rng(seed).normal(loc, scale, shape), jnp.float32)


def random_variables(model: nn.Module, x) -> dict:
  """Variables of `model`'s shapes without compiling its initialiser (slow on the CPU): kernels
  N(0, 1 / fan_in), BN scales 1 + N(0, 0.1^2), biases N(0, 0.1^2), running mean 0, var 1."""
  shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), x)
  def fill(path, leaf):
    name, seed = path[-1].key, zlib.crc32(jax.tree_util.keystr(path).encode())
    if name == "kernel":
      return normal(seed, leaf.shape, scale=1 / np.sqrt(np.prod(leaf.shape[:-1])))
    if name in ("scale", "bias"):
      return normal(seed, leaf.shape, loc=float(name == "scale"), scale=0.1)
    return jnp.full(leaf.shape, float(name == "var"), leaf.dtype)
  return jax.tree_util.tree_map_with_path(fill, shapes)


def max_abs_diff(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def float64_twin(fn, *args):
  """`fn(*args)` in float64, the reference: the arguments are widened and `fn` runs with x64
  enabled, so its jnp arithmetic, and modules it builds with dtype=jnp.float64, keep 53 bits.
  Returns numpy float64 arrays."""
  with jax.enable_x64(True):
    out = fn(*jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), args))
    return jax.tree.map(lambda a: np.asarray(a, np.float64), out)


def rounding_ratio(got, expected, reordered, exact) -> float:
  """How far `got` is from the float64 `exact`, in units of how far float32 rounding alone takes
  the reference computation: per array, the larger error of `expected` (the same computation in
  float32) and `reordered` (it again with the batch reversed), but no less than one rounding of
  the largest value; the worst array.

  `got` computes the same sums in another order (another algorithm, batching or vmap), so what
  bounds it is how much one order of a float32 sum can err more than another. A sum of n terms
  errs by at most (n - 1) eps of their absolute sum in any order, and by about sqrt(n) eps of
  their size in an order that rounds like a random walk, so a correct `got` stays within
  sqrt(n) of the yardstick, n the most terms any one output sums (bound_for). A wrong result is
  off by its own size: 1 / eps ~ 1e7 yardsticks.
  """
  return max(max_abs_diff(g, x) / max(max_abs_diff(e, x), max_abs_diff(r, x),
                                      EPS * float(np.max(np.abs(x))))
             for g, e, r, x in zip(*map(jax.tree.leaves, (got, expected, reordered, exact)),
                                   strict=True))


def bound_for(terms: int) -> float:
  """rounding_ratio's bound for outputs that sum at most `terms` terms: sqrt(terms)."""
  return float(np.sqrt(terms))


# --- config.model.bn_variance ---

def bn_layer(variance: str, momentum: float = 0.9, dtype=jnp.float32,
             param_dtype=jnp.float32) -> nn.Module:
  return models.batch_norm(variance, momentum=momentum, epsilon=1e-5, dtype=dtype,
                           param_dtype=param_dtype)()


@pytest.mark.numerics
@pytest.mark.parametrize("variance", ["shifted", "one_pass"])
def test_shifted_variance_is_exact_where_a_mean_dwarfs_the_spread_and_one_pass_is_not(variance):
  # What a stem conv makes of Fashion-MNIST's flat background: channels of mean ~1e2 and spread
  # ~1e-3..1e-2, so mean^2 / var ~ 1e8..1e10, beyond float32's 1 / eps ~ 1e7.
  channels = 8
  x = normal(0, (64, 1, 1, channels), loc=100, scale=np.geomspace(1e-3, 1e-2, channels))
  _, state = bn_layer(variance, momentum=0.0).apply(
      {"params": {"scale": jnp.ones(channels), "bias": jnp.zeros(channels)},
       "batch_stats": {"mean": jnp.zeros(channels), "var": jnp.ones(channels)}},
      x, use_running_average=False, mutable=["batch_stats"])
  values = np.asarray(x, np.float64).reshape(-1, channels)  # [N = 64 terms, C].
  mean, exact = values.mean(axis=0), values.var(axis=0)
  error = np.abs(np.asarray(state["batch_stats"]["var"], np.float64) - exact) / exact
  # One pass around a shift c sums E[(x-c)^2] = var + (mean-c)^2 and E[x-c] = mean-c. A float32
  # sum of N terms errs by at most N eps/2 of their absolute sum, so the variance errs by at most
  # N eps (1 + 2 (mean-c)^2 / var) of itself. ShiftedBatchNorm's c is example 0's mean, here
  # its one pixel, and x - c is exact (Sterbenz). (The two-pass form errs here too: the float32
  # mean m it centres on is off by ~1e-5, and its E[(x-m)^2] = var + (mean-m)^2 keeps that.)
  yardstick = len(values) * EPS * (1 + 2 * (mean - values[0]) ** 2 / exact)
  if variance == "shifted":
    assert np.all(error <= yardstick)
  else:  # c = 0: every channel misses by orders of magnitude.
    assert np.all(error > 1e3 * yardstick)


@pytest.fixture(scope="module")
def cancelling_batch():
  """[16, 4, 4, 8] of 100 +- 0.01 (where one pass cancels), and a fixed cotangent."""
  return normal(0, (16, 4, 4, 8), loc=100, scale=0.01), normal(1, (16, 4, 4, 8))


def bn_train_grads(variance: str, x, cotangent, dtype=jnp.float32):
  """d sum(cotangent * BN(x)) / d(x, params) in train mode, and the updated batch_stats
  (momentum 0.9 from mean 0, var 1), computed in `dtype`."""
  layer = bn_layer(variance, dtype=dtype, param_dtype=dtype)
  variables = layer.init(jax.random.key(0), x, use_running_average=True)

  def loss(x, params):
    y, updates = layer.apply({"params": params, "batch_stats": variables["batch_stats"]}, x,
                             use_running_average=False, mutable=["batch_stats"])
    return jnp.sum(cotangent * y), updates["batch_stats"]

  return jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))(x, variables["params"])


@pytest.fixture(scope="module")
def bn_runs(cancelling_batch):
  """bn_train_grads of each variance on the cancelling batch, of two_pass on it reversed
  (re-reversed), and of two_pass in float64."""
  x, cotangent = cancelling_batch
  runs = {v: bn_train_grads(v, x, cotangent) for v in ("two_pass", "shifted", "one_pass")}
  (dx, dparams), stats = bn_train_grads("two_pass", x[::-1], cotangent[::-1])
  runs["reordered"] = (dx[::-1], dparams), stats
  runs["exact"] = float64_twin(
      lambda x, cotangent: bn_train_grads("two_pass", x, cotangent, dtype=jnp.float64),
      x, cotangent)
  return runs


# Each statistic sums the batch's 16 x 4 x 4 values of a channel.
BN_BOUND = bound_for(16 * 4 * 4)


@pytest.mark.numerics
def test_shifted_bn_gradients_equal_two_pass_ones_within_rounding(bn_runs):
  grads = {name: run[0] for name, run in bn_runs.items()}
  assert rounding_ratio(grads["shifted"], grads["two_pass"], grads["reordered"],
                        grads["exact"]) <= BN_BOUND
  # Why one pass needs the shift: its cancellation errs by orders of magnitude beyond the bound.
  assert rounding_ratio(grads["one_pass"], grads["two_pass"], grads["reordered"],
                        grads["exact"]) > 100 * BN_BOUND


@pytest.mark.numerics
def test_shifted_bn_updates_running_statistics_as_two_pass_does(bn_runs, cancelling_batch):
  x, _ = cancelling_batch
  stats = {name: run[1] for name, run in bn_runs.items()}
  exact = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
  # Flax's convention, from mean 0 and var 1 at momentum 0.9; to float32 sums of N terms.
  np.testing.assert_allclose(stats["two_pass"]["mean"], 0.1 * exact.mean(0),
                             rtol=len(exact) * EPS)
  np.testing.assert_allclose(stats["two_pass"]["var"], 0.9 + 0.1 * exact.var(0),
                             rtol=len(exact) * EPS)
  assert rounding_ratio(stats["shifted"], stats["two_pass"], stats["reordered"],
                        stats["exact"]) <= BN_BOUND


def test_shifted_bn_has_flax_batchnorm_variables_and_output_dtype():
  def init_and_apply(layer, x):
    variables = layer.init(jax.random.key(0), x, use_running_average=True)
    y, _ = layer.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
    return variables, y
  x = jax.ShapeDtypeStruct((4, 3, 3, 5), jnp.bfloat16)
  flax_bn, shifted = (jax.eval_shape(functools.partial(init_and_apply, bn_layer(v, dtype=x.dtype)),
                                     x) for v in ("two_pass", "shifted"))
  assert jax.tree.structure(shifted) == jax.tree.structure(flax_bn)
  assert jax.tree.leaves(shifted) == jax.tree.leaves(flax_bn)  # Shapes and dtypes.
  variables, y = shifted
  assert (set(variables["params"]), set(variables["batch_stats"])) == ({"scale", "bias"},
                                                                       {"mean", "var"})
  assert {leaf.dtype for leaf in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
  assert y.dtype == jnp.bfloat16


def test_shifted_bn_normalises_by_the_running_statistics_exactly_as_flax_at_eval():
  x = normal(0, (8, 3, 3, 4), loc=3)
  variables = {"params": {"scale": jnp.arange(1.0, 5.0), "bias": jnp.arange(4.0)},
               "batch_stats": {"mean": jnp.full(4, 2.5), "var": jnp.arange(0.5, 4.5)}}
  outputs = [bn_layer(v).apply(variables, x, use_running_average=True)
             for v in ("two_pass", "shifted")]
  np.testing.assert_array_equal(outputs[1], outputs[0])


@pytest.mark.parametrize("options, bn_variance, convolve", [
    ({}, "two_pass", lax.conv_general_dilated),
    ({"bn_variance": "one_pass"}, "one_pass", lax.conv_general_dilated),
    ({"bn_variance": "shifted", "conv": "im2col"}, "shifted", models.im2col_conv)])
def test_options_choose_every_bn_and_conv_of_the_net(options, bn_variance, convolve):
  # The default is what models.py built before the options existed, flax's two-pass BatchNorm
  # and XLA's convolution, so that the default runs stay the same program.
  seen = set()
  def record(next_fun, args, kwargs, context):
    module = context.module
    if isinstance(module, models.ShiftedBatchNorm):
      seen.add(("bn", "shifted"))
    elif isinstance(module, nn.BatchNorm):
      seen.add(("bn", "one_pass" if module.use_fast_variance else "two_pass"))
    elif isinstance(module, nn.Conv):
      seen.add(("conv", module.conv_general_dilated))
    return next_fun(*args, **kwargs)
  model = get_model("resnet20", num_classes=10, shortcut="B", **options)
  with nn.intercept_methods(record):
    jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=True),
                   jax.ShapeDtypeStruct((2, 8, 8, 3), jnp.float32))
  assert seen == {("bn", bn_variance), ("conv", convolve)}


@pytest.mark.parametrize("fast, variance", [(True, "one_pass"), (False, "two_pass")])
def test_checkpoint_recorded_with_bn_fast_variance_resumes_as_its_bn_variance(fast, variance):
  current = config_lib.default_config()
  current.model.bn_variance = variance
  stored = current.to_dict()
  del stored["model"]["bn_variance"], stored["model"]["conv"]
  stored["model"]["bn_fast_variance"] = fast  # What resnet_jax recorded before bn_variance.

  assert checkpoints.config_mismatches(stored, current) == []
  current.model.bn_variance = "shifted"
  assert checkpoints.config_mismatches(stored, current) == [
      f"model.bn_variance: checkpoint {variance!r}, config 'shifted'"]


# --- config.model.conv ---

def reference_conv(x, kernel, stride: int, padding) -> np.ndarray:
  """float64 convolution by its definition: out[n, h, w, o] = sum over (i, j, c) of
  x_padded[n, h * stride + i, w * stride + j, c] * kernel[i, j, c, o]."""
  x, kernel = np.asarray(x, np.float64), np.asarray(kernel, np.float64)
  kh, kw = kernel.shape[:2]
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(x.shape[1:3], (kh, kw), (stride, stride), padding)
  x = np.pad(x, ((0, 0), *padding, (0, 0)))
  out_h, out_w = (x.shape[1] - kh) // stride + 1, (x.shape[2] - kw) // stride + 1
  out = 0
  for i in range(kh):
    for j in range(kw):
      window = x[:, i:i + (out_h - 1) * stride + 1:stride, j:j + (out_w - 1) * stride + 1:stride]
      out = out + window @ kernel[i, j]
  return out


@functools.partial(jax.jit, static_argnums=(2, 3))
def xla_conv(x, kernel, stride, padding):
  return lax.conv_general_dilated(x, kernel, (stride, stride), padding,
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"))


@functools.partial(jax.jit, static_argnums=(2, 3))
def im2col(x, kernel, stride, padding):
  dimension_numbers = lax.conv_dimension_numbers(x.shape, kernel.shape,
                                                 ("NHWC", "HWIO", "NHWC"))
  return models.im2col_conv(x, kernel, (stride, stride), padding,
                            dimension_numbers=dimension_numbers)


@pytest.mark.numerics
def test_im2col_patches_are_ordered_as_the_hwio_kernel_flattens():
  # Kernel [i, j, c, f] = 1 where f = (i * kw + j) * C + c: output feature f copies the input at
  # window offset (i, j), channel c. Products by 1 and sums of zeros are exact: bitwise.
  x = normal(0, (2, 7, 6, 3))
  kh, kw, c = 3, 2, 3
  kernel = jnp.eye(kh * kw * c).reshape(kh, kw, c, kh * kw * c)
  padding = ((1, 1), (0, 1))
  out = im2col(x, kernel, 2, padding)
  padded = np.pad(np.asarray(x), ((0, 0), *padding, (0, 0)))
  for i in range(kh):
    for j in range(kw):
      for channel in range(c):
        np.testing.assert_array_equal(out[..., (i * kw + j) * c + channel],
                                      padded[:, i::2, j::2, channel][:, :out.shape[1],
                                                                     :out.shape[2]])
  np.testing.assert_array_equal(out, xla_conv(x, kernel, 2, padding))


@pytest.mark.numerics
@pytest.mark.parametrize("kernel_size, stride, padding, side", [
    (3, 1, ((1, 1), (1, 1)), 9), (3, 2, ((1, 1), (1, 1)), 9), (1, 2, ((0, 0), (0, 0)), 9),
    (7, 2, ((3, 3), (3, 3)), 11), (1, 1, ((0, 0), (0, 0)), 5), (3, 2, "SAME", 8),
    (3, 1, "VALID", 7)])
def test_im2col_conv_errs_within_the_float32_summation_bound_as_xla_conv_does(kernel_size, stride,
                                                                              padding, side):
  x = normal(0, (2, side, side, 5))
  kernel = normal(1, (kernel_size, kernel_size, 5, 6))
  exact = reference_conv(x, kernel, stride, padding)
  # A float32 sum of K = k * k * 5 products errs, in any order, by at most K eps of the sum of
  # their absolute values (each product rounds once, each addition once): Higham's bound.
  terms = kernel_size**2 * 5
  bound = terms * EPS * reference_conv(np.abs(x), np.abs(kernel), stride, padding)
  for conv in (xla_conv, im2col):
    error = np.abs(np.asarray(conv(x, kernel, stride, padding), np.float64) - exact)
    assert np.all(error <= bound), conv.__name__


def tiny_imagenet_net(conv: str) -> ResNet:
  """Two stages of one v1 bottleneck block (4 and 8 filters) behind the 7x7/2 stem and max pool:
  7x7, strided 1x1 (v1 strides the first 1x1), 3x3 and 1x1 projections, at a tiny size."""
  return ResNet(stage_sizes=(1, 1), stage_filters=(4, 8), num_classes=3, stem=IMAGENET_STEM,
                branch_convs=functools.partial(bottleneck_branch, stride_on_3x3=False),
                preact=False, shortcut="B", conv=conv)


NETS = {
    "resnet20": (lambda conv: get_model("resnet20", num_classes=10, width=0.25, conv=conv),
                 (4, 32, 32, 3)),
    "tiny_imagenet": (tiny_imagenet_net, (2, 32, 32, 3)),
}


def compiled(fn, *args):
  """jax.jit(fn), compiled for `args`' shapes."""
  return jax.jit(fn).lower(*args).compile()


def train_logits_and_grads(model, variables, x):
  """Train-mode logits [B, classes] and d sum(sin(logits)) / d params."""
  def loss(params):
    logits, _ = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, x,
                            train=True, mutable=["batch_stats"])
    return jnp.sum(jnp.sin(logits)), logits
  (_, logits), grads = jax.value_and_grad(loss, has_aux=True)(variables["params"])
  return logits, grads


@pytest.fixture(scope="module", params=list(NETS))
def conv_runs(request):
  """For one net: its variables, input, the im2col net and its compiled step, and the (logits,
  grads) of xla on x, xla on x reversed (re-reversed), im2col on x, and xla in float64."""
  build, shape = NETS[request.param]
  x = normal(0, shape)
  xla_model, im2col_model = build("xla"), build("im2col")
  variables = random_variables(xla_model, x)
  xla_step = compiled(functools.partial(train_logits_and_grads, xla_model), variables, x)
  im2col_step = compiled(functools.partial(train_logits_and_grads, im2col_model), variables, x)
  logits, grads = xla_step(variables, x[::-1])
  exact = float64_twin(jax.jit(functools.partial(
      train_logits_and_grads, xla_model.clone(dtype=jnp.float64))), variables, x)
  return {"model": im2col_model, "variables": variables, "x": x, "im2col_step": im2col_step,
          "xla": xla_step(variables, x), "xla_reordered": (logits[::-1], grads),
          "im2col": im2col_step(variables, x), "exact": exact,
          # The most terms one output sums: a first-stage kernel's gradient, over the batch and
          # every position of the input, outnumbers every convolution's window.
          "bound": bound_for(int(np.prod(shape[:3])))}


@pytest.mark.slow
def test_im2col_net_has_the_xla_nets_variables(conv_runs):
  shapes = jax.eval_shape(functools.partial(conv_runs["model"].init, train=False),
                          jax.random.key(1), conv_runs["x"])
  assert jax.tree.map(lambda a: (a.shape, a.dtype), shapes) == jax.tree.map(
      lambda a: (a.shape, a.dtype), conv_runs["variables"])


@pytest.mark.slow
@pytest.mark.numerics
@pytest.mark.parametrize("output", [0, 1], ids=["logits", "grads"])
def test_im2col_net_equals_xla_net_within_rounding(conv_runs, output):
  xla, reordered, im2col_out, exact = (conv_runs[k][output]
                                       for k in ("xla", "xla_reordered", "im2col", "exact"))
  assert rounding_ratio(im2col_out, xla, reordered, exact) <= conv_runs["bound"]


@pytest.mark.slow
@pytest.mark.numerics
@pytest.mark.parametrize("conv_runs", ["tiny_imagenet"], indirect=True)  # The faster to compile.
def test_vmapped_im2col_members_equal_their_own_unbatched_nets(conv_runs):
  # Three parameter sets (the net's, scaled by 0.5 and by 2), each with its own input: each
  # member's train-mode logits are those its own unbatched net gives, to rounding.
  variables, x, model = conv_runs["variables"], conv_runs["x"], conv_runs["model"]
  members = [jax.tree.map(lambda a, s=s: a * s, variables) for s in (1.0, 0.5, 2.0)]
  inputs = [x, -x, x[::-1]]
  def forward(model, variables, x):
    return model.apply(variables, x, train=True, mutable=["batch_stats"])[0]
  stacked, stacked_inputs = jax.tree.map(lambda *a: jnp.stack(a), *members), jnp.stack(inputs)
  batched = compiled(jax.vmap(functools.partial(forward, model)), stacked, stacked_inputs)(
      stacked, stacked_inputs)
  exact_forward = jax.jit(functools.partial(forward, model.clone(dtype=jnp.float64)))
  for member_logits, member, member_x in zip(batched, members, inputs, strict=True):
    alone, _ = conv_runs["im2col_step"](member, member_x)
    reordered, _ = conv_runs["im2col_step"](member, member_x[::-1])
    exact = float64_twin(exact_forward, member, member_x)
    assert rounding_ratio(member_logits, alone, reordered[::-1], exact) <= conv_runs["bound"]
