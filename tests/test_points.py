"""A sweep's points: the language (axis, product, zipped, chain), their names, and the run
config of each point, including the sweep files in configs/sweeps/. Nothing runs."""

from __future__ import annotations

import os

import ml_collections
import pytest

from resnet_jax import config as config_lib
from resnet_jax import optim, points

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_sweep(sweep_points, base="configs/fashion_mnist.py",
               fixed=None) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({"base": base, "fixed": fixed or {}, "points": sweep_points})


def load_sweep_file(name: str, *arg: str) -> ml_collections.ConfigDict:
  return points.load_get_config(os.path.join(REPO, "configs", "sweeps", name))(*arg)


# --- The language ---

def test_product_varies_the_last_axis_fastest():
  combined = points.product(points.axis("depth", [20, 56]), points.axis("skip", [False, True]))
  assert combined == [{"depth": 20, "skip": False}, {"depth": 20, "skip": True},
                      {"depth": 56, "skip": False}, {"depth": 56, "skip": True}]


def test_zipped_pairs_points_by_position():
  paired = points.zipped(points.axis("batch_size", [64, 128]),
                         points.axis("num_steps", [800, 400]))
  assert paired == [{"batch_size": 64, "num_steps": 800}, {"batch_size": 128, "num_steps": 400}]


def test_chain_appends_points():
  chained = points.chain(points.axis("depth", [20]),
                         points.product(points.axis("depth", [56]), points.axis("lr", [0.05])))
  assert chained == [{"depth": 20}, {"depth": 56, "lr": 0.05}]


def test_zipped_rejects_parts_of_unequal_length():
  with pytest.raises(ValueError, match=r"same number of points; got \[2, 3\]"):
    points.zipped(points.axis("batch_size", [64, 128]), points.axis("num_steps", [1, 2, 3]))


def test_product_rejects_a_field_set_twice():
  with pytest.raises(ValueError, match="depth set twice"):
    points.product(points.axis("depth", [20]), points.axis("depth", [56]))


def test_point_name_lists_the_fields_in_order():
  assert points.point_name({"depth": 56, "skip": False, "lr": 0.1}) == (
      "depth=56,skip=false,lr=0.1")
  assert points.point_name({"wd": 1e-5, "optimizer.nesterov": True}) == (
      "wd=1e-05,optimizer.nesterov=true")


# --- Run configs ---

def test_expand_sets_model_arguments_aliases_and_dotted_fields():
  config = points.expand(make_sweep(
      [{"depth": 56, "skip": False, "lr": 0.05, "wd": 5e-4, "seed": 3,
        "optimizer.nesterov": True}]))[0].config
  assert (config.model.name, config.model.skip) == ("resnet56", False)
  assert (config.optimizer.lr, config.optimizer.weight_decay) == (0.05, 5e-4)
  assert (config.seed, config.optimizer.nesterov) == (3, True)


def test_point_model_arguments_join_and_override_the_base_files_argument():
  sweep = points.expand(make_sweep([{"depth": 56}, {"depth": 20, "width": 2.0}],
                                   base="configs/fashion_mnist.py:width=0.5,skip=false"))
  assert [(p.config.model.name, p.config.model.width, p.config.model.skip) for p in sweep] == [
      ("resnet56", 0.5, False), ("resnet20", 2.0, False)]


def test_model_argument_of_the_wrong_type_is_rejected_with_its_value():
  with pytest.raises(config_lib.ConfigError, match=r"config argument skip=1: expected bool"):
    points.expand(make_sweep([{"skip": 1}]))


def test_fixed_fields_apply_to_every_point_and_points_override_them():
  sweep = points.expand(make_sweep(points.axis("lr", [0.3, 0.4]),
                                   fixed={"num_steps": 70, "optimizer": {"lr": 0.2}}))
  assert [(p.config.num_steps, p.config.optimizer.lr) for p in sweep] == [(70, 0.3), (70, 0.4)]


def test_depth_reaches_the_base_config_so_resnet110_warm_starts():
  sweep = points.expand(make_sweep(points.axis("depth", [56, 110]), base="configs/cifar10.py"))
  warmups = [(p.config.optimizer.warmup, p.config.optimizer.warmup_steps,
              p.config.optimizer.warmup_factor) for p in sweep]
  assert warmups == [("linear", 0, 0.1), ("constant", 400, 0.1)]


def test_relative_base_path_is_read_from_the_current_directory_only(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  with pytest.raises(config_lib.ConfigError,
                     match=f"'configs/fashion_mnist.py' not found .*directory, {tmp_path}"):
    points.expand(make_sweep(points.axis("depth", [20])))


def test_value_of_the_wrong_type_is_a_value_error():
  with pytest.raises(ValueError, match="config field 'optimizer.lr'"):
    points.expand(make_sweep([{"lr": "fast"}]))


def test_unknown_sweep_field_is_rejected():
  config = make_sweep(points.axis("depth", [20]))
  config.pointz = []
  with pytest.raises(ValueError, match=r"unknown: \['pointz'\]"):
    points.expand(config)


def test_saved_sweep_loads_back_with_its_points_in_order(tmp_path):
  config = make_sweep(points.product(points.axis("skip", [True]), points.axis("depth", [20, 56])))
  points.save_sweep(config, str(tmp_path))
  assert [p.name for p in points.expand(points.load_sweep(str(tmp_path)))] == [
      "skip=true,depth=20", "skip=true,depth=56"]


# --- The sweep files ---

def test_cifar10_ablation_runs_the_papers_protocol():
  sweep = points.expand(load_sweep_file("ablation_cifar10.py"))
  assert [(p.config.model.name, p.config.model.skip) for p in sweep] == [
      (f"resnet{d}", s) for d in (20, 32, 44, 56, 110) for s in (False, True)]
  for p in sweep:
    opt = p.config.optimizer
    assert (p.config.dataset.name, p.config.batch_size, p.config.num_steps) == (
        "cifar10", 128, 64_000)
    assert (opt.lr, opt.momentum, opt.weight_decay, opt.schedule) == (0.1, 0.9, 1e-4, "step")
    assert (tuple(opt.boundaries), opt.decay_factor) == ((32_000, 48_000), 0.1)
    assert opt.warmup_steps == (400 if p.fields["depth"] == 110 else 0)


@pytest.mark.parametrize("name, depths", [
    ("ablation_fashion_mnist.py", (20, 56)),
    ("ablation_fashion_mnist_gpu.py", (110, 56, 20)),
    ("why_residual_fashion_mnist.py", (20, 56)),
    ("why_residual_fashion_mnist_gpu.py", (110, 20)),
    ("trained_landscapes_fashion_mnist.py", (56,)),
])
def test_fashion_mnist_ablations_pair_every_depth_with_its_plain_twin(name, depths):
  sweep = points.expand(load_sweep_file(name))
  assert [(p.config.model.name, p.config.model.skip) for p in sweep] == [
      (f"resnet{d}", s) for d in depths for s in (False, True)]
  assert {p.config.dataset.name for p in sweep} == {"fashion_mnist"}
  with open(os.path.join(REPO, "configs", "sweeps", name)) as f:
    assert f"--config=configs/sweeps/{name}" in f.read()


@pytest.mark.parametrize("name, lrs, depths", [
    ("lr_depth_fashion_mnist.py", (0.03, 0.1, 0.3, 1.0, 3.0), (20, 56)),
    ("lr_depth_fashion_mnist_gpu.py", (3.0, 1.0, 0.3, 0.1, 0.03, 0.01), (110, 56, 20)),
])
def test_lr_depth_maps_cover_every_lr_depth_and_skip_with_the_lr_slowest(name, lrs, depths):
  sweep = points.expand(load_sweep_file(name))
  assert [(p.config.optimizer.lr, p.config.model.name, p.config.model.skip) for p in sweep] == [
      (lr, f"resnet{d}", s) for lr in lrs for d in depths for s in (False, True)]
  assert {p.config.dataset.name for p in sweep} == {"fashion_mnist"}
  with open(os.path.join(REPO, "configs", "sweeps", name)) as f:
    assert f"--config=configs/sweeps/{name}" in f.read()


def test_trained_landscapes_fit_an_unaugmented_subset_for_the_steps_asked():
  sweep = points.expand(load_sweep_file("trained_landscapes_fashion_mnist.py", "steps=300"))
  for p in sweep:
    c = p.config
    assert c.dataset.train_split == "train[:1000]" and c.batch_size == 64
    assert (c.dataset.crop_padding, c.dataset.flip) == (0, False)
    assert (c.num_steps, c.model.width) == (300, 0.25)
  default = points.expand(load_sweep_file("trained_landscapes_fashion_mnist.py"))
  assert [p.config.num_steps for p in default] == [2000, 2000]


def test_edge_of_stability_sweep_is_full_batch_gradient_descent_at_each_lr_plain_and_residual():
  name = "edge_of_stability_fashion_mnist.py"
  sweep = points.expand(load_sweep_file(name, "steps=30,every=5"))
  assert [(p.config.optimizer.lr, p.config.model.skip) for p in sweep] == [
      (0.1, False), (0.1, True), (0.2, False), (0.2, True)]
  for p in sweep:
    c = p.config
    # The batch is the whole training subset: every step is one step of gradient descent.
    assert c.dataset.train_split == "train[:2000]" and c.batch_size == 2000
    assert (c.dataset.crop_padding, c.dataset.flip) == (0, False)
    assert (c.optimizer.momentum, c.optimizer.weight_decay, c.optimizer.schedule,
            c.optimizer.warmup_steps) == (0.0, 0.0, "constant", 0)
    assert (c.num_steps, c.sharpness_every, c.checkpoint_every) == (30, 5, 5)
    assert (c.sharpness_batch_size, c.sharpness_iters) == (500, 10)
  with open(os.path.join(REPO, "configs", "sweeps", name)) as f:
    assert f"--config=configs/sweeps/{name}" in f.read()


def test_edge_of_stability_sweep_takes_cohens_subset_size_and_one_lr_as_arguments():
  name = "edge_of_stability_fashion_mnist.py"
  sweep = points.expand(load_sweep_file(name, "examples=5000,measure=1000,iters=20,lr=0.05"))
  assert [(p.config.optimizer.lr, p.config.model.skip) for p in sweep] == [
      (0.05, False), (0.05, True)]
  for p in sweep:
    c = p.config
    assert (c.dataset.train_split, c.batch_size) == ("train[:5000]", 5000)
    assert (c.sharpness_batch_size, c.sharpness_iters) == (1000, 20)
  with pytest.raises(config_lib.ConfigError, match="unknown config argument 'subset'"):
    load_sweep_file(name, "subset=5000")


@pytest.mark.parametrize("name, every", [
    ("why_residual_fashion_mnist.py", (80, 25, 100)),
    ("why_residual_fashion_mnist_gpu.py", (100, 25, 468)),
])
def test_why_residual_sweeps_record_sharpness_noise_scale_and_gradient_flow(name, every):
  sweep = points.expand(load_sweep_file(name))
  assert {(p.config.sharpness_every, p.config.noise_scale_every, p.config.diagnostics_every)
          for p in sweep} == {every}


def test_cpu_ablation_trains_600_steps_at_batch_128():
  sweep = points.expand(load_sweep_file("ablation_fashion_mnist.py"))
  assert {(p.config.batch_size, p.config.num_steps, p.config.num_epochs) for p in sweep} == {
      (128, 600, 0.0)}


def test_gpu_ablation_trains_6_epochs_of_468_full_batches():
  sweep = points.expand(load_sweep_file("ablation_fashion_mnist_gpu.py"))
  # The run resolves its steps from the 60,000 training images: 6 * (60_000 // 128) = 2808.
  assert {(p.config.batch_size, p.config.num_epochs) for p in sweep} == {(128, 6.0)}


def test_batch_size_sweep_scales_the_learning_rate_linearly():
  sweep = points.expand(load_sweep_file("batch_size_fashion_mnist.py"))
  peaks = {p.config.batch_size: optim.peak_learning_rate(p.config.optimizer, p.config.batch_size)
           for p in sweep}
  assert peaks == pytest.approx({32: 0.025, 64: 0.05, 128: 0.1, 256: 0.2})
  assert {p.config.batch_size * p.config.num_steps for p in sweep} == {51_200}
