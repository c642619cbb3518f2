"""Benchmarks that print figures and return them as a dict (never timed assertions).

`environment_suite`: sampling + evaluation throughput, the exact allocation's latency
and throughput, and the GA's time per slot.

`exits_suite`: the real per-slot latency of every exit (k, l) of the allocation DyNN
(`per_slot_apply`), next to the runtime's dispatch floor, the static model, the
scheduler, the policy and the solvers; the batched throughput with every expert
computed and masked (`moe_forward`) against the exit-bucketed path (`bucketed_apply`),
a least-squares device constant (seconds per counted op plus a fixed overhead) and a
measured inference-delay table in the `dynn_jax.latency` format.

Per-slot figures are single calls on one slot ([W, 5] features), compiled ahead of
time, warmed up and timed one call at a time with `block_until_ready`; compile time
is reported apart. On CPU, jax dispatches asynchronously by default, handing each call
to a worker thread: for calls of a few tens of microseconds that hand-off dominates and
varies with the machine's load, so `launch/benchmark.py` turns it off before the
backend starts (`--cpu_async_dispatch`) and the results record which mode ran.

`write_profile` records a jax.profiler trace of a few per-slot calls and training steps.
"""

from __future__ import annotations

import functools
import os
import platform
import re
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from dynn_jax import latency, ops
from dynn_jax.config import MECConfig
from dynn_jax.env import normalized_features, sample_slots, slot_costs
from dynn_jax.io import write_json_atomic
from dynn_jax.models import (Allocation, ModelConfig, MoEAllocator, Policy, Scheduler,
                             StaticAllocator, check_inputs, moe_forward, per_slot_apply,
                             per_slot_forward)
from dynn_jax.solvers import equal_split, optimal_allocation, oracle
from dynn_jax.solvers.ga import GAConfig, ga_solve
from dynn_jax.timing import Timing, benchmark, compile_ahead, time_calls

Array = jax.Array


def device_info() -> dict:
  device = jax.devices()[0]
  return {'platform': device.platform, 'device_kind': device.device_kind,
          'device_count': jax.device_count(), 'jax_version': jax.__version__,
          'machine': platform.machine(), 'processor': platform.processor(),
          'cpu_count': os.cpu_count(), **runtime_info()}


def runtime_info() -> dict:
  """Runtime settings that move per-call latency (they are not part of the device key)."""
  return {'cpu_async_dispatch': bool(jax.config.read('jax_cpu_enable_async_dispatch')),
          'xla_flags': os.environ.get('XLA_FLAGS', '')}


def host_load() -> dict:
  """Load averages: latencies on a shared machine are only comparable at a known load."""
  one, five, fifteen = os.getloadavg()
  return {'load_1m': one, 'load_5m': five, 'load_15m': fifteen, 'cpu_count': os.cpu_count()}


def environment_suite(config: MECConfig, *, batch: int = 100_000, alloc_batch: int = 10_000,
                      ga_batch: int = 4, oracle_batch: int = 1024,
                      ga_config: GAConfig = GAConfig(), seed: int = 0,
                      min_seconds: float = 1.0) -> dict:
  key = jax.random.PRNGKey(seed)

  def sample_and_evaluate(key):
    slots = sample_slots(key, config, batch)
    decision = equal_split(slots, slots.mask, config)
    return slot_costs(slots, decision, config).objective

  def solve(slots):
    return optimal_allocation(slots, slots.mask, config)

  def ga(key, slots):
    return ga_solve(key, slots, config, ga_config)[0]

  results = {}
  t = benchmark(sample_and_evaluate, key, min_seconds=min_seconds, min_calls=5)
  results['sample_and_evaluate'] = {**t.per_item(batch).to_dict(), 'batch': batch,
                                    'slots_per_s': t.rate(batch)}
  one = sample_slots(key, config, 1)
  t = benchmark(solve, one, min_seconds=min_seconds, min_calls=200)
  results['optimal_allocation_batch1'] = {**t.to_dict(), 'batch': 1,
                                          'slots_per_s': t.rate(1)}
  many = sample_slots(key, config, alloc_batch)
  t = benchmark(solve, many, min_seconds=min_seconds, min_calls=5)
  results['optimal_allocation_batched'] = {**t.per_item(alloc_batch).to_dict(),
                                           'batch': alloc_batch,
                                           'slots_per_s': t.rate(alloc_batch)}
  many_oracle = sample_slots(key, config, oracle_batch)
  t = benchmark(lambda s: oracle(s, config), many_oracle, min_seconds=min_seconds, min_calls=3)
  results['oracle_batched'] = {**t.per_item(oracle_batch).to_dict(), 'batch': oracle_batch,
                               'slots_per_s': t.rate(oracle_batch)}
  for label, b in (('ga_batch1', 1), ('ga_batched', ga_batch)):
    slots = sample_slots(key, config, b)
    t = benchmark(ga, key, slots, min_seconds=min_seconds, min_calls=3)
    results[label] = {**t.per_item(b).to_dict(), 'batch': b, 'slots_per_s': t.rate(b),
                      'population': ga_config.population(config),
                      'generations': ga_config.generations}
  return results


def format_table(results: dict) -> str:
  """One line per benchmark: median, p10, p90 per item and the rate."""
  lines = [f'{"benchmark":32s} {"median":>12s} {"p10":>12s} {"p90":>12s} {"items/s":>12s}'
           f' {"compile s":>10s}']
  for name, r in results.items():
    if not isinstance(r, dict) or 'median_s' not in r:
      continue
    lines.append(f'{name:32s} {_fmt(r["median_s"]):>12s} {_fmt(r["p10_s"]):>12s} '
                 f'{_fmt(r["p90_s"]):>12s} {r.get("slots_per_s", 1 / r["median_s"]):12.4g} '
                 f'{r["compile_s"]:10.2f}')
  return '\n'.join(lines)


def _fmt(seconds: float) -> str:
  if seconds >= 1:
    return f'{seconds:.3f} s'
  if seconds >= 1e-3:
    return f'{seconds * 1e3:.3f} ms'
  return f'{seconds * 1e6:.2f} us'


# ------------------------------------------------------------------ line fit


def fit_line(ops_count, seconds) -> dict:
  """Least squares seconds ~ overhead_s + seconds_per_op * ops, with R^2.

  With a single distinct op count the slope is undefined: it is reported as 0 and the
  overhead is the mean. R^2 is None when the seconds do not vary.
  """
  x = np.asarray(ops_count, np.float64)
  y = np.asarray(seconds, np.float64)
  if x.ndim != 1 or x.shape != y.shape or x.size == 0:
    raise ValueError(f'fit_line needs two 1-D arrays of the same length; got shapes '
                     f'{x.shape} and {y.shape}')
  if np.ptp(x) == 0:
    slope, overhead = 0.0, float(y.mean())
  else:
    design = np.stack([np.ones_like(x), x], 1)
    (overhead, slope), *_ = np.linalg.lstsq(design, y, rcond=None)
  residual = y - (overhead + slope * x)
  total = float(((y - y.mean()) ** 2).sum())
  r2 = 1.0 - float((residual ** 2).sum()) / total if total > 0 else None
  return {'seconds_per_op': float(slope), 'overhead_s': float(overhead), 'r2': r2,
          'points': int(x.size)}


def fit_with_experts(k, ops_count, seconds) -> dict:
  """Least squares seconds ~ overhead_s + seconds_per_expert * k + seconds_per_op * ops.

  Each active expert has a cost of its own besides its ops (its weights are gathered
  and its layers are separate kernels), which the one-variable fit folds into the
  overhead and the slope. With K = 1 the k column is constant and the minimum-norm
  solution is returned.
  """
  k = np.asarray(k, np.float64)
  x = np.asarray(ops_count, np.float64)
  y = np.asarray(seconds, np.float64)
  design = np.stack([np.ones_like(x), k, x], 1)
  (overhead, per_expert, per_op), *_ = np.linalg.lstsq(design, y, rcond=None)
  residual = y - design @ np.array([overhead, per_expert, per_op])
  total = float(((y - y.mean()) ** 2).sum())
  return {'overhead_s': float(overhead), 'seconds_per_expert': float(per_expert),
          'seconds_per_op': float(per_op),
          'r2': 1.0 - float((residual ** 2).sum()) / total if total > 0 else None}


# ------------------------------------------------------- exit-bucketed batched path


def group_by_exit(config: ModelConfig, k, l, chunk: int = 16
                  ) -> list[tuple[int, int, np.ndarray]]:
  """(k, l, slot indices int32 [chunk]) of every call of the exit-bucketed path.

  Slots are grouped by their exit on the host and each group is cut into calls of
  `chunk` slots, so there is exactly one compiled variant per exit whatever the mix.
  Only a group's last call is padded, with copies of the group's first slot: real
  inputs, so nothing becomes NaN, and the duplicate writes carry identical values.
  """
  if not isinstance(chunk, (int, np.integer)) or chunk < 1:
    raise ValueError(f'chunk = {chunk!r}; must be a positive integer')
  k, l = np.asarray(k), np.asarray(l)
  if (k.ndim != 1 or k.shape != l.shape or not np.issubdtype(k.dtype, np.integer)
      or not np.issubdtype(l.dtype, np.integer)):
    raise ValueError(f'k and l must be integer arrays [B] of the same shape; got '
                     f'{k.dtype}{list(k.shape)} and {l.dtype}{list(l.shape)}')
  K, L = config.num_experts, config.max_depth
  if k.size and (k.min() < 1 or k.max() > K or l.min() < 1 or l.max() > L):
    raise ValueError(f'(k, l) outside 1..{K} x 1..{L} (ModelConfig.num_experts, max_depth)')
  option = (k.astype(np.int64) - 1) * L + (l - 1)
  order = np.argsort(option, kind='stable')
  counts = np.bincount(option, minlength=K * L)
  bounds = np.concatenate([[0], np.cumsum(counts)])
  calls = []
  for o in np.flatnonzero(counts):
    members = order[bounds[o]:bounds[o + 1]]
    for start in range(0, len(members), chunk):
      part = members[start:start + chunk]
      part = np.concatenate([part, np.full(chunk - len(part), members[0])])
      calls.append((int(o // L + 1), int(o % L + 1), part.astype(np.int32)))
  return calls


@functools.lru_cache(maxsize=None)
def _bucket_call(config: ModelConfig, k: int, l: int):
  """Jitted: gather a chunk of slots, run exit (k, l) on it only, scatter into `out`.

  `out` is donated, so the scatter writes in place instead of copying the whole batch
  once per call.
  """
  def run(variables, features, offload_mask, index, out):
    got = per_slot_forward(config, k, l, variables, features[index], offload_mask[index])
    return jax.tree.map(lambda o, g: o.at[index].set(g.astype(o.dtype)), out, got)

  return jax.jit(run, donate_argnums=4)


def bucketed_apply(config: ModelConfig, variables: dict, features: Array,
                   offload_mask: Array, k, l, *, chunk: int = 16) -> Allocation:
  """Exit-bucketed batched inference: every slot runs only its own sub-network.

  features [B, W, 5], offload_mask bool [B, W], k and l int [B] (host or device). Slots
  are grouped by (k, l) on the host (`group_by_exit`) and each call runs the per-slot
  variant of one exit vmapped over `chunk` slots, so the work follows each slot's
  exit, unlike the batched path (`moe_forward`), which computes every expert and layer
  and masks them. Gives the same `Allocation` as the batched path (to float rounding).

  Small chunks are faster on CPU: each slot gathers its own k experts' weights
  ([chunk, k, width, width] per layer), which should stay in cache. At the paper's
  size on a loaded 2-core CPU, 4096 slots of a uniform mix ran at ~18k slots/s with
  16 slots per call, ~11k with 64, ~12k with 8 and ~4.6k with every group padded to
  a power of two. One compile per exit (and chunk size).
  """
  features, offload_mask = check_inputs(config, features, offload_mask)
  if features.ndim != 3 or np.shape(k) != features.shape[:1] or np.shape(l) != np.shape(k):
    raise ValueError(f'expected features [B, W, 5] and k, l [B]; got features '
                     f'{features.shape}, k {np.shape(k)}, l {np.shape(l)}')
  calls = group_by_exit(config, k, l, chunk)
  batch, width = offload_mask.shape
  # Five distinct buffers: one donated buffer cannot back two outputs.
  out = Allocation(*(jnp.zeros((batch, width), features.dtype) for _ in range(4)),
                   jnp.zeros((batch, config.num_experts), features.dtype))
  for kk, ll, index in calls:
    out = _bucket_call(config, kk, ll)(variables, features, offload_mask, index, out)
  return out


# ------------------------------------------------------------------ exits suite


def network_variables(mec: MECConfig, model: ModelConfig, seed: int = 0,
                      params=None) -> tuple[dict, dict]:
  """({name: flax variables}, {name: 'trained' | 'random'}) for the four networks.

  Latency does not depend on the parameter values, so networks missing from `params`
  (a `dynn_jax.evaluation.Params`, or None) get random ones: N(0, 1 / fan_in), finite
  and of a trained network's scale (no subnormals to slow the CPU down). They come from
  the modules' parameter shapes (`jax.eval_shape`), not from `init`, whose compile
  takes seconds for the allocator.
  """
  slots = sample_slots(jax.random.PRNGKey(0), mec)
  feats = normalized_features(slots, mec)
  modules = {'allocator': MoEAllocator(model), 'static': StaticAllocator(model),
             'policy': Policy(model), 'scheduler': Scheduler(model)}
  rng = np.random.default_rng(seed)
  variables, sources = {}, {}
  for name, module in modules.items():
    trained = None if params is None else getattr(params, name)
    if trained is not None:
      variables[name], sources[name] = {'params': trained}, 'trained'
      continue
    shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), feats, slots.mask)
    variables[name] = jax.tree.map(lambda leaf: _random_leaf(rng, leaf), shapes)
    sources[name] = 'random'
  return variables, sources


def _random_leaf(rng: np.random.Generator, leaf) -> Array:
  fan_in = leaf.shape[-2] if len(leaf.shape) >= 2 else leaf.shape[0]
  values = rng.normal(0.0, 1.0 / np.sqrt(max(fan_in, 1)), leaf.shape)
  return jnp.asarray(values, leaf.dtype)


def _dispatch_floor(variables, features, offload_mask):
  # Same arguments as a per-slot call (the parameter tree is flattened either way),
  # almost no work: what any call of this signature costs.
  return features[0, 0]


def _dispatch_floor_features(features, offload_mask):
  return features[0, 0]


def _timed(timing: Timing, **extra) -> dict:
  return {**timing.to_dict(), **extra}


def time_interleaved(entries: dict, *, min_seconds: float, round_seconds: float = 0.02,
                     warmup: int = 3, max_calls: int = 100_000, seed: int = 0
                     ) -> dict[str, Timing]:
  """Times compiled functions in shuffled round-robin rounds, not one after another.

  `entries`: {name: (compiled, args, min_calls, compile_s)}. Each round gives every
  function about `round_seconds` of back-to-back calls, each call timed on its own
  with `block_until_ready`; a function leaves the rounds once it has `min_calls` calls
  and `min_seconds` of call time. On a shared machine the load drifts over a run:
  timed one after another, two exits can differ by 2x from the load alone, while
  interleaved they see the same mix, so their ratios (and the ratio to the dispatch
  floor, timed in the same rounds) mean something.
  """
  rng = np.random.default_rng(seed)
  estimate, times = {}, {name: [] for name in entries}
  for name, (fn, args, _, _) in entries.items():
    for _ in range(warmup):
      jax.block_until_ready(fn(*args))
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    estimate[name] = time.perf_counter() - start
  pending = list(entries)
  while pending:
    for i in rng.permutation(len(pending)):
      name = pending[i]
      fn, args = entries[name][:2]
      calls = max(1, int(round_seconds / max(estimate[name], 1e-7)))
      got = times[name]
      for _ in range(calls):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        got.append(time.perf_counter() - start)
      estimate[name] = float(np.median(got[-calls:]))
    pending = [name for name in pending
               if len(times[name]) < max_calls
               and (len(times[name]) < entries[name][2] or sum(times[name]) < min_seconds)]
  out = {}
  for name, got in times.items():
    got = np.asarray(got)
    out[name] = Timing(median_s=float(np.median(got)), p10_s=float(np.percentile(got, 10)),
                       p90_s=float(np.percentile(got, 90)), calls=int(got.size),
                       compile_s=entries[name][3])
  return out


def exits_suite(mec: MECConfig, model: ModelConfig, *, n_users: int | None = None,
                seed: int = 0, min_seconds: float = 1.0, min_calls: int = 1000,
                heavy_calls: int = 10, batch: int = 4096, chunk: int = 16,
                ga_config: GAConfig = GAConfig(), params=None,
                log: Callable[[str], None] | None = None) -> dict:
  """Per-slot latency of every exit and of the other networks and solvers, batched
  throughput (masked vs exit-bucketed), the fitted device constant and the table.

  n_users: real (all offloaded) users in the timed slots, default `mec.n_users`; the
  compiled shapes use the padded width `mec.width`, which the per-slot cost follows.
  Every per-slot figure (exits, dispatch floor, other networks, solvers) comes from
  one interleaved timing (`time_interleaved`): at least `min_calls` calls and
  `min_seconds` each, the GA at least `min(min_calls, heavy_calls)` calls. The batched
  paths run after, until `min(min_calls, heavy_calls)` calls and `min_seconds`.
  `params`: trained networks (`dynn_jax.evaluation.Params`), random ones where None.
  """
  n_users = mec.n_users if n_users is None else n_users
  if not 1 <= n_users <= mec.width:
    raise ValueError(f'n_users = {n_users}; allowed range [1, {mec.width}] (the padded width)')
  if mec.width > model.max_users:
    raise ValueError(f'the padded width {mec.width} exceeds ModelConfig.max_users = '
                     f'{model.max_users}')
  say = log or (lambda message: None)
  K, L = model.num_experts, model.max_depth
  key = jax.random.PRNGKey(seed)
  variables, sources = network_variables(mec, model, seed, params)
  slots = sample_slots(jax.random.fold_in(key, 1), mec, n_users=n_users)
  feats, mask = normalized_features(slots, mec), slots.mask
  alloc = variables['allocator']
  heavy_min = min(min_calls, heavy_calls)
  results = {'n_users': n_users, 'width': mec.width, 'batch': batch, 'seed': seed,
             'min_calls': min_calls, 'min_seconds': min_seconds, 'networks': sources,
             'load_start': host_load(), 'runtime': runtime_info()}

  static, sched, policy = StaticAllocator(model), Scheduler(model), Policy(model)
  jobs = {  # name: (function, args, min calls)
      'dispatch_floor': (_dispatch_floor, (alloc, feats, mask), min_calls),
      'dispatch_floor_features': (_dispatch_floor_features, (feats, mask), min_calls),
      'static': (lambda v, f, m: static.apply(v, f, m), (variables['static'], feats, mask),
                 min_calls),
      'scheduler': (lambda v, f, m: sched.apply(v, f, m),
                    (variables['scheduler'], feats, mask), min_calls),
      'policy': (lambda v, f, m: policy.apply(v, f, m), (variables['policy'], feats, mask),
                 min_calls),
      'optimal_allocation': (lambda s, x: optimal_allocation(s, x, mec), (slots, mask),
                             min_calls),
      'equal_split': (lambda s, x: equal_split(s, x, mec), (slots, mask), min_calls),
      'ga': (lambda kk, s: ga_solve(kk, s, mec, ga_config)[0], (key, slots), heavy_min),
      'oracle': (lambda s: oracle(s, mec), (slots,), heavy_min),
  }
  for k in range(1, K + 1):
    for l in range(1, L + 1):
      jobs[(k, l)] = (per_slot_apply(model, k, l), (alloc, feats, mask), min_calls)
  entries = {}
  say(f'compiling {len(jobs)} per-slot functions ahead of time')
  for name, (fn, args, calls) in jobs.items():
    compiled, compile_s = compile_ahead(fn, *args)
    entries[name] = (compiled, args, calls, compile_s)
  say(f'timing {len(entries)} per-slot functions, interleaved')
  timed = time_interleaved(entries, min_seconds=min_seconds, seed=seed)

  results['exits'] = []
  for k in range(1, K + 1):
    for l in range(1, L + 1):
      count = float(ops.allocation_ops(model, k, l, n_users))
      results['exits'].append(_timed(timed[(k, l)], k=k, l=l, ops=count,
                                     modelled_delay_s=float(ops.ops_to_delay(count, mec))))
  extra = {'static': {'ops': float(ops.static_ops(model, n_users))},
           'scheduler': {'ops': float(ops.scheduler_ops(model, n_users))},
           'policy': {'ops': float(ops.policy_ops(model))},
           'ga': {'population': ga_config.population(mec),
                  'generations': ga_config.generations}}
  for name in jobs:
    if isinstance(name, str):
      results[name] = _timed(timed[name], **extra.get(name, {}))

  say(f'timing the batched paths, {batch} slots per call')
  results['batched_masked'], results['batched_bucketed'] = _batched(
      mec, model, alloc, jax.random.fold_in(key, 2), batch, n_users, chunk,
      dict(min_calls=heavy_min, min_seconds=min_seconds))

  exits = results['exits']
  medians = [e['median_s'] for e in exits]
  results['fit'] = {**fit_line([e['ops'] for e in exits], medians),
                    'modelled_seconds_per_op': mec.cycles_per_op / mec.f_ser}
  results['fit_with_experts'] = fit_with_experts([e['k'] for e in exits],
                                                 [e['ops'] for e in exits], medians)
  results['load_end'] = host_load()
  results['targets'] = targets(results, K, L)
  results['latency_table'] = latency_table(results, mec, model)
  return results


def _batched(mec: MECConfig, model: ModelConfig, alloc: dict, key: Array, batch: int,
             n_users: int, chunk: int, timing: dict) -> tuple[dict, dict]:
  """Throughput of the masked batched path and of the exit-bucketed one on a uniform
  random mix of exits, and how far apart their shares are."""
  ks, ko = jax.random.split(key)
  slots = sample_slots(ks, mec, batch, n_users=n_users)
  feats, mask = normalized_features(slots, mec), slots.mask
  option = jax.random.randint(ko, (batch,), 0, model.num_options)
  k, l = option // model.max_depth + 1, option % model.max_depth + 1

  def masked(v, f, m, k, l):
    return moe_forward(model, v, f, m, k, l)

  compiled, compile_s = compile_ahead(masked, alloc, feats, mask, k, l)
  masked_out = compiled(alloc, feats, mask, k, l)
  t = time_calls(compiled, alloc, feats, mask, k, l, compile_s=compile_s, **timing)
  masked_result = _timed(t.per_item(batch), batch=batch, slots_per_s=t.rate(batch))

  # The host-side grouping is part of every timed call; the first call compiles one
  # variant per exit and stands for the compile time.
  bucketed = functools.partial(bucketed_apply, model, chunk=chunk)
  start = time.perf_counter()
  out = jax.block_until_ready(bucketed(alloc, feats, mask, k, l))
  first_s = time.perf_counter() - start
  t = time_calls(bucketed, alloc, feats, mask, k, l, compile_s=first_s, **timing)
  calls = group_by_exit(model, np.asarray(k), np.asarray(l), chunk)
  diff = max(float(jnp.max(jnp.abs(getattr(out, name) - getattr(masked_out, name))))
             for name in ('b_share', 'f_share'))
  bucketed_result = _timed(t.per_item(batch), batch=batch, slots_per_s=t.rate(batch),
                           calls_per_batch=len(calls), padded_slots=len(calls) * chunk - batch,
                           chunk=chunk, max_abs_share_diff=diff)
  return masked_result, bucketed_result


def targets(results: dict, K: int, L: int) -> dict:
  """The issue's latency targets, as measured in this run (recorded, never asserted)."""
  exits = {(e['k'], e['l']): e['median_s'] for e in results['exits']}
  smallest, full = exits[(1, 1)], exits[(K, L)]
  floor = results['dispatch_floor']['median_s']
  speedup = (results['batched_bucketed']['slots_per_s']
             / results['batched_masked']['slots_per_s'])
  out = {'smallest_over_floor': (smallest / floor, '<=', 4.0),
         'full_over_smallest': (full / smallest, '>=', 3.0),
         'bucketed_over_masked_throughput': (speedup, '>=', 1.5)}
  return {name: {'value': value, 'target': f'{op} {bound}',
                 'met': value <= bound if op == '<=' else value >= bound}
          for name, (value, op, bound) in out.items()}


def latency_table(results: dict, mec: MECConfig, model: ModelConfig) -> dict:
  """The measured inference-delay table (`dynn_jax.latency` format) of an exits run."""
  K, L = model.num_experts, model.max_depth
  grid = [[None] * L for _ in range(K)]
  for e in results['exits']:
    grid[e['k'] - 1][e['l'] - 1] = e['median_s']
  return {'format': latency.TABLE_FORMAT,
          'device': {**latency.current_device(), **runtime_info()},
          'n_users': mec.width, 'n_offloaded': results['n_users'],
          'model': model.to_dict(), 'allocator_s': grid,
          'static_s': results['static']['median_s'],
          'policy_s': results['policy']['median_s'],
          'scheduler_s': results['scheduler']['median_s'],
          'solvers_s': {'kkt_weighted': results['optimal_allocation']['median_s'],
                        'ga': results['ga']['median_s'],
                        'oracle': results['oracle']['median_s'],
                        'equal_split': results['equal_split']['median_s']},
          'dispatch_floor_s': results['dispatch_floor']['median_s'],
          'fit': {k: results['fit'][k] for k in ('seconds_per_op', 'overhead_s', 'r2')},
          'fit_with_experts': results['fit_with_experts'],
          'measured_at': time.strftime('%Y-%m-%dT%H:%M:%S%z'),
          'load': results['load_start']}


def _slug(text: str) -> str:
  return re.sub(r'[^a-z0-9]+', '_', str(text).lower()).strip('_') or 'unknown'


def table_path(out_dir: str, device: dict, width: int, ext: str = 'json') -> str:
  """<out_dir>/latency_<platform>_<device_kind>_n<W>.<ext>: one table per device and width."""
  name = f'latency_{_slug(device["platform"])}_{_slug(device["device_kind"])}_n{width}'
  return os.path.join(out_dir, f'{name}.{ext}')


def write_table(out_dir: str, table: dict) -> str:
  path = table_path(out_dir, table['device'], table['n_users'])
  write_json_atomic(path, table)
  return path


def format_exits(results: dict) -> str:
  """Per-exit table (microseconds), the other networks and solvers, fit and targets."""
  us = lambda s: f'{s * 1e6:10.1f}'
  floor = results['dispatch_floor']['median_s']
  lines = [f'{"k":>3s} {"l":>2s} {"ops":>10s} {"modelled":>10s} {"median":>10s} '
           f'{"p10":>10s} {"p90":>10s} {"x floor":>8s} {"calls":>7s} {"compile s":>9s}'
           '   (times in us)']
  for e in results['exits']:
    lines.append(f'{e["k"]:3d} {e["l"]:2d} {e["ops"]:10.4g} {us(e["modelled_delay_s"])} '
                 f'{us(e["median_s"])} {us(e["p10_s"])} {us(e["p90_s"])} '
                 f'{e["median_s"] / floor:8.2f} {e["calls"]:7d} {e["compile_s"]:9.2f}')
  lines.append('')
  others = {name: results[name] for name in (
      'dispatch_floor', 'dispatch_floor_features', 'static',
      'scheduler', 'policy', 'optimal_allocation', 'equal_split', 'ga', 'batched_masked',
      'batched_bucketed')}
  lines.append(format_table(others))
  fit = results['fit']
  r2 = 'n/a' if fit['r2'] is None else f'{fit["r2"]:.3f}'
  lines.append(f'\nfit: latency = {fit["overhead_s"] * 1e6:.2f} us + '
               f'{fit["seconds_per_op"] * 1e12:.2f} ps/op x ops   (R^2 {r2}; modelled '
               f'{fit["modelled_seconds_per_op"] * 1e12:.0f} ps/op, no overhead)')
  fk = results['fit_with_experts']
  r2 = 'n/a' if fk['r2'] is None else f'{fk["r2"]:.3f}'
  lines.append(f'     latency = {fk["overhead_s"] * 1e6:.2f} us + '
               f'{fk["seconds_per_expert"] * 1e6:.2f} us x k + '
               f'{fk["seconds_per_op"] * 1e12:.2f} ps/op x ops   (R^2 {r2})')
  for name, t in results['targets'].items():
    lines.append(f'{name:34s} {t["value"]:8.2f}  target {t["target"]:8s} '
                 f'{"met" if t["met"] else "MISSED"}')
  start, end = results['load_start'], results['load_end']
  lines.append(f'load average (1 min) {start["load_1m"]:.2f} -> {end["load_1m"]:.2f} on '
               f'{start["cpu_count"]} cores; cpu async dispatch '
               f'{results["runtime"]["cpu_async_dispatch"]}')
  return '\n'.join(lines)


# ------------------------------------------------------------------ profile


def write_profile(profile_dir: str, mec: MECConfig, model: ModelConfig,
                  variables: dict, *, calls: int = 5, train_steps: int = 3,
                  train_batch: int = 64, seed: int = 0) -> dict:
  """A jax.profiler trace (TensorBoard / Perfetto) of per-slot calls of the smallest and
  the full exit and of a few allocator training steps, all compiled beforehand so the
  trace shows execution, not compilation. `variables`: `network_variables(...)[0]`.

  Returns the files of this trace: {'dir', 'perfetto', 'xplane'} (jax writes each trace
  to a new <profile_dir>/plugins/profile/<time> folder).
  """
  # Imported here: training pulls in optax and the evaluation module, which the
  # timing suites do not need.
  import optax
  from dynn_jax import training

  slots = sample_slots(jax.random.PRNGKey(seed), mec)
  feats, mask = normalized_features(slots, mec), slots.mask
  alloc = variables['allocator']
  exits = sorted({(1, 1), (model.num_experts, model.max_depth)})
  compiled = {kl: per_slot_apply(model, *kl).lower(alloc, feats, mask).compile()
              for kl in exits}
  train = training.TrainConfig(seed=seed, batch=train_batch)
  tx = optax.adam(train.alloc_lr)
  params = alloc['params']
  state = training.TrainState(params, tx.init(params), jnp.int32(0))
  step = training.allocator_step(training.moe_apply(model), tx, mec, train, model,
                                 dynamic=True)
  chunk = training._scan_chunk(step, jax.random.PRNGKey(seed + 1))
  for kl, fn in compiled.items():
    jax.block_until_ready(fn(alloc, feats, mask))
  jax.block_until_ready(chunk(state, 1))

  with jax.profiler.trace(profile_dir, create_perfetto_trace=True):
    for (k, l), fn in compiled.items():
      for i in range(calls):
        with jax.profiler.TraceAnnotation(f'per_slot k={k} l={l} call {i}'):
          jax.block_until_ready(fn(alloc, feats, mask))
    for i in range(train_steps):
      with jax.profiler.StepTraceAnnotation('train_allocator', step_num=i):
        state, _ = chunk(state, 1)
        jax.block_until_ready(state)
  return _trace_files(profile_dir)


def _trace_files(profile_dir: str) -> dict:
  runs = os.path.join(profile_dir, 'plugins', 'profile')
  newest = max((os.path.join(runs, d) for d in os.listdir(runs)), key=os.path.getmtime)
  files = sorted(os.listdir(newest))
  pick = lambda suffix: next((os.path.join(newest, f) for f in files if f.endswith(suffix)),
                             None)
  return {'dir': newest, 'perfetto': pick('perfetto_trace.json.gz'),
          'xplane': pick('.xplane.pb')}
