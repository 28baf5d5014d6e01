"""Where a train step's time goes: a jax.profiler trace of a few steps of the benchmark's setup
(experiments/bench.py: the project's compiled step on one synthetic batch held on the device),
read back from its Perfetto JSON. Per step: the wall time, the time the device spends in ops
(the union of their intervals on the device's lanes), the idle gaps between them, the number
of ops, and the ops that take longest.

  python experiments/profile_step.py --model=resnet20 --batch_size=128 --dtype=bfloat16 \
      --steps_per_call=0 --steps=40 --trace_dir=/tmp/trace --json_out=/tmp/profile.jsonl

The lanes: on a GPU the CUDA stream lines of the `/device:GPU:N` process ("Stream
#118(MemcpyD2H,Compute,...)", one event per kernel or copy; a GPU trace has no "XLA Ops" line),
on a TPU its "XLA Ops" line; on a CPU, which has no device process, the host threads' events
that carry an `hlo_op` (XLA's thunk executor, several threads at once, so summed op time can
exceed the busy time). The trace file stays in --trace_dir for https://ui.perfetto.dev.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

# Run as a script, the repository root is not on sys.path.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import bench  # noqa: E402

DEVICE_PROCESS_PREFIX = "/device:"
STREAM_LANE_PREFIX = "Stream"  # GPU: one line per CUDA stream.
OP_LANE = "XLA Ops"  # TPU (and derived GPU lines, when a trace has them): one event per HLO op.


def load_trace(trace_dir: str) -> dict:
  """The newest perfetto_trace.json.gz under `trace_dir`, as {"traceEvents": [...], ...}."""
  paths = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)
  if not paths:
    raise FileNotFoundError(f"no perfetto_trace.json.gz under {trace_dir}")
  with gzip.open(max(paths, key=os.path.getmtime), "rt") as f:
    return json.load(f)


def op_events(events: list[dict]) -> tuple[list[dict], list[str]]:
  """The device's op events of a Chrome-format trace and the names of the lanes they are on.

  Complete events ("ph": "X", microseconds) on the stream lines of the device processes; where
  a device process has none, on its "XLA Ops" line; where there is no device process (CPU),
  every event carrying an `hlo_op` argument.
  """
  processes, threads = {}, {}
  for e in events:
    if e.get("ph") == "M" and e.get("name") == "process_name":
      processes[e["pid"]] = e["args"]["name"]
    elif e.get("ph") == "M" and e.get("name") == "thread_name":
      threads[(e["pid"], e.get("tid"))] = e["args"]["name"]
  complete = [e for e in events if e.get("ph") == "X" and "dur" in e]
  devices = {pid for pid, name in processes.items() if name.startswith(DEVICE_PROCESS_PREFIX)}
  lanes = set()
  for pid in devices:
    own = {key: name for key, name in threads.items() if key[0] == pid}
    streams = {key for key, name in own.items() if name.startswith(STREAM_LANE_PREFIX)}
    lanes |= streams or {key for key, name in own.items() if name == OP_LANE}
  if lanes:
    ops = [e for e in complete if (e["pid"], e.get("tid")) in lanes]
  else:
    ops = [e for e in complete if "hlo_op" in e.get("args", {})]
    lanes = {(e["pid"], e.get("tid")) for e in ops}
  names = sorted(f"{processes.get(pid, pid)} / {threads.get((pid, tid), tid)}"
                 for pid, tid in lanes)
  return ops, names


def busy_us(ops: list[dict]) -> float:
  """Microseconds during which at least one op runs: the length of the union of their
  intervals."""
  total, end = 0.0, float("-inf")
  for start, stop in sorted((e["ts"], e["ts"] + e["dur"]) for e in ops):
    if stop > end:
      total += stop - max(start, end)
      end = stop
  return total


def trace_summary(trace: dict, *, steps: int, wall_s: float, top: int = 10) -> dict:
  """Where the traced `steps` steps' `wall_s` seconds went, per step, in milliseconds.

  wall: the host's clock over the traced steps; span: first op start to last op end on the
  device's lanes; busy: the union of the op intervals; idle: span - busy, the gaps between ops
  (launch latency, host work, waits); op_sum: the ops' durations added up. top_ops: the `top`
  op names (the HLO op where the event names one, else the kernel) by time, each with its
  milliseconds and count per step and its share of op_sum; top_kinds: the same by kind.
  """
  ops, lanes = op_events(trace["traceEvents"])
  if not ops:
    raise ValueError("the trace holds no device op events: was anything run while tracing?")
  span = max(e["ts"] + e["dur"] for e in ops) - min(e["ts"] for e in ops)
  busy, op_sum = busy_us(ops), sum(e["dur"] for e in ops)
  per_step = lambda us: us / 1000 / steps

  def ranked(name_of) -> list[dict]:
    totals = collections.defaultdict(lambda: [0.0, 0])
    for e in ops:
      entry = totals[name_of(e)]
      entry[0] += e["dur"]
      entry[1] += 1
    return [{"name": name, "ms_per_step": per_step(us), "count_per_step": n / steps,
             "share_of_op_time": us / op_sum}
            for name, (us, n) in sorted(totals.items(), key=lambda item: -item[1][0])[:top]]

  op_name = lambda e: e.get("args", {}).get("hlo_op", e["name"])
  return {
      "steps": steps, "lanes": lanes, "wall_ms_per_step": 1000 * wall_s / steps,
      "span_ms_per_step": per_step(span), "busy_ms_per_step": per_step(busy),
      "idle_ms_per_step": per_step(span - busy), "op_sum_ms_per_step": per_step(op_sum),
      "busy_fraction_of_wall": busy / 1e6 / wall_s, "ops_per_step": len(ops) / steps,
      "top_ops": ranked(op_name),
      # An op's kind: its name without the number XLA appends (fusion.37 -> fusion).
      "top_kinds": ranked(lambda e: re.sub(r"[._]\d+$", "", op_name(e)))}


def profile(spec: bench.BenchSpec, trace_dir: str, top: int = 10) -> dict:
  """Compiles `spec`'s step, times it untraced (bench.median_seconds_per_step), then traces
  spec.steps more steps into `trace_dir` and summarises the trace (`trace_summary`), with the
  device, the spec and the untraced milliseconds per step."""
  import jax

  bench_trainer, state, totals = bench.jax_trainer(spec)
  state, totals, compile_s = bench.compile_jax_steps(bench_trainer, state, totals)

  def run_steps(n: int) -> None:
    nonlocal state, totals
    state, totals = bench.run_jax_steps(bench_trainer, state, totals, n)

  untraced_s = bench.median_seconds_per_step(run_steps, spec)
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    start = time.perf_counter()
    run_steps(spec.steps)
    wall_s = time.perf_counter() - start
  summary = trace_summary(load_trace(trace_dir), steps=spec.steps, wall_s=wall_s, top=top)
  return {"device": f"{jax.device_count()}x {jax.local_devices()[0].device_kind}",
          "framework_version": jax.__version__, **dataclasses.asdict(spec),
          "steps_per_call": bench_trainer.steps_per_call,
          "xla_flags": os.environ.get("XLA_FLAGS", ""), "compile_s": compile_s,
          "untraced_ms_per_step": 1000 * untraced_s, **summary, "trace_dir": trace_dir}


def format_summary(result: dict) -> str:
  lines = [f"{result['device']}: {result['model']} batch {result['batch_size']} "
           f"{result['dtype']}, {result['steps_per_call']} steps per call, "
           f"{result['steps']} steps traced",
           f"  per step: wall {result['wall_ms_per_step']:.3f} ms (untraced "
           f"{result['untraced_ms_per_step']:.3f}), device span "
           f"{result['span_ms_per_step']:.3f}, busy {result['busy_ms_per_step']:.3f} "
           f"({100 * result['busy_fraction_of_wall']:.0f}% of wall), idle between ops "
           f"{result['idle_ms_per_step']:.3f}, {result['ops_per_step']:.0f} ops",
           "  top ops (ms per step, count per step, share of op time):"]
  row = lambda op: (f"    {op['ms_per_step']:8.3f}  {op['count_per_step']:6.1f}  "
                    f"{100 * op['share_of_op_time']:5.1f}%  {op['name']}")
  lines += [row(op) for op in result["top_ops"]]
  lines.append("  top kinds of op:")
  lines += [row(op) for op in result["top_kinds"]]
  return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--model", default="resnet20")
  p.add_argument("--batch_size", type=int, default=128)
  p.add_argument("--dtype", default="float32")
  p.add_argument("--image_size", type=int, default=32)
  p.add_argument("--channels", type=int, default=3)
  p.add_argument("--num_classes", type=int, default=10)
  p.add_argument("--model_args", default="", help="more config.model fields, key=value,...")
  p.add_argument("--steps_per_call", type=int, default=0, help="0 = the platform's")
  p.add_argument("--steps", type=int, default=40, help="steps traced (and per untraced timing)")
  p.add_argument("--warmup", type=int, default=20, help="untimed steps after compilation")
  p.add_argument("--repeats", type=int, default=3, help="untraced timings")
  p.add_argument("--top", type=int, default=10, help="ops listed")
  p.add_argument("--trace_dir", default="", help="default: a new temporary directory")
  p.add_argument("--json_out", default="", help="append the summary as one JSON line")
  return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
  args = parse_args(argv)
  spec = bench.BenchSpec(
      model=args.model, batch_size=args.batch_size, dtype=args.dtype,
      image_shape=(args.image_size, args.image_size, args.channels),
      num_classes=args.num_classes, model_args=bench.parse_model_args(args.model_args),
      steps_per_call=args.steps_per_call, steps=args.steps, warmup=args.warmup,
      repeats=args.repeats)
  bench.validate_spec(spec)
  result = profile(spec, args.trace_dir or tempfile.mkdtemp(prefix="profile_step_"), args.top)
  print(format_summary(result))
  if args.json_out:
    with open(args.json_out, "a") as f:
      f.write(json.dumps(result) + "\n")
  print(bench.RESULT_PREFIX + json.dumps(result), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
