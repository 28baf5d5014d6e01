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

On accelerators a call runs several steps (`config.steps_per_call`, automatically
AUTO_STEPS_PER_CALL on GPU and TPU, 1 on CPU): a loop inside one compiled program over up to K
steps, the step count an input, so one program serves every length and each step in it does
the same arithmetic whatever the length (K steps in one call are bitwise K calls of one step).
A ResNet-20 step at batch 128 is a few hundred small kernels, bound by launch latency; the loop
leaves the host out between steps. On CPU it stays one step per call: XLA's CPU convolutions
lose their fast path inside a loop (25x slower).

The instruments (curvature.py) are programs of their own beside the train step, jitted only when
the config turns them on, so the train step is the same program with them on or off:
`Trainer.sharpness(state)`, the top eigenvalues of the training loss's Hessian, and
`Trainer.noise_scale(state)`, the gradient noise scale. Each measures the network of `state` on
un-augmented training examples (`source.measure_batch`) drawn from a key stream of its own, so a
measurement is a pure function of (seed, step, state) and a resumed run records what an
uninterrupted one does.
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
import optax
from jax.flatten_util import ravel_pytree

from resnet_jax import checkpoints, curvature, data, models, optim, parallel, sources, steps
from resnet_jax import config as config_lib

DIAGNOSTICS_KEYS = ("grad_norm", "activation_rms")
# fold_in tags of the instruments' key streams, apart from the batch order's (epochs) and the
# augmentation's (data.AUGMENT_STREAM = 2**31 - 1).
SHARPNESS_STREAM = 2**31 - 2
NOISE_SCALE_STREAM = 2**31 - 3
# Steps per call where config.steps_per_call is 0 and the platform is not a CPU: an H200 probe
# of ResNet-20 at batch 128 ran 10% faster with 20 steps per call than with one.
AUTO_STEPS_PER_CALL = 20


# The fields that are inputs of the compiled programs (in the state: optim.set_hyperparams, the
# seed), so that points differing only in them, or in bookkeeping, share programs.
STEP_INPUTS = ("seed", "optimizer.lr", "optimizer.momentum", "optimizer.weight_decay")
# Fields no compiled program depends on (the *_epochs ones are resolved into steps first).
_BOOKKEEPING = ("log_every", "eval_every", "checkpoint_every", "keep_checkpoints",
                "profile_steps", "progress_bar", "diagnostics_every", "num_epochs",
                "eval_every_epochs", "checkpoint_every_epochs")


def program_key(config: ml_collections.ConfigDict) -> str:
  """What a config's compiled programs depend on: the config without STEP_INPUTS and
  bookkeeping. Configs with equal keys share one Trainer's programs (Trainer.for_config)."""
  fields = config_lib.flatten(config)
  for name in STEP_INPUTS + _BOOKKEEPING:
    fields.pop(name, None)
  return repr(sorted(fields.items()))


class Cache:
  """Trainers of recent configs, for one process training several: a config whose
  program_key matches one of them gets it (for_config) instead of compiling anew. Keeps the
  `size` most recent, whose sources hold their datasets on the devices."""

  def __init__(self, size: int = 2):
    self._size = size
    self._trainers: dict[str, Trainer] = {}

  def build(self, config: ml_collections.ConfigDict, info: data.DatasetInfo,
            mesh: jax.sharding.Mesh) -> Trainer:
    """`build(config, info, mesh)`, or a cached trainer for it."""
    key = program_key(config)
    trainer = self._trainers.pop(key, None)
    if trainer is None or trainer.mesh != mesh or config.dataset.name in data.STREAMED:
      trainer = build(config, info, mesh)  # A stream's source is one run's: not shared.
    self._trainers[key] = trainer  # The most recent last.
    while len(self._trainers) > self._size:
      self._trainers.pop(next(iter(self._trainers)))
    return trainer.for_config(config)


def resolve_steps_per_call(config: ml_collections.ConfigDict, platform: str | None = None) -> int:
  """config.steps_per_call, or when it is 0 the platform's choice: 1 on CPU, else
  AUTO_STEPS_PER_CALL. `platform` defaults to jax.default_backend()."""
  if config.steps_per_call:
    return config.steps_per_call
  return 1 if (platform or jax.default_backend()) == "cpu" else AUTO_STEPS_PER_CALL


@dataclasses.dataclass(frozen=True)
class Trainer:
  """The model, optimizer, batch source and compiled steps of one config; made by `build`."""
  config: ml_collections.ConfigDict
  model: Any  # A flax.linen Module (models.get_model).
  tx: Any  # The optax.GradientTransformation (optim.create_optimizer).
  mesh: jax.sharding.Mesh
  source: Any  # A batch source (sources.py).
  # (seed int32 [], {hyperparameter: float32 []}) -> the initial state of that seed with those
  # optimizer hyperparameters (optim.HYPERPARAMS), on the mesh: init_state() gives the config's.
  init_program: Any
  abstract_state: steps.TrainState  # Its shapes, dtypes and shardings, for restoring.
  # The jitted train programs, by name: "plain" and "diagnostics", one step per call,
  # (state, totals, inputs) -> (state, totals, diagnostics or {}); with steps_per_call > 1 also
  # "loop", (state, totals, inputs, count) -> (state, totals, {}), running `count` <=
  # steps_per_call steps in one call. `compile` swaps in the compiled one plain steps use.
  train_programs: dict[str, Any]
  steps_per_call: int  # The most steps one call runs (resolve_steps_per_call).
  loop_spec: Any  # The loop program's inputs' specs (the source's, stacked if per step).
  stack_program: Any  # Stacks steps_per_call batches of a source that hands them out per step.
  eval_program: Any  # The jitted eval step: (state, totals, eval inputs) -> totals.
  # steps.eval_step bound to the model and normalisation, unjitted: (state, batch) -> metrics.
  eval_step: Callable[[steps.TrainState, dict], dict]
  # The one-step train function the programs jit, unjitted, for programs that wrap it (a
  # population's vmap, population.py): (state, totals, inputs, *, with_diagnostics) ->
  # (state, totals, diagnostics or {}).
  step_fn: Callable[..., tuple[steps.TrainState, dict, dict]]
  # "sharpness" and "noise_scale" -> that instrument's jitted programs, by name; only those on.
  instrument_programs: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
  # Step counts as replicated int32 arrays, made once each for the loop program.
  _counts: dict[int, jax.Array] = dataclasses.field(default_factory=dict)

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
                       "more than " + ", ".join(STEP_INPUTS))
    return dataclasses.replace(self, config=config)

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
    """Compiles the program plain steps run in (the loop when steps_per_call > 1) ahead of the
    first step; returns the seconds it took."""
    start = time.time()
    programs = self.train_programs
    if isinstance(programs["loop" if self.steps_per_call > 1 else "plain"], jax.stages.Compiled):
      return 0.0  # Compiled for a config before this one (for_config).
    if self.steps_per_call == 1:
      programs["plain"] = programs["plain"].lower(state, totals, self.source.train_spec).compile()
    else:
      programs["loop"] = programs["loop"].lower(state, totals, self.loop_spec,
                                                self.step_count(1)).compile()
    return time.time() - start

  def train(self, state: steps.TrainState, totals: dict, *, steps: int = 1,
            with_diagnostics: bool = False) -> tuple[steps.TrainState, dict, dict]:
    """`steps` steps (1 <= steps <= steps_per_call; 1 with diagnostics) on the source's next
    batches, in one call: (state, totals, diagnostics or {})."""
    if not 1 <= steps <= (1 if with_diagnostics else self.steps_per_call):
      raise ValueError(f"a call runs 1 to {self.steps_per_call} steps, 1 with diagnostics; "
                       f"got {steps}")
    if with_diagnostics or self.steps_per_call == 1:
      program = self.train_programs["diagnostics" if with_diagnostics else "plain"]
      return program(state, totals, self.source.train_inputs())
    return self.train_programs["loop"](state, totals, self._loop_inputs(steps),
                                       self.step_count(steps))

  def step_count(self, steps: int) -> jax.Array:
    """`steps` as the replicated int32 a loop program takes, made once per value."""
    if steps not in self._counts:
      self._counts[steps] = parallel.put_replicated(np.int32(steps), self.mesh)
    return self._counts[steps]

  def _loop_inputs(self, steps: int):
    """The loop program's inputs for `steps` steps: the source's inputs, or, for a source that
    hands out a batch per step, steps_per_call of them stacked (the last repeated, unused)."""
    if not self.source.stacks_steps:
      return self.source.train_inputs()
    batches = [self.source.train_inputs() for _ in range(steps)]
    return self.stack_program(*batches, *batches[-1:] * (self.steps_per_call - steps))

  def evaluate(self, state: steps.TrainState) -> dict:
    """Summed loss, errors and count over the eval split, as numpy on the host."""
    totals = self.zero_totals(count_nonfinite=False)
    for inputs in self.source.eval_inputs():
      totals = self.eval_program(state, totals, inputs)
    return parallel.to_host(totals)

  def save_items(self) -> dict:
    """The source's extra checkpoint items (a Grain iterator's position)."""
    return self.source.checkpoint_items(restore=False)

  def sharpness(self, state: steps.TrainState) -> np.ndarray:
    """The largest config.sharpness_top eigenvalues of the training loss's Hessian at `state`,
    descending: float64 [sharpness_top] (fewer only when the Krylov space closes first).

    The loss is `training_loss` on config.sharpness_batch_size (0: batch_size) un-augmented
    training examples, the same ones at every measurement (drawn by the seed's SHARPNESS_STREAM
    alone, whatever the step). Lanczos (curvature.lanczos) makes config.sharpness_iters
    Hessian-vector products, starting from a direction drawn for `state.step`. Raises ValueError
    when config.sharpness_every is 0 or the source cannot draw the batch.
    """
    programs = self._instrument("sharpness")
    batch, start = programs["inputs"](state, self.source.measure_inputs())
    product = functools.partial(programs["hvp"], state.params, state.batch_stats, batch)
    alphas, betas = curvature.lanczos(product, start, self.config.sharpness_iters)
    return curvature.top_ritz_values(alphas, betas, self.config.sharpness_top)

  def noise_scale(self, state: steps.TrainState) -> dict[str, float]:
    """The simple gradient noise scale at `state` (curvature.noise_scale_estimates).

    |G_big|² is the squared norm of the gradient of `training_loss` on batch_size un-augmented
    training examples drawn for `state.step`; |G_small|² the mean of the same over its
    config.noise_scale_parts equal parts, each with BN's statistics over that part, as a run at
    the smaller batch would train. BN couples a batch's examples, so the estimator's premise
    (E|G_B|² = |G|² + tr(Σ)/B for B independent examples) holds only approximately. Returns
    {"grad_sq_norm", "trace_cov", "b_simple", "b_big", "b_small"}. Raises ValueError when
    config.noise_scale_every is 0 or the source cannot draw the batch.
    """
    programs = self._instrument("noise_scale")
    big, parts = programs["batches"](state, self.source.measure_inputs())
    sq_norm = functools.partial(programs["grad_sq_norm"], state.params, state.batch_stats)
    big_sq, *small_sq = parallel.to_host([sq_norm(big)] + [sq_norm(part) for part in parts])
    b_big = self.config.batch_size
    b_small = b_big // self.config.noise_scale_parts
    estimates = curvature.noise_scale_estimates(float(big_sq), float(np.mean(small_sq)),
                                                b_big, b_small)
    return {**estimates, "b_big": b_big, "b_small": b_small}

  def _instrument(self, name: str) -> dict[str, Any]:
    if name not in self.instrument_programs:
      raise ValueError(f"this trainer measures no {name}: its config.{name}_every is 0")
    return self.instrument_programs[name]


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
  loss = functools.partial(training_loss, model=model, **norm)
  instruments = {}
  if config.sharpness_every:
    instruments["sharpness"] = _sharpness_programs(config, source, loss, mesh)
  if config.noise_scale_every:
    instruments["noise_scale"] = _noise_scale_programs(config, source, loss, mesh)
  programs = {name: jax.jit(functools.partial(train, with_diagnostics=name == "diagnostics"),
                           donate_argnums=(0, 1), out_shardings=replicated)
              for name in ("plain", "diagnostics")}
  if steps_per_call > 1:
    programs["loop"] = jax.jit(loop, donate_argnums=(0, 1), out_shardings=replicated)
  return Trainer(
      config=config, model=model, tx=tx, mesh=mesh, source=source,
      init_program=jax.jit(create_state, out_shardings=replicated),
      abstract_state=jax.tree.map(
          lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated), shapes),
      train_programs=programs,
      steps_per_call=steps_per_call,
      loop_spec=loop_spec, stack_program=stack,
      eval_program=jax.jit(evaluate, donate_argnums=(1,), out_shardings=replicated),
      eval_step=eval_step,
      step_fn=train,
      instrument_programs=instruments)


def training_loss(params, batch_stats, batch: dict[str, jax.Array], *, model, mean, std,
                  dtype) -> jax.Array:
  """The loss the train step descends, as a function of `params` alone: float32 scalar.

  The mean softmax cross-entropy of `batch` ({"image": uint8 [B, H, W, C], "label": int32 [B]})
  with BatchNorm in train mode (the batch's own statistics, as the train step sees them); the
  running statistics `batch_stats` go unused, and their update is dropped. Weight decay's L2
  term is left out: it would add at most weight_decay to each Hessian eigenvalue.
  """
  images = data.normalize(batch["image"], mean, std, dtype)
  logits, _ = model.apply({"params": params, "batch_stats": batch_stats}, images, train=True,
                          mutable=["batch_stats"])
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), batch["label"]))


def _stream(seed: jax.Array, tag: int) -> jax.Array:
  """The key stream `tag` of a run's seed."""
  return jax.random.fold_in(jax.random.key(seed), tag)


def _sharpness_programs(config: ml_collections.ConfigDict, source, loss, mesh) -> dict[str, Any]:
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


def _noise_scale_programs(config: ml_collections.ConfigDict, source, loss, mesh
                          ) -> dict[str, Any]:
  """"batches": (state, measure inputs) -> (the step's batch, its noise_scale_parts parts);
  "grad_sq_norm": (params, batch_stats, batch) -> |gradient of the loss|², float32 []."""
  small = config.batch_size // config.noise_scale_parts

  def batches(state, measure_inputs):
    key = jax.random.fold_in(_stream(state.seed, NOISE_SCALE_STREAM), state.step)
    batch = source.measure_batch(measure_inputs, key, config.batch_size)
    return batch, [jax.tree.map(lambda x, i=i: x[i * small:(i + 1) * small], batch)
                   for i in range(config.noise_scale_parts)]

  def grad_sq_norm(params, batch_stats, batch):
    return optax.tree.norm(jax.grad(loss)(params, batch_stats, batch), squared=True)

  # Each part is sharded over the devices on its own (validate: small % devices == 0).
  return {"batches": jax.jit(batches, out_shardings=parallel.batch_sharded(mesh)),
          "grad_sq_norm": jax.jit(grad_sq_norm, out_shardings=parallel.replicated(mesh))}


def _stacked_sharding(sharding: jax.sharding.Sharding, mesh) -> jax.sharding.NamedSharding:
  """`sharding` of one batch array with a leading (steps) axis added, not split."""
  spec = sharding.spec if isinstance(sharding, jax.sharding.NamedSharding) else ()
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, *spec))


def _accumulate(totals: dict, metrics: dict) -> dict:
  """Adds a step's summed metrics to the running totals, counting non-finite losses."""
  out = {k: totals[k] + metrics[k] for k in ("loss", "errors", "count")}
  out["nonfinite"] = totals["nonfinite"] + (~jnp.isfinite(metrics["loss"])).astype(jnp.int32)
  return out
