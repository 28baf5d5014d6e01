"""Figures and tables of finished runs: error curves as in He et al. 2016 Figure 6, final errors
beside the paper's Table 6, gradient flow through the blocks, the lr x depth trainability map, and
the instruments of curvature.py (sharpness beside the optimiser's stability threshold, the
gradient noise scale), and loss landscapes (landscape.py).

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
from typing import TYPE_CHECKING, Any

import matplotlib
import matplotlib.colors
import matplotlib.ticker
import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from resnet_jax import curvature, diagnostics, reporting, results

if TYPE_CHECKING:  # landscape.py draws with this module.
  from resnet_jax.landscape import Landscape

ERROR_CURVES_FILE = "error_curves.png"
ABLATION_TABLE_FILE = "ablation_table.md"
GRADIENT_FLOW_FILE = "gradient_flow.png"
SHARPNESS_FILE = "sharpness.png"
NOISE_SCALE_FILE = "noise_scale.png"
EDGE_OF_STABILITY_FILE = "edge_of_stability.png"
# The noise scale's estimates are averaged over measurements with this decay per measurement
# (about the last 1 / (1 - decay) = 10 of them) before dividing (smoothed_noise_scale).
NOISE_SCALE_EMA = 0.9
TRAINABILITY_MAP_FILE = "trainability_map.png"
LANDSCAPE_LINE_FILE = "line.png"
LANDSCAPE_CONTOUR_FILE = "contour.png"
LANDSCAPE_SURFACE_FILE = "surface.png"
MAP_FIELDS = ("lr", "depth", "skip")  # What a sweep varies for the trainability map.


@dataclasses.dataclass(frozen=True)
class Run:
  fields: dict[str, Any]  # What the sweep varied, e.g. {"depth": 56, "skip": False}.
  summary: reporting.Summary | None  # The run's summary.json; None when it has none yet.
  events: list[dict]  # The run's metrics.jsonl, in order.


def write_sweep_figures(runs: Sequence[Run], out_dir: str, *, dataset: str) -> list[str]:
  """Writes every figure and table that fits the runs; returns their paths.

  Always the error curves; the ablation table when the runs vary depth and skip, or the
  trainability map instead when they vary the learning rate too; the gradient-flow figure when
  they recorded diagnostics; the sharpness and noise-scale figures when they recorded those.
  """
  paths = [os.path.join(out_dir, ERROR_CURVES_FILE)]
  plot_error_curves(runs, paths[-1], title=dataset)
  if any(all(f in r.fields for f in MAP_FIELDS) for r in runs):
    paths.append(os.path.join(out_dir, TRAINABILITY_MAP_FILE))
    plot_trainability_map(runs, paths[-1], title=dataset)
  elif any("depth" in r.fields and "skip" in r.fields for r in runs):
    paths.append(os.path.join(out_dir, ABLATION_TABLE_FILE))
    with open(paths[-1], "w") as f:
      f.write(ablation_table(runs, dataset=dataset) + "\n")
  if any(_diagnostics(r) for r in runs):
    paths.append(os.path.join(out_dir, GRADIENT_FLOW_FILE))
    plot_gradient_flow(runs, paths[-1])
  for kind, name, plot in ((reporting.SHARPNESS, SHARPNESS_FILE, plot_sharpness),
                           (reporting.NOISE_SCALE, NOISE_SCALE_FILE, plot_noise_scale)):
    if any(_events(r, kind) for r in runs):
      paths.append(os.path.join(out_dir, name))
      plot(runs, paths[-1])
  if any(_events(r, reporting.SHARPNESS) and "lr" in r.fields for r in runs):
    paths.append(os.path.join(out_dir, EDGE_OF_STABILITY_FILE))
    plot_edge_of_stability(runs, paths[-1])
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

  Runs of one depth and skip (seeds) show the mean ± std over those that completed
  (results.mean_std_percent), and how many completed when some did not. Beside the paper's
  Table 6 test errors (results.paper_test_error) when `dataset` is cifar10. A cell none of whose
  runs completed shows their status instead of numbers.
  """
  cells: dict[tuple[int, bool], list[Run]] = {}
  for run in runs:
    if "depth" in run.fields and "skip" in run.fields:
      cells.setdefault((int(run.fields["depth"]), bool(run.fields["skip"])), []).append(run)
  paper = dataset == "cifar10"
  header = ["depth", "plain train", "plain test", "ResNet train", "ResNet test"]
  if paper:
    header.append("ResNet test, paper")
  most = max((len(c) for c in cells.values()), default=1)
  over = f", mean ± std over up to {most} runs" if most > 1 else ""
  lines = [f"Final error (%) on {dataset}{over}: plain nets vs residual nets of the same depth.",
           "", "| " + " | ".join(header) + " |", "|" + "---:|" * len(header)]
  for depth in sorted({d for d, _ in cells}):
    row = [str(depth)]
    for skip in (False, True):
      row += [_final_error(cells.get((depth, skip), []), column)
              for column in ("train_error", "test_error")]
    if paper:
      row.append(results.paper_test_error({"depth": depth, "skip": True}))
    lines.append("| " + " | ".join(row) + " |")
  if paper:
    lines += ["", "Paper: He et al. 2016, Table 6 (CIFAR-10 test error; ResNet-110 best of 5, "
              "their mean ± std in brackets)."]
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


def trainability_grid(runs: Sequence[Run]) -> tuple[
    list[float], list[int], dict[bool, np.ndarray], dict[bool, np.ndarray]]:
  """The lr x depth map of each skip setting: final training error and how each run ended.

  Returns (lrs, depths, errors, statuses): the learning rates and depths the runs set,
  ascending; for skip False (plain) and True (ResNet), errors[skip] float [depths, lrs] holds the
  final train_error (a fraction) of a completed run and nan elsewhere, and statuses[skip] str
  [depths, lrs] the run's status ("pending" without a summary; "" where no run is).

  Raises:
    ValueError: when no run sets lr, depth and skip, or two runs share a cell (average them over
      seeds first).
  """
  cells: dict[tuple[bool, int, float], Run] = {}
  for run in runs:
    if not all(f in run.fields for f in MAP_FIELDS):
      continue
    key = (bool(run.fields["skip"]), int(run.fields["depth"]), float(run.fields["lr"]))
    if key in cells:
      raise ValueError(f"the trainability map needs one run per lr, depth and skip; "
                       f"{cells[key].fields} and {run.fields} share one")
    cells[key] = run
  if not cells:
    raise ValueError(f"no run sets all of {', '.join(MAP_FIELDS)}: sweep them with points.product")
  lrs = sorted({lr for _, _, lr in cells})
  depths = sorted({depth for _, depth, _ in cells})
  shape = (len(depths), len(lrs))
  errors = {skip: np.full(shape, np.nan) for skip in (False, True)}
  statuses = {skip: np.full(shape, "", dtype=object) for skip in (False, True)}
  for (skip, depth, lr), run in cells.items():
    cell = (depths.index(depth), lrs.index(lr))
    statuses[skip][cell] = run.summary.status if run.summary else results.PENDING
    if statuses[skip][cell] == reporting.COMPLETED:
      errors[skip][cell] = run.summary.train_error
  return lrs, depths, errors, statuses


def plot_trainability_map(runs: Sequence[Run], path: str, *, title: str = "") -> None:
  """Final training error (%) over peak learning rate (columns) and depth (rows), plain nets
  left and ResNets right on one colour scale (trainability_grid's values).

  A diverged run is hatched and says "diverged"; one that failed, was preempted or has not
  finished is blank with its status.
  """
  lrs, depths, errors, statuses = trainability_grid(runs)
  finite = [100 * v for grid in errors.values() for v in grid[np.isfinite(grid)]]
  norm = matplotlib.colors.Normalize(0, max(finite, default=100))
  cmap = matplotlib.colormaps["viridis"].with_extremes(bad="white")
  fig = Figure(figsize=(2.4 + 1.8 * len(lrs), 1.8 + 0.6 * len(depths)), layout="constrained")
  axes = fig.subplots(1, 2, sharey=True)
  for ax, skip, heading in zip(axes, (False, True), ("plain networks", "residual networks")):
    image = ax.imshow(100 * errors[skip], cmap=cmap, norm=norm, origin="lower", aspect="auto")
    for (row, col), status in np.ndenumerate(statuses[skip]):
      value = 100 * errors[skip][row, col]
      diverged = status == reporting.DIVERGED
      if diverged:
        ax.add_patch(Rectangle((col - 0.5, row - 0.5), 1, 1, fill=False, hatch="xx",
                               edgecolor="0.6", linewidth=0))
      text = f"{value:.1f}" if math.isfinite(value) else status
      dark = math.isfinite(value) and norm(value) < 0.6  # viridis is dark at its low end.
      ax.text(col, row, text, ha="center", va="center", fontsize="small",
              color="white" if dark else "black",
              bbox=dict(facecolor="white", edgecolor="none") if diverged else None)
    ax.set_xticks(range(len(lrs)), [f"{lr:g}" for lr in lrs])
    ax.set_yticks(range(len(depths)), [str(d) for d in depths])
    ax.set_xlabel("peak learning rate")
    ax.set_title(heading)
  axes[0].set_ylabel("depth")
  fig.colorbar(image, ax=axes, label="final training error (%)")
  if title:
    fig.suptitle(title)
  fig.savefig(path, dpi=120)


def plot_sharpness(runs: Sequence[Run], path: str) -> None:
  """The top Hessian eigenvalue of the training loss against iterations, log scale (bold), with
  each run's stability threshold at its learning rate (thin, same colour and style): 2/η for SGD,
  (2 + 2β)/η with heavy-ball momentum β, (2 + 2β)/(η(1 + 2β)) with Nesterov's
  (curvature.stability_threshold). Cohen et al. (ICLR 2021) find the sharpness rising until it
  meets the threshold and hovering there. One line per run: plain nets dashed, residual nets
  solid, one colour per depth.

  Raises:
    ValueError: when no run recorded sharpness.
  """
  recorded, colours, fig, ax = _over_steps(runs, reporting.SHARPNESS, "config.sharpness_every")
  for run in recorded:
    events = _events(run, reporting.SHARPNESS)
    style = dict(color=colours[_series(run)],
                 linestyle="--" if run.fields.get("skip") is False else "-")
    ax.plot([e["step"] for e in events], [e["sharpness"] for e in events], linewidth=2,
            marker="o" if len(events) < 4 else None, label=run_label(run.fields), **style)
    # LARS records no threshold (None): its trust ratios give each layer a step of its own.
    thresholds = [(e["step"], e["threshold"]) for e in events if e["threshold"] is not None]
    if thresholds:
      ax.plot(*zip(*thresholds), linewidth=0.8, alpha=0.8, **style)
  ax.set_yscale("log")
  ax.set_xlabel("iterations")
  ax.set_ylabel("top eigenvalue of the training-loss Hessian")
  ax.grid(alpha=0.3, which="both")
  ax.legend(title="bold: sharpness, thin: stability threshold", fontsize="small")
  fig.savefig(path, dpi=120)


def plot_edge_of_stability(runs: Sequence[Run], path: str) -> None:
  """Cohen et al.'s (ICLR 2021) figure: one column per learning rate (the runs' `lr` field), the
  training loss at each logged step above, the sharpness below with the stability threshold at
  that lr drawn across (2/η for gradient descent). At the edge of stability the sharpness rises
  to the threshold and hovers there while the loss keeps falling, not monotonically. Plain nets
  dashed, residual nets solid; open circles mark measurements whose Hessian's negative end
  dominates (curvature.negative_end_dominates: the top value may be only a lower bound).

  Raises:
    ValueError: when no run that sets `lr` recorded sharpness.
  """
  recorded = [r for r in runs if _events(r, reporting.SHARPNESS) and "lr" in r.fields]
  if not recorded:
    raise ValueError("no run of a sweep over lr recorded sharpness events: set "
                     "config.sharpness_every > 0 and sweep lr")
  lrs = sorted({r.fields["lr"] for r in recorded})
  # One colour per net (every field but lr), the same in every column.
  nets = list(dict.fromkeys(tuple((k, v) for k, v in r.fields.items() if k != "lr")
                            for r in recorded))
  colours = {net: matplotlib.colormaps["tab10"](i % 10) for i, net in enumerate(nets)}
  fig = Figure(figsize=(5 * len(lrs), 6.5), layout="constrained")
  axes = fig.subplots(2, len(lrs), squeeze=False, sharex="col")
  any_loose = False
  for column, lr in enumerate(lrs):
    loss_ax, sharp_ax = axes[0, column], axes[1, column]
    thresholds = set()
    for run in (r for r in recorded if r.fields["lr"] == lr):
      fields = {k: v for k, v in run.fields.items() if k != "lr"}
      style = dict(color=colours[tuple(fields.items())],
                   linestyle="--" if fields.get("skip") is False else "-")
      label = ({True: "residual", False: "plain"}[fields["skip"]] if list(fields) == ["skip"]
               else run_label(fields))
      train = [(e["step"], e["loss"]) for e in _events(run, reporting.TRAIN)]
      if train:
        loss_ax.plot(*zip(*train), linewidth=1.2, label=label, **style)
      events = _events(run, reporting.SHARPNESS)
      sharp_ax.plot([e["step"] for e in events], [e["sharpness"] for e in events], marker="o",
                    markersize=3, linewidth=1.5, label=label, **style)
      # Open circles: measurements whose top Ritz value may be a loose lower bound.
      loose = [e for e in events if "lowest" in e
               and curvature.negative_end_dominates(e["sharpness"], e["lowest"])]
      if loose:
        sharp_ax.plot([e["step"] for e in loose], [e["sharpness"] for e in loose], "o",
                      markersize=6, markerfacecolor="white", color=style["color"])
        any_loose = True
      thresholds.update(e["threshold"] for e in events if e["threshold"] is not None)
    for threshold in thresholds:  # Once per column: the runs at one lr share it.
      sharp_ax.axhline(threshold, color="0.3", linewidth=0.8, linestyle=":")
      sharp_ax.text(0.01, threshold, f"stability threshold {threshold:.3g}", fontsize="small",
                    transform=sharp_ax.get_yaxis_transform(), va="bottom", color="0.3")
    loss_ax.set_title(f"lr {lr}")
    loss_ax.set_ylabel("training loss")
    loss_ax.set_yscale("log")
    loss_ax.grid(alpha=0.3, which="both")
    loss_ax.legend(fontsize="small")
    sharp_ax.set_xlabel("iterations")
    sharp_ax.set_ylabel("sharpness (top Hessian eigenvalue)")
    sharp_ax.grid(alpha=0.3)
  if any_loose:
    fig.suptitle("open circles: the Hessian's negative end dominates; the top Ritz value may be "
                 "only a lower bound", fontsize="small")
  fig.savefig(path, dpi=120)


def _over_steps(runs: Sequence[Run], kind: str, setting: str):
  """The runs that recorded events of `kind`, their colours, and one empty figure and axes for
  a quantity over steps. Raises ValueError naming `setting` when no run recorded any."""
  recorded = [r for r in runs if _events(r, kind)]
  if not recorded:
    raise ValueError(f"no run recorded {kind} events: set {setting} > 0")
  fig = Figure(figsize=(7, 4.5), layout="constrained")
  return recorded, _colours(recorded), fig, fig.subplots()


def smoothed_noise_scale(events: Sequence[dict], decay: float = NOISE_SCALE_EMA) -> list[float]:
  """B_simple at each NOISE_SCALE event as McCandlish et al. 2018 (Appendix A) compute it: the
  exponential moving averages of the tr(Σ) and |G|² estimates (`decay` per event), divided.

  One measurement's ratio is biased and noisy, and its |G|² estimate may be negative; the
  averages are not. Both start from 0 and so carry the same bias factor 1 - decay^t, which
  cancels in the ratio: no correction is needed.
  """
  trace = grad_sq = 0.0
  out = []
  for e in events:
    trace = decay * trace + (1 - decay) * e["trace_cov"]
    grad_sq = decay * grad_sq + (1 - decay) * e["grad_sq_norm"]
    out.append(trace / grad_sq if grad_sq else float("nan"))
  return out


def plot_noise_scale(runs: Sequence[Run], path: str) -> None:
  """The simple gradient noise scale B_simple = tr(Σ)/|G|² against iterations, log scale: bold,
  the ratio of the estimates' moving averages (smoothed_noise_scale); dots, each measurement's
  own ratio; a thin grey line at each batch size the runs trained with (while B_simple lies above
  it, a larger batch would still buy a nearly proportionally larger step). Plain nets dashed,
  residual nets solid, one colour per depth.

  Raises:
    ValueError: when no run recorded the noise scale.
  """
  recorded, colours, fig, ax = _over_steps(runs, reporting.NOISE_SCALE,
                                           "config.noise_scale_every")
  for run in recorded:
    events = _events(run, reporting.NOISE_SCALE)
    colour = colours[_series(run)]
    steps = [e["step"] for e in events]
    ax.plot(steps, smoothed_noise_scale(events), linewidth=2, color=colour,
            linestyle="--" if run.fields.get("skip") is False else "-",
            marker="o" if len(events) < 4 else None, label=run_label(run.fields))
    ax.plot(steps, [e["b_simple"] for e in events], ".", alpha=0.3, color=colour)
  # Records of the older estimator (a batch and its parts) name the batch size "b_big".
  batches = {e.get("batch_size", e.get("b_big")) for r in recorded
             for e in _events(r, reporting.NOISE_SCALE)}
  for batch in sorted(batches):
    ax.axhline(batch, color="0.5", linewidth=0.8, linestyle=":")
    ax.text(0.99, batch, f"batch {batch}", transform=ax.get_yaxis_transform(), ha="right",
            va="bottom", fontsize="small", color="0.4")
  ax.set_yscale("log")  # A negative single estimate is left out of the dots.
  ax.set_xlabel("iterations")
  ax.set_ylabel("noise scale B_simple (examples)")
  ax.grid(alpha=0.3, which="both")
  ax.legend(title=f"bold: ratio of averages (decay {NOISE_SCALE_EMA}), dots: single",
            fontsize="small")
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


def _events(run: Run, kind: str) -> list[dict]:
  return [e for e in run.events if e["event"] == kind]


def _final_error(runs: Sequence[Run], column: str) -> str:
  """The runs' final `column` error: mean ± std over the completed ones, "(k of n)" after it
  when some did not complete; with none completed, their statuses."""
  if not runs:
    return "-"
  errors = [getattr(r.summary, column) for r in runs if r.summary is not None
            and r.summary.status == reporting.COMPLETED
            and math.isfinite(getattr(r.summary, column))]
  if not errors:
    return "/".join(dict.fromkeys(r.summary.status if r.summary else results.PENDING
                                  for r in runs))
  text = results.mean_std_percent(errors)
  return text if len(errors) == len(runs) else f"{text} ({len(errors)} of {len(runs)})"


# --- Loss landscapes (landscape.py): the line from initialisation, the surface around a point. ---

def write_landscape_figures(landscape: Landscape, out_dir: str) -> list[str]:
  """Writes a landscape.Landscape's line.png, contour.png and surface.png into `out_dir`; returns
  their paths."""
  paths = [os.path.join(out_dir, name)
           for name in (LANDSCAPE_LINE_FILE, LANDSCAPE_CONTOUR_FILE, LANDSCAPE_SURFACE_FILE)]
  scale = _LossScale([landscape])
  line, contour, surface = (Figure(figsize=size, layout="constrained")
                            for size in ((6, 4.5), (6, 5), (6, 5)))
  _draw_line(line.add_subplot(), landscape)
  _draw_contour(contour.add_subplot(), landscape, scale=scale)
  _draw_surface(surface.add_subplot(projection="3d"), landscape, scale=scale)
  for fig, path in zip((line, contour, surface), paths):
    fig.savefig(path, dpi=120)
  return paths


def plot_landscape_comparison(landscapes: Sequence[Landscape], path: str) -> None:
  """Landscapes side by side, one column per run: contour, 3-D surface and line, on one loss
  scale throughout."""
  scale = _LossScale(landscapes)
  n = len(landscapes)
  fig = Figure(figsize=(5.5 * n, 14), layout="constrained")
  contour_axes, line_axes = [], []
  for col, landscape in enumerate(landscapes):
    contour_axes.append(fig.add_subplot(3, n, col + 1))
    filled = _draw_contour(contour_axes[-1], landscape, scale=scale, colorbar=False)
    _draw_surface(fig.add_subplot(3, n, n + col + 1, projection="3d"), landscape, scale=scale)
    line_axes.append(fig.add_subplot(3, n, 2 * n + col + 1))
    _draw_line(line_axes[-1], landscape)
  fig.colorbar(filled, ax=contour_axes, label="training loss", shrink=0.8,
               ticks=scale.levels[::3], format="%.3g")
  top = max(ax.get_ylim()[1] for ax in line_axes)
  bottom = min(ax.get_ylim()[0] for ax in line_axes)
  for ax in line_axes:
    ax.set_ylim(bottom, top)
  fig.savefig(path, dpi=120)


class _LossScale:
  """One logarithmic colour scale for the surface losses of some landscapes."""

  def __init__(self, landscapes: Sequence[Landscape]):
    values = np.concatenate([np.ravel(item.surface_loss) for item in landscapes])
    values = values[np.isfinite(values) & (values > 0)]
    self.low, self.high = (float(values.min()), float(values.max())) if values.size else (1, 10)
    self.high = max(self.high, 1.01 * self.low)
    self.levels = np.geomspace(self.low, self.high, 30)
    self.norm = matplotlib.colors.LogNorm(self.low, self.high)
    self.cmap = matplotlib.colormaps["viridis"]

  def clip(self, loss: np.ndarray) -> np.ndarray:
    """Losses inside the scale; NaN and Inf (a diverged network) at its top."""
    return np.clip(np.nan_to_num(loss, nan=self.high, posinf=self.high), self.low, self.high)


def _title(landscape: Landscape) -> str:
  return f"{landscape.network}, step {landscape.step}"


def _settings(landscape: Landscape) -> str:
  return (f"{landscape.examples} training images, directions seed {landscape.seed}, "
          f"span {landscape.span:g}")


def _draw_line(ax, landscape: Landscape) -> None:
  ax.plot(landscape.alphas, landscape.line_loss, color="C0", marker=".", label="loss")
  ax.set_yscale("log")
  ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%.3g"))
  # Between the decades only where the line spans at most one (then it may have no decade to
  # label); over several decades, labels at every 2, 3, ... 9 overlap.
  ax.yaxis.set_minor_formatter(matplotlib.ticker.LogFormatter(labelOnlyBase=False,
                                                              minor_thresholds=(1, 0.4)))
  ax.set_xlabel(f"a: (1 - a) * initial + a * step {landscape.step}")
  ax.set_ylabel("training loss (log)", color="C0")
  ax.grid(alpha=0.3, which="both")
  errors = ax.twinx()
  errors.plot(landscape.alphas, 100 * landscape.line_error, color="C1", linestyle="--",
              label="error")
  errors.set_ylim(0, 100)
  errors.set_ylabel("training error (%)", color="C1")
  ax.set_title(f"{_title(landscape)}: from initialisation\n{landscape.examples} training images",
               fontsize="medium")


def _draw_contour(ax, landscape: Landscape, *, scale: _LossScale, colorbar: bool = True):
  filled = ax.contourf(landscape.coords, landscape.coords, scale.clip(landscape.surface_loss),
                       levels=scale.levels, norm=scale.norm, cmap=scale.cmap)
  ax.contour(landscape.coords, landscape.coords, scale.clip(landscape.surface_loss),
             levels=scale.levels[::3], colors="white", linewidths=0.4, alpha=0.6)
  ax.plot([0], [0], marker="*", color="red", markersize=10)  # The checkpoint.
  ax.set_aspect("equal")
  ax.set_xlabel("direction 1 (filter-normalised)")
  ax.set_ylabel("direction 2")
  ax.set_title(f"{_title(landscape)}\n{_settings(landscape)}", fontsize="medium")
  if colorbar:
    ax.figure.colorbar(filled, ax=ax, label="training loss", ticks=scale.levels[::3],
                       format="%.3g")
  return filled


def _draw_surface(ax, landscape: Landscape, *, scale: _LossScale) -> None:
  x, y = np.meshgrid(landscape.coords, landscape.coords)
  z = np.log10(scale.clip(landscape.surface_loss))
  ax.plot_surface(x, y, z, cmap=scale.cmap, linewidth=0, antialiased=True,
                  norm=matplotlib.colors.Normalize(math.log10(scale.low), math.log10(scale.high)))
  ax.set_zlim(math.log10(scale.low), math.log10(scale.high))
  ax.set_xlabel("direction 1")
  ax.set_ylabel("direction 2")
  ax.set_zlabel("log10 training loss")
  ax.set_title(_title(landscape), fontsize="medium")
