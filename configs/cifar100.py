"""CIFAR-100 with the CIFAR-10 recipe of He et al. 2016 (configs/cifar10.py), 100 classes.

Command (prepare once: python -m resnet_jax.prepare cifar100):
  python -m resnet_jax.main --config=configs/cifar100.py:depth=56 --workdir=runs/cifar100_r56
Arguments as configs/cifar10.py.
Expect: about 30% test error for ResNet-56 and 27% for ResNet-110 (figures other groups report
for this recipe; the paper gives none for CIFAR-100). Hours on one GPU.
"""

from configs import cifar10


def get_config(arg=None):
  config = cifar10.get_config(arg)
  config.dataset.name = "cifar100"
  return config
