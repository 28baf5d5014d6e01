"""Old code against new, bitwise: the same tiny jobs run by two trees, their records compared.

  python scripts/compare_revisions.py OLD_REV [--new_tree=.] [--out=DIR]

For a change that must not change behaviour (a refactoring): OLD_REV is checked out in a
temporary git worktree; the new code is the working tree `--new_tree`. Both sides must be the
same machine (float32 rounding differs between CPUs). About 7 minutes on 2 CPU cores.

Runs, with each tree's own code (`python -m resnet_jax.main` / `resnet_jax.sweep` in that tree)
and the same interpreter: (a) a single run; (b) a run stopped at step 10 (num_steps=10) and
resumed to 20; (c) a sweep of 3 learning rates packed as one population (--pack=population:3);
(d) the same sweep with --pack=off. Then compares, field by field with timings left out: every
final checkpoint's arrays (bitwise), every metrics.jsonl event, summary.json and the off sweep's
results.csv. Prints one line per comparison; exits 1 if anything differs.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

TIMINGS = {"wall_time_s", "img_per_s", "compile_s"}
RUN_FLAGS = ["--config.num_steps=20", "--config.log_every=5", "--config.eval_every=10",
             "--config.checkpoint_every=10", "--config.batch_size=32",
             "--config.model.width=0.25", "--config.dataset.eval_split=test[:256]",
             "--config.progress_bar=false", "--config.optimizer.warmup_steps=2"]
SWEEP = """
import ml_collections
from resnet_jax import points
def get_config():
  return ml_collections.ConfigDict({"base": "configs/fashion_mnist.py",
          "fixed": {"num_steps": 20, "log_every": 5, "eval_every": 10, "checkpoint_every": 10,
                    "batch_size": 32, "model": {"width": 0.25},
                    "dataset": {"eval_split": "test[:256]"}, "progress_bar": False,
                    "optimizer": {"warmup_steps": 2}},
          "points": points.axis("lr", [0.05, 0.1, 0.2])})
"""


def run(tree: str, args: list[str], out: str) -> None:
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": tree}
  with open(os.path.join(out, "log.txt"), "a") as log:
    subprocess.run([sys.executable, "-m", *args], cwd=tree, env=env, check=True, stdout=log,
                   stderr=subprocess.STDOUT)


def jobs(tree: str, out: str) -> None:
  os.makedirs(out, exist_ok=True)
  config = "--config=configs/fashion_mnist.py"
  run(tree, ["resnet_jax.main", config, f"--workdir={out}/single", *RUN_FLAGS], out)
  run(tree, ["resnet_jax.main", config, f"--workdir={out}/resumed", *RUN_FLAGS,
             "--config.num_steps=10"], out)
  run(tree, ["resnet_jax.main", config, f"--workdir={out}/resumed", *RUN_FLAGS], out)
  sweep = os.path.join(out, "sweep_config.py")
  with open(sweep, "w") as f:
    f.write(SWEEP)
  for pack in ("population:3", "off"):
    run(tree, ["resnet_jax.sweep", f"--config={sweep}", f"--workdir={out}/{pack}",
               f"--pack={pack}"], out)


def untimed(record: dict) -> dict:
  return {k: v for k, v in record.items() if k not in TIMINGS}


def restored_state(run_dir: str):
  """(step, state) of the run's newest checkpoint, read raw: no model is built."""
  import orbax.checkpoint as ocp
  root = os.path.join(run_dir, "checkpoints")
  newest = max(int(n) for n in os.listdir(root) if n.isdigit())
  return newest, ocp.StandardCheckpointer().restore(os.path.join(root, str(newest), "state"))


def compare_run(name: str, old: str, new: str) -> list[str]:
  """Prints whether two runs' final states, events and summaries are the same; returns what
  differs."""
  import jax
  problems = []
  (old_step, a), (new_step, b) = restored_state(old), restored_state(new)
  leaves_a, leaves_b = jax.tree.leaves_with_path(a), jax.tree.leaves_with_path(b)
  if old_step != new_step or len(leaves_a) != len(leaves_b):
    problems.append(f"checkpoint step {old_step} vs {new_step}, {len(leaves_a)} vs "
                    f"{len(leaves_b)} arrays")
  else:
    for (path, x), (_, y) in zip(leaves_a, leaves_b):
      x, y = np.asarray(x), np.asarray(y)
      if x.dtype != y.dtype or x.shape != y.shape or not np.array_equal(x, y, equal_nan=True):
        problems.append(f"array {jax.tree_util.keystr(path)} differs")
  events = lambda d: [untimed(json.loads(line)) for line in open(os.path.join(d, "metrics.jsonl"))]
  if events(old) != events(new):
    problems.append("metrics.jsonl events differ: "
                    + next(f"{x} vs {y}" for x, y in zip(events(old) + [None] * 99,
                                                           events(new) + [None] * 99) if x != y))
  summary = lambda d: untimed(json.load(open(os.path.join(d, "summary.json"))))
  if summary(old) != summary(new):
    problems.append(f"summary.json: {summary(old)} vs {summary(new)}")
  print(f"{name}: {'DIFFERENT: ' + '; '.join(problems[:5]) if problems else 'OK'}"
        f" (step {old_step}, {len(leaves_a)} arrays, {len(events(old))} events)")
  return problems


def compare_csv(old: str, new: str) -> list[str]:
  rows = lambda d: [untimed(r) for r in csv.DictReader(open(os.path.join(d, "results.csv")))]
  problems = [] if rows(old) == rows(new) else [f"{rows(old)} vs {rows(new)}"]
  print(f"off sweep results.csv: {'DIFFERENT: ' + problems[0] if problems else 'OK'} "
        f"({len(rows(old))} rows)")
  return problems


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("old_rev")
  parser.add_argument("--new_tree", default=os.getcwd())
  parser.add_argument("--out", default=None)
  args = parser.parse_args()
  out = args.out or tempfile.mkdtemp(prefix="compare_")
  old_tree = os.path.join(out, "old_tree")
  subprocess.run(["git", "-C", args.new_tree, "worktree", "add", "--detach", old_tree,
                  args.old_rev], check=True, capture_output=True)
  try:
    for label, tree in (("old", old_tree), ("new", os.path.abspath(args.new_tree))):
      print(f"running the jobs with the {label} code ({tree})", flush=True)
      jobs(tree, os.path.join(out, label))
  finally:
    subprocess.run(["git", "-C", args.new_tree, "worktree", "remove", "--force", old_tree],
                   check=False)
  old, new = os.path.join(out, "old"), os.path.join(out, "new")
  problems = compare_run("single run", f"{old}/single", f"{new}/single")
  problems += compare_run("resumed run", f"{old}/resumed", f"{new}/resumed")
  for point in sorted(os.listdir(f"{old}/population:3")):
    if os.path.isdir(f"{old}/population:3/{point}") and point.startswith("lr="):
      problems += compare_run(f"population member {point}", f"{old}/population:3/{point}",
                              f"{new}/population:3/{point}")
  problems += compare_csv(f"{old}/off", f"{new}/off")
  print("bitwise the same" if not problems else f"{len(problems)} differences")
  return 1 if problems else 0


if __name__ == "__main__":
  sys.exit(main())
