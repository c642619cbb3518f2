"""The quality measure of trained allocators: their weighted delay on one fixed set of
held-out slots (every real user offloaded, no inference delay), relative to the optimal
allocation's on the same slots.

Training summaries, the training-cost study and the reproduction all judge allocators
here, on the slots of `HELD_OUT_SEED`, so their gaps are comparable. This module must
not depend on training (the cost study checks quality between training chunks) nor on
the reports that print its numbers.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import numpy as np

from dynn_jax.config import MECConfig
from dynn_jax.env import Slots, normalized_features, sample_slots, weighted_edge_delay
from dynn_jax.models import Allocation, ModelConfig, StaticAllocator, all_subnetworks, allocate
from dynn_jax.networks import Params
from dynn_jax.solvers import optimal_allocation

Array = jax.Array

HELD_OUT_SEED = 10_007  # never a training seed's stream: training keys come from fold_in


def weighted_delays(out: Allocation, slots: Slots, x: Array, mec: MECConfig) -> Array:
  """Per-slot sum_i w_i (T_tra_i + T_com_i) of an allocator output: [...]."""
  decision = allocate(out, x, mec)
  return weighted_edge_delay(slots, x, decision.b, decision.f, mec)


class HeldOut(NamedTuple):
  """Fixed evaluation slots, every real user offloaded, and the optimum on each slot."""
  slots: Slots
  x: Array
  optimum: Array  # [B]: optimal allocation's sum_i w_i (T_tra_i + T_com_i)


def held_out(mec: MECConfig, num_slots: int, seed: int = HELD_OUT_SEED) -> HeldOut:
  slots = sample_slots(jax.random.PRNGKey(seed), mec, num_slots)
  dec = optimal_allocation(slots, slots.mask, mec)
  return HeldOut(slots, slots.mask, weighted_edge_delay(slots, slots.mask, dec.b, dec.f, mec))


@functools.partial(jax.jit, static_argnums=(0, 1))
def subnetwork_gaps(model: ModelConfig, mec: MECConfig, params: Any, held: HeldOut) -> Array:
  """[K, L]: mean weighted delay of each sub-network over the optimum's, minus 1."""
  feats = normalized_features(held.slots, mec)
  out = all_subnetworks(model, {'params': params}, feats, held.x)
  wd = weighted_delays(out, held.slots, held.x, mec)  # [K, L, B]
  return wd.mean(-1) / held.optimum.mean() - 1.0


@functools.partial(jax.jit, static_argnums=(0, 1))
def static_gap(model: ModelConfig, mec: MECConfig, params: Any, held: HeldOut) -> Array:
  feats = normalized_features(held.slots, mec)
  out = StaticAllocator(model).apply({'params': params}, feats, held.x)
  return weighted_delays(out, held.slots, held.x, mec).mean() / held.optimum.mean() - 1.0


def quality_gaps(mec: MECConfig, model: ModelConfig, params: Params, slots: int,
                 seed: int = HELD_OUT_SEED) -> dict:
  """Weighted-delay gap to the optimal allocation, every task offloaded, no inference
  delay: [K][L] for the DyNN and one number for the static baseline."""
  held = held_out(mec, slots, seed)
  gaps = np.asarray(subnetwork_gaps(model, mec, params.allocator, held))
  out = {'subnetwork_gap': gaps.tolist(), 'full_gap': float(gaps[-1, -1]),
         'worst_gap': float(gaps.max()), 'slots': slots}
  if params.static is not None:
    out['static_gap'] = float(static_gap(model, mec, params.static, held))
  return out


def gap_table(gaps: list[list[float]]) -> str:
  """Every sub-network's gap to the weighted optimum (`quality_gaps`'s
  'subnetwork_gap') as a text table, one row per k."""
  gaps = np.asarray(gaps)
  lines = ['weighted-delay gap to kkt_weighted (%), every (k, l):\n' + ' ' * 20 + ' '.join(f'l={l + 1:<6d}' for l in range(gaps.shape[1]))]
  for k in range(gaps.shape[0]):
    lines.append(f'k={k + 1:<18d}' + ' '.join(f'{100 * g:<8.2f}' for g in gaps[k]))
  return '\n'.join(lines)
