"""The paper's studies as resumable *points*: sweeps, the model-size study (Fig. 4) and
the op / inference-share study (Fig. 10, 11). Each point is one JSON file under
`results_dir/points/`; a point already written is read back, never recomputed, so an
interrupted reproduction continues where it stopped.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dynn_jax import ops
from dynn_jax.config import MECConfig
from dynn_jax.env import importance_weight, normalized_features, sample_slots
from dynn_jax.evaluation import Params, Setting, evaluate
from dynn_jax.io import cached_json
from dynn_jax.models import ModelConfig, all_subnetworks
from dynn_jax.training import weighted_delays

# (MECConfig field or 'n_active', values in SI, label, unit scale for display)
SWEEPS = {
    'data': ('s_avg', [500.0, 1000.0, 1500.0, 2000.0, 2500.0, 3000.0, 3500.0, 4000.0],
             'mean data size (kbit)', 1e-3),
    'workload': ('c_avg', [400.0, 600.0, 797.5, 1000.0, 1200.0, 1400.0, 1600.0],
                 'mean workload (cycles/bit)', 1.0),
    'tasks': ('n_active', [10, 15, 20, 25, 30, 35, 40, 45], 'number of tasks', 1.0),
    'cpu': ('f_ser', [1.0e9, 1.5e9, 2.0e9, 2.5e9, 3.0e9, 3.5e9, 4.0e9, 4.5e9],
            'server CPU (GHz)', 1e-9),
    'data_large': ('s_avg', [3000.0, 4000.0, 5000.0, 6000.0, 7000.0, 8000.0, 9000.0, 10000.0],
                   'mean data size (kbit)', 1e-3),
    # Beyond the paper: the weight of a miss decides which yardstick wins (SPEC section 7).
    'delta': ('delta', [0.0, 0.005, 0.01, 0.02, 0.05, 0.1], 'miss weight delta', 1.0),
}
METHODS = {
    1: ('policy_moe', 'fix_width', 'fix_depth', 'fix_moe', 'static', 'kkt_weighted', 'equal_split',
        'oracle'),
    2: ('pmrl', 'fix_moe', 'static', 'kkt_weighted', 'random', 'local', 'oracle'),
}
LARGE_DATA_METHODS = ('policy_moe', 'fix_moe', 'static')
# The objective-trained networks' methods, stored as OBJECTIVE_PREFIX + name.
OBJECTIVE_METHODS = {1: ('policy_moe', 'fix_moe', 'static'), 2: ('pmrl', 'fix_moe', 'static')}
OBJECTIVE_PREFIX = 'obj_'
CASE_SWEEPS = {1: ('data', 'workload', 'tasks', 'cpu', 'data_large', 'delta'),
               2: ('data', 'workload', 'tasks', 'cpu')}


@dataclasses.dataclass(frozen=True)
class Networks:
  params: Params
  mec: MECConfig
  model: ModelConfig


def point_path(results_dir: str, name: str) -> str:
  return os.path.join(results_dir, 'points', f'{name}.json')


def cached(results_dir: str, name: str, compute) -> Any:
  """The point's JSON if it exists, else compute it and write it atomically."""
  return cached_json(point_path(results_dir, name), compute, f'point {name}')


def sweep_point(nets: Networks, sweep: str, value, methods, slots: int, ga_slots: int,
                seed: int, delay=None, objective: Networks | None = None,
                objective_methods=()) -> dict:
  """Every method at one value of the sweep, on the same slots; the objective-trained
  networks' methods (if given) run on those slots too, under OBJECTIVE_PREFIX."""
  field, _, _, _ = SWEEPS[sweep]
  mec = nets.mec if field == 'n_active' else nets.mec.replace(**{field: value})
  n_users = value if field == 'n_active' else None
  setting = Setting(mec=mec, model=nets.model, feature_config=nets.mec, delay=delay)
  out = evaluate(setting, methods, nets.params, slots=slots, seed=seed, n_users=n_users)
  if objective is not None and objective_methods:
    obj_setting = Setting(mec=mec, model=objective.model, feature_config=objective.mec,
                          delay=delay)
    theirs = evaluate(obj_setting, objective_methods, objective.params, slots=slots,
                      seed=seed, n_users=n_users)
    out.update({OBJECTIVE_PREFIX + name: theirs[name] for name in objective_methods})
  if ga_slots:
    ga = evaluate(setting, ('ga',), nets.params, slots=ga_slots, seed=seed, n_users=n_users)
    out['ga'] = ga['ga']
    out['_ga_slots'] = ga['_slots']
  return {'sweep': sweep, 'value': value, 'results': out}


def model_size_point(nets: Networks, slots: int, seed: int, chunk: int = 2048) -> dict:
  """Fig. 4: mean weighted delay of every (k, l), without and with inference delay."""
  mec, model = nets.mec, nets.model

  @jax.jit
  def chunk_sums(key):
    s = sample_slots(key, mec, chunk)
    out = all_subnetworks(model, {'params': nets.params.allocator},
                          normalized_features(s, mec), s.mask)
    plain = weighted_delays(out, s, s.mask, mec)                     # [K, L, B]
    t_inf = ops.inference_delay_table(model, mec, s.mask.sum(-1), s.mask.sum(-1)).edge
    extra = importance_weight(s, mec).sum(-1) * jnp.moveaxis(t_inf, (-2, -1), (0, 1))
    return plain.sum(-1), (plain + extra).sum(-1)

  n = max(1, slots // chunk)
  plain, with_inf = 0.0, 0.0
  for i in range(n):
    a, b = chunk_sums(jax.random.fold_in(jax.random.PRNGKey(seed), i))
    plain, with_inf = plain + np.asarray(a), with_inf + np.asarray(b)
  scale = 1e3 / (n * chunk)  # weighted seconds -> weighted ms per slot
  return {'without_inference': (plain * scale).tolist(),
          'with_inference': (with_inf * scale).tolist(), 'slots': n * chunk,
          'unit': 'sum_i w_i T_i in ms per slot'}


def sweep_values(sweep: str, points: int | None = None) -> list:
  """The sweep's values, or `points` of them evenly spaced with both ends kept."""
  values = SWEEPS[sweep][1]
  if points is None or points >= len(values):
    return values
  picks = np.unique(np.round(np.linspace(0, len(values) - 1, max(points, 1))).astype(int))
  return [values[i] for i in picks]


def parse_sweeps(names) -> set[str]:
  """Checks sweep names, plain ('data') or case-qualified ('1:data'); ValueError names the
  bad ones and the allowed values."""
  bad = [n for n in names if n.split(':', 1)[-1] not in SWEEPS
         or (':' in n and n.split(':', 1)[0] not in ('1', '2'))]
  if bad:
    raise ValueError(f'--sweeps: unknown {bad}; allowed {sorted(SWEEPS)}, each optionally '
                     'prefixed by a case, e.g. 2:data')
  return set(names)


def run_sweeps(nets: dict[int, Networks], results_dir: str, *, cases, sweeps, slots: int,
               ga_slots: int, seed: int, delay=None, points_per_sweep: int | None = None,
               objective: dict[int, Networks] | None = None) -> dict:
  """Every requested sweep of every case (`CASE_SWEEPS` says which a case has); with
  `objective` networks their pipeline runs beside the paper's at every point.

  `sweeps` holds names ('data': every case) or case-qualified names ('2:data': case 2
  only), see `parse_sweeps`.
  """
  out = {}
  objective = objective or {}
  wanted = parse_sweeps(sweeps)
  for case in cases:
    for sweep in SWEEPS:
      if sweep not in CASE_SWEEPS[case] or not ({sweep, f'{case}:{sweep}'} & wanted):
        continue
      large = sweep == 'data_large'
      methods = LARGE_DATA_METHODS if large else METHODS[case]
      obj_methods = (('policy_moe',) if large else OBJECTIVE_METHODS[case])
      points = []
      for value in sweep_values(sweep, points_per_sweep):
        name = f'case{case}_{sweep}_{value:g}'
        points.append(cached(results_dir, name, lambda: sweep_point(
            nets[case], sweep, value, methods, slots, 0 if large else ga_slots, seed, delay,
            objective.get(case), obj_methods)))
      out[f'case{case}_{sweep}'] = points
  return out
