"""Packed sweeps: runs trained together as one population end where their separate runs end.

A population vmaps one step over its members' stacked states; a convolution over several kernels
becomes a grouped one, summed in another order, so members match their separate runs up to
rounding, measured against the size of an SGD update. A population interrupted and resumed ends
bitwise where the uninterrupted one ends (one machine).
"""

from __future__ import annotations

import os
import signal

import jax
import numpy as np
import pytest

from resnet_jax import checkpoints, data, parallel, population, reporting, train
from resnet_jax import config as config_lib
from resnet_jax import trainer as trainer_lib
from tests.test_train import tiny_config

NUM_STEPS = 4
# Three learning rates and seeds; the last diverges at once (BN squares weights of 1e19).
POINTS = ({"optimizer.lr": 0.05, "seed": 0}, {"optimizer.lr": 0.1, "seed": 1},
          {"optimizer.lr": 1e20, "seed": 2})


def _configs(data_dir: str) -> list:
  return [tiny_config(data_dir, num_steps=NUM_STEPS, log_every=2, checkpoint_every=2,
                      keep_checkpoints=5, **{"model.width": 0.25, **point}) for point in POINTS]


def _state(workdir: str, step: int | None = None):
  directory = os.path.join(workdir, "checkpoints")
  return checkpoints.read_state(directory) if step is None else (step, checkpoints.read_state(
      directory, step)[1])


def _max_diff(a, b) -> float:
  return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.fixture(scope="module")
def separate(prepared_data_dir, tmp_path_factory) -> list[str]:
  root = tmp_path_factory.mktemp("separate")
  workdirs = [str(root / str(i)) for i in range(len(POINTS))]
  for config, workdir in zip(_configs(prepared_data_dir), workdirs):
    train.train_and_evaluate(config, workdir)
  return workdirs


@pytest.fixture(scope="module")
def packed(prepared_data_dir, tmp_path_factory) -> list[str]:
  root = tmp_path_factory.mktemp("packed")
  workdirs = [str(root / str(i)) for i in range(len(POINTS))]
  train.train_population(_configs(prepared_data_dir), workdirs)
  return workdirs


@pytest.mark.slow
@pytest.mark.numerics
def test_each_member_ends_where_its_separate_run_ends(separate, packed):
  for i, (alone, together) in enumerate(zip(separate, packed)):
    a, b = reporting.Summary.read(alone), reporting.Summary.read(together)
    assert a.status == b.status == ("diverged" if i == 2 else "completed")
    if i == 2:
      # Where a diverging run's loss first overflows depends on its rounding (here at step 2
      # or 4): both stop at the log point that sees it, checkpointing nothing from there on.
      assert b.step in (2, 4) and "NaN/Inf at or before step" in b.message
      assert all(s < b.step for s in checkpoints.steps(os.path.join(together, "checkpoints")))
      continue
    events = lambda w: [(e["event"], e["step"]) for e in reporting.read_metrics(w)]
    assert events(alone) == events(together)
    (step, state_a), (_, state_b) = _state(alone), _state(together)
    assert step == NUM_STEPS
    # Rounding apart, the same run. The yardstick is one SGD update (the mean of the last two);
    # rounding differences grow through ReLUs whose input flips sign, 5-20x a step here: 1e-5 of
    # an update after the first step, ~1e-3 after four (2-core AMD EPYC).
    (_, half_a), (_, half_b) = _state(alone, 2), _state(together, 2)
    update = _max_diff(state_a["params"], half_a["params"]) / 2
    assert _max_diff(half_a["params"], half_b["params"]) < 1e-2 * update
    assert _max_diff(state_a["params"], state_b["params"]) < 0.1 * update
    np.testing.assert_allclose(a.train_loss, b.train_loss, rtol=1e-3)


@pytest.mark.slow
def test_killed_population_resumes_exactly(prepared_data_dir, packed, tmp_path, monkeypatch):
  workdirs = [str(tmp_path / str(i)) for i in range(len(POINTS))]
  real_save = checkpoints.Saver.save
  sent = []

  def save_then_interrupt(self, step, *args, **kwargs):
    real_save(self, step, *args, **kwargs)
    if step == 2 and not sent:  # Once: a second Ctrl-C means stop at once.
      sent.append(step)
      os.kill(os.getpid(), signal.SIGINT)

  monkeypatch.setattr(checkpoints.Saver, "save", save_then_interrupt)
  stopped = train.train_population(_configs(prepared_data_dir), workdirs)
  assert [s.status for s in stopped[:2]] == ["preempted", "preempted"]
  assert stopped[0].step == 3  # The call after the signal, logged and checkpointed.
  monkeypatch.setattr(checkpoints.Saver, "save", real_save)
  resumed = train.train_population(_configs(prepared_data_dir), workdirs)
  assert [s.status for s in resumed[:2]] == ["completed", "completed"]
  assert resumed[2].status == "diverged"
  for straight, again in zip(packed[:2], workdirs[:2]):
    jax.tree.map(np.testing.assert_array_equal, _state(straight)[1], _state(again)[1])


def test_configs_that_need_other_programs_are_refused_with_the_reason(prepared_data_dir,
                                                                      tmp_path):
  configs = _configs(prepared_data_dir)[:2]
  configs[1].model.width = 0.5
  configs[0].diagnostics_every = 0
  with pytest.raises(config_lib.ConfigError, match="differ in more than seed, optimizer.lr"):
    train.train_population(configs, [str(tmp_path / "a"), str(tmp_path / "b")])
  assert not (tmp_path / "a").exists()


@pytest.mark.slow
def test_a_frozen_member_keeps_its_state_while_the_others_train(prepared_data_dir):
  configs = [train.prepare(c)[0] for c in _configs(prepared_data_dir)]
  trainer = trainer_lib.build(configs[0], data.dataset_info(configs[0].dataset),
                              parallel.make_mesh(), population=len(configs))
  active = parallel.put_replicated(np.array([True, False, True]), trainer.mesh)
  state = trainer.stack([trainer.for_config(c).init_state() for c in configs])
  before = jax.device_get(state)
  totals = trainer.zero_totals()
  for _ in range(2):
    state, totals, _ = trainer.train(state, totals, active=active)
  state, totals = jax.device_get((state, totals))
  assert list(state.step) == [2, 0, 2] and list(totals["count"]) == [2 * 16, 0, 2 * 16]
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a[1], b[1]), state, before)
  assert _max_diff(population.member(state.params, 0), population.member(before.params, 0)) > 0
