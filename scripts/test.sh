#!/usr/bin/env bash
# The test suite, from a fresh machine: set up, then pytest on every core (pytest-xdist; how the
# modules are shared among the workers is in tests/conftest.py). Extra arguments go to pytest:
# -m "not slow" is the quick tier, PYTEST_WORKERS=0 runs in this process alone.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q -n "${PYTEST_WORKERS:-auto}" --dist loadgroup "$@"
