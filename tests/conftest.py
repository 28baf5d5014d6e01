"""Gives every test process 8 CPU devices, so sharding tests run on a real (host) mesh.

XLA reads XLA_FLAGS once, when jax first initialises its backends; pytest imports this file
before any test module, hence before jax.
"""

import os

_DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count=8"
if _DEVICE_COUNT_FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_DEVICE_COUNT_FLAG}".strip()


import pytest  # pylint: disable=g-import-not-at-top


@pytest.fixture(scope="session")
def prepared_data_dir(tmp_path_factory) -> str:
  """A TFDS data_dir holding fashion_mnist, prepared once per session from Debian's files.

  Takes 10-20 s on two CPU cores; every test that needs real data shares it.
  """
  from resnet_jax import prepare  # pylint: disable=g-import-not-at-top
  if not os.path.isdir(prepare.DEBIAN_FASHION_MNIST_DIR):
    pytest.skip("needs Fashion-MNIST's files: apt-get install dataset-fashion-mnist")
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  prepare.prepare("fashion_mnist", data_dir=data_dir)
  return data_dir
