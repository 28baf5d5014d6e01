"""The lr x depth trainability map, offline and sized for a 2-core CPU: plain nets and ResNets of
depth 20 and 56 on Fashion-MNIST at quarter width (stages of 4/8/16 filters), peak lr 0.03 to 3.

Command (prepare once: python -m resnet_jax.prepare fashion_mnist):
  JAX_COMPILATION_CACHE_DIR=runs/xla_cache python -m resnet_jax.sweep \
      --config=configs/sweeps/lr_depth_fashion_mnist.py --workdir=runs/lr_depth_fashion_mnist \
      --pack=processes:2
  python -m resnet_jax.sweep --workdir=runs/lr_depth_fashion_mnist --plot
20 runs of configs/fashion_mnist.py:width=0.25, two at a time: 300 steps at batch 32 (0.16
epochs), 20 warmup steps to the peak lr and cosine decay, momentum 0.9, weight decay 1e-4. A
run's final training error is that of its last 100 steps; test error on the first 1000 test
images (the map needs none, and the whole test set costs a depth-56 run half a minute more). The
lr is an input of the compiled step, so with the persistent compilation cache each depth and skip
compiles once: the lr varies slowest, and the first four points compile for the other sixteen.
--plot writes trainability_map.png (final training error per lr and depth, plain nets beside
ResNets on one colour scale) and error_curves.png.
Expect (measured on the 2-core CPU while other jobs shared it, load average 5.7: 24.8 minutes,
1,800 CPU-seconds; a first run under the same load took 28.3 minutes, with the same errors to the
digit; idle, an estimated 10-15 minutes), final training error (%):
  peak lr       0.03   0.1   0.3     1     3
  plain-20      36.2  32.0  44.1  54.7  89.8
  plain-56      65.9  75.2  68.1  85.4  89.9
  ResNet-20     28.0  26.4  34.1  36.3  58.9
  ResNet-56     32.8  30.1  38.3  64.6  89.9
Plain-56 trains at no lr (66% at best, where ResNet-56 reaches 30%): too large an lr is not its
problem. At depth 20 the ResNet takes larger lrs: at lr 1 plain-20 is 23 points above its best
and ResNet-20 10; at lr 3 plain-20 is at chance (90%) and ResNet-20 still trains (59%). The
largest lr that trains falls with depth for both: ResNet-56 is at chance at lr 3 too. No run
diverged: with BN and weight decay too large an lr leaves a net at chance, its loss finite.
"""

import ml_collections

from resnet_jax import points


def get_config():
  return ml_collections.ConfigDict({
      "base": "configs/fashion_mnist.py:width=0.25",
      "fixed": {"batch_size": 32, "num_steps": 300, "log_every": 100, "eval_every": 0,
                "checkpoint_every": 0, "progress_bar": False,
                "dataset": {"eval_split": "test[:1000]"}},
      "points": points.product(points.axis("lr", [0.03, 0.1, 0.3, 1.0, 3.0]),
                               points.axis("depth", [20, 56]),
                               points.axis("skip", [False, True])),
  })
