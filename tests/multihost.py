"""What the multi-process tests share: a tiny run of resnet_jax.main on N CPU devices per
process, and the yardstick by which several processes train like one with the same devices.

Used by tests/test_multiprocess.py (processes given a coordinator) and tests/test_slurm.py
(processes started by srun, finding each other from SLURM's environment).
"""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from resnet_jax import checkpoints, reporting
from conftest import xla_flags  # pylint: disable=g-bad-import-order
from tests.test_train import TINY_MODEL

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def start(workdir: str, data_dir: str, devices: int, *extra: str,
          num_steps: int = 2) -> subprocess.Popen:
  """`python -m resnet_jax.main` on a tiny config, each process with `devices` CPU devices."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(devices))
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
          "--config.progress_bar=false",
          *(f"--config.{field}={value}" for field, value in TINY_MODEL.items()), *extra]
  return subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def finish(process: subprocess.Popen, code: int = 0) -> str:
  output, _ = process.communicate(timeout=600)
  assert process.returncode == code, output[-3000:]
  return output


def params(workdir: str, step: int):
  return checkpoints.read_state(os.path.join(workdir, "checkpoints"), step)[1]["params"]


def max_abs_difference(a, b) -> float:
  return max(float(np.max(np.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def assert_trains_like_one_process(single: str, multi: str) -> None:
  """The 2-step run in `multi` (several processes) trained as the one in `single` did."""
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
  update = max_abs_difference(params(single, 1), params(single, 2))
  assert max_abs_difference(params(single, 2), params(multi, 2)) < 0.1 * update
