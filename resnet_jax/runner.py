"""Running a sweep's points: one after another, in worker processes at once, or as populations.

How points share the machine is the sweep's `pack` (PACK_MODES: off, processes:N, population:N,
auto, which AUTO_PACK resolves per platform; sweep.py and the README say what each does). Every
mode shares one persistent compilation cache in the sweep's workdir (compilation.py). Each point
is an ordinary run in its sub-workdir; a point that diverges or raises is recorded in its
summary.json and the sweep goes on. SIGTERM or SIGINT stops the sweep as it stops a run (the
points in flight checkpoint and record PREEMPTED; worker processes are sent SIGTERM, and get it
from the kernel if their parent dies: Linux's PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import ctypes
import functools
import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence

import ml_collections
from absl import logging

from resnet_jax import cli
from resnet_jax import config as config_lib
from resnet_jax import lock, points, preemption, reporting, results

WORKER_LOG = "sweep_worker.log"  # A worker process's output, in its point's directory.
# A parallel sweep's workers wait this long for a point whose previous worker is still stopping.
WORKER_LOCK_TIMEOUT_S = 120
_PARENT_ENV = "RESNET_JAX_SWEEP_PARENT"  # The parent's PID, in a parallel sweep's workers.
_MEM_FRACTION_ENV = "XLA_PYTHON_CLIENT_MEM_FRACTION"

RunFn = Callable[[ml_collections.ConfigDict, str], reporting.Summary]

PACK_MODES = ("off", "processes", "population")
# What `auto` picks by platform (jax.default_backend()), from experiments/pack_bench.py. A mode
# that did not pay on a platform is not picked there; unmeasured platforms (GPUs, so far) get
# "off". The measurements are in the README and experiments/results/pack_cpu.jsonl.
AUTO_PACK = {"cpu": "off"}


def parse_pack(text: str) -> tuple[str, int]:
  """`off`, `processes:N`, `population:N` or `auto` -> (mode, N); auto is resolved here, by
  platform (AUTO_PACK). Raises ConfigError naming what is allowed."""
  if text == "auto":
    import jax  # Late: only a sweep that packs automatically asks the platform.
    text = AUTO_PACK.get(jax.default_backend(), "off")
  mode, _, size = text.partition(":")
  allowed = "off, processes:N, population:N (N >= 1) or auto"
  if mode not in PACK_MODES or (mode == "off") != (size == ""):
    raise config_lib.ConfigError(f"pack must be {allowed}; got {text!r}")
  try:
    count = int(size) if size else 1
  except ValueError:
    count = 0
  if count < 1:
    raise config_lib.ConfigError(f"pack must be {allowed}; got {text!r}")
  return mode, count


def run_sweep(sweep_config: ml_collections.ConfigDict, workdir: str, *,
              run_fn: RunFn | None = None, point_index: int | None = None,
              devices: Sequence[str] = (), lock_timeout_s: float = 0.0,
              pack: str = "off") -> list[dict]:
  """Runs the sweep's unfinished points, then writes and returns the results table.

  Args:
    sweep_config: see resnet_jax/points.py.
    workdir: the sweep's directory; point i runs in workdir/<its name>. A whole sweep (no
      point_index) locks it: a second one there is refused.
    run_fn: runs one point, `(config, workdir) -> reporting.Summary`; default
      `train.train_and_evaluate`. Only with pack "off".
    point_index: run this point only (a cluster array task); None runs them all.
    devices: GPU ids handed out to the processes of pack "processes:N", in turn
      (CUDA_VISIBLE_DEVICES).
    lock_timeout_s: how long a point waits for its workdir while another process holds it.
    pack: how points share the machine: off, processes:N, population:N or auto (see above).

  Returns:
    results.results_table: one dict per point, in sweep order.
  """
  sweep = points.expand(sweep_config)
  if point_index is not None and not 0 <= point_index < len(sweep):
    raise config_lib.ConfigError(
        f"point_index must be in [0, {len(sweep) - 1}]; got {point_index}")
  mode, size = parse_pack(pack)
  if mode != "off" and run_fn is not None:
    raise config_lib.ConfigError(f"a run_fn runs with pack off only; got pack={pack!r}")
  sweep_lock = lock.WorkdirLock(workdir)
  if point_index is None:
    sweep_lock.acquire()  # Array tasks share the sweep's directory; whole sweeps do not.
  else:
    os.makedirs(workdir, exist_ok=True)
  try:
    points.save_sweep(sweep_config, workdir)
    selected = sweep if point_index is None else [sweep[point_index]]
    todo = []
    for point in selected:
      if is_finished(point.summary(workdir), point.config):
        _say(point, "finished, skipped")
      else:
        todo.append(point)
    if mode == "processes" and size > 1:
      _run_in_processes(todo, workdir, size, list(devices))
    else:
      _run_here(todo, workdir, run_fn, lock_timeout_s, population=size if mode == "population"
                else 1)
    return results.write_results(sweep, workdir)
  finally:
    sweep_lock.release()


def _run_here(todo: list[points.Point], workdir: str, run_fn: RunFn | None,
              lock_timeout_s: float, population: int) -> None:
  """Runs the points in this process, one run or one population of up to `population` at a
  time, until all have run or one is preempted."""
  trainers, synced = None, False
  if run_fn is None:
    import jax  # Late: --list and --report never train.
    from resnet_jax import compilation, trainer
    # A point of several processes (a multi-task SLURM array task) leaves SIGTERM to JAX's
    # preemption service, as its run does, so that every process stops at the same step.
    synced = jax.process_count() > 1
    compilation.use_cache(workdir)
    trainers = trainer.Cache()
    run_fn = functools.partial(_train_and_evaluate, lock_timeout_s=lock_timeout_s,
                               trainers=trainers)
  groups = _populations(todo, population) if population > 1 else [[p] for p in todo]
  with preemption.StopRequest(synced=synced) as stop:
    for group in groups:
      if stop.requested(0):
        break
      if len(group) == 1:
        summaries = [run_point(group[0], workdir, run_fn)]
      else:
        summaries = run_population(group, workdir, trainers, lock_timeout_s)
      if any(s is not None and s.status == reporting.PREEMPTED for s in summaries):
        stop.request("the preempted point")


def _populations(todo: list[points.Point], size: int) -> list[list[points.Point]]:
  """The points in groups of up to `size` that can train as one population (in sweep order of
  their first point), the others alone."""
  from resnet_jax import population  # Late: it imports JAX.
  groups: dict[str, list[list[points.Point]]] = {}
  out = []
  for point in todo:
    if population.packing_errors([point.config]):
      out.append([point])
      continue
    chunks = groups.setdefault(population.population_key(point.config), [])
    if not chunks or len(chunks[-1]) == size:
      chunks.append([])
      out.append(chunks[-1])
    chunks[-1].append(point)
  return out


def run_population(group: list[points.Point], workdir: str, trainers,
                   lock_timeout_s: float = 0.0) -> list[reporting.Summary | None]:
  """Runs the points as one population (train.train_population); a failure is recorded
  in each point's summary, not raised. None for points left to another process (a held
  workdir): then none of the group ran."""
  from resnet_jax import train  # Late: it imports JAX.
  names = ", ".join(point.name for point in group)
  for point in group:
    _clear_summary(point.run_dir(workdir))
    os.makedirs(point.run_dir(workdir), exist_ok=True)
    _say(point, f"running in {point.run_dir(workdir)}, in a population of {len(group)}")
  try:
    summaries = train.train_population([p.config for p in group],
                                       [p.run_dir(workdir) for p in group],
                                       trainers=trainers, lock_timeout_s=lock_timeout_s)
  except lock.WorkdirError as e:
    reporting.warn(f"population {names} skipped: {e}")
    return [None] * len(group)
  except Exception as e:  # pylint: disable=broad-except  # One group must not stop the sweep.
    logging.exception("population %s failed", names)
    reporting.warn(f"population {names} failed: {reporting.brief(e)}")
    summaries = [p.summary(workdir) or reporting.Summary.failed(f"{type(e).__name__}: {e}")
                 for p in group]
  for point, summary in zip(group, summaries):
    if point.summary(workdir) is None:
      summary.write(point.run_dir(workdir))
    _say(point, summary.status)
  return summaries


def is_finished(summary: reporting.Summary | None, config: ml_collections.ConfigDict) -> bool:
  """Diverged (running it again would diverge again), or completed to the config's num_steps.

  With config.num_epochs > 0 the step count is known only once the run reads its data, so any
  completed run counts as finished here; the run itself, if started, checks precisely.
  """
  if summary is None:
    return False
  if summary.status == reporting.DIVERGED:
    return True
  return summary.status == reporting.COMPLETED and (config.num_epochs > 0
                                                    or summary.step >= config.num_steps)


def run_point(point: points.Point, workdir: str, run_fn: RunFn) -> reporting.Summary | None:
  """Runs one point in its sub-workdir; a failure is recorded in its summary, not raised.

  Returns None for a point whose workdir another process holds: it is left to that process.
  """
  point_dir = point.run_dir(workdir)
  _clear_summary(point_dir)
  os.makedirs(point_dir, exist_ok=True)
  _say(point, f"running in {point_dir}")
  try:
    summary = run_fn(point.config, point_dir)
  except lock.WorkdirError as e:
    reporting.warn(f"point {point.index} {point.name} skipped: {e}")
    return None
  except Exception as e:  # pylint: disable=broad-except  # One point must not stop the sweep.
    logging.exception("point %d %s failed", point.index, point.name)  # --verbosity=-2 shows it.
    reporting.warn(f"point {point.index} {point.name} failed: {reporting.brief(e)}")
    # train_and_evaluate writes its own summary before re-raising, unless it failed too early.
    summary = point.summary(workdir) or reporting.Summary.failed(f"{type(e).__name__}: {e}")
  if point.summary(workdir) is None:
    summary.write(point_dir)
  _say(point, summary.status)
  return summary


def _say(point: points.Point, what: str) -> None:
  print(f"point {point.index} {point.name}: {what}", flush=True)


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                        lock_timeout_s: float = 0.0, trainers=None) -> reporting.Summary:
  from resnet_jax import train  # Late: --list, --report and a parallel parent never train.
  return train.train_and_evaluate(config, workdir, lock_timeout_s=lock_timeout_s,
                                  trainers=trainers)


def _clear_summary(point_dir: str) -> None:
  """A point about to run must not show the summary of its previous run. The processes of a
  multi-process point all clear it, so another may have removed it first."""
  with contextlib.suppress(FileNotFoundError):
    os.remove(os.path.join(point_dir, reporting.SUMMARY_FILE))


# --- Worker processes ---

def worker_command(workdir: str, index: int) -> list[str]:
  """The command a parallel sweep runs for point `index` of the sweep saved in `workdir`."""
  return [sys.executable, "-m", "resnet_jax.sweep", f"--workdir={workdir}",
          f"--point_index={index}", f"--lock_timeout_s={WORKER_LOCK_TIMEOUT_S}"]


def _run_in_processes(todo: list[points.Point], workdir: str, parallel: int,
                      devices: list[str]) -> None:
  """Runs the points in up to `parallel` worker processes; SIGTERM/SIGINT is passed on to them."""
  # Processes sharing one GPU: all of them, or the most that `devices` gives one id.
  sharing = (max(collections.Counter(devices[s % len(devices)] for s in range(parallel)).values())
             if devices else parallel)
  slots: queue.SimpleQueue[int] = queue.SimpleQueue()
  for slot in range(parallel):
    slots.put(slot)
  running: dict[int, subprocess.Popen] = {}
  guard = threading.Lock()

  def forward_stop() -> None:
    with guard:
      for process in running.values():
        with contextlib.suppress(ProcessLookupError):
          process.send_signal(signal.SIGTERM)

  def run(point: points.Point) -> None:
    slot = slots.get()
    try:
      code = run_worker(point, slot)
    finally:
      slots.put(slot)
    log_path = os.path.join(point.run_dir(workdir), WORKER_LOG)
    if code is None:  # Not started: the sweep was stopped first.
      return
    if code == cli.EXIT_USAGE:
      reporting.warn(f"point {point.index} {point.name} was not run; see {log_path}")
    elif point.summary(workdir) is None:
      reporting.Summary.failed_from_records(
          point.run_dir(workdir), f"worker process exited with code {code}; see {log_path}"
      ).write(point.run_dir(workdir))

  def run_worker(point: points.Point, slot: int) -> int | None:
    """The worker's exit code, or None if the sweep was stopped before it started."""
    point_dir = point.run_dir(workdir)
    env = dict(os.environ, **{_PARENT_ENV: str(os.getpid())})
    if devices:
      env["CUDA_VISIBLE_DEVICES"] = devices[slot % len(devices)]
    if sharing > 1:  # JAX's default, 75% of a GPU's memory each, would not fit them.
      env.setdefault(_MEM_FRACTION_ENV, f"{0.9 / sharing:.2f}")
    with guard:  # A stop request either comes first, or finds this worker to signal.
      if stop.requested(0):
        return None
      # Cleared here too: a worker that dies before starting must not leave an old summary.
      _clear_summary(point_dir)
      os.makedirs(point_dir, exist_ok=True)
      log_path = os.path.join(point_dir, WORKER_LOG)
      _say(point, f"running in a worker process, output in {log_path}")
      with open(log_path, "a") as log:
        running[point.index] = subprocess.Popen(worker_command(workdir, point.index), env=env,
                                                stdout=log, stderr=subprocess.STDOUT)
    code = running[point.index].wait()
    with guard:
      del running[point.index]
    return code

  with preemption.StopRequest(on_request=forward_stop) as stop:
    with concurrent.futures.ThreadPoolExecutor(parallel) as pool:
      list(pool.map(run, todo))


def stop_with_parent() -> None:
  """In a parallel sweep's worker: SIGTERM when the parent dies, so none is left orphaned.

  Linux's PR_SET_PDEATHSIG; the worker then stops like any run sent SIGTERM (checkpointed,
  PREEMPTED), and the next sweep resumes it. Outside a worker, or off Linux, does nothing.
  """
  parent = os.environ.get(_PARENT_ENV)
  if parent is None or not sys.platform.startswith("linux"):
    return
  pr_set_pdeathsig = 1
  ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
  if os.getppid() != int(parent):  # The parent died before prctl took effect.
    os.kill(os.getpid(), signal.SIGTERM)
