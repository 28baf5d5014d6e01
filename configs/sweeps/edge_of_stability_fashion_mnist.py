"""The edge of stability (Cohen et al., ICLR 2021), offline and sized for a 2-core CPU: full-batch
gradient descent on 5,000 Fashion-MNIST training images, a quarter-width ResNet-20 and its plain
twin, at two learning rates, the top Hessian eigenvalue recorded beside 2/lr.

Commands (prepare once: python -m resnet_jax.prepare fashion_mnist; or part 4 of
bash experiments/why_residual.sh OUT_DIR):
  python -m resnet_jax.sweep --config=configs/sweeps/edge_of_stability_fashion_mnist.py \
      --workdir=runs/edge_of_stability_fashion_mnist
  python -m resnet_jax.sweep --workdir=runs/edge_of_stability_fashion_mnist --plot
Each point is gradient descent as Cohen et al. run it: the batch is the whole training subset
(train[:5000], BN's statistics over all of it), no augmentation, no momentum, no weight decay, a
constant lr, no warm-up. --plot writes edge_of_stability.png: per lr, the training loss and the
sharpness against iterations, the threshold 2/lr drawn across.
Arguments: steps=N (default STEPS), every=k (sharpness every k steps, default EVERY).
The sharpness is measured on a fixed 1,000 of the 5,000 (drawn with replacement), BN over them:
a Hessian-vector product on all 5,000 costs as much as five training steps.
Time (2-core AMD EPYC, idle): 8.8 s a step on 5,000 images, a measurement (20 Hessian-vector
products on 1,000 images) about 60 s: about an hour for the four runs, two at a time.
Expect: the full runs have not been made. A 40-step probe at lr 0.1 saw the sharpness pass 2/lr
early (plain-20 90 on all 5,000 examples at step 10, ResNet-20 31 at step 20) while the loss
still fell: README, "Why residual nets train".
"""

import ml_collections

from resnet_jax import config as config_lib
from resnet_jax import points

STEPS = 100
EVERY = 10
LRS = [0.1, 0.2]
ARG_TYPES = {"steps": int, "every": int}


def get_config(arg=None):
  args = config_lib.parse_args(arg, ARG_TYPES)
  steps, every = args.get("steps", STEPS), args.get("every", EVERY)
  return ml_collections.ConfigDict({
      "base": "configs/fashion_mnist.py:width=0.25",
      "fixed": {"batch_size": 5_000, "num_steps": steps, "log_every": 1, "eval_every": 0,
                "checkpoint_every": every, "progress_bar": False,
                "sharpness_every": every, "sharpness_batch_size": 1_000,
                "sharpness_iters": 20,
                "dataset": {"train_split": "train[:5000]", "eval_split": "test[:1000]",
                            "crop_padding": 0, "flip": False},
                "optimizer": {"momentum": 0.0, "weight_decay": 0.0, "schedule": "constant",
                              "warmup_steps": 0}},
      "points": points.product(points.axis("lr", LRS), points.axis("skip", [False, True])),
  })
