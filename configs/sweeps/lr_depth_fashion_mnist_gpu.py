"""The lr x depth trainability map on Fashion-MNIST, sized for one GPU: plain nets and ResNets of
depth 110, 56 and 20 at peak lr 0.01 to 3, 2 epochs each.

Command (prepare once: python -m resnet_jax.prepare fashion_mnist):
  JAX_COMPILATION_CACHE_DIR=runs/xla_cache XLA_PYTHON_CLIENT_MEM_FRACTION=0.25 \
      python -m resnet_jax.sweep --config=configs/sweeps/lr_depth_fashion_mnist_gpu.py \
      --workdir=runs/lr_depth_fashion_mnist_gpu --pack=processes:3 --devices=0,0,0
  python -m resnet_jax.sweep --workdir=runs/lr_depth_fashion_mnist_gpu --plot
36 runs of configs/fashion_mnist.py (full width), three sharing the GPU: 2 epochs of 117 full
batches of 512 (234 steps), 20 warmup steps to the peak lr and cosine decay, momentum 0.9, weight
decay 1e-4; the final training error is that of the last 34 steps, the test error on the whole
test set. Batch 512 rather than the ablation's 128: a CIFAR ResNet's step is bound by
kernel-launch latency, so four times the images cost little more time. The lr is an input of the
compiled step, so with the persistent compilation cache each depth and skip compiles once. The lr
varies slowest and from the top: a sweep cut short (experiments/gpu_figures.sh caps it) loses the
lowest lrs, where every net trains slowly, not the highest, where plain nets stop training.
--plot writes trainability_map.png and error_curves.png.
Expect: not yet measured; sized from the ablation's step times at about 4 minutes on one H100.
"""

import ml_collections

from resnet_jax import points


def get_config():
  return ml_collections.ConfigDict({
      "base": "configs/fashion_mnist.py",
      "fixed": {"batch_size": 512, "num_epochs": 2, "log_every": 50, "eval_every": 0,
                "checkpoint_every": 0, "progress_bar": False},
      "points": points.product(points.axis("lr", [3.0, 1.0, 0.3, 0.1, 0.03, 0.01]),
                               points.axis("depth", [110, 56, 20]),
                               points.axis("skip", [False, True])),
  })
