"""The one place that builds a training step: `build(config, info, mesh) -> Trainer`.

From a validated config, a dataset description and a device mesh, `build` makes the model, the
optimizer, the batch source, the initial (or restored) state, and the compiled train and eval
steps. The run (train.py), the benchmark (experiments/bench.py) and the tests all use it; nothing
else binds `steps.train_step` to a model.

The compiled train step is `(state, totals, inputs) -> (state, totals, diagnostics)`: it takes its
batch from the source (`source.train_batch(inputs, state)`, e.g. a gather from the split held on
the devices), makes one SGD update and adds the batch's summed metrics to the running totals, so
the host syncs only at log points. State and totals are donated; everything is replicated on
the mesh but the batch, which is sharded on its `data` axis (see parallel.py). A second variant
also returns the per-block diagnostics (diagnostics.py); the plain one never computes them.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from resnet_jax import checkpoints, data, models, optim, parallel, sources, steps
from resnet_jax import config as config_lib

DIAGNOSTICS_KEYS = ("grad_norm", "activation_rms")


@dataclasses.dataclass(frozen=True)
class Trainer:
  """The model, optimizer, batch source and compiled steps of one config; made by `build`."""
  config: ml_collections.ConfigDict
  model: Any  # A flax.linen Module (models.get_model).
  tx: Any  # The optax.GradientTransformation (optim.create_optimizer).
  mesh: jax.sharding.Mesh
  source: Any  # A batch source (sources.py).
  init_state: Callable[[], steps.TrainState]  # The initial state from config.seed, on the mesh.
  abstract_state: steps.TrainState  # Its shapes, dtypes and shardings, for restoring.
  # with_diagnostics -> the jitted train step; `compile` swaps in the compiled plain one.
  train_programs: dict[bool, Any]
  eval_program: Any  # The jitted eval step: (state, totals, eval inputs) -> totals.

  def restore_or_init(self, checkpoint_dir: str) -> checkpoints.Restored:
    """The newest intact checkpoint in `checkpoint_dir` whose config matches, with the source's
    items (a Grain iterator's position) restored into the source; else the initial state at
    step 0. Raises what checkpoints.restore_latest raises."""
    restored = checkpoints.restore_latest(checkpoint_dir, self.abstract_state, self.config,
                                          self.source.checkpoint_items(restore=True))
    if restored is None:
      return checkpoints.Restored(step=0, state=self.init_state(), wall_time_s=0.0)
    return restored

  def zero_totals(self, *, count_nonfinite: bool = True) -> dict:
    """Zeroed sums of steps.summed_metrics on the mesh; train totals also count steps whose loss
    was NaN or Inf (`nonfinite`)."""
    zeros = {"loss": np.float32(0), "errors": np.float32(0), "count": np.float32(0)}
    if count_nonfinite:
      zeros["nonfinite"] = np.int32(0)
    return parallel.put_replicated(zeros, self.mesh)

  def compile(self, state: steps.TrainState, totals: dict) -> float:
    """Compiles the plain train step ahead of the first step; returns the seconds it took."""
    start = time.time()
    self.train_programs[False] = (
        self.train_programs[False].lower(state, totals, self.source.train_spec).compile())
    return time.time() - start

  def train(self, state: steps.TrainState, totals: dict, *, with_diagnostics: bool = False
            ) -> tuple[steps.TrainState, dict, dict]:
    """One step on the source's next batch: (state, totals, diagnostics or {})."""
    return self.train_programs[with_diagnostics](state, totals, self.source.train_inputs())

  def evaluate(self, state: steps.TrainState) -> dict:
    """Summed loss, errors and count over the eval split, as numpy on the host."""
    totals = self.zero_totals(count_nonfinite=False)
    for inputs in self.source.eval_inputs():
      totals = self.eval_program(state, totals, inputs)
    return parallel.to_host(totals)

  def save_items(self) -> dict:
    """The source's extra checkpoint items (a Grain iterator's position)."""
    return self.source.checkpoint_items(restore=False)


def build(config: ml_collections.ConfigDict, info: data.DatasetInfo, mesh: jax.sharding.Mesh,
          source: Any = None) -> Trainer:
  """The Trainer of a validated (and epoch-resolved) config.

  Args:
    config: the run config; trusted (config.validate has passed).
    info: the dataset's classes, image shape, split sizes and normalisation.
    mesh: the device mesh (parallel.make_mesh()).
    source: where batches come from; default `sources.make_source(config, info, mesh)`.
  """
  model = models.get_model(num_classes=info.num_classes, **config.model)
  tx = optim.create_optimizer(config.optimizer, batch_size=config.batch_size,
                              num_steps=config.num_steps,
                              steps_per_epoch=config_lib.steps_per_epoch(info.num_train,
                                                                      config.batch_size))
  source = source if source is not None else sources.make_source(config, info, mesh)
  norm = dict(mean=tuple(info.mean), std=tuple(info.std), dtype=jnp.dtype(config.model.dtype))
  train_step = functools.partial(steps.train_step, model=model, tx=tx, **norm)
  eval_step = functools.partial(steps.eval_step, model=model, **norm)

  def train(state, totals, inputs, *, with_diagnostics):
    state, metrics = train_step(state, source.train_batch(inputs, state),
                                with_diagnostics=with_diagnostics)
    diag = {k: metrics.pop(k) for k in DIAGNOSTICS_KEYS if k in metrics}
    return state, _accumulate(totals, metrics), diag

  def evaluate(state, totals, inputs):
    return jax.tree.map(jnp.add, totals, eval_step(state, source.eval_batch(inputs)))

  replicated = parallel.replicated(mesh)
  create_state = functools.partial(steps.create_train_state, model, tx, seed=config.seed,
                                   image_shape=info.image_shape)
  shapes = jax.eval_shape(create_state)
  return Trainer(
      config=config, model=model, tx=tx, mesh=mesh, source=source,
      init_state=jax.jit(create_state, out_shardings=replicated),
      abstract_state=jax.tree.map(
          lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated), shapes),
      train_programs={flag: jax.jit(functools.partial(train, with_diagnostics=flag),
                                    donate_argnums=(0, 1), out_shardings=replicated)
                      for flag in (False, True)},
      eval_program=jax.jit(evaluate, donate_argnums=(1,), out_shardings=replicated))


def _accumulate(totals: dict, metrics: dict) -> dict:
  """Adds a step's summed metrics to the running totals, counting non-finite losses."""
  out = {k: totals[k] + metrics[k] for k in ("loss", "errors", "count")}
  out["nonfinite"] = totals["nonfinite"] + (~jnp.isfinite(metrics["loss"])).astype(jnp.int32)
  return out
