#!/usr/bin/env bash
# Idempotent set-up on a fresh Debian machine: the offline Fashion-MNIST files, a virtual
# environment in .venv, and resnet_jax with its test extras. Sourced by train.sh and test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -d /usr/share/datasets/fashion-mnist ]; then
  sudo_=""; [ "$(id -u)" = 0 ] || sudo_="sudo"
  $sudo_ apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 ||
    { $sudo_ apt-get update -qq && $sudo_ apt-get install -y -q dataset-fashion-mnist >/dev/null; }
fi
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
fi
# Re-install only when pyproject.toml changed since the last install.
stamp=.venv/.resnet_jax-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q -e '.[test]'
  touch "$stamp"
fi
