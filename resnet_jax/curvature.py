"""Curvature and gradient noise of the training loss: the Hessian's top eigenvalues by Lanczos,
the optimiser's stability threshold, and the simple gradient noise scale.

Two instruments for "why residual nets train with SGD":

- **Sharpness**, the largest eigenvalue of the training loss's Hessian. On a quadratic, gradient
  descent at learning rate η is stable only while the sharpness stays below 2/η; heavy-ball
  momentum β moves that to (2 + 2β)/η (`stability_threshold`). Cohen et al. (ICLR 2021,
  "Gradient Descent on Neural Networks Typically Occurs at the Edge of Stability") found that the
  sharpness rises during training until it reaches the threshold, then hovers there. The top
  eigenvalues come from Lanczos iteration with full reorthogonalisation (`lanczos`,
  `top_ritz_values`) on Hessian-vector products computed forward-over-reverse
  (`hessian_vector_product`): each costs about two gradients, and the Hessian is never formed.
  The largest Ritz value is a lower bound on the largest eigenvalue, and Lanczos resolves first
  the end of the spectrum that stands furthest out: when large negative eigenvalues dominate, as
  at a plain net's initialisation, a few iterations resolve that end and the "top" Ritz value
  stays below the positive end, even below zero. `ritz_bounds` says how far each Ritz value can
  be from an eigenvalue, and the smallest Ritz value shows which end dominates.
- **The simple noise scale** B_simple = tr(Σ)/|G|² (McCandlish et al. 2018, "An Empirical Model
  of Large-Batch Training", Appendix A; G the expected gradient, Σ the per-example gradients'
  covariance): about the batch size beyond which a larger batch stops buying a proportionally
  larger step. BatchNorm couples a batch's examples, so here it is B tr Cov(G_B)/|E G_B|² at the
  batch size B trained, G_B the gradient of a batch's training loss; `noise_scale_estimates`
  gives unbiased estimates of both from the gradients of two independent batches.

Everything here is a pure function of arrays and callables. The trainer (trainer.py) binds them
to the model, the loss and a batch; the train loop (train.py) decides when to measure.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

# Lanczos stops when the new residual's norm falls below this fraction of the largest entry of T
# so far (a lower bound on |A|): the Krylov space has closed, and what is left is float32
# rounding (3e-7 of |A| on the quadratic of tests/test_curvature.py; eps is 1.2e-7). Stopping at
# a genuine residual that small would move no Ritz value by more than 1e-4 of |A|.
BREAKDOWN = 1e-4


def hessian_vector_product(loss: Callable[[Any], jax.Array], params: Any,
                           tangent: jax.Array) -> jax.Array:
  """H @ tangent, H the Hessian of `loss` at `params`, forward-over-reverse (`jax.jvp` of
  `jax.grad`): one pass forward and back, differentiated once more forward.

  Args:
    loss: params -> float32 scalar.
    params: a pytree of float32 arrays.
    tangent: float32 [n], a direction in `params` flattened by `jax.flatten_util.ravel_pytree`.

  Returns:
    float32 [n], the product, flattened the same way.
  """
  _, unravel = ravel_pytree(params)
  _, product = jax.jvp(jax.grad(loss), (params,), (unravel(tangent),))
  return ravel_pytree(product)[0]


def lanczos(matvec: Callable[[jax.Array], jax.Array], start: jax.Array,
            num_iters: int) -> tuple[np.ndarray, np.ndarray, float]:
  """The tridiagonal matrix T of `num_iters` Lanczos steps, with full reorthogonalisation.

  A Python loop: one call of `matvec` per step (pass a jitted one), then one compiled update of
  the basis. Every new vector is orthogonalised twice against all earlier ones ("twice is
  enough", Parlett), so in float32 the basis stays orthonormal and no ghost copies of converged
  eigenvalues appear.

  Args:
    matvec: float32 [n] -> float32 [n], a symmetric linear map A (a Hessian-vector product).
    start: float32 [n], the first direction; any nonzero length.
    num_iters: steps, i.e. calls of `matvec`: at least 1.

  Returns:
    (alphas float64 [m], betas float64 [m - 1], residual), T's diagonal and off-diagonal: T =
    QᵀAQ for the orthonormal basis Q [n, m] of the Krylov space of `start`. m = num_iters, or
    fewer when that space closes first (it is then invariant under A, and T's eigenvalues are
    A's, exactly). `residual` is the norm of what A q_m has outside the space (β_m; 0.0 when it
    closed), for ritz_bounds.
  """
  basis = _first_basis(start, num_iters)
  alphas, betas, scale = [], [], 0.0
  for j in range(num_iters):
    alpha, beta, basis = _extend(basis, j, matvec(basis[j]))
    alphas.append(float(alpha))
    scale = max(scale, abs(alphas[-1]), float(beta))
    closed = float(beta) <= BREAKDOWN * scale
    if closed or j + 1 == num_iters:
      return np.array(alphas), np.array(betas), 0.0 if closed else float(beta)
    betas.append(float(beta))
  raise ValueError(f"num_iters must be at least 1; got {num_iters}")


@functools.partial(jax.jit, static_argnums=1)
def _first_basis(start: jax.Array, num_iters: int) -> jax.Array:
  """float32 [num_iters, n]: the unit `start` in row 0, zeros below."""
  basis = jnp.zeros((num_iters, start.shape[0]), jnp.float32)
  return basis.at[0].set(start / jnp.linalg.norm(start))


@functools.partial(jax.jit, donate_argnums=0)
def _extend(basis: jax.Array, j: int, product: jax.Array
            ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """One Lanczos step: alpha_j = q_j·Aq_j, then Aq_j orthogonalised against rows 0..j (the rows
  below are zero, so all of `basis` will do); its norm is beta_j and its direction row j + 1
  (dropped when j + 1 is past the end)."""
  alpha = basis[j] @ product
  residual = product
  for _ in range(2):
    residual = residual - (basis @ residual) @ basis
  beta = jnp.linalg.norm(residual)
  return alpha, beta, basis.at[j + 1].set(residual / beta, mode="drop")


def top_ritz_values(alphas: np.ndarray, betas: np.ndarray, k: int) -> np.ndarray:
  """The k largest eigenvalues of the tridiagonal T (from `lanczos`), descending: float64 [<= k].

  They approximate A's largest eigenvalues from below, converging first for the ones best
  separated from the rest; fewer than k when T is smaller.
  """
  return ritz_bounds(alphas, betas, 0.0)[0][:k]


def ritz_bounds(alphas: np.ndarray, betas: np.ndarray, residual: float
                ) -> tuple[np.ndarray, np.ndarray]:
  """T's eigenvalues (the Ritz values, descending) and for each a bound on its distance to the
  nearest eigenvalue of A: residual * |last entry of its eigenvector of T| (the norm of A y - θ y
  for its Ritz vector y; Parlett, "The Symmetric Eigenvalue Problem", 13.2), in exact arithmetic.
  A small bound says the Ritz value is an eigenvalue of A, not which: the top one may have
  converged to an eigenvalue below the largest."""
  tridiagonal = np.diag(alphas) + np.diag(betas, 1) + np.diag(betas, -1)
  values, vectors = np.linalg.eigh(tridiagonal)
  return values[::-1], (residual * np.abs(vectors[-1]))[::-1]


def negative_end_dominates(top: float, lowest: float) -> bool:
  """Whether a Lanczos run's lowest Ritz value is larger in size than its top one: then the top
  one may be a loose lower bound on the largest eigenvalue. Lanczos resolves first the end of
  the spectrum farthest from the rest; when that is the negative end (plain nets at
  initialisation), a few iterations can leave the top Ritz value near zero, with a small
  `ritz_bounds` bound (an eigenvalue is near it, not the largest). A warning, not a proof: with
  enough iterations the top converges all the same."""
  return -lowest > top


def stability_threshold(lr: float, momentum: float = 0.0, nesterov: bool = False
                        ) -> float | None:
  """The largest curvature on which SGD at learning rate `lr` is stable, on a quadratic.

  Heavy ball (optax's and torch's `trace`: v = g + βv, w -= ηv) along an eigendirection of
  curvature λ iterates w' = (1 + β - ηλ)w - βw'', which first goes unstable through the root -1
  at ηλ = 2 + 2β: the threshold is (2 + 2β)/η, 2/η without momentum (Cohen et al., ICLR 2021,
  Section 6). Nesterov's update g + βv' gives w' = (1 + β)(1 - ηλ)w - β(1 - ηλ)w'', whose root -1
  comes at ηλ = (2 + 2β)/(1 + 2β): the threshold (2 + 2β)/(η(1 + 2β)), derived here for optax's
  Nesterov update and checked by simulating it (tests/test_curvature.py).

  Args:
    lr: the learning rate η (0 during a warmup from 0: no threshold, returns None).
    momentum: β in [0, 1).
    nesterov: Nesterov's momentum rather than the heavy ball.
  Returns:
    the threshold, in the units of the Hessian's eigenvalues (loss per parameter squared).
  """
  if lr <= 0:
    return None  # Every curvature is stable at a standstill.
  if nesterov:
    return (2 + 2 * momentum) / (lr * (1 + 2 * momentum))
  return (2 + 2 * momentum) / lr


def noise_scale_estimates(cross: float, diff_sq_norm: float, batch_size: int
                          ) -> dict[str, float]:
  """Unbiased estimates of |E G_B|² and B tr Cov(G_B), and their ratio B_simple, from the
  gradients G¹ and G² of the training loss on two independent batches of B examples.

  Each G is one draw of G_B, whatever BatchNorm does to the examples inside a batch, and the two
  are independent (so the cross term of the second line has mean 0):

    E[G¹·G²]         = E G¹ · E G² = |E G_B|²
    E|G¹ - G²|² / 2  = (E|G¹ - E G_B|² + E|G² - E G_B|²) / 2 = tr Cov(G_B).

  For independent examples without BN, E G_B = G and Cov(G_B) = Σ/B: B_simple = B tr Cov(G_B) /
  |E G_B|² is McCandlish et al.'s tr(Σ)/|G|². With BN it is the noise of the step SGD takes at
  batch size B, per example. (Estimates from one batch and its parts fail with BN: parts with
  their own statistics are other functions than the batch's loss, and parts under the batch's
  statistics count the coupling BN gives two examples in |G|² instead of the noise.)

  The |E G_B|² estimate may come out negative on one measurement (tr Cov(G_B)'s never), and
  their ratio is biased (a ratio of noisy estimates): McCandlish et al. average numerator and
  denominator over training steps before dividing, as plots.plot_noise_scale does.

  Args:
    cross: G¹·G².
    diff_sq_norm: |G¹ - G²|².
    batch_size: B, the examples in each batch.
  Returns:
    {"grad_sq_norm": |E G_B|², "trace_cov": B tr Cov(G_B), "b_simple": their ratio}.
  """
  grad_sq = cross
  trace = batch_size * diff_sq_norm / 2
  return {"grad_sq_norm": float(grad_sq), "trace_cov": float(trace),
          "b_simple": float(trace / grad_sq) if grad_sq else float("nan")}
