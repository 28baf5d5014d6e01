"""Launching a sweep or a run onto a SLURM cluster, through submitit.

`--launch=slurm` on `resnet_jax.sweep` submits the sweep's unfinished points as one job array,
one point per array task; on `resnet_jax.main` it submits the run as one job. The scheduler's
options are the `--slurm_*` flags below (SlurmOptions from Python). The job id is recorded in the
workdir (JOB_FILE); while that job is still queued or running, launching again submits nothing
and says so. `--wait` follows the job with one progress line and ends as the local command ends
(the sweep's results.csv and table, or the run's summary).

submitit writes the job script, pickles the task, and owns the requeue: SLURM is asked
(`--signal=USR2@<signal_delay_s>`) to send USR2 that many seconds before the time limit. A task
turns USR2 into the SIGTERM a run already stops on (preemption.py: it finishes the step in flight,
checkpoints, records `preempted`), then hands USR2 to submitit's handler, which requeues the job
(`scontrol requeue`, at most max_num_timeout times for time limits) and exits; the requeued task
resumes its point from the checkpoint. `scancel --signal=USR2` takes the same path. A SIGTERM
alone (SLURM preempting the job, or scancel) stops the run the same way, and the task then waits
for SLURM to end it: SLURM requeues a preempted job itself (PreemptMode=REQUEUE) when it kills
it, and a cancelled job stays cancelled. A point that fails or diverges is recorded and its task
ends.

State comes from `squeue` and the points' own summary.json, not from `sacct`: a cluster without
accounting storage (slurmdbd) has no sacct, and submitit's job states then read UNKNOWN; a point's
summary says how it ended, which SLURM's job state cannot (a failed point is a task that exited
cleanly).

A task of several processes (--slurm_nodes, --slurm_tasks_per_node) runs one process per task
under srun; `parallel.initialize_distributed()` finds the peers from SLURM's environment.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable, Sequence

import ml_collections
import submitit
from absl import flags
from submitit.core import utils as submitit_utils

from resnet_jax import config as config_lib
from resnet_jax import parallel, points, reporting, results, runner

JOB_FILE = "slurm_job.json"  # In the workdir: the submitted job's id and the points it runs.
LOG_DIR = "slurm"  # In the workdir: submitit's job scripts, pickled tasks and task logs.
POLL_S = 5.0  # How often --wait asks squeue.

# sbatch options the launcher sets itself, or that have a flag of their own.
_OWN_OPTIONS = {"array": None, "signal": "--slurm_signal_delay_s", "output": None,
                "error": None, "open-mode": None, "partition": "--slurm_partition",
                "account": "--slurm_account", "time": "--slurm_time", "nodes": "--slurm_nodes",
                "ntasks-per-node": "--slurm_tasks_per_node",
                "cpus-per-task": "--slurm_cpus_per_task", "gpus-per-task": "--slurm_gpus_per_task"}
_TIME_FORMS = (r"(?P<m>\d+)", r"(?P<m>\d+):(?P<s>\d+)", r"(?P<h>\d+):(?P<m>\d+):(?P<s>\d+)",
               r"(?P<d>\d+)-(?P<h>\d+)", r"(?P<d>\d+)-(?P<h>\d+):(?P<m>\d+)",
               r"(?P<d>\d+)-(?P<h>\d+):(?P<m>\d+):(?P<s>\d+)")


@dataclasses.dataclass(frozen=True)
class SlurmOptions:
  """What a job asks SLURM for; `time` and `sbatch` as sbatch takes them (sbatch: key=value)."""
  partition: str | None = None
  account: str | None = None
  time: str = "1:00:00"
  gpus_per_task: int = 0
  cpus_per_task: int = 1
  nodes: int = 1
  tasks_per_node: int = 1
  array_parallelism: int = 256
  signal_delay_s: int = 120
  sbatch: tuple[str, ...] = ()

  def parameters(self) -> dict:
    """submitit.SlurmExecutor's parameters; raises ConfigError naming what is allowed."""
    minutes = time_minutes(self.time)
    for name in ("cpus_per_task", "nodes", "tasks_per_node", "array_parallelism"):
      if getattr(self, name) < 1:
        raise config_lib.ConfigError(f"--slurm_{name} must be >= 1; got {getattr(self, name)}")
    if self.gpus_per_task < 0:
      raise config_lib.ConfigError(f"--slurm_gpus_per_task must be >= 0; got {self.gpus_per_task}")
    if not 0 < self.signal_delay_s < minutes * 60:
      raise config_lib.ConfigError(
          f"--slurm_signal_delay_s must be above 0 and below the time limit ({minutes * 60} s); "
          f"got {self.signal_delay_s}")
    extra = {"requeue": True}  # scontrol requeue needs it where the cluster's default is off.
    for option in self.sbatch:
      key, has_value, value = option.partition("=")
      if not re.fullmatch(r"[a-z][a-z0-9-]*", key):
        raise config_lib.ConfigError(f"--slurm_sbatch must be key=value or key, an sbatch option "
                                     f"without its dashes (qos=high, hold); got {option!r}")
      if key in _OWN_OPTIONS:
        flag = _OWN_OPTIONS[key]
        raise config_lib.ConfigError(f"--slurm_sbatch={option}: " + (
            f"use {flag}" if flag else f"the launcher sets sbatch --{key} itself"))
      extra[key] = value if has_value else True
    params = dict(time=minutes, nodes=self.nodes, ntasks_per_node=self.tasks_per_node,
                  cpus_per_task=self.cpus_per_task, array_parallelism=self.array_parallelism,
                  signal_delay_s=self.signal_delay_s, stderr_to_stdout=True,
                  additional_parameters=extra)
    if self.gpus_per_task:
      params["gpus_per_task"] = self.gpus_per_task
    params.update({k: v for k, v in (("partition", self.partition), ("account", self.account))
                   if v})
    return params


_LAUNCH = flags.DEFINE_enum("launch", "local", ["local", "slurm"],
                            "Where to run: here, or submitted to SLURM (the --slurm_* flags).")
_WAIT = flags.DEFINE_bool("wait", False, "With --launch=slurm: follow the job until it ends.")
# SlurmOptions' fields as flags --slurm_<field>, with its defaults.
_OPTION_FLAGS = {
    "partition": flags.DEFINE_string("slurm_partition", None, "sbatch --partition."),
    "account": flags.DEFINE_string("slurm_account", None, "sbatch --account."),
    "time": flags.DEFINE_string(
        "slurm_time", SlurmOptions.time,
        "Time limit per task: minutes or [days-]hours:minutes:seconds."),
    "gpus_per_task": flags.DEFINE_integer(
        "slurm_gpus_per_task", SlurmOptions.gpus_per_task, "GPUs per task (process)."),
    "cpus_per_task": flags.DEFINE_integer(
        "slurm_cpus_per_task", SlurmOptions.cpus_per_task, "CPUs per task (process)."),
    "nodes": flags.DEFINE_integer(
        "slurm_nodes", SlurmOptions.nodes, "Nodes per run (per point of a sweep)."),
    "tasks_per_node": flags.DEFINE_integer(
        "slurm_tasks_per_node", SlurmOptions.tasks_per_node,
        "Processes per node: one per GPU, or several on CPUs."),
    "array_parallelism": flags.DEFINE_integer(
        "slurm_array_parallelism", SlurmOptions.array_parallelism,
        "Points of a sweep running at once, at most."),
    "signal_delay_s": flags.DEFINE_integer(
        "slurm_signal_delay_s", SlurmOptions.signal_delay_s,
        "Seconds before the time limit at which a task is told to checkpoint and requeue: "
        "longer than a step and a checkpoint take."),
    "sbatch": flags.DEFINE_multi_string(
        "slurm_sbatch", [], "Any other sbatch option, as key=value or key (qos=high)."),
}


def time_minutes(text: str) -> int:
  """sbatch's --time forms (90, 1:30:00, 2-12:00:00) -> whole minutes, rounded up."""
  for form in _TIME_FORMS:
    match = re.fullmatch(form, text.strip())
    if match:
      parts = {k: int(v) for k, v in match.groupdict().items() if v is not None}
      seconds = (((parts.get("d", 0) * 24 + parts.get("h", 0)) * 60 + parts.get("m", 0)) * 60
                 + parts.get("s", 0))
      if seconds > 0:
        return -(-seconds // 60)
  raise config_lib.ConfigError(
      "--slurm_time must be minutes, minutes:seconds, hours:minutes:seconds, days-hours, "
      f"days-hours:minutes or days-hours:minutes:seconds, above zero (sbatch --time); got {text!r}")


def requested() -> bool:
  """Whether the command line asked for --launch=slurm."""
  return _LAUNCH.value == "slurm"


def options_from_flags() -> SlurmOptions:
  """The --slurm_* flags, checked (ConfigError); --wait is read by the commands themselves."""
  values = {field: holder.value for field, holder in _OPTION_FLAGS.items()}
  options = SlurmOptions(**{**values, "sbatch": tuple(values["sbatch"])})
  options.parameters()
  return options


def wait_requested() -> bool:
  return _WAIT.value


def check_local() -> None:
  """Without --launch=slurm, the --slurm_* flags and --wait would be silently ignored: refused."""
  given = [f"--{holder.name}" for holder in (_WAIT, *_OPTION_FLAGS.values()) if holder.present]
  if given:
    raise config_lib.ConfigError(f"{', '.join(given)} only apply with --launch=slurm")


# --- Submitting ---

@dataclasses.dataclass(frozen=True)
class Job:
  """A submitted job, as JOB_FILE records it: its id, and the sweep points its tasks run (task k
  runs point indices[k]; empty for a single run). A sweep of one point is a plain job, as
  submitit submits it, not an array."""
  job_id: str
  indices: tuple[int, ...] = ()
  array: bool = False

  def write(self, workdir: str) -> None:
    reporting.write_json_atomic(os.path.join(workdir, JOB_FILE), dataclasses.asdict(self))

  @classmethod
  def read(cls, workdir: str) -> Job | None:
    path = os.path.join(workdir, JOB_FILE)
    if not os.path.exists(path):
      return None
    with open(path) as f:
      record = json.load(f)
    return cls(record["job_id"], tuple(record["indices"]), record["array"])

  def task_id(self, task: int = 0) -> str:
    """SLURM's id of array task `task` (of the job itself, when it is not an array)."""
    return f"{self.job_id}_{task}" if self.array else self.job_id

  def log(self, workdir: str, task: int = 0, process: int = 0) -> str:
    """The output of one process of one task, where submitit writes it."""
    return str(submitit_utils.JobPaths(os.path.join(workdir, LOG_DIR, "%j"),
                                       job_id=self.task_id(task), task_id=process).stdout)

  def queued(self) -> dict[int, str]:
    """The job's tasks still in SLURM's queue: {array task id (0 for a single run): state}."""
    out = subprocess.run(["squeue", "--noheader", "--array", f"--jobs={self.job_id}",
                          "--format=%K %T"], capture_output=True, text=True, check=False)
    if out.returncode != 0:  # SLURM has forgotten the job: it ended a while ago.
      return {}
    tasks = {}
    for line in out.stdout.splitlines():
      task, _, state = line.strip().partition(" ")
      tasks[int(task) if task.isdigit() else 0] = state
    return tasks


def live_job(workdir: str, what: str = "sweep") -> Job | None:
  """The job recorded in `workdir` if it still has tasks queued or running (saying so: nothing
  will be submitted), else None."""
  job = Job.read(workdir)
  if job is None or not job.queued():
    return None
  print(f"{what} already submitted as SLURM job {job.job_id}, still queued or running: "
        "nothing submitted", flush=True)
  return job


def submit_sweep(sweep_config: ml_collections.ConfigDict, workdir: str,
                 options: SlurmOptions) -> Job | None:
  """Submits the sweep's unfinished points as one job array; returns it, or None if every point
  is finished. A job recorded in `workdir` that is still queued or running is returned instead,
  and nothing is submitted."""
  executor = _executor(workdir, options)
  sweep = points.expand(sweep_config)
  live = live_job(workdir, "sweep")
  if live is not None:
    return live
  todo = [p.index for p in sweep if not runner.is_finished(p.summary(workdir), p.config)]
  if not todo:
    print("every point is finished: nothing submitted", flush=True)
    return None
  os.makedirs(workdir, exist_ok=True)
  points.save_sweep(sweep_config, workdir)  # The tasks read the sweep from here.
  task = SweepTask(os.path.abspath(workdir))
  job = _submit(workdir, lambda: executor.map_array(task, todo), todo)
  print(f"submitted {len(todo)} of {len(sweep)} points as SLURM job "
        f"{'array ' if job.array else ''}{job.job_id}; logs in {os.path.join(workdir, LOG_DIR)}",
        flush=True)
  return job


def submit_run(config: ml_collections.ConfigDict, workdir: str, options: SlurmOptions) -> Job:
  """Submits one run (train.train_and_evaluate) as one job of nodes x tasks_per_node processes;
  a job recorded in `workdir` that is still queued or running is returned instead."""
  executor = _executor(workdir, options)
  config_lib.validate(config)  # What can be checked before the devices are known.
  live = live_job(workdir, "run")
  if live is not None:
    return live
  os.makedirs(workdir, exist_ok=True)
  task = RunTask(config, os.path.abspath(workdir))
  job = _submit(workdir, lambda: [executor.submit(task)], ())
  print(f"submitted the run as SLURM job {job.job_id}; logs in "
        f"{os.path.join(workdir, LOG_DIR)}", flush=True)
  return job


def _executor(workdir: str, options: SlurmOptions) -> submitit.SlurmExecutor:
  """submitit's executor for a job of `options` in `workdir`, which it does not write yet; raises
  ConfigError for bad options, or where SLURM's commands are missing."""
  parameters = options.parameters()
  try:
    executor = submitit.SlurmExecutor(folder=os.path.join(workdir, LOG_DIR, "%j"))
  except RuntimeError as e:  # No srun on PATH.
    raise config_lib.ConfigError(f"--launch=slurm needs SLURM's commands here: {e}") from None
  executor.update_parameters(job_name=os.path.basename(os.path.abspath(workdir)), **parameters)
  return executor


def _submit(workdir: str, submit: Callable[[], list[submitit.Job]],
            indices: Sequence[int]) -> Job:
  """`submit()`, then records the job in `workdir`."""
  try:
    jobs = submit()
  except (submitit_utils.FailedJobError, submitit_utils.FailedSubmissionError) as e:
    # sbatch refused the job (an unknown partition or option): bad input, nothing was queued.
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    raise config_lib.ConfigError(f"sbatch refused the job: {lines[-1] if lines else e}") from None
  job_id, _, task = jobs[0].job_id.partition("_")
  job = Job(job_id, tuple(indices), array=bool(task))
  job.write(workdir)
  return job


# --- In the task ---

class _TimeLimitWarning:
  """In a task: submitit's USR2 (the time limit is near, or scancel --signal=USR2) becomes the
  SIGTERM a run stops on; `requeue()` then hands USR2 on to submitit's handler, which requeues
  the job and exits (task 0; other tasks return).

  Once the run has returned, a USR2 is ignored, not handed on: a task can receive one scancel's
  USR2 more than once (SLURM's controller signals the job and then its steps, and retries a
  delivery a busy node was slow to answer). Handed to submitit while it requeues, a second USR2
  would requeue the job again; after a completed run, it would requeue finished work."""

  def __enter__(self) -> _TimeLimitWarning:
    self.received = False
    self._signum = signal.Signals[f"SIG{submitit.JobEnvironment.USR_SIG}"]
    self._submitit_handler = signal.signal(self._signum, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    signal.signal(self._signum, signal.SIG_IGN)

  def _handle(self, signum, frame) -> None:
    del signum, frame
    self.received = True
    os.kill(os.getpid(), signal.SIGTERM)

  def requeue(self) -> None:
    signal.signal(self._signum, signal.SIG_IGN)
    self._submitit_handler(self._signum, None)


def _task(run):
  """`run()` -> its reporting status, with the time-limit warning handled (see above)."""
  with _TimeLimitWarning() as warning:
    status = run()
    if status == reporting.PREEMPTED:
      if warning.received:
        warning.requeue()  # Task 0 requeues the job and exits; the others are ended with it.
      else:
        # SIGTERM alone: SLURM preempting the job, or scancel. SLURM requeues a job it preempts
        # only if the job is still running when SLURM kills it (one that exits first is
        # recorded COMPLETED), so the task stays, checkpointed, until then: requeued if
        # preempted, gone if cancelled. SLURM always follows SIGTERM with SIGKILL.
        print("stopped by SIGTERM, checkpointed: waiting for SLURM to requeue or end the job",
              flush=True)
      while True:
        time.sleep(60)
  return status


class SweepTask(submitit.helpers.Checkpointable):
  """An array task: runs point `index` of the sweep saved in `workdir`; returns its status.

  Checkpointable: submitit's requeue resubmits the same call. A point found finished returns at
  once."""

  def __init__(self, workdir: str):
    self.workdir = workdir

  def __call__(self, index: int) -> str:
    point = points.expand(points.load_sweep(self.workdir))[index]
    if runner.is_finished(point.summary(self.workdir), point.config):
      return point.summary(self.workdir).status

    def run() -> str:
      parallel.initialize_distributed()
      rows = runner.run_sweep(points.load_sweep(self.workdir), self.workdir, point_index=index)
      return rows[index]["status"]

    return _task(run)


class RunTask(submitit.helpers.Checkpointable):
  """The task of a single run: every process of the job runs `train.train_and_evaluate`."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str):
    self.config = config
    self.workdir = workdir

  def __call__(self) -> str:
    def run() -> str:
      parallel.initialize_distributed()
      from resnet_jax import train  # After distributed set-up, as in main.py.
      return train.train_and_evaluate(self.config, self.workdir).status

    return _task(run)


# --- Following ---

PROGRESS = ("done", "running", "pending", "preempted", "failed")


def sweep_progress(sweep: Sequence[points.Point], workdir: str, job: Job) -> dict[str, int]:
  """How many of the job's points are in each PROGRESS state, from squeue and their summaries."""
  queued = job.queued()
  counts = dict.fromkeys(PROGRESS, 0)
  for task, index in enumerate(job.indices):
    counts[_point_state(sweep[index].summary(workdir), queued.get(task))] += 1
  return counts


def _point_state(summary: reporting.Summary | None, queue_state: str | None) -> str:
  status = summary.status if summary is not None else None
  if status in (reporting.COMPLETED, reporting.DIVERGED):
    return "done"
  if status in (reporting.PREEMPTED, reporting.FAILED):
    return status
  if queue_state is None:  # Gone from the queue with no summary: killed before it wrote one.
    return "failed"
  return "running" if queue_state in ("RUNNING", "COMPLETING") else "pending"


def wait_sweep(sweep_config: ml_collections.ConfigDict, workdir: str, job: Job | None,
               poll_s: float = POLL_S) -> list[dict]:
  """Follows the job's array with one progress line until no task is queued or running, then
  writes results.csv and returns its rows."""
  sweep = points.expand(sweep_config)
  last = None
  while job is not None:
    queued = bool(job.queued())
    counts = sweep_progress(sweep, workdir, job)
    line = f"SLURM job {job.job_id}: " + ", ".join(f"{n} {state}" for state, n in counts.items())
    if line != last:
      print(line, flush=True)
      last = line
    if not queued:
      break
    time.sleep(poll_s)
  return results.write_results(sweep, workdir)


def wait_run(workdir: str, job: Job, poll_s: float = POLL_S) -> reporting.Summary:
  """Waits until the run's job has left the queue; returns its summary (failed if none)."""
  while job.queued():
    time.sleep(poll_s)
  summary = reporting.Summary.read(workdir)
  if summary is None:
    return reporting.Summary.failed(
        f"SLURM job {job.job_id} ended without a summary; see {job.log(workdir)}")
  return summary
