"""Training: `train_and_evaluate(config, workdir)`, the story of one run, and its train loop.

It reads top to bottom: validate, lock the workdir, build the trainer (model, optimizer, batch
source, compiled steps: trainer.py), restore or initialise the state, train with logs, evaluations
and checkpoints, and write the summary. A run stopped by SIGTERM or SIGINT checkpoints its last
step first (preemption.py); running the same command again resumes it bit for bit.
"""

from __future__ import annotations

import contextlib
import json
import os
import time

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from resnet_jax import (checkpoints, compilation, curvature, data, optim, parallel, preemption,
                        reporting, steps)
from resnet_jax import config as config_lib
from resnet_jax import lock as lock_lib
from resnet_jax import trainer as trainer_lib


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       lock_timeout_s: float = 0.0,
                       trainers: trainer_lib.Cache | None = None) -> reporting.Summary:
  """Trains and evaluates one run described by `config`; resumes from `workdir` if it can.

  Returns the reporting.Summary it writes to `workdir/summary.json`: status COMPLETED, DIVERGED,
  PREEMPTED (stopped by SIGTERM or SIGINT with its last step checkpointed) or FAILED, the steps
  trained, the final and best errors, the wall time over every segment of a resumed run and the
  parameter count. A run that has completed is not run again: its summary is returned and
  nothing is written. `trainers` lets a process that trains several runs (a sweep) reuse the
  compiled programs of an earlier one whose config differs only in the step's inputs.

  Raises, before anything in `workdir` is written: config.ConfigError (a bad config),
  data.DatasetNotPreparedError, lock.WorkdirError (another process holds the workdir, even
  after waiting `lock_timeout_s`; or it is a file or not writable),
  checkpoints.CheckpointMismatchError and checkpoints.NoUsableCheckpointError.
  """
  config, info = prepare(config)

  # --- One writer per workdir: a second run there stops here. ---
  lock = lock_workdir(workdir, lock_timeout_s)
  try:
    return _run(config, workdir, info, trainers)
  finally:
    if lock is not None:
      lock.release(remove_new_workdir=True)  # A run refused before its start leaves no trace.


def prepare(config: ml_collections.ConfigDict
            ) -> tuple[ml_collections.ConfigDict, data.DatasetInfo]:
  """Validates everything that can be checked before any work: (the config with its *_epochs
  fields resolved into steps, the dataset's description). Raises config.ConfigError or
  data.DatasetNotPreparedError."""
  config_lib.validate(config, num_devices=jax.device_count())
  data.check_prepared(config.dataset)
  info = data.dataset_info(config.dataset)
  config = config_lib.resolve_epochs(config, info.num_train)  # *_epochs fields become steps.
  config_lib.validate(config, num_devices=jax.device_count(), train_size=info.num_train)
  if (config.sharpness_every or config.noise_scale_every) and info.name in data.STREAMED:
    raise config_lib.ConfigError(
        f"config.sharpness_every and config.noise_scale_every must be 0 for {info.name}: the "
        "instruments draw un-augmented training examples by index, and a streamed dataset is "
        "not held where they can (sources.DeviceBatches)")
  return config, info


def lock_workdir(workdir: str, timeout_s: float) -> lock_lib.WorkdirLock | None:
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


def _run(config: ml_collections.ConfigDict, workdir: str, info: data.DatasetInfo,
         trainers: trainer_lib.Cache | None) -> reporting.Summary:
  """The run itself, with the workdir locked."""
  done = completed_summary(workdir, config)
  if done is not None:
    return done  # Running a finished run again changes nothing.
  is_writer = jax.process_index() == 0

  # --- Model, optimizer, batch source and compiled steps, from one builder. ---
  compilation.use_cache(workdir)  # A resumed run loads its programs (unless a sweep's cache).
  trainer = (trainers.build if trainers else trainer_lib.build)(config, info,
                                                                parallel.make_mesh())

  # --- State: fresh, or the newest intact checkpoint if the config matches it. ---
  checkpoint_dir = os.path.join(workdir, "checkpoints")
  start = trainer.restore_or_init(checkpoint_dir)
  num_params = steps.count_params(start.state.params)
  if start.step >= config.num_steps:  # Trained already: its records say how it ended.
    return finished_summary(config, workdir, start, num_params, info.num_train,
                             evaluate=lambda: trainer.evaluate(start.state))

  # --- From here on the workdir is written. ---
  if is_writer:
    reporting.write_json_atomic(os.path.join(workdir, reporting.CONFIG_FILE), config.to_dict())
    # Events of steps past the checkpoint are logged again; with no checkpoint, all of them.
    reporting.truncate_metrics(workdir, start.step if start.step else -1)
    _remove(os.path.join(workdir, reporting.SUMMARY_FILE))  # Stale until this segment ends.
  saver = checkpoints.Saver(checkpoint_dir, keep=config.keep_checkpoints)
  # The summary's fields as the loop goes: what summary.json says if the loop ends early.
  record = reporting.Summary.failed("stopped before the end", step=start.step,
                                    wall_time_s=start.wall_time_s,
                                    num_params=num_params).to_dict()
  reporter = reporting.Reporter(workdir, num_steps=config.num_steps, first_step=start.step,
                                enabled=is_writer, progress_bar=config.progress_bar,
                                wall_time_s=start.wall_time_s)
  best = best_test_error(reporting.read_metrics(workdir)) if is_writer else float("inf")
  # Signals only set a flag from here until the last save has completed.
  with preemption.StopRequest(synced=jax.process_count() > 1) as stop:
    try:
      _train_loop(config, workdir, trainer, start, saver, reporter, info.num_train, best=best,
                  stop=stop, out=record)
      saver.wait()  # A failed final save surfaces here.
    except BaseException as e:
      record.update(status=reporting.FAILED, message=f"{type(e).__name__}: {e}")
      _close_quietly(saver, reporter)
      raise
    else:
      saver.close()
      reporter.close()
    finally:
      record["wall_time_s"] = round(reporter.wall_time(), 3)
      summary = reporting.Summary(**record)
      if is_writer:
        try:
          summary.write(workdir)
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


def best_test_error(events: list[dict]) -> float:
  """The best test error among logged evaluations (inf if none)."""
  return min((e["test_error"] for e in events if e["event"] == reporting.EVAL),
             default=float("inf"))


def completed_summary(workdir: str, config: ml_collections.ConfigDict
                       ) -> reporting.Summary | None:
  """summary.json of this run if it completed, at its newest checkpoint, at least num_steps
  steps under a config that only differs in bookkeeping; else None (and the run goes on)."""
  newest = checkpoints.steps(os.path.join(workdir, "checkpoints"))
  if not newest:
    return None
  stored_config = recorded_config(workdir)  # Warns if damaged: finished_summary rewrites it.
  summary = reporting.Summary.read(workdir)
  if stored_config is None or summary is None:
    return None
  if (summary.status == reporting.COMPLETED and summary.step == newest[0]
      and newest[0] >= config.num_steps
      and not checkpoints.config_mismatches(stored_config, config)):
    return summary
  return None


def recorded_config(workdir: str) -> dict | None:
  """The run's config.json, or None if it has none or it is damaged (then with a warning: the
  run writes it again from its config, which its checkpoint's config matched)."""
  try:
    return reporting.read_json(os.path.join(workdir, reporting.CONFIG_FILE), dict)
  except FileNotFoundError:
    return None
  except reporting.RecordError as e:
    reporting.warn(f"{e}; the run writes it again")
    return None


def finished_summary(config, workdir: str, start: checkpoints.Restored, num_params: int,
                      num_train: int, evaluate) -> reporting.Summary:
  """The summary of a run restored at num_steps (past it is refused) whose summary.json does
  not say so.

  The process died between its final checkpoint and its summary: the summary is rebuilt from
  metrics.jsonl, evaluating the network (`evaluate()`: host totals) only if that final
  evaluation was never logged.
  """
  step = start.step
  if jax.process_index() == 0:
    config_path = os.path.join(workdir, reporting.CONFIG_FILE)
    try:
      reporting.read_json(config_path)
    except (FileNotFoundError, reporting.RecordError):  # completed_summary said so.
      reporting.write_json_atomic(config_path, config.to_dict())
    reporting.truncate_metrics(workdir, step)  # Sets damaged lines aside, once.
  events = reporting.read_metrics(workdir)
  train = [e for e in events if e["event"] == reporting.TRAIN and e["step"] == step]
  evals = [e for e in events if e["event"] == reporting.EVAL and e["step"] == step]
  if not evals:
    event = eval_event(evaluate(), step, epoch_of(config, num_train, step), start.wall_time_s)
    if jax.process_index() == 0:
      with open(os.path.join(workdir, reporting.METRICS_FILE), "a") as f:
        f.write(json.dumps(event) + "\n")
    events.append(event)
    evals = [event]
  nan = float("nan")
  summary = reporting.Summary(
      status=reporting.COMPLETED, message="finished", step=step,
      train_loss=train[-1]["loss"] if train else nan,
      train_error=train[-1]["train_error"] if train else nan,
      test_error=evals[-1]["test_error"], best_test_error=best_test_error(events),
      wall_time_s=round(start.wall_time_s, 3), num_params=num_params)
  if jax.process_index() == 0:
    summary.write(workdir)
  return summary


def epoch_of(config, num_train: int, step: int) -> float:
  return round(step * config.batch_size / num_train, 4)


def eval_event(totals: dict, step: int, epoch: float, wall_time_s: float) -> dict:
  """The metrics.jsonl event of an evaluation's host totals."""
  return {"event": reporting.EVAL, "step": step, "epoch": epoch,
          "test_loss": float(totals["loss"] / totals["count"]),
          "test_error": float(totals["errors"] / totals["count"]),
          "wall_time_s": round(wall_time_s, 3)}


def _train_loop(config, workdir: str, trainer: trainer_lib.Trainer, start: checkpoints.Restored,
                saver: checkpoints.Saver, reporter: reporting.Reporter, num_train: int, *,
                best: float, stop: preemption.StopRequest, out: dict) -> None:
  """Runs steps start.step+1..num_steps, keeping the summary fields in `out` current.

  `best` is the best test error of earlier, interrupted parts of this run (inf if none). Stops
  after the call in flight when `stop` is requested, with its last step logged and checkpointed.
  A call runs up to trainer.steps_per_call steps, ending where the loop has work (_call_length).
  """
  state, first_step = start.state, start.step
  totals = trainer.zero_totals()
  compile_s = trainer.compile(state, totals)
  if first_step == 0:  # The instruments measure the initial network too.
    _record_instruments(config, trainer, state, 0, reporter, num_train)
  mark_step, mark_time = first_step, time.time()

  step = first_step
  while step < config.num_steps:
    if config.profile_steps and step == first_step + 1:  # Trace after the first, slow call.
      saver.wait()  # The profiler must not start or stop while a save's threads run (a crash).
      jax.profiler.start_trace(os.path.join(workdir, "profile"))
    diag_now = bool(config.diagnostics_every) and step % config.diagnostics_every == 0
    count = 1 if diag_now else call_length(config, trainer.steps_per_call, step, first_step)
    state, totals, diag = trainer.train(state, totals, steps=count, with_diagnostics=diag_now)
    step += count
    out["step"] = step
    if config.profile_steps and step == first_step + 1 + config.profile_steps:
      jax.block_until_ready(state)
      saver.wait()
      jax.profiler.stop_trace()
    if diag_now:  # Norms of the network that step `step - 1` saw.
      reporter.write({"event": reporting.DIAGNOSTICS, "step": step - 1,
                      **{kind: {block: float(v) for block, v in values.items()}
                         for kind, values in parallel.to_host(diag).items()}})
    # Before the checkpoint of this step, so that a run resumed from it records each step once.
    mark_time += _record_instruments(config, trainer, state, step, reporter, num_train)

    last = step == config.num_steps
    stop_now = not last and stop.requested(step)  # Every process asks at every step.
    log_now, ckpt_now, eval_now = work_due(config, step, stop_now)
    if not (log_now or ckpt_now or eval_now):
      continue
    t = parallel.to_host(totals)  # The only host sync between log points.
    if t["nonfinite"]:
      out.update(status=reporting.DIVERGED, message=diverged_message(step, _lr(state)))
      return
    if log_now:
      event = train_event(config, num_train, step, t, lr=_lr(state),
                          img_per_s=(step - mark_step) * config.batch_size
                          / (time.time() - mark_time), wall_time_s=reporter.wall_time())
      out.update(train_loss=event["loss"], train_error=event["train_error"])
      if mark_step == first_step:
        event["compile_s"] = round(compile_s, 3)
      reporter.write(event)
      totals = trainer.zero_totals()
      mark_step = step
    if eval_now:
      event = eval_event(trainer.evaluate(state), step, epoch_of(config, num_train, step),
                          reporter.wall_time())
      best = min(best, event["test_error"])
      out.update(test_error=event["test_error"], best_test_error=best)
      reporter.write(event)
    if ckpt_now:
      saver.save(step, state, config, wall_time_s=reporter.wall_time(),
                 extra_items=trainer.save_items())
    if stop_now:
      out.update(status=reporting.PREEMPTED, message=preempted_message(stop, step))
      return
    mark_time = time.time()  # Throughput counts training time only.

  out.update(status=reporting.COMPLETED, message="finished",
             best_test_error=best if np.isfinite(best) else float("nan"))


def work_due(config, step: int, stop_now: bool) -> tuple[bool, bool, bool]:
  """(log, checkpoint, evaluate) after `step`: at their intervals, at the last step, and a log
  and checkpoint (no evaluation) when the run is asked to stop there."""
  last = step == config.num_steps
  log_now = step % config.log_every == 0 or last or stop_now
  ckpt_now = (last or stop_now
              or bool(config.checkpoint_every) and step % config.checkpoint_every == 0)
  eval_now = last or bool(config.eval_every) and step % config.eval_every == 0 and not stop_now
  return log_now, ckpt_now, eval_now


def train_event(config, num_train: int, step: int, totals: dict, *, lr: float,
                img_per_s: float, wall_time_s: float) -> dict:
  """The metrics.jsonl event of a log window's host totals."""
  return {"event": reporting.TRAIN, "step": step, "epoch": epoch_of(config, num_train, step),
          "loss": float(totals["loss"] / totals["count"]),
          "train_error": float(totals["errors"] / totals["count"]), "lr": lr,
          "img_per_s": round(img_per_s, 1), "wall_time_s": round(wall_time_s, 3)}


def diverged_message(step: int, lr: float) -> str:
  return (f"loss became NaN/Inf at or before step {step} (lr={lr:.4g}); stopped. Lower "
          "config.optimizer.lr, add warmup or set config.optimizer.grad_clip_norm.")


def preempted_message(stop: preemption.StopRequest, step: int) -> str:
  return (f"stopped by {stop.signal_name} after step {step}, checkpointed; run the same "
          "command again to resume")


def call_length(config, steps_per_call: int, step: int, first_step: int) -> int:
  """How many steps the call starting after `step` runs: up to steps_per_call, ending where the
  loop next has work to do (a log, evaluation, checkpoint, instrument, diagnostics step, profile
  mark or the last step), so that these fall at the same steps whatever steps_per_call is."""
  end = min(step + steps_per_call, config.num_steps)
  for every in (config.log_every, config.eval_every, config.checkpoint_every,
                config.diagnostics_every, config.sharpness_every, config.noise_scale_every):
    if every:
      end = min(end, (step // every + 1) * every)
  if config.profile_steps:
    for mark in (first_step + 1, first_step + 1 + config.profile_steps):
      if mark > step:
        end = min(end, mark)
  return end - step


def _record_instruments(config, trainer: trainer_lib.Trainer, state: steps.TrainState,
                        step: int, reporter: reporting.Reporter, num_train: int) -> float:
  """Measures the instruments due at `step` (every sharpness_every, noise_scale_every steps,
  from 0) on `state`, the network after `step` updates, and writes their events. Returns the
  seconds they took, which the throughput leaves out."""
  sharpness_now = bool(config.sharpness_every) and step % config.sharpness_every == 0
  noise_now = bool(config.noise_scale_every) and step % config.noise_scale_every == 0
  if not (sharpness_now or noise_now):
    return 0.0
  jax.block_until_ready(state)  # The steps still in flight count as training.
  start = time.time()
  lr = _lr(state)
  common = {"step": step, "epoch": epoch_of(config, num_train, step), "lr": lr}
  if sharpness_now:
    eigenvalues = [float(v) for v in trainer.sharpness(state)]
    opt = config.optimizer
    # LARS rescales each layer's step by its own trust ratio: no one threshold in η applies.
    threshold = (curvature.stability_threshold(lr, opt.momentum, opt.nesterov)
                 if opt.name == "sgd" else None)
    reporter.write({"event": reporting.SHARPNESS, **common, "sharpness": eigenvalues[0],
                    "eigenvalues": eigenvalues, "threshold": threshold})
  if noise_now:
    reporter.write({"event": reporting.NOISE_SCALE, **common, **trainer.noise_scale(state)})
  return time.time() - start


def _lr(state: steps.TrainState) -> float:
  return float(parallel.to_host(optim.current_learning_rate(state.opt_state)))
