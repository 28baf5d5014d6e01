"""The one place that builds a training step: `build(config, info, mesh) -> Trainer`.

From a validated config, a dataset description and a device mesh, `build` makes the model, the
optimizer, the batch source, the initial (or restored) state, and the jitted train and eval
steps. The run (train.py), the benchmark (experiments/bench.py) and the tests all use it; nothing
else binds `steps.train_step` to a model.

The train step is `(state, totals, inputs) -> (state, totals, diagnostics)`: it takes its batch
from the source (`source.train_batch(inputs, state)`, e.g. a gather from the split held on the
devices), makes one SGD update and adds the batch's summed metrics to the running totals, so the
host syncs only at log points. State and totals are donated; everything is replicated on the
mesh but the batch, which is sharded on its `data` axis (parallel.py). A second variant also
returns the per-block diagnostics (diagnostics.py); the plain one never computes them. Built for
a population (`population=P`, population.py), the step is vmapped over P runs' stacked states.

On accelerators a call runs up to `steps_per_call` steps (AUTO_STEPS_PER_CALL on GPU and TPU):
a loop in one program, the step count an input, so K steps in one call are bitwise K calls of
one step, and the host stays out between steps of a launch-bound ResNet. On CPU a call is one
step: XLA's CPU convolutions lose their fast path inside a loop (the README has the figures).

The instruments (instruments.py) are programs of their own, jitted only when the config turns
them on, so the train step is the same program with them on or off (`Trainer.measure`).

A Trainer is immutable: its programs are jitted in `build` and compile on their first call
(compilation.CompileClock times that); `for_config` copies and jax.jit's cache share the code.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from resnet_jax import (checkpoints, data, instruments, models, optim, parallel, sources,
                        steps)
from resnet_jax import config as config_lib
from resnet_jax import population as population_lib

DIAGNOSTICS_KEYS = ("grad_norm", "activation_rms")
# Steps per call where config.steps_per_call is 0 and the platform is not a CPU (the README has
# the GPU measurement behind it).
AUTO_STEPS_PER_CALL = 20


def program_key(config: ml_collections.ConfigDict) -> str:
  """What a config's compiled programs depend on: the config without its step inputs and
  bookkeeping (config.ROLES). Configs with equal keys share one Trainer's programs
  (Trainer.for_config)."""
  fields = config_lib.flatten(config)
  for name in config_lib.fields("step_input") + config_lib.fields("bookkeeping"):
    fields.pop(name, None)
  return repr(sorted(fields.items()))


class Cache:
  """Trainers of recent configs, for one process training several: a config whose
  program_key matches one of them gets it (for_config) instead of compiling anew. Keeps the
  trainers (one run's, populations') of the `size` most recent program keys; those of one key
  share a source, which holds its dataset on the devices."""

  def __init__(self, size: int = 2):
    self._size = size
    self._trainers: dict[tuple[str, int], Trainer] = {}

  def build(self, config: ml_collections.ConfigDict, info: data.DatasetInfo,
            mesh: jax.sharding.Mesh, *, population: int = 0) -> Trainer:
    """`build(config, info, mesh, population=population)`, or a cached trainer for it."""
    key = (program_key(config), population)
    trainer = self._trainers.pop(key, None)
    streamed = config.dataset.name in data.STREAMED  # A stream's source is one run's.
    if trainer is None or trainer.mesh != mesh or streamed:
      source = None if streamed else next(
          (t.source for (k, _), t in self._trainers.items() if k == key[0] and t.mesh == mesh),
          None)
      trainer = build(config, info, mesh, source, population=population)
    self._trainers[key] = trainer
    # The most recent program key's trainers last; the oldest keys' forgotten.
    order = list(dict.fromkeys([k for k, _ in self._trainers if k != key[0]] + [key[0]]))
    self._trainers = {(k, p): t for k in order[-self._size:]
                      for (k2, p), t in self._trainers.items() if k2 == k}
    return trainer.for_config(config)


def resolve_steps_per_call(config: ml_collections.ConfigDict, platform: str | None = None) -> int:
  """config.steps_per_call, or when it is 0 the platform's choice: 1 on CPU, else
  AUTO_STEPS_PER_CALL. `platform` defaults to jax.default_backend()."""
  if config.steps_per_call:
    return config.steps_per_call
  return 1 if (platform or jax.default_backend()) == "cpu" else AUTO_STEPS_PER_CALL


@dataclasses.dataclass(frozen=True)
class Trainer:
  """The model, optimizer, batch source and jitted programs of one config; made by `build`.

  A state is one run's (`population` 0) or `population` runs' stacked on a leading axis; so are
  the totals. `stack`, `member` and `learning_rates` hide which, so that one loop (train.py)
  drives either.
  """
  config: ml_collections.ConfigDict
  model: Any  # A flax.linen Module (models.get_model).
  tx: Any  # The optax.GradientTransformation (optim.create_optimizer).
  mesh: jax.sharding.Mesh
  source: sources.Source
  population: int  # 0: one run; P > 0: P runs, trained by one vmapped program.
  steps_per_call: int  # The most steps one call runs (resolve_steps_per_call).
  # (seed int32 [], {hyperparameter: float32 []}) -> the initial state of that seed with those
  # optimizer hyperparameters (optim.HYPERPARAMS), on the mesh: init_state() gives the config's.
  init_program: Any
  abstract_state: steps.TrainState  # One run's shapes, dtypes and shardings, for restoring.
  # The jitted train programs. One run: (state, totals, inputs) -> (state, totals, {}) for one
  # step; with steps_per_call > 1 also `loop_program`, (state, totals, inputs, count) -> the
  # same after `count` <= steps_per_call steps. A population: `train_program` is (state,
  # totals, inputs, active, count) -> (state, totals), count steps of the members whose
  # `active` (bool [P]) is set; the others keep their state and totals.
  train_program: Any
  loop_program: Any  # None when steps_per_call is 1, and for populations.
  # (state, totals, inputs) -> (state, totals, per-block norms): the step with diagnostics.
  diagnostics_program: Any  # None for populations (they record none).
  loop_spec: Any  # The loop program's inputs' specs (the source's, stacked if per step).
  stack_program: Any  # Stacks steps_per_call batches of a source that hands them out per step.
  eval_program: Any  # (state, totals, eval inputs) -> totals, vmapped for a population.
  # steps.eval_step bound to the model and normalisation, unjitted: (state, batch) -> metrics.
  eval_step: Callable[[steps.TrainState, dict], dict]
  counts: tuple[jax.Array, ...]  # counts[k]: k as the replicated int32 the programs take.
  # Each instrument that is on (instruments.INSTRUMENTS) -> its jitted programs, by name.
  instrument_programs: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)

  def init_state(self) -> steps.TrainState:
    """The initial state of config.seed, with config's learning rate, momentum and weight decay
    in the optimizer state (a trainer shared by points that differ in them: for_config)."""
    opt = self.config.optimizer
    hyperparams = {"learning_rate": optim.peak_learning_rate(opt, self.config.batch_size),
                   "momentum": opt.momentum, "weight_decay": opt.weight_decay}
    return self.init_program(np.int32(self.config.seed),
                             {k: np.float32(v) for k, v in hyperparams.items()})

  def for_config(self, config: ml_collections.ConfigDict) -> Trainer:
    """This trainer, programs and source shared, for a config that differs from its own only in
    the step's inputs and bookkeeping (program_key(config) is the same): another point of a
    sweep, at another learning rate, momentum, weight decay or seed. Raises ValueError for a
    config that needs other programs."""
    if program_key(config) != program_key(self.config):
      raise ValueError("this trainer's programs do not run this config: they differ in "
                       "more than " + ", ".join(config_lib.fields("step_input")))
    return dataclasses.replace(self, config=config)

  def restore_or_init(self, checkpoint_dir: str) -> checkpoints.Restored:
    """One run's newest intact checkpoint in `checkpoint_dir` whose config matches, with the
    source's items (a Grain iterator's position) restored into the source; else the initial
    state at step 0. Raises what checkpoints.restore_latest raises."""
    restored = checkpoints.restore_latest(checkpoint_dir, self.abstract_state, self.config,
                                          self.source.checkpoint_items(restore=True))
    if restored is None:
      return checkpoints.Restored(step=0, state=self.init_state(), wall_time_s=0.0)
    return restored

  def stack(self, trees: list) -> Any:
    """The runs' states (or totals) as this trainer's programs take them."""
    return population_lib.stack(trees) if self.population else trees[0]

  def member(self, tree: Any, index: int) -> Any:
    """Run `index`'s part of a state or totals (as numpy if `tree` is)."""
    return population_lib.member(tree, index) if self.population else tree

  def learning_rates(self, state: steps.TrainState) -> np.ndarray:
    """The learning rate each run's next step takes, on the host: float32 [runs]."""
    return np.atleast_1d(parallel.to_host(optim.current_learning_rate(state.opt_state)))

  def zero_totals(self, *, count_nonfinite: bool = True) -> dict:
    """Zeroed sums of steps.summed_metrics on the mesh, one per run; train totals also count
    steps whose loss was NaN or Inf (`nonfinite`)."""
    zeros = {"loss": np.float32(0), "errors": np.float32(0), "count": np.float32(0)}
    if count_nonfinite:
      zeros["nonfinite"] = np.int32(0)
    zeros = parallel.put_replicated(zeros, self.mesh)
    return population_lib.stack([zeros] * self.population) if self.population else zeros

  def train(self, state: steps.TrainState, totals: dict, *, steps: int = 1,
            with_diagnostics: bool = False,
            active: jax.Array | None = None) -> tuple[steps.TrainState, dict, dict]:
    """`steps` steps (1 <= steps <= steps_per_call; 1 with diagnostics) on the source's next
    batches, in one call: (state, totals, diagnostics or {}). A population trains the members
    whose `active` (bool [P] on the mesh; default all) is set."""
    if not 1 <= steps <= (1 if with_diagnostics else self.steps_per_call):
      raise ValueError(f"a call runs 1 to {self.steps_per_call} steps, 1 with diagnostics; "
                       f"got {steps}")
    if self.population:
      if with_diagnostics:
        raise ValueError("a population records no diagnostics")
      if active is None:
        active = parallel.put_replicated(np.ones(self.population, bool), self.mesh)
      return (*self.train_program(state, totals, self.source.train_inputs(), active,
                                  self.counts[steps]), {})
    if with_diagnostics:
      return self.diagnostics_program(state, totals, self.source.train_inputs())
    if self.loop_program is None:
      return self.train_program(state, totals, self.source.train_inputs())
    return self.loop_program(state, totals, self._loop_inputs(steps), self.counts[steps])

  def _loop_inputs(self, steps: int):
    """The loop program's inputs for `steps` steps: the source's inputs, or, for a source that
    hands out a batch per step, steps_per_call of them stacked (the last repeated, unused)."""
    if not self.source.stacks_steps:
      return self.source.train_inputs()
    batches = [self.source.train_inputs() for _ in range(steps)]
    return self.stack_program(*batches, *batches[-1:] * (self.steps_per_call - steps))

  def evaluate(self, state: steps.TrainState) -> dict:
    """Summed loss, errors and count over the eval split, as numpy on the host (stacked for a
    population: `member` gives each run's)."""
    totals = self.zero_totals(count_nonfinite=False)
    for inputs in self.source.eval_inputs():
      totals = self.eval_program(state, totals, inputs)
    return parallel.to_host(totals)

  def save_items(self) -> dict:
    """The source's extra checkpoint items (a Grain iterator's position)."""
    return self.source.checkpoint_items(restore=False)

  def measure(self, name: str, state: steps.TrainState) -> dict[str, Any]:
    """Instrument `name`'s measurement of the network of `state`: its event's fields
    (instruments.py). Raises ValueError when its config field is 0 (its programs were not
    made) or the source cannot draw its batches."""
    instrument = instruments.INSTRUMENTS[name]
    if name not in self.instrument_programs:
      raise ValueError(f"this trainer measures no {name}: its config.{instrument.every} is 0")
    lr = float(self.learning_rates(state)[0])
    return instrument.measure(self.config, self.instrument_programs[name], self.source, state,
                              lr)


def build(config: ml_collections.ConfigDict, info: data.DatasetInfo, mesh: jax.sharding.Mesh,
          source: sources.Source | None = None, *, population: int = 0) -> Trainer:
  """The Trainer of a validated (and epoch-resolved) config.

  Args:
    config: the run config; trusted (config.validate has passed).
    info: the dataset's classes, image shape, split sizes and normalisation.
    mesh: the device mesh (parallel.make_mesh()).
    source: where batches come from; default `sources.make_source(config, info, mesh)`.
    population: 0 for one run's programs; P > 0 for P runs' at once (population.py).
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

  def loop(state, totals, inputs, count):
    def body(i, carry):
      step_inputs = jax.tree.map(lambda x: x[i], inputs) if source.stacks_steps else inputs
      return train(*carry, step_inputs, with_diagnostics=False)[:2]

    state, totals = jax.lax.fori_loop(0, count, body, (state, totals))
    return state, totals, {}

  def evaluate(state, totals, inputs):
    return jax.tree.map(jnp.add, totals, eval_step(state, source.eval_batch(inputs)))

  replicated = parallel.replicated(mesh)
  steps_per_call = resolve_steps_per_call(config)
  loop_spec, stack = source.train_spec, None
  if source.stacks_steps:
    loop_spec = jax.tree.map(
        lambda s: jax.ShapeDtypeStruct((steps_per_call, *s.shape), s.dtype,
                                       sharding=_stacked_sharding(s.sharding, mesh)),
        source.train_spec)
    stack = jax.jit(lambda *batches: jax.tree.map(lambda *xs: jnp.stack(xs), *batches),
                    out_shardings=jax.tree.map(lambda s: s.sharding, loop_spec))
  def create_state(seed, hyperparams):
    state = steps.create_train_state(model, tx, seed=seed, image_shape=info.image_shape)
    return state.replace(opt_state=optim.set_hyperparams(state.opt_state, **hyperparams))

  shapes = jax.eval_shape(create_state, np.int32(config.seed),
                          dict.fromkeys(optim.HYPERPARAMS, np.float32(0)))
  loss = functools.partial(batch_loss, model=model, **norm)
  measured = {name: instrument.programs(config, source, loss, mesh)
              for name, instrument in instruments.INSTRUMENTS.items()
              if config[instrument.every]}
  jit_step = lambda f: jax.jit(f, donate_argnums=(0, 1), out_shardings=replicated)
  one_step = functools.partial(train, with_diagnostics=False)
  if population:
    programs = dict(
        train_program=jit_step(population_lib.vmapped_steps(one_step, steps_per_call)),
        loop_program=None, diagnostics_program=None,
        eval_program=jax.jit(population_lib.vmapped_eval(source.eval_batch, eval_step),
                             donate_argnums=(1,), out_shardings=replicated))
  else:
    programs = dict(
        train_program=jit_step(one_step),
        loop_program=jit_step(loop) if steps_per_call > 1 else None,
        diagnostics_program=jit_step(functools.partial(train, with_diagnostics=True)),
        eval_program=jax.jit(evaluate, donate_argnums=(1,), out_shardings=replicated))
  return Trainer(
      config=config, model=model, tx=tx, mesh=mesh, source=source, population=population,
      steps_per_call=steps_per_call,
      init_program=jax.jit(create_state, out_shardings=replicated),
      abstract_state=jax.tree.map(
          lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated), shapes),
      loop_spec=loop_spec, stack_program=stack, eval_step=eval_step,
      counts=tuple(parallel.put_replicated(np.int32(k), mesh)
                   for k in range(steps_per_call + 1)),
      instrument_programs=measured, **programs)


def batch_loss(params, batch_stats, batch: dict[str, jax.Array], *, model, mean, std,
               dtype) -> jax.Array:
  """steps.training_loss of a batch of uint8 images, as a function of `params` alone: float32
  scalar; BatchNorm's updated statistics are dropped."""
  images = data.normalize(batch["image"], mean, std, dtype)
  return steps.training_loss(params, batch_stats, images, batch["label"], model=model)[0]


def _stacked_sharding(sharding: jax.sharding.Sharding, mesh) -> jax.sharding.NamedSharding:
  """`sharding` of one batch array with a leading (steps) axis added, not split."""
  spec = sharding.spec if isinstance(sharding, jax.sharding.NamedSharding) else ()
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, *spec))


def _accumulate(totals: dict, metrics: dict) -> dict:
  """Adds a step's summed metrics to the running totals, counting non-finite losses."""
  out = {k: totals[k] + metrics[k] for k in ("loss", "errors", "count")}
  out["nonfinite"] = totals["nonfinite"] + (~jnp.isfinite(metrics["loss"])).astype(jnp.int32)
  return out
