"""The persistent compilation cache of a workdir: a resumed run loads its programs."""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.test_faults import REPO, cli_args


@pytest.mark.slow
def test_resumed_run_compiles_nothing_new(prepared_data_dir, tmp_path):
  workdir = str(tmp_path / "run")
  cache = os.path.join(workdir, "xla_cache")
  # Without the test session's shared cache, as a run from the command line; compiled as the
  # session compiles (conftest.py), both runs alike. Every program is written, however quickly
  # it compiled: which ones pass compilation.MIN_COMPILE_TIME_S depends on the machine's load.
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"

  def run(num_steps: int) -> list[str]:
    subprocess.run(cli_args(prepared_data_dir, workdir, num_steps=num_steps,
                            **{"model.width": 0.25}),
                   cwd=REPO, env=env, check=True, capture_output=True)
    return sorted(os.listdir(cache))

  first = run(4)
  assert {"jit_train", "jit_evaluate", "jit_create_state"} <= {
      name.partition("-")[0] for name in first}
  assert run(8) == first  # Resumed at step 4 with a constant schedule: the same programs.
