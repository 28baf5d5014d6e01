"""He et al. 2016's depth ablation (Figure 6), offline and sized for a 2-core CPU: plain nets and
ResNets of depth 20 and 56 on Fashion-MNIST, at half width (stages of 8/16/32 filters).

Command (prepare once: python -m resnet_jax.prepare fashion_mnist):
  python -m resnet_jax.sweep --config=configs/sweeps/ablation_fashion_mnist.py \
      --workdir=runs/ablation_fashion_mnist --pack=processes:2
  python -m resnet_jax.sweep --workdir=runs/ablation_fashion_mnist --plot
4 runs of configs/fashion_mnist.py:width=0.5, two at a time: 600 steps at batch 128 (1.3 epochs),
lr 0.1 with Nesterov momentum, 150 warmup steps and cosine decay; test error at the end,
gradient and activation norms every 200 steps. --plot writes error_curves.png,
ablation_table.md and gradient_flow.png.
Expect (measured on the idle 2-core CPU, 15.0 minutes), final training error:
plain-20 14.4%, plain-56 22.6%, ResNet-20 12.2%, ResNet-56 11.8% (test 14.0, 21.4, 11.9, 11.4%):
the deeper plain net trains worse, the deeper ResNet better, by a small margin this early
(seed 1: 13.3% vs 12.5%; 800 steps: 11.3% vs 10.6%). At initialisation the plain-56's gradient
norm at the stem is about 500x its norm at the head (plain-20: 2.5x; ResNets: 0.2-0.3x).
"""

import ml_collections

from resnet_jax import points


def get_config():
  return ml_collections.ConfigDict({
      "base": "configs/fashion_mnist.py:width=0.5",
      "fixed": {"batch_size": 128, "num_steps": 600, "log_every": 100, "eval_every": 0,
                "checkpoint_every": 300, "diagnostics_every": 200,
                "optimizer": {"lr": 0.1, "nesterov": True, "warmup_steps": 150}},
      "points": points.product(points.axis("depth", [20, 56]),
                               points.axis("skip", [False, True])),
  })
