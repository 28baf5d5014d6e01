"""The streaming input pipeline: Grain over a TFDS ArrayRecord split, for data too big for memory.

ImageNet does not fit in host memory, so examples are read from disk, decoded and cropped on the
fly by Grain, in `config.dataset.worker_count` worker processes per host (0 = in the main
process). `tfds.data_source` reads the ArrayRecord files without TensorFlow and hands back the
stored JPEG bytes undecoded (`image: bytes`, `label: int64 []`), so that each image is decoded
only as far as its crop needs. The crop box is drawn from the size in the JPEG header; when the
box will be shrunk by 2, 4 or 8 or more, the JPEG is decoded at 1/2, 1/4 or 1/8 of its size
(libjpeg's DCT scaling, through PIL's `Image.draft`), which costs less than a full decode, and
goes straight into PIL's resize, without a numpy copy in between. The boxes and flips are the
ones a full decode would draw (the same generator calls on the same image size); the pixels
differ from a full decode then resize only in how each block of 2x2 to 8x8 pixels is averaged
(by the decoder's scaled inverse DCT instead of the resize's bilinear weights). Batches leave
worker processes through shared memory (Grain's mp_prefetch) as uint8; the train step
normalises them on the device.

The global stream does not depend on the number of hosts: the split is shuffled as a whole each
epoch and host `p` of `P` takes every P-th example of it, so the examples of global step k are the
same however many hosts share them. Crops are drawn from a per-example generator that Grain
seeds from `seed` and the example's position in the stream, and batches are formed before they
are handed to worker processes, so the stream is the same for any `worker_count`.

Typical use in a training loop:

  train_ds = make_train_dataset(config.dataset, global_batch_size=config.batch_size,
                                seed=config.seed)
  train_iter = iter(prefetch_to_device(train_ds, size=2, sharding=data_sharding))

`train_iter` is a `grain.DatasetIterator` whose state counts only the batches already handed out,
not those still in flight, so it is checkpointed with the run through Grain's Orbax handler:

  manager.save(step, args=ocp.args.Composite(..., data=grain.checkpoint.CheckpointSave(train_iter)))
  manager.restore(step, args=ocp.args.Composite(..., data=grain.checkpoint.CheckpointRestore(
      train_iter)))

A saved state restores only into a pipeline with the same `worker_count` and host count: Grain
records one position per worker process.
"""

from __future__ import annotations

import io
import math

from absl import flags
import grain
import jax
import ml_collections
import numpy as np
import PIL.Image
import tensorflow_datasets as tfds

# Inception-style crop (Szegedy et al. 2015): area and aspect ratio ranges, and how many draws
# to try before falling back to a central crop.
CROP_AREA_RANGE = (0.08, 1.0)
CROP_RATIO_RANGE = (3 / 4, 4 / 3)
CROP_ATTEMPTS = 10
# Evaluation resizes the shorter side to image_size / 0.875 (256 for 224) and keeps the centre.
EVAL_CROP_FRACTION = 0.875

# The JPEG decoder's reduced sizes (libjpeg's DCT scaling), largest first.
DCT_SCALES = (8, 4, 2)

# Each element a worker produces is a whole batch. Two in progress per process let one batch's
# records be read while PIL (which releases the GIL) works on the other; more parallelism comes
# from worker processes, and a deeper buffer would only hold more batches in memory.
_READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=2)

Box = tuple[int, int, int, int]  # (top, left, height, width) in pixels.


def central_crop_box(height: int, width: int) -> Box:
  """The largest central box whose aspect ratio (width / height) lies in CROP_RATIO_RANGE."""
  low, high = CROP_RATIO_RANGE
  crop_height, crop_width = height, width
  if width < low * height:
    crop_height = round(width / low)
  elif width > high * height:
    crop_width = round(height * high)
  return (height - crop_height) // 2, (width - crop_width) // 2, crop_height, crop_width


def inception_crop_box(height: int, width: int, rng: np.random.Generator) -> Box:
  """A random box covering 8%-100% of the image with aspect ratio 3/4-4/3, log-uniform.

  Up to CROP_ATTEMPTS draws; if none fits inside the image, the central box.
  """
  log_low, log_high = (math.log(r) for r in CROP_RATIO_RANGE)
  for _ in range(CROP_ATTEMPTS):
    area = height * width * rng.uniform(*CROP_AREA_RANGE)
    ratio = math.exp(rng.uniform(log_low, log_high))
    crop_width = round(math.sqrt(area * ratio))
    crop_height = round(math.sqrt(area / ratio))
    if 0 < crop_height <= height and 0 < crop_width <= width:
      top = int(rng.integers(0, height - crop_height + 1))
      left = int(rng.integers(0, width - crop_width + 1))
      return top, left, crop_height, crop_width
  return central_crop_box(height, width)


def open_jpeg(encoded: bytes) -> PIL.Image.Image:
  """The image in `encoded`, not yet decoded: PIL reads only the header (its size, its mode)."""
  return PIL.Image.open(io.BytesIO(encoded))


def decode_resized_crop(image: PIL.Image.Image, box: tuple[float, float, float, float],
                        size: int) -> PIL.Image.Image:
  """The `box` (top, left, height, width, in pixels of the full image) of the undecoded
  `image`, decoded and resized to an RGB [size, size] image.

  The JPEG is decoded at 1/8, 1/4 or 1/2 of its size, the smallest at which the box still
  covers at least size x size decoded pixels, so the resize still shrinks or keeps the scale
  and no detail the output could show is lost. Bilinear, antialiased when shrinking; the box may
  have fractional edges.
  """
  top, left, height, width = box
  scale = next((s for s in DCT_SCALES if min(height, width) >= s * size), 1)
  if scale > 1:
    full_width, full_height = image.size
    # draft picks the largest DCT scale at which the image is at least the requested size; the
    # floor division asks for exactly `scale`. It returns the full image's extent in decoded
    # pixels; the decoded image may have one partial pixel more (the last block's remainder).
    drafted = image.draft("RGB", (full_width // scale, full_height // scale))
    # None: not a JPEG, so decoded at full size.
    scale = 1 if drafted is None else full_width / drafted[1][2]
  if image.mode != "RGB":  # Greyscale and CMYK JPEGs.
    image = image.convert("RGB")
  box = (left / scale, top / scale, (left + width) / scale, (top + height) / scale)
  return image.resize((size, size), PIL.Image.Resampling.BILINEAR, box=box)


def eval_box(height: int, width: int, size: int) -> tuple[float, float, float, float]:
  """The box that evaluation resizes to `size`: the centre of an image whose shorter side is
  resized to size / 0.875 (256 for 224), in pixels of the `height` x `width` original."""
  side = size * min(height, width) / round(size / EVAL_CROP_FRACTION)
  return (height - side) / 2, (width - side) / 2, side, side


def eval_crop(encoded: bytes, size: int) -> np.ndarray:
  """The JPEG `encoded` with its shorter side resized to size / 0.875, centre `size` square,
  done as one resize of the matching box of the original image. Returns uint8 [size, size, 3]."""
  image = open_jpeg(encoded)
  width, height = image.size
  return np.asarray(decode_resized_crop(image, eval_box(height, width, size), size))


class TrainPreprocess(grain.transforms.RandomMap):
  """A TFDS example with undecoded image -> {image: uint8 [S, S, 3] random crop, flipped half
  the time; label: int32}."""

  def __init__(self, image_size: int):
    self.image_size = image_size

  def random_map(self, element: dict, rng: np.random.Generator) -> dict:
    try:
      image = open_jpeg(element["image"])
      width, height = image.size
      box = inception_crop_box(height, width, rng)
      image = decode_resized_crop(image, box, self.image_size)
    except OSError as e:  # PIL's error for bytes that are not an image, or a truncated one.
      raise undecodable(element, e) from e
    if rng.random() < 0.5:
      image = image.transpose(PIL.Image.Transpose.FLIP_LEFT_RIGHT)
    return {"image": np.asarray(image), "label": np.int32(element["label"])}


class EvalPreprocess(grain.transforms.Map):
  """A TFDS example with undecoded image -> {image: uint8 [S, S, 3] centre crop; label: int32;
  mask: True}."""

  def __init__(self, image_size: int):
    self.image_size = image_size

  def map(self, element: dict) -> dict:
    try:
      image = eval_crop(element["image"], self.image_size)
    except OSError as e:
      raise undecodable(element, e) from e
    return {"image": image, "label": np.int32(element["label"]), "mask": np.bool_(True)}


def undecodable(element: dict, error: OSError) -> ValueError:
  """The one-line error for a record whose image cannot be decoded, named by its file name."""
  name = element.get("file_name", b"(no file_name)")
  name = name.decode() if isinstance(name, bytes) else name
  return ValueError(f"cannot decode the image of record {name}: {error}")


class EvalPadding(grain.transforms.Map):
  """Any element -> a blank example with mask False, to fill the last eval batch."""

  def __init__(self, image_size: int):
    self.image_size = image_size

  def map(self, element) -> dict:
    del element
    return {"image": np.zeros((self.image_size, self.image_size, 3), np.uint8),
            "label": np.int32(0), "mask": np.bool_(False)}


def data_source(dataset_cfg: ml_collections.ConfigDict, split: str):
  """The TFDS ArrayRecord source of `split`: random access to examples whose `image` is the
  stored (JPEG) bytes, left for the preprocessing to decode as far as it needs."""
  return tfds.data_source(dataset_cfg.name, split=split, data_dir=dataset_cfg.data_dir or None,
                          decoders={"image": tfds.decode.SkipDecoding()})


def host_batch_size(global_batch_size: int, process_count: int) -> int:
  """The share of the global batch one host reads."""
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ValueError(f"global batch size must be a positive multiple of the number of hosts "
                     f"({process_count}); got {global_batch_size}")
  return global_batch_size // process_count


def _process_index_and_count(process_index: int | None,
                             process_count: int | None) -> tuple[int, int]:
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  if not 0 <= index < count:
    raise ValueError(f"process_index must be in [0, process_count={count}); got {index}")
  return index, count


def _to_iter_dataset(ds: grain.MapDataset, worker_count: int) -> grain.IterDataset:
  if worker_count and not flags.FLAGS.is_parsed():
    # Grain 0.2.18 reads one of its absl flags when it starts workers, and fails with an obscure
    # error unless flags were parsed (google/grain#1355). The entry points parse them; a library
    # must not change that global state behind its caller's back.
    raise RuntimeError(
        "Grain worker processes (config.dataset.worker_count > 0) need absl flags parsed: "
        "run through an absl entry point (python -m resnet_jax.main), or call "
        "absl.flags.FLAGS.mark_as_parsed() first (notebooks, tests), or set worker_count=0")
  return ds.to_iter_dataset(_READ_OPTIONS).mp_prefetch(
      grain.MultiprocessingOptions(num_workers=worker_count))


def make_train_dataset(dataset_cfg: ml_collections.ConfigDict, *, global_batch_size: int,
                       seed: int, process_index: int | None = None,
                       process_count: int | None = None) -> grain.IterDataset:
  """This host's endless stream of training batches, reshuffled every epoch.

  Args:
    dataset_cfg: `config.dataset` (name, data_dir, train_split, image_size, worker_count).
    global_batch_size: examples per step over all hosts.
    seed: fixes the shuffle and the crops; the same seed gives the same stream.
    process_index, process_count: this host and the number of hosts; default to jax's.

  Returns:
    A Grain dataset of {image: uint8 [b, S, S, 3], label: int32 [b]} numpy batches,
    b = global_batch_size / process_count, S = dataset_cfg.image_size.
  """
  index, count = _process_index_and_count(process_index, process_count)
  batch_size = host_batch_size(global_batch_size, count)
  ds = (grain.MapDataset.source(data_source(dataset_cfg, dataset_cfg.train_split))
        .seed(seed).shuffle().repeat(None)
        .random_map(TrainPreprocess(dataset_cfg.image_size)))
  # Sharding after the crops keys each example's generator to its global position, so hosts
  # never share crop draws.
  ds = ds[index::count].batch(batch_size, drop_remainder=True)
  return _to_iter_dataset(ds, dataset_cfg.worker_count)


def make_eval_dataset(dataset_cfg: ml_collections.ConfigDict, *, global_batch_size: int,
                      process_index: int | None = None,
                      process_count: int | None = None) -> grain.IterDataset:
  """This host's batches for one pass over the eval split; each `iter()` is a new pass.

  The split is padded to a whole number of global batches with blank examples whose mask is
  False, so every host yields the same number of batches and every example counts once.

  Returns:
    A Grain dataset of {image: uint8 [b, S, S, 3], label: int32 [b], mask: bool [b]} numpy
    batches, b = global_batch_size / process_count.
  """
  index, count = _process_index_and_count(process_index, process_count)
  batch_size = host_batch_size(global_batch_size, count)
  examples = grain.MapDataset.source(data_source(dataset_cfg, dataset_cfg.eval_split))
  num_padding = -len(examples) % global_batch_size
  ds = examples.map(EvalPreprocess(dataset_cfg.image_size))
  if num_padding:
    padding = grain.MapDataset.range(num_padding).map(EvalPadding(dataset_cfg.image_size))
    ds = grain.MapDataset.concatenate([ds, padding])
  ds = ds[index::count].batch(batch_size)
  return _to_iter_dataset(ds, dataset_cfg.worker_count)


def prefetch_to_device(ds: grain.IterDataset, *, size: int,
                       sharding: jax.sharding.Sharding) -> grain.IterDataset:
  """`ds`'s host batches as global jax.Arrays laid out by `sharding`, `size` of them in flight.

  Each host contributes its own batch (`jax.make_array_from_process_local_data`), so with
  `NamedSharding(mesh, PartitionSpec("data"))` the global batch is the hosts' batches stacked.
  A background thread makes the transfers; the iterator's state counts only batches handed out.
  """
  def to_global_arrays(batch: dict) -> dict:
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)

  return grain.experimental.ThreadPrefetchIterDataset(
      ds.map(to_global_arrays), prefetch_buffer_size=size)
