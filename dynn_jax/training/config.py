"""What a training run is told: `TrainConfig`, the per-phase keys, the (k, l) schedule of
progressive shrinking, the annealed miss temperature and the slots each step draws.

Everything here is a pure function of the config and the step; nothing here updates
parameters (see `steps`) or runs a loop (see `loop`).
"""

from __future__ import annotations

import dataclasses
import math
import zlib

import jax
import jax.numpy as jnp
import optax

from dynn_jax.config import (NON_NEGATIVE, NON_NEGATIVE_INT, POSITIVE, POSITIVE_INT, Config,
                             ConfigBase, ConfigError, MECConfig, Range, SEED_RANGE,
                             check_choice, check_ranges)
from dynn_jax import delay as delay_model
from dynn_jax import latency
from dynn_jax.env import Slots, sample_slots
from dynn_jax.models import ModelConfig
from dynn_jax.networks import LOSSES

Array = jax.Array

SCHEDULES = ('progressive', 'scratch')
DYNAMIC = ('full', 'width', 'depth')
POLICY_TARGETS = ('labels', 'expected_cost')
INFERENCE_DELAYS = delay_model.MODES
SCALE_LAWS = ('uniform', 'log_uniform')


_TRAIN_RANGES = {
    **{name: POSITIVE_INT for name in ('batch', 'steps_per_call', 'checkpoint_every',
                                       'eval_slots')},
    'seed': SEED_RANGE,
    **{name: NON_NEGATIVE_INT for name in ('full_steps', 'width_steps', 'depth_steps',
                                           'scratch_steps', 'static_steps', 'policy_steps',
                                           'joint_steps', 'tune_steps', 'sandwich_middle',
                                           'users_min')},
    'distill_weight': NON_NEGATIVE, 'balance_weight': NON_NEGATIVE,
    'alloc_lr': POSITIVE, 'policy_lr': POSITIVE, 'scheduler_lr': POSITIVE,
    'alloc_lr_decay': Range(0.0, 1.0, False, True),
    'alloc_lr_decay_from': Range(0.0, 1.0, True, False),
    'miss_temperature_start': POSITIVE, 'miss_temperature_end': POSITIVE,
    'offload_fraction_min': Range(0.0, 1.0, False, True),
    **{name: POSITIVE for name in ('size_scale_min', 'size_scale_max', 'workload_scale_min',
                                   'workload_scale_max', 'server_cpu_scale_min',
                                   'server_cpu_scale_max')},
}


@dataclasses.dataclass(frozen=True)
class TrainConfig(ConfigBase):
  """Everything about training that is not the system or the network sizes."""
  seed: int = 0
  batch: int = 64                   # slots per step
  alloc_lr: float = 1e-3
  # Final allocator learning rate as a fraction of alloc_lr (1: constant), reached by a
  # cosine decay over the last part of each allocator phase (the DyNN's, the static
  # network's), from alloc_lr_decay_from of its steps: see `alloc_learning_rate`.
  alloc_lr_decay: float = 1.0
  alloc_lr_decay_from: float = 0.0
  policy_lr: float = 1e-4
  scheduler_lr: float = 2e-3
  schedule: str = 'progressive'     # or 'scratch'
  dynamic: str = 'full'             # which dimensions shrink: 'full', 'width', 'depth'
  full_steps: int = 2000            # progressive stage 1: (K, L) only
  width_steps: int = 2000           # stage 2: smaller widths
  depth_steps: int = 1000           # stage 3: smaller depths
  scratch_steps: int = 5000         # 'scratch': all sub-networks jointly
  static_steps: int = 3000          # static baseline (0: not trained)
  policy_steps: int = 1000          # policy pre-training with all tasks offloaded
  joint_steps: int = 1000           # case 2 joint scheduler + policy loop
  # After the policy: allocator steps where each slot trains the exit the policy picks
  # for it (`training.loop.tune_allocator`), then the policy is trained again.
  tune_steps: int = 0
  steps_per_call: int = 50          # steps per compiled chunk (lax.scan length)
  checkpoint_every: int = 10        # chunks between checkpoints
  offload_fraction_min: float = 1.0  # allocator trained on random offloaded subsets
  # Per-slot factors on s_i and c_i drawn from [min, max]: networks trained on a range of
  # data sizes and workloads serve a whole sweep (the optimal shares do not depend on
  # s_avg or c_avg themselves, only on the users' values).
  size_scale_min: float = 1.0
  size_scale_max: float = 1.0
  # Users per training slot drawn uniformly from [users_min, the padded width] (the tasks
  # sweep's range), so that no number of users is new to the networks; 0: the system's
  # n_users in every slot.
  users_min: int = 0
  # How the factors are drawn: 'uniform', or 'log_uniform' (every octave of the range
  # alike: a range of 0.5 to 10 drawn uniformly puts 3 of 4 slots above 3).
  scale_law: str = 'uniform'
  workload_scale_min: float = 1.0
  workload_scale_max: float = 1.0
  # Case 2's joint loop: each step's server CPU is f_ser times a factor drawn
  # log-uniformly from [min, max], so that a scheduler reading the server's CPU
  # (ModelConfig.scheduler_context='server_cpu') learns when offloading pays.
  server_cpu_scale_min: float = 1.0
  server_cpu_scale_max: float = 1.0
  eval_slots: int = 2048            # held-out slots for the final report
  # 'paper': SPEC section 4's weighted-delay losses; 'objective': the slot objective of
  # SPEC section 1 (see `dynn_jax.training.steps`).
  loss: str = 'paper'
  # Relative temperature of the smoothed miss indicator sigmoid((T - d) / (tau d)) in the
  # 'objective' loss, annealed geometrically from start to end over each allocator phase.
  miss_temperature_start: float = 0.3
  miss_temperature_end: float = 0.01
  # Scheduler rewards divided per slot by the slot's mean |reward|, so that slots with
  # large tasks (large costs) do not set every gradient. Always on with loss='objective'.
  normalize_rewards: bool = False
  # What the policy learns from each slot's per-option costs: 'labels', the cross-entropy
  # with the cheapest option (the paper's); 'expected_cost', the softmax-weighted cost
  # relative to the cheapest, which weighs a wrong pick by what it costs (near-ties,
  # common between exits, then cost almost nothing instead of a full label error).
  policy_target: str = 'labels'
  # --- Training options of the DyNN literature (all off by default: the paper's method).
  # Sandwich rule (slimmable networks, BigNAS): every step's batch gives a quarter of its
  # slots to the largest exit the schedule allows, a quarter to the smallest, and the
  # rest to random exits in between, so the extremes are trained every step and never
  # fall behind the middle. `sandwich_middle`: the number of distinct random exits per
  # step among the middle slots (0: each slot its own, as without the rule).
  sandwich: bool = False
  sandwich_middle: int = 0
  # In-place distillation (BigNAS): each slot's exit also fits the largest exit's shares
  # on the same slot (cross-entropy of the two share distributions, the largest exit's
  # held fixed), weighted by this; 0: off.
  distill_weight: float = 0.0
  # Expert load balancing (Shazeer et al.): the squared coefficient of variation of the
  # experts' summed gate weights over the batch, times this, added to the loss; 0: off.
  balance_weight: float = 0.0
  # Inference delay that the losses and the policy's labels see (dynn_jax.delay): 'none',
  # 'modelled', or 'measured' with the latency table at `latency_table` (refused when it
  # was measured on another device unless `allow_other_device`).
  inference_delay: str = 'modelled'
  latency_table: str = ''
  allow_other_device: bool = False
  # A networks file whose allocator and static network this run takes as trained: only
  # the policy (and in case 2 the scheduler) are trained, e.g. for another device's
  # latency table ('': train them here).
  allocator_from: str = ''

  def __post_init__(self):
    check_ranges(self, _TRAIN_RANGES)
    check_choice(self, 'schedule', SCHEDULES)
    check_choice(self, 'dynamic', DYNAMIC)
    check_choice(self, 'loss', LOSSES)
    check_choice(self, 'policy_target', POLICY_TARGETS)
    check_choice(self, 'inference_delay', INFERENCE_DELAYS)
    check_choice(self, 'scale_law', SCALE_LAWS)
    check_choice(self, 'sandwich', (True, False))
    check_choice(self, 'allow_other_device', (True, False))
    if self.inference_delay == 'measured' and not self.latency_table:
      raise ConfigError("TrainConfig.inference_delay = 'measured' needs latency_table (the "
                        'file launch/benchmark.py --suite=exits wrote)')
    if self.latency_table and self.inference_delay != 'measured':
      raise ConfigError(f'TrainConfig.latency_table = {self.latency_table!r} is only read '
                        f"with inference_delay = 'measured' (got {self.inference_delay!r})")
    if self.inference_delay == 'none' and (self.policy_steps or self.joint_steps):
      raise ConfigError(
          "TrainConfig.inference_delay = 'none' with policy_steps or joint_steps > 0: "
          'without inference delay no exit costs more than another to run, so the policy '
          'would learn nothing but to pick the best allocation; train the policy with '
          "'modelled' or 'measured' delays (or set policy_steps = joint_steps = 0)")
    if self.sandwich_middle and not self.sandwich:
      raise ConfigError(f'TrainConfig.sandwich_middle = {self.sandwich_middle} needs '
                        'sandwich = True')
    if self.tune_steps and not self.policy_steps:
      raise ConfigError(f'TrainConfig.tune_steps = {self.tune_steps}: tuning trains the '
                        'exits the policy picks, so it needs policy_steps > 0')
    for kind in ('size', 'workload', 'server_cpu'):
      low, high = getattr(self, f'{kind}_scale_min'), getattr(self, f'{kind}_scale_max')
      if high < low:
        raise ConfigError(f'TrainConfig.{kind}_scale_max = {high!r}; must be >= '
                          f'{kind}_scale_min = {low!r}')

  @property
  def alloc_steps(self) -> int:
    if self.schedule == 'scratch':
      return self.scratch_steps
    return self.full_steps + self.width_steps + self.depth_steps


def check_scheduler_training(model: ModelConfig, train: TrainConfig) -> None:
  """A scheduler or policy reading the server CPU must be trained on more than one:
  else its extra input is constant in training and arbitrary wherever f_ser differs."""
  for network in ('scheduler', 'policy'):
    if (getattr(model, f'{network}_context') == 'server_cpu'
        and train.server_cpu_scale_min == train.server_cpu_scale_max):
      raise ConfigError(
          f"ModelConfig.{network}_context = 'server_cpu' needs "
          'TrainConfig.server_cpu_scale_min < server_cpu_scale_max (both '
          f'{train.server_cpu_scale_min!r}): the {network} must see more than one server '
          'CPU in training')


def training_delay(model: ModelConfig, mec: MECConfig, train: TrainConfig):
  """The inference-delay model (`dynn_jax.delay`) the run's losses and labels read: the
  latency table is loaded and checked against the model, the width and this device
  (ValueError naming the problem)."""
  if train.inference_delay == 'none':
    return delay_model.NONE
  if train.inference_delay == 'modelled':
    return delay_model.MODELLED
  return latency.load_table(train.latency_table, model, mec,
                            allow_other_device=train.allow_other_device)


def alloc_learning_rate(train: TrainConfig, total: int):
  """The allocator's learning rate over a phase of `total` steps: alloc_lr throughout,
  or constant until `alloc_lr_decay_from` of the phase and then a cosine decay to
  alloc_lr * alloc_lr_decay at its end. The small exits are still learning late in the
  depth stage, so a decay over the whole phase slows them; a decay over its end only
  settles what they learnt."""
  if train.alloc_lr_decay == 1.0:
    return train.alloc_lr
  start = int(round(train.alloc_lr_decay_from * total))
  decay = optax.cosine_decay_schedule(train.alloc_lr, max(total - start, 1),
                                      alpha=train.alloc_lr_decay)
  if start == 0:
    return decay
  return optax.join_schedules([optax.constant_schedule(train.alloc_lr), decay], [start])


def phase_key(seed: int, name: str) -> Array:
  """A key per (seed, phase name); crc32, not hash(): str hashes change per process."""
  return jax.random.fold_in(jax.random.PRNGKey(seed), zlib.crc32(name.encode()) % (2 ** 31))


# ------------------------------------------------------------------ (k, l) schedule


def _shrink(progress: Array, top: int) -> Array:
  """Lowest value allowed when a range [.., top] grows down to 1 over progress in (0, 1]."""
  return top - jnp.ceil(jnp.clip(progress, 0.0, 1.0) * (top - 1)).astype(jnp.int32)


def kl_bounds(step: Array, train: TrainConfig, model: ModelConfig) -> tuple[Array, Array]:
  """(k_low, l_low): the smallest width and depth trained at `step`."""
  K, L = model.num_experts, model.max_depth
  shrink_k = train.dynamic in ('full', 'width')
  shrink_l = train.dynamic in ('full', 'depth')
  if train.schedule == 'scratch':
    return jnp.int32(1 if shrink_k else K), jnp.int32(1 if shrink_l else L)
  s1, s2 = train.full_steps, train.width_steps
  width_progress = (step - s1 + 1) / max(s2, 1)
  depth_progress = (step - s1 - s2 + 1) / max(train.depth_steps, 1)
  k_low = jnp.where(step < s1, K, _shrink(width_progress, K)) if shrink_k else jnp.int32(K)
  l_low = jnp.where(step < s1 + s2, L, _shrink(depth_progress, L)) if shrink_l else jnp.int32(L)
  return jnp.int32(k_low), jnp.int32(l_low)


def sample_kl(key: Array, step: Array, shape: tuple[int, ...], train: TrainConfig,
              model: ModelConfig) -> tuple[Array, Array]:
  """Each slot's exit, uniform over the range the schedule allows at `step`; with the
  sandwich rule (`TrainConfig.sandwich`, on a 1-D batch) the first quarter of the slots
  take the largest exit, the second quarter the smallest allowed, the rest random ones
  (`sandwich_middle` distinct draws shared among them, or each its own)."""
  k_low, l_low = kl_bounds(step, train, model)
  kk, kl = jax.random.split(key)
  K, L = model.num_experts, model.max_depth
  if not train.sandwich:
    return (jax.random.randint(kk, shape, k_low, K + 1),
            jax.random.randint(kl, shape, l_low, L + 1))
  (size,) = shape
  draws = train.sandwich_middle or size
  k = jax.random.randint(kk, (draws,), k_low, K + 1)
  l = jax.random.randint(kl, (draws,), l_low, L + 1)
  slot = jnp.arange(size)
  k, l = k[slot % draws], l[slot % draws]
  largest, smallest = slot < size // 4, (slot >= size // 4) & (slot < size // 2)
  k = jnp.where(largest, K, jnp.where(smallest, k_low, k))
  l = jnp.where(largest, L, jnp.where(smallest, l_low, l))
  return k, l


def miss_temperature(step: Array, total: int, train: TrainConfig) -> Array:
  """Geometric anneal from miss_temperature_start (step 0) to _end (the last step)."""
  progress = jnp.clip(step / max(total - 1, 1), 0.0, 1.0)
  ratio = train.miss_temperature_end / train.miss_temperature_start
  return train.miss_temperature_start * ratio ** progress


# ------------------------------------------------------------------ training data


def training_slots(key: Array, mec: MECConfig, train: TrainConfig) -> Slots:
  """`train.batch` fresh slots, with s and c scaled per slot (see TrainConfig)."""
  ks, kscale = jax.random.split(key)
  n_users = None
  if train.users_min:
    # Another key than fold_in(key, 0..1): the draws of the slots themselves stay as
    # they were without this option.
    n_users = jax.random.randint(jax.random.fold_in(key, 7), (train.batch, 1),
                                 min(train.users_min, mec.width), mec.width + 1)
  slots = sample_slots(ks, mec, train.batch, n_users)
  ranges = ((train.size_scale_min, train.size_scale_max),
            (train.workload_scale_min, train.workload_scale_max))
  if all(low == high == 1.0 for low, high in ranges):
    return slots
  u = jax.random.uniform(kscale, (2, train.batch, 1), slots.s.dtype)
  if train.scale_law == 'log_uniform':
    factor = lambda lo, hi, v: lo * (hi / lo) ** v
  else:
    factor = lambda lo, hi, v: lo + (hi - lo) * v
  (s_lo, s_hi), (c_lo, c_hi) = ranges
  return slots._replace(s=slots.s * factor(s_lo, s_hi, u[0]),
                        c=slots.c * factor(c_lo, c_hi, u[1]))


def training_system(key: Array, mec: MECConfig, train: TrainConfig) -> Config:
  """The system one step's costs are computed in: `mec`, or (server_cpu_scale range
  not [1, 1]) its EnvParams with f_ser scaled by a log-uniform factor. Slots are sampled
  and features normalised with `mec` itself."""
  low, high = train.server_cpu_scale_min, train.server_cpu_scale_max
  if low == high == 1.0:
    return mec
  log_factor = jax.random.uniform(key, (), minval=math.log(low), maxval=math.log(high))
  return mec.params().replace(f_ser=mec.f_ser * jnp.exp(log_factor))


def sample_offload(key: Array, slots: Slots, fraction_min: float) -> Array:
  """All real users when fraction_min = 1; else each slot offloads a random fraction."""
  if fraction_min >= 1.0:
    return slots.mask
  kq, kx = jax.random.split(key)
  q = jax.random.uniform(kq, slots.mask.shape[:-1] + (1,), minval=fraction_min, maxval=1.0)
  return slots.mask & (jax.random.uniform(kx, slots.mask.shape) < q)
