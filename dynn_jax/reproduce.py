"""The paper's studies as resumable *points*: sweeps, the exit study (Fig. 4, both
pipelines) and the op / inference-share study (Fig. 10, 11). Each point is one JSON file under
`results_dir/points/`; a point already written is read back, never recomputed, so an
interrupted reproduction continues where it stopped.
"""

from __future__ import annotations

import os
import time
from typing import Any, NamedTuple

import jax
import numpy as np

from dynn_jax import delay as delay_model
from dynn_jax import exit_study
from dynn_jax.evaluation import EvalResult, Setting, default_methods, evaluate_sweep
from dynn_jax.io import (DictOf, Integer, Number, OneOf, Optional, cached_json, check_schema,
                         read_json, tree_digest)
from dynn_jax.networks import Networks

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
LARGE_DATA_METHODS = ('policy_moe', 'hindsight', 'fix_moe', 'static')
# The objective-trained networks' methods, stored as OBJECTIVE_PREFIX + name.
OBJECTIVE_METHODS = {1: ('policy_moe', 'hindsight', 'fix_moe', 'static'),
                     2: ('pmrl', 'fix_moe', 'static')}
LARGE_DATA_OBJECTIVE_METHODS = ('policy_moe', 'hindsight')
OBJECTIVE_PREFIX = 'obj_'
# Case 1 runs every sweep; case 2 those the paper shows for it.
CASE_SWEEPS = {1: tuple(SWEEPS), 2: ('data', 'workload', 'tasks', 'cpu')}


_STAT = {'mean': float, 'ci95': Number(0.0)}
RESULT_SCHEMA = {'methods': DictOf(DictOf(_STAT, min_len=1), min_len=1), 'slots': Integer(1),
                 'mode': OneOf(('none', 'modelled', 'measured')), 'devices': Integer(1),
                 'bound': Optional(_STAT), 'slots_of': DictOf(Integer(1))}
# Bumped when a point gains a part, so that points written before are recomputed
# (2: the oracle beside the GA on the GA's slots, `ga_yardstick`).
POINT_LAYOUT = 3   # 3: hindsight in case 1, the policies' picks
# A point's result sets: every method on the point's slots, then (when the oracle ran)
# every method again on the oracle's slots, and the GA with the oracle on the GA's.
POINT_RESULTS = ('results', 'yardstick', 'ga_yardstick')
POINT_SCHEMA = {'sweep': OneOf(tuple(SWEEPS)), 'value': float, 'settings': dict,
                'results': RESULT_SCHEMA, 'yardstick': Optional(RESULT_SCHEMA),
                'ga_yardstick': Optional(RESULT_SCHEMA),
                'seconds': Optional(Number(0.0))}


def sweep_methods(nets: Networks) -> tuple[str, ...]:
  """The methods of a sweep point: the evaluation's comparison for these networks
  (`evaluation.default_methods`), with 'hindsight' (each slot's best exit: what any
  policy over the networks can do at best) after 'policy_moe'."""
  names = default_methods(nets.mec, nets.params)
  if 'policy_moe' not in names:
    return names
  at = names.index('policy_moe') + 1
  return names[:at] + ('hindsight',) + names[at:]


def point_path(results_dir: str, name: str) -> str:
  return os.path.join(results_dir, 'points', f'{name}.json')


class PointError(ValueError):
  """A point file that cannot be read back (a folder, not JSON, edited, damaged)."""


def cached(results_dir: str, name: str, compute, settings: dict,
           schema: Any = POINT_SCHEMA, expect: dict | None = None) -> Any:
  """The point's JSON if it exists, was made with `settings` and holds the fields of
  `expect` (a sweep point: its own sweep and value), else compute it and write it
  atomically (with its settings). A point read back must match `schema`; one that
  cannot be read is refused (`PointError`), never recomputed over: it may be the only
  copy of hours of work."""
  path = point_path(results_dir, name)
  _read_point(path, name)  # refuses a damaged file before any work
  return cached_json(path, lambda: compute() | {'settings': settings}, f'point {name}',
                     stale=lambda point: _mismatch(point, settings, expect), schema=schema)


def _read_point(path: str, name: str) -> Any:
  """The point at `path` (None when there is none); PointError, one line naming the
  file and what to do, for one that cannot be read."""
  if not os.path.lexists(path):
    return None
  try:
    return read_json(path, f'point {name}')
  except (OSError, ValueError) as e:
    raise PointError(f'{e}; delete it to compute the point again') from None


def _mismatch(point: Any, settings: dict, expect: dict | None) -> str | None:
  """Why a point read back is not the one asked for (None: it is)."""
  if not isinstance(point, dict) or point.get('settings') != settings:
    return 'was made with other settings'
  # A point copied or renamed over another holds its own sweep and value, not the
  # ones its name says: reporting it would show one point twice.
  for field, want in (expect or {}).items():
    if point.get(field) != want:
      return f'holds {field} = {point.get(field)!r}, not {want!r}'
  return None


EXIT_STUDY_SCHEMA = {'sizes': [float], 'slots': Integer(2), 'loss': str,
                     'modes': [OneOf(('none', 'modelled', 'measured'))],
                     'none': [RESULT_SCHEMA], 'modelled': Optional([RESULT_SCHEMA]),
                     'measured': Optional([RESULT_SCHEMA]), 'settings': dict,
                     'seconds': Optional(Number(0.0))}


def exit_studies(nets: dict[str, Networks], results_dir: str, *, slots: int, seed: int,
                 delay=None) -> dict:
  """Fig. 4 for each pipeline ({'paper': networks, 'objective': networks}, case 1):
  `exit_study.exit_study` without inference delay and with `delay` (default modelled),
  one cached point per pipeline."""
  out = {}
  for pipeline, networks in nets.items():
    settings = {'slots': slots, 'seed': seed, 'networks': networks.fingerprint,
                'delay': delay_fingerprint(delay), 'sizes': list(exit_study.DATA_SIZES)}

    def compute(networks=networks):
      start = time.perf_counter()
      study = exit_study.exit_study(networks, slots=slots, seed=seed,
                                    delays=(delay_model.NONE, delay_model.resolve(delay)))
      return study | {'seconds': time.perf_counter() - start}

    out[pipeline] = cached(results_dir, f'exits_case1_{pipeline}', compute, settings,
                           EXIT_STUDY_SCHEMA)
  return out


class SweepKey(NamedTuple):
  """Which sweep of which case; `name` ('case1_data') names its files."""
  case: int
  sweep: str

  @property
  def name(self) -> str:
    return f'case{self.case}_{self.sweep}'


def sweep_field(sweep: str) -> str:
  """The MECConfig field a sweep varies ('tasks' varies the users per slot)."""
  field = SWEEPS[sweep][0]
  return 'n_users' if field == 'n_active' else field


def sweep_points(nets: Networks, sweep: str, values, methods, *, slots: int,
                 oracle_slots: int, ga_slots: int, seed: int, delay=None,
                 objective: Networks | None = None, objective_methods=()) -> list[dict]:
  """Every method at every value of the sweep: one compiled program per method set for
  the whole sweep (`evaluate_sweep`), every method on the same slots.

  The oracle costs about a millisecond per slot, so it runs on its own `oracle_slots`
  slots, where every other method runs again: the point's `yardstick` holds those
  results, and every gap to the oracle or the lower bound is taken there, method and
  oracle on the same slots. The GA runs on `ga_slots` slots of its own, the oracle again
  beside it (the point's `ga_yardstick`), so the GA too is compared on its own slots.
  """
  field, values = sweep_field(sweep), list(values)
  setting = Setting(mec=nets.mec, model=nets.model, feature_config=nets.mec, delay=delay)
  obj_setting = (Setting(mec=nets.mec, model=objective.model, feature_config=objective.mec,
                         delay=delay) if objective is not None and objective_methods else None)

  def run(setting, names, params, n):
    if setting is None or not names or not n:
      return [None] * len(values)
    return evaluate_sweep(setting, names, params, field, values, slots=n, seed=seed,
                          progress=True)

  has_oracle = 'oracle' in methods and oracle_slots > 0
  obj_params = objective.params if objective is not None else None
  main = run(setting, tuple(m for m in methods if m != 'oracle'), nets.params, slots)
  theirs = run(obj_setting, tuple(objective_methods), obj_params, slots)
  yard = run(setting, tuple(methods), nets.params, oracle_slots if has_oracle else 0)
  yard_theirs = run(obj_setting, tuple(objective_methods), obj_params,
                    oracle_slots if has_oracle else 0)
  ga = run(setting, ('ga', 'oracle') if has_oracle else ('ga',), nets.params, ga_slots)
  points = []
  for i, value in enumerate(values):
    results = main[i]
    if theirs[i] is not None:
      results = results.merged(theirs[i], OBJECTIVE_PREFIX)
    if yard[i] is not None:
      results = results.merged(yard[i], names=('oracle',), bound=True)
    if ga[i] is not None:
      results = results.merged(ga[i], names=('ga',))
    point = {'sweep': sweep, 'value': value, 'results': results}
    if yard[i] is not None:
      point['yardstick'] = (yard[i] if yard_theirs[i] is None
                            else yard[i].merged(yard_theirs[i], OBJECTIVE_PREFIX))
    if ga[i] is not None and has_oracle:
      point['ga_yardstick'] = ga[i]
    points.append(point)
  return points


# The RL baseline's points live in files of their own (AGENT_PREFIX + the sweep point's
# name): adding or retraining an agent recomputes no point of the other pipelines.
AGENT_PREFIX = 'ppo_'
AGENT_METHOD = 'ppo'


def agent_points(agent: Networks, nets: Networks, key: 'SweepKey', values, results_dir: str,
                 *, slots: int, oracle_slots: int, seed: int, delay=None) -> list[dict]:
  """The RL agent ('ppo') at every value of a sweep of `nets`' system, on the slots of the
  sweep's points: the same seed, slot counts and chunk (both the default) give the same
  slots (the slots do not depend on the methods; tested), so its `results` and
  `yardstick` merge into the points' (`with_agent`). Cached like the points
  (`cached_sweep`), in files of their own."""
  field = sweep_field(key.sweep)
  setting = Setting(mec=nets.mec, model=agent.model, feature_config=agent.mec, delay=delay)
  settings = {'layout': POINT_LAYOUT, 'slots': slots, 'seed': seed,
              'oracle_slots': oracle_slots, 'agent': agent.fingerprint,
              'system': nets.mec.to_dict(), 'delay': delay_fingerprint(delay)}

  def compute(missing):
    runs = {part: evaluate_sweep(setting, (AGENT_METHOD,), agent.params, field, missing,
                                 slots=n, seed=seed, progress=True)
            for part, n in (('results', slots), ('yardstick', oracle_slots)) if n}
    return [{'sweep': key.sweep, 'value': v} | {part: r[i] for part, r in runs.items()}
            for i, v in enumerate(missing)]

  return cached_sweep(results_dir, AGENT_PREFIX + key.name, key.sweep, list(values),
                      settings, compute)


def with_agent(point: dict, agent_point: dict) -> dict:
  """A sweep point with the agent's results merged into the result sets both hold (and
  its compute time added to the point's: the report sums them)."""
  out = dict(point)
  if point.get('seconds') is not None and agent_point.get('seconds') is not None:
    out['seconds'] = point['seconds'] + agent_point['seconds']
  for part in POINT_RESULTS[:2]:
    if point.get(part) is not None and agent_point.get(part) is not None:
      out[part] = point[part].merged(agent_point[part], names=(AGENT_METHOD,))
  return out


def training_record(networks_path: str) -> dict:
  """The training wall time recorded beside a networks file: `summary.json` in its run
  directory, or `<name>.summary.json` beside a shipped checkpoint (`train_wall_s`, the
  training process's own time; `train_wall_source` where it was taken otherwise)."""
  candidates = ([os.path.join(networks_path, 'summary.json')] if os.path.isdir(networks_path)
                else [os.path.splitext(networks_path)[0] + '.summary.json',
                      os.path.join(os.path.dirname(networks_path), 'summary.json')])
  for path in candidates:
    if os.path.isfile(path):
      summary = read_json(path, 'training summary')
      return {'file': networks_path, 'seconds': summary.get('train_wall_s'),
              'source': f'`{path}`' + (f' ({summary["train_wall_source"]})'
                                       if 'train_wall_source' in summary else '')}
  return {'file': networks_path, 'seconds': None, 'source': 'no summary beside the file'}


def point_to_json(point: dict) -> dict:
  return {k: v.to_dict() if isinstance(v, EvalResult) else v for k, v in point.items()}


def point_from_json(point: dict) -> dict:
  """A point read back: its results as `EvalResult` (files of any earlier layout)."""
  return {k: EvalResult.from_dict(v) if k in POINT_RESULTS else v
          for k, v in point.items()}


def compared(point: dict, *names: str) -> EvalResult:
  """The results in which to compare `names` at a sweep point: with the oracle among
  them, the first yardstick that ran them all on the same slots (every method beside
  the oracle on the oracle's slots; or the GA beside the oracle on the GA's), else the
  point's main results."""
  for yard in (point.get(part) for part in POINT_RESULTS[1:]):
    if 'oracle' in names and yard is not None and all(n in yard for n in names):
      return yard
  return point['results']


def sweep_values(sweep: str, points: int | None = None) -> list:
  """The sweep's values, or `points` of them evenly spaced with both ends kept."""
  values = SWEEPS[sweep][1]
  if points is None or points >= len(values):
    return values
  picks = np.unique(np.round(np.linspace(0, len(values) - 1, max(points, 1))).astype(int))
  return [values[i] for i in picks]


def parse_sweeps(names) -> set[str]:
  """Checks sweep names, plain ('data') or case-qualified ('1:data'); ValueError names the
  bad ones and the allowed values, or an empty list (it would replace a finished report
  by an empty one)."""
  names = list(names)
  if not names:
    raise ValueError(f'--sweeps is empty; give at least one of {sorted(SWEEPS)}')
  bad = [n for n in names if n.split(':', 1)[-1] not in SWEEPS
         or (':' in n and n.split(':', 1)[0] not in ('1', '2'))]
  if bad:
    raise ValueError(f'--sweeps: unknown {bad}; allowed {sorted(SWEEPS)}, each optionally '
                     'prefixed by a case, e.g. 2:data')
  return set(names)


def selected_sweeps(cases, sweeps) -> list[SweepKey]:
  """The (case, sweep) pairs that `cases` and the sweep names (`parse_sweeps`) select,
  in `SWEEPS` order; ValueError, naming both flags, when they select none."""
  cases = list(cases)
  if not cases:
    raise ValueError('--cases is empty; give 1, 2 or both')
  wanted = parse_sweeps(sweeps)
  keys = [SweepKey(case, sweep) for case in cases for sweep in SWEEPS
          if sweep in CASE_SWEEPS[case] and {sweep, f'{case}:{sweep}'} & wanted]
  if not keys:
    raise ValueError(f'--sweeps={",".join(sorted(wanted))} selects no sweep of --cases='
                     f'{",".join(map(str, cases))} (case 1: {", ".join(CASE_SWEEPS[1])}; '
                     f'case 2: {", ".join(CASE_SWEEPS[2])})')
  return keys


def run_sweeps(nets: dict[int, Networks], results_dir: str, *, cases, sweeps, slots: int,
               ga_slots: int, seed: int, delay=None, points_per_sweep: int | None = None,
               objective: dict[int, Networks] | None = None, oracle_slots: int = 1024,
               agents: dict[int, Networks] | None = None) -> dict:
  """Every requested sweep of every case (`CASE_SWEEPS` says which a case has); with
  `objective` networks their pipeline runs beside the paper's at every point, and with
  `agents` (RL agents, `dynn_jax.rl`) method 'ppo' too (not in the large-data sweep,
  whose points hold only the DyNN pipelines and have no oracle).

  `sweeps` holds names ('data': every case) or case-qualified names ('2:data': case 2
  only), see `parse_sweeps`; a selection of no sweep is refused (`selected_sweeps`). A
  point already written with the same settings (slots, seeds, networks, delay table)
  and holding its own sweep and value is read back; the missing ones of a sweep are
  computed together. A point file that cannot be read is refused (`PointError`).
  """
  out = {}
  objective = objective or {}
  for key in selected_sweeps(cases, sweeps):
    case, sweep = key
    large = sweep == 'data_large'
    methods = LARGE_DATA_METHODS if large else sweep_methods(nets[case])
    obj_methods = LARGE_DATA_OBJECTIVE_METHODS if large else OBJECTIVE_METHODS[case]
    obj = objective.get(case)
    settings = {'layout': POINT_LAYOUT, 'slots': slots, 'seed': seed,
                'ga_slots': 0 if large else ga_slots,
                'oracle_slots': oracle_slots if 'oracle' in methods else 0,
                'networks': nets[case].fingerprint,
                'objective_networks': obj.fingerprint if obj else None,
                'delay': delay_fingerprint(delay)}
    values = sweep_values(sweep, points_per_sweep)
    out[key] = cached_sweep(
        results_dir, key.name, sweep, values, settings,
        lambda missing: sweep_points(nets[case], sweep, missing, methods, slots=slots,
                                     oracle_slots=settings['oracle_slots'],
                                     ga_slots=settings['ga_slots'], seed=seed, delay=delay,
                                     objective=obj, objective_methods=obj_methods))
    agent = (agents or {}).get(case)
    if agent is not None and not large:
      theirs = agent_points(agent, nets[case], key, values, results_dir, slots=slots,
                            oracle_slots=settings['oracle_slots'], seed=seed, delay=delay)
      out[key] = [with_agent(p, a) for p, a in zip(out[key], theirs)]
  return out


def cached_sweep(results_dir: str, name: str, sweep: str, values, settings: dict,
                 compute) -> list[dict]:
  """The points `<name>_<value>` of a sweep: those written with `settings` (and their own
  sweep and value) are read back, the missing ones computed together by
  `compute(missing values) -> points` and written one file each."""
  names = {v: f'{name}_{v:g}' for v in values}
  expect = {v: {'sweep': sweep, 'value': v} for v in values}
  missing = [v for v in values if not _written(results_dir, names[v], settings, expect[v])]
  fresh = {}
  if missing:
    start = time.perf_counter()
    points = compute(missing)
    # Each point's share of its sweep's wall time, compiles included: the report sums
    # them, whichever run computed the points.
    share = (time.perf_counter() - start) / len(missing)
    fresh = {v: p | {'seconds': share} for v, p in zip(missing, points)}
  return [point_from_json(cached(results_dir, names[v], lambda v=v: point_to_json(fresh[v]),
                                 settings, expect=expect[v])) for v in values]


def _written(results_dir: str, name: str, settings: dict, expect: dict) -> bool:
  """Whether the point is written, with these settings and its own sweep and value
  (PointError for a file that cannot be read, SchemaError for a damaged one)."""
  path = point_path(results_dir, name)
  point = _read_point(path, name)
  if point is None or _mismatch(point, settings, expect) is not None:
    return False
  check_schema(point, POINT_SCHEMA, f'point {path}')  # a damaged point is refused
  return True


def delay_fingerprint(delay) -> str | None:
  """What a point's delay model was: None for the modelled delays (as points written
  before the other modes existed say), 'none', or a digest of a measured latency table."""
  delay = delay_model.resolve(delay)
  if delay.mode != 'measured':
    return None if delay.mode == 'modelled' else delay.mode
  return tree_digest(delay)[:16]


