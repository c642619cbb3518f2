"""Training (SPEC section 4): the allocation DyNN by progressive shrinking, the static
baseline, the policy (supervised) and the scheduler (policy gradient).

Every phase is a sequence of jit-compiled *chunks*, each `steps_per_call` steps under
`lax.scan`, with fresh slots sampled on device every step. The key of step t is
`fold_in(phase_key, t)`, so a run resumed from a checkpoint at any chunk boundary ends
with exactly the parameters of an uninterrupted run.

Allocation step (one batch, two sequential updates on the same input):
  1. loss sum_i w_i T_tra_i through head A (bandwidth shares), update;
  2. loss sum_i w_i T_com_i through head B (CPU shares), update.
Each slot of the batch trains its own sub-network (k, l), drawn uniformly from the
range the schedule allows at that step:
  * progressive: (K, L) only; then k from a range growing down to 1 at depth L; then
    every k with l from a range growing down to 1 (`dynamic` = 'width' or 'depth'
    keeps the other dimension at its maximum);
  * scratch: every allowed (k, l) from the first step.

Policy labels: for each slot, the (k, l) minimising the mean edge cost over the
offloaded users, C_edge_i = alpha (w_i T_inf_edge(k, l) + T_edge_i) + beta E_edge_i,
with all K x L sub-networks evaluated in one vmapped call; loss: cross-entropy over the
K * L options.

With `TrainConfig.loss = 'objective'` every phase is judged by the objective of SPEC
section 1 instead: the allocator takes one update per step on the slot objective
(alpha T + beta E + delta sigmoid((T - d) / (tau d)), with its own modelled inference
delay in T, tau annealed geometrically, each slot relative to its equal split:
`objective_loss`); policy labels minimise the hard slot objective; the scheduler's
per-user costs are the users' shares of the objective, less the user's edge resources
priced at the slot's marginal values (`congestion_costs`), normalised per slot.

Scheduler (case 2): x_i ~ Bernoulli(p_i); with C_loc_i = alpha (w_i T_inf_loc + T_loc_i)
+ beta E_loc_i, we maximise the mean of (C_loc_i - C_edge_i) p_i for offloaded users and
(C_edge_i - C_loc_i)(1 - p_i) for local ones: SPEC section 4's rule with the probability
of the action actually taken, so that each term pushes towards the cheaper choice. A
local user's C_edge_i is its cost had it joined the offloaded set alone: its head
logits against the offloaded users' softmax normaliser (one extra allocator pass over
all users).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
import zlib
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization

from dynn_jax import ops
from dynn_jax.config import (NON_NEGATIVE_INT, POSITIVE, POSITIVE_INT, ConfigBase, ConfigError,
                             MECConfig,
                             Range, check_choice, check_ranges)
from dynn_jax.evaluation import Params
from dynn_jax.io import write_bytes_atomic
from dynn_jax.env import (Decision, Slots, edge_delays, importance_weight, local_delay,
                          local_energy, normalized_features, sample_slots, weighted_edge_delay)
from dynn_jax.models import (Allocation, ModelConfig, MoEAllocator, Policy, Scheduler,
                             StaticAllocator, all_subnetworks, choose_kl, moe_forward)
from dynn_jax.runs import Progress, RunDir
from dynn_jax.solvers import equal_split, optimal_allocation
from dynn_jax.solvers.objective import edge_user_costs, local_user_costs, resource_prices

Array = jax.Array

SCHEDULES = ('progressive', 'scratch')
LOSSES = ('paper', 'objective')
DYNAMIC = ('full', 'width', 'depth')


_TRAIN_RANGES = {
    **{name: POSITIVE_INT for name in ('batch', 'steps_per_call', 'checkpoint_every',
                                       'eval_slots')},
    **{name: NON_NEGATIVE_INT for name in ('seed', 'full_steps', 'width_steps', 'depth_steps',
                                           'scratch_steps', 'static_steps', 'policy_steps',
                                           'joint_steps')},
    'alloc_lr': POSITIVE, 'policy_lr': POSITIVE, 'scheduler_lr': POSITIVE,
    'miss_temperature_start': POSITIVE, 'miss_temperature_end': POSITIVE,
    'offload_fraction_min': Range(0.0, 1.0, False, True),
    **{name: POSITIVE for name in ('size_scale_min', 'size_scale_max', 'workload_scale_min',
                                   'workload_scale_max')},
}


@dataclasses.dataclass(frozen=True)
class TrainConfig(ConfigBase):
  """Everything about training that is not the system or the network sizes."""
  seed: int = 0
  batch: int = 64                   # slots per step
  alloc_lr: float = 1e-3
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
  steps_per_call: int = 50          # steps per compiled chunk (lax.scan length)
  checkpoint_every: int = 10        # chunks between checkpoints
  offload_fraction_min: float = 1.0  # allocator trained on random offloaded subsets
  # Per-slot factors on s_i and c_i drawn from [min, max]: networks trained on a range of
  # data sizes and workloads serve a whole sweep (the optimal shares do not depend on
  # s_avg or c_avg themselves, only on the users' values).
  size_scale_min: float = 1.0
  size_scale_max: float = 1.0
  workload_scale_min: float = 1.0
  workload_scale_max: float = 1.0
  eval_slots: int = 2048            # held-out slots for the final report
  # 'paper': SPEC section 4's weighted-delay losses; 'objective': the slot objective of
  # SPEC section 1 (see the module docstring).
  loss: str = 'paper'
  # Relative temperature of the smoothed miss indicator sigmoid((T - d) / (tau d)) in the
  # 'objective' loss, annealed geometrically from start to end over each allocator phase.
  miss_temperature_start: float = 0.3
  miss_temperature_end: float = 0.01
  # Scheduler rewards divided per slot by the slot's mean |reward|, so that slots with
  # large tasks (large costs) do not set every gradient. Always on with loss='objective'.
  normalize_rewards: bool = False

  def __post_init__(self):
    check_ranges(self, _TRAIN_RANGES)
    check_choice(self, 'schedule', SCHEDULES)
    check_choice(self, 'dynamic', DYNAMIC)
    check_choice(self, 'loss', LOSSES)
    for kind in ('size', 'workload'):
      low, high = getattr(self, f'{kind}_scale_min'), getattr(self, f'{kind}_scale_max')
      if high < low:
        raise ConfigError(f'TrainConfig.{kind}_scale_max = {high!r}; must be >= '
                          f'{kind}_scale_min = {low!r}')

  @property
  def alloc_steps(self) -> int:
    if self.schedule == 'scratch':
      return self.scratch_steps
    return self.full_steps + self.width_steps + self.depth_steps

def phase_key(seed: int, name: str) -> Array:
  """A key per (seed, phase name); crc32, not hash(): str hashes change per process."""
  return jax.random.fold_in(jax.random.PRNGKey(seed), zlib.crc32(name.encode()) % (2 ** 31))


class TrainState(NamedTuple):
  params: Any
  opt_state: Any
  step: Array


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
  k_low, l_low = kl_bounds(step, train, model)
  kk, kl = jax.random.split(key)
  k = jax.random.randint(kk, shape, k_low, model.num_experts + 1)
  l = jax.random.randint(kl, shape, l_low, model.max_depth + 1)
  return k, l


# ------------------------------------------------------------------- shared pieces


def training_slots(key: Array, mec: MECConfig, train: TrainConfig) -> Slots:
  """`train.batch` fresh slots, with s and c scaled per slot (see TrainConfig)."""
  ks, kscale = jax.random.split(key)
  slots = sample_slots(ks, mec, train.batch)
  ranges = ((train.size_scale_min, train.size_scale_max),
            (train.workload_scale_min, train.workload_scale_max))
  if all(low == high == 1.0 for low, high in ranges):
    return slots
  u = jax.random.uniform(kscale, (2, train.batch, 1), slots.s.dtype)
  (s_lo, s_hi), (c_lo, c_hi) = ranges
  return slots._replace(s=slots.s * (s_lo + (s_hi - s_lo) * u[0]),
                        c=slots.c * (c_lo + (c_hi - c_lo) * u[1]))


def sample_offload(key: Array, slots: Slots, fraction_min: float) -> Array:
  """All real users when fraction_min = 1; else each slot offloads a random fraction."""
  if fraction_min >= 1.0:
    return slots.mask
  kq, kx = jax.random.split(key)
  q = jax.random.uniform(kq, slots.mask.shape[:-1] + (1,), minval=fraction_min, maxval=1.0)
  return slots.mask & (jax.random.uniform(kx, slots.mask.shape) < q)


def output_delays(out: Allocation, slots: Slots, config: MECConfig) -> tuple[Array, Array]:
  """(T_tra, T_com) of every user under an allocator's shares of the budgets."""
  return edge_delays(slots, out.b_share * config.b_max, out.f_share * config.f_ser, config)


def weighted_parts(out: Allocation, slots: Slots, x: Array, config: MECConfig
                   ) -> tuple[Array, Array]:
  """Mean over slots of sum_i w_i T_tra_i and of sum_i w_i T_com_i (the two losses)."""
  w = importance_weight(slots, config)
  take = x & (w > 0)
  t_tra, t_com = output_delays(out, slots, config)
  part = lambda t: jnp.where(take, w * t, 0.0).sum(-1).mean()
  return part(t_tra), part(t_com)


def _chunked_phase(name: str, run: RunDir | None, state: Any, total: int,
                   train: TrainConfig, chunk: Callable,
                   on_chunk: Callable[[int, Any], bool | None] | None = None) -> Any:
  """Runs `chunk` until `total` steps, resuming and checkpointing through `run`.

  `on_chunk(step, state)` runs after every chunk (e.g. a quality check); returning
  True ends the phase there.
  """
  if run is not None:
    restored = run.restore(name, state)
    if restored is not None:
      state = restored
  done = int(state.step)
  progress = Progress(name, total, start_step=done)
  chunks = 0
  while done < total:
    steps = min(train.steps_per_call, total - done)
    state, metrics = chunk(state, steps)
    done = int(state.step)
    chunks += 1
    metrics = {k: float(np.mean(v)) for k, v in jax.device_get(metrics).items()}
    if run is not None:
      run.log({'phase': name, 'step': done, 'time': time.time(), **metrics})
    stop = on_chunk is not None and bool(on_chunk(done, state))
    progress.update(done, force=done >= total or stop, **metrics)
    if run is not None and (chunks % train.checkpoint_every == 0 or done >= total or stop):
      run.save(name, state)
    if stop:
      break
  return state


def _scan_chunk(step_fn: Callable, key: Array):
  """jit(state, steps) running `step_fn(state, step_key)` `steps` times under scan."""
  @jax.jit
  def chunk(state, steps_array):
    def body(state, _):
      new_state, metrics = step_fn(state, jax.random.fold_in(key, state.step))
      return new_state, metrics
    return jax.lax.scan(body, state, steps_array)

  # The scan length is static: a short final chunk is a second (and last) compile.
  return lambda state, steps: chunk(state, jnp.zeros((steps,)))


# ------------------------------------------------------------------- allocation


def miss_temperature(step: Array, total: int, train: TrainConfig) -> Array:
  """Geometric anneal from miss_temperature_start (step 0) to _end (the last step)."""
  progress = jnp.clip(step / max(total - 1, 1), 0.0, 1.0)
  ratio = train.miss_temperature_end / train.miss_temperature_start
  return train.miss_temperature_start * ratio ** progress


def pipeline_edge_delay(model: ModelConfig, mec: MECConfig, k, l, x: Array, slots: Slots,
                        static: bool) -> Array:
  """Modelled T_inf_edge [...] of the pipeline that runs this allocator (with a policy
  for the DyNN), as the evaluation counts it."""
  n_off, n_users = x.sum(-1), slots.mask.sum(-1)
  if static:
    return ops.static_inference_delays(model, mec, n_off, n_users).edge
  return ops.inference_delays(model, mec, k, l, n_off, n_users).edge


def objective_loss(out: Allocation, slots: Slots, x: Array, mec: MECConfig,
                   t_inf_edge: Array, temperature: Array) -> Array:
  """Mean over slots of the smoothed slot objective of the offloaded users, each slot
  relative to its equal split's objective.

  Training slots span a range of sizes (TrainConfig.size_scale_*) and a slot's objective
  grows with its tasks: unscaled, the largest slots would set every gradient. Relative
  to a fixed per-slot reference every slot counts alike, and the minimiser per slot is
  unchanged.
  """
  b, f = out.b_share * mec.b_max, out.f_share * mec.f_ser
  cost = edge_user_costs(slots, x, b, f, mec, t_inf_edge, temperature).sum(-1)
  equal = equal_split(slots, x, mec)
  reference = edge_user_costs(slots, x, equal.b, equal.f, mec, t_inf_edge).sum(-1)
  return (cost / jnp.maximum(jax.lax.stop_gradient(reference), 1e-30)).mean()


def allocator_step(apply: Callable, tx: optax.GradientTransformation, mec: MECConfig,
                   train: TrainConfig, model: ModelConfig, dynamic: bool, total: int = 1):
  """One step of SPEC section 4 (two updates; `train.loss == 'paper'`) or one update on
  the smoothed objective ('objective', temperature annealed over `total` steps);
  `apply(params, feats, x, k, l, key)`."""
  def step(state: TrainState, key: Array):
    ks, kx, kkl, kn = jax.random.split(key, 4)
    slots = training_slots(ks, mec, train)
    x = sample_offload(kx, slots, train.offload_fraction_min)
    feats = normalized_features(slots, mec)
    if dynamic:
      k, l = sample_kl(kkl, state.step, (train.batch,), train, model)
    else:
      k = l = None

    params, opt_state = state.params, state.opt_state
    if train.loss == 'objective':
      t_inf = pipeline_edge_delay(model, mec, k, l, x, slots, static=not dynamic)
      temperature = miss_temperature(state.step, total, train)
      value, grads = jax.value_and_grad(lambda p: objective_loss(
          apply(p, feats, x, k, l, kn), slots, x, mec, t_inf, temperature))(params)
      updates, opt_state = tx.update(grads, opt_state, params)
      params = optax.apply_updates(params, updates)
      return (TrainState(params, opt_state, state.step + 1),
              {'loss_objective': value, 'miss_temperature': temperature})

    def loss(params, which):
      return weighted_parts(apply(params, feats, x, k, l, kn), slots, x, mec)[which]

    metrics = {}
    for which, name in ((0, 'loss_tra'), (1, 'loss_com')):
      value, grads = jax.value_and_grad(loss)(params, which)
      updates, opt_state = tx.update(grads, opt_state, params)
      params = optax.apply_updates(params, updates)
      metrics[name] = value
    return TrainState(params, opt_state, state.step + 1), metrics
  return step


def moe_apply(model: ModelConfig):
  return lambda params, feats, x, k, l, key: moe_forward(model, params, feats, x, k, l, key)


def static_apply(model: ModelConfig):
  net = StaticAllocator(model)
  return lambda params, feats, x, k, l, key: net.apply({'params': params}, feats, x)


def init_params(module, key: Array, mec: MECConfig, *args) -> Any:
  slots = sample_slots(jax.random.PRNGKey(0), mec, 1)
  feats = normalized_features(slots, mec)
  return module.init(key, feats, slots.mask, *args)['params']


def train_allocator(mec: MECConfig, model: ModelConfig, train: TrainConfig,
                    run: RunDir | None = None, params: Any = None,
                    name: str = 'allocator', static: bool = False,
                    on_chunk: Callable[[int, Any], bool | None] | None = None) -> Any:
  """Trains the DyNN (or the static baseline) and returns its parameters."""
  key = phase_key(train.seed, name)
  module = StaticAllocator(model) if static else MoEAllocator(model)
  if params is None:
    params = init_params(module, jax.random.fold_in(key, 0), mec)
  tx = optax.adam(train.alloc_lr)
  state = TrainState(params, tx.init(params), jnp.int32(0))
  apply = static_apply(model) if static else moe_apply(model)
  total = train.static_steps if static else train.alloc_steps
  step = allocator_step(apply, tx, mec, train, model, dynamic=not static, total=total)
  chunk = _scan_chunk(step, jax.random.fold_in(key, 1))
  return _chunked_phase(name, run, state, total, train, chunk, on_chunk).params


# ---------------------------------------------------------------- quality checks


def weighted_delays(out: Allocation, slots: Slots, x: Array, mec: MECConfig) -> Array:
  """Per-slot sum_i w_i (T_tra_i + T_com_i) of an allocator output: [...]."""
  return weighted_edge_delay(slots, x, out.b_share * mec.b_max, out.f_share * mec.f_ser, mec)


class HeldOut(NamedTuple):
  """Fixed evaluation slots, every real user offloaded, and the optimum on each slot."""
  slots: Slots
  x: Array
  optimum: Array  # [B]: optimal allocation's sum_i w_i (T_tra_i + T_com_i)


def held_out(mec: MECConfig, num_slots: int, seed: int) -> HeldOut:
  slots = sample_slots(jax.random.PRNGKey(seed), mec, num_slots)
  dec = optimal_allocation(slots, slots.mask, mec)
  return HeldOut(slots, slots.mask, weighted_edge_delay(slots, slots.mask, dec.b, dec.f, mec))


@functools.partial(jax.jit, static_argnums=(0, 1))
def subnetwork_gaps(model: ModelConfig, mec: MECConfig, params: Any, held: HeldOut) -> Array:
  """[K, L]: mean weighted delay of each sub-network over the optimum's, minus 1."""
  feats = normalized_features(held.slots, mec)
  out = all_subnetworks(model, {'params': params}, feats, held.x)
  wd = weighted_delays(out, held.slots, held.x, mec)  # [K, L, B]
  return wd.mean(-1) / held.optimum.mean() - 1.0


@functools.partial(jax.jit, static_argnums=(0, 1))
def static_gap(model: ModelConfig, mec: MECConfig, params: Any, held: HeldOut) -> Array:
  feats = normalized_features(held.slots, mec)
  out = StaticAllocator(model).apply({'params': params}, feats, held.x)
  return weighted_delays(out, held.slots, held.x, mec).mean() / held.optimum.mean() - 1.0


# ------------------------------------------------------------------- policy


def edge_costs(out: Allocation, slots: Slots, x: Array, mec: MECConfig,
               t_inf_edge: Array) -> Array:
  """C_edge_i = alpha (w_i T_inf_edge + T_edge_i) + beta E_edge_i, per user [..., W]."""
  w = importance_weight(slots, mec)
  t_tra, t_com = output_delays(out, slots, mec)
  cost = mec.alpha * (w * t_inf_edge[..., None] + t_tra + t_com) + mec.beta * mec.p_tx * t_tra
  return jnp.where(x, cost, 0.0)


def local_costs(slots: Slots, mec: MECConfig, t_inf_loc: Array) -> Array:
  """C_loc_i = alpha (w_i T_inf_loc + T_loc_i) + beta E_loc_i, per user [..., W]."""
  w = importance_weight(slots, mec)
  energy = local_energy(slots, mec)
  cost = mec.alpha * (w * jnp.asarray(t_inf_loc)[..., None] + local_delay(slots)) + mec.beta * energy
  return jnp.where(slots.mask, cost, 0.0)


def modelled_delay_table(model: ModelConfig, mec: MECConfig, x: Array, slots: Slots):
  """(T_inf_edge [..., K, L], T_inf_loc [...]) of the DyNN pipeline, modelled."""
  n_users = slots.mask.sum(-1)
  table = ops.inference_delay_table(model, mec, x.sum(-1), n_users)
  return table.edge, jnp.broadcast_to(table.loc, table.edge.shape)[..., 0, 0]


def user_costs(out: Allocation, slots: Slots, x: Array, mec: MECConfig, t_inf_edge: Array,
               loss: str) -> Array:
  """Per-user edge cost [..., W] of an allocator output: SPEC section 4's C_edge
  ('paper') or the user's hard share of the slot objective ('objective')."""
  if loss == 'paper':
    return edge_costs(out, slots, x, mec, t_inf_edge)
  return edge_user_costs(slots, x, out.b_share * mec.b_max, out.f_share * mec.f_ser, mec,
                         t_inf_edge)


def policy_labels(model: ModelConfig, mec: MECConfig, alloc_params: Any, slots: Slots,
                  x: Array, delay_table: Callable = modelled_delay_table,
                  loss: str = 'paper') -> Array:
  """Option index minimising the summed edge cost over the offloaded users: [...]."""
  out = all_subnetworks(model, {'params': alloc_params}, normalized_features(slots, mec), x)
  t_edge, _ = delay_table(model, mec, x, slots)          # [B, K, L]
  t_edge = jnp.moveaxis(t_edge, (-2, -1), (0, 1))         # [K, L, B]
  cost = user_costs(out, slots, x, mec, t_edge, loss).sum(-1)   # [K, L, B]
  cost = cost.reshape((model.num_options,) + cost.shape[2:])
  return jnp.argmin(cost, 0)


def policy_loss(policy: Policy, params: Any, feats: Array, x: Array, labels: Array) -> Array:
  logits = policy.apply({'params': params}, feats, x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def train_policy(mec: MECConfig, model: ModelConfig, train: TrainConfig, alloc_params: Any,
                 run: RunDir | None = None, delay_table: Callable = modelled_delay_table,
                 name: str = 'policy') -> Any:
  """Pre-trains the policy on slots with every task offloaded."""
  key = phase_key(train.seed, name)
  policy = Policy(model)
  params = init_params(policy, jax.random.fold_in(key, 0), mec)
  tx = optax.adam(train.policy_lr)

  def step(state, key):
    slots = training_slots(key, mec, train)
    x = slots.mask
    feats = normalized_features(slots, mec)
    labels = policy_labels(model, mec, alloc_params, slots, x, delay_table, train.loss)
    value, grads = jax.value_and_grad(policy_loss, 1)(policy, state.params, feats, x, labels)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    return (TrainState(optax.apply_updates(state.params, updates), opt_state, state.step + 1),
            {'loss_policy': value})

  state = TrainState(params, tx.init(params), jnp.int32(0))
  chunk = _scan_chunk(step, jax.random.fold_in(key, 1))
  return _chunked_phase(name, run, state, train.policy_steps, train, chunk).params


# ------------------------------------------------------------------- scheduler


class JointState(NamedTuple):
  scheduler: TrainState
  policy: TrainState
  step: Array


def counterfactual_shares(out_all: Allocation, x: Array) -> tuple[Array, Array]:
  """Shares each user would get joining the offloaded set x alone (logits of a pass
  over all real users; offloaded users keep their own shares under x)."""
  def share(logits):
    top = jax.lax.stop_gradient(jnp.max(logits, -1, keepdims=True))
    e = jnp.exp(logits - top)
    others = jnp.where(x, e, 0.0).sum(-1, keepdims=True)
    return jnp.where(x, e / jnp.maximum(others, 1e-30), e / (others + e))
  return share(out_all.b_logits), share(out_all.f_logits)


def congestion_costs(cf: Allocation, slots: Slots, x: Array, mec: MECConfig) -> Array:
  """What each user's edge resources cost the offloaded users [..., W]: its counterfactual
  bandwidth and CPU at the slot's marginal prices (`resource_prices` under x).

  A user's own edge cost ignores that its share is taken from the others; with the
  objective as reward, a scheduler that ignores it offloads everyone. Pricing the
  budgets at their Lagrange multipliers makes each user's reward its marginal effect on
  the slot objective, to first order.
  """
  b, f = cf.b_share * mec.b_max, cf.f_share * mec.f_ser
  actual = Decision(x=x, b=jnp.where(x, b, 0.0), f=jnp.where(x, f, 0.0))
  nu_b, nu_f = resource_prices(slots, actual, mec)
  return jnp.where(slots.mask, nu_b[..., None] * b + nu_f[..., None] * f, 0.0)


def joint_step_fn(mec: MECConfig, model: ModelConfig, train: TrainConfig, alloc_params: Any,
                  delay_table: Callable = modelled_delay_table):
  scheduler, policy = Scheduler(model), Policy(model)
  tx_s, tx_p = optax.adam(train.scheduler_lr), optax.adam(train.policy_lr)

  def step(state: JointState, key: Array):
    ks, kx = jax.random.split(key)
    slots = training_slots(ks, mec, train)
    feats = normalized_features(slots, mec)

    def sched_prob(params):
      return scheduler.apply({'params': params}, feats, slots.mask).prob

    p = sched_prob(state.scheduler.params)
    x = slots.mask & (jax.random.uniform(kx, p.shape) < p)
    logits = policy.apply({'params': state.policy.params}, feats, x)
    k, l = choose_kl(logits, model)
    t_edge_table, t_loc = delay_table(model, mec, x, slots)
    t_edge = jnp.take_along_axis(
        t_edge_table.reshape(t_edge_table.shape[:-2] + (-1,)),
        ((k - 1) * model.max_depth + l - 1)[..., None], -1)[..., 0]
    out_all = moe_forward(model, alloc_params, feats, slots.mask, k, l)
    b_share, f_share = counterfactual_shares(out_all, x)
    cf = Allocation(out_all.b_logits, out_all.f_logits, b_share, f_share, out_all.gate)
    c_edge = user_costs(cf, slots, slots.mask, mec, t_edge, train.loss)
    if train.loss == 'paper':
      gain = local_costs(slots, mec, t_loc) - c_edge     # > 0: offloading is cheaper
    else:
      gain = local_user_costs(slots, mec, t_loc) - c_edge - congestion_costs(cf, slots, x, mec)
    if train.normalize_rewards or train.loss == 'objective':
      # Every slot counts alike, whatever its task sizes (large tasks have large costs).
      scale = jnp.where(slots.mask, jnp.abs(gain), 0.0).sum(-1, keepdims=True)
      gain = gain * (slots.mask.sum(-1, keepdims=True) / jnp.maximum(scale, 1e-30))
    gain = jax.lax.stop_gradient(gain)

    def sched_loss(params):
      prob = sched_prob(params)
      reward = jnp.where(x, gain * prob, -gain * (1.0 - prob))
      return -jnp.where(slots.mask, reward, 0.0).sum(-1).mean()

    loss_s, grads = jax.value_and_grad(sched_loss)(state.scheduler.params)
    updates, opt_s = tx_s.update(grads, state.scheduler.opt_state)
    sched = TrainState(optax.apply_updates(state.scheduler.params, updates), opt_s,
                       state.scheduler.step + 1)
    labels = policy_labels(model, mec, alloc_params, slots, x, delay_table, train.loss)
    loss_p, grads = jax.value_and_grad(policy_loss, 1)(policy, state.policy.params, feats,
                                                       x, labels)
    updates, opt_p = tx_p.update(grads, state.policy.opt_state)
    pol = TrainState(optax.apply_updates(state.policy.params, updates), opt_p,
                     state.policy.step + 1)
    metrics = {'loss_scheduler': loss_s, 'loss_policy': loss_p,
               'offload_ratio': x.sum() / jnp.maximum(slots.mask.sum(), 1)}
    return JointState(sched, pol, state.step + 1), metrics

  return step, tx_s, tx_p


def train_joint(mec: MECConfig, model: ModelConfig, train: TrainConfig, alloc_params: Any,
                policy_params: Any, run: RunDir | None = None,
                delay_table: Callable = modelled_delay_table, name: str = 'joint'
                ) -> tuple[Any, Any]:
  """Case 2: the scheduler and the policy trained together, allocator frozen."""
  key = phase_key(train.seed, name)
  sched_params = init_params(Scheduler(model), jax.random.fold_in(key, 0), mec)
  step, tx_s, tx_p = joint_step_fn(mec, model, train, alloc_params, delay_table)
  state = JointState(TrainState(sched_params, tx_s.init(sched_params), jnp.int32(0)),
                     TrainState(policy_params, tx_p.init(policy_params), jnp.int32(0)),
                     jnp.int32(0))
  chunk = _scan_chunk(step, jax.random.fold_in(key, 1))
  state = _chunked_phase(name, run, state, train.joint_steps, train, chunk)
  return state.scheduler.params, state.policy.params


def train_all(mec: MECConfig, model: ModelConfig, train: TrainConfig,
              run: RunDir | None = None) -> Params:
  """Allocator, static baseline, policy and (case 2) scheduler, in the paper's order."""
  allocator = train_allocator(mec, model, train, run)
  static = (train_allocator(mec, model, train, run, name='static', static=True)
            if train.static_steps else None)
  policy = train_policy(mec, model, train, allocator, run) if train.policy_steps else None
  scheduler = None
  if mec.case == 2 and train.joint_steps:
    if policy is None:
      policy = init_params(Policy(model), phase_key(train.seed, 'policy'), mec)
    scheduler, policy = train_joint(mec, model, train, allocator, policy, run)
  return Params(allocator=allocator, static=static, policy=policy, scheduler=scheduler)


# ------------------------------------------------------------ trained networks file

NETWORKS_FORMAT = 1


def save_networks(path: str, params: Params, mec: MECConfig, model: ModelConfig,
                  train: TrainConfig) -> None:
  """One msgpack file with every trained network and the configs they belong to."""
  payload = {'format': NETWORKS_FORMAT,
             'meta': json.dumps({'mec': mec.to_dict(), 'model': model.to_dict(),
                                 'train': train.to_dict()}, sort_keys=True),
             'params': {k: serialization.to_state_dict(v)
                        for k, v in params._asdict().items() if v is not None}}
  write_bytes_atomic(path, serialization.msgpack_serialize(payload))


def trained_loss(meta: dict) -> str:
  """The loss a networks file was trained with (files before `loss` existed: 'paper')."""
  return meta.get('train', {}).get('loss', 'paper')


def load_networks(path: str, expect_mec: MECConfig | None = None,
                  expect_model: ModelConfig | None = None):
  """(Params, mec, model, meta) from `save_networks`; clear errors for a missing,
  corrupt or mismatched file (the configs' fields that differ are named)."""
  if os.path.isdir(path):  # a run directory
    path = os.path.join(path, 'networks.msgpack')
  if not os.path.exists(path):
    raise FileNotFoundError(f'trained networks not found: {path} (train them with '
                            'launch/train.py, or pass another --networks)')
  try:
    with open(path, 'rb') as f:
      payload = serialization.msgpack_restore(f.read())
    meta = json.loads(payload['meta'])
    mec, model = MECConfig.from_dict(meta['mec']), ModelConfig.from_dict(meta['model'])
  except Exception as e:  # any decoding failure means the file cannot be trusted
    raise ValueError(f'trained networks file {path} is corrupt or not a networks file: '
                     f'{type(e).__name__}: {e}') from None
  if payload.get('format') != NETWORKS_FORMAT:
    raise ValueError(f'{path}: format {payload.get("format")!r}, expected {NETWORKS_FORMAT}')
  for label, want, got in (('model', expect_model, model), ('system', expect_mec, mec)):
    if want is None:
      continue
    diff = sorted(k for k, v in want.to_dict().items() if got.to_dict().get(k) != v)
    if diff:
      raise ValueError(f'{path} was trained for a different {label} configuration; '
                       f'differing fields: ' + ', '.join(
                           f'{k} (trained {got.to_dict().get(k)!r}, asked '
                           f'{want.to_dict()[k]!r})' for k in diff))
  params = Params(**{k: jax.tree.map(jnp.asarray, v) for k, v in payload['params'].items()})
  return params, mec, model, meta
