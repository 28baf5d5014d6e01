"""Saving and resuming a run: Orbax checkpoints of the train state, checked against the config.

Each checkpoint holds two items: `state` (the whole TrainState: step, params, batch_stats,
optimizer state, data seed) and `config` (the run's config as JSON). Resuming compares the stored
config with the current one *before* touching the state, so a checkpoint of another network,
dataset or recipe is refused with the fields that differ instead of being half-restored. Only the
fields in `RESUMABLE_FIELDS` (bookkeeping that does not change what is trained) may differ.
Streaming runs add a third item, `data`, the input iterator's position.
"""

from __future__ import annotations

import os

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

# Fields that may change between an interrupted run and its resumption.
RESUMABLE_FIELDS = frozenset({
    "num_steps", "log_every", "eval_every", "checkpoint_every", "keep_checkpoints",
    "profile_steps", "progress_bar", "diagnostics_every", "eval_batch_size",
    "dataset.data_dir",
})


class CheckpointMismatchError(ValueError):
  """A checkpoint exists but was written by a run this config cannot continue."""


def create_manager(directory: str, *, keep: int) -> ocp.CheckpointManager:
  """An async manager that keeps the newest `keep` checkpoints under `directory`."""
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, create=True, enable_async_checkpointing=True)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def save(manager: ocp.CheckpointManager, step: int, state,
         config: ml_collections.ConfigDict, extra_items: dict | None = None) -> None:
  """Starts an asynchronous save of `state` at `step` (every process must call it).

  extra_items: more Orbax args by item name, e.g. {"data": grain.checkpoint.CheckpointSave(it)}.
  """
  items = {"state": ocp.args.StandardSave(state),
           "config": ocp.args.JsonSave(config.to_dict()), **(extra_items or {})}
  manager.save(step, args=ocp.args.Composite(**items), force=True)


def _flatten(tree: dict, prefix: str = "") -> dict:
  flat = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, dict):
      flat.update(_flatten(value, name + "."))
    else:
      flat[name] = list(value) if isinstance(value, tuple) else value
  return flat


def config_mismatches(stored: dict, current: ml_collections.ConfigDict) -> list[str]:
  """Lines `field: checkpoint X, config Y` for every non-resumable field that differs."""
  old, new = _flatten(stored), _flatten(current.to_dict())
  lines = []
  for field in sorted(set(old) | set(new)):
    if field in RESUMABLE_FIELDS or old.get(field) == new.get(field):
      continue
    lines.append(f"{field}: checkpoint {old.get(field, '<absent>')!r}, "
                 f"config {new.get(field, '<absent>')!r}")
  return lines


def restore_latest(manager: ocp.CheckpointManager, abstract_state,
                   config: ml_collections.ConfigDict, extra_items: dict | None = None):
  """Restores the newest checkpoint into the shapes and shardings of `abstract_state`.

  extra_items: Orbax restore args of further items, restored in place (e.g. a Grain iterator).
  Returns:
    (step, state) or None when the directory holds no checkpoint.
  Raises:
    CheckpointMismatchError: the checkpoint was written under a different config, or its
      contents do not fit this run's state (corrupt or foreign).
  """
  step = manager.latest_step()
  if step is None:
    return None
  where = os.path.join(str(manager.directory), str(step))
  try:
    stored = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
  except Exception as e:  # Orbax raises many types for unreadable files.
    raise CheckpointMismatchError(
        f"checkpoint {where} is unreadable ({type(e).__name__}: {e}); move it away to start "
        "afresh, or point --workdir elsewhere") from e
  mismatches = config_mismatches(stored["config"], config)
  if mismatches:
    raise CheckpointMismatchError(
        f"checkpoint {where} was written by a different run; refusing to resume. Differences:\n  "
        + "\n  ".join(mismatches)
        + f"\nOnly these fields may change on resume: {', '.join(sorted(RESUMABLE_FIELDS))}.")
  items = {"state": ocp.args.StandardRestore(abstract_state), **(extra_items or {})}
  try:
    restored = manager.restore(step, args=ocp.args.Composite(**items))
  except Exception as e:
    raise CheckpointMismatchError(
        f"checkpoint {where} does not fit this run's state ({type(e).__name__}: {e}); it is "
        "corrupt or from another version of the code") from e
  return step, restored["state"]


def read_state(directory: str, step: int | None = None):
  """Reads a checkpoint's train state as numpy arrays, on any machine and device count.

  For analysis (notebooks, plots, comparing runs); training resumes through restore_latest().
  Returns (step, state dict with params, batch_stats, opt_state, step, seed).
  """
  directory = os.path.abspath(directory)
  if step is None:
    with ocp.CheckpointManager(directory) as manager:
      step = manager.latest_step()
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {directory}")
  path = os.path.join(directory, str(step), "state")
  with ocp.StandardCheckpointer() as checkpointer:
    metadata = checkpointer.metadata(path).item_metadata
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                          metadata)
    state = checkpointer.restore(path, target)
  return step, jax.tree.map(np.asarray, state)
