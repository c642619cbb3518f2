"""How an action's numbers become a `Decision`: the share arithmetic that the gymnax
environment (`dynn_jax.gym`), its flat-action wrapper and the agents share.

This module owns the share conventions (`SHARE_MIN`, `LOGIT_LIMIT`, `normalize_shares`,
`logit_shares`, `shares_decision`) and imports no gymnax, so that the evaluation can run
a trained agent without the RL extra installed (importing gymnax takes seconds and
brings pandas). It must not know environments or networks.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from dynn_jax.config import Config
from dynn_jax.env import Decision, decision_from_shares

Array = jax.Array

# Lower bound of a share in the env's action space, relative to the largest (1): small
# enough that no allocation worth making is cut off (the oracle's compute shares span
# about 1e-4 at 16-bit sampling resolution), large enough that SHARE_MIN / W of any
# budget in MECConfig's ranges is a positive float32 and the delay it gives a finite one.
SHARE_MIN = 1e-6
# Bound of a share's logit: exp(2 LOGIT_LIMIT) = 1 / SHARE_MIN, so that [-LOGIT_LIMIT,
# LOGIT_LIMIT] maps onto [SHARE_MIN, 1] (`logit_shares`).
LOGIT_LIMIT = 0.5 * math.log(1.0 / SHARE_MIN)


def normalize_shares(share: Array, x: Array) -> Array:
  """Non-negative shares summing to 1 over `x` (equal split if all are 0), 0 elsewhere;
  NaN over `x` where a share there is NaN or infinite (not the equal split: that would
  score a broken action as a valid one)."""
  share = jnp.where(x, jnp.maximum(share, 0.0), 0.0)
  total = share.sum(-1, keepdims=True)
  count = x.sum(-1, keepdims=True).astype(share.dtype)
  equal = jnp.where(x, 1.0 / jnp.maximum(count, 1.0), 0.0)
  # The safe denominator keeps gradients finite on the equal-split branch.
  shares = jnp.where(total > 0, share / jnp.where(total > 0, total, 1.0), equal)
  return jnp.where(jnp.isfinite(total), shares, jnp.where(x, jnp.nan, 0.0))


def logit_shares(z: Array) -> Array:
  """Strictly positive shares in [SHARE_MIN, 1] of logits z (any real or infinite value;
  NaN counts as 0): exp(clip(z) - LOGIT_LIMIT). Normalised over the offloaded users
  (`normalize_shares`) they are the softmax of the clipped logits."""
  z = jnp.clip(jnp.nan_to_num(z, nan=0.0), -LOGIT_LIMIT, LOGIT_LIMIT)
  # exp(-2 LOGIT_LIMIT) may round a hair below SHARE_MIN: the floor keeps it inside.
  return jnp.maximum(jnp.exp(z - LOGIT_LIMIT), SHARE_MIN).astype(z.dtype)


def shares_decision(x: Array, b_share: Array, f_share: Array, config: Config) -> Decision:
  """The `Decision` of offloading bits `x` (bool, already restricted to real users) and
  relative shares: each share normalised over `x`, times the budget."""
  return decision_from_shares(x, normalize_shares(b_share, x), normalize_shares(f_share, x),
                              config)
