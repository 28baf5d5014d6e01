"""The loss-landscape instrument: filter-normalised directions, the line's ends, the surface's
centre, the command line and its refusals, on one tiny trained run."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from resnet_jax import checkpoints, data, landscape, models, parallel, sources, train, trainer
from resnet_jax import config as config_lib
from experiments import landscape_numbers
from tests.test_train import TINY_MODEL

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = 40  # Not a multiple of the 16-example chunks: the last one is padded and masked.
EPS = float(np.finfo(np.float32).eps)


@pytest.fixture(scope="module")
def run_dir(prepared_data_dir, tmp_path_factory) -> str:
  """test_train.TINY_MODEL trained 3 steps at batch 16, checkpointed at steps 2 and 3."""
  config = config_lib.default_config()
  for field, value in {"dataset.data_dir": prepared_data_dir, "dataset.eval_split": "test[:32]",
                       **TINY_MODEL, "batch_size": 16, "eval_batch_size": 16,
                       "num_steps": 3, "log_every": 1, "eval_every": 0, "checkpoint_every": 2,
                       "optimizer.schedule": "constant", "progress_bar": False}.items():
    section, _, leaf = field.rpartition(".")
    (config[section] if section else config)[leaf] = value
  workdir = str(tmp_path_factory.mktemp("landscape") / "run")
  assert train.train_and_evaluate(config, workdir).status == "completed"
  return workdir


@pytest.fixture(scope="module")
def computed(run_dir) -> landscape.Landscape:
  return landscape.compute_landscape(run_dir, grid=3, span=0.5, examples=EXAMPLES, seed=0)


def checkpoint_variables(run_dir: str) -> dict:
  _, state = checkpoints.read_state(os.path.join(run_dir, "checkpoints"))
  return {"params": state["params"], "batch_stats": state["batch_stats"]}


@pytest.fixture(scope="module")
def assert_evaluates_as_directly(run_dir):
  """Asserts that the landscape's (loss, error) of some variables are what model.apply gives in
  eval mode on one device, on the same images: the loss to within what evaluating them in
  another order and batching gives (the yardstick; 10x lets the two differ in size), the error
  count exactly."""
  config = landscape.run_config(run_dir)
  info = data.dataset_info(config.dataset)
  model = models.get_model(num_classes=info.num_classes, **config.model)
  images, labels = (x[:EXAMPLES] for x in data.load_split(config.dataset, "train"))
  apply = jax.jit(lambda v, x: model.apply(v, data.normalize(x, info.mean, info.std),
                                           train=False))

  def direct(variables, order, chunks):
    logits = np.concatenate([apply(variables, part)
                             for part in np.array_split(images[order], chunks)])
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels[order])
    return float(np.mean(losses)), int(np.sum(np.argmax(logits, -1) != labels[order]))

  def check(variables, loss, error):
    variables = jax.tree.map(np.asarray, variables)  # From the mesh to one device.
    expected, errors = direct(variables, np.arange(EXAMPLES), chunks=1)
    other, _ = direct(variables, np.arange(EXAMPLES)[::-1], chunks=2)
    assert abs(loss - expected) <= 10 * max(abs(other - expected), EPS * expected)
    assert round(error * EXAMPLES) == errors
  return check


@pytest.mark.slow
@pytest.mark.numerics
def test_filter_normalised_direction_has_the_checkpoints_filter_norms_and_no_bn_or_bias_part(
    run_dir):
  variables = checkpoint_variables(run_dir)
  direction, = landscape.random_directions(7, variables, count=1)

  kernels = 0
  for (path, d), p in zip(jax.tree.leaves_with_path(direction["params"]),
                          jax.tree.leaves(variables["params"])):
    name = jax.tree_util.keystr(path)
    if p.ndim >= 2:  # A conv or dense kernel [..., in, out]: one norm per output filter.
      kernels += 1
      axes = tuple(range(p.ndim - 1))
      norm = lambda x: np.sqrt(np.sum(np.square(x, dtype=np.float64), axis=axes))
      # Each element is rounded once to float32, so each norm is within eps/2 of the exact one.
      np.testing.assert_allclose(norm(d), norm(p), rtol=EPS, err_msg=name)
    else:  # BN scales and offsets, the head's bias.
      assert not np.any(d), name
  assert kernels == 8  # ResNet-8: 7 convs (option A: no projections) and the dense head.
  assert not any(np.any(s) for s in jax.tree.leaves(direction["batch_stats"]))
  again, = landscape.random_directions(7, variables, count=1)
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(direction),
                                                  jax.tree.leaves(again)))


def test_surface_directions_are_orthogonal_filter_by_filter_and_keep_the_filter_norms():
  # Small filters (a 3x3 conv over 2 channels has 18 dimensions) make independent draws far from
  # orthogonal: a cosine of about 1/sqrt(18) = 0.24 each.
  rng = np.random.default_rng(0)
  params = {"conv": {"kernel": rng.normal(size=(3, 3, 2, 16)).astype(np.float32)},
            "dense": {"kernel": rng.normal(size=(16, 10)).astype(np.float32),
                      "bias": np.ones(10, np.float32)}}
  variables = {"params": params, "batch_stats": {"mean": np.ones(16, np.float32)}}
  first, second = landscape.random_directions(3, variables)

  kernels = [("conv", "kernel"), ("dense", "kernel")]
  for module, leaf in kernels:
    p = params[module][leaf]
    a, b = (np.asarray(d["params"][module][leaf], np.float64) for d in (first, second))
    axes = tuple(range(p.ndim - 1))
    norm = lambda x, axes=axes: np.sqrt(np.sum(np.square(x, dtype=np.float64), axis=axes))
    # Exactly orthogonal before each element's rounding to float32 (at most eps/2 of it), so
    # |a.b| <= eps |a| |b| after it.
    cosines = np.sum(a * b, axis=axes) / (norm(a) * norm(b))
    assert np.all(np.abs(cosines) <= EPS), (module, cosines)
    for d in (a, b):
      np.testing.assert_allclose(norm(d), norm(p), rtol=EPS)
  assert not np.any(second["params"]["dense"]["bias"])
  assert not np.any(second["batch_stats"]["mean"])
  # The first direction is the first draw, only normalised; the second's draw is not orthogonal
  # to it, filter by filter.
  draws = np.random.default_rng(3)
  drawn = [jax.tree.map(lambda x: draws.standard_normal(np.shape(x), np.float32), params)
           for _ in range(2)]
  assert all(np.array_equal(x, y) for x, y in zip(
      jax.tree.leaves(first["params"]), jax.tree.leaves(landscape.filter_normalize(drawn[0],
                                                                                   params))))
  raw = np.sum(drawn[0]["conv"]["kernel"] * drawn[1]["conv"]["kernel"], axis=(0, 1, 2))
  assert np.max(np.abs(raw) / (np.linalg.norm(drawn[0]["conv"]["kernel"].reshape(18, 16), axis=0)
                              * np.linalg.norm(drawn[1]["conv"]["kernel"].reshape(18, 16),
                                               axis=0))) > 0.1


@pytest.mark.slow
@pytest.mark.numerics
def test_surface_at_its_centre_is_the_checkpoints_own_loss(run_dir, computed,
                                                          assert_evaluates_as_directly):
  assert computed.step == 3 and np.array_equal(computed.coords, [-0.5, 0.0, 0.5])
  assert_evaluates_as_directly(checkpoint_variables(run_dir),
                               computed.surface_loss[1, 1], computed.surface_error[1, 1])
  # Half a filter norm away the network is another one: the centre is not the whole surface.
  assert np.all(np.delete(computed.surface_loss.ravel(), 4) != computed.surface_loss[1, 1])


@pytest.mark.slow
@pytest.mark.numerics
def test_hessian_at_the_centre_is_of_the_surfaces_own_loss(run_dir, computed,
                                                           assert_evaluates_as_directly):
  # experiments/landscape_numbers.py: Lanczos on the function the surface draws (BN in inference
  # mode, the same images), so its loss at the centre is the surface's centre, and at the point
  # (0.5, 0) the surface's [1, 2].
  ends = landscape_numbers.centre_hessian_ends(run_dir, computed, iters=6, offsets=((0.5, 0.0),))
  variables = checkpoint_variables(run_dir)
  assert_evaluates_as_directly(variables, ends["centre_loss"], computed.surface_error[1, 1])
  assert ends["lanczos_iters"] == 6 and ends["lowest"] < ends["top"]
  assert ends["lowest_over_top"] == abs(ends["lowest"] / ends["top"])
  (point,) = ends["around"]
  direction = landscape.random_directions(computed.seed, variables)[0]
  moved = jax.tree.map(lambda v, d: v + 0.5 * d, variables, direction)
  assert (point["x"], point["y"]) == (0.5, 0.0) and point["lowest"] < point["top"]
  assert_evaluates_as_directly(moved, point["loss"], computed.surface_error[1, 2])


@pytest.mark.slow
@pytest.mark.numerics
def test_line_runs_from_the_initial_network_to_the_checkpoint(run_dir, computed,
                                                              assert_evaluates_as_directly):
  config = landscape.run_config(run_dir)
  built = trainer.build(config, data.dataset_info(config.dataset), parallel.make_mesh(),
                        source=sources.DeviceBatches(iter(()), {}))
  init = built.init_state()
  initial = {"params": init.params, "batch_stats": init.batch_stats}

  assert np.array_equal(computed.alphas, [0.0, 0.5, 1.0])
  assert_evaluates_as_directly(initial, computed.line_loss[0], computed.line_error[0])
  assert_evaluates_as_directly(checkpoint_variables(run_dir), computed.line_loss[-1],
                               computed.line_error[-1])


def run_cli(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "resnet_jax.landscape", *args], cwd=REPO,
                        capture_output=True, text=True, timeout=600, check=False)


@pytest.mark.slow
def test_command_line_writes_the_landscape_and_compare_draws_two_runs(run_dir, tmp_path):
  out = run_cli(f"--workdir={run_dir}", "--step=2", "--grid=3", "--examples=16")
  assert out.returncode == 0, out.stderr
  written = os.path.join(run_dir, "landscape")
  assert sorted(os.listdir(written)) == ["contour.png", "landscape.npz", "line.png",
                                         "surface.png"]
  stored = landscape.Landscape.load(os.path.join(written, "landscape.npz"))
  assert (stored.network, stored.step, stored.examples, stored.span) == (
      "ResNet-8, width 0.25", 2, 16, 1.0)
  assert stored.surface_loss.shape == (3, 3) and np.all(np.isfinite(stored.line_loss))

  twin = str(tmp_path / "twin")  # A second run without a landscape: --compare computes it.
  shutil.copytree(run_dir, twin, ignore=shutil.ignore_patterns("landscape"))
  out = run_cli(f"--compare={run_dir},{twin}", "--grid=3", "--examples=16",
                f"--out={tmp_path / 'both'}")
  assert out.returncode == 0, out.stderr
  assert os.path.getsize(tmp_path / "both" / "compare.png") > 0
  assert landscape.Landscape.load(os.path.join(twin, "landscape", "landscape.npz")).step == 3


def test_bad_settings_are_one_line_and_exit_code_2_before_any_work(run_dir, tmp_path):
  fresh = str(tmp_path / "fresh")
  shutil.copytree(run_dir, fresh, ignore=shutil.ignore_patterns("landscape"))
  out = run_cli(f"--workdir={fresh}", "--grid=100000", "--examples=70000")

  assert out.returncode == 2
  assert out.stderr == (
      "error: invalid landscape settings: --grid must be in [2, 201] (points per axis; the "
      "surface has grid² of them); got 100000; --examples must be in [1, 60,000] (the train "
      "split 'train' of fashion_mnist); got 70000\n")
  assert not os.path.exists(os.path.join(fresh, "landscape"))
  with pytest.raises(config_lib.ConfigError, match=r"--grid must be in \[2, 201\].*got 1$"):
    landscape.check_settings(landscape.run_config(fresh), grid=1, span=1.0, examples=16)


def test_a_long_evaluation_reports_its_progress_every_tenth(monkeypatch, capsys):
  monkeypatch.setattr(landscape, "PROGRESS_POINTS", 20)

  def eval_step(state, batch):  # The network's "loss" on every image is its one weight.
    mask = batch["mask"].astype(np.float32)
    return {"loss": jnp.sum(mask) * state.params["w"], "errors": jnp.zeros(()),
            "count": jnp.sum(mask)}

  evaluate = landscape.make_evaluator(eval_step, np.zeros((6, 2, 2, 1), np.uint8),
                                      np.zeros(6, np.int32), mesh=parallel.make_mesh(),
                                      batch_size=4)
  points = [{"params": {"w": np.float32(w)}, "batch_stats": {}} for w in (1.0, 3.0)]
  coefficients = np.stack([np.linspace(0, 1, 20), np.linspace(1, 0, 20)], axis=1)
  loss, _ = evaluate(points, coefficients)
  # A handful of float32 roundings apart: the combination, the sums, the division.
  np.testing.assert_allclose(loss, coefficients @ np.array([1.0, 3.0]),
                             rtol=8 * np.finfo(np.float32).eps)
  assert capsys.readouterr().out.splitlines() == [
      f"[landscape] {k} of 20 networks evaluated" for k in range(2, 21, 2)]


def test_principal_curvatures_of_a_quadratic_surface_are_its_hessians_eigenvalues():
  # On a quadratic, central differences are exact: 1/2 [x y] H [x y]^T with H = [[3, 1], [1, -2]]
  # has curvatures (1 -/+ sqrt(29)) / 2 at every point, whatever the offset and the slope.
  coords = landscape.surface_coordinates(7, 1.5)
  y, x = np.meshgrid(coords, coords, indexing="ij")
  surface = 0.7 + 0.3 * x - 0.2 * y + (3 * x * x + 2 * x * y - 2 * y * y) / 2
  lowest, highest = landscape.surface_curvatures(surface, coords)
  assert lowest.shape == highest.shape == (5, 5)
  np.testing.assert_allclose(lowest, (1 - np.sqrt(29)) / 2, rtol=1e-12)
  np.testing.assert_allclose(highest, (1 + np.sqrt(29)) / 2, rtol=1e-12)


def test_convexity_numbers_tell_a_bowl_from_a_saddle_and_a_cap():
  coords = landscape.surface_coordinates(21, 1.0)  # Steps of 0.1.
  y, x = np.meshgrid(coords, coords, indexing="ij")
  bowl = landscape.convexity_numbers(x * x + 4 * y * y, coords, radius=0.5)
  assert bowl["points"] == 81  # The integer pairs (i, j) with i^2 + j^2 <= 5^2.
  assert bowl["nonconvex_share"] == 0.0 and bowl["median_ratio"] == 0.0
  # The ring at radius 0.5 (within 0.05): the mean of x^2 + 4 y^2 over it, from the grid itself.
  ring = np.abs(np.hypot(x, y) - 0.5) <= 0.05
  assert bowl["loss_rise"] == pytest.approx(np.mean((x * x + 4 * y * y)[ring]), rel=1e-12)

  saddle = landscape.convexity_numbers(x * x - 0.5 * y * y, coords, radius=0.5)
  assert saddle["nonconvex_share"] == 1.0
  assert saddle["median_ratio"] == pytest.approx(0.5, rel=1e-9)  # |-1| / 2 of curvatures 2, -1.

  # Concave in every direction: infinitely far from convex.
  cap = landscape.convexity_numbers(-(x * x + y * y), coords, radius=0.5)
  assert cap["nonconvex_share"] == 1.0 and cap["median_ratio"] == np.inf
  for radius in (0.05, 0.95):
    with pytest.raises(ValueError, match=rf"radius must be from one grid step to the span less "
                                         rf"one \(0.1 to 0.9\).*got {radius}"):
      landscape.convexity_numbers(x * x, coords, radius=radius)
