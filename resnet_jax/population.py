"""A population: several runs that share one compiled program, trained together on one device.

Points of a sweep that differ only in the step's inputs (learning rate, momentum, weight decay,
seed: config.ROLES) run the same program. A population stacks their states on a leading axis and
makes one jax.vmap'd step of all of them, so a device that one small run leaves mostly idle does
P runs' arithmetic per launch, after one compilation.

Every member is still an ordinary run, with the workdir and records a separate run writes, so
reports, plots, skipping finished points and resuming work unchanged. Its arithmetic is its
separate run's up to rounding: vmap turns a convolution over P kernels into a grouped one,
summed in another order. A member whose loss becomes NaN or Inf is recorded as diverged at the
log point that sees it and frozen while the others go on (the `active` mask).

This module holds what is about populations alone: which runs may share one (`packing_errors`,
`population_key`), stacking their states, and the vmapped programs, which
`trainer.build(..., population=P)` jits. The loop is train.py's, the one every run uses
(`train.train_population`). Whether a population pays is the platform's business
(runner.AUTO_PACK; the README has the figures).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections

from resnet_jax import config as config_lib
from resnet_jax import data


def packing_errors(configs: list[ml_collections.ConfigDict]) -> list[str]:
  """Why these (validated) configs cannot train as one population; [] when they can."""
  errors = []
  first = configs[0]
  key = population_key(first)
  if any(population_key(c) != key for c in configs[1:]):
    errors.append("its points differ in more than " + ", ".join(config_lib.fields("step_input")))
  if first.dataset.name in data.STREAMED:
    errors.append(f"{first.dataset.name} is streamed, a stream per run")
  for field in config_lib.fields("alone"):
    if first[field]:
      errors.append(f"config.{field} is on (a population records none)")
  if jax.process_count() > 1:
    errors.append("it runs on several processes")
  return errors


def population_key(config: ml_collections.ConfigDict) -> str:
  """Equal for configs that may train in one population: they share everything but the step's
  inputs (config.ROLES), bookkeeping included."""
  fields = config_lib.flatten(config)
  for name in config_lib.fields("step_input"):
    del fields[name]
  return repr(sorted(fields.items()))


def stack(trees: list):
  """States (or totals) of members stacked on a new leading axis."""
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def member(tree, index: int):
  """Member `index`'s slice of a stacked state or totals."""
  return jax.tree.map(lambda x: x[index], tree)


def vmapped_steps(step: Callable, steps_per_call: int) -> Callable:
  """`step`, (state, totals, inputs) -> (state, totals, ...) of one run, as a population's
  (state, totals, inputs, active, count) -> (state, totals): `count` <= steps_per_call steps of
  every member whose `active` (bool [P]) is True, the others' state and totals kept as they
  were. Every member takes the same inputs (the dataset; its own seed and step pick its
  batch)."""
  vmapped = jax.vmap(lambda s, t, inputs: step(s, t, inputs)[:2], in_axes=(0, 0, None))

  def one_step(state, totals, inputs, active):
    new_state, new_totals = vmapped(state, totals, inputs)
    keep = lambda new, old: jnp.where(active.reshape((-1,) + (1,) * (new.ndim - 1)), new, old)
    return jax.tree.map(keep, new_state, state), jax.tree.map(keep, new_totals, totals)

  def train_steps(state, totals, inputs, active, count):
    if steps_per_call == 1:  # On CPU: no loop (XLA's convolutions are slow in one).
      return one_step(state, totals, inputs, active)
    return jax.lax.fori_loop(0, count, lambda _, c: one_step(*c, inputs, active), (state, totals))

  return train_steps


def vmapped_eval(eval_batch: Callable, eval_step: Callable) -> Callable:
  """A population's eval step, (state, totals, inputs) -> totals: each member's sums over the
  one batch `eval_batch(inputs)` added to its totals."""
  def evaluate(state, totals, inputs):
    batch = eval_batch(inputs)
    return jax.vmap(lambda s, t: jax.tree.map(jnp.add, t, eval_step(s, batch)))(state, totals)

  return evaluate
