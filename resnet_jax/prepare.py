"""Prepares the canonical TFDS datasets without TensorFlow.

    python -m resnet_jax.prepare fashion_mnist [--data_dir=DIR] [--manual_dir=DIR]
    python -m resnet_jax.prepare synthetic_imagenet --data_dir=DIR --num_examples=N [--seed=S]

The stock TFDS builders of mnist, fashion_mnist, cifar10 and cifar100 read their source files with
TensorFlow and encode images with it. Here each stock builder is subclassed to read the same files
with numpy and encode PNGs with Pillow; everything else (name, version, features, splits, example
keys and hence TFDS's shuffled record order, the ArrayRecord writer, dataset_info.json) is the stock
builder's, so stock `tfds.data_source(name)` reads the result.

Sources: a `manual_dir` holding the official files, else (fashion_mnist) Debian's copy from
`apt-get install dataset-fashion-mnist`, else the official download, checked against TFDS's
registered checksums. imagenet2012 needs the stock builder and hence TensorFlow
(`pip install -e '.[imagenet-prepare]'`).

`synthetic_imagenet` writes a stand-in for imagenet2012 with no download: the stock builder's
name, version, features and splits (train, validation), so `tfds.data_source("imagenet2012",
data_dir=DIR)` and the training pipeline read it as they read the real one, but its JPEGs are
generated (`synthetic_image`), for benchmarks and tests. Its dataset_info.json says it is
synthetic, and it needs a `--data_dir` of its own, so it is never mistaken for the real one.

`--shorter_side=S` (imagenet2012, synthetic_imagenet) stores every image whose shorter side is
over S pixels resized to a shorter side of S and re-encoded as a JPEG of quality 90: smaller
files that decode faster (README, "ImageNet input"). Prepare it into its own `--data_dir`.

TFDS writes into a temporary directory and renames it when complete, so an existing prepared
dataset is never overwritten: preparing it again returns at once.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import gzip
import importlib.util
import io
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
SYNTHETIC_IMAGENET = "synthetic_imagenet"  # Written as imagenet2012, in a data_dir of its own.
# The datasets whose stored images --shorter_side can shrink.
SHRINKABLE = ("imagenet2012", SYNTHETIC_IMAGENET)
# The quality of the JPEGs this module writes: that of the ImageNet files FFCV trains from
# (ffcv-imagenet's README).
JPEG_QUALITY = 90


def command(name: str, data_dir: str | None = None) -> str:
  """The shell command that prepares dataset `name` into `data_dir` (None: TFDS's default)."""
  flag = f" --data_dir={data_dir}" if data_dir else ""
  if name == "imagenet2012":
    return (f"pip install -e '.[imagenet-prepare]' && python -m resnet_jax.prepare imagenet2012 "
            f"--manual_dir=DIR{flag}   (DIR holding {' and '.join(IMAGENET_FILES)}; this runs "
            f"the stock TFDS builder, like `tfds build imagenet2012 --manual_dir=DIR "
            f"--file_format=array_record`)")
  return f"python -m resnet_jax.prepare {name}{flag}"


def prepare(name: str, *, data_dir: str | None = None, manual_dir: str | None = None,
            shorter_side: int | None = None) -> str:
  """Prepares dataset `name` in TFDS's ArrayRecord format; returns its directory.

  Args:
    name: one of DATASETS.
    data_dir: TFDS data directory; None means TFDS's default ($TFDS_DATA_DIR or
      ~/tensorflow_datasets).
    manual_dir: a directory holding the official source files. None: Debian's Fashion-MNIST
      files where installed, otherwise the official download.
    shorter_side: imagenet2012 only: store images with a shorter side over this many pixels
      resized to it (None: as they are).

  Returns:
    The prepared dataset's directory, `data_dir/name/version`.

  Raises:
    ValueError: unknown `name`.
    FileNotFoundError: the source files are neither in `manual_dir` nor downloadable.
    ImportError: imagenet2012 without TensorFlow.
  """
  if name not in DATASETS:
    raise ValueError(f"cannot prepare {name!r}; known datasets: {', '.join(DATASETS)}")
  _check_shorter_side(name, shorter_side)
  if name == "imagenet2012":
    return _prepare_imagenet(data_dir, manual_dir, shorter_side)
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
  reader = _IdxReader if name in ("mnist", "fashion_mnist") else _CifarReader
  return _stock_builder_with(name, reader, data_dir, source_dir=source_dir, filenames=filenames,
                             url=_SOURCES[name][0])


def _stock_builder_with(name: str, mixin: type, data_dir: str | None,
                        **attributes) -> tfds.core.DatasetBuilder:
  """The stock TFDS builder of `name` with `mixin`'s methods first, `attributes` set on it."""
  stock = tfds.builder_cls(name)

  class TfFreeBuilder(mixin, stock, skip_registration=True):
    pass

  TfFreeBuilder.name = stock.name
  # The stock module: dataset_info.json records it, and TFDS looks up the registered checksums
  # of downloads beside it. Set after creation so TFDS's registry of classes by module is untouched.
  TfFreeBuilder.__module__ = stock.__module__
  for key, value in attributes.items():
    setattr(TfFreeBuilder, key, value)
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


def _check_shorter_side(name: str, shorter_side: int | None) -> None:
  if shorter_side is None:
    return
  if name not in SHRINKABLE:
    raise ValueError(f"--shorter_side applies to {' and '.join(SHRINKABLE)}, not {name}")
  if shorter_side < 1:
    raise ValueError(f"--shorter_side must be a positive number of pixels; got {shorter_side}")


def _prepare_imagenet(data_dir: str | None, manual_dir: str | None,
                      shorter_side: int | None) -> str:
  """The stock TFDS builder, which needs TensorFlow to read the JPEG archives."""
  builder = tfds.builder("imagenet2012", data_dir=data_dir)
  if _is_prepared(Path(builder.data_dir)):
    return builder.data_dir
  if importlib.util.find_spec("tensorflow") is None:
    raise ImportError(f"preparing imagenet2012 runs the stock TFDS builder, which needs "
                      f"TensorFlow; run:\n  {command('imagenet2012', data_dir)}")
  if shorter_side is not None:
    builder = _stock_builder_with("imagenet2012", _ShrinkImages, data_dir,
                                  shorter_side=shorter_side)
  builder.download_and_prepare(
      file_format="array_record",
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir,
                                                   try_download_gcs=False))
  return builder.data_dir


class _ShrinkImages:
  """Stores each image the stock builder yields with its shorter side at most `shorter_side`."""

  shorter_side: int

  def _generate_examples(self, *args, **kwargs):
    for key, record in super()._generate_examples(*args, **kwargs):
      image = record["image"]  # The stock builder yields file objects of the original JPEGs.
      encoded = image if isinstance(image, bytes) else image.read()
      yield key, {**record, "image": shrink_jpeg(encoded, self.shorter_side)}


def shrink_jpeg(encoded: bytes, shorter_side: int) -> bytes:
  """`encoded` (a JPEG) as it is if its shorter side is at most `shorter_side` pixels, else
  resized to that shorter side (aspect ratio kept) and re-encoded as RGB at JPEG_QUALITY."""
  image = PIL.Image.open(io.BytesIO(encoded))
  width, height = image.size
  if min(width, height) <= shorter_side:
    return encoded
  scale = shorter_side / min(width, height)
  size = (max(1, round(width * scale)), max(1, round(height * scale)))
  image = image.convert("RGB").resize(size, PIL.Image.Resampling.LANCZOS)
  return encode_jpeg(image)


def encode_jpeg(image: PIL.Image.Image | np.ndarray) -> bytes:
  """`image` (PIL, or uint8 [H, W, 3]) as JPEG bytes at JPEG_QUALITY."""
  if isinstance(image, np.ndarray):
    image = PIL.Image.fromarray(image)
  out = io.BytesIO()
  image.save(out, format="JPEG", quality=JPEG_QUALITY)
  return out.getvalue()


def prepare_synthetic_imagenet(data_dir: str, *, num_examples: int,
                               num_validation: int | None = None, seed: int = 0,
                               shorter_side: int | None = None,
                               threads: int | None = None) -> str:
  """Writes a synthetic imagenet2012 (see the module docstring) into `data_dir`.

  Args:
    data_dir: the TFDS data directory; required, and best one no real imagenet2012 will share.
    num_examples: training examples; labels are index % 1000, so 1000 or more cover every class.
    num_validation: validation examples; None: num_examples // 25 (ILSVRC-2012's ratio, about),
      at least 1.
    seed: fixes every image; the same arguments write the same records.
    shorter_side: as for `prepare`: store images at most this many pixels on the shorter side.
    threads: images encoded at once (PIL and numpy release the GIL); None: one per core.

  Returns:
    The prepared dataset's directory, `data_dir/imagenet2012/5.1.0`.
  """
  if num_validation is None:
    num_validation = max(1, num_examples // 25)
  _check_synthetic(data_dir, num_examples, num_validation)
  _check_shorter_side(SYNTHETIC_IMAGENET, shorter_side)
  builder = _stock_builder_with(
      "imagenet2012", _SyntheticImagenet, data_dir, num_examples=num_examples,
      num_validation=num_validation, seed=seed, shorter_side=shorter_side,
      threads=threads or os.cpu_count() or 1)
  if _is_prepared(Path(builder.data_dir)):
    return builder.data_dir
  builder.download_and_prepare(file_format="array_record")
  return builder.data_dir


def _check_synthetic(data_dir: str | None, num_examples: int,
                     num_validation: int | None) -> None:
  if not data_dir:
    raise ValueError(f"{SYNTHETIC_IMAGENET} writes a dataset named imagenet2012: give it a "
                     f"--data_dir of its own, so it is never taken for the real one")
  if num_examples < 1 or (num_validation is not None and num_validation < 1):
    raise ValueError(f"{SYNTHETIC_IMAGENET} needs at least one example per split; got "
                     f"num_examples={num_examples}, num_validation={num_validation}")


# Synthetic images: ImageNet's typical sizes. Many ILSVRC-2012 photographs are 500 pixels on the
# longer side (500 x 375, 500 x 333), some of them portrait; the rest spread from a few hundred
# pixels up.
_LONGER_SIDE_500 = 0.7
_LONGER_SIDE_RANGE = (250, 800)
_ASPECTS = ((4 / 3, 0.5), (3 / 2, 0.25), (1.0, 0.1), (5 / 4, 0.1), (16 / 9, 0.05))
_PORTRAIT = 0.25
# Content that compresses like a photograph: a smooth random field built coarse to fine (each
# level upsamples the last and adds detail at its own scale, in class-dependent colours), then
# per-pixel luminance noise. Flat colours would compress to a few KB and decode unrealistically
# fast. (downsampling factor, amplitude) per level, set so that files are of photographs' sizes
# (tests/test_prepare.py checks them).
_LEVELS = ((64, 1.0), (16, 0.5), (4, 0.7))
_PIXEL_NOISE = 12.0
_SPLIT_IDS = {"train": 0, "validation": 1}


def synthetic_image(seed: int, split: str, index: int, label: int) -> np.ndarray:
  """Image `index` of `split` of the synthetic ImageNet: uint8 [H, W, 3], a function of its
  arguments only. Its colours are drawn from statistics of (seed, label)."""
  rng = np.random.default_rng([seed, _SPLIT_IDS[split], index])
  class_rng = np.random.default_rng([seed, 2, label])
  if rng.random() < _LONGER_SIDE_500:
    longer = 500
  else:
    longer = int(rng.integers(_LONGER_SIDE_RANGE[0], _LONGER_SIDE_RANGE[1] + 1))
  aspects, weights = zip(*_ASPECTS)
  shorter = round(longer / aspects[rng.choice(len(aspects), p=weights)])
  height, width = (longer, shorter) if rng.random() < _PORTRAIT else (shorter, longer)
  mean = class_rng.uniform(60, 195, 3)
  colours = (class_rng.normal(0, 1, (3, 3)) * class_rng.uniform(15, 30)).astype(np.float32)
  field = None
  for factor, amplitude in _LEVELS:
    size = (max(2, -(-width // factor)), max(2, -(-height // factor)))
    level = rng.standard_normal((size[1], size[0], 3), np.float32) @ colours * amplitude
    if field is not None:
      level += np.asarray(field.resize(size, PIL.Image.Resampling.BICUBIC), np.float32) - 128
    field = PIL.Image.fromarray(np.clip(level + 128, 0, 255).astype(np.uint8))
  image = np.asarray(field.resize((width, height), PIL.Image.Resampling.BICUBIC), np.float32)
  image = image + (mean - 128) + rng.standard_normal((height, width, 1), np.float32) * _PIXEL_NOISE
  return np.clip(image, 0, 255).astype(np.uint8)


class _SyntheticImagenet:
  """Generates imagenet2012's train and validation splits (see synthetic_image)."""

  num_examples: int
  num_validation: int
  seed: int
  shorter_side: int | None
  threads: int

  def _split_generators(self, dl_manager):
    del dl_manager
    self.info.as_proto.description = (
        f"SYNTHETIC stand-in for ILSVRC-2012 written by resnet_jax.prepare "
        f"{SYNTHETIC_IMAGENET} (seed {self.seed}, shorter side {self.shorter_side or 'as drawn'}): "
        f"generated JPEGs, not photographs; for benchmarks and tests only.")
    return {"train": self._generate_examples("train", self.num_examples),
            "validation": self._generate_examples("validation", self.num_validation)}

  def _generate_examples(self, split: str, count: int):
    synsets = self.info.features["label"].names

    def example(index: int):
      label = index % len(synsets)
      encoded = encode_jpeg(synthetic_image(self.seed, split, index, label))
      if self.shorter_side is not None:
        encoded = shrink_jpeg(encoded, self.shorter_side)
      # The real files' names: n01440764_10026.JPEG (train), ILSVRC2012_val_00000001.JPEG.
      name = (f"{synsets[label]}_{index}.JPEG" if split == "train"
              else f"ILSVRC2012_val_{index + 1:08d}.JPEG")
      return name, {"file_name": name, "image": encoded, "label": label}

    chunk = 64 * self.threads  # Bounds the encoded images held at once.
    with concurrent.futures.ThreadPoolExecutor(self.threads) as pool:
      for start in range(0, count, chunk):
        yield from pool.map(example, range(start, min(start + chunk, count)))


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("name", choices=(*DATASETS, SYNTHETIC_IMAGENET))
  parser.add_argument("--data_dir", default=None, help="TFDS data directory (default: TFDS's)")
  parser.add_argument("--manual_dir", default=None, help="directory holding the source files")
  parser.add_argument("--shorter_side", type=int, default=None,
                      help=f"{' and '.join(SHRINKABLE)}: store images at most this many pixels "
                           f"on the shorter side (default: as they are)")
  synthetic = parser.add_argument_group(f"{SYNTHETIC_IMAGENET} only")
  synthetic.add_argument("--num_examples", type=int, default=None, help="training examples")
  synthetic.add_argument("--num_validation", type=int, default=None,
                         help="validation examples (default: num_examples // 25)")
  synthetic.add_argument("--seed", type=int, default=0, help="fixes every image")
  args = parser.parse_args(argv)
  synthetic_only = {"--num_examples": args.num_examples, "--num_validation": args.num_validation}
  if args.name != SYNTHETIC_IMAGENET and any(v is not None for v in synthetic_only.values()):
    parser.error(f"{' and '.join(synthetic_only)} are for {SYNTHETIC_IMAGENET} only")
  if args.name == SYNTHETIC_IMAGENET and args.num_examples is None:
    parser.error(f"{SYNTHETIC_IMAGENET} needs --num_examples=N")
  try:  # Bad arguments are refused before any work, in one line.
    _check_shorter_side(args.name, args.shorter_side)
    if args.name == SYNTHETIC_IMAGENET:
      _check_synthetic(args.data_dir, args.num_examples, args.num_validation)
  except ValueError as e:
    parser.error(str(e))
  if args.name == SYNTHETIC_IMAGENET:
    path = prepare_synthetic_imagenet(
        args.data_dir, num_examples=args.num_examples, num_validation=args.num_validation,
        seed=args.seed, shorter_side=args.shorter_side)
  else:
    path = prepare(args.name, data_dir=args.data_dir, manual_dir=args.manual_dir,
                   shorter_side=args.shorter_side)
  print(path)

if __name__ == "__main__":
  main()
