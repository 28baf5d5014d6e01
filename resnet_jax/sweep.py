"""Sweeps: many ordinary runs that differ in a few config fields, and their results table.

A sweep is a config file in configs/sweeps/ whose `get_config()` returns three fields:
  base:   the run config file every point starts from, optionally with its argument:
          "configs/cifar10.py" or "configs/fashion_mnist.py:width=2".
  fixed:  fields set on every point, shaped like the run config: {"num_steps": 600,
          "optimizer": {"lr": 0.05}}. A batch-size sweep follows the linear scaling rule with
          {"optimizer": {"base_batch_size": 128}} (lr is then the lr at batch 128).
  points: a list of {field: value} dicts, built with `axis`, `product`, `zipped` and `chain`.

A point's field is one of the arguments every config file takes (depth, skip, width, shortcut,
variant, dtype; given to the base file's `get_config`, so what it derives from them, such as
ResNet-110's warm start in configs/cifar10.py, follows), an alias (lr, wd, momentum) or a dotted
path into the run config (seed, batch_size, optimizer.nesterov). Each point runs as an ordinary
run in `workdir/<name>`, named after its fields in order: `depth=56,skip=false,lr=0.1`.

Commands (`--config` may be left out once the workdir holds the sweep, in sweep.json):
  python -m resnet_jax.sweep --config=configs/sweeps/<name>.py --workdir=runs/<name>
      Runs every unfinished point, resuming interrupted ones from their checkpoints; a point is
      finished once it completed config.num_steps or diverged. A point that diverges or raises
      is recorded with its status and message and the sweep goes on. Ends by writing
      results.csv and printing the same table.
      --parallel=N runs N points at once, each in its own process (its output in the point's
      sweep_worker.log); --devices=0,1,2,3 gives the k-th concurrent process GPU k % 4 through
      CUDA_VISIBLE_DEVICES. On a 2-core CPU --parallel=2 ran 1.3x (depth 56, batch 128) to 2x
      (depth 20, batch 32) as fast as one point at a time. Processes on one GPU each take 75%
      of its memory unless XLA_PYTHON_CLIENT_MEM_FRACTION says less (--devices=0,0,0 shares
      one GPU three ways).
      SIGTERM or Ctrl-C stops the points in flight (workers are sent SIGTERM) with their last
      step checkpointed and status "preempted", starts no new point, writes the table and exits
      with 75; the same command resumes. A worker whose parent dies gets SIGTERM from the kernel
      (Linux), so a sweep killed with -9 leaves no worker training. A whole sweep locks its
      workdir (resnet_jax/lock.py): a second one there is refused.
  ... --list             Prints "index name", one line per point; runs nothing.
  ... --point_index=i    Runs point i only: one task of a cluster job array (exit code 75 if it
                         was preempted, so that the scheduler can requeue it).
  ... --report           Re-reads the points' summaries, rewrites results.csv, prints the table.
  ... --plot             As --report, and writes the figures (resnet_jax/plots.py).
From Python, `run_sweep(sweep_config, workdir)` does what the first command does and returns the
results table, one dict per point.

A SLURM job array, one point per task, no code changes:
  SWEEP="--config=configs/sweeps/ablation_cifar10.py --workdir=runs/ablation_cifar10"
  N=$(python -m resnet_jax.sweep $SWEEP --list | wc -l)
  sbatch --array=0-$((N - 1)) --gres=gpu:1 \
      --wrap="python -m resnet_jax.sweep $SWEEP --point_index=\\$SLURM_ARRAY_TASK_ID"
  python -m resnet_jax.sweep $SWEEP --report --plot       # once the array has finished
A task that is requeued resumes its point; one that finds its point finished does nothing.
SLURM sends SIGTERM to a task it preempts or times out: the task checkpoints and exits with 75.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import csv
import ctypes
import dataclasses
import functools
import importlib.util
import io
import json
import math
import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ml_collections
from absl import flags, logging

from resnet_jax import cli
from resnet_jax import config as config_lib
from resnet_jax import lock, plots, preemption, reporting

SWEEP_FILE = "sweep.json"
RESULTS_FILE = "results.csv"
WORKER_LOG = "sweep_worker.log"
SWEEP_FIELDS = ("base", "fixed", "points")
ALIASES = {"lr": "optimizer.lr", "wd": "optimizer.weight_decay", "momentum": "optimizer.momentum"}
# A point's results: the summary.json fields of its run (errors are fractions).
SUMMARY_COLUMNS = ("status", "train_error", "test_error", "best_test_error", "step",
                   "wall_time_s", "num_params", "message")
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

Points = list[dict[str, Any]]
RunFn = Callable[[ml_collections.ConfigDict, str], dict]


# --- Building the points (in configs/sweeps/*.py) ---

def axis(field: str, values: Sequence[Any]) -> Points:
  """One field over a list of values: `axis("depth", [20, 56])` -> [{depth: 20}, {depth: 56}]."""
  if isinstance(values, str) or not isinstance(values, Sequence) or not values:
    raise ValueError(f"axis {field!r}: values must be a non-empty list; got {values!r}")
  return [{field: value} for value in values]


def product(*parts: Points) -> Points:
  """Every combination, the last part varying fastest."""
  out: Points = [{}]
  for part in parts:
    out = [_merge(a, b) for a in out for b in part]
  return out


def zipped(*parts: Points) -> Points:
  """The i-th point of every part together; the parts must have equal lengths."""
  lengths = [len(part) for part in parts]
  if len(set(lengths)) > 1:
    fields = [sorted({k for point in part for k in point}) for part in parts]
    raise ValueError(f"zipped parts must have the same number of points; got {lengths} points "
                     f"for fields {fields}")
  out = []
  for group in zip(*parts):
    point: dict[str, Any] = {}
    for part_point in group:
      point = _merge(point, part_point)
    out.append(point)
  return out


def chain(*parts: Points) -> Points:
  """The parts' points one after another (e.g. a product plus a few extra points)."""
  return [point for part in parts for point in part]


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
  twice = sorted(a.keys() & b.keys())
  if twice:
    raise ValueError(f"field(s) {', '.join(twice)} set twice in one point: combine each field "
                     "from one axis only")
  return {**a, **b}


# --- From a sweep config to validated run configs ---

@dataclasses.dataclass(frozen=True)
class Point:
  index: int
  name: str  # Its sub-workdir, e.g. "depth=56,skip=false,lr=0.1".
  fields: dict[str, Any]
  config: ml_collections.ConfigDict  # The run config, validated.


def format_value(value: Any) -> str:
  """A field value as it appears in names and config arguments: true, 0.1, 1e-05, 32000_48000."""
  if isinstance(value, bool):
    return "true" if value else "false"
  if isinstance(value, (list, tuple)):
    return "_".join(format_value(v) for v in value)
  return str(value)  # For floats the shortest text that reads back as the same number.


def point_name(fields: dict[str, Any]) -> str:
  """`{"depth": 56, "skip": False}` -> "depth=56,skip=false"."""
  if not fields:
    raise ValueError("a point must set at least one field")
  name = ",".join(f"{key}={format_value(value)}" for key, value in fields.items())
  if "/" in name or name.count(",") != len(fields) - 1:
    raise ValueError(f"point fields must not contain '/' or ','; got {name!r}")
  return name


def expand(sweep_config: ml_collections.ConfigDict) -> list[Point]:
  """Every point of the sweep with its validated run config.

  Raises:
    ConfigError: before anything runs, listing every problem: unknown sweep or config fields,
      values of the wrong type, configs that `config.validate` rejects, duplicate names.
  """
  unknown = sorted(set(sweep_config.keys()) - set(SWEEP_FIELDS))
  missing = [f for f in ("base", "points") if f not in sweep_config]
  if unknown or missing:
    raise config_lib.ConfigError(
        f"a sweep config has the fields {', '.join(SWEEP_FIELDS)}; unknown: "
        f"{unknown or 'none'}, missing: {missing or 'none'}")
  path, _, base_arg = sweep_config.base.partition(":")
  get_config = _load_get_config(path)
  fixed = sweep_config.get("fixed") or {}
  errors: list[str] = []
  points: list[Point] = []
  for index, fields in enumerate(sweep_config.points):
    try:
      name = point_name(fields)
      config = point_config(get_config, base_arg, fixed, fields)
      config_lib.validate(config)
    except (ValueError, TypeError) as e:
      errors.append(f"point {index} {dict(fields)}: " + str(e).replace("\n", "\n    "))
      continue
    points.append(Point(index, name, dict(fields), config))
  names = [p.name for p in points]
  errors += [f"two points are both named {n!r}" for n in sorted({n for n in names
                                                                   if names.count(n) > 1})]
  if not sweep_config.points:
    errors.append("the sweep has no points")
  if errors:
    raise config_lib.ConfigError("invalid sweep:\n  " + "\n  ".join(errors))
  return points


def point_config(get_config: Callable[..., ml_collections.ConfigDict], base_arg: str,
                 fixed: Mapping[str, Any], fields: dict[str, Any]) -> ml_collections.ConfigDict:
  """The run config of one point: base file (with its model arguments), then fixed, then fields."""
  model_args = config_lib.parse_arg(base_arg)
  model_args.update({k: format_value(v) for k, v in fields.items()
                     if k in config_lib.MODEL_ARGS})
  arg = ",".join(f"{k}={v}" for k, v in model_args.items())
  config = get_config(arg) if arg else get_config()
  for path, value in _leaves(fixed):
    _set_field(config, path, value)
  for key, value in fields.items():
    if key not in config_lib.MODEL_ARGS:
      _set_field(config, ALIASES.get(key, key), value)
  return config


def _leaves(tree, prefix: str = ""):
  """(dotted path, value) of every leaf of a nested dict or ConfigDict."""
  for key, value in tree.items():
    if isinstance(value, (dict, ml_collections.ConfigDict)):
      yield from _leaves(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}", value


def _set_field(config: ml_collections.ConfigDict, path: str, value: Any) -> None:
  node = config
  *parents, leaf = path.split(".")
  for key in parents:
    node = node.get(key) if isinstance(node, ml_collections.ConfigDict) else None
  if (not isinstance(node, ml_collections.ConfigDict) or leaf not in node
      or isinstance(node[leaf], ml_collections.ConfigDict)):
    raise ValueError(
        f"unknown config field {path!r}: a field is a model argument "
        f"({', '.join(config_lib.MODEL_ARGS)}), "
        f"an alias ({', '.join(ALIASES)}) or a dotted path to a field of resnet_jax/config.py "
        "such as optimizer.momentum")
  try:
    node[leaf] = value
  except TypeError as e:
    raise ValueError(f"config field {path!r}: {e}") from None


def _load_get_config(path: str) -> Callable[..., ml_collections.ConfigDict]:
  """The `get_config` of a config file, loaded the way ml_collections.config_flags does."""
  resolved = next((p for p in (path, os.path.join(_REPO_ROOT, path)) if os.path.isfile(p)), None)
  if resolved is None:
    raise config_lib.ConfigError(
        f"base config file {path!r} not found (relative paths are read from the current "
        f"directory, then from {_REPO_ROOT})")
  spec = importlib.util.spec_from_file_location("sweep_base_config", resolved)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config


# --- Running ---

def run_sweep(sweep_config: ml_collections.ConfigDict, workdir: str, *,
              run_fn: RunFn | None = None, point_index: int | None = None, parallel: int = 1,
              devices: Sequence[str] = (), lock_timeout_s: float = 0.0) -> list[dict]:
  """Runs the sweep's unfinished points, then writes and returns the results table.

  SIGTERM or SIGINT stops the sweep the way it stops a run: the points in flight checkpoint and
  record status "preempted" (parallel workers are sent SIGTERM), no new point starts, and the
  table is written; running the sweep again resumes them.

  Args:
    sweep_config: see the module docstring.
    workdir: the sweep's directory; point i runs in workdir/<its name>. A whole sweep (no
      point_index) locks it: a second one there is refused.
    run_fn: runs one point, `(config, workdir) -> summary dict`; default
      `train.train_and_evaluate`. Only in-process: not with parallel > 1.
    point_index: run this point only (a cluster array task); None runs them all.
    parallel: points run at once, each in its own process.
    devices: GPU ids handed out to those processes, in turn.
    lock_timeout_s: how long a point waits for its workdir while another process holds it.

  Returns:
    One dict per point, in sweep order: name, the fields, then SUMMARY_COLUMNS.
  """
  points = expand(sweep_config)
  if point_index is not None and not 0 <= point_index < len(points):
    raise config_lib.ConfigError(
        f"point_index must be in [0, {len(points) - 1}]; got {point_index}")
  if parallel < 1 or parallel > 1 and run_fn is not None:
    raise config_lib.ConfigError(f"parallel must be >= 1, and 1 with a run_fn; got {parallel}")
  sweep_lock = lock.WorkdirLock(workdir)
  if point_index is None:
    sweep_lock.acquire()  # Array tasks share the sweep's directory; whole sweeps do not.
  else:
    os.makedirs(workdir, exist_ok=True)
  try:
    reporting.write_text_atomic(os.path.join(workdir, SWEEP_FILE),
                                sweep_config.to_json(indent=2) + "\n")
    selected = points if point_index is None else [points[point_index]]
    todo = []
    for point in selected:
      if is_finished(read_summary(_point_dir(workdir, point)), point.config):
        _say(point, "finished, skipped")
      else:
        todo.append(point)
    if parallel > 1:
      _run_in_processes(todo, workdir, parallel, list(devices))
    else:
      run_fn = run_fn or functools.partial(_train_and_evaluate, lock_timeout_s=lock_timeout_s)
      with preemption.StopRequest() as stop:
        for point in todo:
          if stop.requested(0):
            break
          if run_point(point, workdir, run_fn)["status"] == "preempted":
            stop.request("the preempted point")
    return write_results(points, workdir)
  finally:
    sweep_lock.release()


def is_finished(summary: dict | None, config: ml_collections.ConfigDict) -> bool:
  """Completed to the config's num_steps, or diverged (running it again would diverge again)."""
  if summary is None:
    return False
  return (summary["status"] == "diverged"
          or summary["status"] == "completed" and summary.get("step", 0) >= config.num_steps)


def run_point(point: Point, workdir: str, run_fn: RunFn) -> dict:
  """Runs one point in its sub-workdir; a failure is recorded in its summary, not raised.

  A point whose workdir another process holds is left to it (status "started", no summary).
  """
  point_dir = _point_dir(workdir, point)
  _clear_summary(point_dir)
  os.makedirs(point_dir, exist_ok=True)
  _say(point, f"running in {point_dir}")
  try:
    summary = run_fn(point.config, point_dir)
  except lock.WorkdirError as e:
    reporting.warn(f"point {point.index} {point.name} skipped: {e}")
    return {"status": "started", "message": str(e)}
  except Exception as e:  # pylint: disable=broad-except  # One point must not stop the sweep.
    logging.exception("point %d %s failed", point.index, point.name)  # --verbosity=-2 shows it.
    reporting.warn(f"point {point.index} {point.name} failed: {reporting.brief(e)}")
    # train_and_evaluate writes its own summary before re-raising, unless it failed too early.
    summary = read_summary(point_dir) or _failed_summary(f"{type(e).__name__}: {e}")
  if read_summary(point_dir) is None:
    reporting.write_json_atomic(os.path.join(point_dir, reporting.SUMMARY_FILE), summary)
  _say(point, summary["status"])
  return summary


def _say(point: Point, what: str) -> None:
  print(f"point {point.index} {point.name}: {what}", flush=True)


# A parallel sweep's workers wait this long for a point whose previous worker is still stopping.
WORKER_LOCK_TIMEOUT_S = 120
_PARENT_ENV = "RESNET_JAX_SWEEP_PARENT"  # The parent's PID, in a parallel sweep's workers.


def worker_command(workdir: str, index: int) -> list[str]:
  """The command a parallel sweep runs for point `index` of the sweep saved in `workdir`."""
  return [sys.executable, "-m", "resnet_jax.sweep", f"--workdir={workdir}",
          f"--point_index={index}", f"--lock_timeout_s={WORKER_LOCK_TIMEOUT_S}"]


def _run_in_processes(points: list[Point], workdir: str, parallel: int,
                      devices: list[str]) -> None:
  """Runs the points in up to `parallel` worker processes; SIGTERM/SIGINT is passed on to them."""
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

  def run(point: Point) -> None:
    slot = slots.get()
    try:
      code = run_worker(point, slot)
    finally:
      slots.put(slot)
    point_dir = _point_dir(workdir, point)
    log_path = os.path.join(point_dir, WORKER_LOG)
    if code is None:  # Not started: the sweep was stopped first.
      return
    if code == cli.EXIT_USAGE:
      reporting.warn(f"point {point.index} {point.name} was not run; see {log_path}")
    elif read_summary(point_dir) is None:
      reporting.write_json_atomic(
          os.path.join(point_dir, reporting.SUMMARY_FILE),
          _failed_summary(f"worker process exited with code {code}; see {log_path}"))

  def run_worker(point: Point, slot: int) -> int | None:
    """The worker's exit code, or None if the sweep was stopped before it started."""
    point_dir = _point_dir(workdir, point)
    env = dict(os.environ, **{_PARENT_ENV: str(os.getpid())})
    if devices:
      env["CUDA_VISIBLE_DEVICES"] = devices[slot % len(devices)]
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
      list(pool.map(run, points))


def _stop_with_parent() -> None:
  """In a parallel sweep's worker: SIGTERM when the parent dies, so none is left orphaned.

  Linux's PR_SET_PDEATHSIG; the worker then stops like any run sent SIGTERM (checkpointed,
  "preempted"), and the next sweep resumes it. Elsewhere this does nothing.
  """
  parent = os.environ.get(_PARENT_ENV)
  if parent is None or not sys.platform.startswith("linux"):
    return
  pr_set_pdeathsig = 1
  ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
  if os.getppid() != int(parent):  # The parent died before prctl took effect.
    os.kill(os.getpid(), signal.SIGTERM)


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                        lock_timeout_s: float = 0.0) -> dict:
  from resnet_jax import train  # Late: --list, --report and a parallel parent never train.
  return train.train_and_evaluate(config, workdir, lock_timeout_s=lock_timeout_s)


def _failed_summary(message: str) -> dict:
  nan = float("nan")
  return {"status": "failed", "message": message, "step": 0, "train_loss": nan,
          "train_error": nan, "test_error": nan, "best_test_error": nan, "wall_time_s": 0.0,
          "num_params": 0}


def _point_dir(workdir: str, point: Point) -> str:
  return os.path.join(workdir, point.name)


def _clear_summary(point_dir: str) -> None:
  path = os.path.join(point_dir, reporting.SUMMARY_FILE)
  if os.path.exists(path):
    os.remove(path)


def load_sweep(workdir: str) -> ml_collections.ConfigDict:
  """The sweep config an earlier run saved in `workdir`."""
  path = os.path.join(workdir, SWEEP_FILE)
  if not os.path.exists(path):
    raise config_lib.ConfigError(f"{path} not found: pass --config=configs/sweeps/<name>.py")
  with open(path) as f:
    # Field order matters (it names the points), and json keeps it.
    return ml_collections.ConfigDict(json.load(f))


# --- Results ---

def read_summary(point_dir: str) -> dict | None:
  path = os.path.join(point_dir, reporting.SUMMARY_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def results_table(points: list[Point], workdir: str) -> list[dict]:
  """One row per point: name, every swept field (None where a point lacks it), SUMMARY_COLUMNS.

  Status is the run's ("completed", "diverged", "failed"), or "started" for a point with a
  workdir but no summary yet (running or interrupted), "pending" for one not started.
  """
  fields = list(dict.fromkeys(k for p in points for k in p.fields))
  rows = []
  for point in points:
    point_dir = _point_dir(workdir, point)
    summary = read_summary(point_dir) or {
        "status": "started" if os.path.isdir(point_dir) else "pending"}
    rows.append({"name": point.name, **{f: point.fields.get(f) for f in fields},
                 **{c: summary.get(c) for c in SUMMARY_COLUMNS}})
  return rows


def write_results(points: list[Point], workdir: str) -> list[dict]:
  """Writes workdir/results.csv from the points' summaries; returns its rows."""
  rows = results_table(points, workdir)
  out = io.StringIO()
  writer = csv.DictWriter(out, fieldnames=list(rows[0]), lineterminator="\n")
  writer.writeheader()
  writer.writerows({k: format_value(v) if isinstance(v, bool) else v for k, v in row.items()}
                   for row in rows)
  reporting.write_text_atomic(os.path.join(workdir, RESULTS_FILE), out.getvalue())
  return rows


def load_runs(points: list[Point], workdir: str) -> list[plots.Run]:
  """The points' runs as the plots take them: fields, summary and metrics events."""
  return [plots.Run(p.fields, read_summary(_point_dir(workdir, p)) or {},
                    reporting.read_metrics(_point_dir(workdir, p))) for p in points]


def format_table(rows: list[dict]) -> str:
  """The results as aligned text: errors in %, then the message of every point not completed."""
  fields = [k for k in rows[0] if k not in SUMMARY_COLUMNS]
  header = [*fields, "status", "train err %", "test err %", "best test %", "steps", "time",
            "params"]
  body = [[*(format_value(r[f]) if r[f] is not None else "" for f in fields), r["status"],
           _percent(r["train_error"]), _percent(r["test_error"]),
           _percent(r["best_test_error"]), _number(r["step"], "{:d}"),
           _number(r["wall_time_s"], "{:.0f}s"), _number(r["num_params"], "{:,}")]
          for r in rows]
  widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
  lines = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip()
           for line in [header, *body]]
  lines += [f"{r['name']}: {r['status']}: {r['message']}" for r in rows
            if r["status"] in ("diverged", "failed")]
  return "\n".join(lines)


def _percent(value) -> str:
  return f"{100 * value:.2f}" if isinstance(value, (int, float)) and math.isfinite(value) else "-"


def _number(value, fmt: str) -> str:
  return fmt.format(value) if isinstance(value, (int, float)) and value == value else "-"


# --- Command line ---

def _define_flags() -> None:
  cli.define_config_file(
      "config", None, "The sweep file, configs/sweeps/<name>.py; may be left out once the "
      "workdir holds sweep.json.")
  flags.DEFINE_string("workdir", None, "The sweep's directory.", required=True)
  flags.DEFINE_bool("list", False, "Print 'index name' per point and exit.")
  flags.DEFINE_integer("point_index", None, "Run only this point.")
  flags.DEFINE_integer("parallel", 1, "Points at once, one process each.")
  flags.DEFINE_list("devices", [], "GPU ids handed to the parallel processes in turn.")
  flags.DEFINE_bool("report", False, "Rewrite results.csv and print it; run nothing.")
  flags.DEFINE_bool("plot", False, "As --report, and write the figures.")
  flags.DEFINE_float("lock_timeout_s", 0.0, "Seconds a point waits for its workdir while "
                     "another process holds it.")


def main(argv: list[str]) -> int:
  del argv  # cli.run refuses positional arguments.
  args = flags.FLAGS
  if args.point_index is not None:
    _stop_with_parent()
  sweep_config = (cli.load_config(flags.FLAGS["config"]) if args.config is not None
                  else load_sweep(args.workdir))
  if args.list:
    for point in expand(sweep_config):
      print(point.index, point.name)
    return cli.EXIT_OK
  if args.report or args.plot:
    points = expand(sweep_config)
    rows = write_results(points, args.workdir)
  else:
    rows = run_sweep(sweep_config, args.workdir, point_index=args.point_index,
                     parallel=args.parallel, devices=args.devices,
                     lock_timeout_s=args.lock_timeout_s)
  if args.point_index is not None:  # A worker or array task: its point's outcome is the code.
    return (cli.EXIT_PREEMPTED if rows[args.point_index]["status"] == "preempted"
            else cli.EXIT_OK)
  print(format_table(rows))
  print(f"results: {os.path.join(args.workdir, RESULTS_FILE)}")
  if args.plot:
    for path in plots.write_sweep_figures(load_runs(points, args.workdir), args.workdir,
                                          dataset=points[0].config.dataset.name):
      print(f"wrote {path}")
  if any(row["status"] == "preempted" for row in rows):
    print("sweep preempted: run the same command again to resume it", file=sys.stderr)
    return cli.EXIT_PREEMPTED
  return cli.EXIT_OK


if __name__ == "__main__":
  # Defined here, not on import: the files in configs/sweeps import this module for `axis` and
  # `product` while it runs as __main__, and a second --config would clash with the first.
  _define_flags()
  cli.run(main)
