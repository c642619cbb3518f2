"""The environment suite: sampling + evaluation throughput, the exact allocation's
latency and throughput, the oracle's and the GA's time per slot.

Owns `environment_suite` only; timing is `timing`'s, and it runs no network.
"""

from __future__ import annotations

import jax

from dynn_jax.benchmark.timing import benchmark
from dynn_jax.config import MECConfig
from dynn_jax.env import sample_slots, slot_costs
from dynn_jax.solvers import equal_split, optimal_allocation, oracle
from dynn_jax.solvers.ga import GAConfig, ga_solve


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
