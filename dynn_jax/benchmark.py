"""Benchmarks that print figures and return them as a dict (never timed assertions).

`environment_suite`: sampling + evaluation throughput, the exact allocation's latency
and throughput, and the GA's time per slot.
"""

from __future__ import annotations

import platform

import jax
import jax.numpy as jnp

from dynn_jax.config import MECConfig
from dynn_jax.env import sample_slots, slot_costs
from dynn_jax.solvers import equal_split, optimal_allocation
from dynn_jax.solvers.ga import GAConfig, ga_solve
from dynn_jax.timing import benchmark


def device_info() -> dict:
  device = jax.devices()[0]
  return {'platform': device.platform, 'device_kind': device.device_kind,
          'device_count': jax.device_count(), 'jax_version': jax.__version__,
          'machine': platform.machine(), 'processor': platform.processor()}


def environment_suite(config: MECConfig, *, batch: int = 100_000, alloc_batch: int = 10_000,
                      ga_batch: int = 4, ga_config: GAConfig = GAConfig(), seed: int = 0,
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
