"""Training: `train_and_evaluate(config, workdir)`, the story of one run, and the train loop.

It reads top to bottom: validate, lock the workdir, build the trainer (model, optimizer, batch
source, compiled steps: trainer.py), restore or initialise the state, train with logs, evaluations
and checkpoints, and write the summary. A run stopped by SIGTERM or SIGINT checkpoints its last
step first (preemption.py); running the same command again resumes it bit for bit.

`train_population(configs, workdirs)` trains several runs at once, as one population (see
population.py), through the same story and the same loop: the loop drives *members*, one run's
state and records each, whether one trained alone or several by one vmapped program.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from resnet_jax import (checkpoints, compilation, data, instruments, parallel, population,
                        preemption, reporting, steps)
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
  return _train([config], [workdir], info, packed=False, trainers=trainers,
                lock_timeout_s=lock_timeout_s)[0]


def train_population(configs: list[ml_collections.ConfigDict], workdirs: list[str], *,
                     trainers: trainer_lib.Cache | None = None,
                     lock_timeout_s: float = 0.0) -> list[reporting.Summary]:
  """Trains the runs `configs[i]` in `workdirs[i]` as one population; returns their summaries.

  Each run resumes from its workdir's checkpoints and ends where it would end alone: runs
  already completed are not run again, and runs restored at different steps train as separate
  populations, one after the other. Raises what train_and_evaluate raises, and
  config.ConfigError (population.packing_errors) for configs that cannot share a program.
  """
  prepared = [prepare(c) for c in configs]
  configs, info = [c for c, _ in prepared], prepared[0][1]
  errors = population.packing_errors(configs)
  if errors:
    raise config_lib.ConfigError("these runs cannot train as one population: " +
                                 "; ".join(errors))
  return _train(configs, workdirs, info, packed=True, trainers=trainers,
                lock_timeout_s=lock_timeout_s)


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
  measured = [f"config.{i.every}" for i in instruments.INSTRUMENTS.values() if config[i.every]]
  if measured and info.name in data.STREAMED:
    raise config_lib.ConfigError(
        f"{' and '.join(measured)} must be 0 for {info.name}: the instruments draw "
        "un-augmented training examples by index, and a streamed dataset is not held where "
        "they can (sources.DeviceBatches)")
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


@dataclasses.dataclass
class Member:
  """One run the loop trains: where it starts and what it writes."""
  index: int  # Its place among the runs asked for.
  config: ml_collections.ConfigDict
  workdir: str
  start: checkpoints.Restored
  saver: checkpoints.Saver | None = None
  reporter: reporting.Reporter | None = None
  # Its summary's fields as the loop goes: what summary.json says if the loop ends early.
  record: dict = dataclasses.field(default_factory=dict)
  best: float = float("inf")  # Its best test error so far, earlier segments included.


def _train(configs: list[ml_collections.ConfigDict], workdirs: list[str],
           info: data.DatasetInfo, *, packed: bool, trainers: trainer_lib.Cache | None,
           lock_timeout_s: float) -> list[reporting.Summary]:
  """The runs, validated: each alone, or (packed) those restored at the same step as one
  population."""
  summaries: dict[int, reporting.Summary] = {}
  with contextlib.ExitStack() as locks:
    # --- One writer per workdir: a second run there stops here. ---
    for workdir in workdirs:
      lock = lock_workdir(workdir, lock_timeout_s)
      if lock is not None:  # A run refused before its start leaves no trace.
        locks.callback(lock.release, remove_new_workdir=True)
    todo = []
    for i, (config, workdir) in enumerate(zip(configs, workdirs)):
      done = completed_summary(workdir, config)
      if done is None:
        todo.append(i)
      else:
        summaries[i] = done  # Running a finished run again changes nothing.
    if not todo:
      return [summaries[i] for i in range(len(configs))]

    # --- Model, optimizer, batch source and jitted steps, from one builder. ---
    if not packed:
      compilation.use_cache(workdirs[0])  # A resumed run loads its programs (unless a sweep's).
    mesh = parallel.make_mesh()
    build = trainers.build if trainers else trainer_lib.build
    trainer = build(configs[todo[0]], info, mesh)

    # --- State: fresh, or the newest intact checkpoint if the config matches it. ---
    by_step: dict[int, list[Member]] = {}
    for i in todo:
      run_trainer = trainer.for_config(configs[i])
      start = run_trainer.restore_or_init(os.path.join(workdirs[i], "checkpoints"))
      if start.step >= configs[i].num_steps:  # Trained already: its records say how it ended.
        summaries[i] = finished_summary(
            configs[i], workdirs[i], start, steps.count_params(start.state.params),
            info.num_train, evaluate=lambda t=run_trainer, s=start.state: t.evaluate(s))
      else:
        by_step.setdefault(start.step, []).append(Member(i, configs[i], workdirs[i], start))
    for members in by_step.values():
      if packed:
        config, size = members[0].config, len(members)
        trainer = (trainers.build(config, info, mesh, population=size) if trainers else
                   trainer_lib.build(config, info, mesh, trainer.source, population=size))
      summaries.update(_run(trainer, members, info.num_train))
  return [summaries[i] for i in range(len(configs))]


def _run(trainer: trainer_lib.Trainer, members: list[Member],
         num_train: int) -> dict[int, reporting.Summary]:
  """Trains members restored at the same step to the end, writing each one's records; returns
  their summaries by Member.index."""
  first_step = members[0].start.step
  num_params = steps.count_params(members[0].start.state.params)
  is_writer = jax.process_index() == 0
  # --- From here on the workdirs are written. ---
  for m in members:
    if is_writer:
      reporting.write_json_atomic(os.path.join(m.workdir, reporting.CONFIG_FILE),
                                  m.config.to_dict())
      # Events of steps past the checkpoint are logged again; with no checkpoint, all of them.
      reporting.truncate_metrics(m.workdir, first_step if first_step else -1)
      _remove(os.path.join(m.workdir, reporting.SUMMARY_FILE))  # Stale until this part ends.
      m.best = reporting.best_test_error(reporting.read_metrics(m.workdir))
    m.saver = checkpoints.Saver(os.path.join(m.workdir, "checkpoints"),
                                keep=m.config.keep_checkpoints)
    m.reporter = reporting.Reporter(
        m.workdir, num_steps=m.config.num_steps, first_step=first_step, enabled=is_writer,
        progress_bar=m.config.progress_bar and len(members) == 1,
        wall_time_s=m.start.wall_time_s)
    m.record = reporting.Summary.failed("stopped before the end", step=first_step,
                                        wall_time_s=m.start.wall_time_s,
                                        num_params=num_params).to_dict()
  # Signals only set a flag from here until the last save has completed.
  with preemption.StopRequest(synced=jax.process_count() > 1) as stop:
    try:
      _train_loop(trainer, members, num_train, stop)
      for m in members:
        m.saver.wait()  # A failed final save surfaces here.
    except BaseException as e:
      for m in members:
        m.record.update(status=reporting.FAILED, message=f"{type(e).__name__}: {e}")
        _close_quietly(m.saver, m.reporter)
      raise
    else:
      for m in members:
        m.saver.close()
        m.reporter.close()
    finally:
      for m in members:
        m.record["wall_time_s"] = round(m.reporter.wall_time(), 3)
        if is_writer:
          try:
            reporting.Summary(**m.record).write(m.workdir)
          except OSError as e:  # A full disk, say: the error in flight matters more.
            reporting.warn(f"could not write {reporting.SUMMARY_FILE} of {m.workdir}: {e}")
  return {m.index: reporting.Summary(**m.record) for m in members}


def _close_quietly(saver: checkpoints.Saver, reporter: reporting.Reporter) -> None:
  """Closes both after a failure, whose error is the one to report: a save in flight finishes
  (or fails again, as on a full disk), and closing may fail for the same cause."""
  for close in (saver.wait, saver.close, reporter.close):
    with contextlib.suppress(Exception):
      close()


def _remove(path: str) -> None:
  if os.path.exists(path):
    os.remove(path)


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
      test_error=evals[-1]["test_error"], best_test_error=reporting.best_test_error(events),
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


def _train_loop(trainer: trainer_lib.Trainer, members: list[Member], num_train: int,
                stop: preemption.StopRequest) -> None:
  """Runs steps start.step+1..num_steps of every member, keeping each one's summary fields in
  its `record` current.

  The members share their config but for the step's inputs (one member, or a population:
  trainer.population). A member whose loss becomes NaN or Inf is recorded as diverged at the
  log point that sees it and frozen while the others go on. Stops after the call in flight when
  `stop` is requested, with the last step logged and checkpointed. A call runs up to
  trainer.steps_per_call steps, ending where the loop has work (call_length).
  """
  config, first_step = members[0].config, members[0].start.step
  alone = members[0]  # Profiles, diagnostics and instruments: runs trained alone only.
  state = trainer.stack([m.start.state for m in members])
  totals = trainer.zero_totals()
  active = np.ones(len(members), bool)
  active_arg = parallel.put_replicated(active, trainer.mesh) if trainer.population else None
  if first_step == 0:  # The instruments measure the initial network too.
    _record_instruments(config, trainer, state, 0, alone.reporter, num_train)
  mark_step, mark_time, compile_s = first_step, time.time(), 0.0

  step = first_step
  with compilation.CompileClock() as clock:
    while step < config.num_steps:
      if config.profile_steps and step == first_step + 1:  # Trace after the first, slow call.
        alone.saver.wait()  # The profiler must not start or stop while a save's threads run.
        jax.profiler.start_trace(os.path.join(alone.workdir, "profile"))
      diag_now = bool(config.diagnostics_every) and step % config.diagnostics_every == 0
      count = 1 if diag_now else call_length(config, trainer.steps_per_call, step, first_step)
      compiling = clock.seconds
      state, totals, diag = trainer.train(state, totals, steps=count, with_diagnostics=diag_now,
                                          active=active_arg)
      compiled = clock.seconds - compiling  # A program's first call compiles it.
      compile_s, mark_time = compile_s + compiled, mark_time + compiled
      step += count
      for m, on in zip(members, active):
        if on:
          m.record["step"] = step
      if config.profile_steps and step == first_step + 1 + config.profile_steps:
        jax.block_until_ready(state)
        alone.saver.wait()
        jax.profiler.stop_trace()
      if diag_now:  # Norms of the network that step `step - 1` saw.
        alone.reporter.write({"event": reporting.DIAGNOSTICS, "step": step - 1,
                              **{kind: {block: float(v) for block, v in values.items()}
                                 for kind, values in parallel.to_host(diag).items()}})
      # Before the checkpoint of this step, so that a run resumed from it records each step once.
      mark_time += _record_instruments(config, trainer, state, step, alone.reporter, num_train)

      stop_now = step < config.num_steps and stop.requested(step)  # Every process asks.
      log_now, ckpt_now, eval_now = work_due(config, step, stop_now)
      if not (log_now or ckpt_now or eval_now):
        continue
      t = parallel.to_host(totals)  # The only host sync between log points.
      lrs = trainer.learning_rates(state)
      for i, m in enumerate(members):
        if active[i] and trainer.member(t, i)["nonfinite"]:
          m.record.update(status=reporting.DIVERGED,
                          message=diverged_message(step, float(lrs[i])))
          active[i] = False
      if not active.any():
        return
      if trainer.population:
        active_arg = parallel.put_replicated(active, trainer.mesh)
      training = [(i, members[i]) for i in np.flatnonzero(active)]
      if log_now:
        img_per_s = (step - mark_step) * config.batch_size / (time.time() - mark_time)
        for i, m in training:
          event = train_event(config, num_train, step, trainer.member(t, i), lr=float(lrs[i]),
                              img_per_s=img_per_s, wall_time_s=m.reporter.wall_time())
          m.record.update(train_loss=event["loss"], train_error=event["train_error"])
          if mark_step == first_step:
            event["compile_s"] = round(compile_s, 3)
          m.reporter.write(event)
        totals = trainer.zero_totals()
        mark_step = step
      if eval_now:
        sums = trainer.evaluate(state)
        for i, m in training:
          event = eval_event(trainer.member(sums, i), step, epoch_of(config, num_train, step),
                             m.reporter.wall_time())
          m.best = min(m.best, event["test_error"])
          m.record.update(test_error=event["test_error"], best_test_error=m.best)
          m.reporter.write(event)
      if ckpt_now:
        for i, m in training:
          m.saver.save(step, trainer.member(state, i), m.config,
                       wall_time_s=m.reporter.wall_time(), extra_items=trainer.save_items())
      if stop_now:
        for _, m in training:
          m.record.update(status=reporting.PREEMPTED, message=preempted_message(stop, step))
        return
      mark_time = time.time()  # Throughput counts training time only.

  for i in np.flatnonzero(active):
    members[i].record.update(status=reporting.COMPLETED, message="finished",
                             best_test_error=members[i].best if np.isfinite(members[i].best)
                             else float("nan"))


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
  loop next has work to do (a multiple of a field whose config.ROLES says `every`: a log,
  evaluation, checkpoint, instrument or diagnostics step; a profile mark; the last step), so
  that these fall at the same steps whatever steps_per_call is."""
  end = min(step + steps_per_call, config.num_steps)
  for field in config_lib.fields("every"):
    every = config[field]
    if every:
      end = min(end, (step // every + 1) * every)
  if config.profile_steps:
    for mark in (first_step + 1, first_step + 1 + config.profile_steps):
      if mark > step:
        end = min(end, mark)
  return end - step


def _record_instruments(config, trainer: trainer_lib.Trainer, state: steps.TrainState,
                        step: int, reporter: reporting.Reporter, num_train: int) -> float:
  """Measures the instruments due at `step` (instruments.due) on `state`, the network after
  `step` updates, and writes their events. Returns the seconds they took, which the throughput
  leaves out."""
  due = instruments.due(config, step)
  if not due:
    return 0.0
  jax.block_until_ready(state)  # The steps still in flight count as training.
  start = time.time()
  common = {"step": step, "epoch": epoch_of(config, num_train, step),
            "lr": float(trainer.learning_rates(state)[0])}
  for name in due:
    reporter.write({"event": instruments.INSTRUMENTS[name].event, **common,
                    **trainer.measure(name, state)})
  return time.time() - start
