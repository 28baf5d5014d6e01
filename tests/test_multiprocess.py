"""Multi-host training, proven on one machine: 2 processes x 2 CPU devices == 1 process x 4."""

from __future__ import annotations

import json
import os
import signal
import socket
import time

import pytest

from tests import multihost

from resnet_jax import checkpoints, reporting


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.numerics
def test_two_processes_train_like_one_process_with_the_same_devices(prepared_data_dir, tmp_path):
  single, multi = str(tmp_path / "single"), str(tmp_path / "multi")
  port = _free_port()
  workers = [multihost.start(multi, prepared_data_dir, 2,
                             f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                             f"--process_id={i}") for i in range(2)]
  outputs = [multihost.finish(p) for p in workers]
  multihost.finish(multihost.start(single, prepared_data_dir, 4))

  assert "test accuracy" in outputs[0]
  multihost.assert_trains_like_one_process(single, multi)


@pytest.mark.slow
def test_sigterm_to_one_process_stops_every_process_at_the_same_checkpointed_step(
    prepared_data_dir, tmp_path):
  # A cluster may take one host first: JAX's preemption service tells the others, and all
  # stop after the same step, since a checkpoint is written by all of them together.
  workdir = str(tmp_path / "multi")
  port = _free_port()
  workers = [multihost.start(workdir, prepared_data_dir, 2,
                             f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                             f"--process_id={i}", num_steps=400) for i in range(2)]
  deadline = time.time() + 300
  while not [e for e in reporting.read_metrics(workdir) if e["step"] >= 2]:
    assert time.time() < deadline and workers[0].poll() is None
    time.sleep(0.05)
  workers[1].send_signal(signal.SIGTERM)
  outputs = [multihost.finish(p, code=75) for p in workers]

  summary = json.load(open(os.path.join(workdir, "summary.json")))
  step = summary["step"]
  assert summary["status"] == "preempted" and 2 <= step < 400
  for output in outputs:
    assert f"run preempted: stopped by SIGTERM after step {step}, checkpointed" in output
  assert checkpoints.steps(os.path.join(workdir, "checkpoints"))[0] == step
