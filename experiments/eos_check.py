"""Is the measured sharpness the curvature gradient descent feels? A check of one checkpoint of a
full-batch run (configs/sweeps/edge_of_stability_fashion_mnist.py).

Usage (after the sweep; any of its points, any checkpoint it kept):
  python experiments/eos_check.py --workdir=runs/edge_of_stability_fashion_mnist/lr=0.1,skip=false \
      [--step=N] [--iters=20] [--out=FILE.jsonl]

On the run's whole training subset, in train mode (BN over all of it: the very loss the run
descends, its batch being the subset), at checkpoint N:
  - the top eigenpair (λ, v) of the Hessian by power iteration (`--iters` Hessian-vector
    products), with its residual |Hv - λv| / λ; beside it the run's own sharpness event at N
    (Lanczos on a sample of `sharpness_batch_size` drawn with replacement);
  - the gradient g and its share along v, (g·v)² / |g|²;
  - the loss along v over the span of one gradient-descent step's component there,
    L(θ - c η (g·v) v) for c in C_STEPS, beside what the quadratic model with curvature λ predicts.
    When ηλ > 2, the model says that a step of c = 1 raises the loss along v
    (by η (g·v)² (ηλ/2 - 1)): GD is unstable in that direction;
  - the curvature over one step's length along v, (L(θ + s v) + L(θ - s v) - 2 L(θ)) / s² with
    s = η |g·v|: the curvature the step meets, which equals λ where the loss is quadratic.
Writes one JSON line (stdout, and --out if given).
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
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from resnet_jax import checkpoints, curvature, data, landscape, parallel, reporting, sources
from resnet_jax import trainer as trainer_lib
from experiments.stream_bench import cpu_model

C_STEPS = (-1.0, -0.5, 0.5, 1.0, 2.0)


def top_eigenpair(hvp, start: jax.Array, iters: int) -> tuple[float, jax.Array, float]:
  """Power iteration: (λ = v·Hv, v, |Hv - λv| / |λ|) after `iters` products, v of unit norm. It
  finds the eigenvalue largest in size: the top one once the negative end is small (these runs
  after their first steps, curvature.negative_end_dominates)."""
  v = start / jnp.linalg.norm(start)
  for _ in range(iters):
    hv = hvp(v)
    v = hv / jnp.linalg.norm(hv)
  hv = hvp(v)
  lam = float(jnp.vdot(v, hv))
  return lam, v, float(jnp.linalg.norm(hv - lam * v)) / abs(lam)


def along_direction(loss_at, x: jax.Array, g: jax.Array, v: jax.Array, lam: float,
                    lr: float) -> dict:
  """The loss along unit direction v around x, over the span of a gradient step's component
  there (g the gradient at x, λ the curvature along v at x): the gradient's share along v,
  L(x - c η (g·v) v) - L(x) beside the quadratic model for each c in C_STEPS, and the second
  difference over one step's length s = η |g·v|, (L(x + s v) + L(x - s v) - 2 L(x)) / s²."""
  gv = float(jnp.vdot(g, v))
  base = float(loss_at(x))
  along = []
  for c in C_STEPS:
    t = -c * lr * gv
    along.append({"c": c, "loss_change": float(loss_at(x + t * v)) - base,
                  "quadratic": gv * t + lam * t * t / 2})
  step_length = lr * abs(gv)
  ahead, behind = (float(loss_at(x + sign * step_length * v)) for sign in (1, -1))
  return {"loss": base, "grad_norm": float(jnp.linalg.norm(g)),
          "grad_share_along_top": gv * gv / float(jnp.vdot(g, g)), "along_top": along,
          "curvature_over_one_step": (ahead + behind - 2 * base) / step_length ** 2}


def check(workdir: str, step: int | None, iters: int) -> dict:
  """The module docstring's measurements of run `workdir` at checkpoint `step` (its newest)."""
  config = landscape.run_config(workdir)
  step = landscape.checkpoint_step(workdir, step)
  info = data.dataset_info(config.dataset)
  step, state = checkpoints.read_state(os.path.join(workdir, "checkpoints"), step)
  mesh = parallel.make_mesh()
  trainer = trainer_lib.build(config, info, mesh, source=sources.DeviceBatches(iter(()), {}))
  images, labels = data.load_split(config.dataset, config.dataset.train_split)
  batch = jax.device_put({"image": images, "label": labels}, parallel.batch_sharded(mesh))
  params = jax.device_put(state["params"], parallel.replicated(mesh))
  flat, unravel = ravel_pytree(params)
  batch_stats = jax.device_put(state["batch_stats"], parallel.replicated(mesh))

  # Every array an argument, none a closed-over constant: XLA would fold the batch's
  # convolutions into the program at compile time.
  def loss(p, batch):
    return trainer_lib.batch_loss(p, batch_stats, batch, model=trainer.model,
                                  mean=tuple(info.mean), std=tuple(info.std),
                                  dtype=jnp.dtype(config.model.dtype))

  loss_at = jax.jit(lambda x, b: loss(unravel(x), b))
  grad_at = jax.jit(lambda x, b: ravel_pytree(jax.grad(loss)(unravel(x), b))[0])
  hvp_at = jax.jit(lambda p, b, v: curvature.hessian_vector_product(lambda q: loss(q, b), p, v))

  start = time.time()
  lam, v, residual = top_eigenpair(
      lambda u: hvp_at(params, batch, u),
      jax.random.normal(jax.random.key(0), flat.shape, flat.dtype), iters)
  lr = float(config.optimizer.lr)
  along = along_direction(lambda x: loss_at(x, batch), flat, grad_at(flat, batch), v, lam, lr)
  recorded = [e for e in reporting.read_metrics(workdir)
              if e["event"] == reporting.SHARPNESS and e["step"] == step]
  return {
      "run": os.path.basename(os.path.normpath(workdir)), "step": step, "lr": lr,
      "threshold": 2 / lr, "examples": int(len(labels)), "power_iters": iters,
      "top_eigenvalue": lam, "relative_residual": residual,
      "recorded_sharpness": recorded[0]["sharpness"] if recorded else None,
      "recorded_on": config.sharpness_batch_size, **along,
      "seconds": round(time.time() - start, 1),
      "cpu_model": cpu_model(), "cores": os.cpu_count(), "devices": jax.device_count(),
  }


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True, help="The run to check.")
  parser.add_argument("--step", type=int, default=None,
                      help="The checkpoint; default: the newest.")
  parser.add_argument("--iters", type=int, default=20,
                      help="Power iterations (Hessian-vector products).")
  parser.add_argument("--out", default=None, help="A JSON-lines file to append the result to.")
  args = parser.parse_args()
  if args.iters < 1:
    parser.error(f"--iters must be at least 1; got {args.iters}")
  try:
    result = check(args.workdir, args.step, args.iters)
  except (landscape.NotARunError, checkpoints.MissingCheckpointError,
          checkpoints.DamagedCheckpointError, data.DatasetNotPreparedError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  line = json.dumps(result)
  print(line)
  if args.out:
    with open(args.out, "a") as f:
      f.write(line + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
