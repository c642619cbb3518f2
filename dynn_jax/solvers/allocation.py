"""Resource allocation for a fixed offloading set: the exact optimum and equal split.

The optimum minimises sum_i w_i (T_tra_i + T_com_i) subject to sum b_i = b_max and
sum f_i = f_ser over the offloaded users. The problem separates:

* compute: min sum a_i / f_i with a_i = w_i c_i s_i gives f_i = f_ser sqrt(a_i) / sum sqrt(a_j).
* bandwidth: with K_i the SNR coefficient (SNR = K_i / b_i) and t_i = K_i / b_i, the KKT
  condition -d/db [w_i s_i / r_i(b_i)] = nu becomes psi(t_i) = nu q_i with
  q_i = K_i^2 / (w_i s_i ln 2) and the single increasing function
  psi(t) = t^2 (ln(1+t) - t/(1+t)) / ln(1+t)^2.
  For a multiplier nu every t_i follows from inverting psi (Newton in log space), and
  nu is found by bisection on log nu so that sum_i K_i / t_i = b_max.

Users that are not offloaded, padded, or have zero weight get nothing: their weighted
cost is zero whatever they get. Budgets are met exactly (final rescale).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dynn_jax.config import Config
from dynn_jax.env import Decision, Slots, importance_weight, snr_coefficient

Array = jax.Array

BISECTION_STEPS = 48
NEWTON_STEPS_PER_BISECTION = 2
NEWTON_STEPS_INITIAL = 8


def _log_psi_and_slope(u: Array) -> tuple[Array, Array]:
  """log psi(e^u) and its derivative in u (between 1 and 2)."""
  t = jnp.exp(u)
  log1p_t = jnp.log1p(t)
  small = t < 1e-3
  # ln(1+t) - t/(1+t) cancels for small t, and t^2 underflows at extreme SNRs (legal
  # configs reach t ~ 1e-25): take the logs of the series with the powers of t apart.
  large_gap = jnp.where(small, 1.0, log1p_t - t / (1.0 + t))
  log_gap = jnp.where(small, 2.0 * u + jnp.log(0.5 - t * (2.0 / 3.0 - 0.75 * t)),
                      jnp.log(large_gap))
  log_log1p = jnp.where(small, u + jnp.log1p(-t * (0.5 - t / 3.0)),
                        jnp.log(jnp.where(small, 1.0, log1p_t)))
  log_psi = 2.0 * u + log_gap - 2.0 * log_log1p
  # d/du [log t^2] = 2; d/du log(gap) = t * t/(1+t)^2 / gap; d/du log ln(1+t) = t/((1+t) ln(1+t))
  # (written (t / (1 + t))^2: t^2 overflows at high SNR)
  small_ratio = jnp.where(small, 2.0 - 4.0 / 3.0 * t, (t / (1.0 + t)) ** 2 / large_gap)
  small_log = jnp.where(small, 1.0 - 0.5 * t,
                        t / ((1.0 + t) * jnp.where(small, 1.0, log1p_t)))
  slope = 2.0 + small_ratio - 2.0 * small_log
  return log_psi, slope


def invert_log_psi(target: Array, u: Array, steps: int) -> Array:
  """u = log t with log psi(t) = target: `steps` Newton steps from u (shared with the
  objective's dual bound, which prices bandwidth by the same KKT condition)."""
  def body(_, u):
    value, slope = _log_psi_and_slope(u)
    return u - (value - target) / slope
  return jax.lax.fori_loop(0, steps, body, u)


def initial_log_t(target: Array) -> Array:
  """A starting point for `invert_log_psi`, from the asymptotes of psi."""
  # psi(t) ~ t^2 / 2 for small t and ~ t^2 / ln t for large t.
  large = 0.5 * (target + jnp.log(jnp.maximum(0.5 * target, 1.0)))
  return jnp.where(target < 0.0, 0.5 * (target + jnp.log(2.0)), large)


def _optimal_bandwidth(ws: Array, k: Array, active: Array, b_max: float,
                       bisection_steps: int = BISECTION_STEPS) -> Array:
  """Bandwidth over one slot's users ([W]); inactive users get 0."""
  dtype = k.dtype
  ws_safe = jnp.where(active, ws, 1.0)
  k_safe = jnp.where(active, k, 1.0)
  log_q = 2.0 * jnp.log(k_safe) - jnp.log(ws_safe) - jnp.log(jnp.log(2.0)).astype(dtype)
  n_active = jnp.maximum(active.sum(), 1)

  def tau_at(b):  # log nu at which user i takes bandwidth b
    return _log_psi_and_slope(jnp.log(k_safe / b))[0] - log_q

  # At the optimum every b_i <= b_max and the largest b_i >= b_max / n.
  low = jnp.max(jnp.where(active, tau_at(b_max), -jnp.inf))
  high = jnp.max(jnp.where(active, tau_at(b_max / n_active), -jnp.inf))
  u = invert_log_psi(low + log_q, initial_log_t(low + log_q), NEWTON_STEPS_INITIAL)

  def bisect(_, carry):
    low, high, u = carry
    mid = 0.5 * (low + high)
    u = invert_log_psi(mid + log_q, u, NEWTON_STEPS_PER_BISECTION)
    total = jnp.where(active, k_safe * jnp.exp(-u), 0.0).sum()
    too_much = total > b_max  # bandwidth falls as nu rises
    return jnp.where(too_much, mid, low), jnp.where(too_much, high, mid), u

  low, high, u = jax.lax.fori_loop(0, bisection_steps, bisect, (low, high, u))
  u = invert_log_psi(0.5 * (low + high) + log_q, u, NEWTON_STEPS_PER_BISECTION)
  b = jnp.where(active, k_safe * jnp.exp(-u), 0.0)
  return b * (b_max / jnp.where(active.any(), b.sum(), 1.0))


def proportional_split(share: Array, total: float) -> Array:
  """`total` split over users in proportion to `share` [..., W]; 0 where all are 0."""
  s = share.sum(-1, keepdims=True)
  return jnp.where(s > 0, total * share / jnp.where(s > 0, s, 1.0), 0.0)


def weighted_allocation(slots: Slots, offload: Array, tra_weight: Array, com_weight: Array,
                        config: Config, bisection_steps: int = BISECTION_STEPS) -> Decision:
  """Exact minimiser of sum_i tra_weight_i T_tra_i + com_weight_i T_com_i over the
  offloaded users (weights >= 0, broadcastable to [..., W]).

  The compute share is sqrt(com_weight_i c_i s_i) normalised; the bandwidth follows the
  KKT inversion of the module docstring with w_i s_i replaced by tra_weight_i s_i. A
  user whose weight is zero gets nothing of that resource. Fewer `bisection_steps`
  trade accuracy of the multiplier for speed (budgets are still met exactly).
  """
  x = jnp.asarray(offload).astype(bool) & slots.mask
  zero = jnp.zeros_like(slots.s)
  tra_weight, com_weight = zero + tra_weight, zero + com_weight
  f = proportional_split(jnp.where(x & (com_weight > 0),
                                   jnp.sqrt(com_weight * slots.c * slots.s), 0.0),
                         config.f_ser)
  k = snr_coefficient(slots.l, config)
  ws = tra_weight * slots.s
  solve = lambda ws, k, a: _optimal_bandwidth(ws, k, a, config.b_max, bisection_steps)
  for _ in range(ws.ndim - 1):
    solve = jax.vmap(solve)
  b = solve(ws, k, x & (ws > 0))
  return Decision(x=x, b=b, f=f)


def optimal_allocation(slots: Slots, offload: Array, config: Config) -> Decision:
  """Exact minimiser of the weighted edge delay for the offloading set `offload`.

  This is the paper's training target, sum_i w_i (T_tra_i + T_com_i), not the objective
  of `slot_costs` (see `dynn_jax.solvers.objective_allocation` for that). Works on any
  leading batch shape; jit with `config` static.
  """
  w = importance_weight(slots, config)
  return weighted_allocation(slots, offload, w, w, config)


def equal_split(slots: Slots, offload: Array, config: Config) -> Decision:
  """b_max and f_ser split evenly over the offloaded users."""
  x = jnp.asarray(offload).astype(bool) & slots.mask
  share = x.astype(slots.s.dtype)
  return Decision(x=x, b=proportional_split(share, config.b_max),
                  f=proportional_split(share, config.f_ser))
