"""The train step at the hardware's limit (issue #10): every row of its goals table, each method
on and off, PyTorch eager and torch.compile beside them, as JSON lines; and the table.

  python experiments/step_speed.py --out=OUT/step_speed.jsonl --work_dir=DIR \
      --groups=goals,warm --budget_s=110
  python experiments/step_speed.py --synthetic_cifar10=DIR   # only the recipe's data
  python experiments/step_speed.py --table=OUT/step_speed.jsonl

`bash experiments/gpu_figures.sh OUT 400 7` runs the groups in the order below, each measurement
in a process of its own (bench.run_worker; JAX takes 75% of a GPU's memory), all within part
7's 360 s. A measurement stops at its own cap or at --budget_s, whichever comes first; one that
cannot start with 10 s left is recorded as skipped, so the JSON lines say what was not measured.

Groups:
  goals           ResNet-20 at batch 128 and 512 (32x32, 10 classes) and ResNet-50 at 256
                  (224x224, 1000 classes), bf16 compute, every knob at its default (steps per
                  call: the platform's), compiled into an emptied persistent compilation cache
                  (work_dir/compile_cache): the throughput rows and the cold compile times.
  warm            ResNet-20 b128 and ResNet-50 b256 again on that cache: compile on a re-run.
  recipe          configs/cifar10.py:dtype=bfloat16 end to end (64k steps at batch 128, evals
                  and checkpoints included) on a CIFAR-10 of synthetic pixels with the real
                  shapes and split sizes (`synthetic_cifar10`; the GPU machine has no CIFAR-10
                  and no network, and a step's time does not depend on pixel values), decoded
                  beforehand (`recipe_data`), cold compilation cache; cut off with SIGTERM at
                  its cap, it checkpoints and says at which step.
  torch           PyTorch eager (bench.measure_torch): the three.
  steps_per_call  the three at steps_per_call=1, the multi-step call off.
  torch_compile   torch.compile: the three.
  profile         experiments/profile_step.py on ResNet-20 b128, steps per call default and 1.
  xla_flags       each of XLA_FLAG_SETS (names checked against jaxlib 0.10.2's flag parser) on
                  --flag_cases (default ResNet-20 b128).
  model_args      each of --model_args_sets (default the BN variance options) on ResNet-20
                  b512 and ResNet-50 b256.

Every row carries its group, case and variant, the device, the JAX (or torch) version and every
knob (steps per call, XLA_FLAGS, model arguments, compilation cache and its hits and misses).
`--tiny` shrinks every case (16x16 images, batches of 8 or 16, 2 timed steps, a recipe of 10
steps on 512 training images) to check the plumbing on a CPU; its figures mean nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

# Run as a script, the repository root is not on sys.path.
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from experiments import bench  # noqa: E402
from resnet_jax import reporting  # noqa: E402  (no JAX: this process never holds the GPU)

# The table: (case, what, today, goal). Today: experiments/results/bench_h100.jsonl,
# the README's compile times, and the recipe estimated from ResNet-20 b128's throughput.
GOALS = (
    ("resnet20_b128", "ResNet-20, batch 128, img/s", "42-52k", ">= 100,000"),
    ("resnet20_b512", "ResNet-20, batch 512, img/s", "130-140k", ">= 200,000"),
    ("resnet50_b256", "ResNet-50, 224², batch 256, img/s", "5.2-5.7k", ">= 7,000"),
    ("cifar10_recipe", "configs/cifar10.py end to end (64k steps, b128, ResNet-20, evals), s",
     "~200 (est.)", "<= 90"),
    ("compile", "compile, ResNet-20 / ResNet-50, s", "15 / 19",
     "<= 10 / <= 15, ~0 on a re-run"),
)
WORKLOADS = {
    "resnet20_b128": bench.BenchSpec("resnet20", 128, "bfloat16", steps=100, warmup=20,
                                     repeats=5),
    "resnet20_b512": bench.BenchSpec("resnet20", 512, "bfloat16", steps=60, warmup=20,
                                     repeats=5),
    "resnet50_b256": bench.BenchSpec("resnet50", 256, "bfloat16", (224, 224, 3), 1000,
                                     steps=40, warmup=20, repeats=3),
}
# Fewer, larger kernels and fewer launches. Each set parses in jaxlib 0.10.2 (an unknown flag
# or value stops XLA at start-up, so a set the GPU's jaxlib lacks fails its row, nothing more).
XLA_FLAG_SETS = {
    # The whole K-step loop as one CUDA graph: while loops and conditionals in command buffers.
    "graph_loops": ("--xla_gpu_enable_command_buffer=+WHILE,+CONDITIONAL "
                    "--xla_gpu_graph_min_graph_size=1"),
    # No CUDA graphs: what the default command buffers are worth.
    "no_graphs": "--xla_gpu_enable_command_buffer=",
    # No autotuning: compile time against step time.
    "no_autotune": "--xla_gpu_autotune_level=0",
    # cuDNN fusions of a convolution with its neighbours (experimental in XLA).
    "conv_fusion": "--xla_gpu_experimental_enable_conv_fusion=true",
    "latency_hiding": "--xla_gpu_enable_latency_hiding_scheduler=true",
}
MODEL_ARGS_SETS = ("bn_variance=one_pass", "bn_variance=shifted")
GROUPS = ("goals", "warm", "recipe", "torch", "steps_per_call", "torch_compile", "profile",
          "xla_flags", "model_args")
RECIPE_CONFIG = "configs/cifar10.py:dtype=bfloat16"
RECIPE_STEPS = 64_000
CIFAR10_SIZES = (50_000, 10_000)  # Train and test examples.
TINY_CIFAR10_SIZES = (512, 200)
TINY_RECIPE_STEPS = 10
MIN_START_S = 10  # A measurement is not started with less time left.
CAPS_S = {"jax": 90, "jax_resnet50": 120, "torch": 90, "torch_compile": 200, "profile": 120}
SYNTHETIC_MARK = "SYNTHETIC_PIXELS"
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck")


@dataclasses.dataclass(frozen=True)
class Measurement:
  """One row to measure: `kind` "bench" (bench.run_worker with `framework`), "profile" or
  "recipe"; `env` is added to the worker's environment, `model_args` (bench.parse_model_args)
  to the spec's, parsed when measured so that a field by another name fails only its row."""
  group: str
  case: str
  variant: str
  kind: str = "bench"
  spec: bench.BenchSpec | None = None
  framework: str = "jax"
  torch_compile: bool = False
  env: dict = dataclasses.field(default_factory=dict)
  model_args: str = ""
  cap_s: float = CAPS_S["jax"]


def tiny(spec: bench.BenchSpec) -> bench.BenchSpec:
  """`spec` shrunk to seconds on a CPU: 16x16 images (ResNet-50: 32x32), batch / 32 (at least
  8, so the cases stay distinct programs), 10 classes, 2 timed steps."""
  size = 32 if spec.model == "resnet50" else 16
  return dataclasses.replace(spec, batch_size=max(8, spec.batch_size // 32),
                             image_shape=(size, size, 3), num_classes=10, steps=2, warmup=1,
                             repeats=1)


def plan(groups: list[str], *, workloads: dict[str, bench.BenchSpec], cache_dir: str,
         flag_cases: list[str], model_args_sets: list[str]) -> list[Measurement]:
  """The measurements of `groups`, in that order."""
  cache = bench.jax_environment(compilation_cache_dir=cache_dir)
  cap = lambda case: CAPS_S["jax_resnet50" if case.startswith("resnet50") else "jax"]
  plans = {
      "goals": [Measurement("goals", case, "defaults", spec=spec, env=cache, cap_s=cap(case))
                for case, spec in workloads.items()],
      "warm": [Measurement("warm", case, "defaults, warm cache", spec=workloads[case],
                           env=cache, cap_s=cap(case))
               for case in ("resnet20_b128", "resnet50_b256")],
      "steps_per_call": [
          Measurement("steps_per_call", case, "steps_per_call=1",
                      spec=dataclasses.replace(spec, steps_per_call=1), cap_s=cap(case))
          for case, spec in workloads.items()],
      "recipe": [Measurement("recipe", "cifar10_recipe", RECIPE_CONFIG, kind="recipe")],
      "torch": [Measurement("torch", case, "eager", spec=spec, framework="torch",
                            cap_s=CAPS_S["torch"]) for case, spec in workloads.items()],
      "torch_compile": [Measurement("torch_compile", case, "torch.compile", spec=spec,
                                    framework="torch", torch_compile=True,
                                    cap_s=CAPS_S["torch_compile"])
                        for case, spec in workloads.items()],
      "profile": [Measurement("profile", "resnet20_b128", f"steps_per_call={k or 'default'}",
                              kind="profile",
                              spec=dataclasses.replace(workloads["resnet20_b128"],
                                                       steps_per_call=k, steps=40),
                              cap_s=CAPS_S["profile"]) for k in (0, 1)],
      "xla_flags": [Measurement("xla_flags", case, f"xla_flags={name}", spec=workloads[case],
                                env=bench.jax_environment(xla_flags=flags), cap_s=cap(case))
                    for name, flags in XLA_FLAG_SETS.items() for case in flag_cases],
      "model_args": [Measurement("model_args", case, f"model_args={args}",
                                 spec=workloads[case], model_args=args, cap_s=cap(case))
                     for args in model_args_sets for case in ("resnet20_b512",
                                                              "resnet50_b256")],
  }
  return [m for group in groups for m in plans[group]]


# --- The recipe's data: CIFAR-10's shapes and sizes, synthetic pixels ---

def write_cifar10_archive(path: str | os.PathLike, num_train: int, num_test: int,
                          seed: int = 0) -> None:
  """A cifar-10-binary.tar.gz in the official layout (data_batch_1..5.bin, test_batch.bin,
  batches.meta.txt; records of a label byte and 3 planes of 32x32) with random labels, each
  image one random colour (cheap to encode and decode)."""
  rng = np.random.default_rng(seed)

  def records(n: int) -> bytes:
    labels = rng.integers(0, 10, (n, 1), dtype=np.uint8)
    colours = rng.integers(0, 256, (n, 3, 1), dtype=np.uint8)
    planes = np.repeat(colours, 32 * 32, axis=2).reshape(n, 3 * 32 * 32)
    return np.concatenate([labels, planes], axis=1).tobytes()

  members = {"batches.meta.txt": ("\n".join(CIFAR10_CLASSES) + "\n").encode()}
  for i, part in enumerate(np.array_split(np.arange(num_train), 5), start=1):
    members[f"data_batch_{i}.bin"] = records(len(part))
  members["test_batch.bin"] = records(num_test)
  with tarfile.open(path, "w:gz") as tar:
    for name, raw in members.items():
      info = tarfile.TarInfo(f"cifar-10-batches-bin/{name}")
      info.size = len(raw)
      tar.addfile(info, io.BytesIO(raw))


def synthetic_cifar10(data_dir: str, *, num_train: int = CIFAR10_SIZES[0],
                      num_test: int = CIFAR10_SIZES[1]) -> str:
  """Prepares, in `data_dir`, a cifar10 with CIFAR-10's shapes, classes and split sizes (uint8
  32x32x3; 50,000 train, 10,000 test) but synthetic pixels and labels (write_cifar10_archive),
  through resnet_jax.prepare's builder, so that resnet_jax reads it as it reads CIFAR-10.
  Marks `data_dir` with SYNTHETIC_PIXELS and refuses one holding a cifar10 without that mark.
  Returns the dataset's directory; once prepared, returns it at once.
  """
  import tensorflow_datasets as tfds

  from resnet_jax import prepare

  mark = Path(data_dir) / SYNTHETIC_MARK
  if (Path(data_dir) / "cifar10").exists() and not mark.exists():
    raise FileExistsError(f"{data_dir} holds a cifar10 that synthetic_cifar10 did not write; "
                          f"give the synthetic one a directory of its own")
  Path(data_dir).mkdir(parents=True, exist_ok=True)
  mark.write_text("CIFAR-10's shapes, classes and split sizes with synthetic pixels (one random "
                  "colour per image) and random labels, for timing: experiments/step_speed.py\n")
  builder = tfds.builder("cifar10", data_dir=data_dir)
  if builder.is_prepared():
    return builder.data_dir
  with tempfile.TemporaryDirectory() as source_dir:
    write_cifar10_archive(Path(source_dir) / "cifar-10-binary.tar.gz", num_train, num_test)
    return prepare.prepare("cifar10", data_dir=data_dir, manual_dir=source_dir)


def recipe_data(data_dir: str, *, tiny_sizes: bool = False) -> str:
  """`synthetic_cifar10` in `data_dir` (TINY_CIFAR10_SIZES or CIFAR10_SIZES), both splits
  decoded once into resnet_jax's array cache (data.load_split), as every run after a dataset's
  first finds them: the recipe's time is then the run's own. Returns the dataset's directory."""
  from resnet_jax import config as config_lib
  from resnet_jax import data

  num_train, num_test = TINY_CIFAR10_SIZES if tiny_sizes else CIFAR10_SIZES
  directory = synthetic_cifar10(data_dir, num_train=num_train, num_test=num_test)
  dataset = config_lib.default_config().dataset
  dataset.name, dataset.data_dir = "cifar10", data_dir
  for split in ("train", "test"):
    data.load_split(dataset, split)
  return directory


# --- Measurements ---

def device_description() -> dict:
  """The device and JAX version a fresh process sees, without taking the GPU's memory."""
  probe = ("import jax; d = jax.local_devices()[0]; "
           "print(f'{jax.device_count()}x {d.device_kind}'); print(jax.__version__)")
  proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                        check=False, env={**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false"})
  lines = proc.stdout.split("\n")
  return {"device": lines[0], "framework_version": lines[1]} if proc.returncode == 0 else {}


def recipe_row(workdir: str, *, total_s: float, num_steps: int, cut_off: bool) -> dict:
  """What a recipe run's workdir says: its status and step, compile seconds, training seconds
  and img/s (each log window's steps at its measured throughput, as gpu_figures.sh part 1),
  evaluations, and the run's own wall time; with `total_s`, the process's."""
  summary = reporting.Summary.read(workdir)
  events = reporting.read_metrics(workdir)
  train = [e for e in events if e["event"] == reporting.TRAIN]
  with open(os.path.join(workdir, reporting.CONFIG_FILE)) as f:
    batch = json.load(f)["batch_size"]
  train_s, last = 0.0, 0
  for e in train:
    train_s += (e["step"] - last) * batch / e["img_per_s"]
    last = e["step"]
  return {"status": "ok", "total_s": total_s, "cut_off": cut_off, "num_steps": num_steps,
          "run_status": summary.status if summary else "no summary",
          "steps_done": summary.step if summary else last,
          "run_wall_time_s": summary.wall_time_s if summary else None,
          "compile_s": train[0].get("compile_s") if train else None,
          "train_s": train_s, "train_images_per_s": last * batch / train_s if train_s else None,
          "evals": sum(e["event"] == reporting.EVAL for e in events), "batch_size": batch,
          "pixels": "synthetic"}


def run_recipe(data_dir: str, work_dir: str, *, config: str, num_steps: int,
               timeout_s: float) -> dict:
  """`python -m resnet_jax.main --config=<config>` on the synthetic CIFAR-10 in `data_dir`,
  `num_steps` steps (the schedule's boundaries moved to the same fractions when fewer than the
  recipe's 64k), a fresh workdir and an empty compilation cache; SIGTERM after `timeout_s` (the
  run checkpoints and stops; killed if still there 15 s later). Returns `recipe_row`."""
  workdir = os.path.join(work_dir, "cifar10_recipe")
  cache = os.path.join(work_dir, "recipe_compile_cache")
  for path in (workdir, cache):
    shutil.rmtree(path, ignore_errors=True)
  command = [sys.executable, "-m", "resnet_jax.main", f"--config={config}",
             f"--workdir={workdir}", f"--config.dataset.data_dir={data_dir}",
             f"--config.num_steps={num_steps}", "--config.progress_bar=false"]
  if num_steps < RECIPE_STEPS:
    command.append(f"--config.optimizer.boundaries=({num_steps // 2},{num_steps * 3 // 4})")
  env = {**os.environ, **bench.jax_environment(compilation_cache_dir=cache)}
  start = time.perf_counter()
  proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  cut_off = False
  try:
    output, _ = proc.communicate(timeout=timeout_s)
  except subprocess.TimeoutExpired:
    cut_off = True
    proc.send_signal(signal.SIGTERM)  # The run checkpoints its step and exits 75.
    try:
      output, _ = proc.communicate(timeout=15)
    except subprocess.TimeoutExpired:
      proc.kill()
      output, _ = proc.communicate()
  total_s = time.perf_counter() - start
  if not os.path.exists(os.path.join(workdir, reporting.CONFIG_FILE)):
    tail = "\n".join(output.strip().splitlines()[-5:])
    return {"status": "failed", "reason": f"exited {proc.returncode} before training: {tail}"}
  return {**recipe_row(workdir, total_s=total_s, num_steps=num_steps, cut_off=cut_off),
          "exit_code": proc.returncode, "config": config}


def run_profile(spec: bench.BenchSpec, trace_dir: str, timeout_s: float) -> dict:
  """experiments/profile_step.py on `spec` in a fresh process: its summary, or why not."""
  command = [sys.executable, str(ROOT / "experiments" / "profile_step.py"),
             f"--model={spec.model}", f"--batch_size={spec.batch_size}", f"--dtype={spec.dtype}",
             f"--image_size={spec.image_shape[0]}", f"--channels={spec.image_shape[2]}",
             f"--num_classes={spec.num_classes}", f"--steps_per_call={spec.steps_per_call}",
             f"--steps={spec.steps}", f"--warmup={spec.warmup}", f"--repeats={spec.repeats}",
             f"--trace_dir={trace_dir}"]
  try:
    proc = subprocess.run(command, capture_output=True, text=True, check=False,
                          timeout=timeout_s)
  except subprocess.TimeoutExpired:
    return {"failed": f"profile killed after its {timeout_s:.0f} s"}
  for line in reversed(proc.stdout.splitlines()):
    if line.startswith(bench.RESULT_PREFIX):
      return json.loads(line[len(bench.RESULT_PREFIX):])
  tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
  return {"failed": f"profile exited {proc.returncode}: {tail}"}


def measure(m: Measurement, timeout_s: float, args: argparse.Namespace) -> dict:
  """The row of `m`, given at most `timeout_s` seconds."""
  identity = {"group": m.group, "case": m.case, "variant": m.variant}
  if m.kind == "recipe":
    start = time.perf_counter()
    data_dir = args.data_dir or os.path.join(args.work_dir, "synthetic_cifar10")
    recipe_data(data_dir, tiny_sizes=args.tiny)
    steps = args.recipe_steps or (TINY_RECIPE_STEPS if args.tiny else RECIPE_STEPS)
    left = timeout_s - (time.perf_counter() - start)  # Preparing the data may have taken some.
    row = run_recipe(data_dir, args.work_dir, config=RECIPE_CONFIG, num_steps=steps,
                     timeout_s=max(left, 1))
    return {**identity, **device_description(), **row}
  spec = m.spec
  if m.model_args:
    spec = dataclasses.replace(spec, model_args=bench.parse_model_args(m.model_args))
  if m.kind == "profile":
    out = run_profile(spec, os.path.join(args.work_dir, f"trace_{m.variant}"), timeout_s)
  else:
    out = bench.run_worker(spec, m.framework, m.torch_compile, env=m.env, timeout_s=timeout_s)
  if "failed" in out or "skipped" in out:
    status = "failed" if "failed" in out else "skipped"
    return {**identity, "status": status, "reason": out[status]}
  return {**identity, "status": "ok", **out}


def record(path: str, row: dict) -> None:
  """Appends `row` to `path` and prints it on one line."""
  with open(path, "a") as f:
    f.write(json.dumps(row) + "\n")
  print(f"{row['group']:>14} {row['case']} {row['variant']}: {brief(row)}", flush=True)


def brief(row: dict) -> str:
  if row["status"] != "ok":
    return f"{row['status']}: {row.get('reason', '')}"
  if row["group"] == "recipe":
    return recipe_cell(row)
  if row["group"] == "profile":
    return (f"{row['wall_ms_per_step']:.3f} ms/step wall, {row['busy_ms_per_step']:.3f} busy, "
            f"{row['ops_per_step']:.0f} ops/step")
  return (f"{row['images_per_s']:,.0f} img/s, {row['ms_per_step']:.3f} ms/step, compile "
          f"{row['compile_s']:.1f} s ({row['device']})")


# --- The table ---

def recipe_cell(row: dict) -> str:
  done = f"{row['steps_done']:,} of {row['num_steps']:,} steps"
  parts = [f"compile {row['compile_s']:.1f} s" if row.get("compile_s") is not None else "",
           f"training {row['train_s']:.0f} s at {row['train_images_per_s']:,.0f} img/s"
           if row.get("train_images_per_s") else "", f"evaluations: {row['evals']}",
           "synthetic pixels"]
  detail = ", ".join(p for p in parts if p)
  if row["cut_off"] or row["run_status"] != reporting.COMPLETED:
    return f"cut off ({row['run_status']}) after {row['total_s']:.0f} s at {done} ({detail})"
  return f"{row['total_s']:.0f} s end to end, {done} ({detail})"


def goals_table(rows: list[dict]) -> str:
  """The issue's table with what was measured: resnet_jax at its defaults (group goals), the
  best JAX variant of any group, and PyTorch eager / torch.compile, per case (the last row of
  each kind where a case was measured more than once)."""
  ok = [r for r in rows if r.get("status") == "ok"]
  last = lambda group, case, framework="jax": next(
      (r for r in reversed(ok) if r["group"] == group and r["case"] == case
       and r.get("framework", "jax") == framework), None)
  img = lambda r: f"{r['images_per_s']:,.0f}" if r else "-"
  out = ["| case | today | goal | measured (defaults) | best JAX variant | "
         "PyTorch eager / torch.compile |", "|---|---|---|---|---|---|"]
  for case, what, today, goal in GOALS:
    if case in WORKLOADS:
      jax_rows = [r for r in ok if r["case"] == case and r.get("framework") == "jax"]
      best = max(jax_rows, key=lambda r: r["images_per_s"], default=None)
      best_cell = f"{img(best)} ({best['variant']})" if best else "-"
      torch_cell = (f"{img(last('torch', case, 'torch'))} / "
                    f"{img(last('torch_compile', case, 'torch+compile'))}")
      cells = (img(last("goals", case)), best_cell, torch_cell)
    elif case == "cifar10_recipe":
      recipe = last("recipe", case)
      cells = (recipe_cell(recipe) if recipe else "-", "", "")
    else:
      seconds = lambda r: f"{r['compile_s']:.1f}" if r else "-"
      cells = (f"{seconds(last('goals', 'resnet20_b128'))} / "
               f"{seconds(last('goals', 'resnet50_b256'))} cold, "
               f"{seconds(last('warm', 'resnet20_b128'))} / "
               f"{seconds(last('warm', 'resnet50_b256'))} warm", "", "")
    out.append(f"| {what} | {today} | {goal} | " + " | ".join(cells) + " |")
  return "\n".join(out)


def measurements_table(rows: list[dict]) -> str:
  """Every row: group, case, variant, framework, steps per call, img/s, ms/step, compile
  seconds, compilation cache hits/misses, and a note (the recipe's and the profile's figures,
  or why a row has none)."""
  out = ["| group | case | variant | framework | K | img/s | ms/step | compile s | cache h/m | "
         "note |", "|---|---|---|---|---:|---:|---:|---:|---|---|"]
  for r in rows:
    cells = [r["group"], r["case"], r["variant"]] + [""] * 7
    if r.get("status") != "ok":
      cells[9] = f"{r.get('status')}: {r.get('reason', '')}"[:160].replace("\n", " ")
    elif r["group"] == "recipe":
      cells[3:] = ["jax", "", "", "", f"{r['compile_s'] or 0:.1f}", "", recipe_cell(r)]
    elif r["group"] == "profile":
      cells[3:] = ["jax", str(r["steps_per_call"]), "", f"{r['wall_ms_per_step']:.3f}",
                   f"{r['compile_s']:.1f}", "",
                   f"busy {r['busy_ms_per_step']:.3f} ms, idle {r['idle_ms_per_step']:.3f} ms, "
                   f"{r['ops_per_step']:.0f} ops per step"]
    else:
      cache = (f"{r['cache_hits']}/{r['cache_misses']}" if r.get("compilation_cache_dir")
               else "")
      cells[3:] = [r["framework"], str(r.get("steps_per_call", "")), f"{r['images_per_s']:,.0f}",
                   f"{r['ms_per_step']:.3f}", f"{r['compile_s']:.1f}", cache, ""]
    out.append("| " + " | ".join(cells) + " |")
  return "\n".join(out)


def format_tables(rows: list[dict]) -> str:
  devices = sorted({f"{r['device']} ({r.get('framework', 'jax')} {r['framework_version']})"
                    for r in rows if r.get("status") == "ok" and "device" in r})
  return "\n".join([f"devices: {'; '.join(devices) or 'none measured'}", "",
                    goals_table(rows), "", measurements_table(rows)])


# --- Command line ---

def comma_list(text: str) -> list[str]:
  return [item.strip() for item in text.split(",") if item.strip()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--groups", type=comma_list, default=list(GROUPS),
                 help=f"comma list of {', '.join(GROUPS)}")
  p.add_argument("--out", default="", help="JSON lines are appended here")
  p.add_argument("--work_dir", default="", help="caches, traces, the recipe's run and data")
  p.add_argument("--budget_s", type=float, default=0, help="seconds for all; 0 = no limit")
  p.add_argument("--tiny", action="store_true", help="every case shrunk, for a CPU check")
  p.add_argument("--data_dir", default="", help="the synthetic CIFAR-10 (default: in work_dir)")
  p.add_argument("--recipe_steps", type=int, default=0, help=f"0 = {RECIPE_STEPS}")
  p.add_argument("--flag_cases", type=comma_list, default=["resnet20_b128"],
                 help=f"cases of the xla_flags group: {', '.join(WORKLOADS)}")
  p.add_argument("--model_args_sets", type=lambda t: [s for s in t.split(";") if s.strip()],
                 default=list(MODEL_ARGS_SETS), help="';'-separated key=value,... sets")
  p.add_argument("--synthetic_cifar10", default="",
                 help="only prepare (and decode) the synthetic CIFAR-10 in this directory")
  p.add_argument("--table", default="", help="only print the tables of this JSON lines file")
  args = p.parse_args(argv)
  unknown = [g for g in args.groups if g not in GROUPS]
  unknown += [c for c in args.flag_cases if c not in WORKLOADS]
  if unknown:
    p.error(f"unknown groups or cases {unknown}; groups: {', '.join(GROUPS)}; cases: "
            f"{', '.join(WORKLOADS)}")
  if not (args.table or args.synthetic_cifar10) and not (args.out and args.work_dir):
    p.error("--out and --work_dir are needed to measure")
  return args


def main(argv: list[str] | None = None) -> int:
  args = parse_args(argv)
  if args.table:
    with open(args.table) as f:
      print(format_tables([json.loads(line) for line in f if line.strip()]))
    return 0
  if args.synthetic_cifar10:
    print(recipe_data(args.synthetic_cifar10, tiny_sizes=args.tiny))
    return 0
  os.makedirs(args.work_dir, exist_ok=True)
  cache_dir = os.path.join(args.work_dir, "compile_cache")
  if "goals" in args.groups:  # Its compile times are the cold ones.
    shutil.rmtree(cache_dir, ignore_errors=True)
  workloads = {case: tiny(spec) if args.tiny else spec for case, spec in WORKLOADS.items()}
  deadline = time.perf_counter() + args.budget_s if args.budget_s else float("inf")
  for m in plan(args.groups, workloads=workloads, cache_dir=cache_dir,
                flag_cases=args.flag_cases, model_args_sets=args.model_args_sets):
    left = deadline - time.perf_counter()
    if left < MIN_START_S:
      row = {"group": m.group, "case": m.case, "variant": m.variant, "status": "skipped",
             "reason": f"out of time ({max(left, 0):.0f} s of --budget_s={args.budget_s:.0f} "
                       f"left)"}
    else:
      try:
        row = measure(m, min(m.cap_s, left) if m.kind != "recipe" else left, args)
      except Exception as e:  # One broken measurement must not cost the others.
        row = {"group": m.group, "case": m.case, "variant": m.variant, "status": "failed",
               "reason": f"{type(e).__name__}: {e}"}
    record(args.out, row)
  return 0


if __name__ == "__main__":
  sys.exit(main())
