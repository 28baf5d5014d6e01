"""Multi-host training, proven on one machine: 2 processes x 2 CPU devices == 1 process x 4."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from resnet_jax import checkpoints, reporting

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start(workdir: str, data_dir: str, devices: int, *extra: str,
           num_steps: int = 2) -> subprocess.Popen:
  # The session's other XLA flags (an ISA limit, say) stand; only the device count changes.
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=" ".join([*flags, f"--xla_force_host_platform_device_count={devices}"]))
  args = [sys.executable, "-m", "resnet_jax.main", "--config=configs/fashion_mnist.py",
          f"--workdir={workdir}", f"--config.dataset.data_dir={data_dir}",
          "--config.dataset.eval_split=test[:64]", "--config.batch_size=16",
          "--config.eval_batch_size=32", f"--config.num_steps={num_steps}",
          "--config.log_every=1", "--config.checkpoint_every=1",
          "--config.optimizer.warmup_steps=0", "--config.optimizer.schedule=constant",
          # A gentle rate: the order in which the processes sum decides the sign of the odd
          # ReLU input within ~1e-6 of 0, where the gradient jumps, and a large step amplifies
          # that (tests/test_train.py measures it: <= 2.5% of an update at this rate).
          "--config.optimizer.lr=0.001",
          "--config.progress_bar=false", *extra]
  return subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def _finish(process: subprocess.Popen, code: int = 0) -> str:
  output, _ = process.communicate(timeout=600)
  assert process.returncode == code, output[-3000:]
  return output


def _params(workdir: str, step: int):
  return checkpoints.read_state(os.path.join(workdir, "checkpoints"), step)[1]["params"]


def _max_abs_difference(a, b) -> float:
  return max(float(np.max(np.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.numerics
def test_two_processes_train_like_one_process_with_the_same_devices(prepared_data_dir, tmp_path):
  single, multi = str(tmp_path / "single"), str(tmp_path / "multi")
  port = _free_port()
  workers = [_start(multi, prepared_data_dir, 2, f"--coordinator_address=127.0.0.1:{port}",
                    "--num_processes=2", f"--process_id={i}") for i in range(2)]
  outputs = [_finish(p) for p in workers]
  _finish(_start(single, prepared_data_dir, 4))

  assert "test accuracy" in outputs[0]
  # Process 0 alone writes the logs: two train events, then the final eval.
  multi_events = reporting.read_metrics(multi)
  assert [e["event"] for e in multi_events] == ["train", "train", "eval"]
  single_events = reporting.read_metrics(single)
  for a, b in zip(single_events, multi_events):
    assert a["loss" if a["event"] == "train" else "test_loss"] == pytest.approx(
        b["loss" if b["event"] == "train" else "test_loss"], rel=1e-3)
  # Same batches, same global-batch BN, same all-reduced gradients: equal up to the order in
  # which gloo and in-process XLA sum, which can flip a ReLU at ~1e-6 and move a gradient by far
  # more than rounding. So the yardstick is one SGD update: the two runs must differ by far less
  # than the last step moved the parameters (BatchNorm per process would differ by ~2 updates).
  update = _max_abs_difference(_params(single, 1), _params(single, 2))
  assert _max_abs_difference(_params(single, 2), _params(multi, 2)) < 0.1 * update


def test_sigterm_to_one_process_stops_every_process_at_the_same_checkpointed_step(
    prepared_data_dir, tmp_path):
  # A cluster may take one host first: JAX's preemption service tells the others, and all
  # stop after the same step, since a checkpoint is written by all of them together.
  workdir = str(tmp_path / "multi")
  port = _free_port()
  workers = [_start(workdir, prepared_data_dir, 2, f"--coordinator_address=127.0.0.1:{port}",
                    "--num_processes=2", f"--process_id={i}", num_steps=400) for i in range(2)]
  deadline = time.time() + 300
  while not [e for e in reporting.read_metrics(workdir) if e["step"] >= 2]:
    assert time.time() < deadline and workers[0].poll() is None
    time.sleep(0.05)
  workers[1].send_signal(signal.SIGTERM)
  outputs = [_finish(p, code=75) for p in workers]

  summary = json.load(open(os.path.join(workdir, "summary.json")))
  step = summary["step"]
  assert summary["status"] == "preempted" and 2 <= step < 400
  for output in outputs:
    assert f"run preempted: stopped by SIGTERM after step {step}, checkpointed" in output
  assert checkpoints.steps(os.path.join(workdir, "checkpoints"))[0] == step
