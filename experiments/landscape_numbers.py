"""How convex is a run's landscape? Li et al.'s contrast (a chaotic plain net against a convex
ResNet) in numbers, for runs whose landscape `python -m resnet_jax.landscape` has computed.

Usage (configs/sweeps/trained_landscapes_fashion_mnist.py's top comment has the whole recipe):
  python experiments/landscape_numbers.py --workdir=RUN [--workdir=RUN2 ...] [--radius=0.5]
      [--iters=20] [--out=FILE.jsonl]

For each run, on what its landscape was computed from (its checkpoint, the first `examples`
images of its training split, BN in inference mode: the very function the surface draws):
  - from RUN/landscape/landscape.npz, `landscape.convexity_numbers` at each --radius: the share
    of the surface's points within the radius where it curves down along some direction, the
    median |lowest / highest| of its principal curvatures there (Li et al.'s Figure 7 maps this
    ratio for the whole Hessian), and the mean loss rise at that distance;
  - at the centre, the whole Hessian's two ends by Lanczos (--iters Hessian-vector products,
    curvature.lanczos): the top and the lowest Ritz values, their `ritz_bounds`, and
    |lowest / top|. The Ritz values approximate the ends from inside: the top from below, the
    lowest from above (a negative lowest is a true negative curvature of at least that size);
  - the same at the four surface points --hessian_radius from the centre along the surface's
    two directions (Li et al. map |lowest / top| of the whole Hessian over their surfaces; a
    Lanczos run a point makes a whole map too costly here). 0 leaves them out.
Writes one JSON line per run (stdout, and --out if given).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

# Run as a script, the repository root is not on sys.path.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top
import numpy as np
from jax.flatten_util import ravel_pytree

from resnet_jax import checkpoints, curvature, data, landscape, parallel, sources, steps
from resnet_jax import trainer as trainer_lib
from experiments.stream_bench import cpu_model


def centre_hessian_ends(workdir: str, stored: landscape.Landscape, iters: int,
                        offsets: tuple[tuple[float, float], ...] = ()) -> dict:
  """Lanczos on the Hessian of the landscape's loss at its centre: top and lowest Ritz values;
  and under "around", the same at each surface point (x, y) of `offsets`, x and y along the
  surface's two directions."""
  config = landscape.run_config(workdir)
  info = data.dataset_info(config.dataset)
  _, state = checkpoints.read_state(os.path.join(workdir, "checkpoints"), stored.step)
  images, labels = (x[:stored.examples]
                    for x in data.load_split(config.dataset, config.dataset.train_split))
  mesh = parallel.make_mesh()
  if len(labels) % mesh.devices.size:  # Shard evenly; the landscape's own chunks pad instead.
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), (parallel.DATA_AXIS,))
  trainer = trainer_lib.build(config, info, mesh, source=sources.DeviceBatches(iter(()), {}))
  batch = jax.device_put({"image": images, "label": labels, "mask": np.ones(len(labels), bool)},
                         parallel.batch_sharded(mesh))
  params = jax.device_put(state["params"], parallel.replicated(mesh))
  batch_stats = jax.device_put(state["batch_stats"], parallel.replicated(mesh))
  flat, unravel = ravel_pytree(params)

  # The run's own evaluation (as the surface's), as a mean. Every array an argument, none a
  # closed-over constant (XLA would fold the convolutions over the images into the program at
  # compile time).
  def loss(p, stats, batch):
    state = steps.TrainState(step=0, params=p, batch_stats=stats, opt_state=(), seed=0)
    totals = trainer.eval_step(state, batch)
    return totals["loss"] / totals["count"]

  hvp = jax.jit(lambda x, s, b, v: curvature.hessian_vector_product(
      lambda q: loss(q, s, b), unravel(x), v))
  loss_at = jax.jit(lambda x, s, b: loss(unravel(x), s, b))

  def ends(x) -> dict:
    alphas, betas, residual = curvature.lanczos(
        lambda v: hvp(x, batch_stats, batch, v),
        jax.random.normal(jax.random.key(0), flat.shape, flat.dtype), iters)
    values, bounds = curvature.ritz_bounds(alphas, betas, residual)
    return {"loss": float(loss_at(x, batch_stats, batch)),
            "top": float(values[0]), "top_bound": float(bounds[0]),
            "lowest": float(values[-1]), "lowest_bound": float(bounds[-1]),
            "lowest_over_top": abs(float(values[-1]) / float(values[0]))}

  start = time.time()
  centre = ends(flat)
  around = []
  if offsets:
    # The surface's own directions (BN statistics held, as on the surface).
    directions = [ravel_pytree(d["params"])[0] for d in landscape.random_directions(
        stored.seed, {"params": state["params"], "batch_stats": state["batch_stats"]})]
    for x, y in offsets:
      around.append({"x": x, "y": y, **ends(flat + x * directions[0] + y * directions[1])})
  return {"centre_loss": centre.pop("loss"), "lanczos_iters": iters, **centre,
          "around": around, "hessian_seconds": round(time.time() - start, 1)}


def numbers(workdir: str, radii: list[float], iters: int, hessian_radius: float) -> dict:
  path = os.path.join(workdir, landscape.LANDSCAPE_DIR, landscape.DATA_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} does not exist: compute it first with "
                            f"python -m resnet_jax.landscape --workdir={workdir}")
  stored = landscape.Landscape.load(path)
  r = hessian_radius
  offsets = ((r, 0.0), (-r, 0.0), (0.0, r), (0.0, -r)) if r else ()
  surface = [landscape.convexity_numbers(stored.surface_loss, stored.coords, r) for r in radii]
  return {"run": os.path.basename(os.path.normpath(workdir)), "network": stored.network,
          "step": stored.step, "examples": stored.examples, "span": stored.span,
          "grid": len(stored.coords),
          "train_error_at_centre": float(stored.surface_error[len(stored.coords) // 2,
                                                              len(stored.coords) // 2]),
          "surface": surface, **centre_hessian_ends(workdir, stored, iters, offsets),
          "cpu_model": cpu_model(), "cores": os.cpu_count(), "devices": jax.device_count()}


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", action="append", required=True,
                      help="A run with a computed landscape; repeat for more.")
  parser.add_argument("--radius", type=float, action="append", default=None,
                      help="Distance from the centre, in the surface's units (default 0.25 "
                      "and 0.5); repeat for more.")
  parser.add_argument("--iters", type=int, default=20,
                      help="Lanczos steps (Hessian-vector products) at the centre.")
  parser.add_argument("--hessian_radius", type=float, default=0.25,
                      help="Also the whole Hessian's ends at the 4 surface points this far from "
                      "the centre along each direction; 0: the centre alone.")
  parser.add_argument("--out", default=None, help="A JSON-lines file to append the results to.")
  args = parser.parse_args()
  if args.iters < 2:
    parser.error(f"--iters must be at least 2 (a top and a lowest Ritz value); got {args.iters}")
  radii = args.radius or [0.25, 0.5]
  try:
    for workdir in args.workdir:
      line = json.dumps(numbers(workdir, radii, args.iters, args.hessian_radius))
      print(line, flush=True)
      if args.out:
        with open(args.out, "a") as f:
          f.write(line + "\n")
  except (landscape.NotARunError, checkpoints.MissingCheckpointError,
          checkpoints.DamagedCheckpointError, data.DatasetNotPreparedError, FileNotFoundError,
          ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
