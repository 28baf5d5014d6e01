"""ImageNet input throughput per CPU core: the Grain stream (resnet_jax/stream.py) end to end, on
a synthetic imagenet2012, for several source trees side by side.

  python experiments/stream_bench.py --trees=4d74939,. --workers=0,1,2 --shorter_sides=256 \
      --json_out=experiments/results/stream_cpu.jsonl

What is measured: `stream.make_train_dataset` (read the ArrayRecord records, decode, Inception
crop resized to 224, flip, batch) and `stream.make_eval_dataset` (resize the shorter side to 256,
centre crop 224, batch) over the train split of a synthetic imagenet2012 that the script
prepares once under `--data_root` (`python -m resnet_jax.prepare synthetic_imagenet`: JPEGs of
ImageNet's sizes at quality 90), and over copies stored at each `--shorter_sides` size. Each
measurement runs in its own process against one source tree: `.` is the working tree, anything
else a git revision whose `resnet_jax/` is exported to a temporary directory, so the pipeline as
it was before a change is measured in the same run as the pipeline after it. Runs alternate
between the trees, `--repeats` times, so both see the same load.

Per measurement, after `--warmup` batches (the workers' buffers drained), `--batches` batches are timed: img/s is wall-clock;
"per core" divides it by the cores the pipeline was given (max(1, workers)); img per CPU-second
divides the images by the CPU time the process and its Grain workers spent in that window (from
/proc), which a shared, loaded machine disturbs less than wall-clock time. Every line records the
machine (CPU model, cores) and the load average before and after. The lines also say whether
TensorFlow was imported (training must never import it).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULT_PREFIX = "STREAM_BENCH_RESULT "
IMAGE_SIZE = 224


def cpu_model() -> str:
  with open("/proc/cpuinfo") as f:
    models = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
  return models[0] if models else "unknown"


def tree_cpu_seconds(root: int) -> float:
  """User + system CPU seconds of process `root` and its living descendants, from /proc."""
  ticks = os.sysconf("SC_CLK_TCK")
  stats = {}
  for entry in os.listdir("/proc"):
    if entry.isdigit():
      try:
        with open(f"/proc/{entry}/stat") as f:
          fields = f.read().rsplit(")", 1)[1].split()
      except OSError:  # Gone since listed.
        continue
      # After the command: state, ppid, ..., utime (11th) and stime (12th).
      stats[int(entry)] = (int(fields[1]), int(fields[11]) + int(fields[12]))
  tree, total, grew = {root}, 0, True
  while grew:
    grew = False
    for pid, (ppid, _) in stats.items():
      if ppid in tree and pid not in tree:
        tree.add(pid)
        grew = True
  for pid in tree:
    total += stats.get(pid, (0, 0))[1]
  return total / ticks


def measure(spec: dict) -> dict:
  """One measurement, in this process, with `resnet_jax` from the tree on sys.path."""
  from absl import flags
  flags.FLAGS.mark_as_parsed()  # Grain's workers read its absl flags.
  import resnet_jax
  from resnet_jax import config as config_lib
  from resnet_jax import stream

  cfg = config_lib.default_config().dataset
  cfg.name = "imagenet2012"
  cfg.data_dir = spec["data_dir"]
  cfg.train_split = cfg.eval_split = "train"  # The bigger split, for both.
  cfg.image_size = IMAGE_SIZE
  cfg.worker_count = spec["workers"]
  batch_size = spec["batch_size"]
  if spec["split"] == "train":
    ds = stream.make_train_dataset(cfg, global_batch_size=batch_size, seed=0, process_index=0,
                                   process_count=1)
  else:
    ds = stream.make_eval_dataset(cfg, global_batch_size=batch_size, process_index=0,
                                  process_count=1)
  it = iter(ds)
  for _ in range(spec["warmup"]):
    next(it)
  load_before = os.getloadavg()
  cpu_start, start = tree_cpu_seconds(os.getpid()), time.perf_counter()
  for _ in range(spec["batches"]):
    batch = next(it)
  wall = time.perf_counter() - start
  # /proc counts CPU time in clock ticks: a measurement shorter than one reads 0.
  cpu = max(tree_cpu_seconds(os.getpid()) - cpu_start, 1 / os.sysconf("SC_CLK_TCK"))
  assert batch["image"].shape == (batch_size, IMAGE_SIZE, IMAGE_SIZE, 3), batch["image"].shape
  if hasattr(it, "close"):
    it.close()
  images = spec["batches"] * batch_size
  return {**spec, "resnet_jax_file": resnet_jax.__file__, "images": images, "wall_s": wall,
          "images_per_s": images / wall,
          "images_per_s_per_core": images / wall / max(1, spec["workers"]),
          "cpu_s": cpu, "images_per_cpu_s": images / cpu,
          "load_average_before": load_before, "load_average_after": os.getloadavg(),
          "tensorflow_imported": "tensorflow" in sys.modules}


def export_tree(tree: str, into: str) -> str:
  """A directory whose resnet_jax/ is `tree`'s: the working tree itself for ".", else the
  revision's, exported with git archive."""
  if tree == ".":
    return REPO
  target = os.path.join(into, tree.replace("/", "_"))
  os.makedirs(target, exist_ok=True)
  archive = subprocess.run(["git", "-C", REPO, "archive", tree, "resnet_jax"], check=True,
                           capture_output=True).stdout
  subprocess.run(["tar", "-x", "-C", target], input=archive, check=True)
  return target


def tree_label(tree: str) -> str:
  if tree == ".":
    return "working tree"
  rev = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", tree], check=True,
                       capture_output=True, text=True).stdout.strip()
  return rev


def prepared(data_root: str, num_examples: int, shorter_side: int | None) -> str:
  """The synthetic imagenet2012's data_dir (full size, or stored at `shorter_side`)."""
  sys.path.insert(0, REPO)
  from resnet_jax import prepare
  data_dir = os.path.join(data_root, f"n{num_examples}_" + (
      f"shorter{shorter_side}" if shorter_side else "full"))
  prepare.prepare_synthetic_imagenet(data_dir, num_examples=num_examples,
                                     shorter_side=shorter_side)
  return data_dir


def run_one(spec: dict, path: str) -> dict:
  env = dict(os.environ, PYTHONPATH=path, JAX_PLATFORMS="cpu")
  done = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)],
                        env=env, cwd=path, capture_output=True, text=True)
  for line in done.stdout.splitlines():
    if line.startswith(RESULT_PREFIX):
      return json.loads(line[len(RESULT_PREFIX):])
  raise RuntimeError(f"measurement {spec} failed:\n{done.stderr[-3000:]}")


def print_table(results: list[dict], trees: list[str]) -> None:
  def median(rows, key):
    return statistics.median(r[key] for r in rows) if rows else float("nan")

  keys = sorted({(r["dataset"], r["split"], r["workers"]) for r in results})
  header = " | ".join(f"{t}: img/s, per core, per CPU-s" for t in trees)
  print(f"| dataset | split | workers | {header} | load |")
  for dataset, split, workers in keys:
    cells, loads = [], []
    for tree in trees:
      rows = [r for r in results if (r["tree"], r["dataset"], r["split"], r["workers"])
              == (tree, dataset, split, workers)]
      loads += [r["load_average_before"][0] for r in rows]
      cells.append(f"{median(rows, 'images_per_s'):.0f}, "
                   f"{median(rows, 'images_per_s_per_core'):.0f}, "
                   f"{median(rows, 'images_per_cpu_s'):.0f}")
    print(f"| {dataset} | {split} | {workers} | {' | '.join(cells)} | "
          f"{min(loads):.1f}-{max(loads):.1f} |")


def main(argv: list[str] | None = None) -> list[dict]:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--trees", default=".", help="comma list: git revisions, '.' = working tree")
  p.add_argument("--workers", default="0,1,2", help="comma list of config.dataset.worker_count")
  p.add_argument("--splits", default="train,eval")
  p.add_argument("--shorter_sides", default="",
                 help="comma list: also measure copies stored at these shorter sides")
  p.add_argument("--num_examples", type=int, default=2000)
  p.add_argument("--data_root", default=os.path.join(tempfile.gettempdir(),
                                                     "resnet_jax_stream_bench"))
  p.add_argument("--batch_size", type=int, default=64)
  # Warm-up drains what the workers buffered while they started (up to a few batches each), so
  # that the timing starts and ends with the buffers in the same, steady state.
  p.add_argument("--warmup", type=int, default=10, help="batches before the timing")
  p.add_argument("--batches", type=int, default=20, help="batches timed")
  p.add_argument("--repeats", type=int, default=2)
  p.add_argument("--json_out", default=None)
  p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.worker:
    print(RESULT_PREFIX + json.dumps(measure(json.loads(args.worker))), flush=True)
    return []

  sides = [int(s) for s in args.shorter_sides.split(",") if s]
  datasets = {"full size": prepared(args.data_root, args.num_examples, None)}
  datasets.update({f"shorter side {s}": prepared(args.data_root, args.num_examples, s)
                   for s in sides})
  if args.splits.replace("eval", "").replace("train", "").strip(","):
    p.error(f"--splits takes train and eval; got {args.splits}")
  trees = args.trees.split(",")
  machine = {"cpu_model": cpu_model(), "cores": os.cpu_count()}
  results = []
  with tempfile.TemporaryDirectory() as exports:
    paths = {t: export_tree(t, exports) for t in trees}
    labels = {t: tree_label(t) for t in trees}
    for repeat in range(args.repeats):
      for dataset, data_dir in datasets.items():
        for split in args.splits.split(","):
          for workers in map(int, args.workers.split(",")):
            # Alternate which tree goes first, so neither always meets the same load.
            order = trees if repeat % 2 == 0 else trees[::-1]
            for tree in order:
              spec = {"tree": labels[tree], "dataset": dataset, "data_dir": data_dir,
                      "split": split, "workers": workers, "batch_size": args.batch_size,
                      "warmup": args.warmup, "batches": args.batches, "repeat": repeat}
              result = {**machine, **run_one(spec, paths[tree])}
              results.append(result)
              print(f"{result['tree']:>12} {dataset:>16} {split:>5} workers={workers} "
                    f"{result['images_per_s']:7.0f} img/s {result['images_per_cpu_s']:7.0f} "
                    f"img/CPU-s load {result['load_average_before'][0]:.1f}", flush=True)
              if args.json_out:
                with open(args.json_out, "a") as f:
                  f.write(json.dumps(result) + "\n")
  print(f"\n{machine['cpu_model']}, {machine['cores']} cores; medians of {args.repeats}:")
  print_table(results, [labels[t] for t in trees])
  return results


if __name__ == "__main__":
  main()
