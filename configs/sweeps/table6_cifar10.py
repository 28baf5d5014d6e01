"""He et al. 2016, Table 6 and Figure 6, with seeds: plain nets and ResNets of depth 20, 32, 44, 56
and 110 on CIFAR-10, 3 seeds each (30 runs), reported as mean ± std over the seeds.

Commands (prepare once: python -m resnet_jax.prepare cifar10):
  python -m resnet_jax.sweep --config=configs/sweeps/table6_cifar10.py \
      --workdir=runs/table6_cifar10 --pack=processes:4 --devices=0,1,2,3
or one point per task of a SLURM array (README, "Running on a cluster"):
  python -m resnet_jax.sweep --config=configs/sweeps/table6_cifar10.py \
      --workdir=runs/table6_cifar10 --launch=slurm --slurm_partition=gpu \
      --slurm_time=4:00:00 --slurm_gpus_per_task=1 --slurm_cpus_per_task=8 \
      --slurm_array_parallelism=30 --wait
(a point's time is unmeasured, so 4:00:00 is a placeholder: a task that reaches the limit
checkpoints and is requeued, at most 3 times, and resumes where it stopped); then, at any time:
  python -m resnet_jax.sweep --workdir=runs/table6_cifar10 --report
Arguments: seeds=N (default 3), split=test|validation (configs/cifar10.py's). With seeds=5, as the
paper's ResNet-110, the same command in the same workdir skips the 30 finished points and runs
seeds 3 and 4 (a point is named after its depth, skip and seed). split=validation trains on 45k
and evaluates on the other 5k, for choosing hyper-parameters: give it a workdir of its own.
Each point is configs/cifar10.py, the paper's protocol: batch 128, lr 0.1, momentum 0.9, weight
decay 1e-4, 64k steps, lr / 10 at 32k and 48k, ResNet-110 (and plain-110) warm-started at lr
0.01 for 400 steps; test error every 2,000 steps. --pack=processes:4 runs one point on each of 4
GPUs. A point's seeds differ only in an input of the compiled step, so --pack=population:3 could
train them as one vmapped program and --pack=off compiles each depth and skip once; no packing
mode is measured on a GPU yet (--pack=auto picks the measured best: off), and a SLURM array runs
one point a task.
--report prints one row per point, then the mean ± sample std of the final train and test
errors over each depth and skip's completed seeds, beside the paper's (resnet_jax/results.py).
Expect (paper, Table 6, test error): ResNet-20 8.75%, 32 7.51%, 44 7.17%, 56 6.97%, 110 6.43%
(best of 5 runs; mean 6.61 ± 0.16); the plain nets have no number in Table 6, and Figure 6 shows
them the other way round: error rising with depth, plain-110 over 60%.
Time: unmeasured (no run of this recipe on a GPU yet).
"""

import ml_collections

from configs import cifar10
from resnet_jax import config as config_lib
from resnet_jax import points

ARG_TYPES = {"seeds": int, "split": str}


def get_config(arg=None):
  args = config_lib.parse_args(arg, ARG_TYPES)
  seeds, split = args.get("seeds", 3), args.get("split", "test")
  if seeds < 1:
    raise config_lib.ConfigError(f"config argument seeds must be at least 1; got {seeds}")
  if split not in cifar10.SPLITS:  # Here, or every point would say so.
    raise config_lib.ConfigError(f"config argument split must be one of "
                                 f"{', '.join(cifar10.SPLITS)}; got {split!r}")
  base = f"configs/cifar10.py:split={split}"
  return ml_collections.ConfigDict({
      "base": base,
      "points": points.product(points.axis("depth", [20, 32, 44, 56, 110]),
                               points.axis("skip", [False, True]),
                               points.axis("seed", list(range(seeds)))),
  })
