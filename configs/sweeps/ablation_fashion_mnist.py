"""He et al. 2016's depth ablation (Figure 6), offline and sized for a 2-core CPU: plain nets and
ResNets of depth 20 and 56 on Fashion-MNIST.

Command (prepare once: python -m resnet_jax.prepare fashion_mnist):
  python -m resnet_jax.sweep --config=configs/sweeps/ablation_fashion_mnist.py \
      --workdir=runs/ablation_fashion_mnist --parallel=2
  python -m resnet_jax.sweep --workdir=runs/ablation_fashion_mnist --plot
4 runs of configs/fashion_mnist.py, two at a time (on 2 cores that is about twice as fast as one
at a time: one process leaves the second core mostly idle): 1200 steps at batch 32 (0.64 epochs),
lr 0.05 with 50 warmup steps and cosine decay, test error at the end, gradient and activation
norms every 200 steps. --plot writes error_curves.png, ablation_table.md and gradient_flow.png.
Expect (measured on the 2-core CPU while other jobs ran, 15.5 minutes): final training error
plain-20 18.7%, plain-56 29.6%, ResNet-20 15.6%, ResNet-56 20.6% (test 17.0, 26.4, 14.2, 19.3%):
depth costs the plain net 11 points and the residual net 5. ResNet-56 does not yet beat ResNet-20
this early in training. At initialisation the plain-56's gradient norm at the stem is about 4000x
its norm at the head (plain-20: 11x, ResNet-56: 1.1x).
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
