"""The optimizer: SGD with momentum or LARS, weight decay, clipping and the learning-rate schedule.

Everything is composed from Optax. The hyperparameters that sweeps vary (the peak learning rate,
momentum and weight decay) live in the optimizer state through `optax.inject_hyperparams`, so
`set_hyperparams` changes them without rebuilding the optimizer or recompiling the step, and a
population of runs can vmap over them. The schedule's shape (warmup, boundaries, cosine) is static:
a factor of the peak at each step, stored beside the hyperparameters as `schedule_factor`.

Built from the validated `config.optimizer` section (see resnet_jax/config.py); trusts it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import optax

from resnet_jax import config as config_lib

# The injected hyperparameters that `set_hyperparams` may change.
HYPERPARAMS = ("learning_rate", "momentum", "weight_decay")


def peak_learning_rate(opt_cfg: ml_collections.ConfigDict, batch_size: int) -> float:
  """The lr the schedule peaks at: `lr`, times batch_size / base_batch_size when that is > 0.

  The linear scaling rule of Goyal et al. 2017 (0.1 per 256 images for ImageNet ResNets).
  """
  if opt_cfg.base_batch_size > 0:
    return opt_cfg.lr * batch_size / opt_cfg.base_batch_size
  return opt_cfg.lr


def _boundary_steps(opt_cfg: ml_collections.ConfigDict, steps_per_epoch: int) -> list[int]:
  """The step-decay boundaries in steps; epochs become round(epochs * steps_per_epoch)."""
  if opt_cfg.boundaries_unit == "epochs":
    return [config_lib.epochs_to_steps(b, steps_per_epoch) for b in opt_cfg.boundaries]
  return [int(b) for b in opt_cfg.boundaries]


def _decay_factor_fn(opt_cfg: ml_collections.ConfigDict, *, num_steps: int,
                     steps_per_epoch: int) -> optax.Schedule:
  """The schedule after warmup as a fraction of the peak, counted from the end of warmup."""
  warmup_steps = opt_cfg.warmup_steps
  if opt_cfg.schedule == "step":
    # Boundaries count from step 0 of the run (the paper's 32k and 48k), warmup included.
    return optax.piecewise_constant_schedule(
        1.0, {b - warmup_steps: opt_cfg.decay_factor
              for b in _boundary_steps(opt_cfg, steps_per_epoch)})
  if opt_cfg.schedule == "cosine":
    return optax.cosine_decay_schedule(1.0, decay_steps=num_steps - warmup_steps)
  return optax.constant_schedule(1.0)


def _schedule_factor_fn(opt_cfg: ml_collections.ConfigDict, *, num_steps: int,
                        steps_per_epoch: int) -> optax.Schedule:
  """The schedule's shape: the fraction of the peak lr used at each step (0-based)."""
  decay = _decay_factor_fn(opt_cfg, num_steps=num_steps, steps_per_epoch=steps_per_epoch)
  if opt_cfg.warmup_steps == 0:
    return decay
  if opt_cfg.warmup == "linear":
    warmup = optax.linear_schedule(0.0, 1.0, opt_cfg.warmup_steps)
  else:
    warmup = optax.constant_schedule(opt_cfg.warmup_factor)
  return optax.join_schedules([warmup, decay], [opt_cfg.warmup_steps])


def create_learning_rate_fn(opt_cfg: ml_collections.ConfigDict, *, batch_size: int,
                            num_steps: int, steps_per_epoch: int) -> optax.Schedule:
  """The learning rate at each step (0-based, scalar or array of steps), scaling rule included.

  The same values the optimizer built by `create_optimizer` uses, as long as its injected
  `learning_rate` is left at the config's peak.
  """
  peak = peak_learning_rate(opt_cfg, batch_size)
  factor = _schedule_factor_fn(opt_cfg, num_steps=num_steps, steps_per_epoch=steps_per_epoch)
  return lambda step: peak * factor(step)


def weight_decay_mask(params) -> dict:
  """True on conv and dense kernels (leaves named `kernel`), False elsewhere.

  Flax names BatchNorm parameters `scale`/`bias` and layer biases `bias`; excluding them from
  decay (and from LARS's trust ratio) follows Goyal et al. 2017 and You et al. 2017.

  Args:
    params: a Flax params tree (the `params` collection).
  Returns:
    a tree of Python bools with the structure of `params`.
  """
  def is_kernel(path, leaf) -> bool:
    del leaf
    return jax.tree_util.keystr(path[-1:], simple=True) == "kernel"

  return jax.tree_util.tree_map_with_path(is_kernel, params)


def _sgd(learning_rate: jax.Array, momentum: jax.Array, weight_decay: jax.Array, *,
         nesterov: bool, decoupled: bool, mask) -> optax.GradientTransformation:
  """SGD with (Nesterov) momentum, as torch's SGD: trace = g + momentum * trace.

  Coupled decay adds weight_decay * w to the gradient before momentum (L2 regularisation).
  Decoupled decay adds it after momentum, so each step shrinks w by learning_rate * weight_decay
  (the lr schedule included) however much momentum has built up.
  """
  decay = optax.add_decayed_weights(weight_decay, mask)
  trace = optax.trace(momentum, nesterov=nesterov)
  order = (trace, decay) if decoupled else (decay, trace)
  return optax.chain(*order, optax.scale_by_learning_rate(learning_rate))


def create_optimizer(opt_cfg: ml_collections.ConfigDict, *, batch_size: int, num_steps: int,
                     steps_per_epoch: int) -> optax.GradientTransformationExtraArgs:
  """The optimizer the config describes; its state holds the injected hyperparameters.

  The state's hyperparameters are float32 scalars: `learning_rate` (the peak, after the scaling
  rule), `momentum`, `weight_decay`, and `schedule_factor`, the schedule's value at the most
  recent update (recomputed from the step count at every update, so not settable).
  `update(grads, state, params)` needs `params` (weight decay and LARS read them).

  Args:
    opt_cfg: the validated `config.optimizer` section.
    batch_size: the global batch size, for the linear scaling rule.
    num_steps: the run's length in steps; cosine decay reaches 0 there.
    steps_per_epoch: converts boundaries given in epochs to steps.
  """
  mask = True if opt_cfg.decay_bn_and_bias else weight_decay_mask

  def transformation(learning_rate, schedule_factor, momentum, weight_decay):
    lr = learning_rate * schedule_factor
    if opt_cfg.name == "lars":
      # optax.lars decays before the trust ratio (coupled), as You et al. 2017.
      update = optax.lars(lr, weight_decay, weight_decay_mask=mask,
                          trust_coefficient=opt_cfg.lars_trust_coefficient,
                          trust_ratio_mask=mask, momentum=momentum, nesterov=opt_cfg.nesterov)
    else:
      update = _sgd(lr, momentum, weight_decay, nesterov=opt_cfg.nesterov,
                    decoupled=opt_cfg.weight_decay_mode == "decoupled", mask=mask)
    if opt_cfg.grad_clip_norm > 0:
      return optax.chain(optax.clip_by_global_norm(opt_cfg.grad_clip_norm), update)
    return update

  return optax.inject_hyperparams(transformation, hyperparam_dtype=jnp.float32)(
      learning_rate=float(peak_learning_rate(opt_cfg, batch_size)),
      schedule_factor=_schedule_factor_fn(opt_cfg, num_steps=num_steps,
                                          steps_per_epoch=steps_per_epoch),
      momentum=float(opt_cfg.momentum),
      weight_decay=float(opt_cfg.weight_decay))


def _hyperparams(opt_state) -> dict[str, jax.Array]:
  """The injected hyperparameters, wherever the state nests them (e.g. under optax.MultiSteps)."""
  hyperparams = optax.tree_utils.tree_get(opt_state, "hyperparams")
  if hyperparams is None:
    raise ValueError("opt_state holds no injected hyperparameters; build the optimizer with "
                     "resnet_jax.optim.create_optimizer")
  return hyperparams


def current_learning_rate(opt_state) -> jax.Array:
  """The learning rate the most recent update used: float32 scalar ([P] for a population).

  On a fresh state it is the lr the first update will use. Right after `set_hyperparams` it is
  the new peak times the schedule factor of the most recent update.
  """
  hyperparams = _hyperparams(opt_state)
  return hyperparams["learning_rate"] * hyperparams["schedule_factor"]


def set_hyperparams(opt_state, **values):
  """A copy of `opt_state` with injected hyperparameters replaced, e.g. `learning_rate=0.05`.

  Values are cast and broadcast to the stored dtype and shape, so a jitted update that takes the
  state is not retraced. `learning_rate` is the peak that the schedule multiplies.

  Raises:
    ValueError: for a name outside HYPERPARAMS, or a value that does not broadcast.
  """
  unknown = sorted(set(values) - set(HYPERPARAMS))
  if unknown:
    raise ValueError(f"unknown hyperparameter(s) {', '.join(unknown)}; "
                     f"allowed: {', '.join(HYPERPARAMS)}")
  current = _hyperparams(opt_state)
  replaced = {}
  for name, value in values.items():
    old = current[name]
    try:
      replaced[name] = jnp.broadcast_to(jnp.asarray(value, dtype=old.dtype), old.shape)
    except ValueError as e:
      raise ValueError(f"{name} must broadcast to shape {old.shape}; "
                       f"got shape {jnp.shape(value)}") from e
  return optax.tree_utils.tree_set(opt_state, **replaced)
