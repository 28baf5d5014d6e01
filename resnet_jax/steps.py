"""The train state and the pure steps: `train_step(state, batch) -> (state, metrics)`, `eval_step`.

Nothing here is compiled or placed on devices: `trainer.build` binds the model, the optimizer and
the input normalisation to these functions and jits them over the mesh, once.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from resnet_jax import data, diagnostics


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training. All leaves are arrays, replicated on the mesh."""
  step: jax.Array  # int32 []: updates applied so far.
  params: Any
  batch_stats: Any
  opt_state: Any
  seed: jax.Array  # int32 []: data order and augmentation; an input, not a compiled constant.


def create_train_state(model, tx: optax.GradientTransformation, *, seed: int,
                       image_shape: tuple[int, int, int]) -> TrainState:
  """Initialises parameters, BN statistics and optimizer state from `seed`."""
  variables = model.init(jax.random.key(seed), jnp.zeros((1, *image_shape)), train=False)
  params = variables["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params),
                    seed=jnp.asarray(seed, jnp.int32))


def count_params(params) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """The loss of each example: softmax cross-entropy in float32, [B] from logits [B, classes]."""
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)


def training_loss(params, batch_stats, images: jax.Array, labels: jax.Array, *, model,
                  mutable=("batch_stats",)) -> tuple[jax.Array, tuple[jax.Array, dict]]:
  """The loss the train step descends, as a function of `params`: (the batch's mean
  cross-entropy, (logits, the `mutable` collections' updates)).

  BatchNorm runs in train mode, on the batch's own statistics; the running statistics
  `batch_stats` go unused. Weight decay is the optimizer's (optim.py), not a term here.
  images: normalised [B, H, W, C] (data.normalize); labels: int32 [B].
  """
  logits, updates = model.apply({"params": params, "batch_stats": batch_stats}, images,
                                train=True, mutable=list(mutable))
  return jnp.mean(cross_entropy(logits, labels)), (logits, updates)


def summed_metrics(logits: jax.Array, labels: jax.Array, mask: jax.Array | None = None
                   ) -> dict[str, jax.Array]:
  """Sums over the batch (so they add up across steps): loss, top-1 errors, examples.

  logits: float [B, classes]; labels: int32 [B]; mask: bool [B], False for padding.
  """
  losses = cross_entropy(logits, labels)
  errors = (jnp.argmax(logits, -1) != labels).astype(jnp.float32)
  weight = jnp.ones_like(losses) if mask is None else mask.astype(jnp.float32)
  return {"loss": jnp.sum(losses * weight), "errors": jnp.sum(errors * weight),
          "count": jnp.sum(weight)}


def train_step(state: TrainState, batch: dict[str, jax.Array], *, model, tx, mean, std, dtype,
               with_diagnostics: bool = False) -> tuple[TrainState, dict[str, Any]]:
  """One SGD update on the global batch.

  batch: {"image": uint8 [B, H, W, C] (already augmented), "label": int32 [B]}.
  Returns the new state and summed metrics; with `with_diagnostics`, also the per-block gradient
  norms and activation RMS (a separately compiled variant: the plain step is unchanged).
  """
  images = data.normalize(batch["image"], mean, std, dtype)
  mutable = ("batch_stats", "intermediates") if with_diagnostics else ("batch_stats",)
  loss_fn = lambda params: training_loss(params, state.batch_stats, images, batch["label"],
                                         model=model, mutable=mutable)
  (_, (logits, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  param_updates, opt_state = tx.update(grads, state.opt_state, state.params)
  new_state = state.replace(step=state.step + 1,
                            params=optax.apply_updates(state.params, param_updates),
                            batch_stats=updates["batch_stats"], opt_state=opt_state)
  metrics = summed_metrics(logits, batch["label"])
  if with_diagnostics:
    metrics["grad_norm"] = diagnostics.block_grad_norms(grads)
    metrics["activation_rms"] = diagnostics.block_activation_rms(updates["intermediates"])
  return new_state, metrics


def eval_step(state: TrainState, batch: dict[str, jax.Array], *, model, mean, std, dtype
              ) -> dict[str, jax.Array]:
  """Summed metrics of the running-average network on one padded batch (mask: bool [B])."""
  images = data.normalize(batch["image"], mean, std, dtype)
  logits = model.apply({"params": state.params, "batch_stats": state.batch_stats}, images,
                       train=False)
  return summed_metrics(logits, batch["label"], batch["mask"])
