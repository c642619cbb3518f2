"""Training-cost study (the paper's Fig. 12): progressive shrinking against training
every sub-network jointly from scratch.

For each network kind ('full': every (k, l); 'width': every k at depth L; 'depth':
every l at width K) and each schedule, we train until every sub-network of that kind
is within `bar` of the optimal allocation's weighted delay on held-out slots, and
record the steps and the training wall time: quality checks excluded, and compilation
excluded (see `_without_compile`; the time with compilation is recorded too). Per-step
cost is the same for every schedule, so the steps are the load-independent measure.

Progressive shrinking here is quality-driven: each stage runs until its own
sub-networks reach the bar, then the next stage starts from its weights:
  1. (K, L) only;  2. every width at depth L ('full', 'width');
  3. every (k, l) ('full') or every depth at width K ('depth').
Scratch trains all sub-networks of the kind from random initialisation at once.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import numpy as np

from dynn_jax.config import MECConfig
from dynn_jax.env import sample_slots
from dynn_jax.models import ModelConfig
from dynn_jax.training import (TrainConfig, optimal_weighted_delay, subnetwork_gaps,
                               train_allocator)

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
                schedule: str, bar: float, max_steps: int, eval_slots: int) -> dict:
  """Trains one network kind with one schedule until the bar; times the training."""
  held_out = sample_slots(jax.random.PRNGKey(20_011), mec, eval_slots)
  x = held_out.mask
  optimum = optimal_weighted_delay(held_out, x, mec)
  gaps_fn = jax.jit(subnetwork_gaps, static_argnums=(0, 1))
  params, steps, reached = None, 0, True
  chunks = []  # per stage: (steps, [seconds of each chunk]); a stage's first chunk compiles
  history = []
  for dynamic, target in _stages(kind, schedule):
    if target == 'top':
      need = np.zeros((model.num_experts, model.max_depth), bool)
      need[-1, -1] = True
      stage = dataclasses.replace(train, schedule='progressive', dynamic='full',
                                  full_steps=max_steps - steps, width_steps=0, depth_steps=0)
    else:
      need = _kind_mask(target, model)
      stage = dataclasses.replace(train, schedule='scratch', dynamic=dynamic,
                                  scratch_steps=max_steps - steps)
    chunk_seconds = []
    clock = {'last': time.perf_counter()}

    def check(step, state, need=need, chunk_seconds=chunk_seconds, clock=clock):
      chunk_seconds.append(time.perf_counter() - clock['last'])
      gaps = np.asarray(gaps_fn(model, mec, state.params, held_out, x, optimum))
      worst = float(gaps[need].max())
      history.append({'stage_target': str(target), 'step': steps + step, 'worst_gap': worst})
      clock['last'] = time.perf_counter()  # the quality check is not training time
      return worst <= bar

    name = f'{schedule}_{kind}_{target}'
    start_step = steps
    params = train_allocator(mec, model, stage, params=params, name=name, on_chunk=check)
    steps = history[-1]['step'] if history else steps
    chunks.append((steps - start_step, chunk_seconds))
    if history and history[-1]['worst_gap'] > bar:
      reached = False
      break
  return {'kind': kind, 'schedule': schedule, 'reached': reached, 'steps': steps,
          'seconds': _without_compile(chunks),
          'seconds_with_compile': sum(sum(c) for _, c in chunks), 'history': history}


def _without_compile(chunks: list[tuple[int, list[float]]]) -> float:
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


def run_study(mec: MECConfig, model: ModelConfig, train: TrainConfig, *, bar: float = 0.15,
              max_steps: int = 20_000, eval_slots: int = 1024,
              kinds: tuple[str, ...] = KINDS) -> dict:
  results = []
  for kind in kinds:
    for schedule in ('progressive', 'scratch'):
      results.append(time_to_bar(mec, model, train, kind, schedule, bar, max_steps,
                                 eval_slots))
  speedups = {}
  for kind in kinds:
    prog, scratch = (next(r for r in results if r['kind'] == kind and r['schedule'] == s)
                     for s in ('progressive', 'scratch'))
    if prog['reached'] and scratch['reached']:
      speedups[kind] = scratch['seconds'] / prog['seconds']
  return {'bar': bar, 'max_steps': max_steps, 'results': results, 'speedup': speedups}
