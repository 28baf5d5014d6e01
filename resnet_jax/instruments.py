"""Instruments: measurements of the network during training, each made by programs of its own
beside the train step, so that the step is the same program with every instrument on or off.

An `Instrument` names its config field (k > 0: measured after 0, k, 2k, ... updates; its
`config.ROLES` entry says resumable, an interval, and alone), its metrics.jsonl event, the
programs `trainer.build` jits for it when it is on, and how it measures one state. `INSTRUMENTS`
lists them; the trainer and the loop (train.py) read nothing else. Each draws un-augmented
training examples (`source.measure_batch`) from a key stream of its own, so a measurement is a
pure function of (seed, step, state): a resumed run records what an uninterrupted one does.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.flatten_util import ravel_pytree

from resnet_jax import curvature, parallel, reporting, sources

# fold_in tags of the instruments' key streams, apart from the batch order's (epochs) and the
# augmentation's (data.AUGMENT_STREAM = 2**31 - 1).
SHARPNESS_STREAM = 2**31 - 2
NOISE_SCALE_STREAM = 2**31 - 3

# loss(params, batch_stats, batch) -> the training loss of a uint8 batch, float32 [] (trainer.py).
Loss = Callable[[Any, Any, dict], jax.Array]


@dataclasses.dataclass(frozen=True)
class Instrument:
  """One instrument; see the module's docstring."""
  every: str  # Its config field: k > 0 measures every k steps; 0 turns it off.
  event: str  # The kind of the metrics.jsonl event it writes (reporting.py).
  # (config, source, loss, mesh) -> its jitted programs, by name.
  programs: Callable[[ml_collections.ConfigDict, sources.Source, Loss, Any], dict[str, Any]]
  # (config, programs, source, state, lr) -> the event's fields; raises ValueError where the
  # source cannot draw its batches.
  measure: Callable[..., dict[str, Any]]


def _stream(seed: jax.Array, tag: int) -> jax.Array:
  """The key stream `tag` of a run's seed."""
  return jax.random.fold_in(jax.random.key(seed), tag)


def sharpness_programs(config: ml_collections.ConfigDict, source: sources.Source, loss: Loss,
                       mesh) -> dict[str, Any]:
  """"inputs": (state, measure inputs) -> (the fixed batch, Lanczos's start float32 [n]);
  "hvp": (params, batch_stats, batch, tangent [n]) -> H @ tangent [n]."""
  size = config.sharpness_batch_size or config.batch_size

  def inputs(state, measure_inputs):
    batch_key, start_key = jax.random.split(_stream(state.seed, SHARPNESS_STREAM))
    flat = ravel_pytree(state.params)[0]
    start = jax.random.normal(jax.random.fold_in(start_key, state.step), flat.shape, flat.dtype)
    return source.measure_batch(measure_inputs, batch_key, size), start

  def hvp(params, batch_stats, batch, tangent):
    return curvature.hessian_vector_product(lambda p: loss(p, batch_stats, batch), params,
                                            tangent)

  replicated = parallel.replicated(mesh)
  return {"inputs": jax.jit(inputs, out_shardings=(parallel.batch_sharded(mesh), replicated)),
          "hvp": jax.jit(hvp, out_shardings=replicated)}


def measure_sharpness(config: ml_collections.ConfigDict, programs: dict[str, Any],
                      source: sources.Source, state, lr: float) -> dict[str, Any]:
  """The largest config.sharpness_top eigenvalues of the training loss's Hessian at `state`.

  The loss is steps.training_loss on config.sharpness_batch_size (0: batch_size) un-augmented
  training examples, the same ones at every measurement (drawn by the seed's SHARPNESS_STREAM
  alone, whatever the step). Lanczos (curvature.lanczos) makes config.sharpness_iters
  Hessian-vector products, starting from a direction drawn for `state.step`. The event has the
  top Ritz value ("sharpness"), the top ones, descending ("eigenvalues": fewer only when the
  Krylov space closes first), how far each may be from an eigenvalue ("bounds",
  curvature.ritz_bounds), the smallest Ritz value ("lowest": when it is far larger in size than
  the top one, the negative end dominates and the top one is a loose lower bound), and the
  optimiser's stability threshold at `lr` ("threshold").
  """
  batch, start = programs["inputs"](state, source.measure_inputs())
  product = lambda tangent: programs["hvp"](state.params, state.batch_stats, batch, tangent)
  values, bounds = curvature.ritz_bounds(*curvature.lanczos(product, start,
                                                             config.sharpness_iters))
  top = config.sharpness_top
  eigenvalues = [float(v) for v in values[:top]]
  opt = config.optimizer
  # LARS rescales each layer's step by its own trust ratio: no one threshold in η applies.
  threshold = (curvature.stability_threshold(lr, opt.momentum, opt.nesterov)
               if opt.name == "sgd" else None)
  return {"sharpness": eigenvalues[0], "eigenvalues": eigenvalues,
          "bounds": [float(b) for b in bounds[:top]], "lowest": float(values[-1]),
          "threshold": threshold}


def noise_scale_programs(config: ml_collections.ConfigDict, source: sources.Source, loss: Loss,
                         mesh) -> dict[str, Any]:
  """"batches": (state, measure inputs) -> two independent batches of batch_size drawn for the
  step; "products": (params, batch_stats, batches) -> (G¹·G², |G¹ - G²|²), float32 [] each, G¹ and
  G² the gradients of the loss on the two batches."""

  def batches(state, measure_inputs):
    key = jax.random.fold_in(_stream(state.seed, NOISE_SCALE_STREAM), state.step)
    return [source.measure_batch(measure_inputs, jax.random.fold_in(key, i), config.batch_size)
            for i in range(2)]

  def products(params, batch_stats, batches):
    first, second = (jax.grad(loss)(params, batch_stats, batch) for batch in batches)
    # The difference's norm, not |G¹|² + |G²|² - 2 G¹·G²: near a minimum those cancel.
    return (optax.tree.vdot(first, second),
            optax.tree.norm(jax.tree.map(jnp.subtract, first, second), squared=True))

  return {"batches": jax.jit(batches, out_shardings=parallel.batch_sharded(mesh)),
          "products": jax.jit(products, out_shardings=parallel.replicated(mesh))}


def measure_noise_scale(config: ml_collections.ConfigDict, programs: dict[str, Any],
                        source: sources.Source, state, lr: float) -> dict[str, Any]:
  """The simple gradient noise scale at `state` (curvature.noise_scale_estimates).

  G¹ and G² are the gradients of steps.training_loss (BN in train mode over each batch, as a
  training step sees it) on two independent batches of batch_size un-augmented training examples
  drawn for `state.step`. Returns the estimates {"grad_sq_norm" (of |E G_B|²), "trace_cov" (of
  B tr Cov(G_B)), "b_simple" (their ratio)} and "batch_size" (B).
  """
  del lr
  batches = programs["batches"](state, source.measure_inputs())
  cross, diff_sq = parallel.to_host(programs["products"](state.params, state.batch_stats,
                                                         batches))
  estimates = curvature.noise_scale_estimates(float(cross), float(diff_sq), config.batch_size)
  return {**estimates, "batch_size": config.batch_size}


INSTRUMENTS: dict[str, Instrument] = {
    "sharpness": Instrument("sharpness_every", reporting.SHARPNESS, sharpness_programs,
                            measure_sharpness),
    "noise_scale": Instrument("noise_scale_every", reporting.NOISE_SCALE, noise_scale_programs,
                              measure_noise_scale),
}


def due(config: ml_collections.ConfigDict, step: int) -> list[str]:
  """The instruments that measure the network after `step` updates, in INSTRUMENTS' order."""
  return [name for name, instrument in INSTRUMENTS.items()
          if config[instrument.every] and step % config[instrument.every] == 0]
