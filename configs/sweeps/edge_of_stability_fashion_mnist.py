"""The edge of stability (Cohen et al., ICLR 2021), offline and sized for a 2-core CPU: full-batch
gradient descent on 2,000 Fashion-MNIST training images, a quarter-width ResNet-20 and its plain
twin, at two learning rates, the top Hessian eigenvalue recorded beside 2/lr.

Commands (prepare once: python -m resnet_jax.prepare fashion_mnist; or part 4 of
bash experiments/why_residual.sh OUT_DIR):
  python -m resnet_jax.sweep --config=configs/sweeps/edge_of_stability_fashion_mnist.py \
      --workdir=runs/edge_of_stability_fashion_mnist --pack=processes:2
  python -m resnet_jax.sweep --workdir=runs/edge_of_stability_fashion_mnist --plot
  python experiments/eos_check.py --workdir=runs/edge_of_stability_fashion_mnist/lr=0.1,skip=false
Each point is gradient descent as Cohen et al. run it: the batch is the whole training subset
(train[:2000], BN's statistics over all of it), no augmentation, no momentum, no weight decay, a
constant lr, no warm-up. --plot writes edge_of_stability.png: per lr, the training loss and the
sharpness against iterations, the threshold 2/lr drawn across. experiments/eos_check.py measures,
at a checkpoint, the top eigenvalue on the whole subset and the curvature one step meets along
its eigenvector.
Arguments: steps=N (default STEPS), every=k (sharpness every k steps, default EVERY),
examples=N (the subset, default EXAMPLES; Cohen et al. took 5,000), measure=M (the sharpness
batch, default MEASURE), iters=I (Lanczos products, default ITERS), lr=X (that lr alone).
The sharpness is measured on a fixed 500 of the subset (drawn with replacement), BN over them:
a Hessian-vector product costs about four training steps' worth of images, so on all 2,000 each
measurement would cost as much as 40 steps.
Time (2-core AMD EPYC, two points at a time, nothing else running): 5.3 s a step, 30 s a
measurement; 18.5 minutes a pair, 37 for the four runs. 5,000 images would take 2.5 times that.
Expect (experiments/results/edge_of_stability_fashion_mnist): ResNet-20 sharpens to 2/lr by step
12 at lr 0.1 and step 4 at lr 0.2, then its sharpness hovers above it (27-53 against 20, 12-43
against 10) while the loss keeps falling, at lr 0.2 not monotonically; plain-20's goes to 140-190
at lr 0.1. At steps 54-60 the curvature one step meets along the top eigenvector (eos_check.py)
is 0.3-1.4 times 2/lr in every run (ResNet-20 at lr 0.1: 16.9-20.6 against 20), where the top
eigenvalue is 1.3-8 times 2/lr.
"""

import ml_collections

from resnet_jax import config as config_lib
from resnet_jax import points

STEPS = 60
EVERY = 3
EXAMPLES = 2_000
MEASURE = 500
ITERS = 10
LRS = [0.1, 0.2]
ARG_TYPES = {"steps": int, "every": int, "examples": int, "measure": int, "iters": int,
             "lr": float}


def get_config(arg=None):
  args = config_lib.parse_args(arg, ARG_TYPES)
  steps, every = args.get("steps", STEPS), args.get("every", EVERY)
  examples = args.get("examples", EXAMPLES)
  lrs = [args["lr"]] if "lr" in args else LRS
  return ml_collections.ConfigDict({
      "base": "configs/fashion_mnist.py:width=0.25",
      "fixed": {"batch_size": examples, "num_steps": steps, "log_every": 1, "eval_every": 0,
                "checkpoint_every": every, "progress_bar": False,
                "sharpness_every": every, "sharpness_batch_size": args.get("measure", MEASURE),
                "sharpness_iters": args.get("iters", ITERS),
                "dataset": {"train_split": f"train[:{examples}]", "eval_split": "test[:1000]",
                            "crop_padding": 0, "flip": False},
                "optimizer": {"momentum": 0.0, "weight_decay": 0.0, "schedule": "constant",
                              "warmup_steps": 0}},
      "points": points.product(points.axis("lr", lrs), points.axis("skip", [False, True])),
  })
