"""The training data: prepared TFDS datasets, whole splits in memory, batches drawn inside jit.

Small datasets (Fashion-MNIST, MNIST, CIFAR) fit on the accelerator whole, so a batch is a gather
by indices computed inside the jitted train step: `batch_indices` (a pure function of seed and
step, so a resumed run sees exactly the batches of an uninterrupted one), then `augment` and
`normalize`. Evaluation walks a split once in padded, masked batches (`eval_batches`).

Datasets are prepared once, beforehand, by `python -m resnet_jax.prepare NAME`; `check_prepared`
says so when they are not. Device placement is the train loop's business, not this module's.
"""

from __future__ import annotations

import dataclasses
import os
import urllib.parse
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from resnet_jax import config as config_lib
from resnet_jax import prepare, reporting

# Per-channel mean and standard deviation of the training images on the 0-1 scale, as published
# with the datasets' standard training recipes.
MEAN_STD = {
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "mnist": ((0.1307,), (0.3081,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagenet2012": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
STREAMED = ("imagenet2012",)  # Too large to hold in memory; see resnet_jax.stream.

_LOAD_CHUNK = 10_000  # Records decoded at a time, bounding the memory of decoded dicts.
AUGMENT_STREAM = 2**31 - 1  # fold_in tag of the augmentation keys; epochs never reach it.


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the model and the train loop need to know about the configured dataset.

  image_shape is what the model receives: the stored (H, W, C) for in-memory datasets, the
  random-crop size (image_size, image_size, 3) for streamed ImageNet. num_train and num_eval
  count the configured train and eval splits. mean and std are per channel, on the 0-1 scale.
  """
  name: str
  num_classes: int
  image_shape: tuple[int, int, int]
  num_train: int
  num_eval: int
  mean: tuple[float, ...]
  std: tuple[float, ...]


class DatasetNotPreparedError(FileNotFoundError):
  """The configured dataset has not been prepared in its data_dir; the message says how to."""


def _data_dir(dataset_cfg: ml_collections.ConfigDict) -> str | None:
  return dataset_cfg.data_dir or None  # "" means TFDS's default.


class DatasetDamagedError(Exception):
  """A prepared dataset's files cannot be read; the message names them and how to prepare the
  dataset again."""


def _damaged(dataset_cfg: ml_collections.ConfigDict, error: Exception) -> DatasetDamagedError:
  root = _data_dir(dataset_cfg) or os.environ.get("TFDS_DATA_DIR",
                                                   os.path.expanduser("~/tensorflow_datasets"))
  directory = os.path.join(root, dataset_cfg.name)
  return DatasetDamagedError(
      f"the prepared dataset in {directory} is damaged ({reporting.brief(error)}); prepare it "
      f"again: rm -r {directory} && {prepare.command(dataset_cfg.name, _data_dir(dataset_cfg))}")


def _prepared_builder(dataset_cfg: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
  """The stock TFDS builder of the prepared dataset; raises DatasetNotPreparedError if absent,
  DatasetDamagedError if its metadata cannot be read."""
  try:
    builder = tfds.builder(dataset_cfg.name, data_dir=_data_dir(dataset_cfg))
  except Exception as e:  # pylint: disable=broad-except  # TFDS raises many types.
    raise _damaged(dataset_cfg, e) from e
  if not builder.is_prepared():
    raise DatasetNotPreparedError(
        f"dataset {dataset_cfg.name} {builder.version} is not prepared in {builder.data_dir}; "
        f"prepare it once with:\n  {prepare.command(dataset_cfg.name, _data_dir(dataset_cfg))}")
  return builder


def _split_info(builder: tfds.core.DatasetBuilder, field: str, split: str):
  try:
    info = builder.info.splits[split]
  except (KeyError, ValueError) as e:  # TFDS raises either, by the kind of mistake.
    raise config_lib.ConfigError(f"config.dataset.{field} {split!r} does not name a split of "
                     f"{builder.name}: {e}") from e
  if not info.num_examples:  # A slice such as test[:0]: nothing to train or evaluate on.
    raise config_lib.ConfigError(f"config.dataset.{field} {split!r} of {builder.name} has no "
                                 f"examples; give a split or slice with at least one")
  return info


def check_prepared(dataset_cfg: ml_collections.ConfigDict) -> None:
  """Checks that the configured dataset and both its splits exist; fast (reads metadata only).

  Raises:
    DatasetNotPreparedError (a FileNotFoundError): not prepared; the message gives the command.
    ConfigError: train_split or eval_split is not a split (or valid slice) of the dataset.
  """
  builder = _prepared_builder(dataset_cfg)
  _split_info(builder, "train_split", dataset_cfg.train_split)
  _split_info(builder, "eval_split", dataset_cfg.eval_split)


def dataset_info(dataset_cfg: ml_collections.ConfigDict) -> DatasetInfo:
  """The prepared dataset's DatasetInfo, read from its TFDS metadata."""
  builder = _prepared_builder(dataset_cfg)
  features = builder.info.features
  if dataset_cfg.name in STREAMED:
    image_shape = (dataset_cfg.image_size, dataset_cfg.image_size, 3)
  else:
    image_shape = tuple(features["image"].shape)
  mean, std = MEAN_STD[dataset_cfg.name]
  return DatasetInfo(
      name=dataset_cfg.name,
      num_classes=features["label"].num_classes,
      image_shape=image_shape,
      num_train=_split_info(builder, "train_split", dataset_cfg.train_split).num_examples,
      num_eval=_split_info(builder, "eval_split", dataset_cfg.eval_split).num_examples,
      mean=mean,
      std=std)


def load_split(dataset_cfg: ml_collections.ConfigDict, split: str
               ) -> tuple[np.ndarray, np.ndarray]:
  """A whole split in its stored order: (images uint8 [N, H, W, C], labels int32 [N]).

  Decoding a PNG per record takes seconds, so the decoded arrays are cached in
  `data_dir/resnet_jax_arrays/NAME/VERSION/SPLIT.npz` (beside, never inside, the TFDS dataset)
  and reused while they are newer than the dataset. `split` may be a TFDS slice ("train[:90%]").
  """
  if dataset_cfg.name in STREAMED:
    raise ValueError(f"{dataset_cfg.name} is streamed (resnet_jax.stream), not loaded whole")
  builder = _prepared_builder(dataset_cfg)
  cache = (Path(builder.data_dir_root) / "resnet_jax_arrays" / builder.name / str(builder.version)
           / f"{urllib.parse.quote(split, safe='')}.npz")
  dataset_time = (Path(builder.data_dir) / "dataset_info.json").stat().st_mtime
  if cache.exists() and cache.stat().st_mtime >= dataset_time:
    try:
      with np.load(cache) as arrays:
        images, labels = arrays["images"], arrays["labels"]
      if images.dtype != np.uint8 or images.ndim != 4 or labels.shape != images.shape[:1]:
        raise ValueError(f"arrays of shapes {images.shape} and {labels.shape}")
      return images, labels
    except Exception as e:  # pylint: disable=broad-except  # np.load raises many types.
      # Ours, and derived from the dataset: damaged, it is decoded again, not fatal.
      reporting.warn(f"{cache} is damaged ({reporting.brief(e)}); decoding {builder.name} "
                     f"{split} again")
  try:
    images, labels = _decode_split(dataset_cfg, split)
  except Exception as e:  # pylint: disable=broad-except  # ArrayRecord and TFDS raise many.
    raise _damaged(dataset_cfg, e) from e
  try:
    cache.parent.mkdir(parents=True, exist_ok=True)
    with reporting.open_atomic(str(cache), "wb") as f:
      np.savez(f, images=images, labels=labels)
  except OSError as e:  # A read-only data_dir still trains, only slower to start.
    reporting.warn(f"could not cache decoded {builder.name} {split} in {cache}: {e}")
  return images, labels


def _decode_split(dataset_cfg: ml_collections.ConfigDict, split: str
                  ) -> tuple[np.ndarray, np.ndarray]:
  source = tfds.data_source(dataset_cfg.name, split=split, data_dir=_data_dir(dataset_cfg))
  shape = source.dataset_info.features["image"].shape
  images = np.empty((len(source), *shape), np.uint8)
  labels = np.empty((len(source),), np.int32)
  for start in range(0, len(source), _LOAD_CHUNK):
    stop = min(start + _LOAD_CHUNK, len(source))
    records = source.__getitems__(range(start, stop))
    images[start:stop] = [r["image"] for r in records]
    labels[start:stop] = [r["label"] for r in records]
  return images, labels


def batch_indices(seed: int | jax.Array, step: jax.Array, batch_size: int,
                  num_examples: int) -> jax.Array:
  """The training examples of step `step`: int32 [batch_size], a pure function of (seed, step).

  Each epoch visits the split in a fresh random order, keyed by fold_in(key(seed), epoch), in
  num_examples // batch_size batches; the last partial batch of each epoch is dropped. The order
  is evaluated only at this batch's positions (see `_shuffled_positions`), so a step costs
  O(batch_size), not a sort of the whole split at every step.
  """
  if not 0 < batch_size <= num_examples:
    raise ValueError(f"batch_size must be in [1, num_examples={num_examples}]; got {batch_size}")
  steps_per_epoch = num_examples // batch_size
  epoch, step_in_epoch = jnp.divmod(step, steps_per_epoch)
  positions = step_in_epoch * batch_size + jnp.arange(batch_size)
  key = jax.random.fold_in(jax.random.key(seed), epoch)
  return _shuffled_positions(positions, key, num_examples).astype(jnp.int32)


_FEISTEL_ROUNDS = 8


def _shuffled_positions(positions: jax.Array, key: jax.Array, n: int) -> jax.Array:
  """order[positions] for a random permutation `order` of range(n) keyed by `key`.

  The permutation is a keyed Feistel network on the smallest even number of bits covering n,
  restricted to range(n) by cycle walking: values that land outside are permuted again until
  they land inside, which keeps it a bijection on range(n).
  """
  half_bits = max(1, ((n - 1).bit_length() + 1) // 2)
  half_mask = jnp.uint32((1 << half_bits) - 1)
  round_keys = jax.random.bits(key, (_FEISTEL_ROUNDS,), jnp.uint32)

  def permute(x):  # A bijection of range(2 ** (2 * half_bits)).
    left, right = x >> half_bits, x & half_mask
    for round_key in round_keys:
      left, right = right, left ^ (_mix32(right ^ round_key) & half_mask)
    return (left << half_bits) | right

  def walk(x):
    return jnp.where(x < n, x, permute(x))

  start = permute(positions.astype(jnp.uint32))
  return jax.lax.while_loop(lambda x: jnp.any(x >= n), walk, start)


def _mix32(x: jax.Array) -> jax.Array:
  """A well-mixing hash of uint32 values (multiply-xorshift with published constants)."""
  x = (x ^ (x >> 16)) * jnp.uint32(0x7FEB352D)
  x = (x ^ (x >> 15)) * jnp.uint32(0x846CA68B)
  return x ^ (x >> 16)


def augment(images: jax.Array, key: jax.Array, *, crop_padding: int, flip: bool) -> jax.Array:
  """Random crops and flips, independently per example: uint8 [B, H, W, C] -> the same.

  crop_padding: pixels of zero padding on each side before a random H x W crop (0: no crop).
  flip: mirror each image left-right with probability 1/2.
  """
  batch, height, width, channels = images.shape
  crop_key, flip_key = jax.random.split(key)
  if crop_padding:
    pad = crop_padding
    padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    corners = jax.random.randint(crop_key, (batch, 2), 0, 2 * pad + 1)
    crop = lambda image, corner: jax.lax.dynamic_slice(
        image, (corner[0], corner[1], 0), (height, width, channels))
    images = jax.vmap(crop)(padded, corners)
  if flip:
    mirrored = jax.random.bernoulli(flip_key, 0.5, (batch,))
    images = jnp.where(mirrored[:, None, None, None], images[:, :, ::-1], images)
  return images


def train_batch(arrays: dict[str, jax.Array], seed: jax.Array, step: jax.Array, *,
                batch_size: int, crop_padding: int, flip: bool,
                sharding: jax.sharding.Sharding) -> dict[str, jax.Array]:
  """The augmented batch of step `step`: a pure function of (seed, step), so resume is exact.

  arrays: the whole split on device, {"image": uint8 [N, H, W, C], "label": int32 [N]}.
  Returns {"image": uint8 [batch_size, H, W, C], "label": int32 [batch_size]}, laid out by
  `sharding` (each device gathers and augments only its own slice).
  """
  num_examples = arrays["label"].shape[0]
  idx = jax.lax.with_sharding_constraint(
      batch_indices(seed, step, batch_size, num_examples), sharding)
  # A key stream of its own, apart from the one batch_indices derives the order from.
  key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), AUGMENT_STREAM), step)
  images = augment(arrays["image"][idx], key, crop_padding=crop_padding, flip=flip)
  return {"image": images, "label": arrays["label"][idx]}


def normalize(images: jax.Array, mean, std, dtype=jnp.float32) -> jax.Array:
  """uint8 [..., C] -> (images / 255 - mean) / std in `dtype`; mean and std per channel."""
  scaled = images.astype(jnp.float32) / 255.0
  return ((scaled - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)).astype(dtype)


def eval_batches(num_examples: int, batch_size: int) -> list[tuple[np.ndarray, np.ndarray]]:
  """Batches covering examples 0..num_examples-1 once, in order.

  Returns [(indices int32 [B], mask bool [B])]; the last batch is padded with index 0, masked out.
  """
  batches = []
  for start in range(0, num_examples, batch_size):
    indices = np.arange(start, start + batch_size)
    mask = indices < num_examples
    batches.append((np.where(mask, indices, 0).astype(np.int32), mask))
  return batches
