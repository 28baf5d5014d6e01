"""He et al. 2016's depth ablation (Figure 6), offline and sized for a 2-core CPU: plain nets and
ResNets of depth 20 and 56 on Fashion-MNIST.

Command (prepare once: python -m resnet_jax.prepare fashion_mnist):
  python -m resnet_jax.sweep --config=configs/sweeps/ablation_fashion_mnist.py \
      --workdir=runs/ablation_fashion_mnist
  python -m resnet_jax.sweep --workdir=runs/ablation_fashion_mnist --plot
4 runs of configs/fashion_mnist.py: TRIAL.
"""

import ml_collections

from resnet_jax import sweep


def get_config():
  return ml_collections.ConfigDict({
      "base": "configs/fashion_mnist.py",
      "fixed": {"batch_size": 32, "num_steps": 1200, "log_every": 100, "eval_every": 0,
                "checkpoint_every": 400, "diagnostics_every": 200,
                "optimizer": {"lr": 0.05, "warmup_steps": 50}},
      "points": sweep.product(sweep.axis("depth", [20, 56]), sweep.axis("skip", [False, True])),
  })
