"""Training: the train state, the pure train and eval steps, and the loop that runs a config.

`train_and_evaluate(config, workdir)` reads top to bottom as the story of a run: validate, mesh,
input, model and optimizer, state (fresh or resumed), compiled steps, train loop, summary.

The step is `train_step(state, batch) -> (state, metrics)`, jitted over a one-axis device mesh
(see parallel.py) with the state donated. Small datasets live on the devices as uint8; a fused
step gathers its batch by index, augments it and trains, so no image crosses the host boundary.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import time
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.experimental import multihost_utils

from resnet_jax import checkpoints, data, diagnostics, models, optim, parallel, preemption
from resnet_jax import config as config_lib
from resnet_jax import lock as lock_lib
from resnet_jax import reporting

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


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       lock_timeout_s: float = 0.0) -> dict:
  """Trains and evaluates one run described by `config`; resumes from `workdir` if it can.

  Returns the summary it writes to `workdir/summary.json`: status ("completed", "diverged",
  "preempted": stopped by SIGTERM or SIGINT with its last step checkpointed, or "failed"),
  message, step, train_loss, train_error, test_error, best_test_error (errors are fractions),
  wall_time_s (over every segment of a resumed run) and num_params. A run that has completed is
  not run again: its summary is returned and nothing is written.

  Raises, before anything in `workdir` is written: config.ConfigError (a bad config),
  data.DatasetNotPreparedError, lock.WorkdirError (another process holds the workdir, even
  after waiting `lock_timeout_s`; or it is a file or not writable),
  checkpoints.CheckpointMismatchError and checkpoints.NoUsableCheckpointError.
  """
  # --- Validate everything that can be checked before any work. ---
  config_lib.validate(config, num_devices=jax.device_count())
  data.check_prepared(config.dataset)
  info = data.dataset_info(config.dataset)
  config_lib.validate(config, num_devices=jax.device_count(), train_size=info.num_train)

  # --- One writer per workdir: a second run there stops here. ---
  lock = _lock_workdir(workdir, lock_timeout_s)
  try:
    return _run(config, workdir, info)
  finally:
    if lock is not None:
      lock.release(remove_new_workdir=True)  # A run refused before its start leaves no trace.


def _lock_workdir(workdir: str, timeout_s: float) -> lock_lib.WorkdirLock | None:
  """Process 0 locks the workdir (the others get None); every process learns if it could."""
  lock, error = None, ""
  if jax.process_index() == 0:
    lock = lock_lib.WorkdirLock(workdir)
    try:
      lock.acquire(timeout_s=timeout_s)
    except lock_lib.WorkdirError as e:
      lock, error = None, str(e)
  if jax.process_count() > 1:
    if multihost_utils.broadcast_one_to_all(np.int32(bool(error))) and not error:
      error = f"workdir {workdir} cannot be used; process 0 says why"
  if error:
    raise lock_lib.WorkdirError(error)
  return lock


def _run(config: ml_collections.ConfigDict, workdir: str, info: data.DatasetInfo) -> dict:
  """The run itself, with the workdir locked."""
  done = _completed_summary(workdir, config)
  if done is not None:
    return done  # Running a finished run again changes nothing.
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

  # --- State: fresh, or the newest intact checkpoint if the config matches it. ---
  create_state = functools.partial(create_train_state, model, tx, seed=config.seed,
                                   image_shape=info.image_shape)
  checkpoint_dir = os.path.join(workdir, "checkpoints")
  restored = checkpoints.restore_latest(checkpoint_dir,
                                        _abstract_state(create_state, replicated), config,
                                        inputs.restore_args())
  if restored is None:
    state, first_step, wall_time_s = jax.jit(create_state, out_shardings=replicated)(), 0, 0.0
  else:
    state, first_step, wall_time_s = restored.state, restored.step, restored.wall_time_s
  num_params = count_params(state.params)
  if first_step >= config.num_steps:  # Trained already: its records say how it ended.
    return _finished_summary(config, workdir, first_step, wall_time_s, num_params,
                             info.num_train, evaluate=lambda: inputs.evaluate(state))

  # --- From here on the workdir is written. ---
  if is_writer:
    reporting.write_json_atomic(os.path.join(workdir, reporting.CONFIG_FILE), config.to_dict())
    reporting.truncate_metrics(workdir, first_step)
    _remove(os.path.join(workdir, reporting.SUMMARY_FILE))  # Stale until this segment ends.
  saver = checkpoints.Saver(checkpoint_dir, keep=config.keep_checkpoints)
  # What summary.json says if the loop ends early; the loop keeps step and losses current.
  summary = {"status": "failed", "message": "stopped before the end", "step": first_step,
             "train_loss": float("nan"), "train_error": float("nan"),
             "test_error": float("nan"), "best_test_error": float("nan"),
             "wall_time_s": wall_time_s, "num_params": num_params}
  reporter = reporting.Reporter(workdir, num_steps=config.num_steps, first_step=first_step,
                                enabled=is_writer, progress_bar=config.progress_bar,
                                wall_time_s=wall_time_s)
  best = _best_test_error(reporting.read_metrics(workdir)) if is_writer else float("inf")
  # Signals only set a flag from here until the last save has completed.
  with preemption.StopRequest(synced=jax.process_count() > 1) as stop:
    try:
      _train_loop(config, workdir, state, first_step, inputs, saver, reporter, mesh,
                  info.num_train, best=best, stop=stop, out=summary)
      saver.wait()  # A failed final save surfaces here.
    except BaseException as e:
      summary.update(status="failed", message=f"{type(e).__name__}: {e}")
      _close_quietly(saver, reporter)
      raise
    else:
      saver.close()
      reporter.close()
    finally:
      summary["wall_time_s"] = round(reporter.wall_time(), 3)
      if is_writer:
        try:
          reporting.write_json_atomic(os.path.join(workdir, reporting.SUMMARY_FILE), summary)
        except OSError as e:  # A full disk, say: the error in flight matters more.
          reporting.warn(f"could not write {reporting.SUMMARY_FILE}: {e}")
  return summary


def _close_quietly(saver: checkpoints.Saver, reporter: reporting.Reporter) -> None:
  """Closes both after a failure, whose error is the one to report: a save in flight finishes
  (or fails again, as on a full disk), and closing may fail for the same cause."""
  for close in (saver.wait, saver.close, reporter.close):
    with contextlib.suppress(Exception):
      close()


def _remove(path: str) -> None:
  if os.path.exists(path):
    os.remove(path)


def _best_test_error(events: list[dict]) -> float:
  """The best test error among logged evaluations (inf if none)."""
  return min((e["test_error"] for e in events if e["event"] == "eval"), default=float("inf"))


def _completed_summary(workdir: str, config: ml_collections.ConfigDict) -> dict | None:
  """summary.json of this run if it completed, at its newest checkpoint, at least num_steps
  steps under a config that only differs in bookkeeping; else None (and the run goes on)."""
  newest = checkpoints.steps(os.path.join(workdir, "checkpoints"))
  paths = [os.path.join(workdir, name) for name in (reporting.SUMMARY_FILE,
                                                    reporting.CONFIG_FILE)]
  if not newest or not all(os.path.exists(path) for path in paths):
    return None
  summary, stored_config = (_read_json(path) for path in paths)
  if (summary.get("status") == "completed" and summary.get("step") == newest[0]
      and newest[0] >= config.num_steps
      and not checkpoints.config_mismatches(stored_config, config)):
    return summary
  return None


def _read_json(path: str) -> dict:
  with open(path) as f:
    return json.load(f)


def _finished_summary(config, workdir: str, step: int, wall_time_s: float, num_params: int,
                      num_train: int, evaluate: Callable[[], dict]) -> dict:
  """The summary of a run restored at or past num_steps whose summary.json does not say so.

  The process died between its final checkpoint and its summary: the summary is rebuilt from
  metrics.jsonl, evaluating the network only if that final evaluation was never logged.
  """
  events = reporting.read_metrics(workdir)
  train = [e for e in events if e["event"] == "train" and e["step"] == step]
  evals = [e for e in events if e["event"] == "eval" and e["step"] == step]
  if not evals:
    m = evaluate()
    event = {"event": "eval", "step": step, "epoch": round(step * config.batch_size / num_train, 4),
             "test_loss": float(m["loss"] / m["count"]),
             "test_error": float(m["errors"] / m["count"]), "wall_time_s": wall_time_s}
    if jax.process_index() == 0:
      with open(os.path.join(workdir, reporting.METRICS_FILE), "a") as f:
        f.write(json.dumps(event) + "\n")
    events.append(event)
    evals = [event]
  summary = {"status": "completed", "message": "finished", "step": step,
             "train_loss": train[-1]["loss"] if train else float("nan"),
             "train_error": train[-1]["train_error"] if train else float("nan"),
             "test_error": evals[-1]["test_error"], "best_test_error": _best_test_error(events),
             "wall_time_s": round(wall_time_s, 3), "num_params": num_params}
  if jax.process_index() == 0:
    reporting.write_json_atomic(os.path.join(workdir, reporting.SUMMARY_FILE), summary)
  return summary


def _train_loop(config, workdir, state, first_step, inputs, saver, reporter, mesh, num_train,
                *, best: float, stop: preemption.StopRequest, out: dict) -> None:
  """Runs steps first_step+1..num_steps, keeping the summary fields in `out` current.

  `best` is the best test error of earlier, interrupted parts of this run (inf if none). Stops
  after the step in flight when `stop` is requested, with that step logged and checkpointed.
  """
  totals = _zero_totals(mesh)
  compile_s = inputs.compile(state, totals)
  epoch = lambda step: round(step * config.batch_size / num_train, 4)
  mark_step, mark_time = first_step, time.time()

  def evaluate(step):
    nonlocal best
    m = inputs.evaluate(state)
    out["test_error"] = float(m["errors"] / m["count"])
    best = min(best, out["test_error"])
    out["best_test_error"] = best
    reporter.write({"event": "eval", "step": step, "epoch": epoch(step),
                    "test_loss": float(m["loss"] / m["count"]), "test_error": out["test_error"],
                    "wall_time_s": round(reporter.wall_time(), 3)})

  for step in range(first_step + 1, config.num_steps + 1):
    if config.profile_steps and step == first_step + 2:  # Trace after the first, slow step.
      jax.profiler.start_trace(os.path.join(workdir, "profile"))
    diag_now = bool(config.diagnostics_every) and (step - 1) % config.diagnostics_every == 0
    state, totals, diag = inputs.train(state, totals, with_diagnostics=diag_now)
    out["step"] = step
    if config.profile_steps and step == first_step + 1 + config.profile_steps:
      jax.block_until_ready(state)
      jax.profiler.stop_trace()
    if diag_now:  # Norms of the network that step `step - 1` saw.
      reporter.write({"event": "diagnostics", "step": step - 1,
                      **{kind: {block: float(v) for block, v in values.items()}
                         for kind, values in parallel.to_host(diag).items()}})

    last = step == config.num_steps
    stop_now = not last and stop.requested(step)  # Every process asks at every step.
    log_now = step % config.log_every == 0 or last or stop_now
    ckpt_now = (last or stop_now
                or bool(config.checkpoint_every) and step % config.checkpoint_every == 0)
    eval_now = last or bool(config.eval_every) and step % config.eval_every == 0 and not stop_now
    if not (log_now or ckpt_now or eval_now):
      continue
    t = parallel.to_host(totals)  # The only host sync between log points.
    if t["nonfinite"]:
      out.update(status="diverged", message=(
          f"loss became NaN/Inf at or before step {step} (lr={_lr(state):.4g}); stopped. "
          "Lower config.optimizer.lr, add warmup or set config.optimizer.grad_clip_norm."))
      return
    if log_now:
      seconds = time.time() - mark_time
      out.update(train_loss=float(t["loss"] / t["count"]),
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
      saver.save(step, state, config, wall_time_s=reporter.wall_time(),
                 extra_items=inputs.checkpoint_args())
    if stop_now:
      out.update(status="preempted", message=(
          f"stopped by {stop.signal_name} after step {step}, checkpointed; run the same "
          "command again to resume"))
      return
    mark_time = time.time()  # Throughput counts training time only.

  out.update(status="completed", message="finished",
             best_test_error=best if np.isfinite(best) else float("nan"))


def _lr(state: TrainState) -> float:
  return float(parallel.to_host(optim.current_learning_rate(state.opt_state)))
