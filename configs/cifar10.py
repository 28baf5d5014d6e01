"""CIFAR-10 with the recipe of He et al. 2016, section 4.2.

Command (prepare once: python -m resnet_jax.prepare cifar10):
  python -m resnet_jax.main --config=configs/cifar10.py:depth=56 --workdir=runs/cifar10_r56
Arguments: depth=20|32|44|56|110|1202, skip=false (the plain twin), shortcut=A|B, dtype=bfloat16,
split=test|validation. split=test (the default) trains on the 50k training images and evaluates
on the 10k test images, as the paper's final results; split=validation trains on the first 45k
training images and evaluates on the last 5k, the paper's split for choosing hyper-parameters.
Batch 128, lr 0.1, momentum 0.9, weight decay 1e-4 (not on BN or biases), 64k steps, lr / 10 at
32k and 48k, 4-pixel pad + random crop + flip. ResNet-110 (and 1202) warm up at lr 0.01 for the
first 400 steps, as the paper does. Lengths are in steps under either split, as the paper's are
in iterations: 64k steps are 164 epochs of 50k and 182 of 45k.
Expect (paper, Table 6, test error): ResNet-20 8.75%, 32 7.51%, 44 7.17%, 56 6.97%, 110 6.43%;
plain nets get worse with depth (Figure 6). Hours on one GPU, far too slow for a 2-core CPU.
All of Table 6 with several seeds: configs/sweeps/table6_cifar10.py.
"""

from resnet_jax import config as config_lib

# The model arguments every config takes, plus this file's own.
ARG_TYPES = {**config_lib.ARG_TYPES, "split": str}
# (train_split, eval_split) per `split` argument, as TFDS split strings. CIFAR-10's "train" holds
# 50,000 images: the two slices of `validation` are disjoint and together cover it.
SPLITS = {"test": ("train", "test"),
          "validation": ("train[:45000]", "train[45000:50000]")}


def get_config(arg=None):
  args = config_lib.parse_args(arg, ARG_TYPES)
  split = args.pop("split", "test")
  if split not in SPLITS:
    raise config_lib.ConfigError(f"config argument split must be one of {', '.join(SPLITS)}; "
                                 f"got {split!r}")
  config = config_lib.default_config()
  config.dataset.name = "cifar10"
  config.dataset.train_split, config.dataset.eval_split = SPLITS[split]
  config.dataset.crop_padding = 4
  config.dataset.flip = True
  config.batch_size = 128
  config.num_steps = 64_000
  config.optimizer.lr = 0.1
  config.optimizer.momentum = 0.9
  config.optimizer.weight_decay = 1e-4
  config.optimizer.schedule = "step"
  config.optimizer.boundaries = (32_000, 48_000)
  config.optimizer.decay_factor = 0.1
  config.log_every = 200
  config.eval_every = 2_000
  config.checkpoint_every = 2_000
  config = config_lib.apply_model_args(config, args)
  if config.model.name in ("resnet110", "resnet1202"):
    config.optimizer.warmup = "constant"
    config.optimizer.warmup_steps = 400
    config.optimizer.warmup_factor = 0.1
  return config
