"""experiments/eos_check.py's two measurements, where the answer is known: power iteration on a
diagonal Hessian, and the loss along a direction for a quadratic (the curvature one step meets is
the Hessian's) and for a loss that flattens away from the point (it is less)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from experiments import eos_check

EPS32 = float(np.finfo(np.float32).eps)
pytestmark = pytest.mark.numerics  # Every bound is float32 rounding.

EIGENVALUES = jnp.array([30.0, 5.0, 1.0, -2.0, 0.5])


def test_power_iteration_finds_the_eigenvalue_largest_in_size_with_its_residual():
  lam, v, residual = eos_check.top_eigenpair(lambda u: EIGENVALUES * u, jnp.ones(5), 40)
  # (5/30)^40 of the start is left off the top eigenvector: float32 rounding is all that remains.
  assert lam == pytest.approx(30.0, rel=10 * EPS32)
  assert abs(float(v[0])) == pytest.approx(1.0, abs=10 * EPS32) and residual <= 10 * EPS32
  lam, _, residual = eos_check.top_eigenpair(lambda u: EIGENVALUES * u, jnp.ones(5), 2)
  assert lam < 30.0 and residual > 0.01  # Two products: not converged, and the residual says so.


def quadratic(x):
  return 0.5 * jnp.sum(EIGENVALUES * x * x) + jnp.sum(x)


def test_a_quadratic_meets_its_own_curvature_over_a_step():
  x = jnp.array([0.3, -0.2, 0.1, 0.05, 1.0])
  g = EIGENVALUES * x + 1.0
  v = jnp.eye(5)[0]
  out = eos_check.along_direction(quadratic, x, g, v, 30.0, lr=0.1)
  assert out["grad_share_along_top"] == pytest.approx(float(g[0] ** 2 / jnp.vdot(g, g)))
  assert [a["c"] for a in out["along_top"]] == list(eos_check.C_STEPS)
  scale = float(quadratic(x))  # Rounding of the loss values differenced.
  for a in out["along_top"]:
    assert a["loss_change"] == pytest.approx(a["quadratic"], abs=20 * EPS32 * scale)
  s = 0.1 * abs(float(g[0]))
  assert out["curvature_over_one_step"] == pytest.approx(30.0, abs=40 * EPS32 * scale / s**2)


def test_a_loss_that_flattens_meets_less_curvature_over_a_step_than_its_hessian_says():
  # 30 log cosh along the first axis: curvature 30 at 0, falling to 30 / cosh² beyond.
  def flattening(x):
    return 30.0 * jnp.log(jnp.cosh(x[0])) + 0.5 * jnp.sum(EIGENVALUES[1:] * x[1:] ** 2)
  x = jnp.array([0.5, 0.1, 0.1, 0.1, 0.1])
  g = jnp.concatenate([30.0 * jnp.tanh(x[:1]), EIGENVALUES[1:] * x[1:]])
  lam = 30.0 / float(jnp.cosh(x[0])) ** 2  # The Hessian's along v at x: 23.6.
  out = eos_check.along_direction(flattening, x, g, jnp.eye(5)[0], lam, lr=0.1)
  # The step along v is s = 0.1 * 30 tanh(0.5) = 1.39 long; the second difference over it, in
  # float64, is 20.7: below λ, as the curvature falls on the far side.
  s = 0.1 * 30.0 * np.tanh(0.5)
  expected = 30.0 * (np.log(np.cosh(0.5 + s)) + np.log(np.cosh(0.5 - s))
                     - 2 * np.log(np.cosh(0.5))) / s**2
  scale = float(flattening(x))
  assert out["curvature_over_one_step"] == pytest.approx(expected, abs=40 * EPS32 * scale / s**2)
  assert out["curvature_over_one_step"] < 0.9 * lam
