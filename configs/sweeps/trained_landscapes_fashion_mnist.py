"""Landscapes of trained nets (Li et al., NeurIPS 2018): plain-56 and ResNet-56 at a quarter width,
trained to a low training loss on 1,000 Fashion-MNIST images, their surfaces side by side, and how
convex each is, in numbers.

Commands (prepare once: python -m resnet_jax.prepare fashion_mnist; or part 5 of
bash experiments/why_residual.sh OUT_DIR):
  python -m resnet_jax.sweep --config=configs/sweeps/trained_landscapes_fashion_mnist.py \
      --workdir=runs/trained_landscapes_fashion_mnist --pack=processes:2
  W=runs/trained_landscapes_fashion_mnist
  python -m resnet_jax.landscape --workdir="$W/skip=false" --grid=21 --examples=256
  python -m resnet_jax.landscape --workdir="$W/skip=true" --grid=21 --examples=256
  python -m resnet_jax.landscape --out="$W" --compare="$W/skip=false,$W/skip=true"
  python experiments/landscape_numbers.py --workdir="$W/skip=false" --workdir="$W/skip=true" \
      --out="$W/landscape_numbers.jsonl"
Each run is trained to fit a subset, as Li et al.'s nets fit CIFAR-10's training set:
train[:1000], no augmentation, STEPS steps at batch 64 (128 epochs), lr 0.1 with 20 warm-up steps
and cosine decay, momentum 0.9, weight decay 5e-4. The surfaces are on 256 of those images,
21 x 21 on [-1, 1]^2 along two orthogonal filter-normalised directions; landscape_numbers.py says
how convex each is within radius 0.25 and 0.5 and takes the whole Hessian's two ends at the centre
and at four points 0.25 from it.
Arguments: steps=N (default STEPS).
Time (2-core AMD EPYC, nothing else running): the two runs 11 minutes, two at a time; each
landscape 105-110 s; landscape_numbers.py 5.7 minutes (11 Lanczos runs); about 21 minutes in all.
Expect (experiments/results/trained_landscapes_fashion_mnist/): ResNet-56 memorises the 1,000
images (training loss 1e-4, 0% training error); plain-56 gets to 20.8% training error (loss 0.47;
after 500 steps it was at 39%). ResNet-56's surface is a round bowl, convex at every point within
0.25 of the centre and at 80 of 81 within 0.5; plain-56's curves down along some direction at 71%
and 77% of them (median |lowest / highest| curvature 0.46 and 0.27), and its loss rises 50 and
30 times as much at those distances. At the centre the whole Hessian's top eigenvalue is 735 for
plain-56 and 0.22 for ResNet-56; its lowest is small beside it for both (-1.5 and -0.0007).
0.25 from the centre, |lowest / top| of the whole Hessian is 0.05-0.37 for plain-56 and
0.016-0.022 for ResNet-56. Plain-56 fits the images with steps=6000 (0.6% training error; 17
minutes alone) and keeps its rough surface (0.04-0.12; README).
"""

import ml_collections

from resnet_jax import config as config_lib
from resnet_jax import points

STEPS = 2000
ARG_TYPES = {"steps": int}


def get_config(arg=None):
  args = config_lib.parse_args(arg, ARG_TYPES)
  return ml_collections.ConfigDict({
      "base": "configs/fashion_mnist.py:width=0.25,depth=56",
      "fixed": {"batch_size": 64, "num_steps": args.get("steps", STEPS), "log_every": 50,
                "eval_every": 0, "checkpoint_every": 100, "progress_bar": False,
                "dataset": {"train_split": "train[:1000]", "eval_split": "test[:1000]",
                            "crop_padding": 0, "flip": False}},
      "points": points.axis("skip", [False, True]),
  })
