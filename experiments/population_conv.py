"""Train-step speed of the two convolution formulations (config.model.conv), for one model and for
a population of models stacked on a leading axis and jax.vmap'ed, as the planned population mode
(issue "Packed sweeps") will run a sweep.

  python experiments/population_conv.py --model=resnet20 --batch_size=128 --population=4 \
      --dtype=float32 --repeats=3 --json_out=/tmp/population_conv.jsonl

Four cases, each the project's train step (steps.train_step: forward, backward, SGD with
momentum, BN statistics), jitted with its state donated, on synthetic uint8 batches already on
the device and normalised inside the step:
  (a) one model, conv=xla (lax.conv_general_dilated)
  (b) one model, conv=im2col (models.im2col_conv)
  (c) vmap over --population models, conv=xla: XLA turns the batched kernels into a grouped
      convolution
  (d) vmap over --population models, conv=im2col: a batched matrix product
The population's members have their own initialisation (seeds 0..P-1) and their own batch; img/s
counts every member's images (P x batch). Each case is compiled, warmed up and timed once in
turn, then the remaining repeats go round-robin (repeat r of every case before repeat r + 1 of
any), so that a machine whose load drifts affects them alike; img/s is from the median repeat.
`--max_seconds` bounds the run: once it is spent, no further case is compiled and no further
round started, and the cases measured so far are reported (each timed at least once).

Measured on this project's 2-core AMD EPYC CPU machine (jax 0.10.2, XLA CPU), while other
engineers' jobs kept its load average at 6-9 (the README's 207 img/s for (a) is the machine
idle), with the command above (1 warm-up step, repeats of 2 steps: the defaults);
experiments/results/population_conv_cpu.jsonl holds its JSON lines:

  case                    images/step  ms/step   img/s  compile s
  (a) one model, xla              128     4221    30.3        8.1
  (b) one model, im2col           128     3740    34.2       31.4
  (c) vmap x4, xla                512    51942     9.9       17.2
  (d) vmap x4, im2col             512    18373    27.9       43.6

Per repeat (2 steps): a 8.4/11.0/8.0 s, b 8.6/7.5/7.5 s, c 157/80/104 s, d 37/31/39 s. The
vmapped XLA convolution (grouped) trains the population 3.1x slower per image than one model
alone; im2col trains it at 0.9x one model's rate, 2.8x the vmapped XLA convolution's. Not yet
measured on a GPU.

`--json_out` writes one JSON line per case (device: jax.devices()[0].device_kind), so the
figures of a GPU run can be set beside these.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from resnet_jax import config as config_lib
from resnet_jax import models, optim, steps

IMAGE_SHAPE = (32, 32, 3)
NUM_CLASSES = 10
NORM_MEAN, NORM_STD = (0.5,) * 3, (0.25,) * 3
# (name, conv, vmapped): the cases, in the order they are compiled, timed and reported.
CASES = (("a", "xla", False), ("b", "im2col", False), ("c", "xla", True), ("d", "im2col", True))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--model", default="resnet20")
  p.add_argument("--batch_size", type=int, default=128, help="per member")
  p.add_argument("--population", type=int, default=4, help="members of cases c and d")
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  p.add_argument("--repeats", type=int, default=3, help="timed repeats of every case")
  p.add_argument("--steps", type=int, default=2, help="train steps per timed repeat")
  p.add_argument("--warmup", type=int, default=1, help="steps after compiling, untimed")
  p.add_argument("--max_seconds", type=float, default=float("inf"),
                 help="stop once the run has taken this long, reporting what was measured")
  p.add_argument("--json_out", default="", help="append one JSON line per case here")
  args = p.parse_args(argv)
  for name in ("batch_size", "population", "repeats", "steps"):
    if getattr(args, name) < 1:
      p.error(f"--{name} must be >= 1; got {getattr(args, name)}")
  if args.warmup < 0:
    p.error(f"--warmup must be >= 0; got {args.warmup}")
  return args


def run_config(args: argparse.Namespace, conv: str):
  """The defaults, with the measured network and a constant-rate SGD (the schedule's shape does
  not change the step's cost)."""
  config = config_lib.default_config()
  config.model.name = args.model
  config.model.dtype = args.dtype
  config.model.conv = conv
  config.optimizer.schedule = "constant"
  config.batch_size = args.batch_size
  config_lib.validate(config)
  return config


def model_and_optimizer(args: argparse.Namespace, conv: str):
  config = run_config(args, conv)
  model = models.get_model(num_classes=NUM_CLASSES, **config.model)
  tx = optim.create_optimizer(config.optimizer, batch_size=args.batch_size, num_steps=1000,
                              steps_per_epoch=1)
  return model, tx


def population_inputs(args: argparse.Namespace):
  """The population's initial train states (seeds 0..P-1, stacked) and its batches (one per
  member, stacked); member 0 is also the single model of cases a and b. The states do not depend
  on the conv option; they are made once, as the initialiser is slow to compile on a CPU."""
  model, tx = model_and_optimizer(args, "xla")
  init = jax.vmap(lambda seed: steps.create_train_state(model, tx, seed=seed,
                                                        image_shape=IMAGE_SHAPE))
  states = jax.jit(init)(jnp.arange(args.population))
  rng = np.random.default_rng(0)
  shape = (args.population, args.batch_size)
  batches = {"image": rng.integers(0, 256, (*shape, *IMAGE_SHAPE), dtype=np.uint8),
             "label": rng.integers(0, NUM_CLASSES, shape, dtype=np.int32)}
  return states, jax.device_put(batches)


class Case:
  """One compiled train step and its state: a single model, or the population vmapped."""

  def __init__(self, args: argparse.Namespace, name: str, conv: str, vmapped: bool,
               states, batches):
    self.name, self.conv = name, conv
    self.population = args.population if vmapped else 1
    model, tx = model_and_optimizer(args, conv)
    step = functools.partial(steps.train_step, model=model, tx=tx, mean=NORM_MEAN, std=NORM_STD,
                             dtype=jnp.dtype(args.dtype))
    if vmapped:
      step = jax.vmap(step)
    else:
      states, batches = jax.tree.map(lambda a: a[0], (states, batches))
    self.state = jax.tree.map(jnp.copy, states)  # The step donates it.
    self.batch = batches
    start = time.perf_counter()
    self.step = jax.jit(step, donate_argnums=0).lower(self.state, self.batch).compile()
    self.compile_s = time.perf_counter() - start
    self.images_per_step = self.population * args.batch_size
    self.repeat_s: list[float] = []

  def run(self, num_steps: int) -> float:
    """Seconds for `num_steps` steps, finished on the device."""
    start = time.perf_counter()
    for _ in range(num_steps):
      self.state, _ = self.step(self.state, self.batch)
    jax.block_until_ready(self.state)
    return time.perf_counter() - start

  def row(self, args: argparse.Namespace) -> dict[str, Any]:
    """The case's JSON line (it has been timed at least once)."""
    ms_per_step = 1000 * statistics.median(self.repeat_s) / args.steps
    return {"device": jax.devices()[0].device_kind, "platform": jax.devices()[0].platform,
            "jax_version": jax.__version__, "case": self.name, "conv": self.conv,
            "population": self.population, "model": args.model, "batch_size": args.batch_size,
            "dtype": args.dtype, "images_per_step": self.images_per_step,
            "ms_per_step": ms_per_step,
            "images_per_s": self.images_per_step / ms_per_step * 1000,
            "compile_s": self.compile_s, "repeats": len(self.repeat_s),
            "steps_per_repeat": args.steps, "warmup": args.warmup,
            "repeat_s": self.repeat_s}


def describe(row: dict[str, Any]) -> str:
  members = "one model" if row["population"] == 1 else f"vmap x{row['population']}"
  return f"({row['case']}) {members}, {row['conv']}"


def table(rows: list[dict[str, Any]]) -> str:
  lines = [f"  {'case':<24}{'images/step':>11}{'ms/step':>9}{'img/s':>8}{'compile s':>11}"]
  for row in rows:
    lines.append(f"  {describe(row):<24}{row['images_per_step']:>11}{row['ms_per_step']:>9.0f}"
                 f"{row['images_per_s']:>8.1f}{row['compile_s']:>11.1f}")
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  args = parse_args(argv)
  start = time.perf_counter()
  out_of_time = lambda: time.perf_counter() - start > args.max_seconds
  states, batches = population_inputs(args)
  cases = []
  for name, conv, vmapped in CASES:
    if out_of_time():
      print(f"--max_seconds={args.max_seconds:g} spent: case {name} and later not compiled",
            file=sys.stderr)
      break
    case = Case(args, name, conv, vmapped, states, batches)
    case.run(args.warmup)
    case.repeat_s.append(case.run(args.steps))
    cases.append(case)
    print(f"{describe(case.row(args))}: compiled in {case.compile_s:.1f} s, first repeat "
          f"{case.repeat_s[0]:.1f} s", file=sys.stderr)
  for repeat in range(1, args.repeats):
    if out_of_time():
      print(f"--max_seconds={args.max_seconds:g} spent after {repeat} repeats", file=sys.stderr)
      break
    for case in cases:
      case.repeat_s.append(case.run(args.steps))
  rows = [case.row(args) for case in cases]
  print(f"{args.model}, batch {args.batch_size} per model, {args.dtype}, "
        f"{jax.devices()[0].device_kind}:")
  print(table(rows))
  if args.json_out:
    with open(args.json_out, "a") as f:
      for row in rows:
        f.write(json.dumps(row) + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
