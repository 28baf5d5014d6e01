"""Batch size with the linear scaling rule: ResNet-20 on Fashion-MNIST at batch 32 to 256.

Command (prepare once: python -m resnet_jax.prepare fashion_mnist):
  python -m resnet_jax.sweep --config=configs/sweeps/batch_size_fashion_mnist.py \
      --workdir=runs/batch_size_fashion_mnist --pack=processes:2
Every point sees the same 51,200 images (0.85 epochs): num_steps is zipped with the batch size,
and the peak lr follows the batch, 0.1 per 128 images (optimizer.base_batch_size), so batch 32
trains at lr 0.025 and batch 256 at lr 0.2.
Expect (measured on the idle 2-core CPU, 11 minutes): test error 13.0% at batch 32, 14.5% at 64,
15.3% at 128 and 20.9% at 256 (training error 13.4, 15.0, 15.2, 21.2%). With this few images the
linear scaling rule does not hold: batch 256 gets 200 updates, 20 of them warmup, and falls behind.
"""

import ml_collections

from resnet_jax import points


def get_config():
  return ml_collections.ConfigDict({
      "base": "configs/fashion_mnist.py",
      "fixed": {"optimizer": {"lr": 0.1, "base_batch_size": 128}, "checkpoint_every": 0},
      "points": points.zipped(points.axis("batch_size", [32, 64, 128, 256]),
                              points.axis("num_steps", [1600, 800, 400, 200])),
  })
