"""Offloading baselines: everything offloaded, everything local, random, exhaustive search.

Every function takes slots of any leading batch shape [..., W] and returns the bool
offload vector x (or a `Decision`) of the same shape; padded users are never offloaded.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp

from dynn_jax.config import Config, jit_config
from dynn_jax.env import Decision, Slots, slot_costs
from dynn_jax.solvers.allocation import optimal_allocation

Array = jax.Array

# 2^12 sets x 12 users x the bisection of `optimal_allocation` per slot is still cheap;
# beyond that the table grows too fast to enumerate.
MAX_EXHAUSTIVE_WIDTH = 12


@jax.jit
def all_offload(slots: Slots) -> Array:
  """Every real user offloads (case 1's only choice)."""
  return slots.mask


@jax.jit
def all_local(slots: Slots) -> Array:
  """Nobody offloads: the 'local execution' baseline of case 2."""
  return jnp.zeros_like(slots.mask)


@jax.jit
def random_offload(key: Array, slots: Slots, p: float | Array = 0.5) -> Array:
  """Each real user offloads independently with probability p."""
  return jax.random.bernoulli(key, p, slots.mask.shape) & slots.mask


def offloading_table(width: int) -> Array:
  """All 2^width offloading sets as a [2^width, width] bool table.

  Row r is the set with bit code 2^width - 1 - r (bit i = user i). Padded users sit
  after the real ones, so the first row that offloads no padded user is the one that
  offloads every real user: since `argmin` breaks ties toward the first row, the
  all-offload set wins ties.
  """
  codes = (2 ** width - 1) - jnp.arange(2 ** width, dtype=jnp.int32)
  return ((codes[:, None] >> jnp.arange(width, dtype=jnp.int32)) & 1).astype(bool)


def _search_one(slots: Slots, t_inf_edge: Array, t_inf_loc: Array,
                config: Config) -> Decision:
  """Exhaustive search over one slot's offloading sets ([W] arrays)."""
  table = offloading_table(slots.mask.shape[-1])
  n_sets = table.shape[0]
  many = jax.tree.map(lambda a: jnp.broadcast_to(a, (n_sets,) + a.shape), slots)
  decisions = optimal_allocation(many, table, config)
  objective = slot_costs(many, decisions, config, t_inf_edge, t_inf_loc).objective
  # A set that offloads a padded user duplicates the one without it: drop it. NaN can
  # only come from 0 * inf (alpha or beta = 0 with an infinite delay): treat it as inf.
  valid = ~(table & ~slots.mask).any(-1)
  objective = jnp.where(valid & ~jnp.isnan(objective), objective, jnp.inf)
  best = jnp.argmin(objective)
  return jax.tree.map(lambda a: a[best], decisions)


def delays_in_slot_dtype(slots: Slots, t_inf_edge, t_inf_loc) -> tuple[Array, Array]:
  """Inference delays as arrays of the slots' dtype.

  Python floats, NumPy and JAX scalars then all reach the jitted solvers with the same
  (strongly typed) signature, so changing how a delay is passed never recompiles.
  """
  dtype = slots.s.dtype
  return jnp.asarray(t_inf_edge, dtype), jnp.asarray(t_inf_loc, dtype)


@jit_config
def _exhaustive_search(slots: Slots, t_inf_edge: Array, t_inf_loc: Array,
                       config: Config) -> Decision:
  width = slots.mask.shape[-1]
  batch = slots.mask.shape[:-1]
  flat = jax.tree.map(lambda a: a.reshape((-1, width)), slots)
  t_edge = jnp.broadcast_to(t_inf_edge, batch).reshape(-1)
  t_loc = jnp.broadcast_to(t_inf_loc, batch).reshape(-1)
  solve = jax.vmap(lambda s, te, tl: _search_one(s, te, tl, config))
  decision = solve(flat, t_edge, t_loc)
  return jax.tree.map(lambda a: a.reshape(batch + (width,)), decision)


def exhaustive_search(slots: Slots, config: Config, t_inf_edge: float | Array = 0.0,
                      t_inf_loc: float | Array = 0.0) -> Decision:
  """The offloading set (with its optimal allocation) of least slot objective.

  Enumerates all 2^W sets for W = config.width <= 12; each set gets the exact optimum
  of `optimal_allocation` (least weighted edge delay), then the set of least
  `slot_costs(...).objective` is kept. `t_inf_edge` / `t_inf_loc` broadcast to the batch
  shape [...]. Since the allocation minimises the weighted delay, not the objective, the
  result is the best set under that allocation rule, not the joint optimum of (x, b, f).
  Runs jitted (`config` static); also traceable inside a caller's jit or vmap.

  Case 1: users have no CPU, so a real user with c s > 0 kept local has infinite delay
  and every set but all-offload has an infinite objective; all-offload wins (also on
  ties, see `offloading_table`). Only a zero-size or zero-workload task may stay local,
  where it costs nothing.
  """
  width = max(config.width, slots.mask.shape[-1])
  if width > MAX_EXHAUSTIVE_WIDTH:
    raise ValueError(f'exhaustive_search: width {width} exceeds the limit of '
                     f'{MAX_EXHAUSTIVE_WIDTH} users (2^W sets are enumerated)')
  return _exhaustive_search(slots, *delays_in_slot_dtype(slots, t_inf_edge, t_inf_loc),
                            config=config)
