"""The objective of SPEC section 1 itself: its allocation, its joint offloading, bounds.

For a fixed offloading set the per-slot objective is

  sum_i alpha (T_inf + T_tra_i + T_com_i) + beta p T_tra_i + delta 1{T_inf + T_tra_i + T_com_i > d_i}.

Without the miss term it is convex and separable: the weighted KKT solver with weight
alpha + beta p on transmission and alpha on compute is its exact optimum
(`convex_allocation`). The miss term makes the problem combinatorial: which users that
would be late are worth rescuing (giving them enough bandwidth and CPU to meet d_i) at
the expense of the others' delay. `objective_allocation` solves it by *continuation*:

1. start from the convex optimum (the right answer when delta = 0);
2. gradient descent (Adam) on the logits of the bandwidth and CPU shares of a smoothed
   objective in which 1{T > d} becomes sigmoid((T - d) / (tau d)), with tau annealed
   geometrically from `TEMPERATURE_START` to `TEMPERATURE_END`: at a high temperature
   every late user feels a pull toward its deadline proportional to how close it is, so
   resources flow to the cheapest rescues first; as tau falls the pull concentrates on
   users at their deadline, which then sit just inside it, and hopeless users are
   released back to the convex trade-off. A relative temperature makes the transition
   width a fixed fraction of each deadline, whatever its size.
3. run the same descent, at a low temperature, from a *rescue-all* start: the least
   convex cost with every user that can make it on time at its deadline
   (`rescue_allocation`, multiplicative updates of deadline multipliers). Descent
   from the convex optimum finds the cheap rescues but not a packing where several
   users must all sit at their deadlines together; this start begins there and drops
   the rescues that do not pay;
4. polish: the exact constrained optimum (`rescue_allocation`) for the set of users the
   best decision so far gets on time, which removes the slack the sigmoid leaves;
5. keep, per slot, the best decision under the *hard* objective among the convex
   optimum, the weighted KKT optimum (`optimal_allocation`), the equal split, every
   iterate and the polished one, so the result is never worse than any of them.

Why continuation first and multipliers second: a Lagrangian over the deadline
constraints needs the rescued set fixed in advance (its multipliers only exist for the
constraints that are kept), so alone it still needs an outer combinatorial search over
2^N sets; the smoothed objective chooses the set and the resources together, in a fixed
number of batched steps with static shapes, and the multipliers then make the chosen
set's allocation exact. The tests check the result within 1% of the enumeration of
every rescued set (SLSQP per set) on small N.

`objective_bound` is a Lagrangian (dual) lower bound: for bandwidth and CPU prices
(nu_b, nu_f) >= 0, sum_i min_{b_i, f_i}[cost_i + nu_b b_i + nu_f f_i] - nu_b b_max -
nu_f f_ser never exceeds the minimum (weak duality). Each user's term is solved in
closed form (CPU) and by the KKT inversion (bandwidth), and a user who misses its
deadline even with the whole budget adds delta. At the convex optimum's prices the bound
equals the miss-free convex optimum (strong duality) plus the certain misses.
`joint_objective_bound` lets each user take its local cost instead (case 2), a bound
over every offloading set.

`oracle_offload` (case 2) picks the offloading set: candidates are everyone, nobody,
and the sets a Lagrangian price rule gives (offload i iff its priced edge cost is below
its local cost), at the prices of the bound and at the fixed points of re-pricing; each
is scored with its convex allocation, the best gets `objective_allocation`, and users
whose edge cost then exceeds their local cost are sent home (their resources shared out
proportionally, which can only help the others).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

from dynn_jax.config import Config, jit_config
from dynn_jax.env import (Decision, Slots, decision_from_shares, edge_delays,
                          edge_user_costs, expand_to_users, local_user_costs, safe_div,
                          snr_coefficient, uplink_rate, user_cost)
from dynn_jax.solvers.allocation import (BISECTION_STEPS, equal_split, initial_log_t,
                                         invert_log_psi, optimal_allocation,
                                         proportional_split, weighted_allocation)
from dynn_jax.solvers.offloading import delays_in_slot_dtype

Array = jax.Array

DESCENT_STEPS = 200
LEARNING_RATE = 0.05
TEMPERATURE_START = 0.3
TEMPERATURE_END = 1e-3
RESCUE_TEMPERATURE = 0.01
# Prices tried by the bounds, as multiples of the convex optimum's prices (b, f each).
PRICE_SCALES = (1.0, 0.5, 0.25, 0.1, 0.03)
BOUND_NEWTON_STEPS = 24


def transmission_weight(config: Config) -> float:
  """The objective's weight on T_tra: alpha (delay) + beta p (the user's energy)."""
  return config.alpha + config.beta * config.p_tx


def convex_allocation(slots: Slots, offload: Array, config: Config,
                      bisection_steps: int = BISECTION_STEPS) -> Decision:
  """Exact minimiser of alpha (T_tra + T_com) + beta p T_tra: the objective less misses."""
  return weighted_allocation(slots, offload, transmission_weight(config), config.alpha,
                             config, bisection_steps)


def _objective(slots, x, b, f, config, t_inf_edge, t_inf_loc=None) -> Array:
  """Hard slot objective [...]; local users (when t_inf_loc is given) pay their local cost."""
  edge = edge_user_costs(slots, x, b, f, config, t_inf_edge)
  total = jnp.where(jnp.isnan(edge), jnp.inf, edge).sum(-1)
  if t_inf_loc is not None:
    total = total + jnp.where(x, 0.0, local_user_costs(slots, config, t_inf_loc)).sum(-1)
  return total


def _pick(better: Array, a: Decision, b: Decision) -> Decision:
  return jax.tree.map(lambda u, v: jnp.where(better[..., None], u, v), a, b)


def _descend(slots: Slots, x: Array, start: Decision, config: Config,
             t_inf_edge: Array, steps: int, temperature_start: float = TEMPERATURE_START
             ) -> tuple[Decision, Array]:
  """Continuation from `start` (see the module docstring): (best decision, its objective)."""
  dtype = slots.s.dtype
  count = jnp.maximum(x.sum(-1, keepdims=True), 1).astype(dtype)
  # A sliver of the equal split keeps every logit finite (users the start starves).
  def logits(value, total):
    share = 0.999 * value / total + 0.001 * x / count
    return jnp.where(x, jnp.log(jnp.maximum(share, 1e-30)), 0.0)
  z = (logits(start.b, config.b_max), logits(start.f, config.f_ser))

  def decision(z):
    share = lambda v: jnp.where(x, jax.nn.softmax(jnp.where(x, v, -jnp.inf), -1), 0.0)
    return decision_from_shares(x, share(z[0]), share(z[1]), config)

  def smooth(z, temperature):
    d = decision(z)
    return edge_user_costs(slots, x, d.b, d.f, config, t_inf_edge, temperature).sum()

  decay = (TEMPERATURE_END / temperature_start) ** (1.0 / max(steps - 1, 1))
  temperatures = temperature_start * decay ** jnp.arange(steps, dtype=dtype)
  tx = optax.adam(optax.cosine_decay_schedule(LEARNING_RATE, steps, 0.1))
  best_obj = _objective(slots, x, start.b, start.f, config, t_inf_edge)

  def step(carry, temperature):
    z, opt_state, best, best_obj = carry
    grads = jax.grad(smooth)(z, temperature)
    grads = jax.tree.map(lambda g: jnp.where(jnp.isfinite(g), g, 0.0), grads)
    updates, opt_state = tx.update(grads, opt_state)
    z = optax.apply_updates(z, updates)
    d = decision(z)
    obj = _objective(slots, x, d.b, d.f, config, t_inf_edge)
    better = obj < best_obj
    return (z, opt_state, _pick(better, d, best), jnp.where(better, obj, best_obj)), None

  carry = (z, tx.init(z), start, best_obj)
  (_, _, best, best_obj), _ = jax.lax.scan(step, carry, temperatures)
  return best, best_obj


def _best_start(slots, x, config, t_inf_edge) -> tuple[Decision, Array]:
  best = None
  for solve in (convex_allocation, optimal_allocation, equal_split):
    d = solve(slots, x, config)
    obj = _objective(slots, x, d.b, d.f, config, t_inf_edge)
    best = (d, obj) if best is None else _better(*best, d, obj)
  return best


RESCUE_ROUNDS = 48
WEIGHT_CAP = 1e4
RESCUE_MARGIN = 0.999
# The rounds only steer the multipliers: a coarse bandwidth multiplier is enough there.
ROUND_BISECTION_STEPS = 10


def rescue_allocation(slots: Slots, rescue: Array, x: Array, config: Config,
                      t_inf_edge: Array, rounds: int = RESCUE_ROUNDS) -> Decision:
  """Least convex cost with the users of `rescue` at (or inside) their deadlines.

  Deadline multipliers lambda_i make user i's weights alpha + beta p + lambda_i and
  alpha + lambda_i; each round scales alpha + lambda_i by (T_i / (d_i - T_inf))^2 (the
  delay falls as one over the square root of the weight when the others stay put), a
  multiplicative dual update, so rescued users settle at their deadlines. Users that
  cannot be rescued hit WEIGHT_CAP times alpha instead of starving everyone else.
  """
  tra, com = transmission_weight(config), config.alpha
  floor = jnp.maximum(com, 1e-12)
  # Aim a hair inside the deadline: exactly at it, rounding decides the miss.
  slack = RESCUE_MARGIN * jnp.maximum(slots.d - expand_to_users(t_inf_edge, slots.s),
                                      1e-3 * slots.d)
  rescue = rescue & x & (slots.s > 0)

  def body(_, lam):
    d = weighted_allocation(slots, x, tra + lam, com + lam, config, ROUND_BISECTION_STEPS)
    t_tra, t_com = edge_delays(slots, d.b, d.f, config)
    ratio = jnp.clip((t_tra + t_com) / slack, 0.5, 2.0)
    new = (floor + lam) * ratio ** 2 - floor
    return jnp.where(rescue, jnp.clip(new, 0.0, WEIGHT_CAP * floor), 0.0)

  lam = jax.lax.fori_loop(0, rounds, body, jnp.zeros_like(slots.s))
  return weighted_allocation(slots, x, tra + lam, com + lam, config)


@jit_config(static_argnames=('steps',))
def _objective_allocation(slots, offload, t_inf_edge, config, steps):
  x = jnp.asarray(offload).astype(bool) & slots.mask
  start, _ = _best_start(slots, x, config, t_inf_edge)
  if steps == 0:
    return start
  hopeful = x & ~_certain_miss(slots, config, t_inf_edge)
  rescued = rescue_allocation(slots, hopeful, x, config, t_inf_edge)
  best, best_obj = _descend(slots, x, start, config, t_inf_edge, steps)
  other, other_obj = _descend(slots, x, rescued, config, t_inf_edge, steps,
                              RESCUE_TEMPERATURE)
  best, best_obj = _better(best, best_obj, other, other_obj)
  # Polish: the exact constrained optimum for the set of users the best one rescues.
  met = x & ~(_delays(slots, best, t_inf_edge, config) > slots.d)
  polished = rescue_allocation(slots, met, x, config, t_inf_edge)
  polished_obj = _objective(slots, x, polished.b, polished.f, config, t_inf_edge)
  return _better(best, best_obj, polished, polished_obj)[0]


def _better(a: Decision, a_obj: Array, b: Decision, b_obj: Array) -> tuple[Decision, Array]:
  take_b = b_obj < a_obj
  return _pick(take_b, b, a), jnp.where(take_b, b_obj, a_obj)


def _delays(slots: Slots, d: Decision, t_inf_edge: Array, config: Config) -> Array:
  t_tra, t_com = edge_delays(slots, d.b, d.f, config)
  return expand_to_users(t_inf_edge, slots.s) + (t_tra + t_com)


def objective_allocation(slots: Slots, offload: Array, config: Config,
                         t_inf_edge: float | Array = 0.0, steps: int = DESCENT_STEPS
                         ) -> Decision:
  """(b, f) minimising the slot objective for the offloading set `offload`.

  Any leading batch shape [..., W]; `t_inf_edge` (s) broadcasts to it. Runs jitted with
  `config` static; traceable inside a caller's jit or vmap. Never worse on the objective
  than `optimal_allocation`, `equal_split` or `convex_allocation`; no NaN (an offloaded
  user with s > 0 always gets some bandwidth). See the module docstring for the method.
  """
  t_edge, _ = delays_in_slot_dtype(slots, t_inf_edge, 0.0)
  return _objective_allocation(slots, offload, t_edge, config=config, steps=steps)


# ----------------------------------------------------------------- lower bounds


def resource_prices(slots: Slots, d: Decision, config: Config) -> tuple[Array, Array]:
  """Marginal values of bandwidth and CPU under a decision: (nu_b, nu_f) [...].

  The mean over offloaded users of -d/db_i and -d/df_i of their convex cost
  (alpha + beta p) T_tra_i + alpha T_com_i; at a convex optimum every user's marginal
  is the same, the Lagrange multiplier of that budget.
  """
  tra_weight = transmission_weight(config)
  def marginal(value, need, cost):
    live = d.x & need & (value > 0)
    slope = -jax.grad(lambda v: jnp.where(live, cost(v), 0.0).sum())(
        jnp.where(live, value, 1.0))
    price = jnp.where(live, slope, 0.0).sum(-1) / jnp.maximum(live.sum(-1), 1)
    # A price is >= 0; at extreme SNRs the rate's slope rounds to 0 or below and the
    # marginal to -inf: no price is then as good a guess as any, and a bound stays one.
    return jnp.where(jnp.isfinite(price), jnp.maximum(price, 0.0), 0.0)
  nu_b = marginal(d.b, slots.s > 0,
                  lambda b: tra_weight * safe_div(slots.s, uplink_rate(b, slots.l, config)))
  nu_f = marginal(d.f, slots.c * slots.s > 0,
                  lambda f: config.alpha * safe_div(slots.c * slots.s, f))
  return nu_b, nu_f


def _priced_bandwidth(slots: Slots, nu_b: Array, config: Config) -> Array:
  """min_b [(alpha + beta p) s / r(b) + nu_b b] per user [..., W]."""
  ws = transmission_weight(config) * slots.s
  k = snr_coefficient(slots.l, config)
  nu = jnp.maximum(expand_to_users(nu_b, slots.s), jnp.finfo(slots.s.dtype).tiny)
  live = ws > 0
  log_q = 2.0 * jnp.log(k) - jnp.log(jnp.where(live, ws, 1.0)) - math.log(math.log(2.0))
  target = jnp.log(nu) + log_q
  u = invert_log_psi(target, initial_log_t(target), BOUND_NEWTON_STEPS)
  b = k * jnp.exp(-u)
  value = safe_div(ws, uplink_rate(b, slots.l, config)) + nu * b
  # Without a price the infimum is the rate limit at infinite bandwidth, K / ln 2. The
  # same limit stands in where the priced optimum overflows (a tiny price at a tiny
  # SNR): ws / r(b) >= ws ln 2 / K for every b, so the bound stays a bound.
  unpriced = ws * math.log(2.0) / k
  value = jnp.where((nu_b[..., None] > 0) & jnp.isfinite(value), value, unpriced)
  return jnp.where(live, value, 0.0)


def _priced_compute(slots: Slots, nu_f: Array, config: Config) -> Array:
  """min_f [alpha c s / f + nu_f f] = 2 sqrt(alpha c s nu_f) per user [..., W]."""
  return 2.0 * jnp.sqrt(config.alpha * slots.c * slots.s * expand_to_users(nu_f, slots.s))


def _certain_miss(slots: Slots, config: Config, t_inf_edge: Array) -> Array:
  """Users late even with the whole bandwidth and CPU [..., W]."""
  t_tra, t_com = edge_delays(slots, jnp.full_like(slots.s, config.b_max),
                             jnp.full_like(slots.s, config.f_ser), config)
  return expand_to_users(t_inf_edge, slots.s) + (t_tra + t_com) > slots.d


def _unpriced_edge_cost(slots: Slots, config: Config, t_inf_edge: Array) -> Array:
  """The part of a user's edge cost no allocation changes: alpha T_inf + delta 1{certain miss}."""
  return user_cost(config, expand_to_users(t_inf_edge, slots.s), None,
                   _certain_miss(slots, config, t_inf_edge), zero_weight_drops=False)


def _dual_bound(slots: Slots, x: Array, config: Config, t_inf_edge: Array,
                local: Array | None, nu_b: Array, nu_f: Array) -> Array:
  """The best dual value over the price grid PRICE_SCALES^2 around (nu_b, nu_f): [...]."""
  fixed = _unpriced_edge_cost(slots, config, t_inf_edge)
  best = jnp.full(slots.s.shape[:-1], -jnp.inf, slots.s.dtype)
  b_terms = [_priced_bandwidth(slots, nu_b * a, config) for a in PRICE_SCALES]
  f_terms = [_priced_compute(slots, nu_f * a, config) for a in PRICE_SCALES]
  for a, b_term in zip(PRICE_SCALES, b_terms):
    for c, f_term in zip(PRICE_SCALES, f_terms):
      edge = fixed + b_term + f_term
      user = edge if local is None else jnp.minimum(edge, local)
      value = (jnp.where(x, user, 0.0).sum(-1)
               - a * nu_b * config.b_max - c * nu_f * config.f_ser)
      best = jnp.maximum(best, value)
  # Rounding in the inversion can only push a user's minimum up: give back a margin.
  return best - 64 * jnp.finfo(best.dtype).eps * jnp.abs(best)


@jit_config
def _objective_bound(slots, offload, t_inf_edge, config):
  x = jnp.asarray(offload).astype(bool) & slots.mask
  nu_b, nu_f = resource_prices(slots, convex_allocation(slots, x, config), config)
  return _dual_bound(slots, x, config, t_inf_edge, None, nu_b, nu_f)


def objective_bound(slots: Slots, offload: Array, config: Config,
                    t_inf_edge: float | Array = 0.0) -> Array:
  """A lower bound [...] of the least slot objective for the offloading set `offload`.

  At least the miss-free convex optimum, plus delta for every user that misses even
  with the whole budget (see the module docstring). Valid for every allocation.
  """
  t_edge, _ = delays_in_slot_dtype(slots, t_inf_edge, 0.0)
  return _objective_bound(slots, offload, t_edge, config=config)


@jit_config
def _joint_objective_bound(slots, t_inf_edge, t_inf_loc, config):
  nu_b, nu_f = resource_prices(slots, convex_allocation(slots, slots.mask, config), config)
  local = local_user_costs(slots, config, t_inf_loc)
  return _dual_bound(slots, slots.mask, config, t_inf_edge, local, nu_b, nu_f)


def joint_objective_bound(slots: Slots, config: Config, t_inf_edge: float | Array = 0.0,
                          t_inf_loc: float | Array = 0.0) -> Array:
  """A lower bound [...] of the least slot objective over every offloading set too."""
  t_edge, t_loc = delays_in_slot_dtype(slots, t_inf_edge, t_inf_loc)
  return _joint_objective_bound(slots, t_edge, t_loc, config=config)


# ------------------------------------------------------------- joint offloading


def _priced_set(slots, config, t_inf_edge, local, nu_b, nu_f) -> Array:
  """Offload where the user's priced edge cost is below its local cost."""
  edge = (_unpriced_edge_cost(slots, config, t_inf_edge)
          + _priced_bandwidth(slots, nu_b, config) + _priced_compute(slots, nu_f, config))
  return slots.mask & (edge < local)


REPRICING_ROUNDS = 4
FLIP_ROUNDS = 3


def _convex_score(slots, x, config, t_inf_edge, t_inf_loc) -> Array:
  """Hard objective of the offloading set x under its (coarse) convex allocation."""
  d = convex_allocation(slots, x, config, ROUND_BISECTION_STEPS)
  return _objective(slots, x, d.b, d.f, config, t_inf_edge, t_inf_loc)


@jit_config(static_argnames=('steps',))
def _oracle_offload(slots, t_inf_edge, t_inf_loc, config, steps):
  local = local_user_costs(slots, config, t_inf_loc)
  candidates = [slots.mask, jnp.zeros_like(slots.mask)]
  x = slots.mask
  for _ in range(REPRICING_ROUNDS):
    nu_b, nu_f = resource_prices(slots, convex_allocation(slots, x, config), config)
    for scale in (1.0, 0.5):
      candidates.append(_priced_set(slots, config, t_inf_edge, local, scale * nu_b,
                                    scale * nu_f))
    x = candidates[-2]
  best_x, best_obj = candidates[0], _convex_score(slots, candidates[0], config, t_inf_edge,
                                                   t_inf_loc)
  for x in candidates[1:]:
    obj = _convex_score(slots, x, config, t_inf_edge, t_inf_loc)
    better = obj < best_obj
    best_x = jnp.where(better[..., None], x, best_x)
    best_obj = jnp.where(better, obj, best_obj)
  # Best-improvement single flips, scored the same way: one vmap over the W flips.
  flips = jnp.eye(slots.s.shape[-1], dtype=bool)
  for _ in range(FLIP_ROUNDS):
    tried = slots.mask[..., None, :] & (best_x[..., None, :] ^ flips)     # [..., W, W]
    many = jax.tree.map(lambda a: jnp.broadcast_to(a[..., None, :], tried.shape), slots)
    objs = _convex_score(many, tried, config, t_inf_edge[..., None], t_inf_loc[..., None])
    objs = jnp.where(slots.mask, objs, jnp.inf)
    pick = jnp.argmin(objs, -1)
    flip_obj = jnp.take_along_axis(objs, pick[..., None], -1)[..., 0]
    better = flip_obj < best_obj
    chosen = jnp.take_along_axis(tried, pick[..., None, None], -2)[..., 0, :]
    best_x = jnp.where(better[..., None], chosen, best_x)
    best_obj = jnp.where(better, flip_obj, best_obj)
  decision = _objective_allocation(slots, best_x, t_inf_edge, config, steps)
  # Send home users for whom the edge is dearer than local; their share goes to the rest.
  edge = edge_user_costs(slots, decision.x, decision.b, decision.f, config, t_inf_edge)
  keep = decision.x & ~(edge > local)
  regive = lambda amount, budget: proportional_split(jnp.where(keep, amount, 0.0), budget)
  kept = Decision(x=keep, b=regive(decision.b, config.b_max),
                  f=regive(decision.f, config.f_ser))
  obj_before = _objective(slots, decision.x, decision.b, decision.f, config, t_inf_edge,
                          t_inf_loc)
  obj_after = _objective(slots, kept.x, kept.b, kept.f, config, t_inf_edge, t_inf_loc)
  return _pick(obj_after <= obj_before, kept, decision)


def oracle_offload(slots: Slots, config: Config, t_inf_edge: float | Array = 0.0,
                   t_inf_loc: float | Array = 0.0, steps: int = DESCENT_STEPS) -> Decision:
  """The best joint (offloading set, allocation) found for the slot objective (case 2).

  See the module docstring; the tests compare it with the enumeration of every
  offloading set on small N.
  """
  t_edge, t_loc = delays_in_slot_dtype(slots, t_inf_edge, t_inf_loc)
  return _oracle_offload(slots, t_edge, t_loc, config=config, steps=steps)



def oracle(slots: Slots, config: Config, t_inf_edge: float | Array = 0.0,
           t_inf_loc: float | Array = 0.0) -> Decision:
  """The best decision found for the objective: case 1 (users have no CPU) everyone
  offloaded with `objective_allocation`, case 2 also the offloading set (`oracle_offload`)."""
  if config.case == 1:
    return objective_allocation(slots, slots.mask, config, t_inf_edge)
  return oracle_offload(slots, config, t_inf_edge, t_inf_loc)
