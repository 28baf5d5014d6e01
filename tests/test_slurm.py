"""Sweeps and runs on a real SLURM scheduler: `--launch=slurm` (resnet_jax/launch.py).

The scheduler is the one-node cluster of scripts/slurm_local.sh (`bash scripts/slurm_local.sh
start`); without it these tests skip, saying so, except in CI (CI=true), where they fail. The
tasks inherit this process's environment (sbatch's default --export=ALL): its 2 host devices and
its compilation cache, so a task's run equals the same run here, bitwise.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time

import ml_collections
from tests import multihost, test_train
import pytest
import submitit

from resnet_jax import config as config_lib
from resnet_jax import launch, points, reporting, runner

REPO = multihost.REPO
LOCAL_CONF = os.path.join(os.environ.get("RESNET_JAX_SLURM_DIR", "/tmp/resnet_jax_slurm"),
                          "slurm.conf")
# The runs compared: results.csv's columns that do not depend on the machine's speed.
COMPARED = ("name", "lr", "batch_size", "status", "train_error", "test_error",
            "best_test_error", "step", "num_params", "message")


@pytest.fixture(scope="session")
def slurm() -> None:
  """The local scheduler, answering, with its node up; SLURM_CONF set for every command. Only
  that one: a developer's real cluster is never sent these jobs."""
  os.environ["SLURM_CONF"] = LOCAL_CONF
  reason = "" if os.path.exists(LOCAL_CONF) else f"{LOCAL_CONF} does not exist"
  if not reason:
    try:
      ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=10)
      nodes = subprocess.run(["sinfo", "--noheader", "--format=%t"], capture_output=True,
                             text=True, timeout=10)
      if "UP" not in ping.stdout or not any(
          s.rstrip("*") in ("idle", "mix", "alloc") for s in nodes.stdout.split()):
        reason = (f"scontrol ping: {(ping.stdout + ping.stderr).strip()}; sinfo: "
                  f"{(nodes.stdout + nodes.stderr).strip()}")
    except (OSError, subprocess.TimeoutExpired) as e:
      reason = f"{type(e).__name__}: {e}"
  if reason:
    message = (f"no SLURM scheduler: {reason}; start the local one with "
               "`bash scripts/slurm_local.sh start` (root)")
    if os.environ.get("CI") == "true":
      pytest.fail(message)
    pytest.skip(message)


@pytest.fixture
def jobs():
  """Workdirs whose SLURM job is cancelled when the test ends, however it ends."""
  workdirs: list[str] = []
  yield workdirs
  for workdir in workdirs:
    job = launch.Job.read(workdir)
    if job is not None:
      subprocess.run(["scancel", job.job_id], check=False)


def tiny_sweep(data_dir: str, sweep_points, **fixed) -> ml_collections.ConfigDict:
  tiny = {"dataset": {"data_dir": data_dir, "eval_split": "test[:64]"}, "batch_size": 16,
          "eval_batch_size": 32, "num_steps": 4, "log_every": 2, "checkpoint_every": 0,
          "progress_bar": False, "model": test_train.tiny_model(), "optimizer": {"warmup_steps": 0},
          **fixed}
  return ml_collections.ConfigDict({"base": "configs/fashion_mnist.py", "fixed": tiny,
                                    "points": sweep_points})


def write_sweep_file(path, sweep_config: ml_collections.ConfigDict) -> str:
  path.write_text("import ml_collections\n\n\ndef get_config():\n"
                  f"  return ml_collections.ConfigDict({sweep_config.to_dict()!r})\n")
  return str(path)


def sweep_command(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "resnet_jax.sweep", *args], cwd=REPO,
                        capture_output=True, text=True, timeout=timeout)


def read_csv(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, "results.csv")) as f:
    return [{k: row[k] for k in COMPARED} for row in csv.DictReader(f)]


def task_log(workdir: str, job: launch.Job, task: int = 0, process: int = 0) -> str:
  with open(job.log(workdir, task, process)) as f:
    return f.read()


# --- Options, checked before anything is submitted (no scheduler needed) ---

@pytest.mark.parametrize("text, minutes", [("90", 90), ("1:30", 2), ("1:30:00", 90),
                                           ("2-00", 2880), ("1-01:00:01", 1501)])
def test_time_limits_are_read_as_sbatch_reads_them(text, minutes):
  assert launch.time_minutes(text) == minutes


@pytest.mark.parametrize("options, error", [
    ({"time": "1h"}, "--slurm_time must be minutes, minutes:seconds"),
    ({"time": "5", "signal_delay_s": 600},
     "--slurm_signal_delay_s must be above 0 and below the time limit (300 s); got 600"),
    ({"sbatch": ("time=10",)}, "--slurm_sbatch=time=10: use --slurm_time"),
    ({"sbatch": ("--qos high",)}, "--slurm_sbatch must be key=value or key"),
    ({"tasks_per_node": 0}, "--slurm_tasks_per_node must be >= 1; got 0")])
def test_bad_launch_options_are_refused_naming_the_flag(options, error):
  with pytest.raises(config_lib.ConfigError) as refused:
    launch.SlurmOptions(**options).parameters()
  assert str(refused.value).startswith(error)


def test_bad_launch_option_is_one_error_before_anything_is_written(tmp_path):
  # The command line's path for every option the test above refuses: its flag read, one line,
  # exit code 2 and no workdir.
  sweep_file = write_sweep_file(tmp_path / "sweep.py", tiny_sweep("/nowhere", [{"lr": 0.1}]))
  out = sweep_command(f"--config={sweep_file}", f"--workdir={tmp_path / 'runs'}",
                      "--launch=slurm", "--slurm_time=5", "--slurm_signal_delay_s=600")
  assert out.returncode == 2 and out.stderr == (
      "error: --slurm_signal_delay_s must be above 0 and below the time limit (300 s); "
      "got 600\n"), out.stderr
  assert not (tmp_path / "runs").exists()


def test_slurm_flags_without_launch_are_refused(tmp_path):
  out = sweep_command(f"--workdir={tmp_path}", "--report", "--slurm_time=10")
  assert out.returncode == 2
  assert "error: --slurm_time only apply with --launch=slurm" in out.stderr


def test_task_whose_point_is_finished_returns_at_once(tmp_path):
  sweep_config = tiny_sweep("/unused", [{"lr": 0.1}])
  points.save_sweep(sweep_config, str(tmp_path))
  point_dir = tmp_path / "lr=0.1"
  point_dir.mkdir()
  reporting.Summary.failed("finished", status="completed", step=4).write(str(point_dir))

  assert launch.SweepTask(str(tmp_path))(0) == "completed"
  assert sorted(os.listdir(tmp_path)) == ["lr=0.1", "sweep.json"]  # Nothing run, nothing written.
  assert os.listdir(point_dir) == ["summary.json"]


def test_usr2_delivered_twice_requeues_once_and_none_after_the_run():
  # SLURM may deliver a USR2 twice; stand-in for submitit's handler (the one in place when the
  # warning is entered) counts the requeues, and the second USR2 lands while it requeues.
  signum = signal.Signals[f"SIG{submitit.JobEnvironment.USR_SIG}"]
  requeued = []

  def submitit_handler(got, frame):
    del frame
    requeued.append(got)
    if len(requeued) == 1:
      os.kill(os.getpid(), signum)  # Python runs a handler at the next bytecode: here, if at all.

  before = signal.signal(signum, submitit_handler)
  try:
    with launch._TimeLimitWarning() as warning:  # pylint: disable=protected-access
      warning.requeue()
      os.kill(os.getpid(), signum)
    os.kill(os.getpid(), signum)  # After the run: ignored, the process lives on.
  finally:
    signal.signal(signum, before)
  assert requeued == [signum]


# --- Against the scheduler ---

@pytest.fixture(scope="module")
def array_sweep(slurm, prepared_data_dir, tmp_path_factory):
  """A 3-point sweep, one of whose points the run refuses (a batch the 2 devices cannot split),
  run as a SLURM array with the command line and --wait, and the same sweep run here."""
  del slurm
  tmp = tmp_path_factory.mktemp("array_sweep")
  sweep_config = tiny_sweep(prepared_data_dir, [{"lr": 0.1}, {"lr": 0.2}, {"batch_size": 13}])
  sweep_file = write_sweep_file(tmp / "sweep.py", sweep_config)
  workdir = str(tmp / "slurm")
  # Here first: its programs go into the session's compilation cache, which the tasks share.
  runner.run_sweep(sweep_config, str(tmp / "here"))
  try:
    out = sweep_command(f"--config={sweep_file}", f"--workdir={workdir}", "--launch=slurm",
                        "--slurm_time=10", "--wait")
  finally:
    job = launch.Job.read(workdir)
    if job is not None:
      subprocess.run(["scancel", job.job_id], check=False)
  return out, workdir, str(tmp / "here"), job


@pytest.mark.slurm
@pytest.mark.slow
def test_sweep_submitted_as_an_array_ends_as_the_same_sweep_run_here(array_sweep):
  out, workdir, here, job = array_sweep
  assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
  assert f"submitted 3 of 3 points as SLURM job array {job.job_id}" in out.stdout
  assert f"SLURM job {job.job_id}: 2 done, 0 running, 0 pending, 0 preempted, 1 failed" in (
      out.stdout)
  assert job.indices == (0, 1, 2)
  rows = read_csv(workdir)
  assert [(r["name"], r["status"]) for r in rows] == [
      ("lr=0.1", "completed"), ("lr=0.2", "completed"), ("batch_size=13", "failed")]
  assert rows == read_csv(here)  # Bitwise: the errors as written, to the last digit.


@pytest.mark.slurm
@pytest.mark.slow
def test_point_the_run_refuses_is_recorded_failed_and_not_requeued(array_sweep):
  _, workdir, _, job = array_sweep
  failed = read_csv(workdir)[2]
  assert failed["status"] == "failed"
  assert "batch_size (13) must be divisible by the number of devices (2)" in failed["message"]
  log = task_log(workdir, job, 2)
  assert log.count("Starting with JobEnvironment") == 1 and "Requeued" not in log


# Long enough that the task is still training when the interruption lands: SLURM took 1.6 s from
# the urgent job's sbatch to the preemption, time for about 65 of the tiny run's steps (about
# 25 ms each with a warm compilation cache; a run of 50 steps once finished first and nothing was
# preempted).
UNINTERRUPTED_STEPS = 200


@pytest.fixture(scope="module")
def uninterrupted(slurm, prepared_data_dir, tmp_path_factory):
  """A point of UNINTERRUPTED_STEPS run here without interruption: (its sweep config, its
  workdir). Run first, its programs go into the compilation cache that the tasks then read."""
  del slurm
  sweep_config = tiny_sweep(prepared_data_dir, [{"lr": 0.1}], num_steps=UNINTERRUPTED_STEPS,
                            log_every=1)
  here = str(tmp_path_factory.mktemp("uninterrupted"))
  runner.run_sweep(sweep_config, here)
  return sweep_config, os.path.join(here, "lr=0.1")


def run_interrupted(uninterrupted, tmp_path, jobs: list[str], interrupt) -> tuple[launch.Job, str]:
  """Submits the uninterrupted run's sweep, calls `interrupt(job)` once its point has trained 2
  steps, follows the job to its end and checks that the point ended bitwise where the
  uninterrupted run did: (the job, its task's log)."""
  sweep_config, here_dir = uninterrupted
  workdir = str(tmp_path / "slurm")
  jobs.append(workdir)
  job = launch.submit_sweep(sweep_config, workdir, launch.SlurmOptions(time="10"))
  point_dir = os.path.join(workdir, "lr=0.1")
  deadline = time.time() + 300
  while not [e for e in reporting.read_metrics(point_dir) if e["step"] >= 2]:
    assert time.time() < deadline, "the task did not start training"
    time.sleep(0.05)
  interrupt(job)
  launch.wait_sweep(sweep_config, workdir, job, poll_s=1)

  done, here = reporting.Summary.read(point_dir), reporting.Summary.read(here_dir)
  assert done.status == "completed" and done.step == UNINTERRUPTED_STEPS
  assert (done.train_loss, done.test_error) == (here.train_loss, here.test_error)
  assert multihost.max_abs_difference(multihost.params(point_dir, UNINTERRUPTED_STEPS),
                                      multihost.params(here_dir, UNINTERRUPTED_STEPS)) == 0.0
  return job, task_log(workdir, job)


@pytest.mark.slurm
@pytest.mark.slow
def test_task_signalled_before_its_time_limit_checkpoints_requeues_and_ends_bitwise(
    uninterrupted, tmp_path, jobs):
  # SLURM sends submitit's USR2 --slurm_signal_delay_s before the time limit; scancel sends it
  # now. The run stops at a step boundary, checkpointed and preempted; submitit requeues the
  # job, and its second start resumes the point to where an uninterrupted run ends.
  # SLURM may deliver one scancel's USR2 more than once, even to the requeued task (seen once
  # under load: three starts); every start after the first must then be one of ours: a
  # checkpointed preemption, then a requeue.
  job, log = run_interrupted(uninterrupted, tmp_path, jobs, lambda job: subprocess.run(
      ["scancel", "--signal=USR2", job.task_id()], check=True))

  lines = log.splitlines()
  events = "\n".join(line for line in lines if not line.startswith("[train]"))
  starts = sum("- Starting with JobEnvironment" in line for line in lines)
  requeues = sum(f"- Requeued job {job.task_id()} (" in line for line in lines)
  preempted = lines.count("point 0 lr=0.1: preempted")
  assert starts >= 2 and starts - 1 == requeues == preempted, events


@pytest.mark.slurm
@pytest.mark.slow
def test_task_slurm_preempts_checkpoints_is_requeued_by_slurm_and_ends_bitwise(
    uninterrupted, tmp_path, jobs):
  # A job in the local cluster's "urgent" partition that needs every CPU preempts the point's:
  # SIGTERM, then SIGKILL after KillWait (the partition has no GraceTime); SLURM requeues it.
  cpus = subprocess.run(["sinfo", "--noheader", "--partition=urgent", "--format=%c"],
                        capture_output=True, text=True, check=True).stdout.split()[0]
  urgent = []

  def preempt(job: launch.Job) -> None:
    del job
    urgent.append(subprocess.run(
        ["sbatch", "--parsable", "--partition=urgent", f"--cpus-per-task={cpus}",
         f"--output={tmp_path / 'urgent.out'}", "--wrap=true"],
        capture_output=True, text=True, check=True).stdout.strip())

  try:
    _, log = run_interrupted(uninterrupted, tmp_path, jobs, preempt)
  finally:
    subprocess.run(["scancel", *urgent], check=False)

  assert log.count("Starting with JobEnvironment") == 2, log[-3000:]
  assert "point 0 lr=0.1: preempted" in log
  assert "waiting for SLURM to requeue or end the job" in log and "Requeued job" not in log


@pytest.mark.slurm
@pytest.mark.slow
def test_two_tasks_under_srun_train_like_one_process_with_the_same_devices(
    slurm, prepared_data_dir, tmp_path, jobs):
  # No coordinator flags: each task's jax.distributed.initialize() reads SLURM's environment.
  del slurm
  single, multi = str(tmp_path / "single"), str(tmp_path / "multi")
  jobs.append(multi)
  launched = multihost.start(multi, prepared_data_dir, 2, "--launch=slurm",
                             "--slurm_tasks_per_node=2", "--slurm_time=10", "--wait")
  output = multihost.finish(launched)
  multihost.finish(multihost.start(single, prepared_data_dir, 4))

  assert "test accuracy" in output
  job = launch.Job.read(multi)
  logs = [task_log(multi, job, process=p) for p in range(2)]
  assert "global_rank=0(2)" in logs[0] and "global_rank=1(2)" in logs[1]
  multihost.assert_trains_like_one_process(single, multi)


@pytest.mark.slurm
def test_launching_again_while_the_array_is_queued_submits_nothing(slurm, tmp_path, jobs):
  del slurm
  sweep_file = write_sweep_file(tmp_path / "sweep.py",
                                tiny_sweep("/unused", [{"lr": 0.1}, {"lr": 0.2}]))
  workdir = str(tmp_path / "runs")
  jobs.append(workdir)
  # Held: the array stays queued, whatever the machine's speed, until it is cancelled.
  launch_args = (f"--config={sweep_file}", f"--workdir={workdir}", "--launch=slurm",
                 "--slurm_time=10", "--slurm_sbatch=hold")
  first = sweep_command(*launch_args)
  assert first.returncode == 0, first.stderr
  job = launch.Job.read(workdir)
  again = sweep_command(*launch_args)

  assert again.returncode == 0, again.stderr
  assert (f"sweep already submitted as SLURM job {job.job_id}, still queued or running: "
          "nothing submitted") in again.stdout
  assert launch.Job.read(workdir) == job
  queued = subprocess.run(["squeue", "--noheader", "--array", "--format=%i"],
                          capture_output=True, text=True, check=True).stdout.split()
  assert sorted(i for i in queued if i.startswith(f"{job.job_id}_")) == [
      f"{job.job_id}_0", f"{job.job_id}_1"]


@pytest.mark.slurm
def test_job_sbatch_rejects_is_an_error_and_nothing_is_recorded(slurm, tmp_path):
  del slurm
  sweep_file = write_sweep_file(tmp_path / "sweep.py", tiny_sweep("/unused", [{"lr": 0.1}]))
  out = sweep_command(f"--config={sweep_file}", f"--workdir={tmp_path / 'runs'}",
                      "--launch=slurm", "--slurm_time=10", "--slurm_partition=nosuch")
  assert out.returncode == 2, out.stderr
  # sbatch's own lines, then ours.
  assert "invalid partition specified: nosuch" in out.stderr
  assert out.stderr.splitlines()[-1].startswith("error: sbatch refused the job: ")
  assert not (tmp_path / "runs" / launch.JOB_FILE).exists()
