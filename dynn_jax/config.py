"""The MEC system configuration: every constant of the system model, in SI units.

Two forms of the same numbers, in the manner of gymnax's `EnvParams`:

* `MECConfig`, the front door: frozen, validated, hashable, one flag per field. As a
  static argument of `jax.jit` its numbers become compile-time constants, so changing
  any field recompiles.
* `EnvParams` (`MECConfig.params()`): the fields that fix shapes and code paths (`case`,
  the padded width) stay static; every numeric constant, `n_users` included, is a leaf
  of a pytree of arrays, traced. One compiled program then serves every value, and a
  sweep is a loop (or a vmap) over the leaves, never a recompile.

Every function of the environment, the solvers and the evaluation reads the same
attribute names from either form, so a `MECConfig` is accepted wherever a config is
taken; `jit_config` jits a function so that its `config` is static when it is a
`MECConfig` and traced when it is `EnvParams`.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

NOISE_PSD_DBM_PER_HZ = -174.0


def dbm_to_watt(dbm: float) -> float:
  return 10.0 ** (dbm / 10.0) / 1000.0


class ConfigError(ValueError):
  """A configuration value outside its allowed range."""


class Range(NamedTuple):
  """Allowed values of a numeric config field; None means unbounded."""
  low: float | None = None
  high: float | None = None
  low_inclusive: bool = True
  high_inclusive: bool = True
  integer: bool = False

  def admits(self, value) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      return False
    if self.integer and not isinstance(value, int):
      return False
    if not math.isfinite(value):
      return False
    if self.low is not None and not (value >= self.low if self.low_inclusive
                                     else value > self.low):
      return False
    return self.high is None or (value <= self.high if self.high_inclusive
                                 else value < self.high)

  def admits_array(self, value) -> jax.Array:
    """Elementwise `admits` for a (possibly traced) array of numbers (the integer
    requirement is the dtype's business there)."""
    value = jnp.asarray(value)
    ok = jnp.isfinite(value)
    if self.low is not None:
      ok &= value >= self.low if self.low_inclusive else value > self.low
    if self.high is not None:
      ok &= value <= self.high if self.high_inclusive else value < self.high
    return ok

  def __str__(self) -> str:
    lo = '-inf' if self.low is None else repr(self.low)
    hi = 'inf' if self.high is None else repr(self.high)
    opening = '[' if self.low_inclusive and self.low is not None else '('
    closing = ']' if self.high_inclusive and self.high is not None else ')'
    interval = f'{opening}{lo}, {hi}{closing}'
    return f'an integer in {interval}' if self.integer else interval


POSITIVE = Range(0.0, None, False)
# K over every distance a slot can draw: the tested corners of the solvers (see _RANGES).
SNR_COEFFICIENT_RANGE = Range(1e-12, 1e25)
NON_NEGATIVE = Range(0.0)
POSITIVE_INT = Range(1, integer=True)
NON_NEGATIVE_INT = Range(0, integer=True)
# jax.random.PRNGKey keeps 32 bits of a seed: a larger one would alias a smaller one.
SEED_RANGE = Range(0, 2 ** 32 - 1, integer=True)


def plain_numbers(config) -> None:
  """Replaces every numpy scalar field of a (frozen) config by the Python number it
  holds: np.float32(2e9) is a fine f_ser, and a config must stay hashable and print
  its values plainly. A numpy bool stays a bool (and is refused where a number is
  asked)."""
  for field in dataclasses.fields(config):
    value = getattr(config, field.name)
    if isinstance(value, np.generic):
      object.__setattr__(config, field.name, value.item())


def check_ranges(config, ranges: dict[str, Range]) -> None:
  """Raises ConfigError naming the first field outside its range (numpy scalars are
  taken as the Python numbers they hold, `plain_numbers`)."""
  plain_numbers(config)
  for name, allowed in ranges.items():
    value = getattr(config, name)
    if not allowed.admits(value):
      raise ConfigError(f'{type(config).__name__}.{name} = {value!r}; allowed range '
                        f'{allowed}')


def check_choice(config, name: str, choices) -> None:
  plain_numbers(config)
  value = getattr(config, name)
  # Same type too: 1 == True and 1.0 == 1, but neither is an allowed spelling.
  if not any(type(value) is type(c) and value == c for c in choices):
    raise ConfigError(f'{type(config).__name__}.{name} = {value!r}; allowed values: '
                      f'{", ".join(map(repr, choices))}')


class ConfigBase:
  """replace / to_dict / from_dict for the frozen config dataclasses."""

  def replace(self, **changes):
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, values: dict):
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
      raise ConfigError(f'unknown {cls.__name__} field(s) {unknown}; known: {sorted(known)}')
    return cls(**values)


# Where the solvers are tested finite in float32 and float64 (tests/test_objective.py,
# a grid of these corners); beyond them a float32 product or square overflows.
# The objective's weights (alpha, beta, delta; gamma scales w_i) up to 1e6, 1e6 times
# the defaults' order: a weighted sum of delays and energies over users then stays far
# below float32's 3.4e38 (--alpha=1e30 gave NaN bounds). Local energy mu c s f_loc^2:
# c s <= 4e15 and f_loc <= 1e13 (the server's CPU range) give mu c s <= 4 at mu <= 1e-15
# (the default is 1e-23), so E_loc <= 4e26 J, and beta E_loc summed stays finite.
_WEIGHT = Range(0.0, 1e6)
_RANGES = {
    'n_users': POSITIVE_INT,
    'b_max': Range(1.0, 1e12), 'f_ser': Range(1e3, 1e13), 'p_tx': POSITIVE,
    'noise_psd': POSITIVE, 'g0': POSITIVE, 'path_loss_exp': POSITIVE, 'l0': POSITIVE,
    'dist_min': POSITIVE, 's_avg': Range(1e-3, 1e9), 'c_avg': Range(1e-3, 1e6),
    'd_min': POSITIVE, 'f_loc_min': POSITIVE, 'f_loc_max': Range(0.0, 1e13, False),
    'alpha': _WEIGHT, 'beta': _WEIGHT, 'delta': _WEIGHT, 'gamma': Range(0.0, 1e6, False),
    'mu': Range(0.0, 1e-15), 'cycles_per_op': POSITIVE,
}


@dataclasses.dataclass(frozen=True)
class MECConfig(ConfigBase):
  """One edge server and its users; defaults are the paper's (SPEC section 1).

  Units: bits, cycles, seconds, hertz, metres, watts, joules. Case 1: users have no
  CPU and every task is offloaded. Case 2: users have CPUs and offloading is decided.
  """
  case: int = 1
  n_users: int = 30            # users per slot drawn by `sample_slots` by default
  n_max: int | None = None     # padded width of every per-user array; None -> n_users
  b_max: float = 0.5e6         # uplink bandwidth budget, Hz
  f_ser: float = 2.5e9         # server CPU budget, cycles/s
  p_tx: float = 0.1            # user transmit power, W
  noise_psd: float = dbm_to_watt(NOISE_PSD_DBM_PER_HZ)   # N0, W/Hz
  g0: float = 1e-4             # channel gain at the reference distance (-40 dB)
  path_loss_exp: float = 2.8   # h
  l0: float = 1.0              # reference distance, m (not given in the paper)
  dist_min: float = 5.0        # l_i ~ U[dist_min, dist_max], m
  dist_max: float = 500.0
  s_avg: float = 1000.0        # s_i ~ U(0, 2 s_avg], bits
  c_avg: float = 797.5         # c_i ~ U(0, 2 c_avg], cycles/bit
  d_min: float = 1e-3          # d_i ~ U[d_min, d_max], s (paper: U(0, 160 ms])
  d_max: float = 0.16
  f_loc_min: float = 0.01e9    # f_loc_i ~ U[f_loc_min, f_loc_max], Hz (case 2 only)
  f_loc_max: float = 0.15e9
  alpha: float = 1.0           # weight of delay (s) in the objective
  beta: float = 0.1            # weight of user energy (J)
  delta: float = 0.01          # cost of one missed deadline (not given in the paper)
  gamma: float = 60.0          # scale of the importance weight w_i
  mu: float = 1e-23            # local energy coefficient, J s^2 / cycle^3
  cycles_per_op: float = 1.0   # lambda: server cycles per counted network op

  def __post_init__(self):
    check_choice(self, 'case', (1, 2))
    check_ranges(self, _RANGES)
    if self.n_max is not None and (not isinstance(self.n_max, int) or self.n_max < self.n_users):
      raise ConfigError(f'MECConfig.n_max = {self.n_max!r}; must be an integer in '
                        f'[n_users={self.n_users}, inf) or None')
    for low, high in (('dist_min', 'dist_max'), ('d_min', 'd_max'), ('f_loc_min', 'f_loc_max')):
      lo, hi = getattr(self, low), getattr(self, high)
      if not (isinstance(hi, (int, float)) and math.isfinite(hi) and hi > lo):
        raise ConfigError(f'MECConfig.{high} = {hi!r}; must be finite and greater than '
                          f'{low} = {lo!r}')

    low, high = (self.snr_coefficient(d) for d in (self.dist_max, self.dist_min))
    if not (SNR_COEFFICIENT_RANGE.admits(low) and SNR_COEFFICIENT_RANGE.admits(high)):
      raise ConfigError(
          f'MECConfig: the SNR coefficient K = g0 (l0 / l)^path_loss_exp p_tx / noise_psd '
          f'spans [{low:.3g}, {high:.3g}] Hz over l in [dist_min, dist_max]; allowed range '
          f'{SNR_COEFFICIENT_RANGE} (change g0, l0, path_loss_exp, p_tx, noise_psd, '
          'dist_min or dist_max)')

  def snr_coefficient(self, distance: float) -> float:
    """K (Hz) at `distance`: the SNR at bandwidth b is K / b."""
    try:
      return self.g0 * (self.l0 / distance) ** self.path_loss_exp * self.p_tx / self.noise_psd
    except OverflowError:
      return math.inf

  @property
  def width(self) -> int:
    """Padded number of user positions in every per-user array."""
    return self.n_users if self.n_max is None else self.n_max

  @property
  def s_max(self) -> float:
    return 2.0 * self.s_avg

  @property
  def c_max(self) -> float:
    return 2.0 * self.c_avg

  def params(self, dtype=None) -> 'EnvParams':
    """The traced form of this config (see the module docstring)."""
    dtype = dtype or jnp.zeros(()).dtype
    leaves = {name: jnp.asarray(getattr(self, name), dtype) for name in SWEEPABLE
              if name != 'n_users'}
    return EnvParams(case=self.case, width=self.width,
                     n_users=jnp.asarray(self.n_users, jnp.int32), **leaves)


# Fields that fix shapes or code paths: never traced, never swept.
STATIC_FIELDS = ('case', 'n_max')
SWEEPABLE = tuple(f.name for f in dataclasses.fields(MECConfig) if f.name not in STATIC_FIELDS)


@struct.dataclass
class EnvParams:
  """MECConfig's numbers as a pytree (leaves: scalars, or [P] along a sweep axis).

  Made by `MECConfig.params()`, which has already validated every value; `sweep_params`
  stacks one field's values for a sweep.
  """
  case: int = struct.field(pytree_node=False)
  width: int = struct.field(pytree_node=False)
  n_users: Any            # int32: users per slot (<= width)
  b_max: Any
  f_ser: Any
  p_tx: Any
  noise_psd: Any
  g0: Any
  path_loss_exp: Any
  l0: Any
  dist_min: Any
  dist_max: Any
  s_avg: Any
  c_avg: Any
  d_min: Any
  d_max: Any
  f_loc_min: Any
  f_loc_max: Any
  alpha: Any
  beta: Any
  delta: Any
  gamma: Any
  mu: Any
  cycles_per_op: Any
  # Steps per episode, static (it sets scan lengths): 1, one slot per episode. gymnax's
  # time limit and RolloutWrapper read it; dynn_jax.gym.MECEnv refuses any other value.
  max_steps_in_episode: int = struct.field(pytree_node=False, default=1)

  @property
  def s_max(self):
    return 2.0 * self.s_avg

  @property
  def c_max(self):
    return 2.0 * self.c_avg


def _replace_checked(self, **changes) -> 'EnvParams':
  """`dataclasses.replace`, the new values checked like MECConfig's where they are
  concrete (`check_params`): `params.replace(f_ser=-1.0)` is an error, not a reward."""
  params = dataclasses.replace(self, **changes)
  check_params(params, tuple(changes))
  return params


# flax's struct.dataclass sets its own `replace` after the class body: overridden here.
EnvParams.replace = _replace_checked

# Pairs that must be ordered (low < high), as MECConfig checks them.
_ORDERED = (('dist_min', 'dist_max'), ('d_min', 'd_max'), ('f_loc_min', 'f_loc_max'))


def _is_concrete(value) -> bool:
  return not isinstance(value, jax.core.Tracer)


def _values(leaf) -> list:
  return [v.item() for v in np.asarray(leaf).ravel()]


def check_params(params: EnvParams, names: tuple[str, ...] | None = None) -> None:
  """ConfigError naming the first EnvParams field (of `names`, default all) whose
  concrete values leave MECConfig's range, or an ordered pair out of order. Traced
  leaves are skipped: under jit `params_violation` turns them into a NaN objective."""
  names = tuple(_RANGES) if names is None else names
  for name in names:
    allowed, leaf = _RANGES.get(name), getattr(params, name)
    if allowed is None or not _is_concrete(leaf):
      continue
    # Compared in the leaf's own dtype, as under jit: float32(1e-15) exceeds 1e-15.
    ok = np.asarray(allowed.admits_array(leaf)).ravel()
    if not ok.all():
      value = _values(leaf)[int(np.argmin(ok))]
      raise ConfigError(f'EnvParams.{name} = {value!r}; allowed range {allowed}')
  if 'n_users' in names and _is_concrete(params.n_users):
    too_many = [n for n in _values(params.n_users) if n > params.width]
    if too_many:
      raise ConfigError(f'EnvParams.n_users = {too_many[0]!r}; allowed range an integer in '
                        f'[1, {params.width}] (the padded width)')
  for low, high in _ORDERED:
    lo, hi = getattr(params, low), getattr(params, high)
    if (low in names or high in names) and _is_concrete(lo) and _is_concrete(hi):
      if not np.all(np.asarray(hi) > np.asarray(lo)):
        raise ConfigError(f'EnvParams.{high} = {_values(hi)}; must be greater than {low} = '
                          f'{_values(lo)}')


def params_violation(params: EnvParams) -> jax.Array:
  """A traced bool scalar: whether any field of `params` leaves MECConfig's range (or
  an ordered pair is out of order), at any point of a stacked sweep: a function that
  cannot raise under jit returns NaN where this is True."""
  bad = jnp.zeros((), bool)
  for name, allowed in _RANGES.items():
    bad |= ~allowed.admits_array(getattr(params, name)).all()
  for low, high in _ORDERED:
    bad |= ~(jnp.asarray(getattr(params, high)) > getattr(params, low)).all()
  return bad | (jnp.asarray(params.n_users) > params.width).any()


Config = MECConfig | EnvParams


def sweep_params(config: MECConfig, field: str, values) -> EnvParams:
  """`config.params()` with `field` stacked over `values`: every leaf gets a leading
  axis [P] (the others repeated), so the result can be vmapped or indexed per point.

  Every value is validated through `MECConfig` first; a field that fixes shapes is
  refused with the fields that can be swept.
  """
  if field not in SWEEPABLE:
    raise ConfigError(f'cannot sweep MECConfig.{field}: it fixes shapes or code paths; '
                      f'fields that can be swept: {", ".join(SWEEPABLE)}')
  values = list(values)
  if not values:
    raise ConfigError(f'sweep of MECConfig.{field}: no values given')
  points = [config.replace(**{field: v}) for v in values]
  wider = [p for p in points if p.width != config.width]
  if wider:
    raise ConfigError(f'sweep of MECConfig.{field}: value {getattr(wider[0], field)!r} '
                      f'changes the padded width {config.width}; set n_max to at least '
                      'the largest n_users swept')
  points = [p.params() for p in points]
  return jax.tree.map(lambda *leaves: jnp.stack(leaves), *points)


def point_params(params: EnvParams, index: int) -> EnvParams:
  """Point `index` of a stacked `sweep_params` (scalar leaves)."""
  return jax.tree.map(lambda leaf: leaf[index], params)


def jit_config(fn: Callable | None = None, *, static_argnames: tuple[str, ...] = ()):
  """`jax.jit` whose `config` argument is static for a `MECConfig` (compile-time
  constants, one compile per config) and traced for `EnvParams` (one compile for all
  values); both variants are built once."""
  if fn is None:
    return functools.partial(jit_config, static_argnames=static_argnames)
  static = jax.jit(fn, static_argnames=tuple(static_argnames) + ('config',))
  traced = jax.jit(fn, static_argnames=tuple(static_argnames))
  signature = inspect.signature(fn)

  @functools.wraps(fn)
  def call(*args, **kwargs):
    config = signature.bind(*args, **kwargs).arguments['config']
    return (traced if isinstance(config, EnvParams) else static)(*args, **kwargs)

  call.static_variant, call.traced_variant = static, traced
  return call
