"""Figures and tables of finished runs, drawn from synthetic metrics (no training)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from resnet_jax import plots, points, reporting, runner

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def fake_run(depth: int, skip: bool, *, train_error: float, test_error: float,
             status: str = "completed", diagnostics: bool = False) -> plots.Run:
  """A run of 300 steps whose errors fall linearly to the given final values."""
  events = []
  blocks = ["stem", *(f"stage1_block{b}" for b in range(1, (depth - 2) // 6 + 1)), "head"]
  for step in (100, 200, 300):
    fraction = step / 300
    events.append({"event": reporting.TRAIN, "step": step, "train_error": 0.9 - fraction * (
        0.9 - train_error)})
    events.append({"event": reporting.EVAL, "step": step, "test_error": 0.9 - fraction * (
        0.9 - test_error)})
    if diagnostics:
      events.append({"event": reporting.DIAGNOSTICS, "step": step - 100,
                     "grad_norm": {b: 0.1 * (i + 1) for i, b in enumerate(blocks)},
                     "activation_rms": {b: 1.0 + i for i, b in enumerate(blocks[1:-1])}})
  summary = reporting.Summary(status=status, message="", step=300, train_loss=0.1,
                              train_error=train_error, test_error=test_error,
                              best_test_error=test_error, wall_time_s=30.0, num_params=1000)
  return plots.Run({"depth": depth, "skip": skip}, summary, events)


def ablation_runs(**kwargs) -> list[plots.Run]:
  return [fake_run(20, False, train_error=0.05, test_error=0.09, **kwargs),
          fake_run(20, True, train_error=0.04, test_error=0.085, **kwargs),
          fake_run(56, False, train_error=0.08, test_error=0.12, **kwargs),
          fake_run(56, True, train_error=0.02, test_error=0.07, **kwargs)]


def assert_png(path) -> None:
  with open(path, "rb") as f:
    assert f.read(8) == PNG_MAGIC
  assert os.path.getsize(path) > 10_000


def test_error_curves_are_written_as_a_png(tmp_path):
  path = tmp_path / "curves.png"
  plots.plot_error_curves(ablation_runs(), str(path), title="fashion_mnist")
  assert_png(path)


def test_error_curves_of_a_sweep_without_skip_have_one_panel(tmp_path):
  runs = [plots.Run({"lr": lr}, None, fake_run(20, True, train_error=0.1, test_error=0.1).events)
          for lr in (0.05, 0.1)]
  path = tmp_path / "curves.png"
  plots.plot_error_curves(runs, str(path))
  assert_png(path)


def test_gradient_flow_is_written_as_a_png(tmp_path):
  path = tmp_path / "flow.png"
  plots.plot_gradient_flow(ablation_runs(diagnostics=True), str(path))
  assert_png(path)


def test_gradient_flow_without_diagnostics_says_how_to_record_them(tmp_path):
  with pytest.raises(ValueError, match="diagnostics_every"):
    plots.plot_gradient_flow(ablation_runs(), str(tmp_path / "flow.png"))


def test_ablation_table_puts_plain_beside_residual_per_depth():
  table = plots.ablation_table(ablation_runs(), dataset="fashion_mnist")
  assert table.splitlines()[2:] == [
      "| depth | plain train | plain test | ResNet train | ResNet test |",
      "|---:|---:|---:|---:|---:|",
      "| 20 | 5.00 | 9.00 | 4.00 | 8.50 |",
      "| 56 | 8.00 | 12.00 | 2.00 | 7.00 |"]


def test_ablation_table_on_cifar10_adds_the_papers_table6():
  lines = plots.ablation_table(ablation_runs(), dataset="cifar10").splitlines()
  assert lines[2].endswith("| ResNet test, paper |")
  assert lines[4].endswith("| 8.75 |") and lines[5].endswith("| 6.97 |")


def test_ablation_table_shows_the_status_of_a_run_that_did_not_complete():
  runs = ablation_runs()
  runs[2] = fake_run(56, False, train_error=float("nan"), test_error=float("nan"),
                     status="diverged")
  assert plots.ablation_table(runs, dataset="mnist").splitlines()[-1] == (
      "| 56 | diverged | diverged | 2.00 | 7.00 |")


def test_ablation_table_shows_a_run_without_a_summary_as_pending():
  runs = ablation_runs()
  runs[2] = plots.Run({"depth": 56, "skip": False}, None, [])
  assert plots.ablation_table(runs, dataset="mnist").splitlines()[-1] == (
      "| 56 | pending | pending | 2.00 | 7.00 |")


def test_ablation_table_of_several_seeds_shows_mean_and_std_of_the_completed_runs():
  def seed_run(depth, skip, seed, test_error, status="completed"):
    run = fake_run(depth, skip, train_error=0.01 * (seed + 1), test_error=test_error,
                   status=status)
    return dataclasses.replace(run, fields={**run.fields, "seed": seed})
  # ResNet-20 test 8.5, 9.0, 8.8%: mean 8.77, sample std 0.25; train 1, 2, 3%: 2.00 ± 1.00.
  # Plain-20 with seed 2 diverged: test 10.0 and 10.4%, 10.20 ± 0.28 (2 of 3).
  runs = [seed_run(20, True, 0, 0.085), seed_run(20, True, 1, 0.090),
          seed_run(20, True, 2, 0.088), seed_run(20, False, 0, 0.100),
          seed_run(20, False, 1, 0.104), seed_run(20, False, 2, float("nan"), "diverged")]
  lines = plots.ablation_table(runs, dataset="cifar10").splitlines()
  assert lines[0].startswith("Final error (%) on cifar10, mean ± std over up to 3 runs:")
  assert lines[4] == ("| 20 | 1.50 ± 0.71 (2 of 3) | 10.20 ± 0.28 (2 of 3) | 2.00 ± 1.00 | "
                      "8.77 ± 0.25 | 8.75 |")


def test_write_sweep_figures_writes_curves_table_and_gradient_flow(tmp_path):
  paths = plots.write_sweep_figures(ablation_runs(diagnostics=True), str(tmp_path),
                                    dataset="fashion_mnist")
  assert [os.path.basename(p) for p in paths] == [
      "error_curves.png", "ablation_table.md", "gradient_flow.png"]
  assert all(os.path.getsize(p) > 0 for p in paths)


def map_run(lr: float, depth: int, skip: bool, train_error: float,
            status: str = "completed") -> plots.Run:
  """A run of an lr x depth x skip sweep that ended with this training error."""
  run = fake_run(depth, skip, train_error=train_error, test_error=train_error, status=status)
  return dataclasses.replace(run, fields={"lr": lr, "depth": depth, "skip": skip})


def map_runs() -> list[plots.Run]:
  """Plain nets that stop training at lr 1 (plain-56 diverges), ResNets that train at every lr."""
  nan = float("nan")
  return [map_run(0.1, 20, False, 0.10), map_run(0.1, 20, True, 0.08),
          map_run(1.0, 20, False, 0.40), map_run(1.0, 20, True, 0.12),
          map_run(0.1, 56, False, 0.20), map_run(0.1, 56, True, 0.07),
          map_run(1.0, 56, False, nan, status="diverged"),
          plots.Run({"lr": 1.0, "depth": 56, "skip": True}, None, [])]


def test_trainability_grid_holds_final_training_errors_by_depth_and_lr():
  lrs, depths, errors, _ = plots.trainability_grid(map_runs())
  assert (lrs, depths) == ([0.1, 1.0], [20, 56])
  np.testing.assert_array_equal(errors[False], [[0.10, 0.40], [0.20, np.nan]])
  np.testing.assert_array_equal(errors[True], [[0.08, 0.12], [0.07, np.nan]])


def test_trainability_grid_marks_diverged_and_pending_cells_by_status():
  _, _, _, statuses = plots.trainability_grid(map_runs())
  assert statuses[False].tolist() == [["completed", "completed"], ["completed", "diverged"]]
  assert statuses[True].tolist() == [["completed", "completed"], ["completed", "pending"]]


def test_trainability_grid_leaves_a_cell_without_a_run_empty():
  _, _, errors, statuses = plots.trainability_grid(map_runs()[:-1])
  assert statuses[True][1, 1] == "" and np.isnan(errors[True][1, 1])


def test_trainability_grid_rejects_two_runs_in_one_cell():
  with pytest.raises(ValueError, match="one run per lr, depth and skip"):
    plots.trainability_grid([*map_runs(), map_run(0.1, 20, False, 0.11)])


def test_trainability_map_is_written_as_a_png(tmp_path):
  path = tmp_path / "map.png"
  plots.plot_trainability_map(map_runs(), str(path), title="fashion_mnist")
  assert_png(path)


def test_write_sweep_figures_of_an_lr_depth_skip_sweep_writes_the_map_not_the_ablation_table(
    tmp_path):
  paths = plots.write_sweep_figures(map_runs(), str(tmp_path), dataset="fashion_mnist")
  assert [os.path.basename(p) for p in paths] == ["error_curves.png", "trainability_map.png"]
  assert_png(paths[1])


def edge_of_stability_runs(sharpness: bool = True) -> list[plots.Run]:
  """Full-batch runs at two lrs, plain and residual: the loss at every step, the sharpness
  rising to 2/lr every 10 steps, the plain nets' negative end dominating at step 0."""
  runs = []
  for lr in (0.1, 0.2):
    for skip in (False, True):
      events = [{"event": reporting.TRAIN, "step": step, "loss": 2.3 / (1 + step / 10),
                 "train_error": 0.5} for step in range(1, 51)]
      if sharpness:
        events += [{"event": reporting.SHARPNESS, "step": step, "lr": lr, "threshold": 2 / lr,
                    "sharpness": min(5 + step / 2, 2 / lr), "eigenvalues": [5 + step / 2],
                    "lowest": -600.0 if step == 0 and not skip else -1.0}
                   for step in range(0, 51, 10)]
      runs.append(plots.Run({"lr": lr, "skip": skip}, None, events))
  return runs


def test_a_sweep_over_lr_with_sharpness_gets_the_edge_of_stability_figure(tmp_path):
  paths = plots.write_sweep_figures(edge_of_stability_runs(), str(tmp_path),
                                    dataset="fashion_mnist")
  assert [os.path.basename(p) for p in paths] == ["error_curves.png", "sharpness.png",
                                                  "edge_of_stability.png"]
  assert_png(paths[-1])
  os.mkdir(tmp_path / "without")
  without = plots.write_sweep_figures(edge_of_stability_runs(sharpness=False),
                                      str(tmp_path / "without"), dataset="fashion_mnist")
  assert [os.path.basename(p) for p in without] == ["error_curves.png"]
  with pytest.raises(ValueError, match="sharpness_every"):
    plots.plot_edge_of_stability(edge_of_stability_runs(sharpness=False), str(tmp_path / "e.png"))


def write_sweep_workdir(workdir) -> None:
  """A finished two-point sweep on disk, as `python -m resnet_jax.sweep` leaves it."""
  config = ml_collections.ConfigDict({
      "base": "configs/fashion_mnist.py", "fixed": {"diagnostics_every": 100},
      "points": points.product(points.axis("depth", [20]), points.axis("skip", [False, True]))})
  runs = {"depth=20,skip=false": fake_run(20, False, train_error=0.05, test_error=0.09,
                                          diagnostics=True),
          "depth=20,skip=true": fake_run(20, True, train_error=0.04, test_error=0.08,
                                         diagnostics=True)}

  def replay(point_config, point_dir):
    run = runs[os.path.basename(point_dir)]
    with open(os.path.join(point_dir, reporting.METRICS_FILE), "w") as f:
      f.writelines(json.dumps(e) + "\n" for e in run.events)
    return dataclasses.replace(run.summary, step=point_config.num_steps, message="finished")

  runner.run_sweep(config, str(workdir), run_fn=replay)


def test_plot_command_writes_a_finished_sweeps_figures_into_its_workdir(tmp_path):
  write_sweep_workdir(tmp_path)
  out = subprocess.run([sys.executable, "-m", "resnet_jax.sweep", f"--workdir={tmp_path}",
                        "--plot"], cwd=REPO, capture_output=True, text=True, check=False,
                       timeout=120)
  assert out.returncode == 0, out.stderr
  names = ["error_curves.png", "ablation_table.md", "gradient_flow.png"]
  assert [line for line in out.stdout.splitlines() if line.startswith("wrote ")] == [
      f"wrote {tmp_path / name}" for name in names]
  assert_png(tmp_path / "error_curves.png")
  assert_png(tmp_path / "gradient_flow.png")
  with open(tmp_path / "ablation_table.md") as f:
    assert f.read().splitlines()[-1] == "| 20 | 5.00 | 9.00 | 4.00 | 8.00 |"


def test_run_label_names_plain_and_residual_nets_by_depth():
  assert plots.run_label({"depth": 56, "skip": False}) == "plain-56"
  assert plots.run_label({"depth": 110, "skip": True, "seed": 1}) == "ResNet-110,seed=1"
  assert plots.run_label({"lr": 0.1, "optimizer.nesterov": True}) == (
      "lr=0.1,optimizer.nesterov=true")
