"""Saving and resuming a run: Orbax checkpoints of the train state, sealed and checked.

Each checkpoint `checkpoints/<step>/` holds the items `state` (the whole TrainState: step, params,
batch_stats, optimizer state, data seed), `config` (the run's config as JSON) and `progress`
(bookkeeping such as the run's wall time so far); streaming runs add `data`, the input iterator's
position.

**Sealed.** Saves are asynchronous. Before Orbax commits a save (renames its temporary directory
to `<step>/`), `Saver` writes `checksums.json` into it: the size and SHA-256 of every file of
every item. A committed checkpoint therefore always carries its manifest, and a checkpoint cut
short by a crash is never committed at all.

**Checked.** `restore_latest` verifies the newest checkpoint against its manifest, then restores
it. The manifest must list exactly the files the checkpoint's items hold. One that fails (a
changed byte, a truncated, missing or unlisted file, a manifest that is missing, empty or does not
parse, an item missing or one Orbax cannot read) is moved to `unusable_checkpoints/<step>/`
beside `checkpoints/`, with one warning line saying why, and the next newest is tried. Only when
none is usable does it raise `NoUsableCheckpointError`. A checkpoint without a manifest is
restored, with a warning that it is unverified, only if it was written before resnet_jax sealed
checkpoints: it has no `progress` item (which came with sealing) and no checkpoint of its run,
kept or set aside, is sealed. Any other checkpoint without one lost it, and is set aside.

**Matched.** The stored config is compared with the current one before the state is read, so a
checkpoint of another network, dataset or recipe is refused (`CheckpointMismatchError`) with the
fields that differ. Only the fields `config.ROLES` calls resumable (bookkeeping among them) may
differ, and `num_steps` only down to the checkpoint's step: a run is not cut back below what it
has trained.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import glob
import hashlib
import json
import os
import shutil
import tempfile
from typing import Any, Iterator

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from resnet_jax import config as config_lib
from resnet_jax import reporting

MANIFEST_FILE = "checksums.json"
# Items every checkpoint has, and the one that came with sealing: a checkpoint that has it (as a
# directory, or named in Orbax's step metadata) was written to carry a manifest.
_REQUIRED_ITEMS = ("state", "config")
_SEALING_ITEM = "progress"
_STEP_METADATA = "_CHECKPOINT_METADATA"  # Orbax's record of a step's items.
UNUSABLE_DIR = "unusable_checkpoints"  # Beside the checkpoints directory.
_TMP_SUFFIX = ".orbax-checkpoint-tmp"  # Orbax's name for a save not yet committed.
_HASH_CHUNK = 1 << 20
_READ_TRIES = 3  # read_state of the newest checkpoint, deleted under it each time by its run.


def _disk_usage(directory: str) -> int:
  """Bytes the files under `directory` take on disk (whole blocks, as `du` counts)."""
  return sum(os.lstat(os.path.join(root, name)).st_blocks * 512
             for root, _, names in os.walk(directory) for name in names)


class CheckpointMismatchError(ValueError):
  """A checkpoint exists but was written by a run this config cannot continue."""


class NoUsableCheckpointError(Exception):
  """Every checkpoint of a run failed its checks; they were moved aside, none deleted."""


class MissingCheckpointError(FileNotFoundError):
  """A run has no checkpoint, or none at the step asked for."""


class DamagedCheckpointError(ValueError):
  """A checkpoint asked for by step fails its checks (read_state)."""


@dataclasses.dataclass(frozen=True)
class Restored:
  step: int
  state: Any
  wall_time_s: float  # The run's wall time up to this checkpoint, over all its segments.


class Saver:
  """Asynchronous, sealed saves into one checkpoints directory, keeping the newest `keep`.

  Every process must call save() at the same steps: the state is written collectively.
  """

  def __init__(self, directory: str, *, keep: int):
    self.directory = os.path.abspath(directory)
    self._pending_step: int | None = None
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=True,
        # Temporary directories of saves cut off by a crash are removed on start.
        cleanup_tmp_directories=True,
        async_options=ocp.AsyncOptions(post_finalization_callback=self._seal))
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def save(self, step: int, state, config: ml_collections.ConfigDict, *, wall_time_s: float,
           extra_items: dict | None = None) -> None:
    """Starts saving `state` as checkpoint `step` (after the previous save has finished).

    extra_items: more Orbax args by item name, e.g. {"data": grain.checkpoint.CheckpointSave(it)}.
    """
    items = {"state": ocp.args.StandardSave(state),
             "config": ocp.args.JsonSave(config.to_dict()),
             "progress": ocp.args.JsonSave({"wall_time_s": wall_time_s}),
             **(extra_items or {})}
    self.wait()  # One save in flight at a time: _seal knows which it is.
    self._check_space(step, state)
    self._pending_step = step
    self._manager.save(step, args=ocp.args.Composite(**items), force=True)

  def _check_space(self, step: int, state) -> None:
    """Raises ENOSPC before a save that cannot fit, on every process alike.

    Orbax reports a full disk well (a ValueError naming ENOSPC), but TensorStore's writes still
    in flight then print tracebacks from their threads; checking first keeps a full disk to one
    clear error. A disk that fills during the save still fails inside Orbax, so the guess errs
    large: Orbax's metadata takes up to 1 KiB per array (as much again as a small network's
    arrays), and the newest checkpoint's size on disk, where there is one, is a floor.
    """
    leaves = jax.tree.leaves(state)
    needed = sum(leaf.nbytes for leaf in leaves) + 1024 * len(leaves) + (1 << 17)
    newest = self._manager.latest_step()
    if newest is not None:
      needed = max(needed, _disk_usage(os.path.join(self.directory, str(newest))))
    needed = int(1.1 * needed)
    free = shutil.disk_usage(self.directory).free
    fits = free >= needed
    if jax.process_count() > 1:  # Process 0's disk decides, so that all stop or none.
      fits = bool(multihost_utils.broadcast_one_to_all(np.int32(fits)))
    if not fits:
      raise OSError(errno.ENOSPC, f"No space left on device for checkpoint {step} in "
                    f"{self.directory}: {free / 2**20:.1f} MiB free, it takes about "
                    f"{needed / 2**20:.1f} MiB")

  def wait(self) -> None:
    """Blocks until the save in flight is committed; raises what it failed with, if it did.

    A failed save's temporary directory is removed at once: on a full disk that space is what
    the summary needs (a new Saver would remove it too).
    """
    try:
      self._manager.wait_until_finished()
    except Exception:
      if jax.process_index() == 0:
        for tmp_dir in glob.glob(os.path.join(self.directory, f"*{_TMP_SUFFIX}*")):
          shutil.rmtree(tmp_dir, ignore_errors=True)
      raise

  def close(self) -> None:
    self._manager.close()

  def _seal(self) -> None:
    """Orbax's post-finalization callback (process 0, background thread, before the commit).

    Orbax commits a local save by renaming `<step>.orbax-checkpoint-tmp...` to `<step>`; where it
    commits in place instead (a commit file, as on cloud storage) the manifest goes into `<step>`.
    """
    step = self._pending_step
    found = (glob.glob(os.path.join(self.directory, f"{step}{_TMP_SUFFIX}*"))
             or glob.glob(os.path.join(self.directory, str(step))))
    if len(found) != 1:  # An Orbax that saves otherwise: the checkpoint stays usable, unsealed.
      reporting.warn(f"checkpoint {step}: no single directory to seal in {self.directory}; "
                     f"found {found}")
      return
    reporting.write_json_atomic(os.path.join(found[0], MANIFEST_FILE),
                                {"sha256": _checksums(found[0])})


def _item_files(step_dir: str) -> list[str]:
  """Paths, relative to `step_dir`, of every file inside its item directories, sorted.

  Files at the top level (Orbax's step metadata, rewritten at commit time) are not items.
  """
  out = []
  for item in sorted(os.listdir(step_dir)):
    item_dir = os.path.join(step_dir, item)
    if not os.path.isdir(item_dir):
      continue
    for root, _, files in os.walk(item_dir):
      out += [os.path.relpath(os.path.join(root, f), step_dir) for f in files]
  return sorted(out)


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    while chunk := f.read(_HASH_CHUNK):
      digest.update(chunk)
  return digest.hexdigest()


def _checksums(step_dir: str) -> dict[str, dict]:
  return {name: {"size": os.path.getsize(os.path.join(step_dir, name)),
                 "sha256": _sha256(os.path.join(step_dir, name))}
          for name in _item_files(step_dir)}


def sealed(step_dir: str) -> bool:
  """Whether a checkpoint has a manifest (those written before resnet_jax sealed them have not)."""
  return os.path.exists(os.path.join(step_dir, MANIFEST_FILE))


def verify(step_dir: str) -> str | None:
  """Checks a sealed checkpoint against its manifest, which must list exactly the files of its
  items: None if it does, else what is wrong."""
  try:
    with open(os.path.join(step_dir, MANIFEST_FILE)) as f:
      listed = {name: (entry["size"], entry["sha256"])
                for name, entry in json.load(f)["sha256"].items()}
  except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
    return f"its checksum manifest {MANIFEST_FILE} is unreadable ({type(e).__name__})"
  if not listed:
    return f"its checksum manifest {MANIFEST_FILE} lists no files"
  present = set(_item_files(step_dir))
  if missing := sorted(set(listed) - present):
    return f"file {missing[0]} is missing"
  if unlisted := sorted(present - set(listed)):
    return f"file {unlisted[0]} is not in its manifest"
  for name, (expected_size, expected_sha256) in sorted(listed.items()):
    path = os.path.join(step_dir, name)
    size = os.path.getsize(path)
    if size != expected_size:
      return f"file {name} has {size} bytes, {expected_size} were written"
    if _sha256(path) != expected_sha256:
      return f"file {name} does not match its checksum"
  return None


def check(step_dir: str, *, run_seals: bool) -> str | None:
  """Why a checkpoint must not be restored, or None: a sealed one must pass verify(); an unsealed
  one is trusted (unverified) only if it was written before sealing, in a run (`run_seals`:
  run_seals(directory)) whose checkpoints are all from then."""
  if sealed(step_dir):
    return verify(step_dir)
  if missing := [i for i in _REQUIRED_ITEMS if not os.path.isdir(os.path.join(step_dir, i))]:
    return f"it is incomplete: it has no {' or '.join(missing)} item"
  if _SEALING_ITEM in _items(step_dir):
    return (f"it has no {MANIFEST_FILE}, though it has a {_SEALING_ITEM} item: it was written "
            "since resnet_jax seals checkpoints")
  if run_seals:
    return f"it has no {MANIFEST_FILE}, though other checkpoints of this run are sealed"
  return None


def run_seals(directory: str) -> bool:
  """Whether any checkpoint of the run whose checkpoints are in `directory`, kept there or set
  aside, was written by a resnet_jax that seals them: then none without a manifest is trusted."""
  for root in (directory, _unusable_dir(directory)):
    for name in os.listdir(root) if os.path.isdir(root) else ():
      step_dir = os.path.join(root, name)
      if os.path.isdir(step_dir) and (sealed(step_dir) or _SEALING_ITEM in _items(step_dir)):
        return True
  return False


def _items(step_dir: str) -> set[str]:
  """A checkpoint's items: its directories, and those Orbax's step metadata names."""
  items = {name for name in os.listdir(step_dir) if os.path.isdir(os.path.join(step_dir, name))}
  try:
    with open(os.path.join(step_dir, _STEP_METADATA)) as f:
      handlers = json.load(f)["item_handlers"]
  except (OSError, ValueError, KeyError, TypeError):
    return items  # Absent or damaged: the directories still tell.
  return items | set(handlers) if isinstance(handlers, dict) else items


def _comparable(tree: dict) -> dict:
  """The config's leaves by dotted path, tuples as the lists JSON records them as."""
  return {k: list(v) if isinstance(v, tuple) else v for k, v in config_lib.flatten(tree).items()}


def config_mismatches(stored: dict, current: ml_collections.ConfigDict) -> list[str]:
  """Lines `field: checkpoint X, config Y` for every non-resumable field that differs.

  A field the checkpoint's config lacks (added to resnet_jax since) counts as its default; one
  since replaced counts as its replacement (config.upgrade_recorded).
  """
  old = {**_comparable(config_lib.default_config().to_dict()),
         **_comparable(config_lib.upgrade_recorded(stored))}
  new = _comparable(current.to_dict())
  lines = []
  resumable = config_lib.fields("resumable")
  for field in sorted(set(old) | set(new)):
    if field in resumable or old.get(field) == new.get(field):
      continue
    lines.append(f"{field}: checkpoint {old.get(field, '<absent>')!r}, "
                 f"config {new.get(field, '<absent>')!r}")
  return lines


def steps(directory: str) -> list[int]:
  """The committed checkpoints' steps in `directory`, newest first ([] if none)."""
  if not os.path.isdir(directory):
    return []
  return sorted((int(name) for name in os.listdir(directory) if name.isdigit()), reverse=True)


def restore_latest(directory: str, abstract_state, config: ml_collections.ConfigDict,
                   extra_items: dict | None = None) -> Restored | None:
  """Restores the newest usable checkpoint into the shapes and shardings of `abstract_state`.

  Unusable checkpoints met on the way are moved to UNUSABLE_DIR (by process 0) with a warning.
  extra_items: Orbax restore args of further items, restored in place (e.g. a Grain iterator).
  Returns:
    The restored step, state and wall time, or None when `directory` holds no checkpoint.
  Raises:
    CheckpointMismatchError: the newest usable checkpoint was written under a different config.
    NoUsableCheckpointError: checkpoints exist but none is usable.
  """
  skipped = []
  seals = run_seals(directory)
  for step in steps(directory):
    step_dir = os.path.join(directory, str(step))
    try:
      restored = _restore(step_dir, step, abstract_state, config, extra_items, run_seals=seals)
    except _Unusable as e:
      skipped.append((step, str(e)))
      continue
    finally:
      if jax.process_count() > 1:  # Every process has judged this step before any moves it.
        multihost_utils.sync_global_devices(f"resnet_jax checkpoint {step} checked")
    _set_aside(directory, skipped, resumed_from=step)
    return restored
  if not skipped:
    return None
  _set_aside(directory, skipped, resumed_from=None)
  raise NoUsableCheckpointError(
      f"no usable checkpoint in {directory}: "
      + "; ".join(f"step {step}: {reason}" for step, reason in skipped)
      + f"; they were moved to {_unusable_dir(directory)}. To start afresh, use another "
      "--workdir or remove this one")


class _Unusable(Exception):
  """A checkpoint failed its checks; the message says how."""


def _restore(step_dir: str, step: int, abstract_state, config, extra_items, *,
             run_seals: bool) -> Restored:
  if problem := check(step_dir, run_seals=run_seals):
    raise _Unusable(problem)
  if not sealed(step_dir):
    _warn(f"checkpoint {step_dir} has no {MANIFEST_FILE} (written before resnet_jax sealed "
          "checkpoints): restoring it unverified")
  checkpointer = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
  try:
    stored = checkpointer.restore(step_dir, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
  except Exception as e:  # Orbax raises many types for unreadable files.
    raise _Unusable(f"its config is unreadable ({reporting.brief(e)})") from None
  mismatches = config_mismatches(stored["config"], config)
  if mismatches:
    resumable = ", ".join(sorted(config_lib.fields("resumable")))
    raise CheckpointMismatchError(
        f"checkpoint {step_dir} was written by a different run; refusing to resume. "
        "Differences:\n  " + "\n  ".join(mismatches)
        + f"\nOnly these fields may change on resume: {resumable}.")
  if step > config.num_steps:  # Restored, the run would end as completed at `step`.
    raise CheckpointMismatchError(
        f"checkpoint {step_dir} is at step {step}, past config.num_steps ({config.num_steps}); "
        f"a run is not cut back below the steps it has trained: to continue it give "
        f"config.num_steps >= {step}, or start afresh in another --workdir")
  items = {"state": ocp.args.StandardRestore(abstract_state), **(extra_items or {})}
  has_progress = os.path.isdir(os.path.join(step_dir, "progress"))
  if has_progress:
    items["progress"] = ocp.args.JsonRestore()
  try:
    restored = checkpointer.restore(step_dir, args=ocp.args.Composite(**items))
  except Exception as e:
    raise _Unusable(f"its state does not fit this run or is unreadable "
                    f"({reporting.brief(e)})") from None
  wall_time = restored["progress"]["wall_time_s"] if has_progress else 0.0
  return Restored(step, restored["state"], float(wall_time))


def _warn(message: str) -> None:
  if jax.process_index() == 0:  # The other processes would say the same.
    reporting.warn(message)


def _unusable_dir(directory: str) -> str:
  return os.path.join(os.path.dirname(os.path.abspath(directory)), UNUSABLE_DIR)


def _set_aside(directory: str, skipped: list[tuple[int, str]], resumed_from: int | None) -> None:
  """Moves unusable checkpoints out of Orbax's sight, never deleting them; warns once each."""
  if not skipped:
    return
  target_root = _unusable_dir(directory)
  for step, reason in skipped:
    target = os.path.join(target_root, str(step))
    suffix = 1
    while os.path.exists(target):  # The same step may fail twice over a run's life.
      suffix += 1
      target = os.path.join(target_root, f"{step}.{suffix}")
    then = (f"resuming from step {resumed_from}" if resumed_from is not None
            else "no older checkpoint")
    _warn(f"checkpoint {os.path.join(directory, str(step))} is unusable: {reason}; "
          f"moved to {target}; {then}")
    if jax.process_index() == 0:
      os.makedirs(target_root, exist_ok=True)
      os.replace(os.path.join(directory, str(step)), target)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("resnet_jax unusable checkpoints moved")


def read_state(directory: str, step: int | None = None):
  """Reads a checkpoint's train state as numpy arrays, on any machine and device count.

  For analysis (notebooks, plots, comparing runs); training resumes through restore_latest().
  Returns (step, state dict with params, batch_stats, opt_state, step, seed).
  Raises:
    MissingCheckpointError: no checkpoint (at that step) in `directory`; the message lists the
      steps there are.
    DamagedCheckpointError: the checkpoint fails its checks (as restore_latest makes them).
  """
  directory = os.path.abspath(directory)
  asked = step
  for _ in range(_READ_TRIES):
    if asked is None:
      found = steps(directory)
      if not found:
        raise MissingCheckpointError(f"no checkpoint in {directory}: train the run first")
      step = found[0]
    step_dir = os.path.join(directory, str(step))
    if not os.path.isdir(step_dir):
      raise MissingCheckpointError(f"no checkpoint at step {step} in {directory}; it has steps "
                                   f"{', '.join(map(str, steps(directory))) or 'none'}")
    with _held(step_dir) as held_dir:
      problem = held_dir and check(held_dir, run_seals=run_seals(directory))
      if held_dir is None or problem and not os.path.isdir(step_dir):
        # Deleted under us by the run, which keeps only its newest.
        if asked is None:
          continue
        raise MissingCheckpointError(
            f"checkpoint {step} of {directory} was removed while it was read: the run is still "
            "training and keeps only its newest; choose a newer step or wait for it to end")
      if problem:
        raise DamagedCheckpointError(f"checkpoint {step_dir} is unusable: {problem}")
      path = os.path.join(held_dir, "state")
      with ocp.StandardCheckpointer() as checkpointer:
        metadata = checkpointer.metadata(path).item_metadata
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                              metadata)
        state = checkpointer.restore(path, target)
      return step, jax.tree.map(np.asarray, state)
  raise MissingCheckpointError(f"the newest checkpoint of {directory} was removed while it was "
                               f"read, {_READ_TRIES} times: the run is saving faster than it can "
                               "be read; wait for it to end")


@contextlib.contextmanager
def _held(step_dir: str) -> Iterator[str | None]:
  """The checkpoint's files, hard-linked into a private directory beside the checkpoints, so that
  a run still training can delete the checkpoint without pulling its files from under the reader
  (a committed checkpoint's files are never rewritten). Yields None if the checkpoint vanished
  while it was linked; `step_dir` itself where links cannot be made (a read-only workdir,
  another filesystem)."""
  try:
    held = tempfile.mkdtemp(prefix=".reading-", dir=os.path.dirname(os.path.dirname(step_dir)))
  except OSError:
    yield step_dir
    return
  try:
    copy = os.path.join(held, os.path.basename(step_dir))
    try:
      for root, _, names in os.walk(step_dir, onerror=_raise):
        os.makedirs(os.path.join(copy, os.path.relpath(root, step_dir)))
        for name in names:
          path = os.path.join(root, name)
          os.link(path, os.path.join(copy, os.path.relpath(path, step_dir)))
    except FileNotFoundError:
      copy = None
    except OSError:
      copy = step_dir
    # A checkpoint deleted as it was linked can leave a partial copy without an error.
    yield copy if os.path.isdir(step_dir) else None
  finally:
    shutil.rmtree(held, ignore_errors=True)


def _raise(error: OSError) -> None:
  raise error
