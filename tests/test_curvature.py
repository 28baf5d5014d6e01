"""The instruments: Hessian eigenvalues by Lanczos, the stability threshold, the gradient noise
scale, their config checks, their records in a real run, and their figures."""

from __future__ import annotations

import os
import re
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from resnet_jax import config as config_lib
from resnet_jax import checkpoints, curvature, data, parallel, plots, reporting, train
from tests.test_train import synthetic_trainer, tiny_config

EPS32 = float(np.finfo(np.float32).eps)


def quadratic_operator(eigenvalues: np.ndarray, seed: int = 0):
  """x -> A x in float32 for a symmetric A with these eigenvalues in a random orthonormal basis."""
  n = len(eigenvalues)
  basis, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(n, n)))
  matrix = jnp.asarray((basis * eigenvalues) @ basis.T, jnp.float32)
  return jax.jit(lambda x: matrix @ x)


def random_start(n: int, seed: int = 1) -> jax.Array:
  return jnp.asarray(np.random.default_rng(seed).normal(size=n), jnp.float32)


@pytest.mark.numerics
def test_lanczos_over_the_whole_space_finds_a_quadratics_top_eigenvalues():
  eigenvalues = np.geomspace(100.0, 0.1, 40)
  alphas, betas, _ = curvature.lanczos(quadratic_operator(eigenvalues), random_start(40), 40)
  top = curvature.top_ritz_values(alphas, betas, 3)

  # With n steps in n dimensions T is similar to A. What separates them is float32 rounding of
  # the products A q, each entry a sum of n terms: at most n * eps * |A| (Higham's gamma_n).
  np.testing.assert_allclose(top, eigenvalues[:3], rtol=0, atol=40 * EPS32 * 100.0)


@pytest.mark.numerics
def test_lanczos_stops_when_the_krylov_space_closes_and_its_eigenvalues_are_exact():
  # Three distinct eigenvalues: the Krylov space of any start has dimension 3.
  eigenvalues = np.array([10.0] + [4.0] * 5 + [1.0] * 194)
  alphas, betas, residual = curvature.lanczos(quadratic_operator(eigenvalues),
                                              random_start(200), 20)

  assert len(alphas) == 3 and len(betas) == 2 and residual == 0.0
  top = curvature.top_ritz_values(alphas, betas, 5)
  np.testing.assert_allclose(top, [10.0, 4.0, 1.0], rtol=0, atol=200 * EPS32 * 10.0)


@pytest.mark.numerics
def test_a_dominant_negative_end_leaves_the_top_ritz_value_below_zero_and_the_bounds_say_so():
  # The spectrum of a plain net at initialisation, in miniature: large negative eigenvalues and a
  # small positive end. Lanczos resolves the end that stands furthest out first.
  eigenvalues = np.concatenate([[2.0, 1.0], -np.geomspace(1000.0, 0.5, 198)])
  operator = quadratic_operator(eigenvalues)
  values, bounds = curvature.ritz_bounds(*curvature.lanczos(operator, random_start(200), 20))

  assert len(values) == len(bounds) == 20 and np.all(np.diff(values) <= 0)
  # Every Ritz value lies within its bound of an eigenvalue (exact arithmetic), give or take the
  # products' float32 rounding (n eps |A|, as above).
  slack = 200 * EPS32 * 1000.0
  distances = np.min(np.abs(values[:, None] - eigenvalues[None, :]), axis=1)
  assert np.all(distances <= bounds + slack), (distances, bounds)
  # The negative end has converged; the top Ritz value is below zero though A's largest is 2, and
  # its bound is wide: it has not converged to any eigenvalue.
  assert abs(values[-1] + 1000.0) <= bounds[-1] + slack and bounds[-1] < 1.0
  assert values[0] < 0 and bounds[0] > 2.0 - values[0] > 2.0
  assert curvature.negative_end_dominates(values[0], values[-1])
  # Lanczos over the whole space finds the positive end, with a bound of rounding only.
  values, bounds = curvature.ritz_bounds(*curvature.lanczos(operator, random_start(200), 200))
  assert abs(values[0] - 2.0) <= slack and bounds[0] <= slack


@pytest.mark.parametrize("top, lowest, dominates", [
    (-0.03, -600.8, True), (0.05, -253.1, True),  # Plain-20 at steps 0 and 2 (the README).
    (9.5, -6.4, False), (6.09, -6.09, False), (20.0, 0.5, False)])
def test_negative_end_dominates_where_the_lowest_ritz_value_is_larger_in_size(top, lowest,
                                                                               dominates):
  assert curvature.negative_end_dominates(top, lowest) == dominates


class TinyNet(nn.Module):
  """Dense, BatchNorm on the batch's statistics, tanh, Dense: smooth, so finite differences
  of its gradient converge (a ReLU's kinks would not let them)."""

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(4)(x)
    x = nn.BatchNorm(use_running_average=False, momentum=0.9)(x)
    return nn.Dense(3)(jnp.tanh(x))


@pytest.mark.slow
@pytest.mark.numerics
def test_hessian_vector_product_matches_central_differences_of_the_gradient():
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(8, 5)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 3, 8), jnp.int32)
  model = TinyNet()
  variables = model.init(jax.random.key(0), images)

  def loss(params):
    logits, _ = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, images,
                            mutable=["batch_stats"])
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))

  params = variables["params"]
  flat, unravel = ravel_pytree(params)
  tangent = jnp.asarray(rng.normal(size=flat.shape), jnp.float32)
  tangent = tangent / jnp.linalg.norm(tangent)
  gradient = lambda x: ravel_pytree(jax.grad(loss)(unravel(x)))[0]
  product = curvature.hessian_vector_product(loss, params, tangent)

  h = 1e-2
  central = (gradient(flat + h * tangent) - gradient(flat - h * tangent)) / (2 * h)
  # The central difference errs by (h^2 / 6) * D3 (D3: the gradient's third derivative along the
  # tangent, computed here by forward-over-forward-over-reverse differentiation) plus the rounding
  # of two float32 gradients divided by 2h: each entry a sum of at most 8 examples x 5 inputs =
  # 40 terms, so at most 40 * eps * max|gradient| (gamma_n), times 2 / 2h.
  third = jax.jvp(lambda x: jax.jvp(gradient, (x,), (tangent,))[1], (flat,), (tangent,))[1]
  truncation = h**2 / 6 * np.abs(np.asarray(third)).max()
  rounding = 40 * EPS32 * np.abs(np.asarray(gradient(flat))).max() / h
  assert float(np.abs(product).max()) > 100 * (truncation + rounding)  # A test with teeth.
  np.testing.assert_allclose(product, central, rtol=0, atol=truncation + rounding)


def standard_error(values: np.ndarray) -> float:
  return float(values.std(ddof=1) / np.sqrt(len(values)))


def two_batch_estimates(first: np.ndarray, second: np.ndarray, batch: int
                        ) -> tuple[np.ndarray, np.ndarray]:
  """curvature.noise_scale_estimates of each pair of batch gradients [repeats, n]: the |E G_B|^2
  and B tr Cov(G_B) estimates, float64 [repeats] each."""
  estimates = [curvature.noise_scale_estimates(float(a @ b), float((a - b) @ (a - b)), batch)
               for a, b in zip(first, second)]
  return (np.array([e["grad_sq_norm"] for e in estimates]),
          np.array([e["trace_cov"] for e in estimates]))


def test_noise_scale_estimates_recover_a_linear_regressions_gradient_noise():
  # Per example: loss (x.w - y)^2 / 2 with x ~ N(0, I_d), y = x.w* + noise of variance s2. At
  # w = w* + delta the gradient x (x.delta - noise) has mean G = delta and, by Isserlis,
  # E[g g^T] = |delta|^2 I + 2 delta delta^T + s2 I: tr(Sigma) = (d + 1)|delta|^2 + d s2. The
  # examples are independent: E G_B = G and B tr Cov(G_B) = tr(Sigma).
  d, s2, batch, repeats = 10, 1.0, 16, 4000
  rng = np.random.default_rng(0)
  delta = rng.normal(size=d)
  delta /= np.linalg.norm(delta)  # |G|^2 = 1.
  true_trace = (d + 1) + d * s2
  x = rng.normal(size=(2, repeats, batch, d))
  noise = rng.normal(scale=np.sqrt(s2), size=(2, repeats, batch))
  batch_grads = np.mean(x * (x @ delta - noise)[..., None], axis=2)  # [2, repeats, d]
  grad_sq, trace = two_batch_estimates(*batch_grads, batch)

  # Both estimates are unbiased: their means over independent repeats lie within 4 standard
  # errors of the truth (a normal deviate passes 4 sigma with probability 6e-5).
  assert abs(grad_sq.mean() - 1.0) < 4 * standard_error(grad_sq)
  assert abs(trace.mean() - true_trace) < 4 * standard_error(trace)
  # The ratio of the means (McCandlish et al.'s ratio of averages), by the delta method.
  ratio = trace.mean() / grad_sq.mean()
  ratio_terms = (trace - ratio * grad_sq) / grad_sq.mean()
  assert abs(ratio - true_trace / 1.0) < 4 * standard_error(ratio_terms)


# --- The noise scale with BatchNorm, on a linear model whose BN couples a batch's examples. ---

# x ~ N(MEAN, COV) in R^3, y = x.TARGET + N(0, NOISE^2); the model regresses y on x through a
# BatchNorm over the batch that only normalises: f = w.BN(x V) + c, loss (f - y)^2 / 2.
MEAN = np.array([1.0, -0.5, 2.0])
COV = np.array([[1.0, 0.3, 0.0], [0.3, 0.5, 0.1], [0.0, 0.1, 2.0]])
TARGET = np.array([0.5, -1.0, 0.3])
NOISE = 0.5
BN_EPS = 1e-5
BATCH, PARTS = 32, 4


def regression_params() -> dict:
  """Parameters 0.1 off a minimum of the population loss, in fixed directions: float64.

  The minimum: V's first column TARGET, w = (|TARGET|_COV, 0) undoes BN's scale, c = TARGET.MEAN
  its centring."""
  scale = np.sqrt(TARGET @ COV @ TARGET + BN_EPS)
  kernel = np.c_[TARGET, [0.2, 0.7, -0.4]] + 0.1 * np.array([[1.0, -0.5], [0.5, 1.0], [-1.0, 0.5]])
  head = np.array([scale, 0.0]) + 0.1 * np.array([1.0, -1.0])
  return {"kernel": kernel, "head": head, "bias": np.array(TARGET @ MEAN + 0.1)}


def regression_batches(seed: int, count: int) -> tuple[np.ndarray, np.ndarray]:
  """count batches of BATCH examples: x float64 [count, BATCH, 3], y [count, BATCH]."""
  rng = np.random.default_rng(seed)
  x = rng.multivariate_normal(MEAN, COV, size=(count, BATCH))
  return x, x @ TARGET + NOISE * rng.normal(size=(count, BATCH))


def regression_losses(params: dict, x, y) -> jax.Array:
  """Each example's loss, BN over the batch x [B, 3]: [B]."""
  h = x @ params["kernel"]
  h = (h - h.mean(0)) / jnp.sqrt(h.var(0) + BN_EPS)
  return (h @ params["head"] + params["bias"] - y) ** 2 / 2


def regression_gradients(x: np.ndarray, y: np.ndarray, weights: np.ndarray | None = None
                         ) -> np.ndarray:
  """The gradients of batches' losses by jax.grad in float64 (x64 on): x [..., B, 3], y [..., B]
  -> [..., 9]. With weights [P, B] (rows summing to 1), those of the P weighted means of each
  batch's example losses -> [..., P, 9]."""
  with jax.enable_x64(True):
    params = jax.tree.map(jnp.asarray, regression_params())

    def gradient(x, y, w):
      return ravel_pytree(jax.grad(lambda p: regression_losses(p, x, y) @ w)(params))[0]

    if weights is None:
      fn = lambda x, y: gradient(x, y, jnp.full(x.shape[0], 1 / x.shape[0]))
    else:
      fn = lambda x, y: jax.vmap(gradient, in_axes=(None, None, 0))(x, y, jnp.asarray(weights))
    lead = x.shape[:-2]
    out = jax.jit(jax.vmap(fn))(x.reshape(-1, *x.shape[-2:]), y.reshape(-1, y.shape[-1]))
    return np.asarray(out).reshape(*lead, *out.shape[1:])


@pytest.fixture(scope="module")
def bn_truth() -> dict:
  """|E G_B|^2 and B tr Cov(G_B) of the model's batch gradient at BATCH, with their standard
  errors, by float64 Monte Carlo over n = 20,000 independent batches: the mean gradient's
  squared norm less its own noise tr Cov(G_B) / n (its error by the delta method), and B times
  the batches' variance."""
  grads = regression_gradients(*regression_batches(1, 20_000))
  n, mean = len(grads), grads.mean(0)
  spread = np.sum((grads - mean) ** 2, -1) * n / (n - 1)  # Mean: tr Cov(G_B), unbiased.
  return {"grad_sq": mean @ mean - spread.mean() / n,
          "grad_sq_se": standard_error(2 * grads @ mean),
          "trace": BATCH * spread.mean(), "trace_se": BATCH * standard_error(spread)}


def within(estimates: np.ndarray, truth: float, truth_se: float, sigmas: float = 4) -> bool:
  """Whether the mean of independent `estimates` lies within `sigmas` standard errors (the
  estimates' and the truth's together) of `truth`."""
  return abs(estimates.mean() - truth) < sigmas * np.hypot(standard_error(estimates), truth_se)


def test_noise_scale_of_two_batches_is_unbiased_with_batchnorm(bn_truth):
  grad_sq, trace = two_batch_estimates(
      *regression_gradients(*regression_batches(2, 2 * 4000)).reshape(2, 4000, -1), BATCH)
  # Unbiased whatever BN does inside a batch (curvature.noise_scale_estimates): the means over
  # independent repeats lie within 4 standard errors of the Monte Carlo's (a normal deviate
  # passes 4 sigma with probability 6e-5).
  assert within(grad_sq, bn_truth["grad_sq"], bn_truth["grad_sq_se"])
  assert within(trace, bn_truth["trace"], bn_truth["trace_se"])
  assert grad_sq.mean() > 10 * standard_error(grad_sq)  # Positive by many standard errors.
  assert trace.min() > 0


def parts_estimates(big: np.ndarray, parts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """The estimator this replaced, from a batch's gradient big [n, 9] and its parts' [n, P, 9]:
  E|G_b|^2 = |G|^2 + tr(Sigma)/b for independent examples at b = BATCH and BATCH / PARTS,
  solved for |G|^2 and tr(Sigma) = B tr Cov(G_B)."""
  small, big_sq, small_sq = BATCH // PARTS, np.sum(big**2, -1), np.sum(parts**2, -1).mean(-1)
  return ((BATCH * big_sq - small * small_sq) / (BATCH - small),
          (small_sq - big_sq) / (1 / small - 1 / BATCH))


@pytest.mark.parametrize("statistics", ["each part's own", "the whole batch's"])
def test_noise_scale_from_a_batch_and_its_parts_is_biased_with_batchnorm(bn_truth, statistics):
  x, y = regression_batches(3, 4000)
  big = regression_gradients(x, y)
  if statistics == "each part's own":  # As a run at the smaller batch trains.
    parts = regression_gradients(x.reshape(4000, PARTS, -1, 3), y.reshape(4000, PARTS, -1))
  else:  # The parts' losses in one forward pass of the batch: their mean gradient is the batch's.
    size = BATCH // PARTS
    parts = regression_gradients(x, y, np.repeat(np.eye(PARTS) / size, size, axis=1))
  grad_sq, trace = parts_estimates(big, parts)
  # With its own statistics a part is another function than the batch's loss; under the batch's,
  # BN's coupling of two examples counts in |G|^2 instead of the noise. Either misses the noise
  # by more than twice the bound the two-batch estimate above keeps to.
  assert not within(trace, bn_truth["trace"], bn_truth["trace_se"], sigmas=8)


def optax_sgd_grows(curvature_value: float, lr: float, momentum: float, nesterov: bool) -> bool:
  """Whether optax's SGD (the trace optim.py builds on) blows up on loss curvature * w^2 / 2."""
  tx = optax.sgd(lr, momentum=momentum or None, nesterov=nesterov)
  w = jnp.ones(())
  state = tx.init(w)
  for _ in range(200):
    updates, state = tx.update(curvature_value * w, state)
    w = optax.apply_updates(w, updates)
  return not abs(w) <= 1.0  # NaN, after an overflow, counts as grown.


@pytest.mark.parametrize("momentum,nesterov,expected", [
    (0.0, False, 2 / 0.1), (0.9, False, 3.8 / 0.1), (0.9, True, 3.8 / (0.1 * 2.8))])
def test_stability_threshold_is_where_optaxs_sgd_on_a_quadratic_turns_unstable(
    momentum, nesterov, expected):
  threshold = curvature.stability_threshold(0.1, momentum, nesterov)
  assert threshold == pytest.approx(expected)
  assert not optax_sgd_grows(0.98 * threshold, 0.1, momentum, nesterov)
  assert optax_sgd_grows(1.02 * threshold, 0.1, momentum, nesterov)


def test_stability_threshold_is_none_at_a_zero_learning_rate():
  # A linear warmup starts at lr 0: the instruments measure that step too (it once divided by 0).
  assert curvature.stability_threshold(0.0, 0.9, nesterov=False) is None


@pytest.mark.parametrize("overrides,message", [
    ({"sharpness_top": 5, "sharpness_iters": 3},
     "config.sharpness_top (5) must be at most config.sharpness_iters (3)"),
    ({"sharpness_every": -1}, "config.sharpness_every must be an integer >= 0; got -1"),
    ({"sharpness_every": 10, "sharpness_batch_size": 12},
     "config.sharpness_batch_size (12) must be divisible by the number of devices (8)"),
])
def test_instrument_settings_that_cannot_run_are_rejected_saying_what_is_allowed(
    overrides, message):
  config = config_lib.default_config()
  config.update(overrides)
  with pytest.raises(config_lib.ConfigError, match=re.escape(message)):
    config_lib.validate(config, num_devices=8)


def test_instrument_batch_checks_wait_until_the_instrument_is_on():
  config = config_lib.default_config()
  config.update({"sharpness_batch_size": 12})
  config_lib.validate(config, num_devices=8)


def test_a_run_recorded_with_noise_scale_parts_resumes_without_it():
  # The field split the noise scale's batch into parts until the instrument took two batches.
  current = config_lib.default_config()
  stored = {**current.to_dict(), "noise_scale_parts": 4}
  assert checkpoints.config_mismatches(stored, current) == []
  assert "noise_scale_parts" not in config_lib.upgrade_recorded(stored)


def test_a_source_without_measurement_batches_refuses_before_measuring():
  batch = {"image": np.zeros((8, 28, 28, 1), np.uint8), "label": np.zeros((8,), np.int32)}
  config = config_lib.default_config()
  config.sharpness_every = 1
  trainer = synthetic_trainer(config, parallel.make_mesh(), [batch])
  with pytest.raises(ValueError, match="set config.sharpness_every and config.noise_scale_every"):
    trainer.measure("sharpness", trainer.init_state())


def test_a_streamed_run_with_an_instrument_is_refused_before_its_workdir_exists(
    tmp_path, monkeypatch):
  info = data.DatasetInfo("imagenet2012", num_classes=1000, image_shape=(32, 32, 3),
                          num_train=24, num_eval=24, mean=(0.5,) * 3, std=(0.25,) * 3)
  monkeypatch.setattr(data, "check_prepared", lambda cfg: None)
  monkeypatch.setattr(data, "dataset_info", lambda cfg: info)
  config = tiny_config("", noise_scale_every=2,
                       **{"dataset.name": "imagenet2012", "model.name": "resnet18"})
  with pytest.raises(config_lib.ConfigError, match="must be 0 for imagenet2012"):
    train.train_and_evaluate(config, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_instruments_record_at_their_steps_and_a_resumed_run_records_the_same(
    prepared_data_dir, tmp_path):
  workdir = str(tmp_path / "run")
  # 8 Lanczos steps: the first ones resolve the strongly negative curvature BN gives at
  # initialisation (about -57 here, against a top eigenvalue of about 6); 4 may not yet reach a
  # positive Ritz value.
  config = tiny_config(prepared_data_dir, sharpness_every=2, sharpness_top=2, sharpness_iters=8,
                       noise_scale_every=2, **{"model.width": 0.25})
  train.train_and_evaluate(config, workdir)
  straight = reporting.read_metrics(workdir)
  # A crash after the checkpoint of step 2: the rerun resumes there and measures step 4 again.
  shutil.rmtree(os.path.join(workdir, "checkpoints", "4"))
  os.remove(os.path.join(workdir, reporting.SUMMARY_FILE))
  train.train_and_evaluate(config, workdir)
  resumed = reporting.read_metrics(workdir)

  def records(events, kind):
    return [e for e in events if e["event"] == kind]

  sharpness = records(straight, reporting.SHARPNESS)
  noise = records(straight, reporting.NOISE_SCALE)
  # Every second step, the initial network and the final one included.
  assert [e["step"] for e in sharpness] == [e["step"] for e in noise] == [0, 2, 4]
  for e in sharpness:
    assert len(e["eigenvalues"]) == 2 and e["sharpness"] == e["eigenvalues"][0]
    # The largest is positive (cross-entropy's Gauss-Newton part is positive semi-definite and
    # dominates the top); the next Ritz value may still be of either sign.
    assert 0 < e["sharpness"] < np.inf and -np.inf < e["eigenvalues"][1] <= e["sharpness"]
    assert len(e["bounds"]) == 2 and all(0 <= b < np.inf for b in e["bounds"])
    assert e["lowest"] <= e["eigenvalues"][1]
    assert e["lr"] == pytest.approx(0.1)
    assert e["threshold"] == pytest.approx(3.8 / 0.1)  # Heavy ball, momentum 0.9.
  assert sharpness[0]["lowest"] < 0  # BN's negative curvature at initialisation.
  for e in noise:
    assert e["batch_size"] == 16
    # One measurement's |E G_B|^2 estimate G1.G2 may take either sign; B |G1 - G2|^2 / 2 is
    # positive (two batches' gradients differ).
    assert -np.inf < e["grad_sq_norm"] < np.inf and 0 < e["trace_cov"] < np.inf
    assert e["b_simple"] == pytest.approx(e["trace_cov"] / e["grad_sq_norm"])
  assert records(resumed, reporting.SHARPNESS) == sharpness
  assert records(resumed, reporting.NOISE_SCALE) == noise


def noise_events(values: list[tuple[float, float]]) -> list[dict]:
  return [{"event": reporting.NOISE_SCALE, "step": 10 * i, "trace_cov": t, "grad_sq_norm": g,
           "b_simple": t / g, "batch_size": 128} for i, (t, g) in enumerate(values)]


def test_smoothed_noise_scale_divides_moving_averages_not_single_ratios():
  events = noise_events([(10.0, 1.0), (30.0, -1.0), (20.0, 2.0)])
  # Averages after each: 1: 0.1*10 / 0.1*1; 2: (0.09*10 + 0.1*30) / (0.09 - 0.1); 3: ...
  trace = [1.0, 3.9, 0.9 * 3.9 + 2.0]
  grad_sq = [0.1, -0.01, 0.9 * -0.01 + 0.2]
  assert plots.smoothed_noise_scale(events) == pytest.approx(
      [t / g for t, g in zip(trace, grad_sq)])


def test_instrument_figures_are_drawn_for_the_runs_that_recorded_them(tmp_path):
  def run(depth, skip, sharpness):
    events = noise_events([(100.0 * (i + 1), 1.0) for i in range(5)])
    if not skip:  # As the estimator from a batch and its parts recorded them.
      events = [{"b_big" if k == "batch_size" else k: v for k, v in e.items()} for e in events]
    events += [{"event": reporting.SHARPNESS, "step": 10 * i, "sharpness": sharpness * (i + 1),
                "eigenvalues": [sharpness * (i + 1)], "lr": 0.1, "threshold": 38.0}
               for i in range(5)]
    return plots.Run({"depth": depth, "skip": skip}, None, events)

  runs = [run(20, False, 2.0), run(20, True, 3.0)]
  paths = plots.write_sweep_figures(runs, str(tmp_path), dataset="fashion_mnist")
  for name in (plots.SHARPNESS_FILE, plots.NOISE_SCALE_FILE):
    path = os.path.join(str(tmp_path), name)
    assert path in paths
    with open(path, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_instrument_figures_without_records_say_how_to_record_them(tmp_path):
  runs = [plots.Run({"depth": 20, "skip": True}, None, [])]
  with pytest.raises(ValueError, match="config.sharpness_every > 0"):
    plots.plot_sharpness(runs, str(tmp_path / "s.png"))
  with pytest.raises(ValueError, match="config.noise_scale_every > 0"):
    plots.plot_noise_scale(runs, str(tmp_path / "n.png"))
