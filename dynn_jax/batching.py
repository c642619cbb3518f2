"""Running a per-slot computation over a batch in blocks of slots: one compiled body,
the working set of one block at a time (no Python loop, no remainder call)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Slots per block of a full-width network in a large evaluation. Measured with the
# shipped case-1 networks on 8192 slots (W = 45, 2-core CPU): fix_moe through
# `moe_forward` ran 3.0e3 slots/s on the whole batch, 1.19e4 / 1.10e4 / 1.07e4 in blocks
# of 64 / 128 / 256 (the exit-sorted path with all slots on the full exit: 8.1e3); the
# static baseline 4.7e3 on the whole batch, 6.1e3 / 7.0e3 / 6.3e3 in blocks of 16 / 64 /
# 256. A block's activations stay in cache, and memory no longer grows with the batch.
FULL_WIDTH_BLOCK = 64


def blocked(fn, block: int = FULL_WIDTH_BLOCK):
  """`fn(*args)` over the leading (slot) axis of every array in `args` (pytrees
  allowed) in blocks of `block` slots, one block after another (`lax.map`): the same
  outputs as `fn` on the whole batch, for computations that are the same for every slot
  (the full-width networks, the GA). The batch is padded to whole blocks with copies of
  its last slot (real inputs: nothing becomes NaN), dropped from the outputs."""
  if isinstance(block, bool) or not isinstance(block, int) or block < 1:
    raise ValueError(f'block = {block!r}; must be a positive integer (slots per block)')

  def run(*args):
    size = jax.tree.leaves(args)[0].shape[0]
    if size == 0:
      return fn(*args)
    pad = -size % block

    def to_blocks(a):
      a = jnp.concatenate([a, jnp.repeat(a[-1:], pad, 0)]) if pad else a
      return a.reshape((-1, block) + a.shape[1:])

    out = jax.lax.map(lambda xs: fn(*xs), jax.tree.map(to_blocks, args))
    return jax.tree.map(lambda a: a.reshape((-1,) + a.shape[2:])[:size], out)

  return run
