"""A sweep's results: one row per point from the points' summaries, as results.csv and as text.

Reads only the sweep's workdir, so a finished (or running) sweep can be reported any time.
"""

from __future__ import annotations

import csv
import io
import math
import os
from typing import TYPE_CHECKING

from resnet_jax import points, reporting

if TYPE_CHECKING:
  from resnet_jax import plots

RESULTS_FILE = "results.csv"
# The summary fields a row shows, in results.csv's column order (errors are fractions).
COLUMNS = ("status", "train_error", "test_error", "best_test_error", "step", "wall_time_s",
           "num_params", "message")
# A row's status where its point has no summary yet, besides reporting's statuses of a run.
STARTED = "started"  # It has a workdir: running, or interrupted before it wrote its summary.
PENDING = "pending"  # Not started.


def results_table(sweep: list[points.Point], workdir: str) -> list[dict]:
  """One row per point: name, every swept field (None where a point lacks it), then COLUMNS.

  Status is the run's (COMPLETED, DIVERGED, PREEMPTED, FAILED), or STARTED or PENDING, with the
  other columns None.
  """
  fields = list(dict.fromkeys(k for p in sweep for k in p.fields))
  rows = []
  for point in sweep:
    summary = point.summary(workdir)
    if summary is None:
      started = os.path.isdir(point.run_dir(workdir))
      shown = {c: None for c in COLUMNS} | {"status": STARTED if started else PENDING}
    else:
      shown = {c: getattr(summary, c) for c in COLUMNS}
    rows.append({"name": point.name, **{f: point.fields.get(f) for f in fields}, **shown})
  return rows


def write_results(sweep: list[points.Point], workdir: str) -> list[dict]:
  """Writes workdir/results.csv from the points' summaries; returns its rows."""
  rows = results_table(sweep, workdir)
  out = io.StringIO()
  writer = csv.DictWriter(out, fieldnames=list(rows[0]), lineterminator="\n")
  writer.writeheader()
  writer.writerows({k: points.format_value(v) if isinstance(v, bool) else v
                    for k, v in row.items()} for row in rows)
  reporting.write_text_atomic(os.path.join(workdir, RESULTS_FILE), out.getvalue())
  return rows


def format_table(rows: list[dict]) -> str:
  """The results as aligned text: errors in %, then the message of every point not completed."""
  fields = [k for k in rows[0] if k not in COLUMNS]
  header = [*fields, "status", "train err %", "test err %", "best test %", "steps", "time",
            "params"]
  body = [[*(points.format_value(r[f]) if r[f] is not None else "" for f in fields),
           r["status"], _percent(r["train_error"]), _percent(r["test_error"]),
           _percent(r["best_test_error"]), _number(r["step"], "{:d}"),
           _number(r["wall_time_s"], "{:.0f}s"), _number(r["num_params"], "{:,}")]
          for r in rows]
  widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
  lines = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip()
           for line in [header, *body]]
  lines += [f"{r['name']}: {r['status']}: {r['message']}" for r in rows
            if r["status"] in (reporting.DIVERGED, reporting.FAILED)]
  return "\n".join(lines)


def load_runs(sweep: list[points.Point], workdir: str) -> list[plots.Run]:
  """The points' runs as the plots take them: fields, summary and metrics events."""
  # Imported here: matplotlib is a third of a second of every command's start (`main` imports
  # this module), and only the figures need it.
  from resnet_jax import plots  # pylint: disable=g-import-not-at-top
  return [plots.Run(p.fields, p.summary(workdir), reporting.read_metrics(p.run_dir(workdir)))
          for p in sweep]


def _percent(value) -> str:
  return f"{100 * value:.2f}" if isinstance(value, (int, float)) and math.isfinite(value) else "-"


def _number(value, fmt: str) -> str:
  return fmt.format(value) if isinstance(value, (int, float)) and value == value else "-"
