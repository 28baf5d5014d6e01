"""Batch sources: where the compiled steps get their batches, and what a checkpoint saves of them.

A source is not a trainer: `trainer.build` compiles the steps once around a `Source` (the
Protocol below) and asks it only for its inputs and how to make a batch of them inside a step.

`InMemory` holds small datasets (Fashion-MNIST, MNIST, CIFAR) on the devices whole: the step
gathers and augments its own batch by index, a pure function of (seed, step), so nothing is saved.
`DeviceBatches` takes batches already on the devices from any iterator: the Grain stream
(`streamed`, whose iterator position is checkpointed), a benchmark's fixed batch, a test's list.
It cannot draw the instruments' batches: nothing it holds reaches an un-augmented example by index.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import ml_collections

from resnet_jax import data, parallel


class Source(Protocol):
  """What the trainer asks a source for. Batches are made inside the compiled programs, from
  inputs that the host hands in."""

  # Whether train_inputs() changes from step to step (a batch each), so that a call of several
  # steps (trainer.py) takes several, stacked.
  stacks_steps: bool
  # train_inputs()'s shapes, dtypes and shardings (jax.ShapeDtypeStruct).
  train_spec: Any

  def train_inputs(self) -> Any:
    """The argument the compiled train step takes at the next step."""

  def train_batch(self, inputs: Any, state: Any) -> dict[str, jax.Array]:
    """Traced inside the step: {"image": uint8 [B, H, W, C] augmented, "label": int32 [B]}."""

  def eval_inputs(self) -> Iterable[Any]:
    """One pass over the eval split: one argument per call of the eval step."""

  def eval_batch(self, inputs: Any) -> dict[str, jax.Array]:
    """Traced inside the eval step: the padded batch, with "mask": bool [B]."""

  def checkpoint_items(self, restore: bool) -> dict:
    """Extra Orbax items saved with each checkpoint (restore=False) or restored ({}: none)."""

  def measure_inputs(self) -> Any:
    """The argument of the instruments' programs (trainer.py, curvature.py), advancing nothing;
    raises ValueError where the source cannot draw measurement batches."""

  def measure_batch(self, inputs: Any, key: jax.Array, batch_size: int) -> dict[str, jax.Array]:
    """Traced inside an instrument: {"image": uint8 [batch_size, H, W, C] NOT augmented,
    "label": int32 [batch_size]}, training examples drawn independently by `key`."""


def make_source(config: ml_collections.ConfigDict, info: data.DatasetInfo, mesh) -> Source:
  """The configured dataset's source: streamed for data.STREAMED datasets, else in memory."""
  if config.dataset.name in data.STREAMED:
    return streamed(config, info, mesh)
  return InMemory(config, info, mesh)


class InMemory:
  """Both splits on every device as uint8; batches gathered inside the compiled steps."""
  stacks_steps = False  # Every step takes the whole split.

  def __init__(self, config: ml_collections.ConfigDict, info: data.DatasetInfo, mesh):
    cfg = config.dataset
    load = lambda split: dict(zip(("image", "label"), data.load_split(cfg, split)))
    self._train = parallel.put_replicated(load(cfg.train_split), mesh)
    self._eval = parallel.put_replicated(load(cfg.eval_split), mesh)
    # The eval batches never change: their indices and masks go to the devices once.
    self._eval_batches = parallel.put_replicated(
        data.eval_batches(info.num_eval, config.eval_batch_size), mesh)
    self._sharding = parallel.batch_sharded(mesh)
    self._augment = dict(batch_size=config.batch_size, crop_padding=cfg.crop_padding,
                         flip=cfg.flip)
    self.train_spec = spec_of(self._train)

  def train_inputs(self):
    return self._train

  def train_batch(self, arrays, state) -> dict:
    return data.train_batch(arrays, state.seed, state.step, sharding=self._sharding,
                            **self._augment)

  def eval_inputs(self) -> Iterable:
    return [(self._eval, idx, mask) for idx, mask in self._eval_batches]

  def eval_batch(self, inputs) -> dict:
    arrays, idx, mask = inputs
    idx = jax.lax.with_sharding_constraint(idx, self._sharding)
    return {"image": arrays["image"][idx], "label": arrays["label"][idx], "mask": mask}

  def checkpoint_items(self, restore: bool) -> dict:
    del restore  # The batch order is a function of (seed, step): nothing to save or restore.
    return {}

  def measure_inputs(self):
    return self._train

  def measure_batch(self, arrays, key, batch_size: int) -> dict:
    # With replacement: independent draws are what the noise-scale estimator assumes, and they
    # cost O(batch_size), where a draw without replacement sorts the whole split.
    idx = jax.random.randint(key, (batch_size,), 0, arrays["label"].shape[0])
    idx = jax.lax.with_sharding_constraint(idx, self._sharding)
    return {"image": arrays["image"][idx], "label": arrays["label"][idx]}


@dataclasses.dataclass
class DeviceBatches:
  """Batches already on the devices: `train` yields the next training batch, `eval` (iterated
  once per evaluation) the padded eval batches. `checkpoint` gives the extra items to save
  (restore=False) or restore (restore=True)."""
  train: Iterator[dict]
  train_spec: dict  # jax.ShapeDtypeStruct per array of a training batch.
  eval: Iterable[dict] = ()
  checkpoint: Callable[[bool], dict] = lambda restore: {}
  stacks_steps = True  # Each step takes the next batch.

  def train_inputs(self) -> dict:
    return next(self.train)

  def train_batch(self, batch: dict, state) -> dict:
    del state
    return batch

  def eval_inputs(self) -> Iterable[dict]:
    return self.eval

  def eval_batch(self, batch: dict) -> dict:
    return batch

  def checkpoint_items(self, restore: bool) -> dict:
    return self.checkpoint(restore)

  def measure_inputs(self):
    raise ValueError("sharpness and noise-scale measurements need un-augmented training examples "
                     "by index, which only the in-memory source holds; this source "
                     "(DeviceBatches: a stream, a benchmark's or a test's batches) has none: "
                     "set config.sharpness_every and config.noise_scale_every to 0")

  def measure_batch(self, inputs, key, batch_size: int) -> dict:
    raise ValueError("DeviceBatches cannot draw measurement batches (see measure_inputs)")


def streamed(config: ml_collections.ConfigDict, info: data.DatasetInfo, mesh) -> DeviceBatches:
  """The Grain stream (resnet_jax/stream.py): workers decode and augment, two batches in flight.

  Its iterator's position is saved with every checkpoint, so a resumed run continues the stream.
  """
  import grain  # Only streaming runs need Grain's worker machinery.
  from resnet_jax import stream
  sharded = parallel.batch_sharded(mesh)
  train = iter(stream.prefetch_to_device(
      stream.make_train_dataset(config.dataset, global_batch_size=config.batch_size,
                                seed=config.seed), size=2, sharding=sharded))
  evaluation = stream.prefetch_to_device(
      stream.make_eval_dataset(config.dataset, global_batch_size=config.eval_batch_size),
      size=2, sharding=sharded)
  shape = (config.batch_size, *info.image_shape)
  spec = {"image": jax.ShapeDtypeStruct(shape, jnp.uint8, sharding=sharded),
          "label": jax.ShapeDtypeStruct(shape[:1], jnp.int32, sharding=sharded)}
  save, restore = grain.checkpoint.CheckpointSave, grain.checkpoint.CheckpointRestore
  return DeviceBatches(train, spec, evaluation,
                       lambda is_restore: {"data": (restore if is_restore else save)(train)})


def spec_of(tree: Any):
  """The jax.ShapeDtypeStruct (sharding included) of every array of `tree`."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
