"""Faults injected into tiny real runs: nothing trained is lost, nothing written is wrong.

Each test interrupts, corrupts or misuses a run of test_train.TINY_MODEL on Fashion-MNIST (batch
16, 12 steps, constant learning rate) and checks that the run ends where an uninterrupted one
ends, bitwise (one machine, one device count), with records that say what happened. Runs that
must receive a real signal or exit code run as `python -m resnet_jax.main` subprocesses; the rest
run in-process.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import types

import jax
import numpy as np
import pytest

from resnet_jax import (checkpoints, cli, compilation, config as config_lib, lock, parallel,
                        preemption, reporting, train)
from resnet_jax import trainer as trainer_lib
from tests import test_train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_STEPS = 12
# The fields every run here shares; a constant rate keeps num_steps out of the arithmetic.
TINY = {"dataset.eval_split": "test[:64]", "batch_size": 16, "eval_batch_size": 32,
        "num_steps": NUM_STEPS, "log_every": 1, "eval_every": 0, "checkpoint_every": 3,
        "keep_checkpoints": 2, "optimizer.schedule": "constant", "optimizer.warmup_steps": 0,
        "progress_bar": False, **test_train.TINY_MODEL}


def tiny_config(data_dir: str, **overrides) -> config_lib.ConfigDict:
  """test_train's tiny run with TINY's fields, the ones cli_args gives the command line too."""
  return test_train.tiny_config(data_dir, **{**TINY, **overrides})


def cli_args(data_dir: str, workdir: str, **overrides) -> list[str]:
  fields = {"dataset.data_dir": data_dir, **TINY, **overrides}
  return [sys.executable, "-m", "resnet_jax.main", "--config=configs/fashion_mnist.py",
          f"--workdir={workdir}", *(f"--config.{k}={v}" for k, v in fields.items())]


def start(data_dir: str, workdir: str, **overrides) -> subprocess.Popen:
  """A run in a subprocess (the test session's 2 CPU devices), its output in workdir.log."""
  log = open(f"{workdir}.log", "w")  # pylint: disable=consider-using-with
  return subprocess.Popen(cli_args(data_dir, workdir, **overrides), cwd=REPO, stdout=log,
                          stderr=subprocess.STDOUT, text=True)


def wait_for(predicate, process: subprocess.Popen | None = None, timeout: float = 300) -> None:
  deadline = time.time() + timeout
  while not predicate():
    assert process is None or process.poll() is None, "the run ended before the fault"
    assert time.time() < deadline, "timed out waiting"
    time.sleep(0.01)


def logged_steps(workdir: str) -> list[int]:
  path = os.path.join(workdir, reporting.METRICS_FILE)
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line)["step"] for line in f if line.endswith("\n")]


def final_state(workdir: str):
  return checkpoints.read_state(os.path.join(workdir, "checkpoints"))


def assert_same_state(workdir_a: str, workdir_b: str) -> None:
  (step_a, a), (step_b, b) = final_state(workdir_a), final_state(workdir_b)
  assert step_a == step_b == NUM_STEPS
  jax.tree.map(np.testing.assert_array_equal, a, b)


def tmp_dirs(workdir: str) -> list[str]:
  return glob.glob(os.path.join(workdir, "checkpoints", "*orbax-checkpoint-tmp*"))


@pytest.fixture(scope="module")
def straight_run(prepared_data_dir, tmp_path_factory) -> str:
  """The uninterrupted run every faulted run must end equal to."""
  workdir = str(tmp_path_factory.mktemp("straight") / "run")
  assert train.train_and_evaluate(tiny_config(prepared_data_dir), workdir).status == "completed"
  return workdir


# --- Preemption ---

@pytest.mark.slow
def test_sigterm_checkpoints_the_step_reached_and_the_rerun_resumes_bitwise(
    prepared_data_dir, straight_run, tmp_path):
  workdir = str(tmp_path / "run")
  run = start(prepared_data_dir, workdir)
  wait_for(lambda: 2 in logged_steps(workdir), run)
  run.send_signal(signal.SIGTERM)
  assert run.wait(timeout=120) == cli.EXIT_PREEMPTED == 75

  summary = reporting.Summary.read(workdir)
  stopped = summary.step
  assert summary.status == "preempted" and 2 <= stopped < NUM_STEPS
  assert "SIGTERM" in summary.message
  assert checkpoints.steps(os.path.join(workdir, "checkpoints"))[0] == stopped
  assert logged_steps(workdir)[-1] == stopped  # Its loss is logged too.
  assert tmp_dirs(workdir) == []  # The save completed before the exit.
  assert np.isfinite(summary.train_loss)

  resumed = train.train_and_evaluate(tiny_config(prepared_data_dir), workdir)
  assert resumed.status == "completed"
  assert_same_state(workdir, straight_run)


@pytest.mark.slow
def test_sigint_stops_the_same_way_in_process(prepared_data_dir, tmp_path, monkeypatch):
  # Ctrl-C in a notebook or terminal: the first one asks the loop to stop after its step.
  workdir = str(tmp_path / "run")
  real_save = checkpoints.Saver.save

  def save_then_interrupt(self, step, *args, **kwargs):
    real_save(self, step, *args, **kwargs)
    if step == 3:
      os.kill(os.getpid(), signal.SIGINT)

  monkeypatch.setattr(checkpoints.Saver, "save", save_then_interrupt)
  # A terminal's handler (pytest-xdist's workers ignore SIGINT).
  worker_handler = signal.signal(signal.SIGINT, signal.default_int_handler)
  try:
    summary = train.train_and_evaluate(tiny_config(prepared_data_dir), workdir)
    restored = signal.getsignal(signal.SIGINT)
  finally:
    signal.signal(signal.SIGINT, worker_handler)
  assert summary.status == "preempted" and "SIGINT" in summary.message
  assert summary.step == 4  # The step after the signal, logged and checkpointed.
  assert checkpoints.steps(os.path.join(workdir, "checkpoints")) == [4, 3]
  assert restored is signal.default_int_handler


@pytest.mark.slow
def test_kill_9_during_an_async_save_resumes_bitwise(prepared_data_dir, straight_run, tmp_path):
  workdir = str(tmp_path / "run")
  run = start(prepared_data_dir, workdir, checkpoint_every=1)
  # A save in flight while an earlier one is committed.
  wait_for(lambda: tmp_dirs(workdir) and checkpoints.steps(os.path.join(workdir, "checkpoints")),
           run)
  run.kill()
  run.wait()
  committed = checkpoints.steps(os.path.join(workdir, "checkpoints"))

  summary = train.train_and_evaluate(tiny_config(prepared_data_dir, checkpoint_every=1),
                                     workdir)
  assert summary.status == "completed"
  assert 0 < committed[0] < NUM_STEPS
  assert tmp_dirs(workdir) == []
  assert_same_state(workdir, straight_run)
  # Every step was logged once, the ones after the resumed checkpoint again, not twice.
  assert logged_steps(workdir) == list(range(1, NUM_STEPS + 1)) + [NUM_STEPS]
  # keep_checkpoints=2 holds across the resume, with the checkpoints of both segments.
  assert checkpoints.steps(os.path.join(workdir, "checkpoints")) == [NUM_STEPS, NUM_STEPS - 1]


@pytest.mark.slow
def test_sigterm_before_the_loop_exits_75_with_one_line_and_releases_the_lock(
    prepared_data_dir, tmp_path):
  # A checkpoint whose manifest is a FIFO holds the run in its restore, with the workdir locked
  # and the loop's handlers not yet installed, for as long as the test keeps it open unwritten.
  workdir = tmp_path / "run"
  manifest = workdir / "checkpoints" / "3" / checkpoints.MANIFEST_FILE
  manifest.parent.mkdir(parents=True)
  os.mkfifo(manifest)
  run = start(prepared_data_dir, str(workdir))
  writer = []

  def run_reads_the_manifest() -> bool:
    with contextlib.suppress(OSError):  # ENXIO until a reader has it open.
      writer.append(os.open(manifest, os.O_WRONLY | os.O_NONBLOCK))
    return bool(writer)

  wait_for(run_reads_the_manifest, run)
  try:
    assert os.path.exists(workdir / lock.LOCK_FILE)
    run.send_signal(signal.SIGTERM)
    assert run.wait(timeout=120) == cli.EXIT_PREEMPTED
  finally:
    os.close(writer[0])
  with open(f"{workdir}.log") as f:
    assert f.read().splitlines() == [
        "preempted: SIGTERM arrived while no step was in flight (before training began or "
        "after it ended); run the same command again"]
  assert os.listdir(workdir) == ["checkpoints"]  # The lock went with the process.


def test_sigterm_outside_the_loop_swallowed_in_a_finalizer_is_raised_again(capsys):
  # A signal handler runs wherever the main thread is; in a __del__ or a garbage collector
  # callback (JAX has one) what it raises is printed and dropped.
  class SignalledWhenCollected:
    def __del__(self):
      os.kill(os.getpid(), signal.SIGTERM)
      sum(range(1000))  # The handler runs here, in __del__.

  handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGALRM)}
  unraisablehook = sys.unraisablehook
  try:
    preemption.exit_on_sigterm()
    with pytest.raises(preemption.Preempted) as exited:
      SignalledWhenCollected()
      time.sleep(10)  # Where the retry lands.
  finally:
    signal.setitimer(signal.ITIMER_REAL, 0)
    sys.unraisablehook = unraisablehook
    for signum, handler in handlers.items():
      signal.signal(signum, handler)
  assert exited.value.code == cli.EXIT_PREEMPTED
  assert capsys.readouterr().err.splitlines() == [
      "preempted: SIGTERM arrived while no step was in flight (before training began or after "
      "it ended); run the same command again"]


# --- Checkpoints ---

def corrupt_newest(workdir: str, how: str) -> str:
  """Corrupts the largest state file of workdir's newest checkpoint; returns its directory."""
  step_dir = os.path.join(workdir, "checkpoints",
                          str(checkpoints.steps(os.path.join(workdir, "checkpoints"))[0]))
  files = [f for f in glob.glob(os.path.join(step_dir, "state", "**"), recursive=True)
           if os.path.isfile(f)]
  target = max(files, key=os.path.getsize)
  if how == "byte":
    with open(target, "r+b") as f:
      f.seek(os.path.getsize(target) // 2)
      byte = f.read(1)
      f.seek(-1, os.SEEK_CUR)
      f.write(bytes([byte[0] ^ 0xFF]))
  elif how == "truncate":
    os.truncate(target, os.path.getsize(target) // 2)
  else:
    os.remove(target)
  return step_dir


@pytest.mark.slow
def test_corrupt_newest_checkpoint_is_set_aside_and_the_run_resumes_from_the_one_before(
    prepared_data_dir, straight_run, tmp_path, capsys):
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(tiny_config(prepared_data_dir, num_steps=6), workdir)
  bad = corrupt_newest(workdir, "byte")
  capsys.readouterr()

  summary = train.train_and_evaluate(tiny_config(prepared_data_dir), workdir)
  warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
  assert summary.status == "completed"
  assert_same_state(workdir, straight_run)  # Resumed from step 3, not from the bad step 6.
  kept = os.path.join(workdir, checkpoints.UNUSABLE_DIR, "6")
  assert warnings == [f"warning: checkpoint {bad} is unusable: file state/"
                      f"{warnings[0].split(' file state/')[1].split()[0]} does not match its "
                      f"checksum; moved to {kept}; resuming from step 3"]
  assert os.path.isdir(kept)  # Set aside, not deleted.


@pytest.fixture(scope="module")
def sealed_checkpoint(tmp_path_factory):
  """A small state saved the way runs save theirs; returns its step directory."""
  directory = str(tmp_path_factory.mktemp("sealed") / "checkpoints")
  saver = checkpoints.Saver(directory, keep=1)
  state = {"w": np.arange(4096, dtype=np.float32), "b": np.ones(3, np.float32)}
  saver.save(1, state, config_lib.default_config(), wall_time_s=1.5)
  saver.wait()
  saver.close()
  return os.path.join(directory, "1")


@pytest.mark.parametrize("how, problem", [
    ("byte", "does not match its checksum"), ("truncate", "bytes, "), ("missing", "is missing")])
def test_verify_finds_a_changed_byte_a_truncated_file_and_a_missing_one(
    sealed_checkpoint, tmp_path, how, problem):
  step_dir = str(tmp_path / "checkpoints" / "1")
  shutil.copytree(sealed_checkpoint, step_dir)
  assert checkpoints.verify(step_dir) is None
  corrupt_newest(str(tmp_path), how)
  assert problem in checkpoints.verify(step_dir)


def small_state(step: int) -> dict:
  return {"w": np.arange(4096, dtype=np.float32) * step, "b": np.full(3, step, np.float32)}


@pytest.fixture(scope="module")
def sealed_run(tmp_path_factory) -> str:
  """A run's checkpoints directory with sealed checkpoints 1 and 2 of a small state."""
  directory = str(tmp_path_factory.mktemp("sealed_run") / "checkpoints")
  saver = checkpoints.Saver(directory, keep=2)
  for step in (1, 2):
    saver.save(step, small_state(step), config_lib.default_config(), wall_time_s=float(step))
  saver.wait()
  saver.close()
  return directory


def restore_small_state(directory: str) -> checkpoints.Restored:
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                          small_state(0))
  return checkpoints.restore_latest(directory, abstract, config_lib.default_config())


def flip_a_state_byte(step_dir: str) -> None:
  corrupt_newest(os.path.dirname(os.path.dirname(step_dir)), "byte")


def unseal(step_dir: str) -> None:
  """Makes a checkpoint look written before resnet_jax sealed them: no manifest, no progress."""
  os.remove(os.path.join(step_dir, checkpoints.MANIFEST_FILE))
  shutil.rmtree(os.path.join(step_dir, "progress"))
  os.remove(os.path.join(step_dir, "_CHECKPOINT_METADATA"))  # It names the progress item.


def write_manifest(step_dir: str, text: str) -> None:
  with open(os.path.join(step_dir, checkpoints.MANIFEST_FILE), "w") as f:
    f.write(text)


def add_unlisted_file(step_dir: str) -> None:
  with open(os.path.join(step_dir, "state", "extra"), "wb") as f:
    f.write(b"\0" * 8)


# (damage done to checkpoints/<step>, that step, the step resumed from, why it is unusable)
MANIFEST_DAMAGE = {
    "manifest deleted": (
        lambda d: (flip_a_state_byte(d), os.remove(os.path.join(d, checkpoints.MANIFEST_FILE))),
        2, 1, "it has no checksums.json, though it has a progress item: it was written since "
              "resnet_jax seals checkpoints"),
    "manifest emptied": (lambda d: (flip_a_state_byte(d), write_manifest(d, '{"sha256": {}}')),
                         2, 1, "its checksum manifest checksums.json lists no files"),
    "a file not in the manifest": (add_unlisted_file, 2, 1,
                                   "file state/extra is not in its manifest"),
    "unsealed beside sealed ones": (
        lambda d: (flip_a_state_byte(d), unseal(d)),
        2, 1, "it has no checksums.json, though other checkpoints of this run are sealed"),
    "an empty step directory": (os.makedirs, 999, 2,
                                "it is incomplete: it has no state or config item"),
    "manifest a list": (lambda d: write_manifest(d, "[]"), 2, 1,
                        "its checksum manifest checksums.json is unreadable (TypeError)"),
    "a manifest entry a number": (
        lambda d: write_manifest(d, json.dumps({"sha256": {"state/x": 3}})), 2, 1,
        "its checksum manifest checksums.json is unreadable (TypeError)"),
}


@pytest.mark.parametrize("damage", MANIFEST_DAMAGE)
def test_a_checkpoint_its_manifest_does_not_vouch_for_is_set_aside(sealed_run, tmp_path, capsys,
                                                                    damage):
  # A manifest must list exactly the files there are, and a run with sealed checkpoints never
  # trusts one without a manifest: it is set aside like a corrupt one, with one warning.
  damage_fn, step, resumed, reason = MANIFEST_DAMAGE[damage]
  directory = str(tmp_path / "checkpoints")
  shutil.copytree(sealed_run, directory)
  damage_fn(os.path.join(directory, str(step)))
  capsys.readouterr()

  restored = restore_small_state(directory)
  assert restored.step == resumed
  jax.tree.map(np.testing.assert_array_equal, restored.state, small_state(resumed))
  kept = os.path.join(tmp_path, checkpoints.UNUSABLE_DIR, str(step))
  assert capsys.readouterr().err.splitlines() == [
      f"warning: checkpoint {directory}/{step} is unusable: {reason}; moved to {kept}; "
      f"resuming from step {resumed}"]
  assert os.listdir(os.path.dirname(kept)) == [str(step)]


def test_a_run_whose_checkpoints_predate_sealing_restores_them_unverified(
    sealed_run, tmp_path, capsys):
  directory = str(tmp_path / "checkpoints")
  shutil.copytree(sealed_run, directory)
  for step in (1, 2):
    unseal(os.path.join(directory, str(step)))
  capsys.readouterr()

  restored = restore_small_state(directory)
  assert restored.step == 2 and restored.wall_time_s == 0.0  # Progress came with sealing too.
  jax.tree.map(np.testing.assert_array_equal, restored.state, small_state(2))
  assert capsys.readouterr().err.splitlines() == [
      f"warning: checkpoint {directory}/2 has no checksums.json (written before resnet_jax "
      "sealed checkpoints): restoring it unverified"]


@pytest.mark.slow
def test_no_usable_checkpoint_is_one_clear_error_and_deletes_nothing(prepared_data_dir, tmp_path):
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(tiny_config(prepared_data_dir, num_steps=3), workdir)
  corrupt_newest(workdir, "byte")
  with pytest.raises(checkpoints.NoUsableCheckpointError,
                     match=r"no usable checkpoint in .*step 3: file state/.* does not match"):
    train.train_and_evaluate(tiny_config(prepared_data_dir), workdir)
  assert os.listdir(os.path.join(workdir, checkpoints.UNUSABLE_DIR)) == ["3"]


# --- Records ---

def snapshot(workdir: str) -> dict[str, str]:
  """Every file under workdir with the SHA-256 of its contents."""
  out = {}
  for root, _, files in os.walk(workdir):
    for name in files:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, workdir)] = hashlib.sha256(f.read()).hexdigest()
  return out


@pytest.mark.slow
def test_rerunning_a_completed_run_changes_nothing(prepared_data_dir, straight_run, tmp_path):
  before = snapshot(straight_run)
  result = subprocess.run(cli_args(prepared_data_dir, straight_run), cwd=REPO,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr
  assert result.stdout.startswith("test accuracy ")
  assert snapshot(straight_run) == before


def test_num_steps_below_the_newest_checkpoint_is_refused_and_changes_nothing(
    prepared_data_dir, tmp_path):
  # A run preempted at step 6 (its initial state stands in for the one trained).
  workdir = str(tmp_path / "run")
  trainers = trainer_lib.Cache()
  trainer = trainers.build(*train.prepare(tiny_config(prepared_data_dir)), parallel.make_mesh())
  saver = checkpoints.Saver(os.path.join(workdir, "checkpoints"), keep=1)
  saver.save(6, trainer.init_state(), trainer.config, wall_time_s=1.0)
  saver.wait()
  saver.close()
  reporting.Summary.failed("stopped by SIGTERM after step 6, checkpointed",
                           status=reporting.PREEMPTED, step=6).write(workdir)
  before = snapshot(workdir)

  with pytest.raises(checkpoints.CheckpointMismatchError) as refused:
    train.train_and_evaluate(tiny_config(prepared_data_dir, num_steps=4), workdir,
                             trainers=trainers)
  assert str(refused.value) == (
      f"checkpoint {workdir}/checkpoints/6 is at step 6, past config.num_steps (4); a run is "
      "not cut back below the steps it has trained: to continue it give config.num_steps >= "
      "6, or start afresh in another --workdir")
  assert snapshot(workdir) == before
  assert sorted(os.listdir(workdir)) == ["checkpoints", "summary.json"]


@pytest.mark.slow
def test_summary_lost_after_the_final_checkpoint_is_rebuilt_from_the_records(
    prepared_data_dir, tmp_path):
  workdir = str(tmp_path / "run")
  summary = train.train_and_evaluate(tiny_config(prepared_data_dir, num_steps=3), workdir)
  os.remove(os.path.join(workdir, "summary.json"))  # Killed between checkpoint and summary.

  rebuilt = train.train_and_evaluate(tiny_config(prepared_data_dir, num_steps=3), workdir)
  for field in ("status", "step", "train_loss", "train_error", "test_error", "num_params"):
    assert getattr(rebuilt, field) == getattr(summary, field)
  assert [e["event"] for e in reporting.read_metrics(workdir)] == ["train"] * 3 + ["eval"]


@pytest.mark.slow
def test_torn_last_metrics_line_is_dropped_and_the_clock_runs_on(
    prepared_data_dir, tmp_path, capsys):
  workdir = str(tmp_path / "run")
  first = train.train_and_evaluate(tiny_config(prepared_data_dir, num_steps=3), workdir)
  with open(os.path.join(workdir, reporting.METRICS_FILE), "a") as f:
    f.write('{"event": "train", "st')  # Killed mid-write.

  second = train.train_and_evaluate(tiny_config(prepared_data_dir, num_steps=5), workdir)
  assert "dropped its last line, cut short" in capsys.readouterr().err
  events = reporting.read_metrics(workdir)
  assert [(e["event"], e["step"]) for e in events] == [
      ("train", 1), ("train", 2), ("train", 3), ("eval", 3), ("train", 4), ("train", 5),
      ("eval", 5)]
  # wall_time_s counts both segments: the second starts where the checkpoint at step 3 left it.
  assert second.wall_time_s > first.wall_time_s > 0
  times = [e["wall_time_s"] for e in events]
  assert times == sorted(times)


def write_metrics(workdir, lines: list[str]) -> str:
  path = os.path.join(workdir, reporting.METRICS_FILE)
  with open(path, "w") as f:
    f.write("".join(line + "\n" for line in lines))
  return path


TRAIN_EVENT = '{"event": "train", "step": %d, "loss": 1.5, "train_error": 0.5}'


def test_damaged_metrics_lines_are_set_aside_once_and_every_intact_event_kept(tmp_path, capsys):
  intact = [TRAIN_EVENT % 1, TRAIN_EVENT % 2, TRAIN_EVENT % 3]
  damaged = ["garbage{", '{"event": "eval", "step": 2}', "[1, 2]"]
  path = write_metrics(tmp_path, [intact[0], damaged[0], intact[1], damaged[1], damaged[2],
                                  intact[2]])

  assert [e["step"] for e in reporting.read_metrics(str(tmp_path))] == [1, 2, 3]
  reporting.truncate_metrics(str(tmp_path), 3)
  assert [e["step"] for e in reporting.read_metrics(str(tmp_path))] == [1, 2, 3]
  err = capsys.readouterr().err.splitlines()
  assert err == [
      f"warning: {path}: skipped 3 damaged line(s): line 2, not JSON (Expecting value): "
      "'garbage{' and 2 more",
      f"warning: {path}: set 3 damaged line(s): line 2, not JSON (Expecting value): 'garbage{{' "
      f"and 2 more aside in {path}.damaged"]
  with open(f"{path}.damaged") as f:
    assert f.read().splitlines() == damaged
  with open(path) as f:
    assert [json.loads(line)["step"] for line in f] == [1, 2, 3]


def test_a_damaged_summary_counts_as_none_with_one_warning_naming_it(tmp_path, capsys):
  reporting.Summary.failed("x", step=3).write(str(tmp_path))
  path = tmp_path / reporting.SUMMARY_FILE
  for text, problem in [("", "it is empty"), ("{", "not JSON"), ('"x"', "it holds a string"),
                        ('{"status": "completed"}', "it has no field message, step"),
                        (path.read_text().replace('"step": 3', '"step": "3"'),
                         "field step is '3', not an integer")]:
    path.write_text(text)
    assert reporting.Summary.read(str(tmp_path)) is None
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"warning: {path} is damaged: {problem}")
    assert line.endswith("counted as no summary: running the run again rebuilds it")


def test_metrics_removed_or_replaced_mid_run_is_rewritten_from_the_runs_open_copy(
    tmp_path, capsys):
  reporter = reporting.Reporter(str(tmp_path), num_steps=4, first_step=0, enabled=True,
                                progress_bar=False)
  path = os.path.join(tmp_path, reporting.METRICS_FILE)
  try:
    reporter.write(json.loads(TRAIN_EVENT % 1))
    os.remove(path)
    reporter.write(json.loads(TRAIN_EVENT % 2))
    with open(f"{path}.new", "w") as f:
      f.write("someone else's\n")
    os.replace(f"{path}.new", path)
    reporter.write(json.loads(TRAIN_EVENT % 3))
  finally:
    reporter.close()
  assert [e["step"] for e in reporting.read_metrics(str(tmp_path))] == [1, 2, 3]
  assert [line for line in capsys.readouterr().err.splitlines() if "warning" in line] == [
      f"warning: {path} was removed while this run wrote it: rewritten from the run's open copy "
      "(1 events)",
      f"warning: {path} was replaced (the replacement set aside in {path}.damaged) while this "
      "run wrote it: rewritten from the run's open copy (2 events)"]
  with open(f"{path}.damaged") as f:
    assert f.read() == "someone else's\n"


@pytest.mark.slow
def test_a_run_rebuilds_a_damaged_summary_and_config_and_sets_a_damaged_metrics_line_aside(
    prepared_data_dir, tmp_path, capsys):
  workdir = str(tmp_path / "run")
  summary = train.train_and_evaluate(tiny_config(prepared_data_dir, num_steps=3), workdir)
  path = os.path.join(workdir, reporting.METRICS_FILE)
  with open(path) as f:
    lines = f.read().splitlines()
  write_metrics(workdir, [lines[0], "not json", *lines[1:]])
  for name, text in ((reporting.SUMMARY_FILE, '{"status": "completed"}'),
                     (reporting.CONFIG_FILE, "\0\0\0")):
    with open(os.path.join(workdir, name), "w") as f:
      f.write(text)
  capsys.readouterr()

  rebuilt = train.train_and_evaluate(tiny_config(prepared_data_dir, num_steps=3), workdir)
  warnings = capsys.readouterr().err.splitlines()
  assert [w.split()[1].rstrip(":") for w in warnings] == [  # One line per damaged file.
      f"{workdir}/config.json", f"{workdir}/summary.json", path]
  for field in ("status", "step", "train_loss", "train_error", "test_error", "num_params"):
    assert getattr(rebuilt, field) == getattr(summary, field)
  with open(path) as f:
    assert f.read().splitlines() == lines  # Every intact event, none twice.
  with open(f"{path}.damaged") as f:
    assert f.read() == "not json\n"
  assert reporting.read_json(os.path.join(workdir, reporting.CONFIG_FILE))["num_steps"] == 3


@pytest.mark.slow
def test_checkpoints_read_while_the_run_deletes_them_are_whole(prepared_data_dir, tmp_path,
                                                                capfd):
  # The landscape or a notebook reading a run that still trains: with keep_checkpoints=1 and a
  # save every step, most checkpoints are deleted while a reader is at them.
  workdir = str(tmp_path / "run")
  run = start(prepared_data_dir, workdir, num_steps=2 * NUM_STEPS, checkpoint_every=1,
              keep_checkpoints=1)
  directory = os.path.join(workdir, "checkpoints")
  wait_for(lambda: checkpoints.steps(directory), run)
  read = []
  while run.poll() is None:
    step, state = checkpoints.read_state(directory)
    assert int(state["step"]) == step  # A consistent checkpoint, not parts of two.
    read.append(step)
  assert run.returncode == 0
  assert len(read) >= 10 and read == sorted(read) and read[-1] <= 2 * NUM_STEPS
  assert "Traceback" not in capfd.readouterr().err
  assert not glob.glob(os.path.join(workdir, ".reading-*"))  # The reader's links are gone.


def test_a_damaged_config_json_is_refused_by_the_landscape_naming_it(tmp_path):
  from resnet_jax import landscape  # pylint: disable=g-import-not-at-top
  path = tmp_path / reporting.CONFIG_FILE
  for text, problem in [("{", "not JSON (Expecting property name"), ("7", "it holds a number")]:
    path.write_text(text)
    with pytest.raises(reporting.RecordError) as refused:
      landscape.run_config(str(tmp_path))
    assert str(refused.value).startswith(f"{path} is damaged: {problem}")
  assert issubclass(reporting.RecordError, cli.refusal_types())  # One line `error: ...`, exit 2.


def test_choosing_a_runs_compilation_cache_creates_nothing_in_its_workdir(tmp_path):
  # JAX creates it at the first compilation: a run refused before that leaves no xla_cache/.
  chosen = jax.config.jax_compilation_cache_dir
  min_time = jax.config.jax_persistent_cache_min_compile_time_secs
  jax.config.update("jax_compilation_cache_dir", None)
  try:
    assert compilation.use_cache(str(tmp_path / "run")) == str(tmp_path / "run" / "xla_cache")
  finally:
    jax.config.update("jax_compilation_cache_dir", chosen)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_time)
  assert os.listdir(tmp_path) == []


# --- Every file damaged three ways ---

def walked_files(workdir: str) -> list[str]:
  """The files of a run's workdir that a re-run may read, relative to it: every file outside
  checkpoints/, and every file of its newest checkpoint except all but the largest of the
  state's data files (the manifest vouches for each of those alike)."""
  newest = str(checkpoints.steps(os.path.join(workdir, "checkpoints"))[0])
  out, data = [], []
  for path in sorted(snapshot(workdir)):
    parts = path.split(os.sep)
    if parts[0] == "checkpoints" and parts[1] != newest:
      continue
    if parts[0] == "checkpoints" and "d" in parts[3:-1]:  # state/ocdbt.process_0/d/<hash>
      data.append(path)
      continue
    out.append(path)
  return out + [max(data, key=lambda p: os.path.getsize(os.path.join(workdir, p)))]


DAMAGE = {
    "garbage": lambda data: b"\x00garbage\xff" * 3,
    "empty": lambda data: b"",
    "truncated": lambda data: data[:len(data) // 2],
}


@pytest.fixture(scope="module")
def walk_runs(prepared_data_dir, tmp_path_factory) -> dict[str, str]:
  """A run preempted after step 9 of 12 (checkpoints 6 and 9) and a finished one; the trainer
  cache their re-runs share."""
  root = tmp_path_factory.mktemp("walk")
  trainers = trainer_lib.Cache()
  preempted, finished = str(root / "preempted"), str(root / "finished")
  train.train_and_evaluate(tiny_config(prepared_data_dir, num_steps=9), preempted,
                           trainers=trainers)
  stopped = reporting.Summary.read(preempted)
  reporting.Summary(**{**stopped.to_dict(), "status": reporting.PREEMPTED,
                       "message": "stopped by SIGTERM after step 9"}).write(preempted)
  train.train_and_evaluate(tiny_config(prepared_data_dir), finished, trainers=trainers)
  return {"preempted": preempted, "finished": finished, "trainers": trainers}


@pytest.mark.slow
@pytest.mark.parametrize("how", list(DAMAGE))  # Apart, so that the workers share them.
@pytest.mark.parametrize("run", ["preempted", "finished"])
def test_every_file_damaged_three_ways_is_recovered_with_a_warning_or_refused_in_one_line(
    prepared_data_dir, walk_runs, tmp_path, capsys, run, how):
  source = walk_runs[run]
  failures = []
  damage = DAMAGE[how]
  for name in walked_files(source):
    workdir = str(tmp_path / f"{how}-{name.replace(os.sep, '_')}")
    shutil.copytree(source, workdir)
    path = os.path.join(workdir, name)
    with open(path, "rb") as f:
      data = f.read()
    with open(path, "wb") as f:
      f.write(damage(data))
    intact = {k: v for k, v in snapshot(workdir).items() if k != name}
    capsys.readouterr()
    case = f"{name} {how}"
    try:
      summary = train.train_and_evaluate(tiny_config(prepared_data_dir), workdir,
                                         trainers=walk_runs["trainers"])
    except cli.refusal_types() as e:
      err = capsys.readouterr().err.splitlines()
      step_dir = os.path.join(workdir, *name.split(os.sep)[:2])
      if not (name in str(e) or step_dir in str(e)) or len(err) > 1:
        failures.append(f"{case}: refused without naming it: {e!r} {err}")
      continue
    except Exception as e:  # pylint: disable=broad-except
      failures.append(f"{case}: {reporting.brief(e)}")
      continue
    err = capsys.readouterr().err.splitlines()
    if summary.status != "completed" or summary.step != NUM_STEPS:
      failures.append(f"{case}: ended {summary.status} at {summary.step}: {summary.message}")
    if len(err) > 1 or any(not line.startswith("warning: ") for line in err):
      failures.append(f"{case}: not one warning line: {err}")
    if name != reporting.METRICS_FILE:  # Every step logged once, the intact ones kept.
      steps = [e["step"] for e in reporting.read_metrics(workdir) if e["event"] == "train"]
      if steps != list(range(1, NUM_STEPS + 1)):
        failures.append(f"{case}: train events of steps {steps}")
    if run == "finished" and name != reporting.METRICS_FILE:
      after = snapshot(workdir)
      if changed := sorted(k for k, v in intact.items() if after.get(k) != v
                           and k not in (reporting.CONFIG_FILE, reporting.SUMMARY_FILE)):
        failures.append(f"{case}: changed {changed}")
    shutil.rmtree(workdir)
  assert not failures, "\n".join(failures)


# --- One writer per workdir ---

@pytest.mark.slow
def test_second_writer_is_refused_naming_the_holder(prepared_data_dir, tmp_path):
  workdir = str(tmp_path / "run")
  with lock.WorkdirLock(workdir):
    result = subprocess.run(cli_args(prepared_data_dir, workdir), cwd=REPO,
                            capture_output=True, text=True, timeout=300)
  assert result.returncode == cli.EXIT_USAGE
  assert result.stderr.splitlines() == [
      f"error: workdir {workdir} is in use by pid {os.getpid()} on host "
      f"{os.uname().nodename} since {result.stderr.split(' since ')[1].split(';')[0]}; stop "
      "that run first, or choose another --workdir"]
  assert os.listdir(workdir) == []


@pytest.mark.slow
def test_lock_of_a_killed_process_does_not_block_the_resume(prepared_data_dir, tmp_path):
  workdir = str(tmp_path / "run")
  holder = subprocess.Popen([sys.executable, "-c", (
      "import sys, time; from resnet_jax import lock; lock.WorkdirLock(sys.argv[1]).acquire(); "
      "print('held', flush=True); time.sleep(600)"), workdir], cwd=REPO, stdout=subprocess.PIPE,
                            text=True)
  assert holder.stdout.readline() == "held\n"
  with pytest.raises(lock.WorkdirError, match=f"in use by pid {holder.pid}"):
    lock.WorkdirLock(workdir).acquire()
  holder.kill()
  holder.wait()
  summary = train.train_and_evaluate(tiny_config(prepared_data_dir, num_steps=1), workdir)
  assert summary.status == "completed"


def test_removing_or_replacing_the_lock_file_lets_no_second_writer_in(
    prepared_data_dir, tmp_path):
  workdir = str(tmp_path / "run")
  refusal = (f"workdir {workdir} is in use by another process; stop that run first, or choose "
             "another --workdir")
  with lock.WorkdirLock(workdir) as held:
    os.remove(held.path)
    with pytest.raises(lock.WorkdirError) as removed:
      train.train_and_evaluate(tiny_config(prepared_data_dir, num_steps=1), workdir)
    with open(held.path, "w") as f:
      f.write("{}")
    with pytest.raises(lock.WorkdirError) as replaced:
      lock.WorkdirLock(workdir).acquire()
  assert str(removed.value) == str(replaced.value) == refusal
  assert os.listdir(workdir) == []


# --- Disk full ---

@contextlib.contextmanager
def tmpfs(path, options: str):
  """A tmpfs mounted at `path` for the block; skips the test where mounting is not allowed."""
  path.mkdir()
  result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                          capture_output=True, text=True, check=False)
  if result.returncode:
    pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
  try:
    yield path
  finally:
    subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.mark.slow
def test_checkpoints_made_read_only_mid_run_is_one_error_a_failed_summary_and_resumes(
    prepared_data_dir, tmp_path):
  # What `chmod 555 checkpoints/` does to a user's run; root ignores modes, so a read-only bind
  # mount stands in for it.
  workdir = str(tmp_path / "run")
  directory = os.path.join(workdir, "checkpoints")
  num_steps = 2 * NUM_STEPS  # Long enough to be mid-run when the mount lands.
  run = subprocess.Popen(cli_args(prepared_data_dir, workdir, num_steps=num_steps), cwd=REPO,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  wait_for(lambda: checkpoints.steps(directory), run)
  if subprocess.run(["mount", "--bind", directory, directory], capture_output=True,
                    check=False).returncode:
    run.kill()
    pytest.skip("cannot bind-mount here")
  # The kernel refuses (EBUSY) to make a mount read-only while a file is open for writing
  # through it, as the run's next save may have one: try again until none is.
  deadline = time.time() + 60
  while (remount := subprocess.run(["mount", "-o", "remount,bind,ro", directory],
                                   capture_output=True, text=True, check=False)).returncode:
    if time.time() > deadline or run.poll() is not None:
      subprocess.run(["umount", "-l", directory], check=False)
      run.kill()
      pytest.fail(f"could not make {directory} read-only mid-run: {remount.stderr}")
    time.sleep(0.01)
  try:
    _, stderr = run.communicate(timeout=300)
  finally:
    subprocess.run(["umount", "-l", directory], check=False)
  assert run.returncode == cli.EXIT_FAILED, stderr
  assert stderr.startswith("error: read-only file system: ") and stderr.count("\n") == 1, stderr
  summary = reporting.Summary.read(workdir)
  assert summary.status == "failed" and "Read-only file system" in summary.message

  resumed = train.train_and_evaluate(tiny_config(prepared_data_dir, num_steps=num_steps), workdir)
  assert (resumed.status, resumed.step) == ("completed", num_steps)


def test_late_callbacks_of_a_save_cut_short_are_not_printed_other_errors_are():
  # What TensorStore's thread reports as unraisable when it completes a write after Orbax closed
  # the save's event loop: a traceback that starts in call_soon_threadsafe, and no object.
  loop = asyncio.new_event_loop()
  loop.close()
  try:
    loop.call_soon_threadsafe(print)
  except RuntimeError as e:
    late_error, late_traceback = e, e.__traceback__.tb_next  # Without this test's frame.
  try:
    raise RuntimeError("Event loop is closed")
  except RuntimeError as e:
    ours_error, ours_traceback = e, e.__traceback__

  def unraisable(error, traceback, obj=None):
    return types.SimpleNamespace(exc_type=type(error), exc_value=error, exc_traceback=traceback,
                                 err_msg=None, object=obj)
  late = unraisable(late_error, late_traceback)
  ours = unraisable(ours_error, ours_traceback)
  other = unraisable(ValueError("Event loop is closed"), late_traceback)
  of_an_object = unraisable(late_error, late_traceback, obj=loop)
  printed = []
  hook = cli._without_late_loop_callbacks(printed.append)
  for error in (late, ours, other, of_an_object):
    hook(error)
  assert printed == [ours, other, of_an_object]


@pytest.fixture
def small_disk(tmp_path, straight_run):
  """A tmpfs with room for one of the tiny run's checkpoints (one and a half of the straight
  run's last, as the disk counts it) but not for the next beside it."""
  newest = os.path.join(straight_run, "checkpoints", str(NUM_STEPS))
  used = subprocess.run(["du", "-sk", newest], capture_output=True, text=True, check=True)
  kib = int(used.stdout.split()[0])
  with tmpfs(tmp_path / "disk", f"size={kib * 3 // 2}k") as mount:
    yield mount


@pytest.mark.slow
def test_disk_full_is_one_error_a_failed_summary_and_resumes_once_space_is_back(
    prepared_data_dir, straight_run, small_disk):
  workdir = str(small_disk / "run")
  result = subprocess.run(cli_args(prepared_data_dir, workdir), cwd=REPO, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == cli.EXIT_FAILED, result.stderr
  assert result.stderr.startswith("error: disk full") and result.stderr.count("\n") == 1, (
      result.stderr)
  summary = reporting.Summary.read(workdir)
  assert summary.status == "failed" and "No space left on device" in summary.message

  subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
  assert train.train_and_evaluate(tiny_config(prepared_data_dir), workdir).status == (
      "completed")
  assert_same_state(workdir, straight_run)


# --- The command line's bad input ---

@pytest.fixture(scope="module")
def config_files(tmp_path_factory):
  root = tmp_path_factory.mktemp("configs")
  (root / "syntax.py").write_text("def get_config(:\n")
  (root / "empty.py").write_text("x = 1\n")
  (root / "afile").write_text("")
  (root / "dict.py").write_text("def get_config(arg=None):\n  return {'seed': 0}\n")
  return root


# Each case is a process of its own (the exit code is the point); four of them, one per kind
# (file, field, value, workdir), are in the quick tier.
BAD_INPUT = [
    (["--config=configs/nope.py"], "config file configs/nope.py not found"),
    (["--config={files}/syntax.py"], "config file {files}/syntax.py line 1: invalid syntax"),
    (["--config={files}/empty.py"], "config file {files}/empty.py has no get_config() function"),
    (["--config=configs/cifar10.py:deep=56"],
     "config file configs/cifar10.py: unknown config argument 'deep'; allowed: depth, skip"),
    (["--config.optimizer.learning_rate=0.1"],
     "unknown config field --config.optimizer.learning_rate: the fields and their meaning"),
    (["--config.batch_size=big"], "flag --config.batch_size=big: invalid literal for int()"),
    (["--config.model.name=resnet21"],
     "CIFAR ResNet depth must be 6n+2: 8, 20, 32, 44, 56, 110"),
    (["--config.optimizer.lr=inf"], "config.optimizer.lr must be finite and > 0; got inf"),
    (["--config.num_steps=100000000000"],
     "config.num_steps (100,000,000,000) must be at most 2,147,483,647: the step counter is "
     "int32, and 100,000,000,000 steps would take 3.2 years even at 1,000 steps/s"),
    (["--config.batch_size=60016"],
     "config.batch_size (60016) must be at most the 60,000 examples of config.dataset.train_split"),
    (["--config.dataset.name=mnist"], "dataset mnist 3.0.1 is not prepared in"),
    (["--workdir={files}/afile"], "workdir {files}/afile is a file, not a directory"),
    (["--bogus"], "Unknown command line flag 'bogus'"),
    (["stray"], "unexpected arguments: stray"),
    # Input of the right syntax that the checks once let through to a traceback.
    (["--config={files}/dict.py"], "--config={files}/dict.py: its get_config() must return an "
     "ml_collections.ConfigDict; it returned a dict"),
    (["--config.seed=3000000000"], "config.seed must be a 32-bit integer, in [-2**31, 2**31 - 1]"),
    (["--config.optimizer.boundaries=abc"],
     "config.optimizer.boundaries must be a list of numbers; got ('abc',)"),
    (["--config.dataset.eval_split=test[:0]"],
     "config.dataset.eval_split 'test[:0]' of fashion_mnist has no examples"),
    (["--workdir={files}/run\udcff"], "--workdir must be UTF-8 text; got b'"),
]
QUICK_BAD_INPUT = (0, 4, 7, 11)


@pytest.mark.parametrize("flags, message", [
    case if i in QUICK_BAD_INPUT else pytest.param(*case, marks=pytest.mark.slow)
    for i, case in enumerate(BAD_INPUT)])
def test_bad_input_is_one_error_line_exit_2_and_nothing_written(
    prepared_data_dir, config_files, tmp_path, flags, message):
  workdir = tmp_path / "run"
  flags = [f.format(files=config_files) for f in flags]
  args = [sys.executable, "-m", "resnet_jax.main", f"--workdir={workdir}", *flags,
          f"--config.dataset.data_dir={prepared_data_dir}"]
  result = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == cli.EXIT_USAGE
  assert result.stdout == ""
  (line,) = result.stderr.splitlines()
  assert line.startswith("error: ") and message.format(files=config_files) in line
  assert not workdir.exists()


@pytest.mark.slow
def test_a_read_only_workdir_is_refused(prepared_data_dir, tmp_path):
  with tmpfs(tmp_path / "ro", "ro,size=1m") as read_only:
    for workdir, why in ((read_only, "is not writable"), (read_only / "run", "cannot be created")):
      result = subprocess.run(cli_args(prepared_data_dir, str(workdir)), cwd=REPO,
                              capture_output=True, text=True, timeout=300)
      assert result.returncode == cli.EXIT_USAGE
      assert result.stderr == f"error: workdir {workdir} {why}: Read-only file system\n"
