#!/usr/bin/env bash
# The tests whose tolerances rest on float32 rounding (pytest -m numerics), run again with XLA's
# CPU code limited to two narrower vector units than this machine's: each sums in other orders,
# one more rounding a tolerance must survive. A bound that fails here was tuned to one machine.
# Extra arguments go to pytest. Expects scripts/setup.sh to have run (scripts/test.sh does).
set -euo pipefail
cd "$(dirname "$0")/.."
if grep -qw avx512f /proc/cpuinfo; then isas="AVX2 SSE4_2"; else isas="AVX SSE4_2"; fi
for isa in $isas; do
  echo "numerics under --xla_cpu_max_isa=$isa"
  XLA_FLAGS="${XLA_FLAGS:-} --xla_cpu_max_isa=$isa" \
    .venv/bin/python -m pytest -q -m numerics -n "${PYTEST_WORKERS:-auto}" --dist loadgroup "$@"
done
