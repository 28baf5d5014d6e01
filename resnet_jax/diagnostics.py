"""Gradient-flow diagnostics: per-block gradient norms and activation sizes.

He et al. (2016) argue that a deep plain net is hard to optimise, not short of capacity. These
numbers show where that happens: for a plain net the gradient norm shrinks or swells from the
output side to the input side; a residual net keeps it level. The two reductions here are pure
and cheap, so the train step computes them from the gradients and intermediates it already has.

Block names are the model's top-level parameter names: `stem`, `stage{s}_block{b}` (1-based),
`head_bn` (pre-activation nets only) and `head`, in that order from input to output.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import optax

_BLOCK_NAME = re.compile(r"stage(\d+)_block(\d+)")
_ENDS = {"stem": 0, "head_bn": 2, "head": 3}  # Blocks sort between the stem and the head.


def block_grad_norms(grads: Mapping[str, Any]) -> dict[str, jax.Array]:
  """The global L2 norm of each block's gradients.

  Args:
    grads: gradients shaped like the model's `params` collection (not the variables dict):
      block name -> that block's pytree of float32 arrays.

  Returns:
    block name -> float32 scalar, sqrt of the sum of squares over all of that block's leaves.
  """
  return {name: optax.tree.norm(block) for name, block in grads.items()}


def block_activation_rms(intermediates: Mapping[str, Any]) -> dict[str, jax.Array]:
  """The RMS of each block's output, from the values the blocks sow.

  Args:
    intermediates: the `intermediates` collection returned by `model.apply(...,
      mutable=["intermediates", ...])`: block name -> {"activation_rms": (float32 scalar,)}.
      Entries without an `activation_rms` are left out.

  Returns:
    block name -> float32 scalar.
  """
  # `sow` appends one value per forward pass; the step makes one pass, so the last is its own.
  return {name: sown["activation_rms"][-1] for name, sown in intermediates.items()
          if "activation_rms" in sown}


def block_order(names: Iterable[str]) -> list[str]:
  """Sorts block names from the input side to the output side.

  `stem` first, then `stage{s}_block{b}` by stage and block number (so `stage1_block10` follows
  `stage1_block9`), then `head_bn` and `head`.
  """
  return sorted(names, key=_position)


def _position(name: str) -> tuple[int, int, int]:
  if name in _ENDS:
    return (_ENDS[name], 0, 0)
  match = _BLOCK_NAME.fullmatch(name)
  if match is None:
    raise ValueError("block name must be 'stem', 'stage<s>_block<b>', 'head_bn' or 'head'; "
                     f"got {name!r}")
  return (1, int(match.group(1)), int(match.group(2)))
