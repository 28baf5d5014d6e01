"""Multi-host training, proven on one machine: 2 processes x 2 CPU devices == 1 process x 4."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import jax
import numpy as np

from resnet_jax import checkpoints

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start(workdir: str, data_dir: str, devices: int, *extra: str) -> subprocess.Popen:
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_PLATFORMS="cpu")
  args = [sys.executable, "-m", "resnet_jax.main", "--config=configs/fashion_mnist.py",
          f"--workdir={workdir}", f"--config.dataset.data_dir={data_dir}",
          "--config.dataset.eval_split=test[:64]", "--config.batch_size=16",
          "--config.eval_batch_size=32", "--config.num_steps=3", "--config.log_every=1",
          "--config.checkpoint_every=0", "--config.optimizer.warmup_steps=0",
          "--config.progress_bar=false", *extra]
  return subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def _finish(process: subprocess.Popen) -> str:
  output, _ = process.communicate(timeout=600)
  assert process.returncode == 0, output[-3000:]
  return output


def _params(workdir: str):
  step, state = checkpoints.read_state(os.path.join(workdir, "checkpoints"))
  assert step == 3
  return state["params"]


def test_two_processes_train_like_one_process_with_the_same_devices(prepared_data_dir, tmp_path):
  single, multi = str(tmp_path / "single"), str(tmp_path / "multi")
  port = _free_port()
  workers = [_start(multi, prepared_data_dir, 2, f"--coordinator_address=127.0.0.1:{port}",
                    "--num_processes=2", f"--process_id={i}") for i in range(2)]
  outputs = [_finish(p) for p in workers]
  _finish(_start(single, prepared_data_dir, 4))

  assert "test accuracy" in outputs[0]
  # Process 0 alone writes the logs: three train events, then the final eval.
  with open(os.path.join(multi, "metrics.jsonl")) as f:
    assert [line.count('"event": "train"') for line in f] == [1, 1, 1, 0]
  # Same batches, same global-batch BN, same all-reduced gradients: equal up to float summation
  # order (gloo's all-reduce vs. in-process), which three SGD steps amplify to ~1e-5.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4),
               _params(single), _params(multi))
