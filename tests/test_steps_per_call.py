"""Several training steps per compiled call (config.steps_per_call, trainer.py): the same run.

On accelerators a call loops over up to K steps inside one program, the count an input. Each
step in that loop does the same arithmetic whatever the count, so K steps in one call are
bitwise K calls of one step, and a run's chunking into calls (which logs, evaluations,
checkpoints and a resume decide) never changes where it ends. The loop is a program of its own,
rounded differently from the one-step program CPUs use: those two agree to well within one SGD
update. On CPU the loop is slow (XLA's convolutions lose their fast path in loops), so the
networks here are tiny.
"""

from __future__ import annotations

import os
import shutil

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from resnet_jax import checkpoints, config as config_lib, parallel, reporting, sources, train
from resnet_jax import trainer as trainer_lib
from tests.test_train import SYNTHETIC_INFO, TINY_MODEL, tiny_config


def _trainer(steps_per_call: int, batches: list[dict]) -> trainer_lib.Trainer:
  config = config_lib.default_config()
  config.update_from_flattened_dict(TINY_MODEL)
  config.steps_per_call = steps_per_call
  mesh = parallel.make_mesh()
  on_devices = [jax.device_put(b, NamedSharding(mesh, PartitionSpec("data"))) for b in batches]
  source = sources.DeviceBatches(iter(on_devices), sources.spec_of(on_devices[0]))
  return trainer_lib.build(config, SYNTHETIC_INFO, mesh, source)


def _batches(count: int) -> list[dict]:
  rng = np.random.default_rng(0)
  return [{"image": rng.integers(0, 256, (8, 28, 28, 1), dtype=np.uint8),
           "label": rng.integers(0, 10, (8,), dtype=np.int32)} for _ in range(count)]


def _host(state, totals):
  return jax.device_get((state.params, state.batch_stats, state.opt_state, totals))


def _max_diff(a, b) -> float:
  return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.slow
@pytest.mark.numerics
def test_k_steps_in_one_call_are_bitwise_k_calls_of_one_and_near_the_one_step_program():
  batches = _batches(3)
  runs = {}
  for name, counts in (("one call", [3]), ("three calls", [1, 1, 1]), ("two calls", [2, 1])):
    trainer = _trainer(3, batches)
    assert trainer.steps_per_call == 3 and trainer.loop_program is not None
    state, totals = trainer.init_state(), trainer.zero_totals()
    for count in counts:
      state, totals, diagnostics = trainer.train(state, totals, steps=count)
      assert diagnostics == {}
    assert int(state.step) == 3
    runs[name] = _host(state, totals)
  jax.tree.map(np.testing.assert_array_equal, runs["one call"], runs["three calls"])
  jax.tree.map(np.testing.assert_array_equal, runs["one call"], runs["two calls"])
  assert float(runs["one call"][3]["count"]) == 3 * 8  # Every step's metrics were summed.

  # The one-step program CPUs use (steps_per_call 1) rounds differently; the yardstick is the
  # last SGD update's size, which rounding should not approach.
  plain = _trainer(1, batches)
  assert plain.loop_program is None
  state, totals = plain.init_state(), plain.zero_totals()
  params = []
  for _ in batches:
    state, totals, _ = plain.train(state, totals)
    params.append(jax.device_get(state.params))
  last_update = _max_diff(params[-1], params[-2])
  assert _max_diff(runs["one call"][0], params[-1]) < 1e-3 * last_update
  np.testing.assert_allclose(float(runs["one call"][3]["loss"]),
                             float(jax.device_get(totals["loss"])), rtol=1e-5)


def test_automatic_steps_per_call_is_one_on_cpu_and_twenty_elsewhere():
  config = config_lib.default_config()
  assert trainer_lib.resolve_steps_per_call(config, "cpu") == 1
  assert trainer_lib.resolve_steps_per_call(config, "gpu") == 20
  assert trainer_lib.resolve_steps_per_call(config, "tpu") == 20
  config.steps_per_call = 4
  assert trainer_lib.resolve_steps_per_call(config, "cpu") == 4


def test_calls_end_where_the_loop_has_work():
  config = config_lib.default_config()
  config.update(num_steps=12, log_every=5, eval_every=0, checkpoint_every=7)
  starts, step = [], 0
  while step < config.num_steps:
    starts.append(step)
    step += train.call_length(config, 4, step, first_step=0)
  assert starts == [0, 4, 5, 7, 10]
  # Diagnostics every 3 steps: calls end on multiples of 3 (that step runs alone with them).
  config.update(diagnostics_every=3, checkpoint_every=0, log_every=100)
  assert train.call_length(config, 4, 1, first_step=0) == 2
  assert train.call_length(config, 4, 3, first_step=0) == 3


@pytest.mark.slow
def test_run_of_several_steps_per_call_resumes_bitwise_from_a_step_inside_a_call(
    prepared_data_dir, tmp_path):
  overrides = {"num_steps": 12, "log_every": 5, "checkpoint_every": 0, "steps_per_call": 4,
               "keep_checkpoints": 5}
  straight = str(tmp_path / "straight")  # Calls 0-4, 4-5, 5-9, 9-10, 10-12.
  assert train.train_and_evaluate(tiny_config(prepared_data_dir, **overrides),
                                  straight).status == "completed"

  # The same run checkpointing at step 7, which falls inside the straight run's call 5-9, is
  # sent back there (its later checkpoint and summary lost) and resumed: calls 7-10, 10-12.
  resumed = str(tmp_path / "resumed")
  config = tiny_config(prepared_data_dir, **{**overrides, "checkpoint_every": 7})
  assert train.train_and_evaluate(config, resumed).status == "completed"
  checkpoint_dir = os.path.join(resumed, "checkpoints")
  assert checkpoints.steps(checkpoint_dir) == [12, 7]
  shutil.rmtree(os.path.join(checkpoint_dir, "12"))
  os.remove(os.path.join(resumed, reporting.SUMMARY_FILE))
  assert train.train_and_evaluate(config, resumed).status == "completed"

  (step_a, a), (step_b, b) = (checkpoints.read_state(os.path.join(w, "checkpoints"))
                              for w in (straight, resumed))
  assert step_a == step_b == 12
  jax.tree.map(np.testing.assert_array_equal, a, b)
  # Logs at the same steps; the last window (steps 11-12) is whole in both runs.
  logged = lambda w: [(e["step"], e["loss"]) for e in reporting.read_metrics(w)
                      if e["event"] == reporting.TRAIN]
  assert [s for s, _ in logged(straight)] == [s for s, _ in logged(resumed)] == [5, 10, 12]
  assert logged(straight)[-1] == logged(resumed)[-1]
