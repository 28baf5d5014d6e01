"""Figures and tables of finished runs: error curves as in He et al. 2016 Figure 6, final errors
beside the paper's Table 6, and gradient flow through the blocks.

Each function takes `Run`s (what a sweep varied, the run's summary.json and its metrics.jsonl
events; `results.load_runs` builds them) and writes one file. Figures are drawn on a bare
`matplotlib.figure.Figure` with the Agg canvas, so nothing here touches pyplot's global state or
needs a display.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from typing import Any

import matplotlib
from matplotlib.figure import Figure

from resnet_jax import diagnostics, reporting

# He et al. 2016, Table 6: CIFAR-10 test error (%) of the residual nets (110: best of 5 runs).
PAPER_CIFAR10_TEST_ERROR = {20: 8.75, 32: 7.51, 44: 7.17, 56: 6.97, 110: 6.43}
ERROR_CURVES_FILE = "error_curves.png"
ABLATION_TABLE_FILE = "ablation_table.md"
GRADIENT_FLOW_FILE = "gradient_flow.png"


@dataclasses.dataclass(frozen=True)
class Run:
  fields: dict[str, Any]  # What the sweep varied, e.g. {"depth": 56, "skip": False}.
  summary: reporting.Summary | None  # The run's summary.json; None when it has none yet.
  events: list[dict]  # The run's metrics.jsonl, in order.


def write_sweep_figures(runs: Sequence[Run], out_dir: str, *, dataset: str) -> list[str]:
  """Writes every figure and table that fits the runs; returns their paths.

  Always the error curves; the ablation table when the runs vary depth and skip; the
  gradient-flow figure when they recorded diagnostics.
  """
  paths = [os.path.join(out_dir, ERROR_CURVES_FILE)]
  plot_error_curves(runs, paths[-1], title=dataset)
  if any("depth" in r.fields and "skip" in r.fields for r in runs):
    paths.append(os.path.join(out_dir, ABLATION_TABLE_FILE))
    with open(paths[-1], "w") as f:
      f.write(ablation_table(runs, dataset=dataset) + "\n")
  if any(_diagnostics(r) for r in runs):
    paths.append(os.path.join(out_dir, GRADIENT_FLOW_FILE))
    plot_gradient_flow(runs, paths[-1])
  return paths


def plot_error_curves(runs: Sequence[Run], path: str, *, title: str = "") -> None:
  """Training (thin) and test (bold) error in % against iterations, one colour per depth.

  When every run sets `skip`, plain nets (dashed) go left and residual nets (solid) right, as in
  Figure 6; otherwise all runs share one panel.
  """
  panels = _skip_panels(runs)
  colours = _colours(runs)
  fig = Figure(figsize=(6 * len(panels), 4.5), layout="constrained")
  axes = fig.subplots(1, len(panels), squeeze=False)[0]
  top = 5.0
  for ax, (skip, heading) in zip(axes, panels):
    for run in (r for r in runs if skip is None or r.fields.get("skip") == skip):
      style = dict(color=colours[_series(run)],
                   linestyle="--" if run.fields.get("skip") is False else "-")
      train = [(e["step"], 100 * e["train_error"]) for e in run.events
               if e["event"] == reporting.TRAIN]
      test = [(e["step"], 100 * e["test_error"]) for e in run.events
              if e["event"] == reporting.EVAL]
      if train:
        ax.plot(*zip(*train), linewidth=0.9, alpha=0.7, **style)
      if test:
        ax.plot(*zip(*test), linewidth=2.2, marker="o" if len(test) < 4 else None, **style)
      ax.plot([], [], linewidth=2, label=run_label(run.fields), **style)  # Legend entry.
      finals = [v for curve in (train, test) for _, v in curve[-1:] if math.isfinite(v)]
      top = max([top, *(2 * v + 5 for v in finals)])
    ax.set_title(heading)
    ax.set_xlabel("iterations")
    ax.set_ylabel("error (%)")
    ax.grid(alpha=0.3)
    ax.legend(title="thin: train, bold: test", fontsize="small")
  for ax in axes:
    ax.set_ylim(0, min(top, 100))
  if title:
    fig.suptitle(title)
  fig.savefig(path, dpi=120)


def ablation_table(runs: Sequence[Run], *, dataset: str) -> str:
  """Markdown: final train and test error (%) per depth, plain vs residual.

  Beside the paper's Table 6 test errors when `dataset` is cifar10. A run that did not complete
  shows its status instead of numbers.

  Raises:
    ValueError: when two runs share a depth and skip (average them over seeds first).
  """
  cells: dict[tuple[int, bool], Run] = {}
  for run in runs:
    if "depth" not in run.fields or "skip" not in run.fields:
      continue
    key = (int(run.fields["depth"]), bool(run.fields["skip"]))
    if key in cells:
      raise ValueError(f"the ablation table needs one run per depth and skip; depth={key[0]} "
                       f"skip={key[1]} has more: {cells[key].fields} and {run.fields}")
    cells[key] = run
  paper = dataset == "cifar10"
  header = ["depth", "plain train", "plain test", "ResNet train", "ResNet test"]
  if paper:
    header.append("ResNet test, paper")
  lines = [f"Final error (%) on {dataset}: plain nets vs residual nets of the same depth.", "",
           "| " + " | ".join(header) + " |", "|" + "---:|" * len(header)]
  for depth in sorted({d for d, _ in cells}):
    row = [str(depth)]
    for skip in (False, True):
      row += [_final_error(cells.get((depth, skip)), column)
              for column in ("train_error", "test_error")]
    if paper:
      row.append(f"{PAPER_CIFAR10_TEST_ERROR[depth]:.2f}" if depth in PAPER_CIFAR10_TEST_ERROR
                 else "-")
    lines.append("| " + " | ".join(row) + " |")
  if paper:
    lines += ["", "Paper: He et al. 2016, Table 6 (CIFAR-10 test error; ResNet-110 best of 5)."]
  return "\n".join(lines)


def plot_gradient_flow(runs: Sequence[Run], path: str) -> None:
  """Gradient norm (top) and activation RMS (bottom) of every block, input side on the left.

  Left: the first diagnostics record of each run (step 0 is the initialisation); right: its last.
  Plain nets dashed, residual nets solid, one colour per depth, log scale.

  Raises:
    ValueError: when no run recorded diagnostics.
  """
  recorded = [r for r in runs if _diagnostics(r)]
  if not recorded:
    raise ValueError("no run recorded diagnostics: set config.diagnostics_every > 0")
  colours = _colours(recorded)
  fig = Figure(figsize=(12, 8), layout="constrained")
  axes = fig.subplots(2, 2, sharex=True)
  for col, pick in enumerate((0, -1)):
    steps = sorted({_diagnostics(r)[pick]["step"] for r in recorded})
    when = "first record" if pick == 0 else "last record"
    for row, (kind, label) in enumerate((("grad_norm", "gradient norm"),
                                         ("activation_rms", "activation RMS"))):
      ax = axes[row][col]
      for run in recorded:
        record = _diagnostics(run)[pick]
        order = diagnostics.block_order(record["grad_norm"])
        values = record.get(kind, {})
        xs = [i for i, name in enumerate(order) if name in values]
        ax.plot(xs, [values[order[i]] for i in xs], marker=".",
                color=colours[_series(run)],
                linestyle="--" if run.fields.get("skip") is False else "-",
                label=run_label(run.fields))
      ax.set_yscale("log")
      ax.set_ylabel(label)
      ax.grid(alpha=0.3, which="both")
      ax.set_title(f"{label}, {when} (step {', '.join(map(str, steps))})")
    axes[1][col].set_xlabel("block index (0 = stem, input side; last = head)")
  axes[0][0].legend(fontsize="small")
  fig.savefig(path, dpi=120)


def run_label(fields: dict[str, Any]) -> str:
  """"plain-20", "ResNet-56" (then any other fields), else the fields as text: "lr=0.1,seed=1"."""
  rest = dict(fields)
  parts = []
  if "depth" in fields and "skip" in fields:
    parts.append(f"{'ResNet' if fields['skip'] else 'plain'}-{fields['depth']}")
    del rest["depth"], rest["skip"]
  parts += [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in rest.items()]
  return ",".join(parts)


def _skip_panels(runs: Sequence[Run]) -> list[tuple[bool | None, str]]:
  if all("skip" in r.fields for r in runs):
    return [(False, "plain networks"), (True, "residual networks (ResNets)")]
  return [(None, "")]


def _series(run: Run) -> tuple:
  """What gets one colour: every varied field but skip, so plain-56 and ResNet-56 match."""
  return tuple((k, v) for k, v in run.fields.items() if k != "skip")


def _colours(runs: Sequence[Run]) -> dict[tuple, Any]:
  palette = matplotlib.colormaps["tab10"]
  series = list(dict.fromkeys(_series(r) for r in runs))
  return {s: palette(i % 10) for i, s in enumerate(series)}


def _diagnostics(run: Run) -> list[dict]:
  return [e for e in run.events if e["event"] == reporting.DIAGNOSTICS]


def _final_error(run: Run | None, column: str) -> str:
  if run is None:
    return "-"
  if run.summary is None:
    return "pending"  # results.PENDING, spelled out: results imports this module.
  value = getattr(run.summary, column)
  if run.summary.status != reporting.COMPLETED or not math.isfinite(value):
    return run.summary.status
  return f"{100 * value:.2f}"
