"""Command line for sweeps: many ordinary runs that differ in a few config fields.

A sweep is a config file in configs/sweeps/ naming a base run config, fields fixed for every
point, and the points, built with `points.axis`, `product`, `zipped` and `chain` (the language
is in resnet_jax/points.py). Each point runs as an ordinary run in `workdir/<name>`, named after
its fields in order: `depth=56,skip=false,lr=0.1`. The README's "Sweeps" section is the guide.

  python -m resnet_jax.sweep --config=configs/sweeps/<name>.py --workdir=runs/<name>
      [--pack=off|processes:N|population:N|auto] [--devices=0,1,...]
    Runs every unfinished point (finished: completed or diverged), resuming interrupted ones,
    then writes results.csv and prints the table. --pack says how points share the machine
    (resnet_jax/runner.py); every mode shares the compilation cache in the sweep's workdir.
    --devices gives the k-th worker process GPU k % len(devices) (CUDA_VISIBLE_DEVICES).
    SIGTERM or Ctrl-C stops the points in flight, each checkpointed and "preempted", starts no
    new one, writes the table and exits 75; the same command resumes. A worker whose parent
    dies gets SIGTERM from the kernel (Linux). A whole sweep locks its workdir (lock.py).
  ... --list             Prints "index name", one line per point; runs nothing.
  ... --point_index=i    Runs point i only (a worker process; exit code 75 if it was preempted).
  ... --report           Re-reads the points' summaries, rewrites results.csv, prints the table;
                         for a sweep over `seed`, then the mean ± std over each group of points
                         that differ only in their seed, beside the paper's Table 6 on CIFAR-10.
  ... --plot             As --report, and writes the figures (resnet_jax/plots.py).
  ... --launch=slurm [--slurm_time=4:00:00 ...] [--wait]
                         Submits the unfinished points to SLURM as one job array (launch.py;
                         README, "Running on a cluster"); launching again while it is queued
                         or running submits nothing; --wait follows it and ends with the table.
`--config` may be left out once the workdir holds the sweep (sweep.json). From Python,
`runner.run_sweep(sweep_config, workdir)` does what the first command does and returns the
results table (results.py); `launch.submit_sweep` and `launch.wait_sweep` what --launch=slurm
--wait does.
"""

from __future__ import annotations

from resnet_jax import preemption

if __name__ == "__main__":
  preemption.exit_on_sigterm()  # First: a SIGTERM during what follows exits 75, lock released.

# pylint: disable=g-import-not-at-top,wrong-import-position
import os
import sys

from absl import flags

from resnet_jax import cli, launch, plots, points, reporting, results, runner
# pylint: enable=g-import-not-at-top,wrong-import-position

# The points language lived here before points.py; a sweep file written then still runs.
_MOVED_TO_POINTS = ("axis", "product", "zipped", "chain")
_told: set[str] = set()  # Each moved name is pointed out once.


def __getattr__(name: str):
  if name in _MOVED_TO_POINTS:
    if name not in _told:
      _told.add(name)
      reporting.warn(f"resnet_jax.sweep.{name} is resnet_jax.points.{name} now: "
                     f"`from resnet_jax import points` and call points.{name}")
    return getattr(points, name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# Only the running program defines its flags: a sweep file that imports this module (as those
# written for the earlier API do) would define them a second time, which absl refuses.
if __name__ == "__main__":
  _CONFIG = cli.define_config_file(
      "config", None, "The sweep file, configs/sweeps/<name>.py; may be left out once the "
      "workdir holds sweep.json.")
  _WORKDIR = flags.DEFINE_string("workdir", None, "The sweep's directory.", required=True)
  _LIST = flags.DEFINE_bool("list", False, "Print 'index name' per point and exit.")
  _POINT_INDEX = flags.DEFINE_integer("point_index", None, "Run only this point.")
  # The earlier spelling of --pack=processes:N, kept to say so.
  _PARALLEL = flags.DEFINE_integer("parallel", None, "Replaced by --pack=processes:N.")
  _DEVICES = flags.DEFINE_list("devices", [], "GPU ids handed to the worker processes of "
                               "--pack=processes:N in turn.")
  _REPORT = flags.DEFINE_bool("report", False, "Rewrite results.csv and print it; run nothing.")
  _PLOT = flags.DEFINE_bool("plot", False, "As --report, and write the figures.")
  _PACK = flags.DEFINE_string(
      "pack", "off", "How points share the machine: off, processes:N, population:N or auto.")
  _LOCK_TIMEOUT_S = flags.DEFINE_float(
      "lock_timeout_s", 0.0,
      "Seconds a point waits for its workdir while another process holds it.")


def main(argv: list[str]) -> int:
  del argv  # cli.run refuses positional arguments.
  workdir, point_index = _WORKDIR.value, _POINT_INDEX.value
  options = None
  if _PARALLEL.present:
    cli.fail(f"--parallel is now --pack: give --pack=processes:{_PARALLEL.value}")
  if launch.requested():
    local = [f"--{f.name}" for f in (_LIST, _POINT_INDEX, _DEVICES, _PACK, _REPORT, _PLOT)
             if f.present]
    if local:
      cli.fail(f"{', '.join(local)} cannot be combined with --launch=slurm: each array task "
               "runs one point; --list, --report and --plot read the workdir")
    options = launch.options_from_flags()
  else:
    launch.check_local()
  if point_index is not None:
    runner.stop_with_parent()
  sweep_config = (cli.load_config(_CONFIG) if _CONFIG.present else points.load_sweep(workdir))
  sweep = points.expand(sweep_config)
  if _LIST.value:
    for point in sweep:
      print(point.index, point.name)
    return cli.EXIT_OK
  if launch.requested():
    job = launch.submit_sweep(sweep_config, workdir, options)
    if not launch.wait_requested():
      return cli.EXIT_OK
    rows = launch.wait_sweep(sweep_config, workdir, job)
  elif _REPORT.value or _PLOT.value:
    rows = results.write_results(sweep, workdir)
  else:
    rows = runner.run_sweep(sweep_config, workdir, point_index=point_index,
                            devices=_DEVICES.value,
                            lock_timeout_s=_LOCK_TIMEOUT_S.value, pack=_PACK.value)
  if point_index is not None:  # A worker process: its point's outcome is the code.
    return (cli.EXIT_PREEMPTED if rows[point_index]["status"] == reporting.PREEMPTED
            else cli.EXIT_OK)
  print(results.format_table(rows))
  if results.SEED in rows[0]:  # Every swept field is a column.
    print("\n" + results.format_over_seeds(
        rows, paper=results.compares_with_paper(sweep[0].config)))
  print(f"results: {os.path.join(workdir, results.RESULTS_FILE)}")
  if _PLOT.value:
    for path in plots.write_sweep_figures(results.load_runs(sweep, workdir), workdir,
                                          dataset=sweep[0].config.dataset.name):
      print(f"wrote {path}")
  if any(row["status"] == reporting.PREEMPTED for row in rows):
    print("sweep preempted: run the same command again to resume it", file=sys.stderr)
    return cli.EXIT_PREEMPTED
  return cli.EXIT_OK


if __name__ == "__main__":
  cli.run(main)
