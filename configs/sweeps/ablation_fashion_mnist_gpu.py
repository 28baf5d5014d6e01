"""He et al. 2016's depth ablation (Figure 6) on Fashion-MNIST, sized for one GPU: plain nets and
ResNets of depth 110, 56 and 20 (the slowest first), 6 epochs each.

Command (prepare once: python -m resnet_jax.prepare fashion_mnist):
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.25 python -m resnet_jax.sweep \
      --config=configs/sweeps/ablation_fashion_mnist_gpu.py \
      --workdir=runs/ablation_fashion_mnist_gpu --pack=processes:3 --devices=0,0,0
  python -m resnet_jax.sweep --workdir=runs/ablation_fashion_mnist_gpu --plot
Three points share the GPU at once: a CIFAR ResNet at batch 128 is bound by kernel-launch
latency, so one process leaves most of an H100 idle. 6 epochs of 468 full batches of 128 (2808
steps), lr 0.1 with Nesterov momentum, 250 warmup steps and cosine decay; test error and
diagnostics every 500 steps.
Expect (measured on one H100 at 2812 steps, the earlier count 6 * 60,000 // 128; about 4 minutes
in all), final training error:
plain-20 6.1%, plain-56 11.6%, plain-110 64.5%; ResNet-20 6.5%, ResNet-56 5.7%, ResNet-110 7.0%
(test 7.7, 12.1, 64.1; 7.7, 7.2, 8.1%). The plain nets degrade with depth and plain-110 barely
trains; the ResNets stay within 1.3 points of each other, ResNet-56 best. At initialisation the
plain-110's gradient norm at the stem is 7e6 times its norm at the head (ResNet-110: 0.6).
"""

import ml_collections

from resnet_jax import points


def get_config():
  return ml_collections.ConfigDict({
      "base": "configs/fashion_mnist.py",
      "fixed": {"batch_size": 128, "num_epochs": 6, "log_every": 100, "eval_every": 500,
                "checkpoint_every": 0, "diagnostics_every": 500, "progress_bar": False,
                "optimizer": {"lr": 0.1, "warmup_steps": 250, "nesterov": True}},
      "points": points.product(points.axis("depth", [110, 56, 20]),
                               points.axis("skip", [False, True])),
  })
