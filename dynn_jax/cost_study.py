"""Training-cost study (the paper's Fig. 12): progressive shrinking against training
every sub-network jointly from scratch.

For each network kind ('full': every (k, l); 'width': every k at depth L; 'depth':
every l at width K) and each schedule, we train until every sub-network of that kind
is within `bar` of the optimal allocation's weighted delay on held-out slots, and
record the steps and the training wall time: quality checks excluded, and compilation
excluded (see `without_compile`; the time with compilation is recorded too). Per-step
cost is the same for every schedule, so the steps are the load-independent measure.

Progressive shrinking here is quality-driven: each stage runs until its own
sub-networks reach the bar, then the next stage starts from its weights:
  1. (K, L) only;  2. every width at depth L ('full', 'width');
  3. every (k, l) ('full') or every depth at width K ('depth').
Scratch trains all sub-networks of the kind from random initialisation at once.
"""

from __future__ import annotations

import dataclasses
import os
import time

import numpy as np

from dynn_jax.config import MECConfig
from dynn_jax.io import (DictOf, Integer, Number, OneOf, Optional, cached_json, check_schema,
                         read_json)
from dynn_jax.models import ModelConfig
from dynn_jax.quality import HELD_OUT_SEED, HeldOut, held_out, subnetwork_gaps
from dynn_jax.training.config import SCHEDULES, TrainConfig
from dynn_jax.training.loop import train_allocator

KINDS = ('full', 'width', 'depth')


def _kind_mask(kind: str, model: ModelConfig) -> np.ndarray:
  """[K, L] bool: the sub-networks a network of this kind has."""
  mask = np.zeros((model.num_experts, model.max_depth), bool)
  if kind == 'full':
    mask[:] = True
  elif kind == 'width':
    mask[:, -1] = True
  else:
    mask[-1, :] = True
  return mask


def _stages(kind: str, schedule: str) -> list[tuple[str, np.ndarray | str]]:
  """(TrainConfig.dynamic for the stage, which sub-networks must reach the bar)."""
  if schedule == 'scratch':
    return [(kind, kind)]
  top = [('full_top', 'top')]  # stage 1: only (K, L)
  if kind == 'full':
    return top + [('width', 'width'), ('full', 'full')]
  return top + [(kind, kind)]


def time_to_bar(mec: MECConfig, model: ModelConfig, train: TrainConfig, kind: str,
                schedule: str, bar: float, max_steps: int, held: HeldOut) -> dict:
  """Trains one network kind with one schedule until the bar; times the training.

  Besides the steps and seconds, records for every (k, l) the first step at which it
  was within the bar (`first_at_bar`, -1: never) and which of the kind's sub-networks
  got there last (`limiting`, 1-based (k, l)): the ones that set the time to the bar.
  """
  K, L = model.num_experts, model.max_depth
  params, steps, reached = None, 0, True
  chunks = []  # per stage: (steps, [seconds of each chunk]); a stage's first chunk compiles
  history, stage_starts = [], []
  first_at_bar = np.full((K, L), -1)
  for dynamic, target in _stages(kind, schedule):
    if target == 'top':
      need = np.zeros((K, L), bool)
      need[-1, -1] = True
      stage = dataclasses.replace(train, schedule='progressive', dynamic='full',
                                  full_steps=max_steps - steps, width_steps=0, depth_steps=0)
    else:
      need = _kind_mask(target, model)
      stage = dataclasses.replace(train, schedule='scratch', dynamic=dynamic,
                                  scratch_steps=max_steps - steps)
    start = steps
    stage_starts.append({'target': str(target), 'step': start})
    chunk_seconds = []
    clock = {'last': time.perf_counter()}

    def check(step, state, need=need, chunk_seconds=chunk_seconds, clock=clock,
              start=start):
      chunk_seconds.append(time.perf_counter() - clock['last'])
      gaps = np.asarray(subnetwork_gaps(model, mec, state.params, held))
      first_at_bar[(gaps <= bar) & (first_at_bar < 0)] = start + step
      worst = float(gaps[need].max())
      history.append({'stage_target': str(target), 'step': start + step, 'worst_gap': worst})
      clock['last'] = time.perf_counter()  # the quality check is not training time
      return worst <= bar

    name = f'{schedule}_{kind}_{target}'
    params = train_allocator(mec, model, stage, params=params, name=name, on_chunk=check)
    steps = history[-1]['step'] if history else steps
    chunks.append((steps - start, chunk_seconds))
    if history and history[-1]['worst_gap'] > bar:
      reached = False
      break
  return {'kind': kind, 'schedule': schedule, 'seed': train.seed, 'reached': reached,
          'steps': steps, 'seconds': without_compile(chunks),
          'seconds_with_compile': sum(sum(c) for _, c in chunks), 'history': history,
          'stage_starts': stage_starts, 'first_at_bar': first_at_bar.tolist(),
          'limiting': limiting_subnetworks(first_at_bar, _kind_mask(kind, model))}


def limiting_subnetworks(first_at_bar: np.ndarray, mask: np.ndarray) -> list[list[int]]:
  """1-based (k, l) of the kind's sub-networks that reached the bar last (or never)."""
  steps = np.where(first_at_bar < 0, np.iinfo(np.int64).max, first_at_bar)
  steps = np.where(mask, steps, -1)
  return [[int(k) + 1, int(l) + 1] for k, l in np.argwhere(steps == steps.max())]


def without_compile(chunks: list[tuple[int, list[float]]]) -> float:
  """Training seconds with each stage's first chunk (which also compiles) counted at the
  median seconds per chunk of the run's other chunks.

  Every schedule computes every expert at each step, so a step costs the same in all;
  the number of compiles differs (one per progressive stage) and would otherwise
  dominate short stages.
  """
  later = [t for _, times in chunks for t in times[1:]]
  if not later:
    return sum(sum(times) for _, times in chunks)
  per_chunk = float(np.median(later))
  return sum(per_chunk + sum(times[1:]) for _, times in chunks if times)


def check_kinds(kinds) -> None:
  """ValueError naming --kinds for an unknown kind, or for none: a study of no kind would
  replace a finished study file by an empty one."""
  kinds = list(kinds)
  if not kinds:
    raise ValueError(f'--kinds is empty; give at least one of {list(KINDS)}')
  unknown = sorted(set(kinds) - set(KINDS))
  if unknown:
    raise ValueError(f'--kinds: unknown {unknown}; allowed {list(KINDS)}')


def run_study(mec: MECConfig, model: ModelConfig, train: TrainConfig, *, bar: float = 0.15,
              max_steps: int = 20_000, eval_slots: int = 1024,
              kinds: tuple[str, ...] = KINDS, seeds: tuple[int, ...] = (0,),
              cache_dir: str | None = None) -> dict:
  """Every (kind, schedule, seed) run, and per kind the speedup of progressive shrinking
  (scratch seconds over progressive seconds, and the same for steps): the median over
  seeds with its range.

  With `cache_dir`, each finished run is a JSON file there and is read back, not rerun,
  as long as it was made with the same settings: a killed study resumes.
  """
  check_kinds(kinds)
  if not seeds:
    raise ValueError('--seeds is empty; give at least one training seed')
  held = held_out(mec, eval_slots, HELD_OUT_SEED)
  settings = {'mec': mec.to_dict(), 'model': model.to_dict(), 'bar': bar,
              'held_out_seed': HELD_OUT_SEED,
              'max_steps': max_steps, 'eval_slots': eval_slots}
  results = []
  for seed in seeds:
    seeded = dataclasses.replace(train, seed=seed)
    run_settings = {**settings, 'train': seeded.to_dict()}
    for kind in kinds:
      for schedule in SCHEDULES:
        run = lambda: {**time_to_bar(mec, model, seeded, kind, schedule, bar, max_steps,
                                     held), 'settings': run_settings}
        if cache_dir is None:
          results.append(run())
          continue
        results.append(cached_json(
            os.path.join(cache_dir, f'{kind}_{schedule}_seed{seed}.json'), run,
            f'cost-study run {kind}/{schedule}/seed {seed}',
            valid=lambda r, expected=run_settings: (isinstance(r, dict) and
                                                    r.get('settings') == expected),
            schema=RUN_SCHEMA))
  return {'bar': bar, 'max_steps': max_steps, 'seeds': list(seeds), 'results': results,
          **_speedups(results, kinds, seeds)}


def _speedups(results: list[dict], kinds: tuple[str, ...], seeds: tuple[int, ...]) -> dict:
  """Per kind: scratch over progressive, in seconds and in steps, across seeds whose two
  runs both reached the bar (a kind with none is left out)."""
  out = {'speedup': {}, 'speedup_range': {}, 'step_speedup': {}}
  for kind in kinds:
    by_seconds, by_steps = [], []
    for seed in seeds:
      prog, scratch = (next(r for r in results if (r['kind'], r['schedule'], r['seed'])
                            == (kind, s, seed)) for s in SCHEDULES)
      if prog['reached'] and scratch['reached']:
        by_seconds.append(scratch['seconds'] / prog['seconds'])
        by_steps.append(scratch['steps'] / prog['steps'])
    if by_seconds:
      out['speedup'][kind] = float(np.median(by_seconds))
      out['speedup_range'][kind] = [float(min(by_seconds)), float(max(by_seconds))]
      out['step_speedup'][kind] = float(np.median(by_steps))
  return out


STUDY_FIELDS = ('bar', 'results', 'speedup', 'speedup_range', 'step_speedup')
RUN_FIELDS = ('kind', 'schedule', 'seed', 'reached', 'steps', 'seconds', 'history',
              'stage_starts', 'first_at_bar', 'limiting')

_STEP = Integer(0)
_KL = (Integer(1), Integer(1))
# What `time_to_bar` writes (and the report reads) for one run.
RUN_SCHEMA = {
    'kind': OneOf(KINDS), 'schedule': OneOf(SCHEDULES), 'seed': _STEP,
    'reached': bool, 'steps': _STEP, 'seconds': Number(0.0),
    'seconds_with_compile': Optional(Number(0.0)),
    'history': [{'stage_target': str, 'step': _STEP, 'worst_gap': float}],
    'stage_starts': [{'target': str, 'step': _STEP}],
    'first_at_bar': [[Integer(-1)]],
    'limiting': [_KL],
    'settings': Optional(dict),
}
STUDY_SCHEMA = {
    'bar': Number(0.0), 'max_steps': Optional(Integer(1)), 'seeds': Optional([_STEP]),
    'results': [RUN_SCHEMA],
    'speedup': DictOf(Number(0.0)),
    'speedup_range': DictOf((Number(0.0), Number(0.0))),
    'step_speedup': DictOf(Number(0.0)),
    'config': Optional(dict),
}


def load_study(path: str) -> dict:
  """A `run_study` JSON, checked against `STUDY_SCHEMA` (types, ranges, non-empty
  lists), with the field named in the error."""
  study = read_json(path, 'cost study')
  if not isinstance(study, dict):
    raise ValueError(f'cost study {path} is not a JSON object made by launch/train_cost.py')
  missing = [f for f in STUDY_FIELDS if f not in study]
  results = study.get('results')
  for i, run in enumerate(results if isinstance(results, list) else []):
    if isinstance(run, dict):
      missing += [f'results[{i}].{f}' for f in RUN_FIELDS if f not in run]
  if missing:
    raise ValueError(f'cost study {path} lacks {", ".join(missing[:5])}: it was made by an '
                     'older launch/train_cost.py; run it again')
  check_schema(study, STUDY_SCHEMA, f'cost study {path}')
  return study


def variant_paths(path: str) -> list[str]:
  """The cost studies beside `path` named `<its name>_*.json` (the same study with other
  settings, e.g. train_cost_bar05.json beside train_cost.json), sorted."""
  stem, ext = os.path.splitext(path)
  folder = os.path.dirname(path) or '.'
  prefix = os.path.basename(stem) + '_'
  return sorted(os.path.join(os.path.dirname(path), name) for name in os.listdir(folder)
                if name.startswith(prefix) and name.endswith(ext or '.json')
                and os.path.isfile(os.path.join(folder, name)))
