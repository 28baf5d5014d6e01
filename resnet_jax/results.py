"""A sweep's results: one row per point from the points' summaries, as results.csv and as text;
and, for a sweep over seeds, the mean and spread over each group of points that differ only in
their seed, beside the paper's Table 6 for CIFAR-10.

Reads only the sweep's workdir, so a finished (or running) sweep can be reported any time.
"""

from __future__ import annotations

import csv
import io
import math
import os
import statistics
from collections.abc import Sequence
from typing import TYPE_CHECKING

import ml_collections

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
SEED = "seed"  # The field whose points over_seeds groups together.
NO_NUMBER = "—"  # Where the paper gives no number.

# He et al. 2016, "Deep Residual Learning for Image Recognition", Table 6: CIFAR-10 test error (%)
# of the ResNets (identity shortcuts, option A) trained on the 50k training images with the
# recipe of section 4.2. ResNet-110's is the best of 5 runs; PAPER_CIFAR10_MEAN_STD holds those
# runs' mean and std. Table 6 gives the plain nets no number: their errors are Figure 6's curves.
PAPER_CIFAR10_TEST_ERROR = {20: 8.75, 32: 7.51, 44: 7.17, 56: 6.97, 110: 6.43}
PAPER_CIFAR10_MEAN_STD = {110: (6.61, 0.16)}


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


def over_seeds(rows: list[dict]) -> list[dict]:
  """The rows (results_table's) of points that differ only in their seed, one dict per group in
  the order of its first point: every swept field but the seed, "seeds" (the group's points),
  "completed" (how many of them completed), and "train_error" and "test_error" as a list of the
  completed points' values (fractions), in sweep order.
  """
  groups: dict[tuple, dict] = {}
  for row in rows:
    fields = {k: v for k, v in row.items() if k not in (*COLUMNS, "name", SEED)}
    group = groups.setdefault(tuple(fields.items()), {**fields, "seeds": 0, "completed": 0,
                                                      "train_error": [], "test_error": []})
    group["seeds"] += 1
    if row["status"] == reporting.COMPLETED:
      group["completed"] += 1
      group["train_error"].append(row["train_error"])
      group["test_error"].append(row["test_error"])
  return list(groups.values())


def mean_std_percent(errors: Sequence[float]) -> str:
  """Errors (fractions) as "mean ± std" in %, the std the sample one (n - 1); the mean alone for
  one value (a spread needs two), "-" for none."""
  if not errors:
    return "-"
  mean = f"{100 * statistics.fmean(errors):.2f}"
  return mean if len(errors) < 2 else f"{mean} ± {100 * statistics.stdev(errors):.2f}"


def compares_with_paper(config: ml_collections.ConfigDict) -> bool:
  """Whether a point of this run config is measured as Table 6 is: CIFAR-10's test split."""
  return config.dataset.name == "cifar10" and config.dataset.eval_split == "test"


def paper_test_error(fields: dict) -> str:
  """The paper's CIFAR-10 test error (%) of the net that `fields` (depth, skip) name, as text:
  "8.75", "6.43 (6.61 ± 0.16)" where the paper gives a mean and std too; NO_NUMBER for a plain
  net, a depth Table 6 lacks, or fields that do not say skip=True (the sweep's `fixed` might
  make every net plain)."""
  depth = fields.get("depth")
  if fields.get("skip") is not True or depth not in PAPER_CIFAR10_TEST_ERROR:
    return NO_NUMBER
  text = f"{PAPER_CIFAR10_TEST_ERROR[depth]:.2f}"
  if depth in PAPER_CIFAR10_MEAN_STD:
    mean, std = PAPER_CIFAR10_MEAN_STD[depth]
    text += f" ({mean:.2f} ± {std:.2f})"
  return text


def format_over_seeds(rows: list[dict], *, paper: bool) -> str:
  """over_seeds as aligned text: final train and test error in %, mean ± std over each group's
  completed points; with `paper`, the paper's test error beside them (paper_test_error)."""
  groups = over_seeds(rows)
  fields = [k for k in groups[0] if k not in ("seeds", "completed", "train_error", "test_error")]
  header = [*fields, "seeds", "train err %", "test err %"] + (["paper test err %"] if paper
                                                                 else [])
  body = [[*(points.format_value(g[f]) if g[f] is not None else "" for f in fields),
           f"{g['completed']}/{g['seeds']}", mean_std_percent(g["train_error"]),
           mean_std_percent(g["test_error"])] + ([paper_test_error(g)] if paper else [])
          for g in groups]
  widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
  lines = ["Over seeds: mean ± sample std of the final errors of each group's completed points "
           "(seeds: completed/all)."]
  lines += ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip()
            for line in [header, *body]]
  if paper:
    lines.append("Paper: He et al. 2016, Table 6 (CIFAR-10 test error; ResNet-110 best of 5 "
                 "runs, their mean ± std in brackets; no number for plain nets).")
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
