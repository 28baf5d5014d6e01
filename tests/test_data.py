"""In-memory data: batch order, augmentation, normalisation, evaluation batches, loading."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from resnet_jax import config as config_lib
from resnet_jax import cli, data, prepare

# --- batch_indices ---

N, B = 50, 8  # 6 steps per epoch; 2 examples left over each epoch.


# One compiled function for all seeds and steps: (seed, steps int32 [S]) -> int32 [S, B].
batches_at = jax.jit(jax.vmap(data.batch_indices, in_axes=(None, 0, None, None)),
                     static_argnums=(2, 3))


def epoch_indices(seed: int, epoch: int) -> np.ndarray:
  steps = jnp.arange(epoch * (N // B), (epoch + 1) * (N // B), dtype=jnp.int32)
  return np.asarray(batches_at(jnp.int32(seed), steps, B, N)).reshape(-1)


def test_each_epoch_visits_distinct_examples_and_drops_only_the_partial_batch():
  for epoch in range(3):
    indices = epoch_indices(seed=0, epoch=epoch)
    assert indices.dtype == np.int32
    assert len(indices) == len(set(indices.tolist())) == (N // B) * B
    assert indices.min() >= 0 and indices.max() < N


def test_batches_cover_every_example_exactly_once_when_batches_divide_the_split():
  indices = batches_at(jnp.int32(7), jnp.arange(10, dtype=jnp.int32), 10, 100)
  assert sorted(np.asarray(indices).reshape(-1).tolist()) == list(range(100))


def test_epochs_and_seeds_give_different_orders():
  first = epoch_indices(seed=0, epoch=0)
  assert not np.array_equal(first, epoch_indices(seed=0, epoch=1))
  assert not np.array_equal(first, epoch_indices(seed=1, epoch=0))


def test_batch_is_a_pure_function_of_seed_and_step():
  once = batches_at(jnp.int32(3), jnp.asarray([13, 13], jnp.int32), B, N)
  np.testing.assert_array_equal(once[0], once[1])
  np.testing.assert_array_equal(batches_at(jnp.int32(3), jnp.asarray([13], jnp.int32), B, N)[0],
                                once[0])


def test_batch_size_larger_than_the_split_is_rejected():
  with pytest.raises(ValueError, match=r"batch_size must be in \[1, num_examples=5\]; got 6"):
    data.batch_indices(0, jnp.int32(0), 6, 5)


# --- augment ---


def random_images(shape=(16, 6, 5, 3), seed=0) -> jax.Array:
  return jnp.asarray(np.random.default_rng(seed).integers(1, 256, shape, np.uint8))


def test_augment_without_crop_or_flip_is_the_identity():
  images = random_images()
  out = data.augment(images, jax.random.key(0), crop_padding=0, flip=False)
  np.testing.assert_array_equal(out, images)


def test_crops_are_shifts_of_the_zero_padded_image():
  images = random_images()
  pad = 2
  out = np.asarray(data.augment(images, jax.random.key(1), crop_padding=pad, flip=False))
  padded = np.pad(np.asarray(images), ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  _, height, width, _ = images.shape
  offsets = []
  for i in range(len(out)):
    matches = [(dy, dx) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)
               if np.array_equal(out[i], padded[i, dy:dy + height, dx:dx + width])]
    assert len(matches) == 1  # Pixels are non-zero, so only the true shift matches.
    offsets.append(matches[0])
  assert len(set(offsets)) > 1  # Each example draws its own crop.
  assert out.dtype == np.uint8


def test_flip_mirrors_some_examples_left_to_right_and_keeps_the_others():
  images = np.asarray(random_images())
  out = np.asarray(data.augment(jnp.asarray(images), jax.random.key(2), crop_padding=0,
                                flip=True))
  flipped = [np.array_equal(o, im[:, ::-1]) for o, im in zip(out, images)]
  kept = [np.array_equal(o, im) for o, im in zip(out, images)]
  assert all(f != k for f, k in zip(flipped, kept))
  assert any(flipped) and any(kept)


# --- normalize ---


@pytest.mark.numerics
def test_normalize_maps_pixels_to_standard_scores_per_channel():
  images = jnp.asarray([[[0, 255], [51, 102]]], jnp.uint8).reshape(1, 1, 2, 2)
  out = data.normalize(images, mean=(0.2, 0.4), std=(0.5, 0.2))
  np.testing.assert_allclose(out, [[[[-0.4, 3.0], [0.0, 0.0]]]], atol=1e-6)
  assert out.dtype == jnp.float32


def test_normalize_returns_the_requested_dtype():
  images = jnp.zeros((2, 4, 4, 1), jnp.uint8)
  assert data.normalize(images, (0.5,), (0.25,), jnp.bfloat16).dtype == jnp.bfloat16


# --- eval_batches ---


def test_eval_batches_cover_the_split_once_and_mask_the_padding():
  batches = data.eval_batches(10, 4)
  assert len(batches) == 3
  assert all(idx.dtype == np.int32 and mask.dtype == bool and len(idx) == 4
             for idx, mask in batches)
  covered = np.concatenate([idx[mask] for idx, mask in batches])
  np.testing.assert_array_equal(covered, np.arange(10))
  np.testing.assert_array_equal(batches[-1][1], [True, True, False, False])


def test_eval_batches_of_an_exact_multiple_have_no_padding():
  batches = data.eval_batches(8, 4)
  assert len(batches) == 2 and all(mask.all() for _, mask in batches)


# --- check_prepared, dataset_info, load_split ---


def dataset_config(data_dir, **overrides):
  cfg = config_lib.default_config().dataset
  cfg.data_dir = str(data_dir)
  cfg.update(overrides)
  return cfg


def test_unprepared_dataset_error_names_the_prepare_command(tmp_path):
  with pytest.raises(data.DatasetNotPreparedError,
                     match=f"python -m resnet_jax.prepare fashion_mnist --data_dir={tmp_path}"):
    data.check_prepared(dataset_config(tmp_path))


def test_unprepared_imagenet_error_names_the_tensorflow_extra(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"imagenet-prepare.*imagenet2012 --manual_dir"):
    data.check_prepared(dataset_config(tmp_path, name="imagenet2012", eval_split="validation"))


def test_unknown_split_is_rejected_naming_the_config_field(prepared_data_dir):
  with pytest.raises(ValueError, match="config.dataset.eval_split 'validation'"):
    data.check_prepared(dataset_config(prepared_data_dir, eval_split="validation"))


def test_dataset_info_reads_fashion_mnist_metadata(prepared_data_dir):
  info = data.dataset_info(dataset_config(prepared_data_dir))
  assert info == data.DatasetInfo(name="fashion_mnist", num_classes=10, image_shape=(28, 28, 1),
                                  num_train=60000, num_eval=10000, mean=(0.2860,),
                                  std=(0.3530,))


def test_dataset_info_counts_a_sliced_split(prepared_data_dir):
  info = data.dataset_info(dataset_config(prepared_data_dir, train_split="train[:10%]"))
  assert info.num_train == 6000


def test_load_split_returns_the_stored_records_in_order(prepared_data_dir):
  images, labels = data.load_split(dataset_config(prepared_data_dir), "test")
  assert images.shape == (10000, 28, 28, 1) and images.dtype == np.uint8
  assert labels.shape == (10000,) and labels.dtype == np.int32
  source = tfds.data_source("fashion_mnist", split="test", data_dir=prepared_data_dir)
  for i in (0, 1, 9999):
    np.testing.assert_array_equal(images[i], source[i]["image"])
    assert labels[i] == source[i]["label"]
  raw = gzip.open(Path(prepare.DEBIAN_FASHION_MNIST_DIR) / "t10k-labels-idx1-ubyte.gz").read()
  raw_labels = np.frombuffer(raw, np.uint8, offset=8)
  np.testing.assert_array_equal(np.bincount(labels), np.bincount(raw_labels))


def test_load_split_caches_the_decoded_arrays_beside_the_dataset(prepared_data_dir):
  cfg = dataset_config(prepared_data_dir)
  first = data.load_split(cfg, "test[:5%]")
  cache = (Path(prepared_data_dir) / "resnet_jax_arrays" / "fashion_mnist" / "3.0.1"
           / "test%5B%3A5%25%5D.npz")
  assert cache.exists()
  second = data.load_split(cfg, "test[:5%]")
  assert len(second[0]) == 500
  for a, b in zip(first, second):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("damage", ["garbage", "empty", "truncated", "object arrays"])
def test_a_damaged_array_cache_is_decoded_again_with_one_warning(prepared_data_dir, capsys,
                                                                 damage):
  cfg = dataset_config(prepared_data_dir)
  split = "test[:1%]"
  intact = data.load_split(cfg, split)
  cache = (Path(prepared_data_dir) / "resnet_jax_arrays" / "fashion_mnist" / "3.0.1"
           / "test%5B%3A1%25%5D.npz")
  good = cache.read_bytes()
  if damage == "object arrays":  # Loading them would need pickle, which np.load refuses.
    np.savez(cache, images=np.array([None], object), labels=np.zeros(1, np.int32))
  else:
    cache.write_bytes({"garbage": b"not a zip file at all", "empty": b"",
                       "truncated": good[:len(good) // 2]}[damage])
  capsys.readouterr()
  again = data.load_split(cfg, split)
  (line,) = capsys.readouterr().err.splitlines()
  assert line.startswith(f"warning: {cache} is damaged (") and line.endswith(
      f"decoding fashion_mnist {split} again")
  for a, b in zip(intact, again):
    np.testing.assert_array_equal(a, b)
  with np.load(cache) as rewritten:  # Written again, with the same arrays.
    np.testing.assert_array_equal(rewritten["images"], intact[0])
    np.testing.assert_array_equal(rewritten["labels"], intact[1])


@pytest.mark.parametrize("damage", ["dataset_info.json garbage", "test records truncated"])
def test_a_damaged_prepared_dataset_is_one_error_naming_it_and_how_to_prepare_it_again(
    prepared_data_dir, tmp_path, damage):
  shutil.copytree(Path(prepared_data_dir) / "fashion_mnist", tmp_path / "fashion_mnist")
  version_dir = tmp_path / "fashion_mnist" / "3.0.1"
  if damage.startswith("dataset_info"):
    (version_dir / "dataset_info.json").write_text("garbage{")
  else:
    records = version_dir / "fashion_mnist-test.array_record-00000-of-00001"
    records.write_bytes(records.read_bytes()[:records.stat().st_size // 2])
  with pytest.raises(data.DatasetDamagedError) as damaged:
    data.load_split(dataset_config(tmp_path), "test")
  directory = tmp_path / "fashion_mnist"
  assert str(damaged.value).startswith(f"the prepared dataset in {directory} is damaged (")
  assert str(damaged.value).endswith(
      f"prepare it again: rm -r {directory} && python -m resnet_jax.prepare fashion_mnist "
      f"--data_dir={tmp_path}")
  assert "\n" not in str(damaged.value)
  assert data.DatasetDamagedError in cli.refusal_types()  # One line `error: ...`, exit 2.
