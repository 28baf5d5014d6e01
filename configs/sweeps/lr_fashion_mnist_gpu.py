"""A learning-rate sweep of configs/fashion_mnist_gpu.py: 8 peak lrs, log-spaced, on one GPU.

Commands (prepare once: python -m resnet_jax.prepare fashion_mnist):
  python -m resnet_jax.sweep --config=configs/sweeps/lr_fashion_mnist_gpu.py \
      --workdir=runs/lr_fashion_mnist_gpu --pack=population:8
  python -m resnet_jax.sweep --workdir=runs/lr_fashion_mnist_gpu --plot
and every packing mode side by side (issue #11; experiments/gpu_figures.sh part 8 runs this,
cut to 360 s):
  python experiments/pack_bench.py --sweep=configs/sweeps/lr_fashion_mnist_gpu.py \
      --modes=population:8,processes:4,off,separate --mode_timeout=150
8 runs of configs/fashion_mnist_gpu.py (ResNet-20, batch 256, bfloat16, Nesterov momentum 0.9,
weight decay 5e-4, 200 warmup steps and cosine decay, 15 epochs of 234 steps: 3510) that differ
only in the lr, 0.0125 to 1.6 per 128 images (the config's base_batch_size; peak 0.025 to 3.2 at
batch 256), a factor of 2 apart; the config's own lr, 0.1, is the fourth. The lr is an input of
the compiled step, so the points share one program: `--pack=population:8` trains all eight as
one vmapped program after one compilation; `--pack=off` runs them one after another, compiling
once; `--pack=processes:N` runs N at once, each with 0.9/N of the GPU's memory.
Expect: one point alone trained in 9.3 s on one H100 (96,700 img/s) plus 15 s of compilation,
so eight points one process each would take about 195 s (an estimate); the goal is the whole
sweep in 60 s or less and 3x one point's img/s across points. Not yet measured on a GPU: no mode
of this sweep has run on one.
"""

import ml_collections

from resnet_jax import points


def get_config():
  return ml_collections.ConfigDict({
      "base": "configs/fashion_mnist_gpu.py",
      "points": points.axis("lr", [0.0125, 0.025, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6]),
  })
