"""Why residual nets train with SGD on Fashion-MNIST, sized for one GPU: plain nets and ResNets of
depth 110 and 20 (the slowest first), 4 epochs each, with every instrument on.

Commands (prepare once: python -m resnet_jax.prepare fashion_mnist):
  JAX_COMPILATION_CACHE_DIR=runs/xla_cache XLA_PYTHON_CLIENT_MEM_FRACTION=0.2 \
      python -m resnet_jax.sweep --config=configs/sweeps/why_residual_fashion_mnist_gpu.py \
      --workdir=runs/why_residual_fashion_mnist_gpu --pack=processes:4 --devices=0,0,0,0
  python -m resnet_jax.sweep --workdir=runs/why_residual_fashion_mnist_gpu --plot
  W=runs/why_residual_fashion_mnist_gpu
  python -m resnet_jax.landscape --workdir="$W/depth=110,skip=false"
      # and likewise for depth=110,skip=true, depth=20,skip=false and depth=20,skip=true
  python -m resnet_jax.landscape --out="$W/compare_depth=110" \
      --compare="\"$W/depth=110,skip=false\",\"$W/depth=110,skip=true\""   # and for depth 20
  (--compare takes a comma-separated list, read as CSV, and the points' names hold commas:
  hence each run in double quotes.)
4 runs of configs/fashion_mnist.py (full width), all four sharing the GPU: 4 epochs of 468 full
batches of 128 (1872 steps), lr 0.1 with Nesterov momentum, 250 warmup steps and cosine decay,
as in configs/sweeps/ablation_fashion_mnist_gpu.py. Recorded on the way: the Hessian's top
eigenvalue (Lanczos, 20 Hessian-vector products on a fixed batch of 128) every 100 steps beside
the stability threshold, the gradient noise scale every 25 steps, per-block gradient and
activation norms every 468 steps; test error every epoch. --plot writes error_curves.png,
ablation_table.md, gradient_flow.png, sharpness.png and noise_scale.png; each landscape (41x41
surface on 1000 training images) RUN/landscape/, each comparison compare.png.
Expect: not yet measured.
"""

import ml_collections

from resnet_jax import points


def get_config():
  return ml_collections.ConfigDict({
      "base": "configs/fashion_mnist.py",
      "fixed": {"batch_size": 128, "num_epochs": 4, "log_every": 100, "eval_every_epochs": 1,
                "checkpoint_every": 0, "progress_bar": False, "diagnostics_every": 468,
                "sharpness_every": 100, "noise_scale_every": 25,
                "optimizer": {"lr": 0.1, "warmup_steps": 250, "nesterov": True}},
      "points": points.product(points.axis("depth", [110, 20]),
                               points.axis("skip", [False, True])),
  })
