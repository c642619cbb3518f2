"""The MEC environment as pure functions over batches of slots.

Every per-user array has shape [..., W] where W = config.width (the padded number of
users); `Slots.mask` marks the real users. Leading axes are free: one slot is [W], a
batch is [B, W]. Nothing here loops over users or slots, so everything jits and vmaps.

This module owns the sampling, the physics (delays, energies) and every cost formula:
`user_cost` (alpha T + beta E + delta 1{T > d}, or a smoothed miss), the per-user edge
and local costs built on it, `slot_costs`, and shares of the budgets -> `Decision`
(`decision_from_shares`). Solvers, networks and training call these rather than write
a formula again. It imports only `dynn_jax.config`.

Zero-size tasks take no time anywhere; a zero-workload task takes no compute time but
still has to be transmitted when offloaded. An offloaded task with s > 0 and no
bandwidth (or c s > 0 and no CPU) takes +inf and misses its deadline; never NaN. The
one NaN is deliberate: an impossible decision scored under jit (`invalid_slots`; eager
calls raise ValueError instead), so that it can never pass for a valid number.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dynn_jax.config import Config, EnvParams, check_params, params_violation

Array = jax.Array
_LN2 = math.log(2.0)


class Slots(NamedTuple):
  """A batch of slots. Units: bits, cycles/bit, s, m, Hz."""
  s: Array       # task size
  c: Array       # workload per bit
  d: Array       # deadline
  l: Array       # distance to the server
  f_loc: Array   # local CPU (0 in case 1: users cannot compute)
  mask: Array    # bool, True for a real user

  @property
  def n_users(self) -> Array:
    return self.mask.sum(-1)


class Decision(NamedTuple):
  """What a method decides for a batch of slots (same shapes as `Slots`)."""
  x: Array   # bool: offloaded
  b: Array   # uplink bandwidth, Hz
  f: Array   # server CPU, cycles/s


class Costs(NamedTuple):
  """Per-user quantities [..., W] (zero for padded users) and per-slot metrics [...]."""
  t_tra: Array
  t_com: Array
  t_loc: Array
  t_inf: Array
  delay: Array          # service delay T_i
  energy: Array         # user energy
  miss: Array           # bool, T_i > d_i
  weight: Array         # importance weight w_i
  cost: Array           # user's share of the objective
  objective: Array      # [...] sum of `cost`
  mean_delay: Array     # [...] s, mean over real users
  miss_ratio: Array     # [...] in [0, 1]
  total_energy: Array   # [...] J, summed over users
  weighted_delay: Array # [...] sum_i w_i (T_tra_i + T_com_i) over offloaded users
  inference_share: Array  # [...] sum T_inf / sum T_i


def safe_div(num: Array, den: Array) -> Array:
  """num / den with 0 / 0 = 0 and finite gradients wherever the value is finite."""
  zero_num = num == 0
  den_ok = jnp.where(zero_num | (den == 0), 1.0, den)
  value = jnp.where(zero_num, 0.0, num / den_ok)
  return jnp.where(~zero_num & (den == 0), jnp.inf, value)


def snr_coefficient(l: Array, config: Config) -> Array:
  """K_i (Hz) such that the SNR at bandwidth b is K_i / b."""
  gain = config.g0 * (config.l0 / l) ** config.path_loss_exp
  return gain * config.p_tx / config.noise_psd


def uplink_rate(b: Array, l: Array, config: Config) -> Array:
  """Shannon rate b log2(1 + K / b) in bit/s; 0 at b = 0 with a finite gradient."""
  k = snr_coefficient(l, config)
  positive = b > 0
  b_safe = jnp.where(positive, b, 1.0)
  return jnp.where(positive, b_safe * jnp.log1p(k / b_safe) / _LN2, 0.0)


def transmission_delay(s: Array, b: Array, l: Array, config: Config) -> Array:
  return safe_div(s, uplink_rate(b, l, config))


def compute_delay(s: Array, c: Array, f: Array) -> Array:
  return safe_div(c * s, f)


def importance_weight(slots: Slots, config: Config) -> Array:
  """w_i = gamma (c_i / c_max)(s_i / s_max) / d_i[ms]; zero for padded users."""
  w = config.gamma * (slots.c / config.c_max) * (slots.s / config.s_max) / (slots.d * 1e3)
  return jnp.where(slots.mask, w, 0.0)


def _unit_halves(key: Array, shape: tuple[int, ...], count: int, dtype) -> list[Array]:
  """`count` uniform fields on [0, 1], 16 bits each, two per random 32-bit word.

  Random bits bound sampling throughput (threefry); 16-bit resolution is far below
  any physical meaning here (s: 0.03 bit, d: 2.4 us, l: 8 mm at the defaults), and
  halving the words drawn doubles the slots sampled per second.
  """
  words = jax.random.bits(key, ((count + 1) // 2,) + shape, jnp.uint32)
  halves = [(w & 0xFFFF) for w in words] + [(w >> 16) for w in words]
  return [h.astype(dtype) / 65535.0 for h in halves[:count]]


def _open_low(u: Array) -> Array:
  """[0, 1] grid -> (0, 1]: the lowest level becomes the smallest step above 0."""
  return jnp.maximum(u, 1.0 / 65535.0)


def sample_slots(key: Array, config: Config, batch: int | None = None,
                 n_users: int | Array | None = None, dtype=None) -> Slots:
  """Draws `batch` slots ([batch, W] arrays; [W] when batch is None).

  `n_users` (default config.n_users) may be a traced integer, so one compiled function
  serves every N up to config.width. Users beyond it are padded out by the mask.
  """
  dtype = dtype or jnp.zeros(()).dtype  # float64 under jax_enable_x64
  shape = (config.width,) if batch is None else (batch, config.width)
  n = config.n_users if n_users is None else n_users
  if not isinstance(n, jax.core.Tracer) and np.size(n):
    bad = [v for v in (np.min(n), np.max(n)) if not 0 <= v <= config.width]
    if bad:  # the mask would silently clip it to the width
      raise ValueError(f'sample_slots: n_users = {bad[0].item()!r} is out of range; '
                       f'allowed range [0, {config.width}] (the padded width, '
                       'MECConfig.n_max)')
  mask = jnp.broadcast_to(jnp.arange(config.width) < n, shape)
  u = _unit_halves(key, shape, 4 if config.case == 1 else 5, dtype)
  s = config.s_max * _open_low(u[0])
  c = config.c_max * _open_low(u[1])
  d = config.d_min + (config.d_max - config.d_min) * u[2]
  l = config.dist_min + (config.dist_max - config.dist_min) * u[3]
  if config.case == 1:
    f_loc = jnp.zeros(shape, dtype)
  else:
    f_loc = config.f_loc_min + (config.f_loc_max - config.f_loc_min) * u[4]
  zero = jnp.zeros((), dtype)
  pad = lambda a: jnp.where(mask, a, zero)
  # Padded users get harmless finite values so that no formula sees 0/0 or l = 0.
  return Slots(s=pad(s), c=pad(c), d=jnp.where(mask, d, config.d_max),
               l=jnp.where(mask, l, config.dist_max), f_loc=pad(f_loc), mask=mask)


# Ranges that map every feature into [0, 1] (see WORKSPACE.md, "Features").
def feature_ranges(config: Config) -> tuple[tuple[float, float], ...]:
  f_lo, f_hi = (0.0, 1.0) if config.case == 1 else (config.f_loc_min, config.f_loc_max)
  return ((0.0, config.s_max), (0.0, config.c_max), (config.d_min, config.d_max),
          (config.dist_min, config.dist_max), (f_lo, f_hi))


def normalized_features(slots: Slots, config: Config) -> Array:
  """u_i = (s, c, d, l, f_loc) mapped to [0, 1]: [..., W, 5]; zero for padded users."""
  columns = []
  for value, (lo, hi) in zip((slots.s, slots.c, slots.d, slots.l, slots.f_loc),
                             feature_ranges(config)):
    columns.append((value - lo) / (hi - lo))
  u = jnp.stack(columns, -1)
  return jnp.where(slots.mask[..., None], u, 0.0)


NUM_FEATURES = 5


def edge_delays(slots: Slots, b: Array, f: Array, config: Config) -> tuple[Array, Array]:
  """(T_tra, T_com) for every user as if offloaded with bandwidth b and CPU f."""
  return transmission_delay(slots.s, b, slots.l, config), compute_delay(slots.s, slots.c, f)


def local_delay(slots: Slots) -> Array:
  return safe_div(slots.c * slots.s, slots.f_loc)


def local_energy(slots: Slots, config: Config) -> Array:
  """E_loc_i = mu c_i s_i f_loc_i^2."""
  return config.mu * slots.c * slots.s * slots.f_loc ** 2


def weighted_edge_delay(slots: Slots, x: Array, b: Array, f: Array,
                        config: Config) -> Array:
  """sum_i w_i (T_tra_i + T_com_i) over offloaded real users: [...]."""
  t_tra, t_com = edge_delays(slots, b, f, config)
  take = jnp.asarray(x).astype(bool) & slots.mask
  return _weighted_sum(importance_weight(slots, config), take, t_tra + t_com)


def _scaled(weight, value: Array) -> Array:
  if isinstance(weight, (int, float)):
    return weight * value if weight else jnp.zeros(value.shape)
  return jnp.where(weight == 0, 0.0, weight * value)


def _product(weight, value: Array) -> Array:
  return weight * value


def user_cost(config: Config, delay: Array, energy: Array | None = None,
              late: Array | None = None, *, energy_weight=None,
              zero_weight_drops: bool = True) -> Array:
  """alpha T + beta E + delta late per user, unmasked: the one cost formula of SPEC
  section 1, which slot costs, solvers and training all evaluate here.

  `late` is the miss indicator 1{T > d} (bool), a smoothed one in [0, 1] (a sigmoid
  with a temperature, for gradients), or None: no miss term (SPEC section 4's training
  costs). `energy` None leaves the energy term out (the part of a cost no allocation
  changes). `energy_weight` replaces beta where E enters as a time times a power folded
  into the weight, (beta p_tx) T_tra: that is the order those callers round in.
  With `zero_weight_drops` a zero weight drops its term even where the quantity is +inf
  (0 * inf would be NaN), as the scored objective must; without it the plain product
  stays, as the solvers (which count that NaN as +inf) and training have always
  computed it, so that their numbers do not move.
  """
  scaled = _scaled if zero_weight_drops else _product
  cost = scaled(config.alpha, delay)
  if energy is not None:
    cost = cost + scaled(config.beta if energy_weight is None else energy_weight, energy)
  return cost if late is None else cost + scaled(config.delta, late)


def expand_to_users(value, like: Array) -> Array:
  """A per-slot value [...] as `like`'s dtype with a user axis: [..., 1]."""
  return jnp.asarray(value, like.dtype)[..., None]


def edge_user_costs(slots: Slots, x: Array, b: Array, f: Array, config: Config,
                    t_inf_edge: Array, temperature: Array | None = None) -> Array:
  """Each offloaded user's share of the objective [..., W] (0 elsewhere).

  With a temperature the miss indicator is sigmoid((T - d) / (temperature d)); without
  it the hard indicator of `slot_costs` (same arithmetic, so the same misses).
  """
  t_tra, t_com = edge_delays(slots, b, f, config)
  delay = expand_to_users(t_inf_edge, slots.s) + (t_tra + t_com)   # as slot_costs adds them
  if temperature is None:
    late = (delay > slots.d).astype(delay.dtype)
  else:
    late = jax.nn.sigmoid((delay - slots.d)
                          / (expand_to_users(temperature, slots.s) * slots.d))
  cost = user_cost(config, delay, t_tra, late, energy_weight=config.beta * config.p_tx,
                   zero_weight_drops=False)
  return jnp.where(x, cost, 0.0)


def local_user_costs(slots: Slots, config: Config, t_inf_loc: Array) -> Array:
  """Each real user's share of the objective if it computes locally [..., W]."""
  delay = expand_to_users(t_inf_loc, slots.s) + local_delay(slots)
  cost = user_cost(config, delay, local_energy(slots, config), delay > slots.d,
                   zero_weight_drops=False)
  return jnp.where(slots.mask, cost, 0.0)


def decision_from_shares(x: Array, b_share: Array, f_share: Array, config: Config
                         ) -> Decision:
  """Shares of the two budgets -> `Decision`: b = b_share b_max, f = f_share f_ser.

  The shares are used as given: normalising them over x, if needed, is the caller's.
  """
  return Decision(x=x, b=b_share * config.b_max, f=f_share * config.f_ser)


def _weighted_sum(w: Array, take: Array, t: Array) -> Array:
  # Zero-weight users drop out even where t is +inf (0 * inf would be NaN).
  return jnp.where(take & (w > 0), w * t, 0.0).sum(-1)


# Relative slack on the budgets: shares normalised in float32 sum to 1 within a few ulps.
BUDGET_SLACK = 1e-4


def _is_traced(*trees) -> bool:
  return any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(trees))


def check_decision_shapes(slots: Slots, decision: Decision) -> None:
  """ValueError naming the field of a decision whose shape is not the slots' (leading
  axes of its own allowed: several decisions for the same slots). Shapes are static,
  so this holds under jit too: a one-slot decision is never broadcast over a batch."""
  shape = tuple(np.broadcast_shapes(*(jnp.shape(a) for a in slots)))
  for name, value in zip(Decision._fields, decision):
    got = tuple(jnp.shape(value))
    if len(got) < len(shape) or got[len(got) - len(shape):] != shape:
      raise ValueError(f'decision.{name} has shape {got}; expected the slots\' shape '
                       f'{shape}, optionally after leading axes of its own')


def decision_violations(slots: Slots, decision: Decision, config: Config,
                        t_inf_edge=0.0, t_inf_loc=0.0) -> list[tuple]:
  """What makes a decision impossible, per rule: (field, limit name, limit, value,
  violated), `violated` bool per slot [...] (the delays: as given). At offloaded real
  users b and f must be >= 0 (a NaN is a violation) and sum within the budgets; the
  inference delays must be >= 0."""
  take = jnp.asarray(decision.x).astype(bool) & slots.mask
  rules = []
  for field, amount, limit_name in (('b', decision.b, 'b_max'), ('f', decision.f, 'f_ser')):
    amount = jnp.asarray(amount)
    lowest = jnp.where(take, amount, jnp.inf).min(-1)   # NaN if any share is NaN
    rules.append((f'decision.{field}', None, 0.0, lowest, ~(lowest >= 0)))
    total = jnp.where(take, amount, 0.0).sum(-1)
    limit = getattr(config, limit_name)
    rules.append((f'decision.{field}', limit_name, limit, total,
                  total > limit * (1.0 + BUDGET_SLACK)))
  for name, t in (('t_inf_edge', t_inf_edge), ('t_inf_loc', t_inf_loc)):
    t = jnp.asarray(t)
    rules.append((name, None, 0.0, t, ~(t >= 0)))
  return rules


def _raise_first_violation(rules: list[tuple]) -> None:
  for field, limit_name, limit, value, violated in rules:
    violated = np.asarray(violated)
    if not violated.any():
      continue
    where = tuple(int(i) for i in np.argwhere(violated)[0])
    found = np.broadcast_to(np.asarray(value), violated.shape)[where]
    at = f' at slot {where}' if where else ''
    if limit_name is None:
      raise ValueError(f'slot_costs: {field} = {found:.6g}{at}; must be >= 0 (offloaded '
                       'users\' resources, inference delays)')
    raise ValueError(f'slot_costs: {field} sums to {found:.6g} over the offloaded users{at}; '
                     f'must be <= {limit_name} = {float(np.max(limit)):.6g} (relative slack '
                     f'{BUDGET_SLACK:g})')


def invalid_slots(slots: Slots, decision: Decision, config: Config, t_inf_edge=0.0,
                  t_inf_loc=0.0) -> Array | None:
  """Where `slot_costs` cannot score the decision. Concrete inputs (eager calls) are
  checked here: ValueError naming the field (ConfigError for EnvParams out of range),
  and None. Traced ones cannot raise: a bool [...] (or scalar) marking the slots whose
  objective is to be NaN, rather than a valid-looking number."""
  check_decision_shapes(slots, decision)
  rules = decision_violations(slots, decision, config, t_inf_edge, t_inf_loc)
  params = config if isinstance(config, EnvParams) else None
  if not _is_traced(slots, decision, t_inf_edge, t_inf_loc, params):
    if params is not None:  # first: the budgets the rules compare with must be sane
      check_params(params)
    _raise_first_violation(rules)
    return None
  invalid = functools.reduce(jnp.logical_or, [rule[-1] for rule in rules])
  return invalid if params is None else invalid | params_violation(params)


def slot_costs(slots: Slots, decision: Decision, config: Config,
               t_inf_edge: Array | float = 0.0, t_inf_loc: Array | float = 0.0) -> Costs:
  """Every delay, energy, miss and the objective of SPEC section 1.

  `t_inf_edge` / `t_inf_loc` (s) are the inference delays seen by offloaded / local
  users; scalars or arrays broadcastable to the batch shape [...].

  An impossible decision (`invalid_slots`: shapes other than the slots', negative or
  NaN resources at offloaded users, more than the budgets, negative inference delays,
  EnvParams out of MECConfig's ranges) raises ValueError when the inputs are concrete;
  under jit it makes the slot's objective NaN.
  """
  invalid = invalid_slots(slots, decision, config, t_inf_edge, t_inf_loc)
  mask = slots.mask
  x = jnp.asarray(decision.x).astype(bool) & mask
  t_tra, t_com = edge_delays(slots, decision.b, decision.f, config)
  t_loc = local_delay(slots)
  t_inf = jnp.where(x, jnp.asarray(t_inf_edge)[..., None], jnp.asarray(t_inf_loc)[..., None])
  t_inf = jnp.where(mask, t_inf, 0.0)
  # where, not x * a + (1 - x) * b: the unused branch may be +inf.
  delay = jnp.where(mask, t_inf + jnp.where(x, t_tra + t_com, t_loc), 0.0)
  e_edge = config.p_tx * t_tra
  e_loc = local_energy(slots, config)
  energy = jnp.where(mask, jnp.where(x, e_edge, e_loc), 0.0)
  miss = mask & (delay > slots.d)
  cost = jnp.where(mask, user_cost(config, delay, energy, miss), 0.0)
  n = jnp.maximum(mask.sum(-1), 1)
  w = importance_weight(slots, config)
  weighted = _weighted_sum(w, x, t_tra + t_com)
  total_delay = delay.sum(-1)
  return Costs(
      t_tra=jnp.where(x, t_tra, 0.0), t_com=jnp.where(x, t_com, 0.0),
      t_loc=jnp.where(mask & ~x, t_loc, 0.0), t_inf=t_inf, delay=delay, energy=energy,
      miss=miss, weight=w, cost=cost,
      objective=cost.sum(-1) if invalid is None else jnp.where(invalid, jnp.nan, cost.sum(-1)),
      mean_delay=total_delay / n, miss_ratio=miss.sum(-1) / n,
      total_energy=energy.sum(-1), weighted_delay=weighted,
      inference_share=safe_div(t_inf.sum(-1), total_delay))
