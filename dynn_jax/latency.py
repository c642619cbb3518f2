"""Measured inference-delay tables: what the benchmark writes and the evaluation reads.

A table holds the median per-slot wall time of every network on one device, at one
padded width W, for one model configuration:

  {"format": 1, "device": {"platform", "device_kind", "jax_version", ...},
   "n_users": W, "model": ModelConfig fields,
   "allocator_s": [[...L] x K], "static_s", "policy_s", "scheduler_s",
   "solvers_s": {"kkt_weighted": ..., "oracle": ..., "ga": ..., "equal_split": ...}, "dispatch_floor_s",
   "fit": {"seconds_per_op", "overhead_s"}}

It is versioned by device: loading it on another platform, device kind or jax version
is refused unless `allow_other_device` is set.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from dynn_jax.config import MECConfig
from dynn_jax.io import read_json
from dynn_jax.models import ModelConfig

TABLE_FORMAT = 1
# Method names that changed since tables were first written: old name -> current.
RENAMED = {'optimal': 'kkt_weighted'}
DEVICE_KEYS = ('platform', 'device_kind', 'jax_version')


def current_device() -> dict:
  device = jax.devices()[0]
  return {'platform': device.platform, 'device_kind': device.device_kind,
          'jax_version': jax.__version__}


@dataclasses.dataclass(frozen=True)
class MeasuredTable:
  """Hashable (a static jit argument inside `evaluation.Setting`)."""
  allocator_s: tuple[tuple[float, ...], ...]   # [K][L]
  static_s: float
  policy_s: float
  scheduler_s: float
  solvers_s: tuple[tuple[str, float], ...]
  device: tuple[tuple[str, str], ...]

  def pipeline(self, k, l, *, policy: bool, scheduler: bool, static: bool = False):
    """(T_inf_edge, T_inf_loc) in s for the networks run; k, l may be traced arrays."""
    sched = self.scheduler_s if scheduler else 0.0
    if static:
      edge = jnp.asarray(self.static_s)
    else:
      table = jnp.asarray(self.allocator_s)
      edge = table[jnp.asarray(k) - 1, jnp.asarray(l) - 1]
    edge = edge + sched + (self.policy_s if policy else 0.0)
    return edge, jnp.asarray(sched)

  def solver(self, name: str, zeros):
    """A solver's own measured run time per slot (0 if the table does not have it)."""
    return zeros + dict(self.solvers_s).get(name, 0.0)


def from_dict(data: dict, path: str = '<table>') -> MeasuredTable:
  try:
    return MeasuredTable(
        allocator_s=tuple(tuple(float(v) for v in row) for row in data['allocator_s']),
        static_s=float(data['static_s']), policy_s=float(data['policy_s']),
        scheduler_s=float(data['scheduler_s']),
        solvers_s=tuple(sorted((RENAMED.get(k, k), float(v))
                               for k, v in data.get('solvers_s', {}).items())),
        device=tuple(sorted((k, str(data['device'][k])) for k in DEVICE_KEYS)))
  except (KeyError, TypeError, ValueError) as e:
    raise ValueError(f'latency table {path} is missing or has a bad field: {e!r}') from None


def load_table(path: str, model: ModelConfig, mec: MECConfig,
               allow_other_device: bool = False) -> MeasuredTable:
  """Reads a table and checks it fits this model, this width and this device."""
  data = read_json(path, 'latency table')
  if not isinstance(data, dict) or data.get('format') != TABLE_FORMAT:
    raise ValueError(f'latency table {path}: not a format-{TABLE_FORMAT} latency table')
  table = from_dict(data, path)
  shape = (len(table.allocator_s), len(table.allocator_s[0]) if table.allocator_s else 0)
  if shape != (model.num_experts, model.max_depth):
    raise ValueError(f'latency table {path} has {shape[0]} x {shape[1]} exits; the model '
                     f'has K x L = {model.num_experts} x {model.max_depth}')
  trained_for = {k: data.get('model', {}).get(k) for k in ('num_experts', 'max_depth', 'width',
                                                           'static_width')}
  wrong = sorted(k for k, v in trained_for.items() if v != getattr(model, k))
  if wrong:
    raise ValueError(f'latency table {path} was measured for another model: fields {wrong}')
  if data.get('n_users') != mec.width:
    raise ValueError(f'latency table {path} was measured at {data.get("n_users")} user '
                     f'positions; this evaluation has {mec.width} (run the benchmark with '
                     f'--n_users={mec.width})')
  here = current_device()
  other = {k: (data['device'].get(k), here[k]) for k in DEVICE_KEYS
           if str(data['device'].get(k)) != str(here[k])}
  if other and not allow_other_device:
    raise ValueError(f'latency table {path} was measured on another device '
                     f'({", ".join(f"{k}: {a!r} here {b!r}" for k, (a, b) in other.items())});'
                     ' re-run the benchmark here or pass --allow_other_device')
  return table
