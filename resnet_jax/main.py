"""Command line: `python -m resnet_jax.main --config=configs/cifar10.py:depth=56 --workdir=runs/x`.

Parses flags and calls `train.train_and_evaluate`; nothing else lives here. Any config field can
be overridden (`--config.optimizer.lr=0.05`); the config is locked, so unknown fields and wrong
types are rejected before any work starts.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from resnet_jax import parallel

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/fashion_mnist.py", "Config file, optionally with :args.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where the run writes; resumes if it exists.",
                               required=True)
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0, for multi-process runs.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in a multi-process run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in such a run.")


def main(argv: list[str]) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  parallel.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  from resnet_jax import train  # After distributed set-up: it must precede any JAX computation.
  summary = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  if summary["status"] != "completed":
    print(f"run {summary['status']}: {summary['message']}", file=sys.stderr)
    return 1
  print(f"test accuracy {100 * (1 - summary['test_error']):.2f}% "
        f"(best {100 * (1 - summary['best_test_error']):.2f}%) after {summary['step']} steps, "
        f"{summary['wall_time_s']:.0f} s; workdir {_WORKDIR.value}")
  return 0


if __name__ == "__main__":
  # Orbax and TFDS log every step of their work at INFO; --verbosity=0 brings that back.
  flags.FLAGS.set_default("verbosity", logging.WARNING)
  app.run(main)
