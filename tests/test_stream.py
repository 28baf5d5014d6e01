"""Tests for the streaming (Grain over TFDS ArrayRecord) input pipeline.

Most run on a tiny real TFDS dataset written to a temporary directory: 30 training and 13 eval
JPEGs of random sizes, each a solid colour that encodes its label, so a batch shows whether each
image still travels with its own label. The decoding tests use ImageNet-like JPEGs
(resnet_jax.prepare.synthetic_image), whose detail a reduced-scale decode could lose.
"""

from __future__ import annotations

import io
import sys

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
import PIL.Image
import pytest
import tensorflow_datasets as tfds

from resnet_jax import config as config_lib
from resnet_jax import prepare, stream

NUM_TRAIN = 30
NUM_EVAL = 13
EVAL_FIRST_LABEL = 50  # Eval labels are 50..62, apart from the training labels 0..29.
IMAGE_SIZE = 24


def label_colour(label: int) -> np.ndarray:
  """The solid RGB colour of the image with this label: uint8 [3]."""
  return np.array([4 * label, 250 - 3 * label, 60 + 2 * label], np.uint8)


class StreamTestImages(tfds.core.GeneratorBasedBuilder):
  """Solid-colour JPEGs of random sizes; written without TensorFlow (PIL images encode as-is)."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
        "label": tfds.features.ClassLabel(num_classes=64),
    }))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples(range(NUM_TRAIN)),
            "validation": self._generate_examples(
                range(EVAL_FIRST_LABEL, EVAL_FIRST_LABEL + NUM_EVAL))}

  def _generate_examples(self, labels):
    rng = np.random.default_rng(labels[0])
    for label in labels:
      height, width = rng.integers(16, 64, size=2)
      pixels = np.broadcast_to(label_colour(label), (height, width, 3))
      yield label, {"image": PIL.Image.fromarray(np.ascontiguousarray(pixels)), "label": label}


@pytest.fixture(scope="module")
def dataset_cfg(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("tfds")
  StreamTestImages(data_dir=data_dir, file_format="array_record").download_and_prepare()
  cfg = config_lib.default_config().dataset
  cfg.name = "stream_test_images"
  cfg.data_dir = str(data_dir)
  cfg.train_split = "train"
  cfg.eval_split = "validation"
  cfg.image_size = IMAGE_SIZE
  cfg.worker_count = 0
  return cfg


def take(ds, n: int) -> list[dict]:
  it = iter(ds)
  return [next(it) for _ in range(n)]


def assert_images_match_labels(batch: dict) -> None:
  expected = np.stack([label_colour(label) for label in batch["label"]])
  mean_colours = batch["image"].astype(np.float64).mean(axis=(1, 2))
  np.testing.assert_allclose(mean_colours, expected, atol=3)


def test_data_source_reads_every_example_of_the_split(dataset_cfg):
  assert len(stream.data_source(dataset_cfg, "train")) == NUM_TRAIN
  assert len(stream.data_source(dataset_cfg, "validation")) == NUM_EVAL


def test_train_batches_are_the_host_share_of_the_global_batch(dataset_cfg):
  batch = take(stream.make_train_dataset(dataset_cfg, global_batch_size=8, seed=0,
                                         process_index=0, process_count=2), 1)[0]
  assert set(batch) == {"image", "label"}
  assert batch["image"].shape == (4, IMAGE_SIZE, IMAGE_SIZE, 3)
  assert batch["image"].dtype == np.uint8
  assert batch["label"].shape == (4,)
  assert batch["label"].dtype == np.int32


def test_train_images_travel_with_their_labels(dataset_cfg):
  for batch in take(stream.make_train_dataset(dataset_cfg, global_batch_size=10, seed=0), 3):
    assert_images_match_labels(batch)


def test_train_stream_is_fixed_by_the_seed(dataset_cfg):
  def labels_and_images(seed):
    batches = take(stream.make_train_dataset(dataset_cfg, global_batch_size=6, seed=seed), 4)
    return (np.concatenate([b["label"] for b in batches]),
            np.concatenate([b["image"] for b in batches]))

  labels, images = labels_and_images(seed=3)
  labels_again, images_again = labels_and_images(seed=3)
  other_labels, _ = labels_and_images(seed=4)
  np.testing.assert_array_equal(labels, labels_again)
  np.testing.assert_array_equal(images, images_again)
  assert not np.array_equal(labels, other_labels)


def test_each_epoch_covers_the_split_once_in_a_new_order(dataset_cfg):
  batches = take(stream.make_train_dataset(dataset_cfg, global_batch_size=10, seed=0), 6)
  labels = np.concatenate([b["label"] for b in batches])
  first, second = labels[:NUM_TRAIN], labels[NUM_TRAIN:]
  assert sorted(first) == list(range(NUM_TRAIN))
  assert sorted(second) == list(range(NUM_TRAIN))
  assert not np.array_equal(first, second)


def test_two_hosts_split_each_global_batch_of_one_host(dataset_cfg):
  one_host = take(stream.make_train_dataset(dataset_cfg, global_batch_size=10, seed=0), 3)
  hosts = [take(stream.make_train_dataset(dataset_cfg, global_batch_size=10, seed=0,
                                          process_index=p, process_count=2), 3)
           for p in range(2)]
  for step in range(3):
    host_labels = [set(hosts[p][step]["label"].tolist()) for p in range(2)]
    assert not host_labels[0] & host_labels[1]
    assert host_labels[0] | host_labels[1] == set(one_host[step]["label"].tolist())
  epoch = [label for p in range(2) for batch in hosts[p] for label in batch["label"]]
  assert sorted(epoch) == list(range(NUM_TRAIN))


def test_global_batch_not_divisible_by_hosts_is_rejected(dataset_cfg):
  with pytest.raises(ValueError, match="multiple of the number of hosts"):
    stream.make_train_dataset(dataset_cfg, global_batch_size=9, seed=0, process_index=0,
                              process_count=2)


def test_eval_covers_every_example_once_and_masks_the_padding(dataset_cfg):
  # 13 examples in global batches of 4: 4 batches per host, 3 padded slots.
  hosts = [list(stream.make_eval_dataset(dataset_cfg, global_batch_size=4, process_index=p,
                                         process_count=2)) for p in range(2)]
  assert [len(batches) for batches in hosts] == [4, 4]
  batches = [batch for host_batches in hosts for batch in host_batches]
  assert all(b["image"].shape == (2, IMAGE_SIZE, IMAGE_SIZE, 3) for b in batches)
  assert all(b["mask"].dtype == np.bool_ for b in batches)
  mask = np.concatenate([b["mask"] for b in batches])
  labels = np.concatenate([b["label"] for b in batches])
  images = np.concatenate([b["image"] for b in batches])
  assert mask.sum() == NUM_EVAL
  assert sorted(labels[mask]) == list(range(EVAL_FIRST_LABEL, EVAL_FIRST_LABEL + NUM_EVAL))
  assert not images[~mask].any()
  assert_images_match_labels({"image": images[mask], "label": labels[mask]})


def test_eval_dataset_repeats_the_same_pass_on_each_iteration(dataset_cfg):
  ds = stream.make_eval_dataset(dataset_cfg, global_batch_size=8)
  first = np.concatenate([b["label"] for b in ds])
  second = np.concatenate([b["label"] for b in ds])
  np.testing.assert_array_equal(first, second)
  assert len(first) == 16


def test_inception_crop_box_stays_inside_with_area_and_ratio_in_range():
  rng = np.random.default_rng(0)
  for _ in range(500):
    height, width = rng.integers(50, 400, size=2)
    top, left, crop_height, crop_width = stream.inception_crop_box(height, width, rng)
    assert 0 <= top and top + crop_height <= height
    assert 0 <= left and left + crop_width <= width
    area = crop_height * crop_width / (height * width)
    ratio = crop_width / crop_height
    if (top, left, crop_height, crop_width) != stream.central_crop_box(height, width):
      assert 0.08 - 0.02 <= area <= 1.0  # Rounding to whole pixels moves the area a little.
      assert 3 / 4 - 0.03 <= ratio <= 4 / 3 + 0.03


def test_inception_crop_box_falls_back_to_a_central_box_for_a_thin_image():
  # No box of 8% of the area with ratio <= 4/3 fits in 10 rows.
  box = stream.inception_crop_box(10, 1000, np.random.default_rng(0))
  assert box == (0, 493, 10, 13)


def test_central_crop_box_clamps_tall_images_to_ratio_three_quarters():
  assert stream.central_crop_box(200, 60) == (60, 0, 80, 60)
  assert stream.central_crop_box(100, 120) == (0, 0, 100, 120)


def png(pixels: np.ndarray) -> bytes:
  """`pixels` (uint8 [H, W, 3]) encoded losslessly, for tests that need exact pixel values."""
  out = io.BytesIO()
  PIL.Image.fromarray(np.ascontiguousarray(pixels)).save(out, format="PNG")
  return out.getvalue()


def test_eval_crop_resizes_the_shorter_side_then_keeps_the_centre():
  # A 64 x 128 horizontal ramp: the shorter side 64 -> 32 (= 28 / 0.875) halves the image and
  # the centre 28 columns of the resized image are columns 36..92 of the original.
  ramp = np.broadcast_to(np.arange(128, dtype=np.uint8)[None, :, None], (64, 128, 3))
  crop = stream.eval_crop(png(ramp), 28)
  assert crop.shape == (28, 28, 3)
  np.testing.assert_allclose(crop[14, :, 0], 36.5 + 2 * np.arange(28), atol=1)


def test_train_preprocess_flips_about_half_the_images():
  ramp = png(np.broadcast_to(np.arange(0, 256, 4, dtype=np.uint8)[None, :, None], (64, 64, 3)))
  transform = stream.TrainPreprocess(image_size=16)
  flipped = 0
  for seed in range(200):
    out = transform.random_map({"image": ramp, "label": 7}, np.random.default_rng(seed))
    assert out["image"].shape == (16, 16, 3)
    assert out["label"] == 7
    row = out["image"][8, :, 0].astype(int)
    assert np.all(np.diff(row) >= 0) or np.all(np.diff(row) <= 0)
    flipped += row[0] > row[-1]
  assert 70 <= flipped <= 130


def test_prefetch_to_device_yields_global_arrays_with_the_given_sharding(dataset_cfg):
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  ds = stream.make_train_dataset(dataset_cfg, global_batch_size=8, seed=0)
  host_batches = take(ds, 3)
  device_batches = take(stream.prefetch_to_device(ds, size=2, sharding=sharding), 3)
  for host, device in zip(host_batches, device_batches):
    assert isinstance(device["image"], jax.Array)
    assert device["image"].sharding == sharding
    assert device["label"].sharding == sharding
    np.testing.assert_array_equal(np.asarray(device["image"]), host["image"])
    np.testing.assert_array_equal(np.asarray(device["label"]), host["label"])


def test_restored_iterator_continues_with_the_same_batches(dataset_cfg, tmp_path):
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))

  def device_iterator():
    ds = stream.make_train_dataset(dataset_cfg, global_batch_size=8, seed=1)
    return iter(stream.prefetch_to_device(ds, size=3, sharding=sharding))

  uninterrupted = [next(it) for it in [device_iterator()] for _ in range(7)]
  interrupted = device_iterator()
  for _ in range(4):  # Past the first epoch (30 examples), with 3 more batches in flight.
    next(interrupted)
  with ocp.CheckpointManager(tmp_path) as manager:
    manager.save(4, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(interrupted)))
    manager.wait_until_finished()
    resumed = manager.restore(4, args=ocp.args.Composite(
        data=grain.checkpoint.CheckpointRestore(device_iterator())))["data"]
  for expected in uninterrupted[4:]:
    batch = next(resumed)
    np.testing.assert_array_equal(np.asarray(batch["label"]), np.asarray(expected["label"]))
    np.testing.assert_array_equal(np.asarray(batch["image"]), np.asarray(expected["image"]))


def test_worker_processes_give_the_same_batches_as_the_main_process(dataset_cfg):
  in_process = take(stream.make_train_dataset(dataset_cfg, global_batch_size=6, seed=0), 4)
  with_workers = dataset_cfg.copy_and_resolve_references()
  with_workers.worker_count = 2
  it = iter(stream.make_train_dataset(with_workers, global_batch_size=6, seed=0))
  from_workers = [next(it) for _ in range(4)]
  it.close()
  for expected, batch in zip(in_process, from_workers):
    np.testing.assert_array_equal(batch["label"], expected["label"])
    np.testing.assert_array_equal(batch["image"], expected["image"])


# --- Decoding only what the crop needs, on synthetic ImageNet-like JPEGs. ---

CROP_SIZE = 48  # Small enough that most Inception boxes of a 500 x 375 image shrink by 2 to 8.


def synthetic_jpeg(index: int) -> bytes:
  return prepare.encode_jpeg(prepare.synthetic_image(0, "train", index, label=index))


def full_decode_resized_crop(encoded: bytes, box, size: int) -> np.ndarray:
  """The reference: the whole image decoded, then the box resized (the pipeline before issue 20)."""
  full = PIL.Image.open(io.BytesIO(encoded)).convert("RGB")
  top, left, height, width = box
  return np.asarray(full.resize((size, size), PIL.Image.Resampling.BILINEAR,
                                box=(left, top, left + width, top + height)))


def test_header_size_is_the_decoded_size_so_the_boxes_are_a_full_decodes():
  for index in range(3):
    encoded = synthetic_jpeg(index)
    decoded = np.asarray(PIL.Image.open(io.BytesIO(encoded)).convert("RGB"))
    width, height = stream.open_jpeg(encoded).size
    assert (height, width) == decoded.shape[:2]
    # TrainPreprocess draws its box from the header size with the same generator calls.
    assert (stream.inception_crop_box(height, width, np.random.default_rng(index))
            == stream.inception_crop_box(*decoded.shape[:2], np.random.default_rng(index)))


def test_decode_uses_the_smallest_dct_scale_whose_crop_still_covers_the_output():
  encoded = synthetic_jpeg(1)
  assert stream.open_jpeg(encoded).size == (500, 375)
  cases = [  # (box, output size, decoded (width, height))
      ((0, 0, 375, 500), 46, (63, 47)),  # 375 >= 8 x 46: 1/8.
      ((0, 0, 200, 300), 48, (125, 94)),  # 200 >= 4 x 48, < 8 x 48: 1/4.
      ((10, 20, 96, 96), 48, (250, 188)),  # 96 = 2 x 48: 1/2.
      ((10, 20, 95, 300), 48, (500, 375)),  # 95 < 2 x 48: full size.
  ]
  for box, size, decoded_size in cases:
    image = stream.open_jpeg(encoded)
    crop = stream.decode_resized_crop(image, box, size)
    assert image.size == decoded_size
    assert crop.size == (size, size) and crop.mode == "RGB"


def test_reduced_scale_crops_are_close_to_a_full_decode_then_resize():
  scales_seen = set()
  for index in range(4):
    encoded = synthetic_jpeg(index)
    width, height = stream.open_jpeg(encoded).size
    for seed in range(3):
      box = stream.inception_crop_box(height, width, np.random.default_rng(seed))
      image = stream.open_jpeg(encoded)
      crop = np.asarray(stream.decode_resized_crop(image, box, CROP_SIZE), np.float64)
      scales_seen.add(width // image.size[0])
      reference = full_decode_resized_crop(encoded, box, CROP_SIZE).astype(np.float64)
      # Both the scaled inverse DCT and the resize average blocks of pixels with weights that
      # sum to one, so each channel's mean is kept but for the uint8 rounding (0.5) and the
      # box's partial blocks at its edges.
      np.testing.assert_allclose(crop.mean(axis=(0, 1)), reference.mean(axis=(0, 1)), atol=1.0)
      # Pixel by pixel, they differ in how they weight the pixels they average: a yardstick is
      # what moving the crop by one output pixel changes, an augmentation far below what the
      # random crop already does; the reduced decode must stay under a quarter of it.
      top, left, box_height, box_width = box
      step = box_width / CROP_SIZE
      shift = left - step if left >= step else left + step  # Inside the image either way here.
      assert 0 <= shift <= width - box_width
      shifted = full_decode_resized_crop(encoded, (top, shift, box_height, box_width), CROP_SIZE)
      one_pixel = np.sqrt(np.mean((shifted - reference) ** 2))
      assert np.sqrt(np.mean((crop - reference) ** 2)) < one_pixel / 4
  assert scales_seen >= {2, 4}


def test_train_preprocess_keeps_todays_boxes_and_flips():
  # The same generator calls as the full-decode pipeline: the box from the image size, then the
  # flip; so the crop is the full-decode crop (at the output's scale) of the same box and flip.
  encoded = synthetic_jpeg(2)
  width, height = stream.open_jpeg(encoded).size
  transform = stream.TrainPreprocess(image_size=CROP_SIZE)
  for seed in range(6):
    rng = np.random.default_rng(seed)
    box = stream.inception_crop_box(height, width, rng)
    reference = full_decode_resized_crop(encoded, box, CROP_SIZE).astype(np.float64)
    if rng.random() < 0.5:
      reference = reference[:, ::-1]
    out = transform.random_map({"image": encoded, "label": 3}, np.random.default_rng(seed))
    assert np.abs(out["image"].astype(np.float64) - reference).mean() < 4


def test_greyscale_jpegs_come_out_as_rgb():
  # ImageNet holds greyscale JPEGs; the model takes 3 channels.
  image = PIL.Image.fromarray(prepare.synthetic_image(0, "train", 0, label=0))  # 375 x 500.
  out = io.BytesIO()
  image.convert("L").save(out, format="JPEG", quality=90)
  for size in (CROP_SIZE, 224):  # Decoded at 1/4 and at full size.
    crop = stream.eval_crop(out.getvalue(), size)
    assert crop.shape == (size, size, 3)
    np.testing.assert_array_equal(crop[..., 0], crop[..., 2])


@pytest.mark.parametrize("encoded", [b"not a jpeg", synthetic_jpeg(0)[:5000]],
                         ids=["not_an_image", "truncated"])
def test_an_undecodable_image_names_its_record_in_one_line(encoded):
  element = {"image": encoded, "label": 1, "file_name": b"n01440764_1.JPEG"}
  with pytest.raises(ValueError, match=r"^cannot decode the image of record n01440764_1\.JPEG: "):
    stream.TrainPreprocess(image_size=CROP_SIZE).random_map(element, np.random.default_rng(0))
  with pytest.raises(ValueError, match="n01440764_1.JPEG"):
    stream.EvalPreprocess(image_size=CROP_SIZE).map(element)


@pytest.fixture(scope="module")
def synthetic_imagenet_cfg(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("synthetic_imagenet"))
  prepare.prepare_synthetic_imagenet(data_dir, num_examples=12, num_validation=5, threads=2)
  cfg = config_lib.default_config().dataset
  cfg.name = "imagenet2012"
  cfg.data_dir = data_dir
  cfg.eval_split = "validation"
  cfg.image_size = 224
  cfg.worker_count = 0
  return cfg


def test_imagenet_batches_have_the_model_shapes_without_tensorflow(synthetic_imagenet_cfg):
  train = take(stream.make_train_dataset(synthetic_imagenet_cfg, global_batch_size=4, seed=0), 2)
  evaluation = list(stream.make_eval_dataset(synthetic_imagenet_cfg, global_batch_size=4))
  for batch in train + evaluation:
    assert batch["image"].shape == (4, 224, 224, 3)
    assert batch["image"].dtype == np.uint8
    assert batch["label"].dtype == np.int32
  assert len(evaluation) == 2  # 5 examples, padded to 8.
  assert np.concatenate([b["mask"] for b in evaluation]).sum() == 5
  assert "tensorflow" not in sys.modules
