"""The default run: a CIFAR ResNet-20 on Fashion-MNIST, sized for a 2-core CPU.

Command (prepares Fashion-MNIST from Debian's dataset-fashion-mnist first, offline):
  python -m resnet_jax.prepare fashion_mnist
  python -m resnet_jax.main --config=configs/fashion_mnist.py --workdir=runs/fashion_mnist
Arguments: configs/fashion_mnist.py:depth=56,skip=false,shortcut=B,width=2,dtype=bfloat16
Expect: about 85% test accuracy (84.75% measured) after 400 steps at batch 128 (0.85 epochs),
200 s of training on an idle 2-core CPU (about 265 img/s there).
"""

from resnet_jax import config as config_lib


def get_config(arg=None):
  config = config_lib.default_config()
  config.dataset.name = "fashion_mnist"
  config.dataset.crop_padding = 2  # 28x28 digits of clothing: a 2-pixel shift, plus flips.
  config.dataset.flip = True
  config.batch_size = 128
  config.num_steps = 400
  config.optimizer.lr = 0.1
  config.optimizer.schedule = "cosine"
  config.optimizer.warmup_steps = 20
  config.log_every = 50
  config.eval_every = 0
  config.checkpoint_every = 200
  return config_lib.apply_model_args(config, arg)
