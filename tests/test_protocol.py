"""The paper's CIFAR-10 protocol (He et al. 2016, section 4.2): the 45k/5k validation split of
configs/cifar10.py, the Table 6 sweep (configs/sweeps/table6_cifar10.py) and its report, mean ±
std over seeds beside the paper's numbers. No CIFAR-10 here: the split's slices are read from
the prepared Fashion-MNIST, whose first 50,000 training images stand for CIFAR-10's 50,000
(prepare.py: five batches of 10,000)."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from resnet_jax import config as config_lib
from resnet_jax import data, points, reporting, results

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SWEEP = "configs/sweeps/table6_cifar10.py"


def load_config(path: str, arg: str | None = None):
  spec = importlib.util.spec_from_file_location("config_file", os.path.join(REPO, path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


# --- The 45k/5k split ---

def test_validation_split_trains_on_the_first_45k_and_evaluates_on_the_last_5k():
  test = load_config("configs/cifar10.py", "depth=56")
  validation = load_config("configs/cifar10.py", "depth=56,split=validation")
  assert (test.dataset.train_split, test.dataset.eval_split) == ("train", "test")
  assert (validation.dataset.train_split, validation.dataset.eval_split) == (
      "train[:45000]", "train[45000:50000]")
  # Only the data differs: the same net and recipe.
  validation.dataset.train_split, validation.dataset.eval_split = "train", "test"
  assert validation == test


def test_an_unknown_split_argument_is_refused_naming_the_allowed_ones():
  with pytest.raises(config_lib.ConfigError,
                     match="split must be one of test, validation; got 'val'"):
    load_config("configs/cifar10.py", "split=val")


def test_validation_slices_hold_45000_and_5000_disjoint_examples_covering_the_first_50000(
    prepared_data_dir):
  dataset = load_config("configs/cifar10.py", "split=validation").dataset
  dataset.name, dataset.data_dir = "fashion_mnist", prepared_data_dir
  info = data.dataset_info(dataset)
  assert (info.num_train, info.num_eval) == (45_000, 5_000)
  train_images, train_labels = data.load_split(dataset, dataset.train_split)
  eval_images, eval_labels = data.load_split(dataset, dataset.eval_split)
  all_images, all_labels = data.load_split(dataset, "train")
  # Positions 0-44,999 and 45,000-49,999 of the stored order: disjoint, and together the first
  # 50,000 (all of CIFAR-10's training split).
  np.testing.assert_array_equal(np.concatenate([train_images, eval_images]), all_images[:50_000])
  np.testing.assert_array_equal(np.concatenate([train_labels, eval_labels]), all_labels[:50_000])


def test_the_papers_iteration_counts_hold_under_either_split():
  # The recipe is in steps, as the paper's is in iterations: a 45k split gives 351 full batches
  # an epoch instead of 390, so 64k steps are 182.3 epochs instead of 164.1, and no step moves.
  for split, train_size, per_epoch in (("test", 50_000, 390), ("validation", 45_000, 351)):
    config = load_config("configs/cifar10.py", f"depth=110,split={split}")
    assert config_lib.steps_per_epoch(train_size, config.batch_size) == per_epoch
    resolved = config_lib.resolve_epochs(config, train_size)
    config_lib.validate(resolved, train_size=train_size)
    opt = resolved.optimizer
    assert (resolved.num_steps, tuple(opt.boundaries), opt.boundaries_unit) == (
        64_000, (32_000, 48_000), "steps")
    assert (opt.warmup_steps, resolved.eval_every) == (400, 2_000)


# --- The Table 6 sweep ---

def load_sweep(arg: str | None = None):
  return points.load_get_config(os.path.join(REPO, SWEEP))(arg)


def test_table6_sweep_runs_every_depth_plain_and_residual_with_three_seeds():
  sweep = points.expand(load_sweep())  # Every point's config validated.
  expected = [(d, s, k) for d in (20, 32, 44, 56, 110) for s in (False, True) for k in (0, 1, 2)]
  assert [p.name for p in sweep] == [
      f"depth={d},skip={str(s).lower()},seed={k}" for d, s, k in expected]
  assert [(p.config.model.name, p.config.model.skip, p.config.seed) for p in sweep] == [
      (f"resnet{d}", s, k) for d, s, k in expected]
  for p in sweep:
    opt = p.config.optimizer
    assert (p.config.dataset.name, p.config.dataset.train_split, p.config.dataset.eval_split,
            p.config.batch_size, p.config.num_steps) == ("cifar10", "train", "test", 128, 64_000)
    assert (opt.lr, opt.momentum, opt.weight_decay, tuple(opt.boundaries)) == (
        0.1, 0.9, 1e-4, (32_000, 48_000))
    assert opt.warmup_steps == (400 if p.fields["depth"] == 110 else 0)
  with open(os.path.join(REPO, SWEEP)) as f:
    assert f"--config={SWEEP}" in f.read()


def test_five_seeds_add_seeds_3_and_4_to_the_names_of_three():
  three = {p.name for p in points.expand(load_sweep())}
  five = {p.name for p in points.expand(load_sweep("seeds=5"))}
  assert len(five) == 50 and three < five
  assert {n.rsplit("=", 1)[1] for n in five - three} == {"3", "4"}


def test_table6_sweep_on_the_validation_split_evaluates_on_the_held_out_5k():
  sweep = points.expand(load_sweep("split=validation"))
  assert len(sweep) == 30
  assert {(p.config.dataset.train_split, p.config.dataset.eval_split) for p in sweep} == {
      ("train[:45000]", "train[45000:50000]")}
  assert not any(results.compares_with_paper(p.config) for p in sweep)
  assert all(results.compares_with_paper(p.config) for p in points.expand(load_sweep()))


# --- The report: mean ± std over seeds beside the paper ---

def row(depth: int, skip: bool, seed: int, train_error: float, test_error: float,
        status: str = reporting.COMPLETED) -> dict:
  """A row as results.results_table makes it."""
  return {"name": f"depth={depth},skip={str(skip).lower()},seed={seed}", "depth": depth,
          "skip": skip, "seed": seed, "status": status, "train_error": train_error,
          "test_error": test_error, "best_test_error": test_error, "step": 64_000,
          "wall_time_s": 100.0, "num_params": 1000, "message": ""}


NAN = float("nan")
# Known errors; their means and sample stds (n - 1) in %, worked by hand:
#   plain-20  train 1.0, 1.2, 1.4: mean 1.20, deviations -0.2, 0, 0.2, std sqrt(0.08 / 2) = 0.20
#             test 10.0, 10.4, 10.8: mean 10.40, std sqrt(0.32 / 2) = 0.40
#   ResNet-20 train 0.5, 0.5, 0.8: mean 0.60, deviations -0.1, -0.1, 0.2, std sqrt(0.06 / 2) = 0.17
#             test 8.5, 9.0, 8.8: mean 8.77, deviations -0.267, 0.233, 0.033,
#             std sqrt(0.12667 / 2) = 0.25
#   ResNet-110 (seed 2 diverged) train 0.2, 0.4: mean 0.30, std sqrt(0.02) = 0.14;
#             test 6.5, 6.6: mean 6.55, std sqrt(0.005) = 0.07
#   plain-110 failed at every seed: no numbers.
ROWS = [row(20, False, 0, 0.010, 0.100), row(20, False, 1, 0.012, 0.104),
        row(20, False, 2, 0.014, 0.108),
        row(20, True, 0, 0.005, 0.085), row(20, True, 1, 0.005, 0.090),
        row(20, True, 2, 0.008, 0.088),
        *(row(110, False, k, NAN, NAN, reporting.FAILED) for k in range(3)),
        row(110, True, 0, 0.002, 0.065), row(110, True, 1, 0.004, 0.066),
        row(110, True, 2, NAN, NAN, reporting.DIVERGED)]
EXPECTED = [
    ["depth", "skip", "seeds", "train err %", "test err %", "paper test err %"],
    ["20", "false", "3/3", "1.20 ± 0.20", "10.40 ± 0.40", "—"],
    ["20", "true", "3/3", "0.60 ± 0.17", "8.77 ± 0.25", "8.75"],
    ["110", "false", "0/3", "-", "-", "—"],
    ["110", "true", "2/3", "0.30 ± 0.14", "6.55 ± 0.07", "6.43 (6.61 ± 0.16)"],
]


def cells(line: str) -> list[str]:
  """An aligned text line's cells: split at runs of two or more spaces."""
  return re.split(r" {2,}", line.strip())


def test_over_seeds_groups_the_points_that_differ_only_in_their_seed():
  groups = results.over_seeds(ROWS)
  assert [(g["depth"], g["skip"], g["seeds"], g["completed"]) for g in groups] == [
      (20, False, 3, 3), (20, True, 3, 3), (110, False, 3, 0), (110, True, 3, 2)]
  assert groups[3]["test_error"] == [0.065, 0.066]


def test_report_prints_mean_and_std_over_seeds_beside_the_papers_table6():
  lines = results.format_over_seeds(ROWS, paper=True).splitlines()
  assert [cells(line) for line in lines[1:6]] == EXPECTED
  assert lines[6].startswith("Paper: He et al. 2016, Table 6")


def test_report_off_cifar10_test_has_no_paper_column():
  lines = results.format_over_seeds(ROWS, paper=False).splitlines()
  assert [cells(line) for line in lines[1:6]] == [line[:-1] for line in EXPECTED]
  assert len(lines) == 6


def test_report_command_prints_the_seed_table_of_the_table6_sweep(tmp_path):
  sweep = {p.name: p for p in points.expand(load_sweep())}
  for r in ROWS:
    run_dir = sweep[r["name"]].run_dir(str(tmp_path))
    os.makedirs(run_dir)
    reporting.Summary(status=r["status"], message="", step=r["step"], train_loss=0.1,
                      train_error=r["train_error"], test_error=r["test_error"],
                      best_test_error=r["best_test_error"], wall_time_s=100.0, num_params=1000
                      ).write(run_dir)
  out = subprocess.run([sys.executable, "-m", "resnet_jax.sweep", f"--config={SWEEP}",
                        f"--workdir={tmp_path}", "--report"], cwd=REPO, capture_output=True,
                       text=True, check=False, timeout=120)
  assert out.returncode == 0, out.stderr
  lines = out.stdout.splitlines()
  start = lines.index(next(line for line in lines if line.startswith("Over seeds:")))
  table = [cells(line) for line in lines[start + 1:start + 12]]
  assert table[0] == EXPECTED[0] and table[1:3] == EXPECTED[1:3]
  # The depths without summaries are pending: no completed seed, the paper's number all the same.
  assert table[3] == ["32", "false", "0/3", "-", "-", "—"]
  assert table[4] == ["32", "true", "0/3", "-", "-", "7.51"]
  assert table[9:11] == EXPECTED[3:5]
