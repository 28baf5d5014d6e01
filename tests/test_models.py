"""Specification of resnet_jax.models: sizes from the papers, layout, options and sharded BN."""

from __future__ import annotations

import functools

import flax.linen as nn
import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from resnet_jax import config as config_lib
from resnet_jax.models import IMAGENET_STEM, ResNet, bottleneck_branch, get_model

CIFAR_INPUT = (2, 32, 32, 3)


def abstract_variables(model, input_shape=CIFAR_INPUT):
  """The shapes of `model.init`'s variables, without computing them."""
  init = lambda x: model.init(jax.random.key(0), x, train=False)
  return jax.eval_shape(init, jax.ShapeDtypeStruct(input_shape, jnp.float32))


def flat_params(model, input_shape=CIFAR_INPUT) -> dict[tuple[str, ...], jax.ShapeDtypeStruct]:
  return flax.traverse_util.flatten_dict(abstract_variables(model, input_shape)["params"])


def param_count(model) -> int:
  return sum(leaf.size for leaf in flat_params(model).values())


def shortcut_param_count(model) -> int:
  return sum(leaf.size for path, leaf in flat_params(model).items()
             if any("shortcut" in name for name in path))


def logits_shape(model, input_shape) -> tuple[int, ...]:
  apply = lambda x: model.init_with_output(jax.random.key(0), x, train=False)[0]
  return jax.eval_shape(apply, jax.ShapeDtypeStruct(input_shape, jnp.float32)).shape


def captured_output_shapes(model, input_shape):
  """Each module's output shapes from `capture_intermediates`, without computing them."""
  def capture(variables, x):
    _, state = model.apply(variables, x, train=False, capture_intermediates=True,
                           mutable=["intermediates"])
    return state["intermediates"]
  x = jax.ShapeDtypeStruct(input_shape, jnp.float32)
  return jax.eval_shape(capture, abstract_variables(model, input_shape), x)


@pytest.fixture(scope="module")
def resnet20_variables():
  """Real float32 variables of a CIFAR ResNet-20 (10 classes), shared by the forward tests."""
  model = get_model("resnet20", num_classes=10)
  return jax.jit(functools.partial(model.init, train=False))(
      jax.random.key(0), jnp.zeros((1, 16, 16, 3)))


# He et al. 2016, Table 6, as printed: 2 decimals below 1M parameters, 1 above.
@pytest.mark.parametrize("depth, millions", [
    (20, 0.27), (32, 0.46), (44, 0.66), (56, 0.85), (110, 1.7),
    pytest.param(1202, 19.4, marks=pytest.mark.slow)])
def test_cifar_option_a_parameter_count_matches_paper_table_6(depth, millions):
  count = param_count(get_model(f"resnet{depth}", num_classes=10, shortcut="A"))
  assert round(count / 1e6, 2 if count < 1e6 else 1) == millions


@pytest.mark.parametrize("depth, count", [
    (18, 11_689_512), (34, 21_797_672), (50, 25_557_032), (101, 44_549_160),
    (152, 60_192_808)])
@pytest.mark.parametrize("variant", ["v1", "v1.5"])
def test_imagenet_parameter_count_equals_torchvision(depth, count, variant):
  assert param_count(get_model(f"resnet{depth}", num_classes=1000, variant=variant)) == count


def test_resnet200_has_stages_of_3_24_36_3_bottleneck_blocks():
  params = flat_params(get_model("resnet200", num_classes=1000))
  blocks = {path[0] for path in params if path[0].startswith("stage")}
  per_stage = [sum(name.startswith(f"stage{s}_") for name in blocks) for s in (1, 2, 3, 4)]
  assert per_stage == [3, 24, 36, 3]
  assert params[("stage4_block3", "conv3", "kernel")].shape == (1, 1, 512, 2048)


def test_option_b_adds_exactly_the_two_projections_to_cifar_nets():
  # 1x1 conv 16->32 + BN(32), then 1x1 conv 32->64 + BN(64).
  projections = 16 * 32 + 2 * 32 + 32 * 64 + 2 * 64
  for name in ("resnet20", "resnet56"):
    a = param_count(get_model(name, num_classes=10, shortcut="A"))
    b = param_count(get_model(name, num_classes=10, shortcut="B"))
    assert b - a == projections == 2752


def test_option_a_has_no_shortcut_parameters():
  assert shortcut_param_count(get_model("resnet20", num_classes=10, shortcut="A")) == 0


@pytest.mark.parametrize("name, kwargs", [
    ("resnet20", {"shortcut": "B"}), ("resnet18", {}), ("resnet50", {}),
    ("resnet50", {"variant": "v2"})])
def test_plain_twin_has_no_shortcut_parameters(name, kwargs):
  assert shortcut_param_count(get_model(name, num_classes=10, skip=False, **kwargs)) == 0


@pytest.mark.parametrize("name, kwargs", [
    ("resnet20", {"shortcut": "B"}), ("resnet18", {}), ("resnet50", {}),
    ("resnet50", {"variant": "v2"})])
def test_plain_twin_count_is_residual_count_minus_projections(name, kwargs):
  residual = get_model(name, num_classes=10, **kwargs)
  plain = get_model(name, num_classes=10, skip=False, **kwargs)
  projections = shortcut_param_count(residual)
  assert projections > 0
  assert param_count(plain) == param_count(residual) - projections


def test_plain_twin_count_equals_residual_count_with_option_a():
  for name in ("resnet20", "resnet110"):
    assert (param_count(get_model(name, num_classes=10, skip=False, shortcut="A"))
            == param_count(get_model(name, num_classes=10, shortcut="A")))


@pytest.mark.parametrize("name, kwargs, input_shape, classes", [
    ("resnet20", {}, (2, 32, 32, 3), 10),
    ("resnet20", {"shortcut": "B"}, (2, 28, 28, 1), 10),
    ("resnet56", {"skip": False}, (2, 28, 28, 1), 10),
    ("resnet50", {}, (2, 224, 224, 3), 1000),
    ("resnet50", {"variant": "v2"}, (2, 224, 224, 3), 1000),
    ("resnet18", {}, (2, 28, 28, 1), 10),
    ("resnet50", {"variant": "v1", "skip": False}, (2, 28, 28, 1), 10),
    ("resnet20", {"width": 2}, (2, 32, 32, 3), 100),
])
def test_logits_have_shape_batch_by_classes(name, kwargs, input_shape, classes):
  model = get_model(name, num_classes=classes, **kwargs)
  assert logits_shape(model, input_shape) == (input_shape[0], classes)


def test_imagenet_stages_halve_28x28_down_to_1x1():
  outputs = captured_output_shapes(get_model("resnet18", num_classes=10), (2, 28, 28, 1))
  sides = [outputs[f"stage{s}_block1"]["__call__"][0].shape[1] for s in (1, 2, 3, 4)]
  assert outputs["stem"]["__call__"][0].shape == (2, 7, 7, 64)
  assert sides == [7, 4, 2, 1]


@pytest.mark.parametrize("variant, conv1_side, conv2_side", [("v1", 4, 4), ("v1.5", 7, 4)])
def test_v1_strides_the_first_1x1_conv_and_v1_5_the_3x3(variant, conv1_side, conv2_side):
  model = get_model("resnet50", num_classes=10, variant=variant)
  block = captured_output_shapes(model, (1, 28, 28, 3))["stage2_block1"]
  assert block["conv1"]["__call__"][0].shape[1] == conv1_side  # Stage 2 input is 7x7.
  assert block["conv2"]["__call__"][0].shape[1] == conv2_side


def top_level_call_order(model, input_shape=CIFAR_INPUT) -> list[str]:
  """Names of the model's direct submodules in the order the forward pass calls them."""
  order = []
  def record(next_fun, args, kwargs, context):
    if context.method_name == "__call__" and len(context.module.path) == 1:
      order.append(context.module.name)
    return next_fun(*args, **kwargs)
  with nn.intercept_methods(record):
    abstract_variables(model, input_shape)
  return order


def test_top_level_modules_are_stem_blocks_head_in_call_order():
  blocks = [f"stage{s}_block{b}" for s in (1, 2, 3) for b in (1, 2, 3)]
  assert top_level_call_order(get_model("resnet20", num_classes=10)) == ["stem", *blocks, "head"]


def test_v2_calls_head_bn_between_the_last_block_and_the_head():
  order = top_level_call_order(get_model("resnet50", num_classes=10, variant="v2"))
  assert order[-3:] == ["stage4_block3", "head_bn", "head"]
  assert len(order) == 1 + 16 + 2


def test_plain_twin_keeps_the_block_names():
  residual = top_level_call_order(get_model("resnet34", num_classes=10))
  assert top_level_call_order(get_model("resnet34", num_classes=10, skip=False)) == residual
  plain = abstract_variables(get_model("resnet34", num_classes=10, skip=False))["params"]
  assert set(plain["stage2_block1"]) == {"conv1", "bn1", "conv2", "bn2"}


def test_v2_normalises_in_head_bn_not_in_the_stem():
  params = abstract_variables(get_model("resnet50", num_classes=10, variant="v2"))["params"]
  assert set(params["stem"]) == {"conv"}
  assert params["head_bn"]["scale"].shape == (2048,)


def test_projection_layers_are_named_shortcut_and_only_where_shape_changes():
  params = abstract_variables(get_model("resnet50", num_classes=10))["params"]
  with_projection = sorted(name for name, block in params.items()
                           if {"shortcut_conv", "shortcut_bn"} <= set(block))
  assert with_projection == ["stage1_block1", "stage2_block1", "stage3_block1", "stage4_block1"]
  assert params["stage2_block1"]["shortcut_conv"]["kernel"].shape == (1, 1, 256, 512)


@pytest.mark.parametrize("width, filters", [(4, (64, 128, 256)), (0.25, (4, 8, 16))])
def test_width_multiplies_stem_and_stage_filters(width, filters):
  params = abstract_variables(get_model("resnet20", num_classes=10, width=width))["params"]
  assert params["stem"]["conv"]["kernel"].shape == (3, 3, 3, filters[0])
  assert params["stage1_block3"]["conv2"]["kernel"].shape == (3, 3, filters[0], filters[0])
  assert params["stage3_block3"]["conv2"]["kernel"].shape == (3, 3, filters[2], filters[2])
  assert params["head"]["kernel"].shape == (filters[2], 10)


def test_conv_kernels_have_no_bias_and_params_are_float32_under_bfloat16():
  params = flat_params(get_model("resnet20", num_classes=10, dtype="bfloat16"))
  assert ("stem", "conv", "bias") not in params
  assert {leaf.dtype for leaf in params.values()} == {jnp.dtype(jnp.float32)}


def test_variables_hold_params_and_batch_stats():
  variables = abstract_variables(get_model("resnet20", num_classes=10))
  assert set(variables) == {"params", "batch_stats"}
  assert variables["batch_stats"]["stage1_block1"]["bn1"]["mean"].shape == (16,)


@pytest.mark.numerics
def test_bfloat16_forward_is_finite_and_close_to_float32(resnet20_variables):
  x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
  logits = {}
  for dtype in ("float32", "bfloat16"):
    model = get_model("resnet20", num_classes=10, dtype=dtype)
    logits[dtype] = jax.jit(functools.partial(model.apply, train=False))(resnet20_variables, x)
  assert logits["bfloat16"].dtype == jnp.float32
  assert np.all(np.isfinite(logits["bfloat16"]))
  scale = np.abs(logits["float32"]).max()
  assert scale > 0.1
  np.testing.assert_allclose(logits["bfloat16"], logits["float32"], atol=0.03 * scale)


@pytest.mark.numerics
def test_each_block_sows_the_rms_of_its_output(resnet20_variables):
  model = get_model("resnet20", num_classes=10)
  x = jax.random.normal(jax.random.key(2), (2, 16, 16, 3))
  _, state = jax.jit(lambda v, x: model.apply(
      v, x, train=False, capture_intermediates=True, mutable=["intermediates"]))(
          resnet20_variables, x)
  intermediates = state["intermediates"]
  blocks = [name for name in intermediates if name.startswith("stage")]
  assert len(blocks) == 9
  for name in blocks:
    (rms,) = intermediates[name]["activation_rms"]
    (output,) = intermediates[name]["__call__"]
    np.testing.assert_allclose(rms, np.sqrt(np.mean(np.square(output))), rtol=1e-5)


def test_sown_rms_is_not_collected_unless_intermediates_is_mutable():
  model = get_model("resnet20", num_classes=10)
  apply = lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"])
  _, updates = jax.eval_shape(apply, abstract_variables(model),
                              jax.ShapeDtypeStruct(CIFAR_INPUT, jnp.float32))
  assert set(updates) == {"batch_stats"}


@pytest.fixture(scope="module", params=[False, True], ids=["postact", "preact"])
def tiny_zero_init_net_at_init(request):
  """Variables and captured intermediates at init of a zero_init_residual bottleneck net.

  Two stages (1 and 2 blocks of 4 and 8 filters) built from the classes get_model uses;
  post-activation (v1.5) or pre-activation (v2) by the fixture's parameter.
  """
  model = ResNet(stage_sizes=(1, 2), stage_filters=(4, 8), num_classes=3, stem=IMAGENET_STEM,
                 branch_convs=functools.partial(bottleneck_branch, stride_on_3x3=True),
                 preact=request.param, shortcut="B", zero_init_residual=True)
  x = jax.random.normal(jax.random.key(4), (2, 16, 16, 3))
  return jax.jit(lambda x: model.init_with_output(
      jax.random.key(0), x, train=False, capture_intermediates=True)[1])(x)


def zeroed_bn_scales(params) -> set[tuple[str, ...]]:
  """Paths of the BNs whose scales are all 0; every other scale must be all 1."""
  flat = flax.traverse_util.flatten_dict(params)
  scales = {path: leaf for path, leaf in flat.items() if path[-1] == "scale"}
  assert all(np.all(leaf == 0) or np.all(leaf == 1) for leaf in scales.values())
  return {path[:-1] for path, leaf in scales.items() if np.all(leaf == 0)}


def test_zero_init_residual_zeroes_the_last_bn_scale_of_bottleneck_branches(
    tiny_zero_init_net_at_init):
  # v2's bn3 comes before conv3: a zero scale zeroes the ReLU and so the branch.
  assert zeroed_bn_scales(tiny_zero_init_net_at_init["params"]) == {
      ("stage1_block1", "bn3"), ("stage2_block1", "bn3"), ("stage2_block2", "bn3")}


def test_zero_init_residual_makes_identity_blocks_start_as_identities(
    tiny_zero_init_net_at_init):
  captured = tiny_zero_init_net_at_init["intermediates"]
  (block_input,) = captured["stage2_block1"]["__call__"]
  (block_output,) = captured["stage2_block2"]["__call__"]
  assert np.abs(block_input).max() > 0
  np.testing.assert_array_equal(block_output, block_input)


def test_zero_init_residual_zeroes_bn2_of_cifar_blocks():
  model = get_model("resnet20", num_classes=10, zero_init_residual=True)
  params = jax.jit(functools.partial(model.init, train=False))(
      jax.random.key(0), jnp.zeros((1, 8, 8, 3)))["params"]
  assert zeroed_bn_scales(params) == {
      (f"stage{s}_block{b}", "bn2") for s in (1, 2, 3) for b in (1, 2, 3)}


def test_zero_init_residual_is_off_by_default(resnet20_variables):
  assert zeroed_bn_scales(resnet20_variables["params"]) == set()


def test_zero_init_residual_on_plain_twin_raises():
  with pytest.raises(ValueError, match="skip=True"):
    get_model("resnet20", num_classes=10, skip=False, zero_init_residual=True)


@pytest.mark.parametrize("name, allowed", [
    ("resnet21", "CIFAR ResNet depth must be 6n\\+2: 8, 20, 32, 44, 56, 110, 1202"),
    ("resnet21", "18, 34, 50, 101, 152, 200"),
    ("vgg16", "resnet20, resnet32, resnet44, resnet56, resnet110, resnet1202, resnet18"),
])
def test_unknown_name_or_depth_raises_with_the_allowed_list(name, allowed):
  with pytest.raises(ValueError, match=allowed):
    get_model(name, num_classes=10)


@pytest.mark.parametrize("kwargs, allowed", [
    ({"shortcut": "C"}, "shortcut must be one of A, B; got 'C'"),
    ({"variant": "v3"}, "variant must be one of v1, v1.5, v2; got 'v3'"),
    ({"dtype": "float16"}, "dtype must be one of float32, bfloat16; got 'float16'"),
    ({"dtype": "fp32"}, "dtype must be one of float32, bfloat16; got 'fp32'"),
    ({"bn_variance": "fast"}, "bn_variance must be one of two_pass, one_pass, shifted; got 'fast'"),
    ({"conv": "fft"}, "conv must be one of xla, im2col; got 'fft'"),
    ({"width": 0}, r"width must be > 0 .* got 0, which gives 0, 0, 0"),
    ({"width": 0.3}, r"whole number .* got 0.3, which gives 4.8, 9.6, 19.2"),
])
def test_bad_option_raises_with_the_allowed_values(kwargs, allowed):
  with pytest.raises(ValueError, match=allowed):
    get_model("resnet20", num_classes=10, **kwargs)


@pytest.mark.parametrize("dtype", ["bfloat16", jnp.bfloat16, jnp.dtype("bfloat16")])
def test_dtype_accepts_names_and_jnp_dtypes(dtype):
  assert get_model("resnet20", num_classes=10, dtype=dtype).dtype == jnp.bfloat16


def test_default_config_model_section_builds_the_option_a_resnet20():
  model = get_model(num_classes=10, **config_lib.default_config().model)
  assert (model.stage_sizes, tuple(model.stage_filters)) == ((3, 3, 3), (16, 32, 64))
  assert (model.shortcut, model.skip, model.dtype) == ("A", True, jnp.float32)
  assert param_count(model) == 269_722


def test_imagenet_nets_project_their_shortcuts_whatever_the_shortcut_option():
  assert get_model("resnet18", num_classes=10, shortcut="A").shortcut == "B"


def test_option_that_config_model_lacks_is_refused_listing_the_options():
  with pytest.raises(ValueError, match=r"depth is not a model option; the options are name, "
                     r"skip, shortcut, variant, zero_init_residual, bn_momentum"):
    get_model("resnet20", num_classes=10, depth=56)


@pytest.mark.numerics
@pytest.mark.devices(8)
def test_batch_norm_stats_over_a_sharded_batch_equal_the_unsharded_ones(resnet20_variables):
  devices = jax.devices("cpu")
  assert len(devices) == 8  # From the devices marker (tests/conftest.py).
  model = get_model("resnet20", num_classes=10)
  train_forward = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))
  with jax.default_device(devices[0]):
    variables = jax.device_put(resnet20_variables, devices[0])
    # Examples of different means, so one device's statistics differ from the global ones.
    x = jax.random.normal(jax.random.key(3), (16, 8, 8, 3)) + jnp.arange(16.0)[:, None, None, None]
    logits, unsharded = train_forward(variables, x)
    # The same batch summed in another order: equal to the above in exact arithmetic.
    reversed_logits, reversed_order = train_forward(variables, x[::-1])
    _, first_shard_only = train_forward(variables, x[:2])
  mesh = Mesh(np.array(devices), ("data",))
  x_sharded = jax.device_put(x, NamedSharding(mesh, PartitionSpec("data")))
  replicated = jax.device_put(variables, NamedSharding(mesh, PartitionSpec()))
  sharded_logits, sharded = train_forward(replicated, x_sharded)
  assert x_sharded.addressable_shards[0].data.shape == (2, 8, 8, 3)
  assert len(sharded_logits.sharding.device_set) == 8
  assert not sharded_logits.sharding.is_fully_replicated  # The forward pass ran batch-split.
  max_diff = lambda a, b: max(float(np.max(np.abs(np.asarray(u) - np.asarray(v))))
                              for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  # Sharding only changes the summation order, so the yardstick is what another order does on
  # one device (but no less than a rounding of the largest value); 10x lets the orders' errors
  # differ in size.
  def tolerance(a, b):
    scale = max(float(np.max(np.abs(u))) for u in jax.tree.leaves(a))
    return 10 * max(max_diff(a, b), np.finfo(np.float32).eps * scale)
  stats_tolerance = tolerance(unsharded["batch_stats"], reversed_order["batch_stats"])
  assert max_diff(sharded["batch_stats"], unsharded["batch_stats"]) <= stats_tolerance
  assert max_diff(sharded_logits, logits) <= tolerance(logits, reversed_logits[::-1])
  # Per-device statistics would have failed the comparison above, by orders of magnitude.
  local_mean = first_shard_only["batch_stats"]["stem"]["bn"]["mean"]
  global_mean = unsharded["batch_stats"]["stem"]["bn"]["mean"]
  assert max_diff(local_mean, global_mean) > 1e3 * stats_tolerance
