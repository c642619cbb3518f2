"""The genetic-algorithm baseline of the paper (SPEC section 5).

Genome of one individual, per user position: a bandwidth share and a CPU share in
(0, 1], plus (case 2 only) an offloading bit. Decoding normalises the shares over the
offloaded real users, so b and f sum to b_max and f_ser (up to rounding) and padded or
local users get nothing; if nobody is offloaded nothing is allocated. In case 1 every
real user is offloaded and the bits are absent.

Fitness is the slot objective (lower is better). Each generation:

* roulette-wheel selection of two parents per child, with weights proportional to
  (worst objective in the population - objective): the worst individual is never
  picked and the pressure does not fade when all objectives are large and close, as
  it would with 1 / objective. Individuals with a non-finite objective get weight 0;
  if no weight is positive the pick is uniform over the finite ones (or over all).
* uniform crossover: each gene of the child comes from the second parent with
  probability `crossover_rate` (otherwise from the first);
* mutation: each gene is resampled uniformly (a bit is flipped) with probability
  `mutation_rate`;
* elitism: child 0 is replaced by the best individual so far, so the best objective
  never gets worse.

Both rates decay stepwise: at generation g (from 0) they are multiplied by
`decay ** (g // interval)`, with the interval 25 in case 1 and 40 in case 2. The
crossover and mutation draws use 16-bit uniforms (rates resolved to 2^-16), new share
values 24-bit ones: drawing random bits is most of the run time.

Everything is vectorised over the population; a `lax.scan` runs the generations and a
`vmap` runs the slots (in chunks of `slot_chunk`, one after another), each slot with
its own key from `jax.random.split`.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from dynn_jax.batching import blocked
from dynn_jax.config import POSITIVE_INT, Config, ConfigBase, Range, check_ranges, jit_config
from dynn_jax.env import Decision, Slots, slot_costs
from dynn_jax.solvers.offloading import delays_in_slot_dtype

Array = jax.Array

_RANGES = {
    'generations': POSITIVE_INT, 'population_per_task': POSITIVE_INT,
    'crossover_rate': Range(0.0, 1.0), 'crossover_decay': Range(0.0, 1.0, False),
    'mutation_rate': Range(0.0, 1.0), 'mutation_decay': Range(0.0, 1.0, False),
    'decay_interval': POSITIVE_INT, 'decay_interval_case2': POSITIVE_INT,
    'slot_chunk': POSITIVE_INT,
}


@dataclasses.dataclass(frozen=True)
class GAConfig(ConfigBase):
  """GA hyperparameters; defaults are the paper's (the generation count is ours).

  Frozen and hashable: a static argument of `ga_solve`. Population =
  `population_per_task` x config.width (padded users count as tasks, so the shape is
  static).
  """
  generations: int = 100          # not given in the paper
  population_per_task: int = 6
  crossover_rate: float = 0.2     # per-gene probability of taking the second parent's gene
  crossover_decay: float = 0.5    # halved every interval
  mutation_rate: float = 0.1      # per-gene probability of resampling / flipping
  mutation_decay: float = 0.25    # quartered every interval
  decay_interval: int = 25        # generations, case 1
  decay_interval_case2: int = 40  # generations, case 2
  # Slots evolved together (vmap); chunks run one after another. Bounds memory and keeps
  # the working set in cache on CPU; raise it on an accelerator.
  slot_chunk: int = 16

  def __post_init__(self):
    check_ranges(self, _RANGES)

  def population(self, config: Config) -> int:
    return self.population_per_task * config.width

  def interval(self, config: Config) -> int:
    return self.decay_interval if config.case == 1 else self.decay_interval_case2


def _unit_open_low(key: Array, shape, dtype) -> Array:
  # (0, 1]: a share of exactly 0 would starve an offloaded user (infinite delay).
  return 1.0 - jax.random.uniform(key, shape, dtype)


def _unit_from_bits(word: Array, n_bits: int, dtype) -> Array:
  """Uniform on [0, 1) from an unsigned integer holding n_bits random bits."""
  return word.astype(dtype) * (2.0 ** -n_bits)


def decode(slots: Slots, shares: Array, bits: Array, config: Config) -> Decision:
  """Genomes -> decisions. shares [..., 2, W] (bandwidth, CPU), bits [..., W]."""
  x = bits & slots.mask
  share = jnp.where(x[..., None, :], shares, 0.0)
  total = share.sum(-1, keepdims=True)
  budget = jnp.asarray([config.b_max, config.f_ser], shares.dtype)[:, None]
  alloc = jnp.where(total > 0, budget * share / jnp.where(total > 0, total, 1.0), 0.0)
  return Decision(x=x, b=alloc[..., 0, :], f=alloc[..., 1, :])


def _fitness(slots: Slots, shares: Array, bits: Array, t_inf_edge: Array,
             t_inf_loc: Array, config: Config) -> Array:
  """Slot objective of every individual: [P]; NaN (0 * inf) counts as inf."""
  decision = decode(slots, shares, bits, config)
  obj = slot_costs(slots, decision, config, t_inf_edge, t_inf_loc).objective
  return jnp.where(jnp.isnan(obj), jnp.inf, obj)


def _roulette_weights(obj: Array) -> Array:
  finite = jnp.isfinite(obj)
  worst = jnp.max(jnp.where(finite, obj, -jnp.inf))
  weight = jnp.where(finite, worst - obj, 0.0)
  fallback = jnp.where(finite.any(), finite, True).astype(obj.dtype)
  return jnp.where(weight.sum() > 0, weight, fallback)


def _select(u: Array, weight: Array) -> Array:
  """Roulette wheel: an index per uniform u in [0, 1), with probability ~ weight."""
  cdf = jnp.cumsum(weight)
  u = u * cdf[-1]
  # side='right' skips zero-weight entries (their cdf equals the previous one).
  idx = jnp.searchsorted(cdf, u, side='right', method='compare_all')
  return jnp.minimum(idx, weight.shape[0] - 1)


def _ga_one(key: Array, slots: Slots, t_inf_edge: Array, t_inf_loc: Array,
            config: Config, ga: GAConfig) -> tuple[Decision, Array]:
  """GA on one slot ([W] arrays): (best decision, best objective per generation)."""
  width = slots.mask.shape[-1]
  pop = ga.population(config)
  dtype = slots.s.dtype
  case2 = config.case == 2
  interval = ga.interval(config)
  fitness = lambda sh, bi: _fitness(slots, sh, bi, t_inf_edge, t_inf_loc, config)

  k_init, k_bits, k_run = jax.random.split(key, 3)
  shares = _unit_open_low(k_init, (pop, 2, width), dtype)
  if case2:
    bits = jax.random.bernoulli(k_bits, 0.5, (pop, width))
  else:
    bits = jnp.ones((pop, width), bool)
  obj = fitness(shares, bits)

  def generation(carry, xs):
    shares, bits, obj = carry
    key, g = xs
    step = (g // interval).astype(dtype)
    cx_rate = ga.crossover_rate * ga.crossover_decay ** step
    mut_rate = ga.mutation_rate * ga.mutation_decay ** step

    # Random bits dominate the run time, so one draw serves the generation: 2 pop
    # words pick the parents; per gene row (2 share rows, + 1 bit row in case 2) the
    # two 16-bit halves of a word give the crossover and the mutation uniforms; 2 more
    # rows give new share values.
    n_rows = 3 if case2 else 2
    gene_shape = (pop, n_rows + 2, width)
    words = jax.random.bits(key, (2 * pop + math.prod(gene_shape),), jnp.uint32)
    u_parent = _unit_from_bits(words[:2 * pop] >> 8, 24, dtype)
    words = words[2 * pop:].reshape(gene_shape)
    parents = _select(u_parent, _roulette_weights(obj)).reshape(2, pop)
    first, second = parents[0], parents[1]
    swap = _unit_from_bits(words[:, :n_rows] & 0xFFFF, 16, dtype) < cx_rate
    mutate = _unit_from_bits(words[:, :n_rows] >> 16, 16, dtype) < mut_rate
    fresh = 1.0 - _unit_from_bits(words[:, n_rows:] >> 8, 24, dtype)
    child_sh = jnp.where(swap[:, :2], shares[second], shares[first])
    child_sh = jnp.where(mutate[:, :2], fresh, child_sh)
    if case2:
      child_bits = jnp.where(swap[:, 2], bits[second], bits[first]) ^ mutate[:, 2]
    else:
      child_bits = bits

    best = jnp.argmin(obj)
    child_sh = child_sh.at[0].set(shares[best])
    child_bits = child_bits.at[0].set(bits[best])
    child_obj = fitness(child_sh, child_bits)
    return (child_sh, child_bits, child_obj), child_obj.min()

  keys = jax.random.split(k_run, ga.generations)
  steps = jnp.arange(ga.generations, dtype=jnp.int32)
  (shares, bits, obj), history = jax.lax.scan(generation, (shares, bits, obj),
                                              (keys, steps))
  best = jnp.argmin(obj)
  return decode(slots, shares[best], bits[best], config), history


@jit_config(static_argnames=('ga_config',))
def _ga_solve(key: Array, slots: Slots, t_inf_edge: Array, t_inf_loc: Array,
              config: Config, ga_config: GAConfig) -> tuple[Decision, Array]:
  width = slots.mask.shape[-1]
  batch = slots.mask.shape[:-1]
  t_edge = jnp.broadcast_to(t_inf_edge, batch)
  t_loc = jnp.broadcast_to(t_inf_loc, batch)
  run = lambda k, s, te, tl: _ga_one(k, s, te, tl, config, ga_config)
  if not batch:
    return run(key, slots, t_edge, t_loc)
  n = math.prod(batch)
  keys = jax.random.split(key, n)
  flat = (keys, jax.tree.map(lambda a: a.reshape((n, width)), slots),
          t_edge.reshape(n), t_loc.reshape(n))
  decision, history = blocked(jax.vmap(run), min(ga_config.slot_chunk, n))(*flat)
  decision = jax.tree.map(lambda a: a.reshape(batch + (width,)), decision)
  return decision, history.reshape(batch + (ga_config.generations,))


def ga_solve(key: Array, slots: Slots, config: Config, ga_config: GAConfig = GAConfig(),
             t_inf_edge: float | Array = 0.0, t_inf_loc: float | Array = 0.0
             ) -> tuple[Decision, Array]:
  """Runs the GA on every slot of a batch [..., W].

  Returns the best decision found per slot and the history of the best objective per
  generation, [..., generations] (non-increasing). `t_inf_edge` / `t_inf_loc` enter the
  fitness and broadcast to the batch shape [...]. One slot uses `key` itself; a batch
  uses one key per slot from `jax.random.split`. Runs jitted (`config` and `ga_config`
  static); also traceable inside a caller's jit or vmap.
  """
  t_edge, t_loc = delays_in_slot_dtype(slots, t_inf_edge, t_inf_loc)
  return _ga_solve(key, slots, t_edge, t_loc, config=config, ga_config=ga_config)
