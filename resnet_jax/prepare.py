"""Prepares the canonical TFDS datasets without TensorFlow.

    python -m resnet_jax.prepare fashion_mnist [--data_dir=DIR] [--manual_dir=DIR]

The stock TFDS builders of mnist, fashion_mnist, cifar10 and cifar100 read their source files with
TensorFlow and encode images with it. Here each stock builder is subclassed to read the same files
with numpy and encode PNGs with Pillow; everything else (name, version, features, splits, example
keys and hence TFDS's shuffled record order, the ArrayRecord writer, dataset_info.json) is the stock
builder's, so stock `tfds.data_source(name)` reads the result.

Sources: a `manual_dir` holding the official files, else (fashion_mnist) Debian's copy from
`apt-get install dataset-fashion-mnist`, else the official download, checked against TFDS's
registered checksums. imagenet2012 needs the stock builder and hence TensorFlow
(`pip install -e '.[imagenet-prepare]'`).

TFDS writes into a temporary directory and renames it when complete, so an existing prepared
dataset is never overwritten: preparing it again returns at once.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import os
import pickle
import socket
import tarfile
import typing
import urllib.parse
from pathlib import Path

import numpy as np
import PIL.Image
import tensorflow_datasets as tfds

from resnet_jax.config import DATASETS

DEBIAN_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"

_IDX_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
              "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")

# The files each dataset is prepared from, as the official sites name them, and where they are
# downloaded from. CIFAR: the first archive is the one TFDS downloads; the python-pickle archive
# (same images, same order) is accepted too because most mirrors and caches hold that one.
_SOURCES = {
    "mnist": ("https://storage.googleapis.com/cvdf-datasets/mnist/", (_IDX_FILES,)),
    "fashion_mnist": ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
                      (_IDX_FILES,)),
    "cifar10": ("https://www.cs.toronto.edu/~kriz/",
                (("cifar-10-binary.tar.gz",), ("cifar-10-python.tar.gz",))),
    "cifar100": ("https://www.cs.toronto.edu/~kriz/",
                 (("cifar-100-binary.tar.gz",), ("cifar-100-python.tar.gz",))),
}

IMAGENET_FILES = ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar")


def command(name: str, data_dir: str | None = None) -> str:
  """The shell command that prepares dataset `name` into `data_dir` (None: TFDS's default)."""
  flag = f" --data_dir={data_dir}" if data_dir else ""
  if name == "imagenet2012":
    return (f"pip install -e '.[imagenet-prepare]' && python -m resnet_jax.prepare imagenet2012 "
            f"--manual_dir=DIR{flag}   (DIR holding {' and '.join(IMAGENET_FILES)}; this runs "
            f"the stock TFDS builder, like `tfds build imagenet2012 --manual_dir=DIR "
            f"--file_format=array_record`)")
  return f"python -m resnet_jax.prepare {name}{flag}"


def prepare(name: str, *, data_dir: str | None = None, manual_dir: str | None = None) -> str:
  """Prepares dataset `name` in TFDS's ArrayRecord format; returns its directory.

  Args:
    name: one of DATASETS.
    data_dir: TFDS data directory; None means TFDS's default ($TFDS_DATA_DIR or
      ~/tensorflow_datasets).
    manual_dir: a directory holding the official source files. None: Debian's Fashion-MNIST
      files where installed, otherwise the official download.

  Returns:
    The prepared dataset's directory, `data_dir/name/version`.

  Raises:
    ValueError: unknown `name`.
    FileNotFoundError: the source files are neither in `manual_dir` nor downloadable.
    ImportError: imagenet2012 without TensorFlow.
  """
  if name not in DATASETS:
    raise ValueError(f"cannot prepare {name!r}; known datasets: {', '.join(DATASETS)}")
  if name == "imagenet2012":
    return _prepare_imagenet(data_dir, manual_dir)
  dataset_dir = Path(tfds.builder(name, data_dir=data_dir).data_dir)
  if _is_prepared(dataset_dir):
    return str(dataset_dir)
  source_dir, filenames = _find_sources(name, manual_dir)
  builder = _tf_free_builder(name, data_dir, source_dir, filenames)
  builder.download_and_prepare(
      file_format="array_record",
      # The GCS copies TFDS hosts are TFRecord files, which need TensorFlow to read.
      download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return builder.data_dir


def _is_prepared(dataset_dir: Path) -> bool:
  """Whether `dataset_dir` holds a complete dataset; refuses to touch a foreign partial one.

  TFDS builds a dataset in a temporary directory and renames it only when complete, so a
  version directory without dataset_info.json was not left by TFDS. An empty one is removed;
  anything else may be someone's data and stops preparation.
  """
  if (dataset_dir / "dataset_info.json").exists():
    return True
  if dataset_dir.is_dir():
    if any(dataset_dir.iterdir()):
      raise FileExistsError(
          f"{dataset_dir} exists but holds no dataset_info.json, so it is not a prepared TFDS "
          f"dataset; move it away and prepare again")
    dataset_dir.rmdir()
  return False


def _find_sources(name: str, manual_dir: str | None) -> tuple[Path | None, tuple[str, ...]]:
  """Where `name`'s source files are: (a local directory, its files) or (None, files to download).

  Raises FileNotFoundError, listing the ways to provide them, when they are neither in
  `manual_dir` nor (manual_dir None) in Debian's directory or on the reachable official site.
  """
  url, alternatives = _SOURCES[name]
  if manual_dir is None and name == "fashion_mnist":
    candidates = [Path(DEBIAN_FASHION_MNIST_DIR)]
  else:
    candidates = [] if manual_dir is None else [Path(manual_dir)]
  for directory in candidates:
    for filenames in alternatives:
      if all((directory / f).is_file() for f in filenames):
        return directory, filenames
  if manual_dir is None and _reachable(url):
    return None, alternatives[0]
  ways = [f"pass --manual_dir=DIR with DIR holding {' or '.join(map(', '.join, alternatives))}"]
  if name == "fashion_mnist":
    ways.insert(0, f"install Debian's copy: apt-get install dataset-fashion-mnist "
                   f"(it puts the files in {DEBIAN_FASHION_MNIST_DIR})")
  if manual_dir is not None:
    missing = f"they are not in manual_dir {manual_dir}"
  else:
    missing = " and ".join([f"they are not in {d}" for d in candidates]
                           + [f"{url} is unreachable"])
  raise FileNotFoundError(f"cannot prepare {name}: no source files ({missing}). To provide "
                          f"them, " + "; or ".join(ways) + ".")


def _reachable(url: str, timeout_s: float = 5.0) -> bool:
  """Whether a TCP connection to `url`'s host opens: TFDS's own retries take minutes offline."""
  parsed = urllib.parse.urlsplit(url)
  port = parsed.port or (443 if parsed.scheme == "https" else 80)
  try:
    socket.create_connection((parsed.hostname, port), timeout=timeout_s).close()
  except OSError:
    return False
  return True


def _tf_free_builder(name: str, data_dir: str | None, source_dir: Path | None,
                     filenames: tuple[str, ...]) -> tfds.core.DatasetBuilder:
  """The stock TFDS builder of `name`, reading `filenames` from `source_dir` (None: download)."""
  stock = tfds.builder_cls(name)
  reader = _IdxReader if name in ("mnist", "fashion_mnist") else _CifarReader

  class TfFreeBuilder(reader, stock, skip_registration=True):
    pass

  TfFreeBuilder.name = stock.name
  # The stock module: dataset_info.json records it, and TFDS looks up the registered checksums
  # of downloads beside it. Set after creation so TFDS's registry of classes by module is untouched.
  TfFreeBuilder.__module__ = stock.__module__
  TfFreeBuilder.source_dir = source_dir
  TfFreeBuilder.filenames = filenames
  TfFreeBuilder.url = _SOURCES[name][0]
  return TfFreeBuilder(data_dir=data_dir, file_format="array_record")


class _Sources:
  """Where a builder's source files come from: a local directory or the official site."""

  source_dir: Path | None
  filenames: tuple[str, ...]
  url: str

  def source_paths(self, dl_manager) -> dict[str, Path]:
    """{filename: local path}, downloading (checksums verified by TFDS) when there is no dir."""
    if self.source_dir is not None:
      return {f: self.source_dir / f for f in self.filenames}
    return dl_manager.download({f: self.url + f for f in self.filenames})


class _IdxReader(_Sources):
  """Reads MNIST and Fashion-MNIST from their four gzipped idx files."""

  def _split_generators(self, dl_manager):
    paths = self.source_paths(dl_manager)
    return {split: self._generate_examples(paths[f"{prefix}-images-idx3-ubyte.gz"],
                                           paths[f"{prefix}-labels-idx1-ubyte.gz"])
            for split, prefix in (("train", "train"), ("test", "t10k"))}

  def _generate_examples(self, images_path, labels_path):
    images, labels = read_idx(images_path), read_idx(labels_path)
    # The stock builder's keys: the index in the file. TFDS orders records by a hash of the key.
    for index, (image, label) in enumerate(zip(images, labels)):
      yield index, {"image": PIL.Image.fromarray(image), "label": int(label)}


def read_idx(path: str | os.PathLike) -> np.ndarray:
  """The array in a gzipped idx file (MNIST's format): uint8 [N, ...]."""
  with gzip.open(path, "rb") as f:
    raw = f.read()
  # Header: two zero bytes, the dtype code (0x08: uint8), ndim, then ndim big-endian uint32 sizes.
  if raw[:3] != b"\0\0\x08":
    raise ValueError(f"{path} is not a uint8 idx file")
  ndim = raw[3]
  shape = np.frombuffer(raw, ">u4", count=ndim, offset=4)
  return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(shape)


class _CifarLabel(typing.NamedTuple):
  """Where one label of CIFAR lives in the binary and in the python-pickle archive."""
  names_txt: str  # Binary archive: the class names, one a line.
  meta: str  # Python archive: the pickled dict holding the class names...
  meta_key: bytes  # ...under this key.
  batch_key: bytes  # Python archive: the labels' key in each pickled batch.


# Per dataset, its labels in the order the binary records store them, and each split's batches.
_CIFAR_LABELS = {
    "cifar10": {"label": _CifarLabel("batches.meta.txt", "batches.meta", b"label_names",
                                     b"labels")},
    "cifar100": {"coarse_label": _CifarLabel("coarse_label_names.txt", "meta",
                                             b"coarse_label_names", b"coarse_labels"),
                 "label": _CifarLabel("fine_label_names.txt", "meta", b"fine_label_names",
                                      b"fine_labels")},
}
_CIFAR_BATCHES = {
    "cifar10": {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]},
    "cifar100": {"train": ["train"], "test": ["test"]},
}


class _CifarReader(_Sources):
  """Reads CIFAR-10 and CIFAR-100 from the official binary or python-pickle archive."""

  def _split_generators(self, dl_manager):
    [archive] = self.source_paths(dl_manager).values()
    label_names, splits = read_cifar_archive(archive, self.name)
    # As in the stock builder, the class names come from the archive.
    for key, names in label_names.items():
      self.info.features[key].names = names
    return {split: self._generate_examples(split, images, labels)
            for split, (images, labels) in splits.items()}

  def _generate_examples(self, split, images, labels):
    # The stock builder's keys and ids: the index within the split.
    for index, image in enumerate(images):
      record = {key: int(values[index]) for key, values in labels.items()}
      record["id"] = f"{split}_{index:05d}"
      record["image"] = PIL.Image.fromarray(image)
      yield index, record


def read_cifar_archive(path: str | os.PathLike, name: str):
  """Reads a CIFAR archive (binary or python layout) whole.

  Returns:
    label_names: {label key: class names}.
    splits: {"train" | "test": (images uint8 [N, 32, 32, 3], {label key: uint8 [N]})}.
  """
  members = {}
  with tarfile.open(path, "r:gz") as tar:
    for member in tar:
      if member.isfile():
        members[os.path.basename(member.name)] = tar.extractfile(member).read()
  labels = _CIFAR_LABELS[name]
  binary = all(f"{b}.bin" in members for b in _CIFAR_BATCHES[name]["train"])
  if binary:
    label_names = {key: [n for n in members[lab.names_txt].decode().split("\n") if n]
                   for key, lab in labels.items()}
  else:
    meta = _unpickle(members[next(iter(labels.values())).meta])
    label_names = {key: [n.decode() for n in meta[lab.meta_key]] for key, lab in labels.items()}
  splits = {}
  for split, batch_names in _CIFAR_BATCHES[name].items():
    if binary:
      # Each record: one byte per label, then the image as 3 planes of 32x32.
      records = np.frombuffer(b"".join(members[f"{b}.bin"] for b in batch_names), np.uint8)
      records = records.reshape(-1, len(labels) + 3072)
      pixels = records[:, len(labels):]
      split_labels = {key: records[:, i] for i, key in enumerate(labels)}
    else:
      batches = [_unpickle(members[b]) for b in batch_names]
      pixels = np.concatenate([b[b"data"] for b in batches])
      split_labels = {key: np.concatenate([np.asarray(b[lab.batch_key], np.uint8)
                                           for b in batches])
                      for key, lab in labels.items()}
    images = pixels.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    splits[split] = (np.ascontiguousarray(images), split_labels)
  return label_names, splits


def _unpickle(raw: bytes) -> dict:
  # The official python archive is a pickle (of numpy arrays and lists); only open archives you
  # trust, as with any pickle.
  return pickle.loads(raw, encoding="bytes")


def _prepare_imagenet(data_dir: str | None, manual_dir: str | None) -> str:
  """The stock TFDS builder, which needs TensorFlow to read the JPEG archives."""
  builder = tfds.builder("imagenet2012", data_dir=data_dir)
  if _is_prepared(Path(builder.data_dir)):
    return builder.data_dir
  if importlib.util.find_spec("tensorflow") is None:
    raise ImportError(f"preparing imagenet2012 runs the stock TFDS builder, which needs "
                      f"TensorFlow; run:\n  {command('imagenet2012', data_dir)}")
  builder.download_and_prepare(
      file_format="array_record",
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir,
                                                   try_download_gcs=False))
  return builder.data_dir


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("name", choices=DATASETS)
  parser.add_argument("--data_dir", default=None, help="TFDS data directory (default: TFDS's)")
  parser.add_argument("--manual_dir", default=None, help="directory holding the source files")
  args = parser.parse_args(argv)
  print(prepare(args.name, data_dir=args.data_dir, manual_dir=args.manual_dir))


if __name__ == "__main__":
  main()
