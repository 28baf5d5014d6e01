"""ARCHITECTURE.md's "Adding things" holds: a model option, a config field with a role and an
instrument, each added in a test by touching only the places ARCHITECTURE.md names, work end to
end.

A model option: an entry of architectures.OPTIONS (its default and its check) and a field of
models.ResNet. A config field: its default in config.default_config(), its bound in
config.ZERO_OR_MORE and its Role in config.ROLES. An instrument: an entry of instruments.INSTRUMENTS, with its interval field (a
default and a Role) and its event kind. Nothing else is patched: validation, the model, the
trainer, the loop, checkpoints, packing and the calls of several steps must follow from those
entries alone.
"""

from __future__ import annotations

import os

import jax
import numpy as np
import optax
import pytest

from resnet_jax import (architectures, checkpoints, instruments, models, population, reporting,
                        train, trainer)
from resnet_jax import config as config_lib
from tests.test_train import tiny_config


def test_a_model_option_is_validated_built_into_the_net_and_compiled_in(monkeypatch):
  # The option: its default and its check, and a field of the network that uses it.
  monkeypatch.setitem(architectures.OPTIONS, "logit_scale", architectures.Option(
      1.0, check=lambda v, options: None if v > 0 else f"logit_scale must be > 0; got {v}"))

  resnet = models.ResNet

  class ScaledResNet(resnet):
    logit_scale: float = 1.0

    def __call__(self, x, train: bool):
      return resnet.__call__(self, x, train) * self.logit_scale

  monkeypatch.setattr(models, "ResNet", ScaledResNet)

  config = tiny_config("", **{"model.width": 0.25, "model.logit_scale": 2.0})
  config_lib.validate(config)
  with pytest.raises(config_lib.ConfigError, match=r"config.model.logit_scale must be > 0"):
    config_lib.validate(tiny_config("", **{"model.logit_scale": -1.0}))
  scaled = models.get_model(num_classes=10, **config.model)
  plain = models.get_model(num_classes=10, **{**config.model, "logit_scale": 1.0})
  assert isinstance(scaled, ScaledResNet) and scaled.logit_scale == 2.0
  x = np.linspace(-1, 1, 2 * 28 * 28).reshape(2, 28, 28, 1).astype(np.float32)
  variables = plain.init(jax.random.key(0), x, train=False)
  np.testing.assert_array_equal(scaled.apply(variables, x, train=False),
                                2 * plain.apply(variables, x, train=False))
  # Compiled into the programs and fixed for a run's life, as every model option.
  unscaled = tiny_config("", **{"model.width": 0.25})
  assert trainer.program_key(config) != trainer.program_key(unscaled)
  assert checkpoints.config_mismatches(unscaled.to_dict(), config) == [
      "model.logit_scale: checkpoint 1.0, config 2.0"]


def _add_field(monkeypatch, name: str, default, role: config_lib.Role) -> None:
  """What ARCHITECTURE.md says adding a config field takes: a default, its bounds and a role."""
  make_default = config_lib.default_config

  def default_config():
    config = make_default()
    config[name] = default
    return config

  monkeypatch.setattr(config_lib, "default_config", default_config)
  monkeypatch.setattr(config_lib, "ZERO_OR_MORE", (*config_lib.ZERO_OR_MORE, name))
  monkeypatch.setitem(config_lib.ROLES, name, role)


def test_a_field_with_a_role_is_shared_resumed_and_ends_calls_by_that_role(monkeypatch):
  _add_field(monkeypatch, "my_every", 0, config_lib.Role(bookkeeping=True, every=True))
  config = tiny_config("")
  other = tiny_config("", my_every=3)

  assert "my_every" in config_lib.fields("every") and "my_every" in config_lib.fields("resumable")
  with pytest.raises(config_lib.ConfigError, match="config.my_every must be an integer >= 0; "
                     "got -1"):
    config_lib.validate(tiny_config("", my_every=-1))  # Its bound.
  # Bookkeeping: the same compiled programs, and a checkpoint of one resumes the other.
  assert trainer.program_key(config) == trainer.program_key(other)
  assert checkpoints.config_mismatches(config.to_dict(), other) == []
  # An interval: a call of up to 10 steps ends at its multiples, and nowhere else when it is off.
  assert train.call_length(other, 10, step=0, first_step=0) == 2  # log_every=2 comes first.
  other.log_every = other.checkpoint_every = other.num_steps = 100
  assert [train.call_length(other, 10, step=s, first_step=0) for s in (0, 3, 7)] == [3, 3, 2]
  config.log_every = config.checkpoint_every = 100
  assert train.call_length(config, 10, step=0, first_step=0) == 4  # num_steps=4.
  # Not a step input: runs that differ in it do not share a population.
  assert population.packing_errors([config, other]) == [
      "its points differ in more than " + ", ".join(config_lib.fields("step_input"))]


def test_a_field_without_a_role_is_compiled_in_and_fixed_for_the_run(monkeypatch):
  _add_field(monkeypatch, "my_option", 1.0, config_lib.Role())
  config, other = tiny_config(""), tiny_config("", my_option=2.0)
  assert trainer.program_key(config) != trainer.program_key(other)
  assert checkpoints.config_mismatches(config.to_dict(), other) == [
      "my_option: checkpoint 1.0, config 2.0"]


def _param_norm_programs(config, source, loss, mesh):
  del config, source, loss, mesh
  return {"norm": jax.jit(optax.tree.norm)}


def _measure_param_norm(config, programs, source, state, lr):
  del config, source
  return {"param_norm": float(programs["norm"](state.params)), "lr_seen": lr}


@pytest.mark.slow
def test_an_instrument_added_to_the_table_records_at_its_steps_and_resumes(
    prepared_data_dir, tmp_path, monkeypatch):
  _add_field(monkeypatch, "param_norm_every", 0,
             config_lib.Role(resumable=True, every=True, alone=True))
  monkeypatch.setitem(instruments.INSTRUMENTS, "param_norm", instruments.Instrument(
      "param_norm_every", "param_norm", _param_norm_programs, _measure_param_norm))
  workdir = str(tmp_path / "run")
  config = tiny_config(prepared_data_dir, param_norm_every=2, num_steps=2)
  assert population.packing_errors([config]) == [
      "config.param_norm_every is on (a population records none)"]

  assert train.train_and_evaluate(config, workdir).status == reporting.COMPLETED
  # Resumed to step 4 with the interval changed: allowed, as its role says.
  config = tiny_config(prepared_data_dir, param_norm_every=3, num_steps=4)
  assert train.train_and_evaluate(config, workdir).status == reporting.COMPLETED

  events = [e for e in reporting.read_metrics(workdir) if e["event"] == "param_norm"]
  # After 0 and 2 updates in the first part; after 3 in the second (4 is not a multiple of 3).
  assert [e["step"] for e in events] == [0, 2, 3]
  float32_eps = float(np.finfo(np.float32).eps)
  for event in events:
    assert event["lr_seen"] == event["lr"] == pytest.approx(0.1, rel=float32_eps)
  # The measurement is of the network after `step` updates: against the norm of the step-2
  # checkpoint in float64, off by far less than the norm moves in the two steps after it.
  norms = {}
  for step in (2, 4):
    _, state = checkpoints.read_state(os.path.join(workdir, "checkpoints"), step)
    norms[step] = np.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2)
                              for x in jax.tree.leaves(state["params"])))
  assert abs(events[1]["param_norm"] - norms[2]) < 1e-2 * abs(norms[4] - norms[2])
