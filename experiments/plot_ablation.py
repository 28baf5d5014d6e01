"""He et al. 2016, Figure 6 and Table 6, from a finished plain-vs-residual sweep.

Command (after the sweep, e.g. configs/sweeps/ablation_fashion_mnist.py, has run):
  python experiments/plot_ablation.py --workdir=runs/ablation_fashion_mnist
Writes into --out_dir (default: the workdir):
  error_curves.png   training (thin) and test (bold) error against iterations, plain nets dashed
                     on the left, residual nets solid on the right, one colour per depth;
  ablation_table.md  final errors per depth, plain vs residual, beside the paper's Table 6
                     when the dataset is CIFAR-10;
and prints the table. Seconds; reads only the workdir.
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
  runs = sweep.load_runs(points, _WORKDIR.value)
  dataset = points[0].config.dataset.name
  out_dir = _OUT_DIR.value or _WORKDIR.value
  os.makedirs(out_dir, exist_ok=True)
  plots.plot_error_curves(runs, os.path.join(out_dir, plots.ERROR_CURVES_FILE), title=dataset)
  table = plots.ablation_table(runs, dataset=dataset)
  with open(os.path.join(out_dir, plots.ABLATION_TABLE_FILE), "w") as f:
    f.write(table + "\n")
  print(table)


if __name__ == "__main__":
  app.run(main)
