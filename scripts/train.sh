#!/usr/bin/env bash
# The main job, offline: set up, prepare Fashion-MNIST (once), train a ResNet-20 on it and print
# its test accuracy. Extra flags go to resnet_jax.main, e.g. --config.num_steps=100.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m resnet_jax.prepare fashion_mnist
exec .venv/bin/python -m resnet_jax.main --config=configs/fashion_mnist.py \
  --workdir="${WORKDIR:-runs/fashion_mnist}" "$@"
