"""TF-free preparation writes the canonical TFDS datasets, which stock tfds.data_source reads."""

from __future__ import annotations

import gzip
import importlib.util
import io
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import tensorflow_datasets as tfds

from resnet_jax import prepare

DEBIAN_DIR = Path(prepare.DEBIAN_FASHION_MNIST_DIR)
CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                 "truck"]


def raw_idx(filename: str) -> np.ndarray:
  """Parses one of Debian's gzipped idx files independently of the code under test."""
  raw = gzip.open(DEBIAN_DIR / filename).read()
  header = 16 if "images" in filename else 8
  data = np.frombuffer(raw, np.uint8, offset=header)
  return data.reshape(-1, 28, 28) if "images" in filename else data


@pytest.fixture(scope="module")
def fashion_mnist(prepared_data_dir):
  return tfds.data_source("fashion_mnist", data_dir=prepared_data_dir)


def test_fashion_mnist_has_60000_train_and_10000_test_examples(fashion_mnist):
  assert {split: len(source) for split, source in fashion_mnist.items()} == {
      "train": 60000, "test": 10000}


def test_fashion_mnist_records_are_28x28x1_uint8_images_with_labels_below_10(fashion_mnist):
  for record in fashion_mnist["test"].__getitems__([0, 1, 9999]):
    assert record["image"].shape == (28, 28, 1)
    assert record["image"].dtype == np.uint8
    assert 0 <= record["label"] < 10


def test_stored_records_pair_each_raw_image_with_its_raw_label(fashion_mnist):
  images = raw_idx("train-images-idx3-ubyte.gz")
  labels = raw_idx("train-labels-idx1-ubyte.gz")
  for record in fashion_mnist["train"].__getitems__([0, 1, 59999]):
    [index] = np.flatnonzero((images == record["image"][..., 0]).all(axis=(1, 2)))
    assert record["label"] == labels[index]


def test_fashion_mnist_has_the_stock_builders_version_module_and_class_names(prepared_data_dir):
  info = tfds.builder("fashion_mnist", data_dir=prepared_data_dir).info
  stock = tfds.builder_cls("fashion_mnist")
  assert str(info.version) == str(stock.VERSION) == "3.0.1"
  assert info.module_name == stock.__module__
  assert info.features["label"].names[:2] == ["T-shirt/top", "Trouser"]
  assert info.file_format.value == "array_record"


def test_preparing_again_returns_the_same_dataset_without_touching_it(prepared_data_dir,
                                                                      tmp_path):
  dataset_dir = Path(prepared_data_dir) / "fashion_mnist" / "3.0.1"
  before = {p.name: p.stat().st_mtime_ns for p in dataset_dir.iterdir()}
  # Sources are not even looked at once the dataset exists.
  again = prepare.prepare("fashion_mnist", data_dir=prepared_data_dir,
                          manual_dir=str(tmp_path / "absent"))
  assert again == str(dataset_dir)
  assert {p.name: p.stat().st_mtime_ns for p in dataset_dir.iterdir()} == before


def test_missing_manual_dir_names_the_expected_files_and_debian_package(tmp_path):
  with pytest.raises(FileNotFoundError) as error:
    prepare.prepare("fashion_mnist", data_dir=str(tmp_path / "data"),
                    manual_dir=str(tmp_path / "absent"))
  assert "--manual_dir=DIR with DIR holding train-images-idx3-ubyte.gz" in str(error.value)
  assert "apt-get install dataset-fashion-mnist" in str(error.value)
  assert not (tmp_path / "data" / "fashion_mnist").exists()


def test_foreign_files_in_the_dataset_dir_stop_preparation(tmp_path):
  dataset_dir = tmp_path / "fashion_mnist" / "3.0.1"
  dataset_dir.mkdir(parents=True)
  (dataset_dir / "notes.txt").write_text("mine")
  with pytest.raises(FileExistsError, match="holds no dataset_info.json"):
    prepare.prepare("fashion_mnist", data_dir=str(tmp_path))
  assert (dataset_dir / "notes.txt").read_text() == "mine"


def test_unknown_dataset_is_rejected_with_the_known_ones():
  with pytest.raises(ValueError, match="known datasets: fashion_mnist, mnist, cifar10"):
    prepare.prepare("svhn_cropped")


@pytest.mark.skipif(importlib.util.find_spec("tensorflow") is not None,
                    reason="TensorFlow is installed, so imagenet2012 would really be prepared")
def test_imagenet_without_tensorflow_names_the_install_and_prepare_commands(tmp_path):
  with pytest.raises(ImportError, match=r"pip install -e '\.\[imagenet-prepare\]' && "
                                        r"python -m resnet_jax\.prepare imagenet2012"):
    prepare.prepare("imagenet2012", data_dir=str(tmp_path))


def test_cli_prepares_into_the_given_data_dir_and_prints_it(prepared_data_dir, capsys):
  prepare.main(["fashion_mnist", f"--data_dir={prepared_data_dir}"])
  assert capsys.readouterr().out.strip() == str(Path(prepared_data_dir) / "fashion_mnist" / "3.0.1")


# --- CIFAR-10 from tiny archives in the official layouts. ---

TRAIN_PER_BATCH, NUM_TEST = 2, 3


def fake_cifar10(seed: int = 0):
  """Images uint8 [N, 3072] (channel planes, row-major, as CIFAR stores them) and labels."""
  rng = np.random.default_rng(seed)
  num_train = 5 * TRAIN_PER_BATCH
  return {"train": (rng.integers(0, 256, (num_train, 3072), np.uint8),
                    rng.integers(0, 10, num_train).astype(np.uint8)),
          "test": (rng.integers(0, 256, (NUM_TEST, 3072), np.uint8),
                   rng.integers(0, 10, NUM_TEST).astype(np.uint8))}


def add_member(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
  member = tarfile.TarInfo(name)
  member.size = len(payload)
  tar.addfile(member, io.BytesIO(payload))


def write_python_archive(directory: Path, splits) -> None:
  """cifar-10-python.tar.gz: pickled batches of {b"data", b"labels"} and batches.meta."""
  train_images, train_labels = splits["train"]
  with tarfile.open(directory / "cifar-10-python.tar.gz", "w:gz") as tar:
    for b in range(5):
      part = slice(b * TRAIN_PER_BATCH, (b + 1) * TRAIN_PER_BATCH)
      batch = {b"data": train_images[part], b"labels": train_labels[part].tolist()}
      add_member(tar, f"cifar-10-batches-py/data_batch_{b + 1}", pickle.dumps(batch))
    test_images, test_labels = splits["test"]
    add_member(tar, "cifar-10-batches-py/test_batch",
               pickle.dumps({b"data": test_images, b"labels": test_labels.tolist()}))
    add_member(tar, "cifar-10-batches-py/batches.meta",
               pickle.dumps({b"label_names": [n.encode() for n in CIFAR10_NAMES]}))


def write_binary_archive(directory: Path, splits) -> None:
  """cifar-10-binary.tar.gz: records of <label byte><3072 pixel bytes>, and batches.meta.txt."""
  train_images, train_labels = splits["train"]
  with tarfile.open(directory / "cifar-10-binary.tar.gz", "w:gz") as tar:
    for b in range(5):
      part = slice(b * TRAIN_PER_BATCH, (b + 1) * TRAIN_PER_BATCH)
      records = np.concatenate([train_labels[part, None], train_images[part]], axis=1)
      add_member(tar, f"cifar-10-batches-bin/data_batch_{b + 1}.bin", records.tobytes())
    test_images, test_labels = splits["test"]
    add_member(tar, "cifar-10-batches-bin/test_batch.bin",
               np.concatenate([test_labels[:, None], test_images], axis=1).tobytes())
    add_member(tar, "cifar-10-batches-bin/batches.meta.txt",
               ("\n".join(CIFAR10_NAMES) + "\n\n").encode())


def records_by_index(source) -> dict[int, dict]:
  records = source.__getitems__(range(len(source)))
  ids = [r["id"].decode() if isinstance(r["id"], bytes) else r["id"] for r in records]
  return {int(i.split("_")[1]): r for i, r in zip(ids, records)}


@pytest.mark.parametrize("write_archive", [write_python_archive, write_binary_archive],
                         ids=["python", "binary"])
def test_cifar10_archive_gives_each_id_its_image_in_hwc_and_its_label(write_archive, tmp_path):
  splits = fake_cifar10()
  write_archive(tmp_path, splits)
  prepare.prepare("cifar10", data_dir=str(tmp_path / "data"), manual_dir=str(tmp_path))
  sources = tfds.data_source("cifar10", data_dir=str(tmp_path / "data"))
  for split, (images, labels) in splits.items():
    stored = records_by_index(sources[split])
    assert sorted(stored) == list(range(len(labels)))
    for index, record in stored.items():
      expected = images[index].reshape(3, 32, 32).transpose(1, 2, 0)
      np.testing.assert_array_equal(record["image"], expected)
      assert record["label"] == labels[index]
  info = tfds.builder("cifar10", data_dir=str(tmp_path / "data")).info
  assert info.features["label"].names == CIFAR10_NAMES
  assert str(info.version) == str(tfds.builder_cls("cifar10").VERSION)
  assert os.path.basename(info.data_dir) == str(info.version)


# --- A synthetic imagenet2012, for benchmarks and tests. ---

SYNTHETIC_TRAIN, SYNTHETIC_VALIDATION = 24, 6


@pytest.fixture(scope="module")
def synthetic_imagenet(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("synthetic_imagenet"))
  prepare.prepare_synthetic_imagenet(data_dir, num_examples=SYNTHETIC_TRAIN,
                                     num_validation=SYNTHETIC_VALIDATION, seed=5, threads=2)
  return data_dir


def jpeg_records(data_dir: str, split: str) -> list[dict]:
  source = tfds.data_source("imagenet2012", split=split, data_dir=data_dir,
                            decoders={"image": tfds.decode.SkipDecoding()})
  return source.__getitems__(range(len(source)))


def test_synthetic_imagenet_is_read_as_imagenet2012_with_its_features_and_splits(
    synthetic_imagenet):
  sources = tfds.data_source("imagenet2012", data_dir=synthetic_imagenet)
  assert {split: len(source) for split, source in sources.items()} == {
      "train": SYNTHETIC_TRAIN, "validation": SYNTHETIC_VALIDATION}
  record = sources["train"][0]
  assert set(record) == {"image", "label", "file_name"}
  assert record["image"].dtype == np.uint8 and record["image"].shape[2] == 3
  info = tfds.builder("imagenet2012", data_dir=synthetic_imagenet).info
  stock = tfds.builder_cls("imagenet2012")
  assert str(info.version) == str(stock.VERSION)
  assert info.features["label"].num_classes == 1000
  assert info.file_format.value == "array_record"
  dataset_info = Path(synthetic_imagenet, "imagenet2012", str(info.version), "dataset_info.json")
  assert "SYNTHETIC" in dataset_info.read_text()


def test_synthetic_labels_are_the_index_modulo_1000_and_named_like_imagenet_files(
    synthetic_imagenet):
  names = tfds.builder("imagenet2012", data_dir=synthetic_imagenet).info.features["label"].names
  train = jpeg_records(synthetic_imagenet, "train")
  assert sorted(r["label"] for r in train) == list(range(SYNTHETIC_TRAIN))
  for record in train:
    assert record["file_name"].decode() == f"{names[record['label']]}_{record['label']}.JPEG"
  validation = jpeg_records(synthetic_imagenet, "validation")
  assert sorted(r["file_name"].decode() for r in validation) == [
      f"ILSVRC2012_val_{i:08d}.JPEG" for i in range(1, SYNTHETIC_VALIDATION + 1)]


def test_synthetic_images_are_jpegs_of_imagenet_sizes(synthetic_imagenet):
  records = jpeg_records(synthetic_imagenet, "train")
  sizes = [PIL.Image.open(io.BytesIO(r["image"])).size for r in records]
  assert all(PIL.Image.open(io.BytesIO(r["image"])).format == "JPEG" for r in records)
  assert all(250 * 9 // 16 <= min(s) and max(s) <= 800 for s in sizes)
  assert (500, 375) in sizes and any(w < h for w, h in sizes)  # Landscape 4:3, and portraits.
  # Photographs of 500 x 375 at quality 90 are about 100 KB; flat colours would be a few KB.
  at_500x375 = [len(r["image"]) for r, s in zip(records, sizes) if s == (500, 375)]
  assert 70_000 < np.mean(at_500x375) < 140_000


def test_synthetic_images_are_fixed_by_the_seed():
  image = prepare.synthetic_image(5, "train", 3, label=3)
  np.testing.assert_array_equal(image, prepare.synthetic_image(5, "train", 3, label=3))
  other_seed = prepare.synthetic_image(6, "train", 3, label=3)
  assert other_seed.shape != image.shape or not np.array_equal(other_seed, image)
  # Not flat: neighbouring pixels differ, as in photographs.
  assert np.abs(np.diff(image.astype(int), axis=1)).mean() > 5


def test_synthetic_imagenet_written_twice_holds_the_same_records(synthetic_imagenet, tmp_path):
  prepare.prepare_synthetic_imagenet(str(tmp_path), num_examples=SYNTHETIC_TRAIN,
                                     num_validation=SYNTHETIC_VALIDATION, seed=5, threads=1)
  by_name = lambda records: {r["file_name"]: r["image"] for r in records}
  assert (by_name(jpeg_records(str(tmp_path), "validation"))
          == by_name(jpeg_records(synthetic_imagenet, "validation")))


def test_shorter_side_stores_smaller_images_and_keeps_small_ones(tmp_path):
  prepare.prepare_synthetic_imagenet(str(tmp_path), num_examples=6, num_validation=1,
                                     shorter_side=256, threads=2)
  for record in jpeg_records(str(tmp_path), "train"):
    index = record["label"]  # Below 1000, the label is the index.
    original = prepare.synthetic_image(0, "train", index, label=index).shape[:2]
    assert min(PIL.Image.open(io.BytesIO(record["image"])).size) == min(256, *original)
  small = prepare.encode_jpeg(np.zeros((100, 200, 3), np.uint8))
  assert prepare.shrink_jpeg(small, 256) == small
  shrunk = PIL.Image.open(io.BytesIO(prepare.shrink_jpeg(small, 50)))
  assert shrunk.size == (100, 50) and shrunk.format == "JPEG"


@pytest.mark.parametrize("argv, message", [
    (["synthetic_imagenet", "--num_examples=10"], "give it a --data_dir of its own"),
    (["synthetic_imagenet", "--data_dir=X"], "needs --num_examples=N"),
    (["synthetic_imagenet", "--data_dir=X", "--num_examples=0"], "at least one example"),
    (["fashion_mnist", "--shorter_side=256"], "--shorter_side applies to imagenet2012"),
    (["imagenet2012", "--shorter_side=0"], "must be a positive number of pixels"),
    (["mnist", "--num_examples=5"], "are for synthetic_imagenet only"),
])
def test_bad_prepare_arguments_stop_with_one_line(argv, message, capsys, tmp_path):
  with pytest.raises(SystemExit) as exit_info:
    prepare.main(argv)
  assert exit_info.value.code == 2
  error = capsys.readouterr().err.strip().splitlines()[-1]
  assert message in error
  assert not Path("X").exists()
