"""A population: several runs that share one compiled program, trained together on one device.

Points of a sweep that differ only in the step's inputs (learning rate, momentum, weight decay,
seed: trainer.STEP_INPUTS) run the same program. A population stacks their states on a leading
axis and makes one jax.vmap'd step of all of them, so a device that one small run keeps 1-2%
busy (a ResNet-20 step at batch 128 is bound by kernel launches) does P runs' arithmetic per
launch, after one compilation.

Every member is still an ordinary run: it keeps its own workdir, with the config, metrics,
checkpoints and summary a separate run writes, so reports, plots, skipping finished points and
resuming (packed or not) work unchanged. Its arithmetic is its separate run's up to rounding:
vmap turns a convolution over P kernels into a grouped convolution, summed in another order. A
member whose loss becomes NaN or Inf is recorded as diverged at the log point that sees it, as a
separate run is, and frozen (its state no longer changes) while the others go on. SIGTERM or
SIGINT checkpoints every member still training and records it PREEMPTED.

Whether a population pays is the platform's business: vmapped convolutions ran 4x slower than
one network on this project's CPU (see runner.AUTO_PACK for what `--pack=auto` picks where).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from resnet_jax import checkpoints, data, optim, parallel, preemption, reporting, steps, train
from resnet_jax import config as config_lib
from resnet_jax import trainer as trainer_lib


def packing_errors(configs: list[ml_collections.ConfigDict]) -> list[str]:
  """Why these (validated) configs cannot train as one population; [] when they can."""
  errors = []
  first = configs[0]
  key = population_key(first)
  if any(population_key(c) != key for c in configs[1:]):
    errors.append("its points differ in more than " + ", ".join(trainer_lib.STEP_INPUTS))
  if first.dataset.name in data.STREAMED:
    errors.append(f"{first.dataset.name} is streamed, a stream per run")
  for field in ("diagnostics_every", "sharpness_every", "noise_scale_every", "profile_steps"):
    if first[field]:
      errors.append(f"config.{field} is on (a population records none)")
  if jax.process_count() > 1:
    errors.append("it runs on several processes")
  return errors


def train_population(configs: list[ml_collections.ConfigDict], workdirs: list[str], *,
                     trainers: trainer_lib.Cache | None = None,
                     lock_timeout_s: float = 0.0) -> list[reporting.Summary]:
  """Trains the runs `configs[i]` in `workdirs[i]` as one population; returns their summaries.

  Each run resumes from its workdir's checkpoints and ends where it would end alone: runs
  already completed are not run again, and runs restored at different steps train as separate
  populations, one after the other. Raises what train.train_and_evaluate raises, and
  config.ConfigError (packing_errors) for configs that cannot share a program.
  """
  prepared = [train.prepare(c) for c in configs]
  configs, info = [c for c, _ in prepared], prepared[0][1]
  errors = packing_errors(configs)
  if errors:
    raise config_lib.ConfigError("these runs cannot train as one population: " +
                                 "; ".join(errors))
  summaries: dict[int, reporting.Summary] = {}
  with contextlib.ExitStack() as locks:
    for workdir in workdirs:
      lock = train.lock_workdir(workdir, lock_timeout_s)
      locks.callback(lock.release, remove_new_workdir=True)
    todo = []
    for i, (config, workdir) in enumerate(zip(configs, workdirs)):
      done = train.completed_summary(workdir, config)
      if done is None:
        todo.append(i)
      else:
        summaries[i] = done
    if not todo:
      return [summaries[i] for i in range(len(configs))]
    build = trainers.build if trainers else trainer_lib.build
    trainer = build(configs[todo[0]], info, parallel.make_mesh())
    by_step: dict[int, list[_Member]] = {}
    for i in todo:
      member_trainer = trainer.for_config(configs[i])
      start = member_trainer.restore_or_init(os.path.join(workdirs[i], "checkpoints"))
      if start.step >= configs[i].num_steps:
        summaries[i] = train.finished_summary(
            configs[i], workdirs[i], start, steps.count_params(start.state.params),
            info.num_train, evaluate=lambda t=member_trainer, s=start.state: t.evaluate(s))
      else:
        by_step.setdefault(start.step, []).append(_Member(i, configs[i], workdirs[i], start))
    for members in by_step.values():
      summaries.update(_run(trainer, members, info.num_train))
  return [summaries[i] for i in range(len(configs))]


def population_key(config: ml_collections.ConfigDict) -> str:
  """Equal for configs that may train in one population: they share everything but the step's
  inputs (trainer.STEP_INPUTS), bookkeeping included."""
  fields = config_lib.flatten(config)
  for name in trainer_lib.STEP_INPUTS:
    del fields[name]
  return repr(sorted(fields.items()))


@dataclasses.dataclass
class _Member:
  index: int
  config: ml_collections.ConfigDict
  workdir: str
  start: checkpoints.Restored
  saver: checkpoints.Saver | None = None
  reporter: reporting.Reporter | None = None
  record: dict = dataclasses.field(default_factory=dict)  # Its summary's fields so far.
  best: float = float("inf")


def programs(trainer: trainer_lib.Trainer, size: int) -> dict[str, object]:
  """The jitted programs of a population of `size` members of `trainer`'s config, made once per
  size and kept among trainer.train_programs (shared by every for_config copy):

    "train": (state, totals, inputs, active, count) -> (state, totals), `count` <=
             steps_per_call steps of every member whose `active` (bool [size]) is True; the
             others' state and totals are kept as they were;
    "eval":  (state, totals, inputs) -> totals, each member's sums over one eval batch.
  """
  name = f"population{size}"
  if name in trainer.train_programs:
    return trainer.train_programs[name]
  step = jax.vmap(lambda s, t, inputs: trainer.step_fn(s, t, inputs, with_diagnostics=False)[:2],
                  in_axes=(0, 0, None))

  def one_step(state, totals, inputs, active):
    new_state, new_totals = step(state, totals, inputs)
    keep = lambda new, old: jnp.where(active.reshape((-1,) + (1,) * (new.ndim - 1)), new, old)
    return jax.tree.map(keep, new_state, state), jax.tree.map(keep, new_totals, totals)

  def train_steps(state, totals, inputs, active, count):
    if trainer.steps_per_call == 1:  # On CPU: no loop (XLA's convolutions are slow in one).
      return one_step(state, totals, inputs, active)
    return jax.lax.fori_loop(0, count, lambda _, c: one_step(*c, inputs, active), (state, totals))

  def evaluate(state, totals, inputs):
    batch = trainer.source.eval_batch(inputs)
    return jax.vmap(lambda s, t: jax.tree.map(jnp.add, t, trainer.eval_step(s, batch)))(
        state, totals)

  replicated = parallel.replicated(trainer.mesh)
  made = {"train": jax.jit(train_steps, donate_argnums=(0, 1), out_shardings=replicated),
          "eval": jax.jit(evaluate, donate_argnums=(1,), out_shardings=replicated)}
  trainer.train_programs[name] = made
  return made


def stack(trees: list):
  """States (or totals) of members stacked on a new leading axis."""
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def member(tree, index: int):
  """Member `index`'s slice of a stacked state or totals."""
  return jax.tree.map(lambda x: x[index], tree)


def zeros(trainer: trainer_lib.Trainer, size: int, *, count_nonfinite: bool = True) -> dict:
  """Zeroed totals of `size` members (Trainer.zero_totals, stacked)."""
  return stack([trainer.zero_totals(count_nonfinite=count_nonfinite)] * size)


def _run(trainer: trainer_lib.Trainer, members: list[_Member],
         num_train: int) -> dict[int, reporting.Summary]:
  """Trains members restored at the same step to the end, writing each one's records."""
  config, first_step = members[0].config, members[0].start.step
  num_params = steps.count_params(members[0].start.state.params)
  is_writer = jax.process_index() == 0
  for m in members:
    if is_writer:
      reporting.write_json_atomic(os.path.join(m.workdir, reporting.CONFIG_FILE),
                                  m.config.to_dict())
      reporting.truncate_metrics(m.workdir, first_step if first_step else -1)
      path = os.path.join(m.workdir, reporting.SUMMARY_FILE)
      if os.path.exists(path):
        os.remove(path)
    m.saver = checkpoints.Saver(os.path.join(m.workdir, "checkpoints"),
                                keep=config.keep_checkpoints)
    m.reporter = reporting.Reporter(m.workdir, num_steps=config.num_steps,
                                    first_step=first_step, enabled=is_writer,
                                    progress_bar=False, wall_time_s=m.start.wall_time_s)
    m.record = reporting.Summary.failed("stopped before the end", step=first_step,
                                        wall_time_s=m.start.wall_time_s,
                                        num_params=num_params).to_dict()
    if is_writer:
      m.best = train.best_test_error(reporting.read_metrics(m.workdir))
  with preemption.StopRequest() as stop:
    try:
      _loop(trainer, members, num_train, stop)
      for m in members:
        m.saver.wait()
    except BaseException as e:
      for m in members:
        m.record.update(status=reporting.FAILED, message=f"{type(e).__name__}: {e}")
        for close in (m.saver.wait, m.saver.close, m.reporter.close):
          with contextlib.suppress(Exception):
            close()
      raise
    else:
      for m in members:
        m.saver.close()
        m.reporter.close()
    finally:
      for m in members:
        m.record["wall_time_s"] = round(m.reporter.wall_time(), 3)
        if is_writer:
          with contextlib.suppress(OSError):
            reporting.Summary(**m.record).write(m.workdir)
  return {m.index: reporting.Summary(**m.record) for m in members}


def _loop(trainer: trainer_lib.Trainer, members: list[_Member], num_train: int,
          stop: preemption.StopRequest) -> None:
  """train._train_loop for a population: the same calls, logs, evaluations and checkpoints,
  each member's written to its own records."""
  config, first_step, size = members[0].config, members[0].start.step, len(members)
  made = programs(trainer, size)
  state = stack([m.start.state for m in members])
  totals, active = zeros(trainer, size), np.ones(size, bool)
  on_device = lambda mask: parallel.put_replicated(mask, trainer.mesh)
  active_arg = on_device(active)
  start = time.time()
  if not isinstance(made["train"], jax.stages.Compiled):
    made["train"] = made["train"].lower(state, totals, trainer.source.train_inputs(), active_arg,
                                        trainer.step_count(1)).compile()
  compile_s = time.time() - start
  mark_step, mark_time = first_step, time.time()

  step = first_step
  while step < config.num_steps:
    count = train.call_length(config, trainer.steps_per_call, step, first_step)
    state, totals = made["train"](state, totals, trainer.source.train_inputs(), active_arg,
                                  trainer.step_count(count))
    step += count
    for m, on in zip(members, active):
      if on:
        m.record["step"] = step
    stop_now = step < config.num_steps and stop.requested(step)
    log_now, ckpt_now, eval_now = train.work_due(config, step, stop_now)
    if not (log_now or ckpt_now or eval_now):
      continue
    t = parallel.to_host(totals)
    lrs = parallel.to_host(optim.current_learning_rate(state.opt_state))
    for i, m in enumerate(members):
      if active[i] and t["nonfinite"][i]:
        m.record.update(status=reporting.DIVERGED,
                        message=train.diverged_message(step, float(lrs[i])))
        active[i] = False
    active_arg = on_device(active)
    if not active.any():
      return
    epoch = train.epoch_of(config, num_train, step)
    if log_now:
      img_per_s = (step - mark_step) * config.batch_size / (time.time() - mark_time)
      for i in np.flatnonzero(active):
        m = members[i]
        event = train.train_event(config, num_train, step, member(t, i), lr=float(lrs[i]),
                                  img_per_s=img_per_s, wall_time_s=m.reporter.wall_time())
        m.record.update(train_loss=event["loss"], train_error=event["train_error"])
        if mark_step == first_step:
          event["compile_s"] = round(compile_s, 3)
        m.reporter.write(event)
      totals = zeros(trainer, size)
      mark_step = step
    if eval_now:
      sums = zeros(trainer, size, count_nonfinite=False)
      for inputs in trainer.source.eval_inputs():
        sums = made["eval"](state, sums, inputs)
      sums = parallel.to_host(sums)
      for i in np.flatnonzero(active):
        m = members[i]
        event = train.eval_event(member(sums, i), step, epoch, m.reporter.wall_time())
        m.best = min(m.best, event["test_error"])
        m.record.update(test_error=event["test_error"], best_test_error=m.best)
        m.reporter.write(event)
    if ckpt_now:
      for i in np.flatnonzero(active):
        m = members[i]
        m.saver.save(step, member(state, i), m.config, wall_time_s=m.reporter.wall_time())
    if stop_now:
      for i in np.flatnonzero(active):
        members[i].record.update(status=reporting.PREEMPTED,
                                 message=train.preempted_message(stop, step))
      return
    mark_time = time.time()

  for i in np.flatnonzero(active):
    m = members[i]
    m.record.update(status=reporting.COMPLETED, message="finished",
                    best_test_error=m.best if np.isfinite(m.best) else float("nan"))
