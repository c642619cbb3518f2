"""Prints every (k, l) sub-network of the allocation DyNN: counted ops, modelled delay
and the measured latency of its per-slot variant on the current device.

  python launch/show_subnetworks.py [--n_users=30 --num_experts=10 --max_depth=3 ...]

Latency: one slot of n_users users, all offloaded (case 1), through the AOT-compiled
`per_slot_apply(config, k, l)`; warm-up calls, then `repeats` timed calls per variant,
interleaved across variants so that drift hits them all alike; the median (us).
"""

import time

import jax
import numpy as np
from absl import app, flags

from dynn_jax import ops
from dynn_jax.config import MECConfig
from dynn_jax.env import normalized_features, sample_slots
from dynn_jax.models import ModelConfig, MoEAllocator, per_slot_apply

_N_USERS = flags.DEFINE_integer('n_users', 30, 'Users in the slot (all offloaded).')
_EXPERTS = flags.DEFINE_integer('num_experts', 10, 'K.')
_DEPTH = flags.DEFINE_integer('max_depth', 3, 'L.')
_WIDTH = flags.DEFINE_integer('width', 64, 'Hidden units of an expert layer.')
_WARMUP = flags.DEFINE_integer('warmup', 50, 'Untimed calls per variant.')
_REPEATS = flags.DEFINE_integer('repeats', 1000, 'Timed calls per variant.')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of the slot and the weights.')


def measure(compiled, args, warmup: int, repeats: int) -> list[float]:
  """`repeats` wall times (s) of one call, after `warmup` calls."""
  for _ in range(warmup):
    jax.block_until_ready(compiled(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - start)
  return times


def rising_steps(table: np.ndarray, axis: int) -> tuple[int, int]:
  """(rising, total) adjacent steps along `axis`."""
  steps = np.diff(table, axis=axis)
  return int((steps > 0).sum()), steps.size


def main(argv):
  del argv
  mec = MECConfig(n_users=_N_USERS.value)
  config = ModelConfig.for_env(mec, num_experts=_EXPERTS.value, max_depth=_DEPTH.value,
                               width=_WIDTH.value)
  key_slot, key_init = jax.random.split(jax.random.PRNGKey(_SEED.value))
  slots = sample_slots(key_slot, mec)
  features, mask = normalized_features(slots, mec), slots.mask
  variables = MoEAllocator(config).init(key_init, features, mask)
  args = (variables, features, mask)

  options = [(k, l) for k in range(1, config.num_experts + 1)
             for l in range(1, config.max_depth + 1)]
  compiled = {kl: per_slot_apply(config, *kl).lower(*args).compile() for kl in options}
  samples = {kl: [] for kl in options}
  rounds = 10  # interleave: each round times every variant repeats / rounds times
  for _ in range(rounds):
    for kl in options:
      samples[kl] += measure(compiled[kl], args, _WARMUP.value // rounds + 1,
                             max(_REPEATS.value // rounds, 1))

  n = _N_USERS.value
  ops_kl = np.asarray(ops.ops_table(config, n))
  delay_kl = np.asarray(ops.ops_to_delay(ops_kl, mec))
  latency = np.zeros((config.num_experts, config.max_depth))
  print(f'device: {jax.devices()[0].device_kind}; N = {n}, K = {config.num_experts}, '
        f'L = {config.max_depth}, width {config.width}; allocation network only')
  print(f'{"k":>3} {"l":>2} {"ops (M)":>9} {"model (ms)":>11} {"median (us)":>12} '
        f'{"p10-p90 (us)":>15}')
  for k, l in options:
    t = np.asarray(samples[(k, l)]) * 1e6
    latency[k - 1, l - 1] = np.median(t)
    p10, p90 = np.percentile(t, [10, 90])
    print(f'{k:>3} {l:>2} {ops_kl[k - 1, l - 1] / 1e6:>9.4f} '
          f'{delay_kl[k - 1, l - 1] * 1e3:>11.4f} {latency[k - 1, l - 1]:>12.1f} '
          f'{p10:>7.1f}-{p90:<7.1f}')

  up_k, all_k = rising_steps(latency, 0)
  up_l, all_l = rising_steps(latency, 1)
  rank = lambda a: np.argsort(np.argsort(a.ravel()))
  spearman = np.corrcoef(rank(ops_kl), rank(latency))[0, 1]
  print(f'latency rises in {up_k}/{all_k} steps k -> k+1 and {up_l}/{all_l} steps '
        f'l -> l+1; rank correlation with ops {spearman:.3f}; '
        f'(K, L) / (1, 1) = {latency[-1, -1] / latency[0, 0]:.2f}x')
  table = ops.table_one(config, n)
  print('Table I (ours vs paper): ' + ', '.join(
      f'{name} {table[name]:.6g} vs {paper:.6g}'
      for name, paper in ops.PAPER_TABLE_ONE.items()))


if __name__ == '__main__':
  app.run(main)
