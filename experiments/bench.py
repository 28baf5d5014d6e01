"""Train-step throughput, compile time and peak memory of a ResNet on synthetic data; JAX, and
the same network in PyTorch beside it when PyTorch is installed.

  python experiments/bench.py --model=resnet20 --batch_size=128 --dtype=float32 --steps=10 \
      --warmup=2 --repeats=2 --json_out=/tmp/bench.jsonl

`--model` and `--batch_size` take comma lists (`--model=resnet20,resnet56 --batch_size=64,128`)
for a table. Each measurement runs in its own process (this script, started again with a hidden
`--worker` flag): JAX preallocates 75% of a GPU's memory, and a process's peak memory is a
lifetime maximum, so sharing one would spoil both frameworks' figures.

What is measured, for both frameworks: SGD with Nesterov momentum 0.9 and weight decay 1e-4 on
conv and dense kernels only, on a fixed synthetic uint8 batch already on the device (input is not
measured), normalised inside the step. After `--warmup` steps, `--repeats` timings of `--steps`
steps each, blocked on the result; img/s and ms/step are from the median. JAX's "compile s" is
`jit(...).lower(...).compile()`; PyTorch's is the first step, which holds torch.compile's
compilation when `--torch_compile` is on. Peak memory is the device's peak bytes in use on GPU
and the process's peak resident set size (RSS) on CPU, which includes the framework's own
runtime (about 350-450 MiB at batch 8 here); the table says which.

Measured on this project's 2-core CPU machine, otherwise idle (load average 0.1), resnet20,
batch 128, 32x32x3, float32, 2 warm-up steps, 10 steps x 3 repeats, jax 0.10.2 CPU vs torch
2.13.0+cpu eager, channels_last, 2 threads:

  framework  img/s  ms/step  compile s  peak RSS MiB
  jax        207.0    618.4       1.84           828
  torch      761.1    168.2       0.26           711   (compile s: the first eager step)

XLA's CPU convolutions are the gap; on a loaded machine the ratio swings widely (a run at load
average 5 gave jax 88, torch 39 img/s), so compare only figures taken together.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Callable

# Run as a script, the repository root is not on sys.path.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from resnet_jax import architectures  # noqa: E402  (neither imports JAX)
from resnet_jax import config as config_lib  # noqa: E402

RESULT_PREFIX = "BENCH_RESULT "
FRAMEWORKS = ("jax", "torch")
# Placeholder per-channel statistics in [0, 1] units: any finite values time the same.
NORM_MEAN, NORM_STD = 0.5, 0.25
TORCHVISION_DEPTHS = (18, 34, 50, 101, 152)


@dataclasses.dataclass(frozen=True)
class BenchSpec:
  """One measurement: a network, a batch and a step count.

  image_shape: (H, W, C) of the synthetic uint8 images.
  """
  model: str
  batch_size: int
  dtype: str = "float32"
  image_shape: tuple[int, int, int] = (32, 32, 3)
  num_classes: int = 10
  skip: bool = True
  bn_fast_variance: bool = False
  steps: int = 20
  warmup: int = 3
  repeats: int = 3


class Skipped(Exception):
  """A measurement that cannot run here; the message says why."""


def bench_config(spec: BenchSpec):
  """The run config the JAX side builds from: defaults with the benchmark's model and optimizer."""
  config = config_lib.default_config()
  config.model.name = spec.model
  config.model.skip = spec.skip
  config.model.dtype = spec.dtype
  config.model.bn_fast_variance = spec.bn_fast_variance
  config.optimizer.nesterov = True
  config.optimizer.schedule = "constant"  # The schedule's shape does not change the step's cost.
  config.batch_size = spec.batch_size
  return config


def validate_spec(spec: BenchSpec, num_devices: int = 1) -> None:
  """Raises one ValueError naming what is wrong with `spec` and what is allowed."""
  config_lib.validate(bench_config(spec), num_devices=num_devices)
  errors = [f"{name} must be > 0; got {value}" for name, value in
            (("image size", min(spec.image_shape[:2])), ("channels", spec.image_shape[2]),
             ("num_classes", spec.num_classes), ("steps", spec.steps),
             ("repeats", spec.repeats)) if value <= 0]
  if spec.warmup < 0:
    errors.append(f"warmup must be >= 0; got {spec.warmup}")
  if errors:
    raise ValueError("invalid benchmark:\n  " + "\n  ".join(errors))


def median_seconds_per_step(run_steps: Callable[[int], None], spec: BenchSpec) -> float:
  """Median over `spec.repeats` timings of `spec.steps` steps, after `spec.warmup` steps.

  run_steps(n) runs n steps and returns only once the device has finished them.
  """
  if spec.warmup:
    run_steps(spec.warmup)
  times = []
  for _ in range(spec.repeats):
    start = time.perf_counter()
    run_steps(spec.steps)
    times.append(time.perf_counter() - start)
  return statistics.median(times) / spec.steps


def process_peak_rss_bytes() -> int:
  # Linux reports ru_maxrss in KiB.
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def result_row(spec: BenchSpec, *, framework: str, device: str, seconds_per_step: float,
               compile_s: float, peak_memory_bytes: int, memory_kind: str,
               num_params: int) -> dict:
  """One line of the table and of `--json_out`."""
  return {"device": device, "model": spec.model, "batch_size": spec.batch_size,
          "dtype": spec.dtype, "image_shape": list(spec.image_shape),
          "num_classes": spec.num_classes, "skip": spec.skip,
          "bn_fast_variance": spec.bn_fast_variance, "framework": framework,
          "images_per_s": spec.batch_size / seconds_per_step,
          "ms_per_step": 1000 * seconds_per_step, "compile_s": compile_s,
          "peak_memory_bytes": peak_memory_bytes, "memory_kind": memory_kind,
          "num_params": num_params, "steps": spec.steps, "warmup": spec.warmup,
          "repeats": spec.repeats}


# --- JAX ---

def measure_jax(spec: BenchSpec) -> dict:
  """Times the project's train step, built by `trainer.build` as in training (state and totals
  donated), on every local device: the state replicated, the synthetic batch sharded over
  `parallel.make_mesh()`. Returns a `result_row`.
  """
  import itertools

  import jax
  import numpy as np

  from resnet_jax import data, parallel, sources, steps, trainer

  validate_spec(spec, num_devices=jax.device_count())
  config = bench_config(spec)
  mesh = parallel.make_mesh()
  rng = np.random.default_rng(0)
  batch = jax.device_put({
      "image": rng.integers(0, 256, (spec.batch_size, *spec.image_shape), dtype=np.uint8),
      "label": rng.integers(0, spec.num_classes, spec.batch_size, dtype=np.int32)},
      parallel.batch_sharded(mesh))
  channels = spec.image_shape[2]
  info = data.DatasetInfo("synthetic", num_classes=spec.num_classes,
                          image_shape=spec.image_shape, num_train=spec.batch_size,
                          num_eval=spec.batch_size, mean=(NORM_MEAN,) * channels,
                          std=(NORM_STD,) * channels)
  source = sources.DeviceBatches(itertools.repeat(batch), sources.spec_of(batch))
  bench_trainer = trainer.build(config, info, mesh, source)
  state, totals = bench_trainer.init_state(), bench_trainer.zero_totals()
  compile_s = bench_trainer.compile(state, totals)

  def run_steps(n: int) -> None:
    nonlocal state, totals
    # A Python loop of single steps, as in training: scanning the step loses XLA CPU's fast convs.
    for _ in range(n):
      state, totals, _ = bench_trainer.train(state, totals)
    jax.block_until_ready((state, totals))

  seconds_per_step = median_seconds_per_step(run_steps, spec)
  devices = jax.local_devices()
  stats = [d.memory_stats() or {} for d in devices]
  if all("peak_bytes_in_use" in s for s in stats):
    peak, memory_kind = max(s["peak_bytes_in_use"] for s in stats), "device peak_bytes_in_use"
  else:
    peak, memory_kind = process_peak_rss_bytes(), "process peak RSS"
  device = f"{jax.device_count()}x {devices[0].device_kind}"
  return result_row(spec, framework="jax", device=device, seconds_per_step=seconds_per_step,
                    compile_s=compile_s, peak_memory_bytes=peak, memory_kind=memory_kind,
                    num_params=steps.count_params(state.params))


# --- PyTorch ---

def torch_cifar_resnet(depth: int, *, num_classes: int, in_channels: int = 3, skip: bool = True):
  """The CIFAR ResNet of He et al. 2016 (section 4.2) in PyTorch, shortcut option A.

  Same layers as resnet_jax.models' CIFAR family: 3x3 stem with 16 filters, three stages of
  (depth - 2) / 6 basic blocks with 16/32/64 filters, zero-padded subsampling shortcuts, global
  average pool, dense head. `skip=False` is the plain twin. Input: float [B, C, H, W].
  """
  # Imported here so that the JAX process never loads torch (it would inflate its RSS).
  import torch
  from torch import nn

  class Block(nn.Module):
    """conv-BN-ReLU, conv-BN, add the (option A) shortcut, ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int):
      super().__init__()
      self.branch = nn.Sequential(
          nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(),
          nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False), nn.BatchNorm2d(c_out))
      self.stride, self.extra_channels = stride, c_out - c_in

    def forward(self, x):
      y = self.branch(x)
      if skip:
        shortcut = x[:, :, ::self.stride, ::self.stride]
        y = y + nn.functional.pad(shortcut, (0, 0, 0, 0, 0, self.extra_channels))
      return torch.relu(y)

  n = (depth - 2) // 6
  layers = [nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU()]
  c_in = 16
  for stage, filters in enumerate((16, 32, 64)):
    for b in range(n):
      layers.append(Block(c_in, filters, 2 if stage > 0 and b == 0 else 1))
      c_in = filters
  layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, num_classes)]
  net = nn.Sequential(*layers)
  for m in net.modules():
    if isinstance(m, nn.Conv2d):  # He init, fan_out, as the Flax model.
      nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
  return net


def torch_network(spec: BenchSpec):
  """The PyTorch twin of `spec.model`. Raises Skipped where there is none here."""
  family, depth = architectures.family_and_depth(spec.model)
  channels = spec.image_shape[2]
  if family == "cifar":
    return torch_cifar_resnet(depth, num_classes=spec.num_classes, in_channels=channels,
                              skip=spec.skip)
  if not spec.skip:
    raise Skipped("torchvision has no plain (skip=false) ImageNet ResNet")
  if depth not in TORCHVISION_DEPTHS:
    raise Skipped(f"torchvision has no resnet{depth}")
  try:
    import torchvision
  except Exception as e:  # A torchvision built for another torch fails in many ways.
    raise Skipped(f"torchvision does not import ({type(e).__name__}: {e})") from e
  from torch import nn
  net = getattr(torchvision.models, f"resnet{depth}")(num_classes=spec.num_classes)
  if channels != 3:
    net.conv1 = nn.Conv2d(channels, 64, 7, 2, 3, bias=False)
  return net


def measure_torch(spec: BenchSpec, *, compile_model: bool = False) -> dict:
  """Times one PyTorch train step of the same network; CUDA if available, else CPU.

  channels_last, float32 or bf16 autocast as `spec.dtype`, optionally torch.compile'd. Returns a
  `result_row`; raises Skipped when torch (or the network) is not available.
  """
  validate_spec(spec)
  try:
    import torch
  except ImportError as e:
    raise Skipped("PyTorch is not installed (pip install -e .[torch])") from e
  device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  net = torch_network(spec).to(device, memory_format=torch.channels_last)
  num_params = sum(p.numel() for p in net.parameters())
  # Decay conv and dense kernels only, as optim.weight_decay_mask does.
  decayed = [p for p in net.parameters() if p.ndim > 1]
  others = [p for p in net.parameters() if p.ndim <= 1]
  opt = torch.optim.SGD([{"params": decayed, "weight_decay": 1e-4},
                         {"params": others, "weight_decay": 0.0}],
                        lr=0.1, momentum=0.9, nesterov=True)
  forward = torch.compile(net) if compile_model else net
  generator = torch.Generator().manual_seed(0)
  h, w, c = spec.image_shape
  images = torch.randint(0, 256, (spec.batch_size, c, h, w), dtype=torch.uint8,
                         generator=generator).to(device, memory_format=torch.channels_last)
  labels = torch.randint(0, spec.num_classes, (spec.batch_size,), generator=generator).to(device)
  autocast = torch.autocast(device.type, dtype=torch.bfloat16,
                            enabled=spec.dtype == "bfloat16")

  def step() -> None:
    x = (images.float() / 255 - NORM_MEAN) / NORM_STD
    with autocast:
      logits = forward(x)
    loss = torch.nn.functional.cross_entropy(logits.float(), labels)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()

  def run_steps(n: int) -> None:
    for _ in range(n):
      step()
    if device.type == "cuda":  # CUDA launches are asynchronous; CPU steps finish in step().
      torch.cuda.synchronize()

  net.train()
  if device.type == "cuda":
    torch.cuda.reset_peak_memory_stats()
  start = time.perf_counter()
  run_steps(1)
  compile_s = time.perf_counter() - start
  seconds_per_step = median_seconds_per_step(run_steps, spec)
  if device.type == "cuda":
    peak, memory_kind = torch.cuda.max_memory_allocated(), "device max_memory_allocated"
    name = torch.cuda.get_device_name()
  else:
    peak, memory_kind = process_peak_rss_bytes(), "process peak RSS"
    name = f"cpu ({torch.get_num_threads()} threads)"
  framework = "torch+compile" if compile_model else "torch"
  return result_row(spec, framework=framework, device=f"torch {torch.__version__} {name}",
                    seconds_per_step=seconds_per_step, compile_s=compile_s,
                    peak_memory_bytes=peak, memory_kind=memory_kind, num_params=num_params)


# --- Orchestration: one worker process per measurement, a table at the end ---

def worker_command(spec: BenchSpec, framework: str, torch_compile: bool) -> list[str]:
  """This script, measuring `spec` with `framework` in a fresh process."""
  return [sys.executable, os.path.abspath(__file__), f"--worker={framework}",
          f"--worker_spec={json.dumps(dataclasses.asdict(spec))}",
          f"--torch_compile={torch_compile}"]


def run_worker(spec: BenchSpec, framework: str, torch_compile: bool) -> dict:
  """A row from a fresh process, or {"skipped": reason} / {"failed": the error's last lines}."""
  proc = subprocess.run(worker_command(spec, framework, torch_compile), capture_output=True,
                        text=True, check=False)
  for line in reversed(proc.stdout.splitlines()):
    if line.startswith(RESULT_PREFIX):
      return json.loads(line[len(RESULT_PREFIX):])
  tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
  return {"failed": f"{framework} worker exited {proc.returncode}: {tail}"}


def format_table(rows: list[dict]) -> str:
  """A fixed-width table: device, model, batch, dtype, framework, img/s, ms/step, compile s,
  peak memory in MiB and which memory that is."""
  header = ("device", "model", "batch", "dtype", "framework", "img/s", "ms/step", "compile s",
            "peak MiB", "memory")
  cells = [header] + [
      (r["device"], r["model"], str(r["batch_size"]), r["dtype"], r["framework"],
       f"{r['images_per_s']:.1f}", f"{r['ms_per_step']:.1f}", f"{r['compile_s']:.2f}",
       f"{r['peak_memory_bytes'] / 2**20:.0f}", r["memory_kind"]) for r in rows]
  widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
  return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()
                   for row in cells)


def comma_list(cast: Callable[[str], object]) -> Callable[[str], list]:
  return lambda text: [cast(item.strip()) for item in text.split(",") if item.strip()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  flag = dict(type=config_lib.parse_bool, nargs="?", const=True)  # --x, --x=true, --x=false
  p.add_argument("--model", type=comma_list(str), default=["resnet20"], help="comma list")
  p.add_argument("--batch_size", type=comma_list(int), default=[128], help="comma list")
  p.add_argument("--dtype", default="float32", help=", ".join(architectures.DTYPES))
  p.add_argument("--image_size", type=int, default=32)
  p.add_argument("--channels", type=int, default=3)
  p.add_argument("--num_classes", type=int, default=10)
  p.add_argument("--skip", default=True, help="false: the plain twin", **flag)
  p.add_argument("--bn_fast_variance", default=False, help="one-pass BatchNorm variance",
                 **flag)
  p.add_argument("--steps", type=int, default=20, help="steps per timing")
  p.add_argument("--warmup", type=int, default=3, help="untimed steps after compilation")
  p.add_argument("--repeats", type=int, default=3, help="timings; the median is reported")
  p.add_argument("--torch", default=True, help="also measure PyTorch, if installed", **flag)
  p.add_argument("--torch_compile", default=False, help="torch.compile the network", **flag)
  p.add_argument("--json_out", default="", help="append one JSON line per measurement")
  p.add_argument("--worker", choices=FRAMEWORKS, help=argparse.SUPPRESS)
  p.add_argument("--worker_spec", help=argparse.SUPPRESS)  # A BenchSpec as JSON.
  return p.parse_args(argv)


def specs_from_args(args: argparse.Namespace) -> list[BenchSpec]:
  """One spec per (model, batch size), validated."""
  specs = [BenchSpec(model=m, batch_size=b, dtype=args.dtype,
                     image_shape=(args.image_size, args.image_size, args.channels),
                     num_classes=args.num_classes, skip=args.skip,
                     bn_fast_variance=args.bn_fast_variance, steps=args.steps,
                     warmup=args.warmup, repeats=args.repeats)
           for m in args.model for b in args.batch_size]
  if not specs:
    raise ValueError("--model and --batch_size must each name at least one value")
  for spec in specs:
    validate_spec(spec)
  return specs


def worker_main(args: argparse.Namespace) -> None:
  """Measures one spec in this process and prints its row (or why it was skipped)."""
  fields = json.loads(args.worker_spec)
  spec = BenchSpec(**{**fields, "image_shape": tuple(fields["image_shape"])})
  try:
    out = (measure_jax(spec) if args.worker == "jax"
           else measure_torch(spec, compile_model=args.torch_compile))
  except Skipped as e:
    out = {"skipped": f"torch {spec.model}: {e}"}
  print(RESULT_PREFIX + json.dumps(out), flush=True)


def main(argv: list[str] | None = None) -> int:
  args = parse_args(argv)
  if args.worker:
    worker_main(args)
    return 0
  specs = specs_from_args(args)
  frameworks = ["jax"]
  notes = []
  if args.torch:
    import importlib.util
    if importlib.util.find_spec("torch") is None:
      notes.append("PyTorch skipped: not installed (pip install -e .[torch]).")
    else:
      frameworks.append("torch")
  rows = []
  for spec in specs:
    for framework in frameworks:
      out = run_worker(spec, framework, args.torch_compile)
      if "skipped" in out or "failed" in out:
        notes.append(out.get("skipped") or out["failed"])
        continue
      print(f"{out['framework']:>13} {out['model']} batch {out['batch_size']}: "
            f"{out['images_per_s']:.1f} img/s", flush=True)
      rows.append(out)
  print()
  print(format_table(rows))
  for note in notes:
    print(note)
  if args.json_out:
    with open(args.json_out, "a") as f:
      f.writelines(json.dumps(row) + "\n" for row in rows)
  return 0 if rows else 1


if __name__ == "__main__":
  sys.exit(main())
