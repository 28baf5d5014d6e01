"""Gradient flow: per-block gradient norm and activation RMS, plain vs residual nets.

Command (after a sweep whose points set config.diagnostics_every > 0, e.g.
configs/sweeps/ablation_fashion_mnist.py, has run):
  python experiments/plot_gradients.py --workdir=runs/ablation_fashion_mnist
Writes gradient_flow.png into --out_dir (default: the workdir): gradient norm (top) and
activation RMS (bottom) against block index, input side on the left, at the first diagnostics
record (step 0, the initialisation) and at the last; plain nets dashed, residual nets solid, one
colour per depth. Expect the plain nets' gradient norms to drift with block index while the
residual nets' stay level. Seconds; reads only the workdir.
"""

from __future__ import annotations

import os

from absl import app, flags

from resnet_jax import plots, sweep

_WORKDIR = flags.DEFINE_string("workdir", None, "The sweep's workdir (holds sweep.json).",
                               required=True)
_OUT_DIR = flags.DEFINE_string("out_dir", None, "Where to write; default: the workdir.")


def main(argv: list[str]) -> None:
  del argv
  points = sweep.expand(sweep.load_sweep(_WORKDIR.value))
  out_dir = _OUT_DIR.value or _WORKDIR.value
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, plots.GRADIENT_FLOW_FILE)
  plots.plot_gradient_flow(sweep.load_runs(points, _WORKDIR.value), path)
  print(f"wrote {path}")


if __name__ == "__main__":
  app.run(main)
