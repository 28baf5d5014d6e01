"""Gradient-flow diagnostics: per-block gradient norms, activation RMS and block order."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnet_jax import diagnostics, models

CIFAR20_BLOCKS = [f"stage{s}_block{b}" for s in (1, 2, 3) for b in (1, 2, 3)]


def tiny_net_loss(params, x):
  """y = v . (a * W x) + b: a stem, one block and a head, each with its own parameters."""
  h = params["stem"]["kernel"] @ x
  g = params["stage1_block1"]["scale"] * h
  return params["head"]["kernel"] @ g + params["head"]["bias"]


@pytest.mark.numerics
def test_block_grad_norms_equal_the_hand_computed_norms_of_a_tiny_net():
  params = {"stem": {"kernel": jnp.eye(2)}, "stage1_block1": {"scale": jnp.float32(2.0)},
            "head": {"kernel": jnp.array([1.0, 2.0]), "bias": jnp.float32(0.5)}}
  x = jnp.array([3.0, 4.0])
  grads = jax.grad(tiny_net_loss)(params, x)
  norms = jax.jit(diagnostics.block_grad_norms)(grads)
  # dL/dW = a v x^T, so |dL/dW| = a |v| |x| = 2 sqrt(5) 5; dL/da = v . W x = 3 + 8 = 11;
  # dL/dv = a W x = (6, 8) and dL/db = 1, so the head's norm is sqrt(36 + 64 + 1).
  assert {k: float(v) for k, v in norms.items()} == pytest.approx(
      {"stem": 10 * math.sqrt(5), "stage1_block1": 11.0, "head": math.sqrt(101)})


def test_block_activation_rms_takes_the_value_each_block_sowed():
  sown = {"stage1_block1": {"activation_rms": (jnp.float32(0.5),)},
          "stage1_block2": {"activation_rms": (jnp.float32(1.5),)},
          "head": {"__call__": (jnp.ones(3),)}}  # Captured outputs, no RMS: left out.
  rms = diagnostics.block_activation_rms(sown)
  assert {k: float(v) for k, v in rms.items()} == {"stage1_block1": 0.5, "stage1_block2": 1.5}


@pytest.mark.numerics
@pytest.mark.parametrize("skip", [True, False])
def test_block_activation_rms_is_the_rms_of_each_block_output(skip):
  model = models.get_model("resnet20", num_classes=10, skip=skip)
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 1))
  variables = model.init(jax.random.key(1), x, train=False)
  _, state = model.apply(variables, x, train=False, mutable=["intermediates"],
                         capture_intermediates=True)
  intermediates = state["intermediates"]
  rms = diagnostics.block_activation_rms(intermediates)
  assert sorted(rms) == sorted(CIFAR20_BLOCKS)
  for name, value in rms.items():
    output = np.asarray(intermediates[name]["__call__"][0], np.float64)
    assert float(value) == pytest.approx(np.sqrt(np.mean(output ** 2)), rel=1e-5)


def test_block_order_sorts_block_numbers_naturally():
  names = ["head", "stage1_block10", "stage2_block1", "stage1_block9", "stem", "head_bn"]
  assert diagnostics.block_order(names) == [
      "stem", "stage1_block9", "stage1_block10", "stage2_block1", "head_bn", "head"]


def test_block_order_of_a_cifar_resnet_runs_from_stem_to_head():
  model = models.get_model("resnet20", num_classes=10)
  shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                          jnp.zeros((1, 8, 8, 1)))
  assert diagnostics.block_order(shapes["params"]) == ["stem", *CIFAR20_BLOCKS, "head"]


def test_block_order_rejects_an_unknown_name():
  with pytest.raises(ValueError, match="block name must be .*; got 'layer3'"):
    diagnostics.block_order(["stem", "layer3"])
