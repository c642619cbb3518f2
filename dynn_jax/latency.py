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
import math

import jax
import jax.numpy as jnp
import numpy as np

from dynn_jax.config import MECConfig
from dynn_jax.delay import InferenceDelay
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

  mode = 'measured'

  def pipeline(self, model, mec, k, l, n_offloaded, n_users=None, *, policy: bool = True,
               scheduler: bool | None = None, static: bool = False):
    """(T_inf_edge, T_inf_loc) in s for the networks run (`dynn_jax.delay`'s interface:
    the counts of users do not change a measured time, which was taken at the padded
    width); k, l may be traced arrays, and the result has their shape and n_offloaded's.

    Concrete k, l outside 1..K, 1..L raise: indexing would clamp or wrap them into
    another exit's time. Traced ones come from the policy, which only picks valid exits.
    """
    scheduler = mec.case == 2 if scheduler is None else scheduler
    sched = self.scheduler_s if scheduler else 0.0
    if static:
      edge = jnp.asarray(self.static_s)
    else:
      for name, value, top in (('k', k, len(self.allocator_s)),
                               ('l', l, len(self.allocator_s[0]))):
        _check_exit(name, value, top)
      table = jnp.asarray(self.allocator_s)
      edge = table[jnp.asarray(k) - 1, jnp.asarray(l) - 1]
    edge = edge + sched + (self.policy_s if policy and not static else 0.0)
    shape = jnp.broadcast_shapes(jnp.shape(edge), jnp.shape(n_offloaded))
    return InferenceDelay(jnp.broadcast_to(edge, shape),
                          jnp.broadcast_to(jnp.asarray(sched, edge.dtype), shape))

  def solver(self, name: str, zeros):
    """A solver's own measured run time per slot; a solver the table lacks raises (a
    zero would count its run time as free)."""
    times = dict(self.solvers_s)
    if name not in times:
      raise ValueError(f'the latency table has no run time of {name!r} (it has '
                       f'{sorted(times)}); make it again with launch/benchmark.py '
                       '--suite=exits')
    return zeros + times[name]


def _check_exit(name: str, value, top: int) -> None:
  if isinstance(value, jax.core.Tracer):
    return
  values = np.asarray(value)
  if not np.issubdtype(values.dtype, np.integer):
    raise ValueError(f'MeasuredTable.pipeline: {name} has dtype {values.dtype}; exits are '
                     'integers')
  bad = values[(values < 1) | (values > top)]
  if bad.size:
    raise ValueError(f'MeasuredTable.pipeline: {name} = {bad.ravel()[:4].tolist()}; the '
                     f'table has exits {name} = 1..{top}')


def _seconds(value, field: str, path: str) -> float:
  """A measured time: a finite number > 0 (a NaN, zero or negative entry would give a
  NaN, zero or negative delay and no misses)."""
  if isinstance(value, bool) or not isinstance(value, (int, float)) \
      or not math.isfinite(value) or value <= 0:
    raise ValueError(f'latency table {path}: {field} = {value!r}; every measured time must '
                     'be a finite number of seconds > 0')
  return float(value)


def _allocator_s(rows, path: str) -> tuple[tuple[float, ...], ...]:
  """[K][L] seconds, rectangular and non-empty."""
  if not isinstance(rows, list) or not rows or not all(isinstance(r, list) for r in rows):
    raise ValueError(f'latency table {path}: allocator_s must be a non-empty list of rows '
                     f'(one per k), each a list of seconds (one per l)')
  width = len(rows[0])
  for k, row in enumerate(rows):
    if len(row) != width or not row:
      raise ValueError(f'latency table {path}: allocator_s is ragged or empty: row {k} '
                       f'has {len(row)} entries, row 0 has {width}; expected K rows of L')
  return tuple(tuple(_seconds(v, f'allocator_s[{k}][{l}]', path) for l, v in enumerate(row))
               for k, row in enumerate(rows))


def from_dict(data: dict, path: str = '<table>') -> MeasuredTable:
  """The table of a benchmark's JSON; every field checked (shape, finite, > 0)."""
  if not isinstance(data, dict):
    raise ValueError(f'latency table {path} is not a JSON object')
  missing = [k for k in ('allocator_s', 'static_s', 'policy_s', 'scheduler_s', 'device')
             if k not in data]
  if missing:
    raise ValueError(f'latency table {path} lacks the field(s) {missing}')
  solvers = data.get('solvers_s', {})
  device = data['device']
  if not isinstance(solvers, dict):
    raise ValueError(f'latency table {path}: solvers_s must be an object of seconds')
  if not isinstance(device, dict) or any(k not in device for k in DEVICE_KEYS):
    raise ValueError(f'latency table {path}: device must be an object with '
                     f'{list(DEVICE_KEYS)}')
  return MeasuredTable(
      allocator_s=_allocator_s(data['allocator_s'], path),
      static_s=_seconds(data['static_s'], 'static_s', path),
      policy_s=_seconds(data['policy_s'], 'policy_s', path),
      scheduler_s=_seconds(data['scheduler_s'], 'scheduler_s', path),
      solvers_s=tuple(sorted((RENAMED.get(k, k), _seconds(v, f'solvers_s.{k}', path))
                             for k, v in solvers.items())),
      device=tuple(sorted((k, str(device[k])) for k in DEVICE_KEYS)))


def load_table(path: str, model: ModelConfig, mec: MECConfig,
               allow_other_device: bool = False) -> MeasuredTable:
  """Reads a table and checks it fits this model, this width and this device."""
  data = read_json(path, 'latency table')
  if not isinstance(data, dict) or data.get('format') != TABLE_FORMAT:
    raise ValueError(f'latency table {path}: not a format-{TABLE_FORMAT} latency table')
  table = from_dict(data, path)
  shape = (len(table.allocator_s), len(table.allocator_s[0]))
  if shape[0] < model.num_experts or shape[1] < model.max_depth:
    missing = ((shape[0] + 1, 1) if shape[0] < model.num_experts else (1, shape[1] + 1))
    raise ValueError(f'latency table {path} has no exit k = {missing[0]}, l = {missing[1]}: '
                     f'it has {shape[0]} x {shape[1]} exits; the model has K x L = '
                     f'{model.num_experts} x {model.max_depth}')
  if shape != (model.num_experts, model.max_depth):
    raise ValueError(f'latency table {path} has {shape[0]} x {shape[1]} exits; the model '
                     f'has K x L = {model.num_experts} x {model.max_depth}')
  # The fields that change the work an exit does (tables written before expert_context
  # existed were measured without it).
  measured_for = {'expert_context': False, **data.get('model', {})}
  trained_for = {k: measured_for.get(k) for k in ('num_experts', 'max_depth', 'width',
                                                  'static_width', 'expert_context')}
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
