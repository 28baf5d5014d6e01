"""Packed sweeps (issue #11): one sweep in every packing mode, each timed end to end.

  python experiments/pack_bench.py --sweep=configs/sweeps/lr_fashion_mnist.py \
      --modes=separate,off,processes:2,population:4 --num_steps=30 --log_every=10 \
      --fixed='{"dataset": {"eval_split": "test[:1000]"}}' --json_out=/tmp/pack.jsonl
  python experiments/pack_bench.py --table=/tmp/pack.jsonl      # the table of earlier lines

Each mode runs the whole sweep in a fresh directory, with an empty compilation cache:
  separate      the baseline, as before the issue: each point its own `python -m
                resnet_jax.main` process, one after another, each with a new, empty
                JAX_COMPILATION_CACHE_DIR (every point compiles and pays a process start; the
                in-process sweep of before compiled per point too, but started once);
  off, processes:N, population:N, auto
                `python -m resnet_jax.sweep --pack=MODE` (resnet_jax/runner.py), the points
                sharing the cache in the sweep's directory.
`--num_steps`, `--log_every` and `--fixed` override the sweep's for every point: the bench
runs a copy of the sweep file with them added to its "fixed" fields (and no periodic evaluation
or checkpoint, so that the modes time training, compilation and start-up), written beside the
modes' directories. A mode is cut short after `--mode_timeout` seconds, or where the bench's
`--max_seconds` run out (modes not started by then are skipped; SIGTERM to the bench does the
same at once): it is sent SIGTERM, its points checkpoint within STOP_GRACE_S, and it is
reported "timed_out" with the points it finished.

What is reported per mode (one JSON line each, then a markdown table):
  wall_s            seconds around the mode's subprocesses: start-up, data, compilation, every
                    point's training, the final evaluations and checkpoints.
  compilations      programs XLA compiled in the mode taking over `--compiled_above_s` (1 s),
                    counted from the subprocesses' output, in which JAX's compiler logs each
                    compilation beside the persistent cache (JAX_DEBUG_LOG_MODULES): the
                    initial-state, train and eval programs of every point that compiled them;
                    a program a point found compiled, in its process or in the cache, is not
                    counted. xla_compile_s: their seconds; compiled_programs: by program.
  compile_s_sum, compile_s_max   of the points' compile_s (their first train event's: the train
                    program's tracing, lowering and compiling or loading), a population's (each
                    of its members logs it) counted once: equal values within a mode count once.
  train_s           seconds in which some point was training: the union over points of the span
                    from the start of its first log window to its last train event (windows
                    exclude compilation; the events' wall_time_s are placed on one clock by the
                    time metrics.jsonl was last written, at the run's last event).
  train_img_per_s   the images every point trained (steps x batch, summed over points) over
                    train_s: the sweep's training throughput across points. One point at a
                    time gives one point's img/s; points trained at once add up.
  wall_img_per_s    the same images over wall_s: what the sweep delivers, everything included.
  point_img_per_s   each point's own images over its own training seconds (its log windows).
  test_error, train_loss   each point's final test error and training loss (summary.json),
                    to show every mode trained the same sweep; same_configs says whether each
                    point's config.json equals the first mode's.
Lines also carry the device (jax.devices()[0].device_kind from a subprocess, and the CPU's model
on a CPU), the JAX version, the sweep, its steps and batch, and the load average before and
after the mode (other jobs on the machine slow every figure: compare lines taken together).

Measured on this project's 2-core AMD EPYC CPU (AVX2), jax 0.10.2: the 4-point lr sweep of
configs/fashion_mnist.py (configs/sweeps/lr_fashion_mnist.py, ResNet-20 at batch 128) shortened
to 30 steps, logged every 10, each point evaluated on test[:1000], with the command of
configs/sweeps/lr_fashion_mnist.py (experiments/results/pack_cpu.jsonl; load average 1.6 to 4.1
from other engineers' jobs):

  | mode | wall s | compilations > 1 s (s) | train img/s | wall img/s | img/s a point |
  |---|---:|---:|---:|---:|---:|
  | separate | 252.7 | 10 (77.2) | 106 | 61 | 99 |
  | off | 170.1 | 3 (13.8) | 109 | 90 | 111 |
  | processes:2 | 262.1 | 6 (91.6) | 85 | 59 | 43 |
  | population:4 | 631.3 | 3 (16.3) | 27 | 24 | 7 |

`off` ran the sweep in 0.67x the baseline's time: it compiled the initial-state, train and eval
programs once (separate: each 4 times, two of the eval compilations under 1 s) and started once. Two
processes on two cores trained slower than one (85 against 109 img/s: XLA already spreads one
step over both cores) and compiled twice at once (19.5 s each). The population's vmapped
convolutions trained 4x slower than one network (27 img/s for all four); its test errors differ
from the other modes' (which agree to the last bit) because rounding differences grow with
every step (tests/test_population.py). Every mode trained every point to the same config
(same_configs). A first run at load average 3 to 5 gave separate 379 s, off 223 s,
processes:2 255 s, population:4 682 s. With `--fixed='{"model": {"conv": "im2col"}}'` (a
matrix product, batched under vmap; experiments/results/pack_cpu_im2col.jsonl, load 0.4 to 1.9)
off took 158.8 s (128 img/s) and population:4 179.1 s (126 img/s for all four): level with one
network at a time, not past it. On a CPU, then, `off` (runner.AUTO_PACK's "cpu").

Not yet measured on a GPU: experiments/gpu_figures.sh part 8 runs configs/sweeps/
lr_fashion_mnist_gpu.py at full length in population:8, processes:4, off and separate, in at
most 360 s (pack_gpu.jsonl).
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

# Run as a script, the repository root is not on sys.path.
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from resnet_jax import config as config_lib  # noqa: E402  (none of these imports JAX)
from resnet_jax import points, reporting  # noqa: E402

SEPARATE = "separate"
CACHE_ENV = "JAX_COMPILATION_CACHE_DIR"
LOG_ENV = "JAX_DEBUG_LOG_MODULES"
# What jax._src.compiler logs (at debug level) after compiling a program, whether or not it
# writes it to the persistent cache: not for a program it found there, nor for one the process
# had. Groups: the program's name, the seconds.
COMPILED = re.compile(r"'([^']+)' (?:because it )?took (?:at least|<) [0-9.]+ seconds to compile "
                      r"\(([0-9.]+)s\)")
# What every point of every mode gets, beside the flags' overrides (bench_sweep).
_ALWAYS_FIXED = {"eval_every": 0, "checkpoint_every": 0, "eval_every_epochs": 0,
                 "checkpoint_every_epochs": 0}
STOP_GRACE_S = 20  # A mode cut short gets this long after SIGTERM to checkpoint and exit.
_DEVICE_PROBE = ("import json, jax; d = jax.devices()[0]; print(json.dumps({'platform': "
                 "d.platform, 'device': d.device_kind, 'device_count': jax.device_count(), "
                 "'jax': jax.__version__}))")


# --- The sweep each mode runs ---

def bench_sweep(sweep_config, *, num_steps: int | None = None, log_every: int | None = None,
                fixed: dict | None = None):
  """The sweep config with the bench's overrides merged into its "fixed" fields (a copy).

  num_steps replaces the sweep's length, epochs included; no point evaluates or checkpoints
  before its end (each still does both there); `fixed` (shaped like the run config) is merged
  last.
  """
  sweep = sweep_config.to_dict()
  overrides = dict(_ALWAYS_FIXED)
  if num_steps is not None:
    overrides.update(num_steps=num_steps, num_epochs=0)
  if log_every is not None:
    overrides["log_every"] = log_every
  sweep["fixed"] = _merged(_merged(sweep.get("fixed") or {}, overrides), fixed or {})
  return type(sweep_config)(sweep)


def _merged(tree: dict, overrides: dict) -> dict:
  out = dict(tree)
  for key, value in overrides.items():
    out[key] = (_merged(out.get(key) or {}, value) if isinstance(value, dict) else value)
  return out


def write_sweep_file(sweep_config, path: str, origin: str) -> None:
  """Writes `sweep_config` as a sweep file (configs/sweeps/ style) that `--config` can load."""
  text = json.dumps(sweep_config.to_dict(), indent=2)  # Keeps field order: it names points.
  with open(path, "w") as f:
    f.write(f'"""Written by experiments/pack_bench.py: {origin} with its overrides."""\n\n'
            "import json\n\nimport ml_collections\n\n\ndef get_config():\n"
            f"  return ml_collections.ConfigDict(json.loads(r'''{text}'''))\n")


def main_command(sweep_config, point: points.Point, workdir: str) -> list[str]:
  """The `python -m resnet_jax.main` command that runs `point` of the sweep alone, in
  `workdir`: its model arguments on the base file, the fixed fields and its own as overrides."""
  path, _, base_arg = sweep_config.base.partition(":")
  model_args = {**config_lib.split_arg(base_arg),
                **{k: points.format_value(v) for k, v in point.fields.items()
                   if k in config_lib.MODEL_ARGS}}
  config = path + (":" + ",".join(f"{k}={v}" for k, v in model_args.items()) if model_args
                   else "")
  overrides = config_lib.flatten(sweep_config.get("fixed") or {})
  overrides.update((points.ALIASES.get(k, k), v) for k, v in point.fields.items()
                   if k not in config_lib.MODEL_ARGS)
  return [sys.executable, "-m", "resnet_jax.main", f"--config={config}", f"--workdir={workdir}",
          *(f"--config.{k}={_flag_value(v)}" for k, v in overrides.items())]


def _flag_value(value: Any) -> str:
  if isinstance(value, (list, tuple)):
    return "(" + ",".join(_flag_value(v) for v in value) + ("," if len(value) == 1 else "") + ")"
  return points.format_value(value)


# --- Running a mode ---

def _run(command: list[str], env: dict, log_path: str, deadline: float) -> tuple[int | None, bool]:
  """Runs `command` in the repository root until it exits or `deadline` (time.time()) passes,
  then SIGTERM and, after STOP_GRACE_S, SIGKILL. Returns (exit code, whether it was cut short)."""
  with open(log_path, "a") as log:
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
      return process.wait(timeout=max(deadline - time.time(), 0.1)), False
    except subprocess.TimeoutExpired:
      return _stop(process), True
    except BaseException:  # Ctrl-C or SIGTERM of the bench: its child is stopped too.
      _stop(process)
      raise


def _stop(process: subprocess.Popen) -> int:
  """SIGTERM (a run checkpoints and exits with 75), SIGKILL after STOP_GRACE_S; its exit code."""
  process.send_signal(signal.SIGTERM)
  try:
    return process.wait(timeout=STOP_GRACE_S)
  except subprocess.TimeoutExpired:
    process.kill()
    return process.wait()


def _environment(cache_dir: str | None) -> dict:
  """This environment with the compilation cache `cache_dir`, or none chosen (a sweep then uses
  its own directory's), and JAX's compiler logging each compilation (COMPILED)."""
  env = {k: v for k, v in os.environ.items() if k != CACHE_ENV}
  if cache_dir:
    env[CACHE_ENV] = cache_dir
  env[LOG_ENV] = ",".join(filter(None, [env.get(LOG_ENV), "jax._src.compiler"]))
  return env


def run_mode(mode: str, sweep_config, sweep_file: str, root: str,
             deadline: float) -> tuple[str, float, str, int | None]:
  """Runs the whole sweep in `mode` in root/<mode>, output in root/<mode>.log; returns (workdir,
  wall seconds, status, exit code: a nonzero one if any), status "completed", "failed" (a
  nonzero exit) or "timed_out" (cut short at `deadline`, a time.time())."""
  workdir = os.path.join(root, mode.replace(":", "_"))
  os.makedirs(workdir)
  log_path = workdir + ".log"
  start, codes, cut = time.time(), [], False
  if mode == SEPARATE:
    for point in points.expand(sweep_config):
      if time.time() >= deadline:
        cut = True
        break
      cache = os.path.join(root, "separate_caches", str(point.index))  # New and empty.
      code, cut = _run(main_command(sweep_config, point, point.run_dir(workdir)),
                       _environment(cache), log_path, deadline)
      codes.append(code)
      if cut:
        break
  else:
    code, cut = _run([sys.executable, "-m", "resnet_jax.sweep", f"--config={sweep_file}",
                      f"--workdir={workdir}", f"--pack={mode}"], _environment(None), log_path,
                     deadline)
    codes.append(code)
  wall_s = time.time() - start
  status = "timed_out" if cut else "failed" if any(codes) else "completed"
  return workdir, wall_s, status, max(codes, key=abs, default=None)


# --- What a mode measured ---

def measure_point(events: list[dict], batch_size: int, written_at: float,
                  summary: dict | None) -> dict:
  """One point's figures from its metrics.jsonl events (a fresh run: its first step is 0).

  written_at: the time (time.time()) its last event was written, which places its events'
    wall_time_s on the clock of the other points.
  """
  train = [e for e in events if e["event"] == reporting.TRAIN]
  out = {"status": (summary or {}).get("status", "not run"),
         "test_error": (summary or {}).get("test_error"),
         "train_loss": (summary or {}).get("train_loss")}
  if not train:
    return out
  seconds, last = [], 0
  for e in train:  # Each log window: its steps at its measured throughput.
    seconds.append((e["step"] - last) * batch_size / e["img_per_s"])
    last = e["step"]
  origin = written_at - events[-1]["wall_time_s"]
  end = origin + train[-1]["wall_time_s"]
  start = origin + train[0]["wall_time_s"] - seconds[0]
  return {**out, "steps": last, "images": last * batch_size, "train_s": sum(seconds),
          "img_per_s": last * batch_size / sum(seconds), "compile_s": train[0].get("compile_s"),
          "span": (start, end)}


def read_point(run_dir: str) -> dict:
  """measure_point of the run in `run_dir`, with its config.json (None if it never started)."""
  metrics = os.path.join(run_dir, reporting.METRICS_FILE)
  config_path = os.path.join(run_dir, reporting.CONFIG_FILE)
  summary = reporting.Summary.read(run_dir)
  if not os.path.exists(config_path):
    return measure_point([], 0, 0.0, summary and summary.to_dict())
  with open(config_path) as f:
    config = json.load(f)
  events = reporting.read_metrics(run_dir) if os.path.exists(metrics) else []
  written_at = os.path.getmtime(metrics) if events else 0.0
  return {**measure_point(events, config["batch_size"], written_at,
                          summary and summary.to_dict()), "config": config}


def count_compilations(logs: list[str], above_s: float) -> dict:
  """The compilations over `above_s` seconds that the logs `logs` record (COMPILED): their
  number, seconds in all, and number by program ("jit_train": 2)."""
  found = [(name, float(seconds)) for text in logs for name, seconds in COMPILED.findall(text)]
  slow = [(name, seconds) for name, seconds in found if seconds > above_s]
  by_program: dict[str, int] = {}
  for name, _ in slow:
    by_program[name] = by_program.get(name, 0) + 1
  return {"compilations": len(slow), "xla_compile_s": round(sum(s for _, s in slow), 2),
          "compiled_programs": by_program}


def read_logs(workdir: str) -> list[str]:
  """The output of a mode run in `workdir`: its own log and its worker processes'."""
  paths = [workdir + ".log", *sorted(glob.glob(os.path.join(workdir, "*", "sweep_worker.log")))]
  texts = []
  for path in filter(os.path.exists, paths):
    with open(path, errors="replace") as f:
      texts.append(f.read())
  return texts


def union_seconds(spans: list[tuple[float, float]]) -> float:
  """The length of the union of the intervals [start, end]."""
  total, reach = 0.0, float("-inf")
  for start, end in sorted(spans):
    if end > reach:
      total += end - max(start, reach)
      reach = end
  return total


def summarize_mode(names: list[str], measured: list[dict], wall_s: float) -> dict:
  """A mode's figures (see the module docstring) from its points' measure_point results."""
  trained = [m for m in measured if "images" in m]
  images = sum(m["images"] for m in trained)
  train_s = union_seconds([m["span"] for m in trained])
  # A population's members all log its one compile_s: equal values count once.
  compiles = sorted({m["compile_s"] for m in trained if m.get("compile_s") is not None})
  return {
      "points": len(names), "finished": sum(m["status"] == reporting.COMPLETED
                                            for m in measured),
      "wall_s": round(wall_s, 2),
      "compile_s_sum": round(sum(compiles), 2), "compile_s_max": max(compiles, default=None),
      "images": images, "train_s": round(train_s, 2),
      "train_img_per_s": round(images / train_s, 1) if train_s else None,
      "wall_img_per_s": round(images / wall_s, 1) if wall_s else None,
      "point_img_per_s": {n: round(m["img_per_s"], 1) for n, m in zip(names, measured)
                          if "img_per_s" in m},
      "compile_s": {n: m.get("compile_s") for n, m in zip(names, measured)},
      "test_error": {n: m["test_error"] for n, m in zip(names, measured)},
      "train_loss": {n: m["train_loss"] for n, m in zip(names, measured)},
      "point_status": {n: m["status"] for n, m in zip(names, measured)},
  }


# --- The report ---

def format_table(rows: list[dict]) -> str:
  """A markdown table of result lines, one row per mode, after a line naming what was run."""
  if not rows:
    return "(no modes measured)"
  head = rows[0]
  load = lambda r: "/".join(f"{x:.1f}" for x in r["load_before"][:1] + r["load_after"][:1])
  fixed = {k: v for k, v in head["overrides"].items() if k not in _ALWAYS_FIXED}
  lines = [f"{head['sweep']}: {head['points']} points, {head['num_steps']} steps at batch "
           f"{head['batch_size']}, on {head['device']} (jax {head['jax']})"
           + (f"; fixed {json.dumps(fixed)}" if fixed else ""),
           "",
           "| mode | status | wall s | compilations (s) | train compile_s sum / max | "
           "train img/s | wall img/s | point img/s (median) | test error % per point | "
           "load before/after |",
           "|---|---|---:|---:|---:|---:|---:|---:|---|---|"]
  for r in rows:
    per_point = list(r["point_img_per_s"].values())
    errors = " ".join(f"{100 * e:.1f}" if e is not None and math.isfinite(e) else "-"
                      for e in r["test_error"].values())
    compile_max = "-" if r["compile_s_max"] is None else f"{r['compile_s_max']:.1f}"
    lines.append(
        f"| {r['mode']} | {r['status']} ({r['finished']}/{r['points']}) | {r['wall_s']:.1f} | "
        f"{r['compilations']} ({r['xla_compile_s']:.1f}) | {r['compile_s_sum']:.1f} / "
        f"{compile_max} | "
        f"{_number(r['train_img_per_s'])} | {_number(r['wall_img_per_s'])} | "
        f"{_number(statistics.median(per_point) if per_point else None)} | {errors} | "
        f"{load(r)} |")
  return "\n".join(lines)


def _number(x: float | None) -> str:
  return "-" if x is None else f"{x:,.0f}"


def _device() -> dict:
  """The device the subprocesses train on, from a subprocess (this one never starts JAX, which
  would take 75% of a GPU's memory), and on a CPU its model."""
  found = subprocess.run([sys.executable, "-c", _DEVICE_PROBE], cwd=REPO, env=_environment(None),
                         capture_output=True, text=True, check=True)
  device = json.loads(found.stdout.strip().splitlines()[-1])
  if device["platform"] == "cpu":
    with open("/proc/cpuinfo") as f:
      models = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    device["device"] = f"{models[0] if models else platform.processor()} x {os.cpu_count()}"
  return device


def main(argv: list[str] | None = None) -> list[dict]:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--sweep", default="configs/sweeps/lr_fashion_mnist.py")
  p.add_argument("--modes", default="separate,off,processes:2,population:4",
                 help="Comma list: separate, off, processes:N, population:N, auto.")
  p.add_argument("--num_steps", type=int, default=None, help="Every point's; default the sweep's.")
  p.add_argument("--log_every", type=int, default=None)
  p.add_argument("--fixed", type=json.loads, default=None,
                 help='More fields for every point, JSON shaped like the run config: '
                 '\'{"dataset": {"eval_split": "test[:1000]"}}\'.')
  p.add_argument("--mode_timeout", type=float, default=1800, help="Seconds one mode may take.")
  p.add_argument("--max_seconds", type=float, default=3600,
                 help="The bench ends within this many seconds: the mode running then is cut "
                 "short, the rest are skipped.")
  p.add_argument("--compiled_above_s", type=float, default=1.0,
                 help="Compilations shorter than this are not counted.")
  p.add_argument("--work_dir", default=None, help="Default: a new temporary directory.")
  p.add_argument("--keep", action="store_true", help="Keep the modes' directories.")
  p.add_argument("--json_out", default=None, help="Appends one JSON line per mode.")
  p.add_argument("--table", default=None, help="Print the table of this JSON lines file; run "
                 "nothing.")
  args = p.parse_args(argv)
  if args.table:
    with open(args.table) as f:
      rows = [json.loads(line) for line in f if line.strip()]
    print(format_table(rows))
    return rows

  end = time.time() + args.max_seconds - STOP_GRACE_S  # A mode cut short stops within it.
  # SIGTERM (`timeout`, a lease ending) stops the mode in flight and reports what was measured.
  signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
  sweep_config = bench_sweep(points.load_get_config(args.sweep)(), num_steps=args.num_steps,
                             log_every=args.log_every, fixed=args.fixed)
  sweep = points.expand(sweep_config)  # Bad overrides stop here, before anything runs.
  names = [point.name for point in sweep]
  if args.work_dir:
    os.makedirs(args.work_dir, exist_ok=True)
  root = tempfile.mkdtemp(prefix="pack_bench_", dir=args.work_dir)
  sweep_file = os.path.join(root, "sweep.py")
  write_sweep_file(sweep_config, sweep_file, args.sweep)
  device = _device()
  common = {"sweep": args.sweep, "points": len(sweep), "batch_size": sweep[0].config.batch_size,
            **device, "overrides": sweep_config.fixed.to_dict()}
  rows, first_configs = [], None
  try:
    for mode in args.modes.split(","):
      if time.time() > end - 1:
        print(f"{mode}: skipped, --max_seconds spent", flush=True)
        continue
      load_before = os.getloadavg()
      print(f"{mode}: running", flush=True)
      workdir, wall_s, status, code = run_mode(
          mode, sweep_config, sweep_file, root, min(time.time() + args.mode_timeout, end))
      measured = [read_point(point.run_dir(workdir)) for point in sweep]
      configs = [m.get("config") for m in measured]
      if first_configs is None and any(configs):
        first_configs = configs
      # A config's epochs are resolved into steps by its run (config.json), not by expand.
      num_steps = next((c["num_steps"] for c in configs if c), sweep[0].config.num_steps)
      row = {"mode": mode, "status": status, "exit_code": code, **common, "num_steps": num_steps,
             "load_before": [round(x, 2) for x in load_before],
             "load_after": [round(x, 2) for x in os.getloadavg()],
             **summarize_mode(names, measured, wall_s),
             **count_compilations(read_logs(workdir), args.compiled_above_s),
             "same_configs": all(a == b for a, b in zip(configs, first_configs) if a and b)}
      rows.append(row)
      if args.json_out:
        with open(args.json_out, "a") as f:
          f.write(json.dumps(row) + "\n")
      print(f"{mode}: {status}, {wall_s:.1f} s; output in {workdir}.log", flush=True)
      if status != "completed":
        with open(workdir + ".log") as f:
          print("".join(f.readlines()[-5:]), end="", flush=True)
  finally:
    if not args.keep:
      shutil.rmtree(root, ignore_errors=True)
    print(format_table(rows), flush=True)
  return rows


if __name__ == "__main__":
  main()
