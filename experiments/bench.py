"""Train-step throughput, compile time and peak memory of a ResNet on synthetic data; JAX, and
the same network in PyTorch beside it when PyTorch is installed.

  python experiments/bench.py --model=resnet20 --batch_size=128 --dtype=float32 --steps=10 \
      --warmup=2 --repeats=2 --json_out=/tmp/bench.jsonl

`--model`, `--batch_size` and `--steps_per_call` take comma lists (`--model=resnet20,resnet56
--batch_size=64,128`) for a table. Each measurement runs in its own process (this script, started
again with a hidden `--worker` flag): JAX preallocates 75% of a GPU's memory, and a process's
peak memory is a lifetime maximum, so sharing one would spoil both frameworks' figures.

The JAX side's knobs, each recorded in its JSON line: `--steps_per_call` (config.steps_per_call,
0 = the platform's: 1 on CPU, 20 on GPU), `--model_args=key=value,...` (any config.model field,
typed by its default: `--model_args=bn_variance=one_pass`), `--xla_flags` (added to the JAX
workers' XLA_FLAGS) and `--compilation_cache_dir` (their persistent compilation cache; the line
says whether the train program came from it). experiments/step_speed.py runs the sets that
issue #10 asks for; experiments/profile_step.py traces the same setup.

What is measured, for both frameworks: SGD with Nesterov momentum 0.9 and weight decay 1e-4 on
conv and dense kernels only, on a fixed synthetic uint8 batch already on the device (input is not
measured), normalised inside the step. After `--warmup` steps, `--repeats` timings of `--steps`
steps each (JAX: in calls of up to steps_per_call steps), blocked on the result; img/s and
ms/step are from the median. JAX's "compile s" is what JAX reports spending on the train
program's first call (tracing, lowering, XLA: compilation.CompileClock); PyTorch's is the first
step, which holds torch.compile's compilation when `--torch_compile` is on. Peak memory is the device's peak bytes in use on GPU
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

Issue #10's multi-step calls leave the CPU step as it was: at steps_per_call=1 (the CPU default)
the compiled train program of ResNet-20 b128 float32 is the one commit 479c996 (before the
issue) compiled, character for character but for source line numbers. Timed side by side on
the same 2-core AMD EPYC, shared with other jobs (load average 1.0-4.4 at the starts; PyTorch is
not installed there), 5 pairs alternating which went first, same flags as above: 479c996 65.5,
66.8, 55.1, 51.6, 57.1 img/s (median 57.1); this tree 63.3, 59.6, 49.2, 60.5, 51.1 (median 59.6):
no difference beyond the load's noise (experiments/results/step_speed_cpu.jsonl).
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
  # More config.model fields (parse_model_args), e.g. {"bn_variance": "one_pass"}.
  model_args: dict = dataclasses.field(default_factory=dict)
  steps_per_call: int = 0  # config.steps_per_call: 0 = the platform's (trainer.py).
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
  config.model.update(spec.model_args)
  config.steps_per_call = spec.steps_per_call
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


def parse_model_args(text: str) -> dict:
  """`key=value,...` as config.model fields, each value typed by its field's default:
  `bn_variance=one_pass,bn_momentum=0.99` -> {"bn_variance": "one_pass", "bn_momentum": 0.99}.
  name, skip and dtype have flags of their own. Raises ConfigError naming the allowed keys."""
  fields = config_lib.default_config().model
  types = {key: type(value) for key, value in fields.items()
           if key not in ("name", "skip", "dtype")}
  return config_lib.parse_args(text, types)


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


def result_row(spec: BenchSpec, *, framework: str, framework_version: str, device: str,
               seconds_per_step: float, compile_s: float, peak_memory_bytes: int,
               memory_kind: str, num_params: int, **knobs) -> dict:
  """One line of the table and of `--json_out`; `knobs` are the framework's own settings."""
  return {"device": device, "model": spec.model, "batch_size": spec.batch_size,
          "dtype": spec.dtype, "image_shape": list(spec.image_shape),
          "num_classes": spec.num_classes, "skip": spec.skip, "model_args": spec.model_args,
          "framework": framework, "framework_version": framework_version,
          "images_per_s": spec.batch_size / seconds_per_step,
          "ms_per_step": 1000 * seconds_per_step, "compile_s": compile_s,
          "peak_memory_bytes": peak_memory_bytes, "memory_kind": memory_kind,
          "num_params": num_params, "steps": spec.steps, "warmup": spec.warmup,
          "repeats": spec.repeats, **knobs}


# --- JAX ---

CACHE_EVENTS = {"/jax/compilation_cache/cache_hits": "cache_hits",
                "/jax/compilation_cache/cache_misses": "cache_misses"}


def jax_trainer(spec: BenchSpec):
  """The project's trainer (`trainer.build`, as in training) for `spec` on every local device,
  taking one synthetic batch, sharded over `parallel.make_mesh()`, at every step; with its
  initial state and zeroed totals: (trainer, state, totals)."""
  import itertools

  import jax
  import numpy as np

  from resnet_jax import data, parallel, sources, trainer

  class FixedBatch(sources.DeviceBatches):
    """The same batch at every step, as the in-memory source's split: a call of several steps
    takes it once instead of a stacked copy per step, and the input stays unmeasured."""
    stacks_steps = False

  validate_spec(spec, num_devices=jax.device_count())
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
  source = FixedBatch(itertools.repeat(batch), sources.spec_of(batch))
  bench_trainer = trainer.build(bench_config(spec), info, mesh, source)
  return bench_trainer, bench_trainer.init_state(), bench_trainer.zero_totals()


def run_jax_steps(bench_trainer, state, totals, n: int):
  """n steps in calls of up to bench_trainer.steps_per_call, finished on the device:
  (state, totals)."""
  import jax
  per_call = bench_trainer.steps_per_call
  for done in range(0, n, per_call):
    state, totals, _ = bench_trainer.train(state, totals, steps=min(per_call, n - done))
  return jax.block_until_ready((state, totals))


def compile_jax_steps(bench_trainer, state, totals):
  """One call of one step, which compiles the train program: (state, totals, the seconds JAX
  spent compiling, or reading the program from the persistent cache)."""
  from resnet_jax import compilation
  with compilation.CompileClock() as clock:
    state, totals = run_jax_steps(bench_trainer, state, totals, 1)
  return state, totals, clock.seconds


def measure_jax(spec: BenchSpec) -> dict:
  """Times the project's train step (`jax_trainer`; state and totals donated), in calls of
  trainer.steps_per_call steps. Returns a `result_row` with the JAX knobs: steps_per_call (as
  resolved), XLA_FLAGS, the persistent compilation cache's directory and its hits and misses
  while the train program compiled.
  """
  import jax

  from resnet_jax import steps

  cache_events = dict.fromkeys(CACHE_EVENTS.values(), 0)

  def count(event: str, **kwargs) -> None:
    del kwargs
    if event in CACHE_EVENTS:
      cache_events[CACHE_EVENTS[event]] += 1

  bench_trainer, state, totals = jax_trainer(spec)
  jax.monitoring.register_event_listener(count)
  state, totals, compile_s = compile_jax_steps(bench_trainer, state, totals)
  compile_cache = dict(cache_events)

  def run_steps(n: int) -> None:
    nonlocal state, totals
    state, totals = run_jax_steps(bench_trainer, state, totals, n)

  seconds_per_step = median_seconds_per_step(run_steps, spec)
  devices = jax.local_devices()
  stats = [d.memory_stats() or {} for d in devices]
  if all("peak_bytes_in_use" in s for s in stats):
    peak, memory_kind = max(s["peak_bytes_in_use"] for s in stats), "device peak_bytes_in_use"
  else:
    peak, memory_kind = process_peak_rss_bytes(), "process peak RSS"
  device = f"{jax.device_count()}x {devices[0].device_kind}"
  return result_row(spec, framework="jax", framework_version=jax.__version__, device=device,
                    seconds_per_step=seconds_per_step, compile_s=compile_s,
                    peak_memory_bytes=peak, memory_kind=memory_kind,
                    num_params=steps.count_params(state.params),
                    steps_per_call=bench_trainer.steps_per_call,
                    xla_flags=os.environ.get("XLA_FLAGS", ""),
                    compilation_cache_dir=jax.config.jax_compilation_cache_dir or "",
                    **compile_cache)


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
  return result_row(spec, framework=framework, framework_version=torch.__version__,
                    device=f"torch {torch.__version__} {name}",
                    seconds_per_step=seconds_per_step, compile_s=compile_s,
                    peak_memory_bytes=peak, memory_kind=memory_kind, num_params=num_params)


# --- Orchestration: one worker process per measurement, a table at the end ---

def worker_command(spec: BenchSpec, framework: str, torch_compile: bool) -> list[str]:
  """This script, measuring `spec` with `framework` in a fresh process."""
  return [sys.executable, os.path.abspath(__file__), f"--worker={framework}",
          f"--worker_spec={json.dumps(dataclasses.asdict(spec))}",
          f"--torch_compile={torch_compile}"]


def jax_environment(xla_flags: str = "", compilation_cache_dir: str = "") -> dict[str, str]:
  """What a JAX worker's environment adds: `xla_flags` after this one's XLA_FLAGS, and a
  persistent compilation cache in `compilation_cache_dir` that keeps every program."""
  env = {}
  if xla_flags:
    env["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {xla_flags}".strip()
  if compilation_cache_dir:
    env.update(JAX_COMPILATION_CACHE_DIR=compilation_cache_dir,
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  return env


def run_worker(spec: BenchSpec, framework: str, torch_compile: bool = False, *,
               env: dict[str, str] | None = None, timeout_s: float | None = None) -> dict:
  """A row from a fresh process with `env` added to this one's environment, or
  {"skipped": reason} / {"failed": why, with the error's last lines}. A worker still running
  after `timeout_s` is killed and fails."""
  try:
    proc = subprocess.run(worker_command(spec, framework, torch_compile), capture_output=True,
                          text=True, check=False, env={**os.environ, **(env or {})},
                          timeout=timeout_s)
  except subprocess.TimeoutExpired:
    return {"failed": f"{framework} worker killed after its {timeout_s:.0f} s"}
  for line in reversed(proc.stdout.splitlines()):
    if line.startswith(RESULT_PREFIX):
      return json.loads(line[len(RESULT_PREFIX):])
  tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
  return {"failed": f"{framework} worker exited {proc.returncode}: {tail}"}


def format_table(rows: list[dict]) -> str:
  """A fixed-width table: device, model, batch, dtype, framework, steps per call, img/s,
  ms/step, compile s, peak memory in MiB and which memory that is."""
  header = ("device", "model", "batch", "dtype", "framework", "K", "img/s", "ms/step",
            "compile s", "peak MiB", "memory")
  cells = [header] + [
      (r["device"], r["model"], str(r["batch_size"]), r["dtype"], r["framework"],
       str(r.get("steps_per_call", "-")), f"{r['images_per_s']:.1f}", f"{r['ms_per_step']:.1f}",
       f"{r['compile_s']:.2f}", f"{r['peak_memory_bytes'] / 2**20:.0f}", r["memory_kind"])
      for r in rows]
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
  p.add_argument("--model_args", default="",
                 help="more config.model fields, key=value,... (bn_variance=one_pass)")
  p.add_argument("--steps_per_call", type=comma_list(int), default=[0],
                 help="comma list; JAX steps per compiled call, 0 = the platform's")
  p.add_argument("--xla_flags", default="", help="added to XLA_FLAGS for the JAX workers")
  p.add_argument("--compilation_cache_dir", default="",
                 help="the JAX workers' persistent compilation cache (default: none)")
  p.add_argument("--steps", type=int, default=20, help="steps per timing")
  p.add_argument("--warmup", type=int, default=3, help="untimed steps after compilation")
  p.add_argument("--repeats", type=int, default=3, help="timings; the median is reported")
  p.add_argument("--timeout_s", type=float, default=0, help="per worker; 0 = none")
  p.add_argument("--torch", default=True, help="also measure PyTorch, if installed", **flag)
  p.add_argument("--torch_compile", default=False, help="torch.compile the network", **flag)
  p.add_argument("--json_out", default="", help="append one JSON line per measurement")
  p.add_argument("--worker", choices=FRAMEWORKS, help=argparse.SUPPRESS)
  p.add_argument("--worker_spec", help=argparse.SUPPRESS)  # A BenchSpec as JSON.
  return p.parse_args(argv)


def specs_from_args(args: argparse.Namespace) -> list[BenchSpec]:
  """One spec per (model, batch size, steps per call), validated."""
  model_args = parse_model_args(args.model_args)
  specs = [BenchSpec(model=m, batch_size=b, dtype=args.dtype,
                     image_shape=(args.image_size, args.image_size, args.channels),
                     num_classes=args.num_classes, skip=args.skip, model_args=model_args,
                     steps_per_call=k, steps=args.steps, warmup=args.warmup,
                     repeats=args.repeats)
           for m in args.model for b in args.batch_size for k in args.steps_per_call]
  if not specs:
    raise ValueError("--model, --batch_size and --steps_per_call must each name a value")
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
  notes = []
  torch_too = args.torch
  if torch_too:
    import importlib.util
    if importlib.util.find_spec("torch") is None:
      notes.append("PyTorch skipped: not installed (pip install -e .[torch]).")
      torch_too = False
  env = {"jax": jax_environment(args.xla_flags, args.compilation_cache_dir), "torch": {}}
  rows, torch_done = [], set()
  for spec in specs:
    frameworks = ["jax"]
    # PyTorch has no steps per call: one measurement per model and batch size.
    if torch_too and (spec.model, spec.batch_size) not in torch_done:
      frameworks.append("torch")
      torch_done.add((spec.model, spec.batch_size))
    for framework in frameworks:
      out = run_worker(spec, framework, args.torch_compile, env=env[framework],
                       timeout_s=args.timeout_s or None)
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
