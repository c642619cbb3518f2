"""The evaluation suite: each method's throughput and peak memory in `evaluate`.

For every method, `evaluation_suite` times `dynn_jax.evaluation.evaluate` on that one
method exactly as a user calls it (`slots` slots in chunks of `chunk`; the slow
solvers, `slow_methods`, on `slow_slots` slots). The first call compiles; a second
one warms up; then every method is timed in the same interleaved rounds
(`timing.time_interleaved`), so a drifting load hits them alike. Compile time is the
first call's time minus the median warm call's.

Peak memory, per method, of the compiled chunk program at `chunk` slots, in one or two
measures (the JSON names which):
  * 'xla': XLA's `memory_analysis()` of the program `evaluate` runs per chunk: temp +
    argument + output bytes, less aliased ones. What the program itself holds at its
    peak; not the runtime, the compiler or the host's copies.
  * 'rss' (with `rss=True`, Linux): the peak resident set of a fresh Python process
    that imports everything, loads the networks, then evaluates one chunk of the
    method (compile included), minus its resident set before that evaluation. What a
    user's process grows by, compiler included; it costs one more compile per method.

For `fix_moe` (every slot runs the full network), the counted ops per slot (the
evaluation's 'ops' metric) times its slots/s is the achieved rate, set beside the
rate of a dense float32 matmul chain of the experts' own shapes (all K experts, every
layer, on n slots of W users for each n in `reference_slots`: no gathers, no heads, no
sorting), timed in the same rounds. The rate depends on n (large n's activations leave
the cache), so the fastest n is the ceiling: dense / achieved is how far the
evaluation is from what its op count allows on this machine.

Owns this suite, its table and its child process; it must not change what `evaluate`
computes, only call it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization

from dynn_jax import evaluation
from dynn_jax.benchmark.host import host_load, load_line, runtime_info, target_lines
from dynn_jax.benchmark.timing import Entry, compile_ahead, time_interleaved, timed
from dynn_jax.config import MECConfig
from dynn_jax.models import ModelConfig
from dynn_jax.networks import Params

# Solvers too slow for the other methods' slot count (seconds per thousand slots).
SLOW_METHODS = ('oracle', 'ga', 'exhaustive')
# The evaluation targets, recorded as measured (never asserted).
POLICY_SLOTS_PER_S = 1e5
DENSE_OVER_ACHIEVED = 1.5
PEAK_MEMORY_BYTES = 1.5e9


def evaluation_suite(setting: evaluation.Setting, params: Params, *, methods=None,
                     slots: int = 8192, slow_slots: int = 256,
                     slow_methods: tuple[str, ...] = SLOW_METHODS, chunk: int = 8192,
                     seed: int = 0, min_calls: int = 3, min_seconds: float = 1.0,
                     rss: bool = False, reference_slots: tuple[int, ...] = (16, 128, 1024),
                     log: Callable[[str], None] | None = None) -> dict:
  """Slots/s (median, p10, p90 of whole `evaluate` calls), compile time and peak
  memory of every method (default: `evaluation.default_methods`), and for `fix_moe`
  the achieved against the dense-matmul GFLOP/s. See the module docstring."""
  reference_slots = tuple(reference_slots)
  for name, value in (('slots', slots), ('slow_slots', slow_slots), ('chunk', chunk),
                      ('min_calls', min_calls),
                      *((f'reference_slots[{i}]', n) for i, n in enumerate(reference_slots))):
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
      raise ValueError(f'{name} = {value!r}; must be a positive integer')
  if not (isinstance(min_seconds, (int, float)) and math.isfinite(min_seconds)
          and min_seconds >= 0):
    raise ValueError(f'min_seconds = {min_seconds!r}; must be a finite number >= 0')
  if rss and not os.path.exists('/proc/self/clear_refs'):
    raise ValueError('rss=True reads the peak RSS from /proc (Linux); this system has none')
  if rss and setting.delay is not None:
    raise ValueError('rss=True measures modelled-delay evaluations only: the child '
                     'process is not given the latency table')
  names = tuple(evaluation.default_methods(setting.mec, params) if methods is None
                else methods)
  evaluation.check_methods(names, params, setting)
  if 'fix_moe' in names and not reference_slots:
    raise ValueError('reference_slots is empty; fix_moe needs at least one size')
  say = log or (lambda message: None)
  results = {'case': setting.mec.case, 'width': setting.mec.width, 'chunk': chunk,
             'seed': seed, 'mode': setting.mode, 'min_calls': min_calls,
             'min_seconds': min_seconds,
             'memory_measures': {'xla': 'temp + argument + output - alias bytes of the '
                                        'compiled chunk program (memory_analysis)'},
             'load_start': host_load(), 'runtime': runtime_info()}
  if rss:
    results['memory_measures']['rss'] = ('peak RSS (VmHWM) of a fresh process evaluating '
                                         'one chunk (compile included) minus its RSS after '
                                         'imports and loading the networks')

  entries, methods_out = {}, {}
  for name in names:
    count = slow_slots if name in slow_methods else slots
    call = functools.partial(evaluation.evaluate, setting, (name,), params, slots=count,
                             chunk=chunk, seed=seed)
    say(f'{name}: compiling and evaluating {count} slots')
    start = time.perf_counter()
    first = call()
    first_s = time.perf_counter() - start
    call()
    methods_out[name] = {'slots': count, 'first_call_s': first_s,
                         'ops_per_slot': first.mean(name, 'ops'),
                         'memory': {'chunk': chunk, 'xla': chunk_memory(
                             setting, name, params, chunk, seed)}}
    entries[name] = Entry(call, (), min_calls)

  dense = {}  # (reference entry, slots): (flops per call, shape)
  if 'fix_moe' in names:
    for n in reference_slots:
      fn, args, flops, shape = dense_reference(setting.model, setting.mec.width, n, seed)
      compiled, compile_s = compile_ahead(fn, *args)
      jax.block_until_ready(compiled(*args))
      entries[('dense_matmul', n)] = Entry(compiled, args, min_calls, compile_s)
      dense[('dense_matmul', n)] = (flops, shape)

  say(f'timing {len(entries)} entries, interleaved')
  timings = time_interleaved(entries, min_seconds=min_seconds, warmup=0, seed=seed)
  for name in names:
    out, t = methods_out[name], timings[name]
    compile_s = max(out['first_call_s'] - t.median_s, 0.0)
    t = dataclasses.replace(t, compile_s=compile_s)
    methods_out[name] = timed(
        t.per_item(out['slots']), slots_per_s=t.rate(out['slots']),
        slots_per_s_p90=out['slots'] / t.p10_s, slots_per_s_p10=out['slots'] / t.p90_s,
        **out)
  results['methods'] = methods_out

  if 'fix_moe' in names:
    fix = methods_out['fix_moe']
    achieved = fix['ops_per_slot'] * fix['slots_per_s'] / 1e9
    sizes = [timed(timings[entry], flops_per_call=flops,
                   gflops=flops / timings[entry].median_s / 1e9, **shape)
             for entry, (flops, shape) in dense.items()]
    best = max(sizes, key=lambda d: d['gflops'])
    results['fix_moe_flops'] = {
        'ops_per_slot': fix['ops_per_slot'], 'slots_per_s': fix['slots_per_s'],
        'achieved_gflops': achieved, 'dense_gflops': best['gflops'],
        'dense_best_slots': best['slots'],
        'dense_over_achieved': best['gflops'] / achieved if achieved > 0 else None,
        'counted_ops': {'op_zeta': setting.model.op_zeta, 'op_iota': setting.model.op_iota,
                        'note': 'ops = zeta * D_in * D_out + iota per dense layer: FLOPs '
                                'when zeta = 2 and iota = 0'},
        'dense_matmul': sizes}

  if rss:
    for name in names:
      say(f'{name}: peak RSS of a fresh process, one chunk of {chunk} slots')
      methods_out[name]['memory']['rss'] = chunk_rss(setting, name, params, chunk, seed)
  results['load_end'] = host_load()
  results['targets'] = targets(results)
  return results


def chunk_memory(setting: evaluation.Setting, name: str, params: Params, chunk: int,
                 seed: int = 0) -> dict | None:
  """XLA's memory analysis of the program `evaluate` runs per chunk of `chunk` slots for
  method `name` (None where the backend gives none).

  Lowers `evaluation.compiled_chunk_sums` with the arguments `evaluate` passes it, so
  after an `evaluate` with the same chunk the compile is the one already cached.
  """
  mesh = evaluation.batch_mesh()
  devices = mesh.devices.size
  chunk = devices * math.ceil(chunk / devices)
  key = jax.random.fold_in(jax.random.PRNGKey(seed), 0)
  rows = evaluation.active_rows(setting.mec.n_users, setting.mec.width)
  compiled = evaluation.compiled_chunk_sums.lower(setting.static, setting.mec.params(),
                                                  (name,), key, params, chunk, chunk, mesh,
                                                  rows).compile()
  stats = compiled.memory_analysis()
  if stats is None:
    return None
  parts = {part: int(getattr(stats, f'{part}_size_in_bytes'))
           for part in ('temp', 'argument', 'output', 'alias', 'generated_code')}
  return {'peak_bytes': parts['temp'] + parts['argument'] + parts['output'] - parts['alias'],
          **{f'{part}_bytes': value for part, value in parts.items()}}


def dense_reference(model: ModelConfig, width: int, slots: int, seed: int = 0):
  """(fn, args, flops per call, shape) of a float32 matmul chain of the experts' shapes:
  `slots` slots of `width` users through every layer of all K experts, the first
  layer's input shared by the experts as in the model."""
  rows, experts = slots * width, model.num_experts
  rng = np.random.default_rng(seed)
  dims = model.expert_dims
  x = jnp.asarray(rng.normal(size=(rows, dims[0][0])), jnp.float32)
  kernels = tuple(jnp.asarray(rng.normal(0.0, 1.0 / math.sqrt(d_in),
                                         (experts, d_in, d_out)), jnp.float32)
                  for d_in, d_out in dims)

  def chain(x, kernels):
    h = jnp.einsum('nf,efh->enh', x, kernels[0])
    for kernel in kernels[1:]:
      h = jnp.einsum('enh,ehj->enj', h, kernel)
    return h

  flops = float(sum(2 * experts * rows * d_in * d_out for d_in, d_out in dims))
  return chain, (x, kernels), flops, {'slots': slots, 'rows': rows, 'experts': experts,
                                      'layers': [list(d) for d in dims]}


def chunk_rss(setting: evaluation.Setting, name: str, params: Params, chunk: int,
              seed: int = 0, timeout: float = 1800) -> dict:
  """Peak RSS growth of a fresh process evaluating one chunk of `name` (see the module
  docstring): {'peak_bytes', 'baseline_bytes', 'first_call_s'}."""
  with tempfile.TemporaryDirectory() as folder:
    spec = {'mec': setting.mec.to_dict(), 'feature_config': setting.feature_config.to_dict(),
            'model': setting.model.to_dict(), 'method': name, 'chunk': chunk, 'seed': seed,
            'params': os.path.join(folder, 'params.msgpack')}
    with open(spec['params'], 'wb') as f:
      f.write(serialization.msgpack_serialize(
          {k: serialization.to_state_dict(v) for k, v in params._asdict().items()
           if v is not None}))
    spec_path = os.path.join(folder, 'spec.json')
    with open(spec_path, 'w') as f:
      json.dump(spec, f)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ,
           'PYTHONPATH': os.pathsep.join(p for p in (root, os.environ.get('PYTHONPATH'))
                                         if p)}
    result = subprocess.run(
        [sys.executable, '-c', 'from dynn_jax.benchmark.evaluation import _rss_child; '
         '_rss_child()', spec_path], capture_output=True, text=True, env=env,
        timeout=timeout)
  if result.returncode != 0:
    raise RuntimeError(f'the peak-RSS process for {name!r} failed:\n{result.stderr[-3000:]}')
  return json.loads(result.stdout.strip().splitlines()[-1])


def _rss_child() -> None:
  """Child of `chunk_rss`: argv[1] is its spec; prints one JSON line."""
  with open(sys.argv[1]) as f:
    spec = json.load(f)
  with open(spec['params'], 'rb') as f:
    loaded = serialization.msgpack_restore(f.read())
  params = Params(**{k: jax.tree.map(jnp.asarray, v) for k, v in loaded.items()})
  setting = evaluation.Setting(mec=MECConfig.from_dict(spec['mec']),
                               model=ModelConfig.from_dict(spec['model']),
                               feature_config=MECConfig.from_dict(spec['feature_config']))
  jax.block_until_ready(params)
  baseline = _reset_peak_rss()
  start = time.perf_counter()
  evaluation.evaluate(setting, (spec['method'],), params, slots=spec['chunk'],
                      chunk=spec['chunk'], seed=spec['seed'])
  first_s = time.perf_counter() - start
  peak = _peak_rss_bytes()
  print(json.dumps({'peak_bytes': peak - baseline, 'baseline_bytes': baseline,
                    'first_call_s': first_s}))


def _reset_peak_rss() -> int:
  """Resets the process's peak RSS to its current RSS; returns that RSS in bytes.

  Not `getrusage`'s ru_maxrss: Linux carries it over a fork and an exec, so a child of
  a large parent starts with the parent's peak. /proc's VmHWM belongs to this
  process's own address space, and writing 5 to clear_refs resets it.
  """
  with open('/proc/self/clear_refs', 'w') as f:
    f.write('5')
  return _proc_status_bytes('VmRSS')


def _peak_rss_bytes() -> int:
  return _proc_status_bytes('VmHWM')


def _proc_status_bytes(field: str) -> int:
  with open('/proc/self/status') as f:
    for line in f:
      if line.startswith(field + ':'):
        return int(line.split()[1]) * 1024  # kB
  raise RuntimeError(f'/proc/self/status has no {field}: peak RSS needs Linux')


def peak_bytes(entry: dict) -> int | None:
  """The larger of a method's measured peaks (None if none was measured)."""
  measured = [m['peak_bytes'] for m in entry['memory'].values()
              if isinstance(m, dict) and m.get('peak_bytes') is not None]
  return max(measured) if measured else None


def targets(results: dict) -> dict:
  """The issue's evaluation targets as measured in this run (recorded, never asserted)."""
  methods = results['methods']
  out = {}
  if 'policy_moe' in methods:
    out['policy_moe_slots_per_s'] = (methods['policy_moe']['slots_per_s'], '>=',
                                     POLICY_SLOTS_PER_S)
  ratio = results.get('fix_moe_flops', {}).get('dense_over_achieved')
  if ratio is not None:
    out['fix_moe_dense_over_achieved'] = (ratio, '<=', DENSE_OVER_ACHIEVED)
  peaks = [p for p in (peak_bytes(m) for m in methods.values()) if p is not None]
  if peaks:
    out[f'max_peak_bytes_chunk_{results["chunk"]}'] = (max(peaks), '<=', PEAK_MEMORY_BYTES)
  return {name: {'value': value, 'target': f'{op} {bound:g}',
                 'met': value <= bound if op == '<=' else value >= bound}
          for name, (value, op, bound) in out.items()}


def format_evaluation(results: dict) -> str:
  """One line per method (slots/s, its p10-p90 range, compile s, peak memory in MB),
  the fix_moe GFLOP/s line and the targets."""
  methods = results['methods']
  has_rss = any('rss' in m['memory'] for m in methods.values())
  lines = [f'{"method":14s} {"slots":>7s} {"slots/s":>10s} {"p10-p90 slots/s":>21s} '
           f'{"calls":>5s} {"compile s":>9s} {"XLA MB":>8s}' + (f' {"RSS MB":>8s}' * has_rss)]
  for name, m in methods.items():
    xla = m['memory'].get('xla')
    line = (f'{name:14s} {m["slots"]:7d} {m["slots_per_s"]:10.4g} '
            f'{m["slots_per_s_p10"]:10.4g}-{m["slots_per_s_p90"]:<10.4g} {m["calls"]:5d} '
            f'{m["compile_s"]:9.2f} {_mb(xla):>8s}')
    if has_rss:
      line += f' {_mb(m["memory"].get("rss")):>8s}'
    lines.append(line)
  lines.append(f'peak memory of the chunk program at {results["chunk"]} slots; '
               f'XLA = {results["memory_measures"]["xla"]}'
               + ('; RSS = ' + results['memory_measures']['rss'] if has_rss else ''))
  flops = results.get('fix_moe_flops')
  if flops:
    ratio = flops['dense_over_achieved']
    first = flops['dense_matmul'][0]
    per_size = ', '.join(f'{d["slots"]} slots {d["gflops"]:.3g}' for d in flops['dense_matmul'])
    lines.append(
        f'fix_moe: {flops["achieved_gflops"]:.3g} GFLOP/s counted ({flops["ops_per_slot"]:.4g} '
        f'ops/slot x {flops["slots_per_s"]:.4g} slots/s)\n'
        f'dense matmul of the experts\' shapes ({first["experts"]} experts, layers '
        f'{first["layers"]}, slots x {results["width"]} rows), GFLOP/s: {per_size}\n'
        f'dense (best, {flops["dense_best_slots"]} slots) / achieved: '
        f'{"n/a" if ratio is None else f"{ratio:.2f}"}')
  lines += target_lines(results['targets'])
  lines.append(load_line(results['load_start'], results['load_end']))
  return '\n'.join(lines)


def _mb(memory: dict | None) -> str:
  if not memory or memory.get('peak_bytes') is None:
    return 'n/a'
  return f'{memory["peak_bytes"] / 1e6:.1f}'
