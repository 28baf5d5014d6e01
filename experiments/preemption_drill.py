"""Preemption drill: SIGTERM a real run mid-training and check that nothing is lost.

  python experiments/preemption_drill.py --config=configs/fashion_mnist_gpu.py --num_steps=600 \
      --signal_after=200 --json_out=/tmp/drill.jsonl [-- --config.<field>=value ...]

Runs `python -m resnet_jax.main` three times in one fresh directory, with the same config:
straight through; interrupted by SIGTERM once its metrics show step `--signal_after`; and again
in the interrupted workdir, which resumes it. It reports the interrupted run's exit code (75
expected), the step it stopped at and whether that step was checkpointed; the seconds from the
signal to its summary.json (the step in flight, its checkpoint, the summary) and to the
process's exit (also the teardown), which a preemption grace period must cover; and whether
the resumed run's final state equals the straight run's bitwise, as it must on one machine.
Arguments after `--` go to every run. The runs share a persistent compilation cache.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np

# Run as a script, the repository root is not on sys.path.
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from resnet_jax import checkpoints, cli, reporting  # noqa: E402


def _command(args: argparse.Namespace, workdir: str) -> list[str]:
  return [sys.executable, "-m", "resnet_jax.main", f"--config={args.config}",
          f"--workdir={workdir}", f"--config.num_steps={args.num_steps}",
          f"--config.log_every={args.log_every}", "--config.eval_every=0",
          "--config.progress_bar=false", *args.extra]


def _run(command: list[str], log_path: str) -> tuple[int, float]:
  start = time.time()
  with open(log_path, "w") as log:
    code = subprocess.run(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                          check=False).returncode
  return code, time.time() - start


def _interrupt(command: list[str], workdir: str, log_path: str, signal_after: int,
               timeout: float) -> tuple[int, float, float]:
  """Starts the run and sends SIGTERM once step `signal_after` is logged.

  Returns the exit code and the seconds from the signal to summary.json (the step in flight,
  its checkpoint, the summary) and to the process's exit (also its teardown).
  """
  with open(log_path, "w") as log:
    process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + timeout
    while _last_logged_step(workdir) < signal_after:
      if process.poll() is not None or time.time() > deadline:
        process.kill()
        raise RuntimeError(f"the run ended or stalled before step {signal_after}; see {log_path}")
      time.sleep(0.01)
    summary = os.path.join(workdir, reporting.SUMMARY_FILE)
    sent = time.time()
    process.send_signal(signal.SIGTERM)
    while not os.path.exists(summary) and process.poll() is None:
      time.sleep(0.005)
    summarised = time.time()
    code = process.wait(timeout=timeout)
  return code, summarised - sent, time.time() - sent


def _last_logged_step(workdir: str) -> int:
  """The step of the last whole line of metrics.jsonl (the run may be writing the next)."""
  try:
    with open(os.path.join(workdir, reporting.METRICS_FILE)) as f:
      lines = [line for line in f if line.endswith("\n")]
  except FileNotFoundError:
    return -1
  return json.loads(lines[-1])["step"] if lines else -1


def main(argv: list[str] | None = None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--config", default="configs/fashion_mnist_gpu.py")
  p.add_argument("--num_steps", type=int, default=600)
  p.add_argument("--signal_after", type=int, default=200)
  p.add_argument("--log_every", type=int, default=50)
  p.add_argument("--timeout", type=float, default=300, help="Seconds a run may take.")
  p.add_argument("--json_out", default=None, help="Appends the result as a JSON line.")
  p.add_argument("extra", nargs="*", help="After --: flags for every run.")
  args = p.parse_args(argv)

  root = tempfile.mkdtemp(prefix="preemption_drill_")
  os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(root, "xla_cache"))
  straight, drilled = os.path.join(root, "straight"), os.path.join(root, "drill")
  code, straight_s = _run(_command(args, straight), straight + ".log")
  if code:
    raise RuntimeError(f"the straight run failed ({code}); see {straight}.log")
  stop_code, to_summary, to_exit = _interrupt(_command(args, drilled), drilled, drilled + ".log",
                                  args.signal_after, args.timeout)
  summary = reporting.Summary.read(drilled)
  stopped_at = summary.step
  newest = checkpoints.steps(os.path.join(drilled, "checkpoints"))[:1]
  leftovers = glob.glob(os.path.join(drilled, "checkpoints", "*orbax-checkpoint-tmp*"))
  resume_code, resume_s = _run(_command(args, drilled), drilled + ".resume.log")

  (_, a), (_, b) = (checkpoints.read_state(os.path.join(w, "checkpoints"))
                    for w in (straight, drilled))
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  differing = sum(not np.array_equal(x, y) for x, y in zip(leaves_a, leaves_b))
  max_diff = max(float(np.max(np.abs(x.astype(np.float64) - y), initial=0.0))
                 for x, y in zip(leaves_a, leaves_b))
  result = {
      "device": _device_name(), "config": args.config, "num_steps": args.num_steps,
      "signal_after": args.signal_after, "exit_code": stop_code,
      "exit_code_ok": stop_code == cli.EXIT_PREEMPTED, "status": summary.status,
      "stopped_at": stopped_at, "checkpointed": newest == [stopped_at],
      "tmp_dirs_left": len(leftovers), "signal_to_summary_s": round(to_summary, 2),
      "signal_to_exit_s": round(to_exit, 2),
      "straight_s": round(straight_s, 1), "resume_s": round(resume_s, 1),
      "resume_exit_code": resume_code, "arrays": len(leaves_a),
      "arrays_differing": differing, "max_abs_difference": max_diff,
      "bitwise_equal": differing == 0}
  print(json.dumps(result))
  if args.json_out:
    with open(args.json_out, "a") as f:
      f.write(json.dumps(result) + "\n")
  return result


def _device_name() -> str:
  devices = jax.devices()  # Only now: the three runs had the devices to themselves.
  return f"{len(devices)}x {devices[0].device_kind}"


if __name__ == "__main__":
  main()
