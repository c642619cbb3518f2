"""The exits suite: what each exit (k, l) of the allocation DyNN costs on this device.

`exits_suite`: the real per-slot latency of every exit (`per_slot_apply`), next to the
runtime's dispatch floor, the static model, the scheduler, the policy and the solvers;
the batched throughput with every expert computed and masked (`moe_forward`) against
the exit-bucketed path (`bucketed_apply`, grouped on the host) and the exit-sorted
one (`exit_sorted_apply`, grouped on device); a least-squares device constant
(seconds per counted op plus a fixed overhead), the issue's latency targets as
measured, and the measured inference-delay table in the `dynn_jax.latency` format
(`latency_table`, `write_table`).

Per-slot figures are single calls on one slot ([W, 5] features), compiled ahead of
time, warmed up and timed one call at a time with `block_until_ready`; compile time
is reported apart. On CPU, jax dispatches asynchronously by default, handing each call
to a worker thread: for calls of a few tens of microseconds that hand-off dominates and
varies with the machine's load, so `launch/benchmark.py` turns it off before the
backend starts (`--cpu_async_dispatch`) and the results record which mode ran.

`block_sweep`: the exit-sorted path's throughput per block size, next to the masked and
exit-bucketed paths, on a uniform and a skewed mix of exits (how its default block was
chosen).

Owns these suites, their tables and the latency table's file name; timing is
`timing`'s, device identity `host`'s, and nothing here evaluates methods.
"""

from __future__ import annotations

import functools
import os
import re
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from dynn_jax import delay, latency, ops
from dynn_jax.benchmark.bucketed import bucketed_apply, group_by_exit
from dynn_jax.benchmark.host import host_load, load_line, runtime_info, target_lines
from dynn_jax.benchmark.timing import (compile_ahead, format_table, time_calls,
                                       time_interleaved, timed)
from dynn_jax.benchmark.variables import network_variables
from dynn_jax.config import MECConfig
from dynn_jax.env import normalized_features, sample_slots
from dynn_jax.io import write_json_atomic
from dynn_jax.models import (EXIT_SORTED_BLOCK, Allocation, ModelConfig, Policy, Scheduler,
                             StaticAllocator, exit_sorted_apply, kl_to_option, moe_forward,
                             option_to_kl, per_slot_apply)
from dynn_jax.solvers import equal_split, optimal_allocation, oracle
from dynn_jax.solvers.ga import GAConfig, ga_solve

Array = jax.Array


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


def _dispatch_floor(variables, features, offload_mask):
  # Same arguments as a per-slot call (the parameter tree is flattened either way),
  # almost no work: what any call of this signature costs.
  return features[0, 0]


def _dispatch_floor_features(features, offload_mask):
  return features[0, 0]


def exits_suite(mec: MECConfig, model: ModelConfig, *, n_users: int | None = None,
                seed: int = 0, min_seconds: float = 1.0, min_calls: int = 1000,
                heavy_calls: int = 10, batch: int = 4096, chunk: int = 16,
                block: int = EXIT_SORTED_BLOCK, ga_config: GAConfig = GAConfig(), params=None,
                log: Callable[[str], None] | None = None) -> dict:
  """Per-slot latency of every exit and of the other networks and solvers, batched
  throughput (masked vs exit-bucketed vs exit-sorted, `block` slots per block), the
  fitted device constant and the table.

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
  timings = time_interleaved(entries, min_seconds=min_seconds, seed=seed)

  results['exits'] = []
  for k in range(1, K + 1):
    for l in range(1, L + 1):
      count = float(ops.allocation_ops(model, k, l, n_users))
      results['exits'].append(timed(timings[(k, l)], k=k, l=l, ops=count,
                                     modelled_delay_s=float(delay.modelled_seconds(
                                         ops.as_float(count), mec))))
  extra = {'static': {'ops': float(ops.static_ops(model, n_users))},
           'scheduler': {'ops': float(ops.scheduler_ops(model, n_users))},
           'policy': {'ops': float(ops.policy_ops(model))},
           'ga': {'population': ga_config.population(mec),
                  'generations': ga_config.generations}}
  for name in jobs:
    if isinstance(name, str):
      results[name] = timed(timings[name], **extra.get(name, {}))

  say(f'timing the batched paths, {batch} slots per call')
  (results['batched_masked'], results['batched_bucketed'],
   results['batched_sorted']) = _batched(
      mec, model, alloc, jax.random.fold_in(key, 2), batch, n_users, chunk,
      dict(min_calls=heavy_min, min_seconds=min_seconds), block)

  exits = results['exits']
  medians = [e['median_s'] for e in exits]
  results['fit'] = {**fit_line([e['ops'] for e in exits], medians),
                    'modelled_seconds_per_op': delay.modelled_seconds(1.0, mec)}
  results['fit_with_experts'] = fit_with_experts([e['k'] for e in exits],
                                                 [e['ops'] for e in exits], medians)
  results['load_end'] = host_load()
  results['targets'] = targets(results, K, L)
  results['latency_table'] = latency_table(results, mec, model)
  return results


def _share_diff(got: Allocation, want: Allocation) -> float:
  return max(float(jnp.max(jnp.abs(getattr(got, name) - getattr(want, name))))
             for name in ('b_share', 'f_share'))


def sorted_layout(config: ModelConfig, k, l, block: int) -> dict:
  """Block counts of `exit_sorted_apply` for host (k, l) [B]: the static number of
  block steps, those holding slots, and the padding slots among them."""
  option = np.asarray(kl_to_option(k, l, config))
  counts = np.bincount(option, minlength=config.num_options)
  live = int((-(-counts // block)).sum())
  steps = max(-(-option.size // block) + config.num_options - 1, 1)
  return {'block': block, 'blocks_per_batch': steps, 'live_blocks': live,
          'padded_slots': live * block - int(option.size)}


def _sorted_fn(model: ModelConfig, block: int):
  def run(v, f, m, k, l):
    return exit_sorted_apply(model, v, f, m, k, l, block=block)
  return run


def _batched(mec: MECConfig, model: ModelConfig, alloc: dict, key: Array, batch: int,
             n_users: int, chunk: int, timing: dict, block: int = EXIT_SORTED_BLOCK
             ) -> tuple[dict, dict, dict]:
  """Throughput of the masked batched path, the exit-bucketed one and the exit-sorted
  one on a uniform random mix of exits, and how far the last two are from the first."""
  ks, ko = jax.random.split(key)
  slots = sample_slots(ks, mec, batch, n_users=n_users)
  feats, mask = normalized_features(slots, mec), slots.mask
  option = jax.random.randint(ko, (batch,), 0, model.num_options)
  k, l = option_to_kl(option, model)

  def masked(v, f, m, k, l):
    return moe_forward(model, v, f, m, k, l)

  compiled, compile_s = compile_ahead(masked, alloc, feats, mask, k, l)
  masked_out = compiled(alloc, feats, mask, k, l)
  t = time_calls(compiled, alloc, feats, mask, k, l, compile_s=compile_s, **timing)
  masked_result = timed(t.per_item(batch), batch=batch, slots_per_s=t.rate(batch))

  # The host-side grouping is part of every timed call; the first call compiles one
  # variant per exit and stands for the compile time.
  bucketed = functools.partial(bucketed_apply, model, chunk=chunk)
  start = time.perf_counter()
  out = jax.block_until_ready(bucketed(alloc, feats, mask, k, l))
  first_s = time.perf_counter() - start
  t = time_calls(bucketed, alloc, feats, mask, k, l, compile_s=first_s, **timing)
  calls = group_by_exit(model, np.asarray(k), np.asarray(l), chunk)
  bucketed_result = timed(t.per_item(batch), batch=batch, slots_per_s=t.rate(batch),
                           calls_per_batch=len(calls), padded_slots=len(calls) * chunk - batch,
                           chunk=chunk, max_abs_share_diff=_share_diff(out, masked_out))

  compiled, compile_s = compile_ahead(_sorted_fn(model, block), alloc, feats, mask, k, l)
  out = compiled(alloc, feats, mask, k, l)
  t = time_calls(compiled, alloc, feats, mask, k, l, compile_s=compile_s, **timing)
  sorted_result = timed(t.per_item(batch), batch=batch, slots_per_s=t.rate(batch),
                         **sorted_layout(model, k, l, block),
                         max_abs_share_diff=_share_diff(out, masked_out))
  return masked_result, bucketed_result, sorted_result


def exit_mix(model: ModelConfig, name: str, batch: int, seed: int = 0
             ) -> tuple[np.ndarray, np.ndarray]:
  """(k, l) int32 [batch] of a named mix of exits.

  'uniform': every option equally likely. 'skewed': P(option) proportional to
  1 / (option + 1)^2, so cheap exits dominate (about 60% at (1, 1) for K * L = 30) with
  every exit present in a long tail: many small groups, the layout's worst padding.
  'single': every slot at (1, 1), what the shipped policies pick on sampled slots.
  """
  rng = np.random.default_rng(seed)
  n = model.num_options
  if name == 'uniform':
    option = rng.integers(0, n, batch)
  elif name == 'skewed':
    weights = 1.0 / np.arange(1, n + 1) ** 2
    option = rng.choice(n, batch, p=weights / weights.sum())
  elif name == 'single':
    option = np.zeros(batch, np.int64)
  else:
    raise ValueError(f'mix = {name!r}; must be one of uniform, skewed, single')
  return tuple(np.asarray(a) for a in option_to_kl(option, model))


def block_sweep(mec: MECConfig | None = None, model: ModelConfig | None = None, *,
                blocks: tuple[int, ...] = (8, 16, 32, 64, 128), batch: int = 8192,
                mixes: tuple[str, ...] = ('uniform', 'skewed'), chunk: int = 16,
                seed: int = 0, min_seconds: float = 2.0, min_calls: int = 5,
                params=None, log: Callable[[str], None] | None = print) -> dict:
  """Exit-sorted throughput per block size beside the masked and exit-bucketed paths.

  Defaults are the paper's sizes (case 1, N = 30 of W = 45 positions, K = 10, L = 3,
  width 64) with random parameters (`network_variables`). Per mix, every path is
  compiled ahead of time, then all are timed in the same interleaved rounds
  (`time_interleaved`), so a drifting load hits them alike. The exit-bucketed path's
  compile time is its first call's, which reuses variants compiled for an earlier mix.
  Returns
  {mix: {path: timing dict with slots_per_s, ...}}; prints a table through `log`.

    python -c 'from dynn_jax.benchmark import block_sweep; block_sweep()'
  """
  mec = mec or MECConfig(case=1, n_users=30, n_max=45)
  model = model or ModelConfig.for_env(mec)
  say = log or (lambda message: None)
  alloc = network_variables(mec, model, seed, params)[0]['allocator']
  slots = sample_slots(jax.random.PRNGKey(seed), mec, batch)
  feats, mask = normalized_features(slots, mec), slots.mask

  results = {'batch': batch, 'width': mec.width, 'model': model.to_dict(),
             'load_start': host_load()}
  for mix in mixes:
    def masked(v, f, m, k, l):  # a new function per mix: its compile is timed each time
      return moe_forward(model, v, f, m, k, l)

    k, l = (jnp.asarray(a) for a in exit_mix(model, mix, batch, seed))
    args = (alloc, feats, mask, k, l)
    entries, extra = {}, {}
    compiled, compile_s = compile_ahead(masked, *args)
    entries['masked'] = (compiled, args, min_calls, compile_s)
    want = compiled(*args)
    bucketed = functools.partial(bucketed_apply, model, chunk=chunk)
    start = time.perf_counter()
    out = jax.block_until_ready(bucketed(*args))
    entries['bucketed'] = (bucketed, args, min_calls, time.perf_counter() - start)
    extra['bucketed'] = {'chunk': chunk, 'max_abs_share_diff': _share_diff(out, want)}
    for block in blocks:
      say(f'{mix}: compiling the exit-sorted path, block {block}')
      compiled, compile_s = compile_ahead(_sorted_fn(model, block), *args)
      name = f'sorted_{block}'
      entries[name] = (compiled, args, min_calls, compile_s)
      extra[name] = {**sorted_layout(model, k, l, block),
                     'max_abs_share_diff': _share_diff(compiled(*args), want)}
    say(f'{mix}: timing {len(entries)} paths, interleaved')
    timings = time_interleaved(entries, min_seconds=min_seconds, seed=seed)
    results[mix] = {name: timed(t.per_item(batch), batch=batch, slots_per_s=t.rate(batch),
                                 **extra.get(name, {}))
                    for name, t in timings.items()}
  results['load_end'] = host_load()
  say(format_block_sweep(results))
  return results


def format_block_sweep(results: dict) -> str:
  lines = [f'{"mix":8s} {"path":12s} {"slots/s":>10s} {"us/slot":>9s} {"p10":>9s} '
           f'{"p90":>9s} {"calls":>6s} {"compile s":>9s} {"padded":>7s} {"|diff|":>8s}']
  for mix, paths in results.items():
    if not isinstance(paths, dict) or 'masked' not in paths:
      continue
    for name, r in paths.items():
      diff = r.get('max_abs_share_diff')
      lines.append(f'{mix:8s} {name:12s} {r["slots_per_s"]:10.0f} {r["median_s"] * 1e6:9.2f} '
                   f'{r["p10_s"] * 1e6:9.2f} {r["p90_s"] * 1e6:9.2f} {r["calls"]:6d} '
                   f'{r["compile_s"]:9.2f} {r.get("padded_slots", ""):>7} '
                   f'{"" if diff is None else f"{diff:.1e}":>8s}')
  lines.append(f'{results["batch"]} slots per call, W = {results["width"]}; '
               + load_line(results['load_start'], results['load_end']))
  return '\n'.join(lines)


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
  if 'batched_sorted' in results:
    out['sorted_over_masked_throughput'] = (
        results['batched_sorted']['slots_per_s'] / results['batched_masked']['slots_per_s'],
        '>=', 1.5)
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
      'scheduler', 'policy', 'optimal_allocation', 'equal_split', 'ga', 'oracle', 'batched_masked',
      'batched_bucketed', 'batched_sorted') if name in results}
  lines.append(format_table(others))
  for name, label in (('batched_bucketed', 'exit-bucketed'), ('batched_sorted', 'exit-sorted')):
    if name in results:
      r = results[name]
      size = (f'chunk {r["chunk"]}, {r["calls_per_batch"]} calls' if 'chunk' in r else
              f'block {r["block"]}, {r["live_blocks"]} of {r["blocks_per_batch"]} blocks')
      lines.append(f'{label}: {size}, {r["padded_slots"]} padded slots per batch, max '
                   f'|share - masked| {r["max_abs_share_diff"]:.1e}')
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
  lines += target_lines(results['targets'])
  lines.append(load_line(results['load_start'], results['load_end'])
               + f'; cpu async dispatch {results["runtime"]["cpu_async_dispatch"]}')
  return '\n'.join(lines)
