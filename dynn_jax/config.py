"""The MEC system configuration: every constant of the system model, in SI units.

`MECConfig` is frozen and hashable so that it can be a static argument of `jax.jit`:
its numbers become compile-time constants. Changing any field recompiles; the number
of active users is *not* a field that changes shapes (see `n_max` and the user mask).
"""

from __future__ import annotations

import dataclasses
import math

NOISE_PSD_DBM_PER_HZ = -174.0


def dbm_to_watt(dbm: float) -> float:
  return 10.0 ** (dbm / 10.0) / 1000.0


class ConfigError(ValueError):
  """A configuration value outside its allowed range."""


# field -> (low, high, low_inclusive, high_inclusive); None means unbounded.
_RANGES = {
    'n_users': (1, None, True, True),
    'b_max': (0.0, None, False, True),
    'f_ser': (0.0, None, False, True),
    'p_tx': (0.0, None, False, True),
    'noise_psd': (0.0, None, False, True),
    'g0': (0.0, None, False, True),
    'path_loss_exp': (0.0, None, False, True),
    'l0': (0.0, None, False, True),
    'dist_min': (0.0, None, False, True),
    's_avg': (0.0, None, False, True),
    'c_avg': (0.0, None, False, True),
    'd_min': (0.0, None, False, True),
    'f_loc_min': (0.0, None, False, True),
    'alpha': (0.0, None, True, True),
    'beta': (0.0, None, True, True),
    'delta': (0.0, None, True, True),
    'gamma': (0.0, None, False, True),
    'mu': (0.0, None, True, True),
    'cycles_per_op': (0.0, None, False, True),
}


def _describe(low, high, low_inc, high_inc) -> str:
  lo = '-inf' if low is None else repr(low)
  hi = 'inf' if high is None else repr(high)
  return f'{"[" if low_inc else "("}{lo}, {hi}{"]" if high_inc else ")"}'


@dataclasses.dataclass(frozen=True)
class MECConfig:
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
    if self.case not in (1, 2):
      raise ConfigError(f'MECConfig.case = {self.case!r}; allowed values: 1 or 2')
    for name, (low, high, low_inc, high_inc) in _RANGES.items():
      value = getattr(self, name)
      if name == 'n_users' and (not isinstance(value, int) or isinstance(value, bool)):
        raise ConfigError(f'MECConfig.n_users = {value!r}; must be an integer in [1, inf)')
      ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
      if ok and low is not None:
        ok = value >= low if low_inc else value > low
      if ok and high is not None:
        ok = value <= high if high_inc else value < high
      if not ok:
        raise ConfigError(f'MECConfig.{name} = {value!r}; allowed range '
                          f'{_describe(low, high, low_inc, high_inc)}')
    if self.n_max is not None and (not isinstance(self.n_max, int) or self.n_max < self.n_users):
      raise ConfigError(f'MECConfig.n_max = {self.n_max!r}; must be an integer in '
                        f'[n_users={self.n_users}, inf) or None')
    for low, high in (('dist_min', 'dist_max'), ('d_min', 'd_max'), ('f_loc_min', 'f_loc_max')):
      lo, hi = getattr(self, low), getattr(self, high)
      if not (isinstance(hi, (int, float)) and math.isfinite(hi) and hi > lo):
        raise ConfigError(f'MECConfig.{high} = {hi!r}; must be finite and greater than '
                          f'{low} = {lo!r}')

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

  def replace(self, **changes) -> 'MECConfig':
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, values: dict) -> 'MECConfig':
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
      raise ConfigError(f'unknown MECConfig field(s) {unknown}; known: {sorted(known)}')
    return cls(**values)
