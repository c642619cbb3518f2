"""The exit-bucketed batched path: slots grouped by exit on the host, one jitted call
per group of `chunk` slots.

A comparison path for the benchmark, not a model path: the model's own batched paths
(`moe_forward`, masked; `exit_sorted_apply`, grouped on device inside one jitted
function) live in `dynn_jax.models`. This one pays a host round trip and a dispatch
per group, which is what the exits suite and `block_sweep` set the on-device grouping
against. It must give the masked path's `Allocation` to float rounding.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from dynn_jax.models import (Allocation, ModelConfig, check_inputs, kl_to_option,
                             option_to_kl, per_slot_forward)

Array = jax.Array


def group_by_exit(config: ModelConfig, k, l, chunk: int = 16
                  ) -> list[tuple[int, int, np.ndarray]]:
  """(k, l, slot indices int32 [chunk]) of every call of the exit-bucketed path.

  Slots are grouped by their exit on the host and each group is cut into calls of
  `chunk` slots, so there is exactly one compiled variant per exit whatever the mix.
  Only a group's last call is padded, with copies of the group's first slot: real
  inputs, so nothing becomes NaN, and the duplicate writes carry identical values.
  """
  if not isinstance(chunk, (int, np.integer)) or chunk < 1:
    raise ValueError(f'chunk = {chunk!r}; must be a positive integer')
  k, l = np.asarray(k), np.asarray(l)
  if (k.ndim != 1 or k.shape != l.shape or not np.issubdtype(k.dtype, np.integer)
      or not np.issubdtype(l.dtype, np.integer)):
    raise ValueError(f'k and l must be integer arrays [B] of the same shape; got '
                     f'{k.dtype}{list(k.shape)} and {l.dtype}{list(l.shape)}')
  K, L = config.num_experts, config.max_depth
  if k.size and (k.min() < 1 or k.max() > K or l.min() < 1 or l.max() > L):
    raise ValueError(f'(k, l) outside 1..{K} x 1..{L} (ModelConfig.num_experts, max_depth)')
  option = np.asarray(kl_to_option(k, l, config))
  exit_k, exit_l = (np.asarray(a) for a in option_to_kl(np.arange(K * L), config))
  order = np.argsort(option, kind='stable')
  counts = np.bincount(option, minlength=K * L)
  bounds = np.concatenate([[0], np.cumsum(counts)])
  calls = []
  for o in np.flatnonzero(counts):
    members = order[bounds[o]:bounds[o + 1]]
    for start in range(0, len(members), chunk):
      part = members[start:start + chunk]
      part = np.concatenate([part, np.full(chunk - len(part), members[0])])
      calls.append((int(exit_k[o]), int(exit_l[o]), part.astype(np.int32)))
  return calls


@functools.lru_cache(maxsize=None)
def _bucket_call(config: ModelConfig, k: int, l: int):
  """Jitted: gather a chunk of slots, run exit (k, l) on it only, scatter into `out`.

  `out` is donated, so the scatter writes in place instead of copying the whole batch
  once per call.
  """
  def run(variables, features, offload_mask, index, out):
    got = per_slot_forward(config, k, l, variables, features[index], offload_mask[index])
    return jax.tree.map(lambda o, g: o.at[index].set(g.astype(o.dtype)), out, got)

  return jax.jit(run, donate_argnums=4)


def bucketed_apply(config: ModelConfig, variables: dict, features: Array,
                   offload_mask: Array, k, l, *, chunk: int = 16) -> Allocation:
  """Exit-bucketed batched inference: every slot runs only its own sub-network.

  features [B, W, 5], offload_mask bool [B, W], k and l int [B] (host or device). Slots
  are grouped by (k, l) on the host (`group_by_exit`) and each call runs the per-slot
  variant of one exit vmapped over `chunk` slots, so the work follows each slot's
  exit, unlike the batched path (`moe_forward`), which computes every expert and layer
  and masks them. Gives the same `Allocation` as the batched path (to float rounding).

  Small chunks are faster on CPU: each slot gathers its own k experts' weights
  ([chunk, k, width, width] per layer), which should stay in cache. At the paper's
  size on a loaded 2-core CPU, 4096 slots of a uniform mix ran at ~18k slots/s with
  16 slots per call, ~11k with 64, ~12k with 8 and ~4.6k with every group padded to
  a power of two. One compile per exit (and chunk size).
  """
  features, offload_mask = check_inputs(config, features, offload_mask)
  if features.ndim != 3 or np.shape(k) != features.shape[:1] or np.shape(l) != np.shape(k):
    raise ValueError(f'expected features [B, W, 5] and k, l [B]; got features '
                     f'{features.shape}, k {np.shape(k)}, l {np.shape(l)}')
  calls = group_by_exit(config, k, l, chunk)
  batch, width = offload_mask.shape
  # Five distinct buffers: one donated buffer cannot back two outputs.
  out = Allocation(*(jnp.zeros((batch, width), features.dtype) for _ in range(4)),
                   jnp.zeros((batch, config.num_experts), features.dtype))
  for kk, ll, index in calls:
    out = _bucket_call(config, kk, ll)(variables, features, offload_mask, index, out)
  return out
