"""The loss landscape of a run: the line from its initial network, and the surface around it.

Two pictures of the training loss near what SGD found, for comparing plain nets with ResNets:

- **The line** (Goodfellow et al., ICLR 2015): the networks (1 - a) * initial + a * final for a
  evenly spaced on [0, 1]. `initial` is the run's `init_state()` (a pure function of its seed),
  `final` a checkpoint. The BN running statistics are interpolated with the parameters, so the
  ends are exactly the initial and the checkpointed networks.
- **The surface** (Li et al., NeurIPS 2018, "Visualizing the Loss Landscape of Neural Nets"): the
  networks final + x * d1 + y * d2 for x, y evenly spaced on [-span, span], along two random
  *filter-normalised* directions (`random_directions`): Gaussian, then each filter of every conv
  and dense kernel rescaled to the norm of the same filter of the checkpoint, so that a step of
  1 moves every filter by its own size and the scale invariance BN gives the filters cannot
  distort the picture. BN parameters and biases get no direction (zero), and the running
  statistics are the checkpoint's, held fixed, as in the paper. The two directions are drawn from
  `seed` and orthogonalised filter by filter before the rescaling (Gram-Schmidt), so they are
  exactly orthogonal after it: the grid's axes are perpendicular and its distances true. (Li et
  al. draw them independently and rely on the dimension: a cosine of about 1/sqrt(parameters).)

**BN mode.** Every network is evaluated as the run evaluates its test set: BN in inference mode
with its running statistics (`steps.eval_step`). That is what "statistics held fixed" means on the
surface; on the line the statistics move with the parameters, and the initial network's are
BN's initial ones (mean 0, variance 1): its BN layers only apply their scale and offset (the
train step would normalise by the batch's statistics instead).

**What is evaluated.** The mean cross-entropy (without the weight-decay term) and the top-1 error
on the first `examples` images of the run's training split, in their stored order (TFDS stores
them shuffled), without augmentation: the same images for every run of a dataset, so two runs'
landscapes are comparable. A grid point is a list of variable trees and coefficients; one
compiled program (`make_evaluator`) evaluates the combination sum_k c_k * tree_k on the images
in chunks of the run's `eval_batch_size`, sharded over the devices. The coefficients are inputs,
so the line is one compilation and the surface another, whatever the grid.

**How convex.** `convexity_numbers` reads a computed surface: the share of its points near the
centre where it curves down along some direction, and the median ratio of its principal
curvatures (Li et al.'s measure of non-convexity, on the surface rather than the whole Hessian).
experiments/landscape_numbers.py adds the whole Hessian's two ends at the centre and near it.

**Cost.** One forward pass over the images per grid point: grid + grid^2 passes, besides
compiling the run's initialisation and the two evaluation programs (the README has figures).

Command line (cli.py's conventions; the README's "Why residual nets train" is the guide):
  python -m resnet_jax.landscape --workdir=RUN [--step=N] [--grid=41] [--span=1.0]
      [--examples=1000] [--seed=0]        -> RUN/landscape/: landscape.npz and the figures
  python -m resnet_jax.landscape --compare=RUN_A,RUN_B[,...] [--out=DIR]
                                          -> DIR/compare.png, one loss scale; a run without
                                             landscape.npz gets its landscape computed first
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import flags

from resnet_jax import checkpoints, cli, data, parallel, plots, reporting, sources, steps
from resnet_jax import config as config_lib
from resnet_jax import trainer as trainer_lib

LANDSCAPE_DIR = "landscape"  # Inside the run's workdir.
DATA_FILE = "landscape.npz"
COMPARE_FILE = "compare.png"
# Li et al. drew 51 x 51 surfaces; 201 x 201 is 40,401 forward passes over the images.
MAX_GRID = 201
PROGRESS_POINTS = 1000  # An evaluation of this many networks or more reports every tenth.

Variables = dict[str, Any]  # {"params": ..., "batch_stats": ...}, as model.apply takes them.


class NotARunError(Exception):
  """A directory given as a run's workdir is none: missing, or without the run's config.json."""


@dataclasses.dataclass(frozen=True)
class Landscape:
  """One run's line and surface, and what they were computed from (landscape.npz).

  Losses are mean cross-entropies per example, errors fractions, on the same `examples` images.
  surface_loss[i, j] is at (x, y) = (coords[j], coords[i]): rows are y, as matplotlib draws.
  """
  network: str  # "ResNet-20" or "plain-20", with the width when it is not 1.
  step: int  # The checkpoint: the line's end and the surface's centre.
  examples: int
  span: float
  seed: int  # Of the directions.
  alphas: np.ndarray  # float [G]: 0 (initial network) .. 1 (checkpoint).
  line_loss: np.ndarray  # float [G]
  line_error: np.ndarray  # float [G]
  coords: np.ndarray  # float [G]: -span .. span, along each direction.
  surface_loss: np.ndarray  # float [G, G]
  surface_error: np.ndarray  # float [G, G]
  seconds: float  # To compute both: building, initialising, compiling and evaluating.

  def save(self, path: str) -> None:
    with reporting.open_atomic(path, "wb") as f:
      np.savez(f, **dataclasses.asdict(self))

  @classmethod
  def load(cls, path: str) -> Landscape:
    with np.load(path) as stored:
      fields = {f.name: stored[f.name] for f in dataclasses.fields(cls)}
    for name, kind in (("network", str), ("step", int), ("examples", int), ("span", float),
                       ("seed", int), ("seconds", float)):
      fields[name] = kind(fields[name])
    return cls(**fields)


# --- Directions. ---

def filter_normalize(direction, params):
  """`direction` with each filter rescaled to the norm of the same filter of `params`.

  A leaf of two or more dimensions is a conv or dense kernel [..., in, out], whose filters are
  its output slices [..., j]; every other leaf (BN scales and offsets, biases) becomes zero.
  Both trees have the same structure; the result is numpy float32.
  """
  def one(d, p):
    d, p = np.asarray(d, np.float32), np.asarray(p, np.float32)
    if d.ndim < 2:
      return np.zeros_like(d)
    axes = tuple(range(d.ndim - 1))
    d_norm = np.sqrt(np.sum(np.square(d, dtype=np.float64), axis=axes))
    p_norm = np.sqrt(np.sum(np.square(p, dtype=np.float64), axis=axes))
    scale = np.divide(p_norm, d_norm, out=np.zeros_like(d_norm), where=d_norm > 0)
    return (d * scale).astype(np.float32)
  return jax.tree.map(one, direction, params)


def orthogonalize_filters(direction, previous: Sequence):
  """`direction` with each filter of every kernel (a leaf of two or more dimensions, filters its
  output slices [..., j]) made orthogonal to the same filter of each of `previous` (mutually
  orthogonal filter by filter already; Gram-Schmidt in float64). Rescaling a filter keeps it
  orthogonal, so filter_normalize keeps directions orthogonal: their inner product is the sum of
  their filters'. Other leaves are left as they are (filter_normalize zeroes them)."""
  def one(d, *others):
    if np.ndim(d) < 2:
      return d
    axes = tuple(range(np.ndim(d) - 1))
    d = np.asarray(d, np.float64)
    for o in others:
      o = np.asarray(o, np.float64)
      o_sq = np.sum(np.square(o), axis=axes)
      coef = np.divide(np.sum(d * o, axis=axes), o_sq, out=np.zeros_like(o_sq), where=o_sq > 0)
      d = d - coef * o
    return d
  return jax.tree.map(one, direction, *previous)


def random_directions(seed: int, variables: Variables, count: int = 2) -> list[Variables]:
  """`count` Gaussian directions, orthogonalised filter by filter (orthogonalize_filters) and
  filter-normalised to `variables["params"]`, with zero BN statistics (they stay where they
  are): a pure function of `seed`, drawn by numpy (jax.random compiles a program per leaf shape,
  which took longer than the draws). The first is the first Gaussian draw, normalised."""
  rng = np.random.default_rng(seed)
  drawn = []
  for _ in range(count):
    gaussian = jax.tree.map(lambda x: rng.standard_normal(np.shape(x), np.float32),
                            variables["params"])
    drawn.append(orthogonalize_filters(gaussian, drawn))
  return [{"params": filter_normalize(d, variables["params"]),
           "batch_stats": jax.tree.map(np.zeros_like, variables["batch_stats"])} for d in drawn]


# --- Evaluation. ---

def line_coordinates(grid: int) -> np.ndarray:
  """float64 [grid]: 0 .. 1, evenly spaced; the ends are exactly 0 and 1."""
  return np.arange(grid) / (grid - 1)


def surface_coordinates(grid: int, span: float) -> np.ndarray:
  """float64 [grid]: -span .. span, evenly spaced; exactly 0 in the middle of an odd grid."""
  return span * (2 * np.arange(grid) - (grid - 1)) / (grid - 1)


def make_evaluator(eval_step, images: np.ndarray, labels: np.ndarray, *,
                   mesh: jax.sharding.Mesh, batch_size: int
                   ) -> Callable[[Sequence[Variables], np.ndarray], tuple[np.ndarray, np.ndarray]]:
  """A function `(points, coefficients) -> (loss [P], error [P])` on a fixed set of images.

  points: K variable trees of one model; coefficients: float [P, K], one grid point a row, the
  network of row p being sum_k coefficients[p, k] * points[k] (BN statistics included).
  images: uint8 [N, H, W, C] and labels: int32 [N] are placed on the mesh once, in chunks of
  `batch_size` (rounded up to a multiple of the devices; the last one padded and masked).
  eval_step: the run's `Trainer.eval_step`, so each network is evaluated as the run evaluates
  its test set (BN in inference mode); the coefficients are inputs, so one compiled program
  serves every grid point.
  """
  devices = mesh.devices.size
  chunk = -(-min(batch_size, len(labels)) // devices) * devices
  batches = [jax.device_put({"image": images[idx], "label": labels[idx], "mask": mask},
                            parallel.batch_sharded(mesh))
             for idx, mask in data.eval_batches(len(labels), chunk)]

  def summed(points, coefficients, batch):
    variables = jax.tree.map(
        lambda *leaves: sum(coefficients[k] * leaf for k, leaf in enumerate(leaves)), *points)
    state = steps.TrainState(step=0, params=variables["params"],
                             batch_stats=variables["batch_stats"], opt_state=(), seed=0)
    return eval_step(state, batch)

  # One call at a time, each adding into the totals (row p at index p). On CPU host devices,
  # XLA runs every device's part of a call on one thread pool, as large as the machine has
  # cores, and a part that reaches the call's all-reduce holds its thread until every device's
  # part gets there. With calls in flight the devices drift apart, the held threads starve the
  # parts they wait for, and after 40 s XLA aborts the process (seen on 2 cores with 2 devices,
  # calls independent or chained). A training step cannot drift: every device waits for the
  # previous step's all-reduced state.
  @jax.jit
  def accumulate(points, coefficients, batch, totals, p):
    return jax.tree.map(lambda t, m: t.at[p].add(m), totals,
                        summed(points, coefficients, batch))

  def evaluate(points, coefficients):
    points = jax.device_put(tuple(points), parallel.replicated(mesh))
    coefficients = np.asarray(coefficients, np.float32)
    shapes = jax.eval_shape(summed, points, coefficients[0], batches[0])
    totals = jax.device_put(
        jax.tree.map(lambda s: np.zeros(len(coefficients), s.dtype), shapes),
        parallel.replicated(mesh))
    tenth = max(len(coefficients) // 10, 1)
    for p, row in enumerate(coefficients):
      for batch in batches:
        totals = jax.block_until_ready(accumulate(points, row, batch, totals, np.int32(p)))
      if len(coefficients) >= PROGRESS_POINTS and (p + 1) % tenth == 0:
        print(f"[landscape] {p + 1:,} of {len(coefficients):,} networks evaluated", flush=True)
    totals = parallel.to_host(totals)
    return totals["loss"] / totals["count"], totals["errors"] / totals["count"]
  return evaluate


def loss_line(evaluate, initial: Variables, final: Variables, alphas: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray]:
  """(loss, error), float [G] each, of (1 - a) * initial + a * final for a in `alphas`."""
  return evaluate((initial, final), np.stack([1 - alphas, alphas], axis=1))


def loss_surface(evaluate, center: Variables, directions: Sequence[Variables],
                 coords: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(loss, error), float [G, G] each: [i, j] at center + coords[j] * d1 + coords[i] * d2."""
  y, x = np.meshgrid(coords, coords, indexing="ij")
  rows = np.stack([np.ones(x.size), x.ravel(), y.ravel()], axis=1)
  loss, error = evaluate((center, *directions), rows)
  return loss.reshape(x.shape), error.reshape(x.shape)


# --- How convex a surface is. ---

def surface_curvatures(surface_loss: np.ndarray, coords: np.ndarray
                       ) -> tuple[np.ndarray, np.ndarray]:
  """(lowest, highest), float64 [G-2, G-2] each: the principal curvatures of the surface at its
  interior points, the eigenvalues of its 2x2 Hessian by central differences on the grid
  (exact for a quadratic). [i, j] is the surface's point [i + 1, j + 1]."""
  loss = np.asarray(surface_loss, np.float64)
  h = float(coords[1] - coords[0])
  centre = loss[1:-1, 1:-1]
  xx = (loss[1:-1, 2:] - 2 * centre + loss[1:-1, :-2]) / h**2
  yy = (loss[2:, 1:-1] - 2 * centre + loss[:-2, 1:-1]) / h**2
  xy = (loss[2:, 2:] - loss[2:, :-2] - loss[:-2, 2:] + loss[:-2, :-2]) / (4 * h**2)
  mean, spread = (xx + yy) / 2, np.hypot((xx - yy) / 2, xy)
  return mean - spread, mean + spread


def convexity_numbers(surface_loss: np.ndarray, coords: np.ndarray, radius: float) -> dict:
  """Numbers that say how convex a surface is within `radius` of its centre (the checkpoint).

  Li et al. (2018, Figure 7) map |λmin / λmax| of the Hessian over their surfaces: near 0 where
  the loss is locally convex, large where it curves down as much as up. Here the same ratio of
  the surface's own principal curvatures (`surface_curvatures`), over its interior grid points
  within `radius`:
    nonconvex_share: the share of those points where the surface curves down along some
      direction (lowest < 0);
    median_ratio: the median of |lowest| / highest, counting a point convex in every direction
      as 0 and one concave in every direction as inf;
    loss_rise: the mean loss on the grid points at distance `radius` (within half a grid step)
      minus the loss at the centre: how steep the surroundings are.
  """
  step, span = float(coords[1] - coords[0]), float(coords[-1])
  if not step <= radius <= span - step:
    raise ValueError(f"radius must be from one grid step to the span less one ({step:g} to "
                     f"{span - step:g}) for the grid's interior to reach it; got {radius}")
  lowest, highest = surface_curvatures(surface_loss, coords)
  y, x = np.meshgrid(coords[1:-1], coords[1:-1], indexing="ij")
  inside = np.hypot(x, y) <= radius + 1e-9
  low, high = lowest[inside], highest[inside]
  with np.errstate(divide="ignore", invalid="ignore"):
    ratio = np.where(low >= 0, 0.0, np.where(high > 0, -low / high, np.inf))
  full_y, full_x = np.meshgrid(coords, coords, indexing="ij")
  ring = np.abs(np.hypot(full_x, full_y) - radius) <= step / 2
  centre = surface_loss[len(coords) // 2, len(coords) // 2]
  return {"radius": radius, "points": int(inside.sum()),
          "nonconvex_share": float(np.mean(low < 0)), "median_ratio": float(np.median(ratio)),
          "loss_rise": float(np.mean(surface_loss[ring]) - centre)}


# --- One run. ---

def run_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a run recorded in its config.json, over today's defaults (for fields added since).

  Raises:
    NotARunError: `workdir` is not a run's directory.
  """
  if not os.path.isdir(workdir):
    raise NotARunError(f"workdir {workdir} does not exist")
  path = os.path.join(workdir, reporting.CONFIG_FILE)
  if not os.path.isfile(path):
    raise NotARunError(f"{workdir} is not a run's workdir: it has no "
                       f"{reporting.CONFIG_FILE} (python -m resnet_jax.main writes one)")
  config = config_lib.default_config()
  # Renamed fields, today's names.
  config.update(config_lib.upgrade_recorded(reporting.read_json(path, dict)))
  return config


def checkpoint_step(workdir: str, step: int | None = None) -> int:
  """The run's checkpoint to use: `step`, or its newest.

  Raises:
    checkpoints.MissingCheckpointError: the run has no checkpoint, or none at `step` (the
      message lists them).
  """
  directory = os.path.join(workdir, "checkpoints")
  found = checkpoints.steps(directory)
  if not found:
    raise checkpoints.MissingCheckpointError(f"no checkpoint in {directory}: train the run first")
  if step is None:
    return found[0]
  if step not in found:
    raise checkpoints.MissingCheckpointError(
        f"no checkpoint at step {step} in {directory}; it has steps {', '.join(map(str, found))}")
  return step


def check_settings(config: ml_collections.ConfigDict, *, grid: int, span: float,
                   examples: int) -> data.DatasetInfo:
  """Checks the settings against the run's dataset (reading its metadata only); returns its info.

  Raises:
    config.ConfigError: listing every setting that is out of range, or a streamed dataset.
    data.DatasetNotPreparedError: the run's dataset is not prepared here.
  """
  if config.dataset.name in data.STREAMED:
    raise config_lib.ConfigError(f"the landscape is evaluated on datasets held in memory; "
                                 f"{config.dataset.name} is streamed")
  info = data.dataset_info(config.dataset)
  errors = []
  if not 2 <= grid <= MAX_GRID:
    errors.append(f"--grid must be in [2, {MAX_GRID}] (points per axis; the surface has "
                  f"grid² of them); got {grid}")
  if not (math.isfinite(span) and span > 0):
    errors.append(f"--span must be finite and > 0; got {span}")
  if not 1 <= examples <= info.num_train:
    errors.append(f"--examples must be in [1, {info.num_train:,}] (the train split "
                  f"{config.dataset.train_split!r} of {info.name}); got {examples}")
  if errors:
    raise config_lib.ConfigError("invalid landscape settings:\n  " + "\n  ".join(errors))
  return info


def compute_landscape(workdir: str, *, step: int | None = None, grid: int = 41,
                      span: float = 1.0, examples: int = 1000, seed: int = 0) -> Landscape:
  """The line and surface of one run at checkpoint `step` (default: its newest).

  Checks everything first (raising the errors of run_config, checkpoint_step and
  check_settings, and checkpoints.DamagedCheckpointError for a checkpoint that fails its
  checks), then
  builds the run's model and initial state from its config.
  """
  config = run_config(workdir)
  checkpoint_step(workdir, step)
  info = check_settings(config, grid=grid, span=span, examples=examples)
  start = time.time()
  # The newest when it is read: a run still training may have deleted the one checked above.
  step, state = checkpoints.read_state(os.path.join(workdir, "checkpoints"), step)
  final = {"params": state["params"], "batch_stats": state["batch_stats"]}
  mesh = parallel.make_mesh()
  # Only the model and the initial state are needed: no batch source.
  trainer = trainer_lib.build(config, info, mesh, source=sources.DeviceBatches(iter(()), {}))
  init = trainer.init_state()
  initial = {"params": init.params, "batch_stats": init.batch_stats}
  images, labels = data.load_split(config.dataset, config.dataset.train_split)
  evaluate = make_evaluator(trainer.eval_step, images[:examples], labels[:examples], mesh=mesh,
                            batch_size=config.eval_batch_size)
  alphas = line_coordinates(grid)
  line_loss, line_error = loss_line(evaluate, initial, final, alphas)
  coords = surface_coordinates(grid, span)
  surface_loss, surface_error = loss_surface(evaluate, final, random_directions(seed, final),
                                             coords)
  width = "" if config.model.width == 1 else f", width {config.model.width:g}"
  network = (f"{'ResNet' if config.model.skip else 'plain'}-"
             f"{config.model.name.removeprefix('resnet')}{width}")
  return Landscape(network=network, step=step, examples=examples, span=span, seed=seed,
                   alphas=alphas, line_loss=line_loss, line_error=line_error, coords=coords,
                   surface_loss=surface_loss, surface_error=surface_error,
                   seconds=round(time.time() - start, 3))


# --- Command line. ---

_WORKDIR = flags.DEFINE_string("workdir", None, "The run whose landscape to compute.")
_COMPARE = flags.DEFINE_list("compare", [], "Runs to draw side by side: RUN_A,RUN_B[,...]; "
                             "the flags below compute those without a landscape.npz.")
_OUT = flags.DEFINE_string("out", None, "Where --compare writes compare.png; default: the last "
                           "run's landscape/.")
_STEP = flags.DEFINE_integer("step", None, "The checkpoint; default: the newest.")
_GRID = flags.DEFINE_integer("grid", 41, "Points along the line and along each surface axis.")
_SPAN = flags.DEFINE_float("span", 1.0, "The surface covers [-span, span] along each direction.")
_EXAMPLES = flags.DEFINE_integer("examples", 1000, "The first N training images evaluate each "
                                 "network.")
_SEED = flags.DEFINE_integer("seed", 0, "Draws the surface's two directions.")


def main(argv: list[str]) -> int:
  del argv  # cli.run refuses positional arguments.
  if bool(_WORKDIR.value) == bool(_COMPARE.value):
    raise config_lib.ConfigError("give either --workdir=RUN (one run's landscape) or "
                                 "--compare=RUN_A,RUN_B (runs side by side)")
  if _WORKDIR.value:
    _check(_WORKDIR.value)
    _landscape_of(_WORKDIR.value)
    return cli.EXIT_OK
  runs = _COMPARE.value
  if len(runs) < 2:
    raise config_lib.ConfigError(f"--compare needs at least two runs; got {runs}")
  stored = {run: os.path.join(run, LANDSCAPE_DIR, DATA_FILE) for run in runs}
  # Every run is checked before any is computed.
  missing = [run for run in runs if not os.path.isfile(stored[run])]
  for run in missing:
    _check(run)
  computed = {run: _landscape_of(run) for run in missing}
  landscapes = [computed[run] if run in computed else Landscape.load(stored[run])
                for run in runs]
  if len({(item.examples, item.span) for item in landscapes}) > 1:
    reporting.warn("the runs' landscapes were computed on different --examples or --span; "
                   "their scales differ")
  out_dir = _OUT.value or os.path.join(runs[-1], LANDSCAPE_DIR)
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, COMPARE_FILE)
  plots.plot_landscape_comparison(landscapes, path)
  print(f"wrote {path}")
  return cli.EXIT_OK


def _check(workdir: str) -> None:
  """Checks a run and the flags against it (raising what compute_landscape would) before any
  work."""
  config = run_config(workdir)
  checkpoint_step(workdir, _STEP.value)
  check_settings(config, grid=_GRID.value, span=_SPAN.value, examples=_EXAMPLES.value)


def _landscape_of(workdir: str) -> Landscape:
  """Computes and writes one run's landscape; prints what it wrote."""
  landscape = compute_landscape(workdir, step=_STEP.value, grid=_GRID.value, span=_SPAN.value,
                                examples=_EXAMPLES.value, seed=_SEED.value)
  out_dir = os.path.join(workdir, LANDSCAPE_DIR)
  os.makedirs(out_dir, exist_ok=True)
  landscape.save(os.path.join(out_dir, DATA_FILE))
  paths = [os.path.join(out_dir, DATA_FILE), *plots.write_landscape_figures(landscape, out_dir)]
  for path in paths:
    print(f"wrote {path}")
  print(f"{landscape.network}: loss {landscape.line_loss[0]:.4g} initial, "
        f"{landscape.line_loss[-1]:.4g} at step {landscape.step}; surface loss "
        f"{np.nanmin(landscape.surface_loss):.4g} to {np.nanmax(landscape.surface_loss):.4g} "
        f"within {landscape.span:g} of it; {landscape.seconds:.0f} s")
  return landscape


if __name__ == "__main__":
  cli.run(main)
