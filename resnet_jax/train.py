"""Training: the train state, the pure train and eval steps, and the loop that runs a config.

`train_and_evaluate(config, workdir)` reads top to bottom as the story of a run: validate, mesh,
input, model and optimizer, state (fresh or resumed), compiled steps, train loop, summary.

The step is `train_step(state, batch) -> (state, metrics)`, jitted over a one-axis device mesh
(see parallel.py) with the state donated. Small datasets live on the devices as uint8; a fused
step gathers its batch by index, augments it and trains, so no image crosses the host boundary.
"""

from __future__ import annotations

import functools
import os
import time
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from resnet_jax import checkpoints, data, diagnostics, models, optim, parallel, reporting
from resnet_jax import config as config_lib

AUGMENT_STREAM = 2**31 - 1  # fold_in tag of the augmentation keys; epochs never reach it.


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training. All leaves are arrays, replicated on the mesh."""
  step: jax.Array  # int32 []: updates applied so far.
  params: Any
  batch_stats: Any
  opt_state: Any
  seed: jax.Array  # int32 []: data order and augmentation; an input, not a compiled constant.


def create_model(config: ml_collections.ConfigDict, num_classes: int):
  m = config.model
  return models.get_model(
      m.name, num_classes=num_classes, skip=m.skip, shortcut=m.shortcut, variant=m.variant,
      zero_init_residual=m.zero_init_residual, bn_momentum=m.bn_momentum,
      bn_epsilon=m.bn_epsilon, bn_fast_variance=m.bn_fast_variance, dtype=m.dtype,
      width=m.width)


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


def summed_metrics(logits: jax.Array, labels: jax.Array, mask: jax.Array | None = None
                   ) -> dict[str, jax.Array]:
  """Sums over the batch (so they add up across steps): loss, top-1 errors, examples.

  logits: float [B, classes]; labels: int32 [B]; mask: bool [B], False for padding.
  """
  losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
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
  mutable = ["batch_stats", "intermediates"] if with_diagnostics else ["batch_stats"]

  def loss_fn(params):
    logits, updates = model.apply({"params": params, "batch_stats": state.batch_stats}, images,
                                  train=True, mutable=mutable)
    loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), batch["label"]))
    return loss, (logits, updates)

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


def gather_train_batch(arrays: dict[str, jax.Array], state: TrainState, *, batch_size: int,
                       crop_padding: int, flip: bool, sharding) -> dict[str, jax.Array]:
  """The augmented batch for `state.step`: a pure function of (seed, step), so resume is exact.

  arrays: the whole split on device, {"image": uint8 [N, H, W, C], "label": int32 [N]}.
  """
  num_examples = arrays["label"].shape[0]
  idx = data.batch_indices(state.seed, state.step, batch_size, num_examples)
  # Sharding the indices makes each device gather and augment only its own slice.
  idx = jax.lax.with_sharding_constraint(idx, sharding)
  # A key stream of its own, apart from the one data.batch_indices derives the order from.
  augment_key = jax.random.fold_in(jax.random.key(state.seed), AUGMENT_STREAM)
  key = jax.random.fold_in(augment_key, state.step)
  images = data.augment(arrays["image"][idx], key, crop_padding=crop_padding, flip=flip)
  return {"image": images, "label": arrays["label"][idx]}


def _accumulate(total: dict, metrics: dict) -> dict:
  """Adds a step's summed metrics to the running totals, counting non-finite losses."""
  out = {k: total[k] + metrics[k] for k in ("loss", "errors", "count")}
  out["nonfinite"] = total["nonfinite"] + (~jnp.isfinite(metrics["loss"])).astype(jnp.int32)
  return out


def _zero_totals(mesh, *, count_nonfinite: bool = True) -> dict:
  """Zeroed sums of summed_metrics on the mesh; train totals also count NaN/Inf-loss steps."""
  zeros = {"loss": np.float32(0), "errors": np.float32(0), "count": np.float32(0)}
  if count_nonfinite:
    zeros["nonfinite"] = np.int32(0)
  return parallel.put_replicated(zeros, mesh)


def _train_and_accumulate(state, totals, batch, *, train_fn, with_diagnostics: bool):
  """One train step whose metrics go into the running totals; diagnostics come out apart."""
  state, metrics = train_fn(state, batch, with_diagnostics=with_diagnostics)
  diag = {k: metrics.pop(k) for k in ("grad_norm", "activation_rms") if k in metrics}
  return state, _accumulate(totals, metrics), diag


def _compile_train_steps(fused, sharding):
  """The plain and the diagnostics variant of a fused step, state and totals donated."""
  return {flag: jax.jit(functools.partial(fused, with_diagnostics=flag), donate_argnums=(0, 1),
                        out_shardings=sharding)
          for flag in (False, True)}


class _InMemoryInput:
  """The small-dataset path: both splits on device, batches gathered inside the jitted step."""

  def __init__(self, config, info, mesh, train_fn, eval_fn):
    self._mesh = mesh
    cfg = config.dataset
    self.train_arrays = parallel.put_replicated(
        dict(zip(("image", "label"), data.load_split(cfg, cfg.train_split))), mesh)
    self.eval_arrays = parallel.put_replicated(
        dict(zip(("image", "label"), data.load_split(cfg, cfg.eval_split))), mesh)
    # The eval batches never change: their indices and masks go to the devices once.
    self._eval_batches = parallel.put_replicated(
        data.eval_batches(info.num_eval, config.eval_batch_size), mesh)
    sharded = parallel.batch_sharded(mesh)
    gather = functools.partial(gather_train_batch, batch_size=config.batch_size,
                               crop_padding=cfg.crop_padding, flip=cfg.flip, sharding=sharded)

    def fused(state, totals, arrays, with_diagnostics):
      return _train_and_accumulate(state, totals, gather(arrays, state), train_fn=train_fn,
                                   with_diagnostics=with_diagnostics)

    def fused_eval(state, totals, arrays, idx, mask):
      idx = jax.lax.with_sharding_constraint(idx, sharded)
      batch = {"image": arrays["image"][idx], "label": arrays["label"][idx], "mask": mask}
      return jax.tree.map(jnp.add, totals, eval_fn(state, batch))

    self._train = _compile_train_steps(fused, parallel.replicated(mesh))
    self._eval = jax.jit(fused_eval, donate_argnums=(1,), out_shardings=parallel.replicated(mesh))

  def compile(self, state, totals) -> float:
    """Compiles the plain train step ahead of the first step; returns seconds taken."""
    start = time.time()
    self._train[False] = self._train[False].lower(state, totals, self.train_arrays).compile()
    return time.time() - start

  def train(self, state, totals, with_diagnostics: bool = False):
    return self._train[with_diagnostics](state, totals, self.train_arrays)

  def evaluate(self, state) -> dict:
    totals = _zero_totals(self._mesh, count_nonfinite=False)
    for idx, mask in self._eval_batches:
      totals = self._eval(state, totals, self.eval_arrays, idx, mask)
    return parallel.to_host(totals)

  def checkpoint_args(self) -> dict:
    return {}  # The batch order is a function of (seed, step): nothing to save or restore.

  restore_args = checkpoint_args


class _StreamInput:
  """The large-dataset path: Grain workers decode and augment, batches prefetched to devices."""

  def __init__(self, config, info, mesh, train_fn, eval_fn):
    import grain  # Only streaming runs need Grain's worker machinery.
    from resnet_jax import stream
    self._mesh, self._grain = mesh, grain
    sharded = parallel.batch_sharded(mesh)
    self._iter = iter(stream.prefetch_to_device(
        stream.make_train_dataset(config.dataset, global_batch_size=config.batch_size,
                                  seed=config.seed), size=2, sharding=sharded))
    self._eval_ds = stream.prefetch_to_device(
        stream.make_eval_dataset(config.dataset, global_batch_size=config.eval_batch_size),
        size=2, sharding=sharded)
    size = config.dataset.image_size
    self._batch_spec = {
        "image": jax.ShapeDtypeStruct((config.batch_size, size, size, info.image_shape[-1]),
                                      jnp.uint8, sharding=sharded),
        "label": jax.ShapeDtypeStruct((config.batch_size,), jnp.int32, sharding=sharded)}

    fused = functools.partial(_train_and_accumulate, train_fn=train_fn)
    self._train = _compile_train_steps(fused, parallel.replicated(mesh))
    self._eval = jax.jit(lambda state, totals, batch: jax.tree.map(jnp.add, totals,
                                                                   eval_fn(state, batch)),
                         donate_argnums=(1,), out_shardings=parallel.replicated(mesh))

  def compile(self, state, totals) -> float:
    start = time.time()
    self._train[False] = self._train[False].lower(state, totals, self._batch_spec).compile()
    return time.time() - start

  def train(self, state, totals, with_diagnostics: bool = False):
    return self._train[with_diagnostics](state, totals, next(self._iter))

  def evaluate(self, state) -> dict:
    totals = _zero_totals(self._mesh, count_nonfinite=False)
    for batch in self._eval_ds:
      totals = self._eval(state, totals, batch)
    return parallel.to_host(totals)

  def checkpoint_args(self) -> dict:
    return {"data": self._grain.checkpoint.CheckpointSave(self._iter)}

  def restore_args(self) -> dict:
    return {"data": self._grain.checkpoint.CheckpointRestore(self._iter)}


def _abstract_state(create_state: Callable[[], TrainState], sharding) -> TrainState:
  shapes = jax.eval_shape(create_state)
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes)


def _previous_best(workdir: str) -> float:
  """The best test error logged by earlier parts of a resumed run (inf if none)."""
  errors = [e["test_error"] for e in reporting.read_metrics(workdir) if e["event"] == "eval"]
  return min(errors, default=float("inf"))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains and evaluates one run described by `config`; resumes from `workdir` if it can.

  Returns the summary it writes to `workdir/summary.json`: status ("completed", "diverged" or
  "failed"), message, step, train_loss, train_error, test_error, best_test_error (errors are
  fractions), wall_time_s and num_params. Bad configs, missing datasets and checkpoints that do
  not match raise before anything in `workdir` is written.
  """
  # --- Validate everything that can be checked before any work. ---
  config_lib.validate(config, num_devices=jax.device_count())
  data.check_prepared(config.dataset)
  info = data.dataset_info(config.dataset)
  config_lib.validate(config, num_devices=jax.device_count(), train_size=info.num_train)
  steps_per_epoch = max(info.num_train // config.batch_size, 1)
  is_writer = jax.process_index() == 0

  # --- Mesh, model and optimizer. ---
  mesh = parallel.make_mesh()
  replicated = parallel.replicated(mesh)
  model = create_model(config, info.num_classes)
  tx = optim.create_optimizer(config.optimizer, batch_size=config.batch_size,
                              num_steps=config.num_steps, steps_per_epoch=steps_per_epoch)
  dtype = jnp.dtype(config.model.dtype)
  norm = dict(mean=tuple(info.mean), std=tuple(info.std), dtype=dtype)
  train_fn = functools.partial(train_step, model=model, tx=tx, **norm)
  eval_fn = functools.partial(eval_step, model=model, **norm)

  # --- Input pipeline: small datasets onto the devices, large ones streamed. ---
  input_cls = _StreamInput if config.dataset.name in data.STREAMED else _InMemoryInput
  inputs = input_cls(config, info, mesh, train_fn, eval_fn)

  # --- State: fresh, or the latest checkpoint if the config matches it. ---
  create_state = functools.partial(create_train_state, model, tx, seed=config.seed,
                                   image_shape=info.image_shape)
  manager = checkpoints.create_manager(os.path.join(workdir, "checkpoints"),
                                       keep=config.keep_checkpoints)
  restored = checkpoints.restore_latest(manager, _abstract_state(create_state, replicated),
                                        config, inputs.restore_args())
  if restored is None:
    state = jax.jit(create_state, out_shardings=replicated)()
    first_step = 0
  else:
    first_step, state = restored

  # --- From here on the workdir is written. ---
  if is_writer:
    os.makedirs(workdir, exist_ok=True)
    reporting.write_json_atomic(os.path.join(workdir, reporting.CONFIG_FILE), config.to_dict())
    reporting.truncate_metrics(workdir, first_step)
  # What summary.json says if the loop ends early, e.g. on Ctrl-C: the next start resumes.
  summary = {"status": "failed", "message": "interrupted before the end", "step": first_step,
             "train_loss": float("nan"), "train_error": float("nan"),
             "test_error": float("nan"), "best_test_error": float("nan"),
             "wall_time_s": 0.0, "num_params": count_params(state.params)}
  reporter = reporting.Reporter(workdir, num_steps=config.num_steps, first_step=first_step,
                                enabled=is_writer, progress_bar=config.progress_bar)
  try:
    summary.update(_train_loop(config, workdir, state, first_step, inputs, manager, reporter,
                               mesh, info.num_train, best=_previous_best(workdir)))
  except Exception as e:
    summary["message"] = f"{type(e).__name__}: {e}"
    raise
  finally:
    manager.wait_until_finished()
    summary["wall_time_s"] = round(reporter.wall_time(), 3)
    reporter.close()
    if is_writer:
      reporting.write_json_atomic(os.path.join(workdir, reporting.SUMMARY_FILE), summary)
  return summary


def _train_loop(config, workdir, state, first_step, inputs, manager, reporter, mesh,
                num_train, best) -> dict:
  """Runs steps first_step+1..num_steps; returns the summary fields it determined.

  `best` is the best test error of earlier, interrupted parts of this run (inf if none).
  """
  out: dict[str, Any] = {}
  totals = _zero_totals(mesh)
  compile_s = inputs.compile(state, totals) if first_step < config.num_steps else 0.0
  epoch = lambda step: round(step * config.batch_size / num_train, 4)
  mark_step, mark_time = first_step, time.time()

  def evaluate(step):
    nonlocal best
    m = inputs.evaluate(state)
    out["test_error"] = float(m["errors"] / m["count"])
    best = min(best, out["test_error"])
    reporter.write({"event": "eval", "step": step, "epoch": epoch(step),
                    "test_loss": float(m["loss"] / m["count"]), "test_error": out["test_error"],
                    "wall_time_s": round(reporter.wall_time(), 3)})

  for step in range(first_step + 1, config.num_steps + 1):
    if config.profile_steps and step == first_step + 2:  # Trace after the first, slow step.
      jax.profiler.start_trace(os.path.join(workdir, "profile"))
    diag_now = bool(config.diagnostics_every) and (step - 1) % config.diagnostics_every == 0
    state, totals, diag = inputs.train(state, totals, with_diagnostics=diag_now)
    if config.profile_steps and step == first_step + 1 + config.profile_steps:
      jax.block_until_ready(state)
      jax.profiler.stop_trace()
    if diag_now:  # Norms of the network that step `step - 1` saw.
      reporter.write({"event": "diagnostics", "step": step - 1,
                      **{kind: {block: float(v) for block, v in values.items()}
                         for kind, values in parallel.to_host(diag).items()}})

    last = step == config.num_steps
    log_now = step % config.log_every == 0 or last
    ckpt_now = last or bool(config.checkpoint_every) and step % config.checkpoint_every == 0
    eval_now = last or bool(config.eval_every) and step % config.eval_every == 0
    if not (log_now or ckpt_now or eval_now):
      continue
    t = parallel.to_host(totals)  # The only host sync between log points.
    if t["nonfinite"]:
      out.update(status="diverged", step=step, message=(
          f"loss became NaN/Inf at or before step {step} (lr={_lr(state):.4g}); stopped. "
          "Lower config.optimizer.lr, add warmup or set config.optimizer.grad_clip_norm."))
      return out
    if log_now:
      seconds = time.time() - mark_time
      out.update(step=step, train_loss=float(t["loss"] / t["count"]),
                 train_error=float(t["errors"] / t["count"]))
      event = {"event": "train", "step": step, "epoch": epoch(step), "loss": out["train_loss"],
               "train_error": out["train_error"], "lr": _lr(state),
               "img_per_s": round((step - mark_step) * config.batch_size / seconds, 1),
               "wall_time_s": round(reporter.wall_time(), 3)}
      if mark_step == first_step:
        event["compile_s"] = round(compile_s, 3)
      reporter.write(event)
      totals = _zero_totals(mesh)
      mark_step = step
    if eval_now:
      evaluate(step)
    if ckpt_now:
      checkpoints.save(manager, step, state, config, inputs.checkpoint_args())
    mark_time = time.time()  # Throughput counts training time only.

  if first_step >= config.num_steps:
    evaluate(first_step)
  out.update(status="completed", message="finished",
             best_test_error=best if np.isfinite(best) else float("nan"))
  return out


def _lr(state: TrainState) -> float:
  return float(parallel.to_host(optim.current_learning_rate(state.opt_state)))
