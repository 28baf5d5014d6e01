"""Specifications of the optimizer: schedules, weight decay, momentum, clipping, injected values."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from resnet_jax import config as config_lib
from resnet_jax import optim


def _opt_cfg(**overrides):
  """The default optimizer section with a constant lr and the given fields changed."""
  cfg = config_lib.default_config().optimizer
  cfg.schedule = "constant"
  cfg.update(overrides)
  return cfg


def _lr_values(cfg, steps, *, batch_size=128, num_steps=64_000, steps_per_epoch=100):
  lr_fn = optim.create_learning_rate_fn(cfg, batch_size=batch_size, num_steps=num_steps,
                                        steps_per_epoch=steps_per_epoch)
  return np.asarray(lr_fn(jnp.asarray(steps)))


def _optimizer(cfg, *, num_steps=100):
  return optim.create_optimizer(cfg, batch_size=128, num_steps=num_steps, steps_per_epoch=10)


def _run(tx, params, grad_fn, num_updates):
  """params after `num_updates` eager updates with gradients grad_fn(params)."""
  state = tx.init(params)
  for _ in range(num_updates):
    updates, state = tx.update(grad_fn(params), state, params)
    params = optax.apply_updates(params, updates)
  return params


class _TinyNet(nn.Module):
  """Conv -> BatchNorm -> ReLU -> global mean -> Dense: every kind of leaf a ResNet has."""

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(4, (3, 3))(x)
    x = nn.BatchNorm(use_running_average=True)(x)
    x = nn.relu(x).mean(axis=(1, 2))
    return nn.Dense(3)(x)


def _tiny_net_problem():
  """(params, loss_fn) for _TinyNet on a fixed batch of 2 random 6x6 images."""
  images = jax.random.normal(jax.random.key(0), (2, 6, 6, 1))
  targets = jax.random.normal(jax.random.key(1), (2, 3))
  variables = _TinyNet().init(jax.random.key(2), images)

  def loss_fn(params):
    logits = _TinyNet().apply({"params": params, "batch_stats": variables["batch_stats"]}, images)
    return jnp.mean((logits - targets) ** 2)

  return variables["params"], loss_fn


# A Flax-shaped tree with one decayed kernel and one undecayed bias; loss ½‖w - target‖².
_PARAMS = {"Dense_0": {"kernel": jnp.array([[1.0, -2.0], [0.5, 3.0]]),
                       "bias": jnp.array([1.0, -1.0])}}
_TARGET = {"Dense_0": {"kernel": jnp.array([[0.0, 1.0], [1.0, 0.0]]),
                       "bias": jnp.array([0.5, 0.5])}}


def _quadratic_grad(params):
  return jax.tree.map(jnp.subtract, params, _TARGET)


# --- Learning-rate schedules -----------------------------------------------------------------


@pytest.mark.numerics
def test_step_schedule_divides_lr_by_ten_at_32k_and_48k():
  cfg = _opt_cfg(lr=0.1, schedule="step", boundaries=(32_000, 48_000), decay_factor=0.1)
  steps = [0, 31_999, 32_000, 32_001, 47_999, 48_000, 63_999]
  np.testing.assert_allclose(_lr_values(cfg, steps),
                             [0.1, 0.1, 0.01, 0.01, 0.01, 0.001, 0.001], rtol=1e-6)


@pytest.mark.numerics
def test_step_boundaries_in_epochs_are_multiplied_by_steps_per_epoch():
  cfg = _opt_cfg(lr=0.1, schedule="step", boundaries=(2, 3.5), boundaries_unit="epochs")
  # 100 steps per epoch: decays at steps 200 and 350.
  np.testing.assert_allclose(_lr_values(cfg, [199, 200, 349, 350], steps_per_epoch=100),
                             [0.1, 0.01, 0.01, 0.001], rtol=1e-6)


@pytest.mark.numerics
def test_cosine_schedule_falls_from_peak_to_zero_at_the_last_step():
  cfg = _opt_cfg(lr=0.2, schedule="cosine")
  steps = [0, 25, 50, 75, 100]
  expected = [0.2 * 0.5 * (1 + math.cos(math.pi * s / 100)) for s in steps]
  np.testing.assert_allclose(_lr_values(cfg, steps, num_steps=100), expected,
                             rtol=1e-6, atol=1e-8)


@pytest.mark.numerics
def test_linear_warmup_rises_from_zero_to_peak_then_cosine_decays_to_zero():
  cfg = _opt_cfg(lr=0.1, schedule="cosine", warmup="linear", warmup_steps=10)
  # Cosine over the 100 steps after warmup: half the peak halfway, at step 60.
  np.testing.assert_allclose(_lr_values(cfg, [0, 5, 9, 10, 60, 110], num_steps=110),
                             [0.0, 0.05, 0.09, 0.1, 0.05, 0.0], rtol=1e-6, atol=1e-8)


@pytest.mark.numerics
def test_constant_warm_start_uses_0_01_for_400_steps_then_the_paper_schedule():
  cfg = _opt_cfg(lr=0.1, schedule="step", boundaries=(32_000, 48_000), warmup="constant",
                 warmup_steps=400, warmup_factor=0.1)
  steps = [0, 399, 400, 31_999, 32_000, 48_000]
  np.testing.assert_allclose(_lr_values(cfg, steps),
                             [0.01, 0.01, 0.1, 0.1, 0.01, 0.001], rtol=1e-6)


@pytest.mark.numerics
def test_linear_scaling_rule_multiplies_peak_by_batch_over_base_batch():
  cfg = _opt_cfg(lr=0.1, base_batch_size=256)
  np.testing.assert_allclose(_lr_values(cfg, [0, 500], batch_size=1024), [0.4, 0.4], rtol=1e-6)


@pytest.mark.numerics
def test_zero_base_batch_size_leaves_lr_unscaled():
  cfg = _opt_cfg(lr=0.1, base_batch_size=0)
  np.testing.assert_allclose(_lr_values(cfg, [0], batch_size=1024), [0.1], rtol=1e-6)


# --- Weight decay ----------------------------------------------------------------------------


def test_weight_decay_mask_selects_conv_and_dense_kernels_only():
  params, _ = _tiny_net_problem()
  assert optim.weight_decay_mask(params) == {
      "Conv_0": {"kernel": True, "bias": False},
      "BatchNorm_0": {"scale": False, "bias": False},
      "Dense_0": {"kernel": True, "bias": False},
  }


def _decay_only_update(decay_bn_and_bias):
  """The update of lr 1, weight decay 0.1 and zero gradients on the tiny net's params."""
  params, _ = _tiny_net_problem()
  tx = _optimizer(_opt_cfg(lr=1.0, momentum=0.0, weight_decay=0.1,
                           decay_bn_and_bias=decay_bn_and_bias))
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
  return params, updates


@pytest.mark.numerics
def test_default_decay_leaves_batchnorm_and_biases_untouched():
  params, updates = _decay_only_update(decay_bn_and_bias=False)
  np.testing.assert_allclose(updates["Dense_0"]["kernel"], -0.1 * params["Dense_0"]["kernel"],
                             rtol=1e-6)
  np.testing.assert_array_equal(updates["BatchNorm_0"]["scale"], 0.0)
  np.testing.assert_array_equal(updates["Conv_0"]["bias"], 0.0)


@pytest.mark.numerics
def test_decay_bn_and_bias_decays_every_leaf():
  params, updates = _decay_only_update(decay_bn_and_bias=True)
  jax.tree.map(lambda u, p: np.testing.assert_allclose(u, -0.1 * p, rtol=1e-6), updates, params)
  # The BN scales start at 1, so their decay is visible.
  np.testing.assert_allclose(updates["BatchNorm_0"]["scale"], -0.1, rtol=1e-6)


@pytest.mark.numerics
def test_coupled_decay_equals_momentum_sgd_on_loss_plus_half_wd_kernel_norm_squared():
  params, loss_fn = _tiny_net_problem()
  wd = 0.01

  def penalised_loss(p):
    kernels = [p["Conv_0"]["kernel"], p["Dense_0"]["kernel"]]
    return loss_fn(p) + 0.5 * wd * sum(jnp.sum(k ** 2) for k in kernels)

  cfg = _opt_cfg(lr=0.1, momentum=0.9, weight_decay=wd, weight_decay_mode="coupled")
  ours = _run(_optimizer(cfg), params, jax.grad(loss_fn), num_updates=3)
  reference = _run(optax.sgd(0.1, momentum=0.9), params, jax.grad(penalised_loss), num_updates=3)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               ours, reference)


@pytest.mark.numerics
def test_decoupled_decay_shrinks_weights_outside_momentum():
  lr, momentum, wd = 0.1, 0.9, 0.1
  cfg = _opt_cfg(lr=lr, momentum=momentum, weight_decay=wd, weight_decay_mode="decoupled")
  ours = _run(_optimizer(cfg), _PARAMS, _quadratic_grad, num_updates=3)

  # trace <- g + momentum * trace;  w <- w - lr * (trace + wd * w), kernels only.
  for layer, name, decayed in (("Dense_0", "kernel", True), ("Dense_0", "bias", False)):
    w = np.asarray(_PARAMS[layer][name], np.float64)
    target = np.asarray(_TARGET[layer][name], np.float64)
    trace = np.zeros_like(w)
    for _ in range(3):
      trace = (w - target) + momentum * trace
      w = w - lr * (trace + (wd * w if decayed else 0.0))
    np.testing.assert_allclose(ours[layer][name], w, rtol=1e-5)


@pytest.mark.numerics
def test_decoupled_decay_differs_from_coupled_on_kernels_only():
  def params_after(mode):
    cfg = _opt_cfg(lr=0.1, momentum=0.9, weight_decay=0.1, weight_decay_mode=mode)
    return _run(_optimizer(cfg), _PARAMS, _quadratic_grad, num_updates=3)

  coupled, decoupled = params_after("coupled"), params_after("decoupled")
  np.testing.assert_allclose(coupled["Dense_0"]["bias"], decoupled["Dense_0"]["bias"], rtol=1e-6)
  gap = np.max(np.abs(coupled["Dense_0"]["kernel"] - decoupled["Dense_0"]["kernel"]))
  assert gap > 1e-2


# --- Momentum, clipping, LARS ----------------------------------------------------------------


@pytest.mark.numerics
def test_nesterov_matches_its_formula_for_two_steps_on_a_quadratic():
  curvature, lr, momentum = 2.0, 0.1, 0.9
  cfg = _opt_cfg(lr=lr, momentum=momentum, nesterov=True, weight_decay=0.0)
  ours = _run(_optimizer(cfg), {"w": jnp.array(1.0)}, lambda p: {"w": curvature * p["w"]},
              num_updates=2)

  # trace <- g + momentum * trace;  w <- w - lr * (g + momentum * trace).
  w, trace = 1.0, 0.0
  for _ in range(2):
    g = curvature * w
    trace = g + momentum * trace
    w -= lr * (g + momentum * trace)
  assert w == pytest.approx(0.2224)  # Against a hand calculation, too.
  np.testing.assert_allclose(ours["w"], w, rtol=1e-6)


@pytest.mark.numerics
def test_grad_clipping_caps_the_global_norm_and_keeps_the_direction():
  cfg = _opt_cfg(lr=1.0, momentum=0.0, weight_decay=0.0, grad_clip_norm=1.0)
  params = {"kernel": jnp.zeros(2), "bias": jnp.zeros(1)}
  grads = {"kernel": jnp.array([6.0, 8.0]), "bias": jnp.array([0.0])}  # Global norm 10.
  tx = _optimizer(cfg)
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(optax.tree.norm(updates), 1.0, rtol=1e-6)
  np.testing.assert_allclose(updates["kernel"], [-0.6, -0.8], rtol=1e-6)


@pytest.mark.numerics
def test_lars_first_step_scales_each_kernel_by_its_trust_ratio():
  lr, wd, trust = 0.1, 0.1, 0.001
  cfg = _opt_cfg(name="lars", lr=lr, momentum=0.9, weight_decay=wd, lars_trust_coefficient=trust)
  params = {"Dense_0": {"kernel": jnp.array([[3.0, 4.0]]), "bias": jnp.array([1.0])}}
  grads = {"Dense_0": {"kernel": jnp.array([[1.0, 0.0]]), "bias": jnp.array([0.5])}}
  tx = _optimizer(cfg)
  updates, _ = tx.update(grads, tx.init(params), params)

  decayed = np.array([[1.0, 0.0]]) + wd * np.array([[3.0, 4.0]])
  ratio = trust * 5.0 / np.linalg.norm(decayed)  # ‖w‖ = 5.
  np.testing.assert_allclose(updates["Dense_0"]["kernel"], -lr * ratio * decayed, rtol=1e-5)
  # Biases are neither decayed nor adapted: plain SGD.
  np.testing.assert_allclose(updates["Dense_0"]["bias"], [-lr * 0.5], rtol=1e-6)


# --- Injected hyperparameters ----------------------------------------------------------------


@pytest.mark.numerics
def test_jitted_update_matches_the_eager_update():
  cfg = _opt_cfg(schedule="cosine", warmup_steps=2, weight_decay=0.01, grad_clip_norm=5.0)
  tx = _optimizer(cfg, num_steps=10)
  eager_state = jit_state = tx.init(_PARAMS)
  jit_update = jax.jit(tx.update)
  for _ in range(3):
    eager, eager_state = tx.update(_quadratic_grad(_PARAMS), eager_state, _PARAMS)
    jitted, jit_state = jit_update(_quadratic_grad(_PARAMS), jit_state, _PARAMS)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8),
                 eager, jitted)
  assert np.any(np.asarray(jitted["Dense_0"]["kernel"]) != 0.0)


@pytest.mark.numerics
def test_current_learning_rate_is_the_lr_of_the_most_recent_update():
  cfg = _opt_cfg(lr=0.1, schedule="cosine", warmup="linear", warmup_steps=4)
  lr_fn = optim.create_learning_rate_fn(cfg, batch_size=128, num_steps=20, steps_per_epoch=10)
  tx = _optimizer(cfg, num_steps=20)
  state = tx.init(_PARAMS)
  assert float(optim.current_learning_rate(state)) == 0.0  # What the first update will use.
  for step in range(6):
    _, state = tx.update(_quadratic_grad(_PARAMS), state, _PARAMS)
    np.testing.assert_allclose(optim.current_learning_rate(state), lr_fn(step), rtol=1e-6)
  assert optim.current_learning_rate(state).dtype == jnp.float32


@pytest.mark.numerics
def test_set_hyperparams_changes_the_update_without_retracing():
  tx = _optimizer(_opt_cfg(lr=0.1, momentum=0.9, weight_decay=1e-4))
  traces = []

  @jax.jit
  def update(grads, state, params):
    traces.append(1)  # Runs only while tracing.
    return tx.update(grads, state, params)

  grads = _quadratic_grad(_PARAMS)
  state = tx.init(_PARAMS)
  for _ in range(2):
    _, state = update(grads, state, _PARAMS)
  state = optim.set_hyperparams(state, learning_rate=0.05, momentum=0.0, weight_decay=0.0)
  updates, state = update(grads, state, _PARAMS)

  assert len(traces) == 1
  # Momentum and decay off: a plain gradient step of the new lr.
  jax.tree.map(lambda u, g: np.testing.assert_allclose(u, -0.05 * g, rtol=1e-6), updates, grads)
  np.testing.assert_allclose(optim.current_learning_rate(state), 0.05, rtol=1e-6)


def test_set_hyperparams_rejects_unknown_names_listing_the_allowed_ones():
  tx = _optimizer(_opt_cfg())
  with pytest.raises(ValueError, match="lr.*allowed: learning_rate, momentum, weight_decay"):
    optim.set_hyperparams(tx.init(_PARAMS), lr=0.05)


@pytest.mark.numerics
def test_a_population_of_learning_rates_vmaps_over_the_state():
  tx = _optimizer(_opt_cfg(lr=0.1, momentum=0.0, weight_decay=0.0))
  states = jax.vmap(lambda _: tx.init(_PARAMS))(jnp.arange(3))
  states = optim.set_hyperparams(states, learning_rate=jnp.array([0.1, 0.2, 0.4]))
  grads = _quadratic_grad(_PARAMS)
  updates, states = jax.vmap(tx.update, in_axes=(None, 0, None))(grads, states, _PARAMS)
  np.testing.assert_allclose(updates["Dense_0"]["bias"],
                             -np.array([[0.1], [0.2], [0.4]]) * grads["Dense_0"]["bias"],
                             rtol=1e-6)
  np.testing.assert_allclose(optim.current_learning_rate(states), [0.1, 0.2, 0.4], rtol=1e-6)


# --- Config validation (the optimizer section) ----------------------------------------------


def test_validate_rejects_decoupled_decay_for_lars():
  config = config_lib.default_config()
  config.optimizer.name = "lars"
  config.optimizer.weight_decay_mode = "decoupled"
  with pytest.raises(ValueError, match="weight_decay_mode must be 'coupled' for LARS"):
    config_lib.validate(config)


def test_validate_rejects_a_boundary_inside_the_warmup():
  config = config_lib.default_config()
  config.optimizer.update(schedule="step", boundaries=(300, 1000), warmup_steps=400)
  with pytest.raises(ValueError, match="must lie after config.optimizer.warmup_steps=400"):
    config_lib.validate(config)
