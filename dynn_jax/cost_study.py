"""Training-cost study (the paper's Fig. 12): progressive shrinking against training
every sub-network jointly from scratch.

For each network kind ('full': every (k, l); 'width': every k at depth L; 'depth':
every l at width K) and each schedule, we train until every sub-network of that kind
is within `bar` of the optimal allocation's weighted delay on held-out slots, and
record the steps and the training wall time: quality checks excluded, and compilation
excluded (see `_without_compile`; the time with compilation is recorded too).

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
  params, steps, seconds, seconds_with_compile, reached = None, 0, 0.0, 0.0, True
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
    params = train_allocator(mec, model, stage, params=params, name=name, on_chunk=check)
    steps = history[-1]['step'] if history else steps
    seconds_with_compile += sum(chunk_seconds)
    seconds += sum(_without_compile(chunk_seconds))
    if history and history[-1]['worst_gap'] > bar:
      reached = False
      break
  return {'kind': kind, 'schedule': schedule, 'reached': reached, 'steps': steps,
          'seconds': seconds, 'seconds_with_compile': seconds_with_compile,
          'history': history}


def _without_compile(chunk_seconds: list[float]) -> list[float]:
  """A stage's first chunk also compiles it: count it as the stage's median chunk.

  Every schedule computes every expert each step, so per-step cost is the same for
  all; compile counts differ (progressive has a compile per stage) and would otherwise
  dominate short stages.
  """
  if len(chunk_seconds) < 2:
    return chunk_seconds
  return [float(np.median(chunk_seconds[1:]))] + chunk_seconds[1:]


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
