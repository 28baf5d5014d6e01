"""Sweeps: skip/resume, failure isolation, worker processes, results, the command line.

Most tests run the sweep machinery with a fake run function that records its calls and returns
a summary, so no network is trained; the last test runs real tiny runs end to end. The points
language and the run configs it expands to: tests/test_points.py.
"""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time

import ml_collections
import pytest

from resnet_jax import diagnostics, lock, points, reporting, results, runner
from tests import test_train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_sweep(sweep_points, base="configs/fashion_mnist.py",
               fixed=None) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({"base": base, "fixed": fixed or {}, "points": sweep_points})


class FakeRun:
  """Stands in for train.train_and_evaluate: records calls, diverges at lr >= 1e6, raises at
  seed 13, and otherwise completes with errors derived from the depth."""

  def __init__(self):
    self.calls: list[tuple[str, ml_collections.ConfigDict]] = []

  def __call__(self, config, workdir):
    self.calls.append((os.path.basename(workdir), config))
    if config.seed == 13:
      raise RuntimeError("out of memory")
    depth = int(config.model.name[len("resnet"):])
    summary = reporting.Summary(
        status=reporting.COMPLETED, message="finished", step=config.num_steps, train_loss=0.1,
        train_error=depth / 1000, test_error=depth / 500, best_test_error=depth / 600,
        wall_time_s=12.5, num_params=1000 * depth)
    if config.optimizer.lr >= 1e6:
      summary = dataclasses.replace(summary, status=reporting.DIVERGED,
                                    message="loss became NaN/Inf at or before step 3", step=3)
    summary.write(workdir)
    return summary


def called_names(fake: FakeRun) -> list[str]:
  return [name for name, _ in fake.calls]


# --- Running ---

def test_unknown_field_raises_before_any_run(tmp_path):
  fake = FakeRun()
  bad = make_sweep([{"depth": 20}, {"depth": 20, "optimizer.lrr": 0.1}])
  with pytest.raises(ValueError, match="unknown config field 'optimizer.lrr'"):
    runner.run_sweep(bad, str(tmp_path), run_fn=fake)
  assert fake.calls == [] and os.listdir(tmp_path) == []


def test_invalid_value_raises_before_any_run(tmp_path):
  fake = FakeRun()
  with pytest.raises(ValueError, match=r"(?s)point 1 \{.depth.: 21\}.*must be 6n\+2"):
    runner.run_sweep(make_sweep(points.axis("depth", [20, 21])), str(tmp_path), run_fn=fake)
  assert fake.calls == []


def test_a_point_whose_directory_name_would_be_too_long_is_refused_before_any_run(tmp_path):
  fake = FakeRun()
  long_path = "x" * 250  # dataset.data_dir=<250 bytes> names a 267-byte directory.
  with pytest.raises(ValueError, match=r"(?s)point 1 .*at most 255 bytes; 'dataset.data_dir=xx"
                     r".*has 267"):
    runner.run_sweep(make_sweep([{"depth": 20}, {"dataset.data_dir": long_path}]),
                     str(tmp_path), run_fn=fake)
  assert fake.calls == [] and os.listdir(tmp_path) == []


def test_every_point_runs_in_a_workdir_named_after_its_fields(tmp_path):
  fake = FakeRun()
  config = make_sweep(points.product(points.axis("depth", [20, 56]), points.axis("skip", [False])))
  runner.run_sweep(config, str(tmp_path), run_fn=fake)
  assert called_names(fake) == ["depth=20,skip=false", "depth=56,skip=false"]
  assert [c.model.name for _, c in fake.calls] == ["resnet20", "resnet56"]
  assert sorted(os.listdir(tmp_path)) == [
      "depth=20,skip=false", "depth=56,skip=false", "results.csv", "sweep.json"]


def test_rerun_skips_finished_points(tmp_path):
  config = make_sweep(points.axis("depth", [20, 56]))
  runner.run_sweep(config, str(tmp_path), run_fn=FakeRun())
  again = FakeRun()
  rows = runner.run_sweep(config, str(tmp_path), run_fn=again)
  assert again.calls == []
  assert [r["status"] for r in rows] == ["completed", "completed"]


def test_rerun_resumes_a_point_that_completed_fewer_steps(tmp_path):
  short = make_sweep(points.axis("depth", [20]), fixed={"num_steps": 50})
  runner.run_sweep(short, str(tmp_path), run_fn=FakeRun())
  longer = FakeRun()
  rows = runner.run_sweep(make_sweep(points.axis("depth", [20]), fixed={"num_steps": 90}),
                          str(tmp_path), run_fn=longer)
  assert called_names(longer) == ["depth=20"]
  assert rows[0]["step"] == 90


def test_rerun_skips_a_completed_point_counted_in_epochs_whatever_its_steps(tmp_path):
  # Its step count is known only once the run reads its data; a run started anyway re-checks.
  runner.run_sweep(make_sweep(points.axis("depth", [20]), fixed={"num_steps": 50}),
                   str(tmp_path), run_fn=FakeRun())
  again = FakeRun()
  rows = runner.run_sweep(make_sweep(points.axis("depth", [20]),
                                     fixed={"num_steps": 90, "num_epochs": 2}),
                          str(tmp_path), run_fn=again)
  assert again.calls == []
  assert (rows[0]["status"], rows[0]["step"]) == ("completed", 50)


def test_rerun_retries_an_interrupted_point(tmp_path):
  config = make_sweep(points.axis("depth", [20, 56]))
  os.makedirs(tmp_path / "depth=56")  # Started, killed before it wrote its summary.
  assert [r["status"] for r in results.results_table(points.expand(config), str(tmp_path))] == [
      "pending", "started"]
  fake = FakeRun()
  runner.run_sweep(config, str(tmp_path), run_fn=fake)
  assert called_names(fake) == ["depth=20", "depth=56"]


def test_diverged_point_is_recorded_and_the_sweep_goes_on(tmp_path):
  fake = FakeRun()
  rows = runner.run_sweep(make_sweep(points.axis("lr", [1e6, 0.1])), str(tmp_path), run_fn=fake)
  assert called_names(fake) == ["lr=1000000.0", "lr=0.1"]
  assert [(r["status"], r["step"]) for r in rows] == [("diverged", 3), ("completed", 400)]
  assert "NaN" in rows[0]["message"]


def test_diverged_point_is_not_run_again(tmp_path):
  config = make_sweep(points.axis("lr", [1e6]))
  runner.run_sweep(config, str(tmp_path), run_fn=FakeRun())
  again = FakeRun()
  runner.run_sweep(config, str(tmp_path), run_fn=again)
  assert again.calls == []


def test_exception_is_recorded_as_failed_and_the_sweep_goes_on(tmp_path):
  fake = FakeRun()
  rows = runner.run_sweep(make_sweep(points.axis("seed", [13, 0])), str(tmp_path), run_fn=fake)
  assert called_names(fake) == ["seed=13", "seed=0"]
  assert [r["status"] for r in rows] == ["failed", "completed"]
  assert rows[0]["message"] == "RuntimeError: out of memory"
  with open(tmp_path / "seed=13" / "summary.json") as f:
    assert json.load(f)["status"] == "failed"


def test_failed_point_is_retried_on_rerun(tmp_path):
  config = make_sweep(points.axis("seed", [13]))
  runner.run_sweep(config, str(tmp_path), run_fn=FakeRun())
  again = FakeRun()
  runner.run_sweep(config, str(tmp_path), run_fn=again)
  assert called_names(again) == ["seed=13"]


def test_point_index_runs_only_that_point(tmp_path):
  fake = FakeRun()
  rows = runner.run_sweep(make_sweep(points.axis("depth", [20, 32, 44])), str(tmp_path),
                          run_fn=fake, point_index=1)
  assert called_names(fake) == ["depth=32"]
  assert [r["status"] for r in rows] == ["pending", "completed", "pending"]


def test_concurrent_array_tasks_of_one_sweep_do_not_collide_on_its_files(tmp_path):
  # Job-array tasks and processes:N workers each rewrite sweep.json and results.csv; a shared
  # temporary file name made one task's rename fail when another had just renamed it.
  config = make_sweep(points.axis("depth", [20, 32, 44, 56]))

  def task(i):
    for _ in range(25):
      runner.run_sweep(config, str(tmp_path), run_fn=FakeRun(), point_index=i)

  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    list(pool.map(task, range(4)))  # Re-raises any task's exception.
  rows = runner.run_sweep(config, str(tmp_path), run_fn=FakeRun())
  assert [row["status"] for row in rows] == ["completed"] * 4
  assert not [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]


def test_point_index_out_of_range_is_rejected(tmp_path):
  with pytest.raises(ValueError, match=r"point_index must be in \[0, 1\]; got 2"):
    runner.run_sweep(make_sweep(points.axis("depth", [20, 32])), str(tmp_path),
                     run_fn=FakeRun(), point_index=2)


def test_a_second_whole_sweep_on_the_same_workdir_is_refused(tmp_path):
  config = make_sweep(points.axis("depth", [20]))
  with lock.WorkdirLock(str(tmp_path)):
    with pytest.raises(lock.WorkdirError, match=f"in use by pid {os.getpid()}"):
      runner.run_sweep(config, str(tmp_path), run_fn=FakeRun())


def test_sigterm_between_points_stops_the_sweep_before_the_next(tmp_path):
  class SignalledRun(FakeRun):
    def __call__(self, config, workdir):
      summary = super().__call__(config, workdir)
      os.kill(os.getpid(), signal.SIGTERM)  # Arrives while the sweep's own handler is on.
      return summary

  fake = SignalledRun()
  rows = runner.run_sweep(make_sweep(points.axis("depth", [20, 32])), str(tmp_path), run_fn=fake)
  assert called_names(fake) == ["depth=20"]
  assert [r["status"] for r in rows] == ["completed", "pending"]
  assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # The sweep's handler is gone.


# --- Results ---

def test_results_csv_has_one_row_per_point_with_fields_and_results(tmp_path):
  config = make_sweep(points.chain(
      points.product(points.axis("depth", [20]), points.axis("skip", [False, True])),
      [{"depth": 56, "skip": True, "lr": 1e6}]))
  runner.run_sweep(config, str(tmp_path), run_fn=FakeRun())
  with open(tmp_path / "results.csv") as f:
    rows = list(csv.DictReader(f))
  assert list(rows[0]) == ["name", "depth", "skip", "lr", "status", "train_error", "test_error",
                           "best_test_error", "step", "wall_time_s", "num_params", "message"]
  assert [(r["name"], r["skip"], r["lr"], r["status"]) for r in rows] == [
      ("depth=20,skip=false", "false", "", "completed"),
      ("depth=20,skip=true", "true", "", "completed"),
      ("depth=56,skip=true,lr=1000000.0", "true", "1000000.0", "diverged")]
  assert [(float(r["train_error"]), float(r["test_error"]), float(r["best_test_error"]),
           int(r["step"]), float(r["wall_time_s"]), int(r["num_params"])) for r in rows[:1]] == [
      (0.02, 0.04, 20 / 600, 400, 12.5, 20_000)]


def test_table_shows_errors_in_percent_and_the_messages_of_failures(tmp_path):
  config = make_sweep(points.axis("seed", [0, 13]))
  table = results.format_table(runner.run_sweep(config, str(tmp_path), run_fn=FakeRun()))
  lines = table.splitlines()
  assert lines[0].split() == ["name", "seed", "status", "train", "err", "%", "test", "err", "%",
                              "best", "test", "%", "steps", "time", "params"]
  assert lines[1].split() == ["seed=0", "0", "completed", "2.00", "4.00", "3.33", "400", "12s",
                              "20,000"]
  assert lines[2].split()[:3] == ["seed=13", "13", "failed"]
  assert lines[3] == "seed=13: failed: RuntimeError: out of memory"


# --- Parallel processes ---

def fake_worker(monkeypatch, script: str) -> None:
  """Makes the parallel sweep run `script` (argv: workdir, index) instead of training."""
  monkeypatch.setattr(runner, "worker_command", lambda workdir, index: [
      sys.executable, "-c", script, workdir, str(index)])


# The start of every fake worker: finds its point and records summaries as a real worker does.
WORKER = """
import os, signal, sys, time
from resnet_jax import reporting
workdir, index = sys.argv[1], int(sys.argv[2])
point_dir = os.path.join(workdir, sorted(d for d in os.listdir(workdir) if "=" in d)[index])
def record(status, step, message):
  nan = float("nan")
  reporting.Summary(status=status, message=message, step=step, train_loss=nan, train_error=nan,
                    test_error=nan, best_test_error=nan, wall_time_s=1.0, num_params=0
                    ).write(point_dir)
"""
WRITE_DEVICE_SUMMARY = WORKER + """
record("completed", 2000, os.environ["CUDA_VISIBLE_DEVICES"])
"""


def test_parallel_workers_run_every_point_on_the_devices_in_turn(tmp_path, monkeypatch):
  fake_worker(monkeypatch, WRITE_DEVICE_SUMMARY)
  rows = runner.run_sweep(make_sweep(points.axis("depth", [20, 32])), str(tmp_path),
                          pack="processes:2", devices=["3", "5"])
  assert [r["status"] for r in rows] == ["completed", "completed"]
  assert sorted(r["message"] for r in rows) == ["3", "5"]


def test_parallel_worker_that_crashes_is_recorded_as_failed(tmp_path, monkeypatch):
  fake_worker(monkeypatch, "import sys; sys.exit(9)")
  rows = runner.run_sweep(make_sweep(points.axis("depth", [20, 32])), str(tmp_path),
                          pack="processes:2")
  assert [r["status"] for r in rows] == ["failed", "failed"]
  assert rows[0]["message"].startswith("worker process exited with code 9; see ")


KILLED_WORKER = WORKER + """
import json
with open(os.path.join(point_dir, reporting.METRICS_FILE), "w") as f:
  for step in range(1, 151):
    f.write(json.dumps({"event": "train", "step": step, "loss": 3.0 - step / 100,
                        "train_error": 0.9 - step / 1000, "wall_time_s": step / 10}) + "\\n")
    if step % 50 == 0:
      f.write(json.dumps({"event": "eval", "step": step, "test_error": 0.5 + step / 1000,
                          "wall_time_s": step / 10}) + "\\n")
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_parallel_worker_killed_9_is_recorded_as_far_as_its_metrics_go(tmp_path, monkeypatch):
  fake_worker(monkeypatch, KILLED_WORKER)
  [row] = runner.run_sweep(make_sweep(points.axis("depth", [20])), str(tmp_path),
                           pack="processes:2")
  assert row["status"] == "failed"
  assert row["message"].startswith(f"worker process exited with code {-signal.SIGKILL}; see ")
  assert (row["step"], row["train_error"], row["wall_time_s"]) == (150, 0.9 - 0.15, 15.0)
  assert (row["test_error"], row["best_test_error"]) == (0.5 + 0.15, 0.5 + 0.05)


STOPPABLE_WORKER = WORKER + """
def stop(*_):
  record("preempted", 7, "stopped")
  sys.exit(75)
signal.signal(signal.SIGTERM, stop)
open(os.path.join(point_dir, "started"), "w").close()
time.sleep(120)
record("completed", 7, "finished")
"""


def test_sigterm_to_a_parallel_sweep_stops_its_workers_and_starts_no_more(tmp_path, monkeypatch):
  fake_worker(monkeypatch, STOPPABLE_WORKER)
  config = make_sweep(points.axis("depth", [20, 32, 44]))
  started = [tmp_path / name / "started" for name in ("depth=20", "depth=32")]

  def preempt_once_both_run():
    while not all(path.exists() for path in started):
      time.sleep(0.02)
    os.kill(os.getpid(), signal.SIGTERM)

  threading.Thread(target=preempt_once_both_run, daemon=True).start()
  begin = time.time()
  rows = runner.run_sweep(config, str(tmp_path), pack="processes:2")
  assert time.time() - begin < 60  # Not the workers' 120 s: they were stopped.
  assert [r["status"] for r in rows] == ["preempted", "preempted", "pending"]
  assert not (tmp_path / "depth=44").exists()


# --- Command line ---

def run_cli(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "resnet_jax.sweep", *args], cwd=REPO,
                        capture_output=True, text=True, check=False, timeout=120)


def test_list_prints_index_and_name_of_every_point_and_runs_nothing(tmp_path):
  out = run_cli("--config=configs/sweeps/ablation_cifar10.py", f"--workdir={tmp_path}", "--list")
  assert out.returncode == 0, out.stderr
  lines = out.stdout.splitlines()
  assert len(lines) == 10
  assert (lines[0], lines[9]) == ("0 depth=20,skip=false", "9 depth=110,skip=true")
  assert os.listdir(tmp_path) == []


def test_report_reprints_a_finished_sweep_from_its_workdir_alone(tmp_path):
  runner.run_sweep(make_sweep(points.axis("depth", [20, 56])), str(tmp_path), run_fn=FakeRun())
  os.remove(tmp_path / "results.csv")
  out = run_cli(f"--workdir={tmp_path}", "--report")
  assert out.returncode == 0, out.stderr
  assert [line.split()[:3] for line in out.stdout.splitlines()[1:3]] == [
      ["depth=20", "20", "completed"], ["depth=56", "56", "completed"]]
  assert (tmp_path / "results.csv").exists()


@pytest.mark.slow
def test_killed_parallel_sweep_leaves_no_worker_training(prepared_data_dir, tmp_path):
  # kill -9 of the parent: its workers get SIGTERM from the kernel and stop, checkpointed.
  sweep_file = tmp_path / "sweep.py"
  sweep_file.write_text(
      "import ml_collections\nfrom resnet_jax import points\n"
      "def get_config():\n"
      "  return ml_collections.ConfigDict({'base': 'configs/fashion_mnist.py', 'fixed': {\n"
      f"      'dataset': {{'data_dir': {prepared_data_dir!r}, 'eval_split': 'test[:64]'}},\n"
      "      'batch_size': 16, 'eval_batch_size': 32, 'num_steps': 2000, 'log_every': 1,\n"
      # The program of tests/test_faults.py's runs: its compilation is cached.
      "      'optimizer': {'warmup_steps': 0, 'schedule': 'constant'}, 'progress_bar': False},\n"
      "      'points': points.axis('seed', [0, 1])})\n")
  workdir = tmp_path / "runs"
  parent = subprocess.Popen([sys.executable, "-m", "resnet_jax.sweep", f"--config={sweep_file}",
                             f"--workdir={workdir}", "--pack=processes:2"], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  points = [workdir / "seed=0", workdir / "seed=1"]
  deadline = time.time() + 300
  while not all(reporting.read_metrics(str(p)) for p in points):
    assert time.time() < deadline and parent.poll() is None
    time.sleep(0.1)
  workers = [json.loads((p / lock.LOCK_FILE).read_text())["pid"] for p in points]
  parent.kill()
  parent.wait()

  for pid in workers:  # Gone (not merely orphaned), within a step and a checkpoint.
    while os.path.exists(f"/proc/{pid}") and time.time() < deadline:
      time.sleep(0.1)
    assert not os.path.exists(f"/proc/{pid}"), f"worker {pid} outlived its sweep"
  for point in points:
    summary = json.loads((point / "summary.json").read_text())
    assert summary["status"] == "preempted" and 0 < summary["step"] < 2000
    assert os.path.isdir(point / "checkpoints" / str(summary["step"]))


def test_bad_sweep_file_fails_with_its_message(tmp_path):
  bad = tmp_path / "bad.py"
  bad.write_text("import ml_collections\nfrom resnet_jax import points\n"
                 "def get_config():\n"
                 "  return ml_collections.ConfigDict({'base': 'configs/fashion_mnist.py',\n"
                 "      'points': points.zipped(points.axis('lr', [0.1]),\n"
                 "                             points.axis('seed', [0, 1]))})\n")
  out = run_cli(f"--config={bad}", f"--workdir={tmp_path / 'runs'}")
  assert out.returncode != 0
  assert "zipped parts must have the same number of points" in out.stderr
  assert not (tmp_path / "runs").exists()


# --- End to end ---

@pytest.mark.slow
def test_real_tiny_sweep_records_results_diagnostics_and_divergence(prepared_data_dir, tmp_path):
  tiny = {"dataset": {"data_dir": prepared_data_dir, "eval_split": "test[:64]"},
          "batch_size": 16, "eval_batch_size": 32, "num_steps": 4, "log_every": 2,
          "checkpoint_every": 0, "diagnostics_every": 2, "progress_bar": False,
          "optimizer": {"warmup_steps": 0}, "model": test_train.tiny_model()}
  config = make_sweep([{"skip": False}, {"skip": True, "lr": 1e30}], fixed=tiny)
  rows = runner.run_sweep(config, str(tmp_path))

  assert [(r["name"], r["status"], r["num_params"]) for r in rows] == [
      ("skip=false", "completed", 4_934), ("skip=true,lr=1e+30", "diverged", 4_934)]
  assert rows[0]["step"] == 4 and 0.0 <= rows[0]["test_error"] <= 1.0
  assert "NaN/Inf" in rows[1]["message"]
  events = reporting.read_metrics(str(tmp_path / "skip=false"))
  records = [e for e in events if e["event"] == "diagnostics"]
  assert [r["step"] for r in records] == [0, 2]
  blocks = ["stage1_block1", "stage2_block1", "stage3_block1"]  # ResNet-8: one block a stage.
  assert list(diagnostics.block_order(records[0]["grad_norm"])) == ["stem", *blocks, "head"]
  assert sorted(records[0]["activation_rms"]) == sorted(blocks)
  assert all(v > 0 for v in records[0]["grad_norm"].values())


TINY_LR_SWEEP = {"batch_size": 16, "eval_batch_size": 32, "num_steps": 2, "log_every": 2,
                 "checkpoint_every": 0, "progress_bar": False, "model": test_train.tiny_model(),
                 "optimizer": {"warmup_steps": 0}}


@pytest.mark.slow
def test_points_differing_only_in_lr_compile_once(prepared_data_dir, tmp_path, capsys):
  fixed = {**TINY_LR_SWEEP, "dataset": {"data_dir": prepared_data_dir, "eval_split": "test[:64]"}}
  rows = runner.run_sweep(make_sweep(points.axis("lr", [0.05, 0.1, 0.2]), fixed=fixed),
                          str(tmp_path), pack="population:2")
  assert [r["status"] for r in rows] == ["completed"] * 3
  out = capsys.readouterr().out
  assert out.count("in a population of 2") == 2 and "point 2 lr=0.2: running in" in out
  # Off: the second and third points reuse the first one's compiled step.
  rows = runner.run_sweep(make_sweep(points.axis("lr", [0.05, 0.1, 0.2]), fixed=fixed),
                          str(tmp_path / "off"), pack="off")
  assert [r["status"] for r in rows] == ["completed"] * 3
  compile_s = [reporting.read_metrics(str(tmp_path / "off" / f"lr={lr}"))[0]["compile_s"]
               for lr in (0.05, 0.1, 0.2)]
  assert compile_s[0] > 0 and compile_s[1:] == [0.0, 0.0]


@pytest.mark.parametrize("text, expected", [("off", ("off", 1)), ("processes:3", ("processes", 3)),
                                            ("population:8", ("population", 8))])
def test_pack_modes_parse(text, expected):
  assert runner.parse_pack(text) == expected


@pytest.mark.parametrize("text", ["on", "population", "processes:0", "off:2", "population:x"])
def test_bad_pack_is_refused_naming_the_modes(text, tmp_path):
  with pytest.raises(ValueError, match=r"pack must be off, processes:N, population:N .* or auto"):
    runner.run_sweep(make_sweep(points.axis("depth", [20])), str(tmp_path), pack=text)
  assert os.listdir(tmp_path) == []


def test_auto_pack_is_the_platforms_measured_choice():
  assert runner.parse_pack("auto") == runner.parse_pack(runner.AUTO_PACK["cpu"])


# --- Damaged records ---

def test_a_damaged_point_summary_counts_as_started_and_the_sweep_runs_it_again(tmp_path,
                                                                              capsys):
  config = make_sweep(points.axis("depth", [20, 56]))
  runner.run_sweep(config, str(tmp_path), run_fn=FakeRun())
  path = tmp_path / "depth=56" / "summary.json"
  stored = json.loads(path.read_text())
  del stored["num_params"]
  path.write_text(json.dumps(stored))
  capsys.readouterr()

  rows = results.results_table(points.expand(config), str(tmp_path))
  assert [r["status"] for r in rows] == ["completed", "started"]
  assert capsys.readouterr().err.splitlines() == [
      f"warning: {path} is damaged: it has no field num_params; counted as no summary: "
      "running the run again rebuilds it"]
  again = FakeRun()
  rows = runner.run_sweep(config, str(tmp_path), run_fn=again)
  assert called_names(again) == ["depth=56"]
  assert [r["status"] for r in rows] == ["completed", "completed"]


@pytest.mark.parametrize("text, problem", [
    ("", "it is empty"),
    ('{"base": "configs/fashion_mnist.py", "poi', "not JSON (Unterminated string"),
    ("[1, 2]", "it holds a list, not an object"),
    ('{"base": "configs/fashion_mnist.py"}', "it has no field points"),
    ('{"base": 3, "points": [{"lr": 0.1}]}', "base must be a string and points a list"),
])
def test_a_damaged_sweep_json_is_one_error_line_naming_it_and_the_fix(tmp_path, text, problem):
  (tmp_path / "sweep.json").write_text(text)
  out = run_cli(f"--workdir={tmp_path}", "--report")
  assert out.returncode == 2
  (line,) = out.stderr.splitlines()
  assert line.startswith(f"error: {tmp_path}/sweep.json is damaged: {problem}")
  assert line.endswith("; pass --config=configs/sweeps/<name>.py to write it again")
  assert os.listdir(tmp_path) == ["sweep.json"]


def test_a_sweep_file_of_the_earlier_api_still_runs_and_says_what_replaced_it(tmp_path):
  # `from resnet_jax import sweep` inside the running sweep command used to define its flags a
  # second time (DuplicateFlagError).
  sweep_file = tmp_path / "old.py"
  sweep_file.write_text(
      "import ml_collections\nfrom resnet_jax import sweep\n\n\ndef get_config():\n"
      "  return ml_collections.ConfigDict({'base': 'configs/fashion_mnist.py', "
      "'points': sweep.product(sweep.axis('depth', [20]), sweep.axis('lr', [0.1, 0.2]))})\n")
  out = run_cli(f"--config={sweep_file}", f"--workdir={tmp_path / 'run'}", "--list")
  assert out.returncode == 0, out.stderr
  assert out.stdout.splitlines() == ["0 depth=20,lr=0.1", "1 depth=20,lr=0.2"]
  assert out.stderr.splitlines() == [  # Once a name.
      f"warning: resnet_jax.sweep.{name} is resnet_jax.points.{name} now: `from resnet_jax "
      f"import points` and call points.{name}" for name in ("product", "axis")]


def test_the_earlier_parallel_flag_is_refused_naming_its_replacement(tmp_path):
  out = run_cli(f"--workdir={tmp_path / 'runs'}", "--parallel=3")
  assert out.returncode == 2
  assert out.stderr == "error: --parallel is now --pack: give --pack=processes:3\n"
  assert not (tmp_path / "runs").exists()


def test_a_sweep_file_returning_a_dict_is_refused_in_one_line(tmp_path):
  sweep_file = tmp_path / "dict_sweep.py"
  sweep_file.write_text("def get_config():\n  return {'base': 'configs/fashion_mnist.py', "
                        "'points': [{'lr': 0.1}]}\n")
  out = run_cli(f"--config={sweep_file}", f"--workdir={tmp_path / 'runs'}", "--list")
  assert out.returncode == 2
  assert out.stderr == (f"error: --config={sweep_file}: its get_config() must return an "
                        "ml_collections.ConfigDict; it returned a dict\n")
  assert not (tmp_path / "runs").exists()
