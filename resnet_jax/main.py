"""Command line: `python -m resnet_jax.main --config=configs/cifar10.py:depth=56 --workdir=runs/x`.

Parses flags and calls `train.train_and_evaluate`; nothing else lives here. Any config field can
be overridden (`--config.optimizer.lr=0.05`); the config is locked, so unknown fields and wrong
types are rejected before any work starts. Bad input is one line `error: ...` and exit code 2;
a run stopped by SIGTERM or Ctrl-C checkpoints and exits with 75 (see resnet_jax/cli.py).

`--launch=slurm` submits the run to SLURM instead (resnet_jax/launch.py: the --slurm_* flags),
as one process per task; `--wait` waits for it and ends as a run here would.
"""

from __future__ import annotations

from resnet_jax import preemption

if __name__ == "__main__":
  preemption.exit_on_sigterm()  # First: a SIGTERM during what follows exits 75, lock released.

# pylint: disable=g-import-not-at-top,wrong-import-position
import sys

from absl import flags

from resnet_jax import cli, launch, parallel, reporting
# pylint: enable=g-import-not-at-top,wrong-import-position

# Only the running program defines its flags: a config file that imports this module would
# define them a second time, which absl refuses.
if __name__ == "__main__":
  _CONFIG = cli.define_config_file("config", "configs/fashion_mnist.py",
                                   "Config file, optionally with :args.")
  _WORKDIR = flags.DEFINE_string("workdir", None, "Where the run writes; resumes if it exists.",
                                 required=True)
  _COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                     "host:port of process 0, for multi-process runs.")
  _NUM_PROCESSES = flags.DEFINE_integer("num_processes", None,
                                        "Processes in a multi-process run.")
  _PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in such a run.")


def main(argv: list[str]) -> int:
  del argv  # cli.run refuses positional arguments.
  if launch.requested():
    if _COORDINATOR.present or _NUM_PROCESSES.present or _PROCESS_ID.present:
      cli.fail("--coordinator_address, --num_processes and --process_id are for processes "
               "started by hand; under --launch=slurm each task finds its peers from SLURM's "
               "environment (--slurm_nodes, --slurm_tasks_per_node)")
    options = launch.options_from_flags()
    job = launch.submit_run(cli.load_config(_CONFIG), _WORKDIR.value, options)
    if not launch.wait_requested():
      return cli.EXIT_OK
    summary = launch.wait_run(_WORKDIR.value, job)
  else:
    launch.check_local()
    config = cli.load_config(_CONFIG)
    parallel.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    from resnet_jax import train  # After distributed set-up: it must precede any JAX computation.
    summary = train.train_and_evaluate(config, _WORKDIR.value)
  if summary.status == reporting.PREEMPTED:
    print(f"run preempted: {summary.message}", file=sys.stderr)
    return cli.EXIT_PREEMPTED
  if summary.status != reporting.COMPLETED:
    print(f"run {summary.status}: {summary.message}", file=sys.stderr)
    return cli.EXIT_FAILED
  print(f"test accuracy {100 * (1 - summary.test_error):.2f}% "
        f"(best {100 * (1 - summary.best_test_error):.2f}%) after {summary.step} steps, "
        f"{summary.wall_time_s:.0f} s; workdir {_WORKDIR.value}")
  return cli.EXIT_OK


if __name__ == "__main__":
  cli.run(main)
