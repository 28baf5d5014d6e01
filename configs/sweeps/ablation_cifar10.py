"""He et al. 2016, Figure 6 and Table 6: plain nets against ResNets on CIFAR-10, depths 20-110.

Command (prepare once: python -m resnet_jax.prepare cifar10):
  python -m resnet_jax.sweep --config=configs/sweeps/ablation_cifar10.py \
      --workdir=runs/ablation_cifar10 --pack=processes:4 --devices=0,1,2,3
  python -m resnet_jax.sweep --workdir=runs/ablation_cifar10 --plot
or one point per task of a SLURM array (see resnet_jax/sweep.py). `--plot` writes
error_curves.png (Figure 6), ablation_table.md (beside Table 6) and gradient_flow.png.
10 runs of configs/cifar10.py, the paper's protocol: batch 128, lr 0.1, momentum 0.9, weight
decay 1e-4, 64k steps, lr / 10 at 32k and 48k; ResNet-110 warm-starts at lr 0.01 for its first
400 steps (configs/cifar10.py derives that from depth=110). Gradient and activation norms every
2000 steps.
Expect (paper): ResNet test error 8.75, 7.51, 7.17, 6.97, 6.43% at depths 20, 32, 44, 56, 110;
plain nets the other way round, plain-56 with higher training and test error than plain-20.
Hours per run on one GPU; far too slow for a CPU.
"""

import ml_collections

from resnet_jax import points


def get_config():
  return ml_collections.ConfigDict({
      "base": "configs/cifar10.py",
      "fixed": {"diagnostics_every": 2000},
      "points": points.product(points.axis("depth", [20, 32, 44, 56, 110]),
                               points.axis("skip", [False, True])),
  })
