"""One training step of each phase (SPEC section 4): `step(state, key) -> (state,
metrics)`, pure and jit-able; the loop that scans and checkpoints them is `loop`'s.

Allocation step (one batch, two sequential updates on the same input):
  1. loss sum_i w_i T_tra_i through head A (bandwidth shares), update;
  2. loss sum_i w_i T_com_i through head B (CPU shares), update.
Each slot of the batch trains its own sub-network (k, l), drawn uniformly from the
range the schedule allows at that step (`config.kl_bounds`):
  * progressive: (K, L) only; then k from a range growing down to 1 at depth L; then
    every k with l from a range growing down to 1 (`dynamic` = 'width' or 'depth'
    keeps the other dimension at its maximum);
  * scratch: every allowed (k, l) from the first step.

Policy labels: for each slot, the (k, l) minimising the mean edge cost over the
offloaded users, C_edge_i = alpha (w_i T_inf_edge(k, l) + T_edge_i) + beta E_edge_i,
with all K x L sub-networks evaluated in one vmapped call; loss: cross-entropy over the
K * L options. With `TrainConfig.policy_target = 'expected_cost'` the policy instead
minimises the softmax-weighted cost of the options relative to the slot's cheapest
(`policy_loss`).

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

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from dynn_jax import delay as delay_model
from dynn_jax.config import MECConfig
from dynn_jax.env import (Decision, Slots, edge_delays, edge_user_costs, importance_weight,
                          local_delay, local_energy, local_user_costs, normalized_features,
                          user_cost)
from dynn_jax.models import (Allocation, ModelConfig, Policy, Scheduler, StaticAllocator,
                             all_subnetworks, allocate, choose_kl, moe_forward, policy_context,
                             scheduler_context)
from dynn_jax.solvers import equal_split
from dynn_jax.solvers.objective import resource_prices
from dynn_jax.training.config import (TrainConfig, miss_temperature, sample_kl,
                                      sample_offload, training_slots, training_system)

Array = jax.Array


# ------------------------------------------------------------------- the update


def update(tx: optax.GradientTransformation, params: Any, opt_state: Any, grads: Any
           ) -> tuple[Any, Any]:
  """(params, opt_state) after one optimizer update with `grads`."""
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state


class TrainState(NamedTuple):
  # A NamedTuple of these three fields, in this order, is what run checkpoints hold:
  # another structure would not restore a checkpoint written before it.
  params: Any
  opt_state: Any
  step: Array

  @classmethod
  def create(cls, tx: optax.GradientTransformation, params: Any) -> 'TrainState':
    return cls(params, tx.init(params), jnp.int32(0))

  def apply_gradients(self, tx: optax.GradientTransformation, grads: Any) -> 'TrainState':
    """One update, one step."""
    return TrainState(*update(tx, self.params, self.opt_state, grads), self.step + 1)


# ------------------------------------------------------------------- allocation


def output_delays(out: Allocation, slots: Slots, x: Array, config: MECConfig
                  ) -> tuple[Array, Array]:
  """(T_tra, T_com) of every user under an allocator's shares of the budgets."""
  decision = allocate(out, x, config)
  return edge_delays(slots, decision.b, decision.f, config)


def weighted_parts(out: Allocation, slots: Slots, x: Array, config: MECConfig
                   ) -> tuple[Array, Array]:
  """Mean over slots of sum_i w_i T_tra_i and of sum_i w_i T_com_i (the two losses)."""
  w = importance_weight(slots, config)
  take = x & (w > 0)
  t_tra, t_com = output_delays(out, slots, x, config)
  part = lambda t: jnp.where(take, w * t, 0.0).sum(-1).mean()
  return part(t_tra), part(t_com)


def share_divergence(student: Allocation, teacher: Allocation, x: Array) -> tuple[Array, Array]:
  """Mean over slots of KL(teacher || student) of the bandwidth shares and of the CPU
  shares over the offloaded users (in-place distillation; the teacher held fixed)."""
  def kl(t, s):
    t = jax.lax.stop_gradient(t)
    terms = jnp.where(x & (t > 0), t * (jnp.log(jnp.maximum(t, 1e-30))
                                        - jnp.log(jnp.maximum(s, 1e-30))), 0.0)
    return terms.sum(-1).mean()
  return kl(teacher.b_share, student.b_share), kl(teacher.f_share, student.f_share)


def load_imbalance(gate: Array) -> Array:
  """Squared coefficient of variation of the experts' summed gate weights over the
  batch (Shazeer et al.'s importance loss): 0 when every expert carries the same load."""
  importance = gate.reshape(-1, gate.shape[-1]).sum(0)
  return importance.var() / jnp.maximum(importance.mean() ** 2, 1e-30)


def objective_loss(out: Allocation, slots: Slots, x: Array, mec: MECConfig,
                   t_inf_edge: Array, temperature: Array) -> Array:
  """Mean over slots of the smoothed slot objective of the offloaded users, each slot
  relative to its equal split's objective.

  Training slots span a range of sizes (TrainConfig.size_scale_*) and a slot's objective
  grows with its tasks: unscaled, the largest slots would set every gradient. Relative
  to a fixed per-slot reference every slot counts alike, and the minimiser per slot is
  unchanged.
  """
  decision = allocate(out, x, mec)
  cost = edge_user_costs(slots, x, decision.b, decision.f, mec, t_inf_edge,
                         temperature).sum(-1)
  equal = equal_split(slots, x, mec)
  reference = edge_user_costs(slots, x, equal.b, equal.f, mec, t_inf_edge).sum(-1)
  return (cost / jnp.maximum(jax.lax.stop_gradient(reference), 1e-30)).mean()


def allocator_step(apply: Callable, tx: optax.GradientTransformation, mec: MECConfig,
                   train: TrainConfig, model: ModelConfig, dynamic: bool, total: int = 1,
                   exits: Callable | None = None, delay: Any = None):
  """One step of SPEC section 4 (two updates; `train.loss == 'paper'`) or one update on
  the smoothed objective ('objective', temperature annealed over `total` steps);
  `apply(params, feats, x, k, l, key)`. Each slot trains the exit (k, l) the
  progressive schedule samples; with `exits(feats, x)` (dynamic only) the first half of
  the batch trains the exits it gives and the rest the schedule's, so that the exits it
  does not give keep being trained. `delay` is the inference-delay model
  (`dynn_jax.delay`) of the objective's T_inf. With `train.distill_weight` each exit also
  fits the largest exit's shares; with `train.balance_weight` the gate's load is
  balanced (see TrainConfig)."""
  if exits is not None and not dynamic:
    raise ValueError('allocator_step: exits= needs dynamic=True')
  delay = delay_model.resolve(delay)
  K, L = model.num_experts, model.max_depth
  distill = dynamic and train.distill_weight > 0
  balance = dynamic and train.balance_weight > 0

  def step(state: TrainState, key: Array):
    ks, kx, kkl, kn = jax.random.split(key, 4)
    slots = training_slots(ks, mec, train)
    x = sample_offload(kx, slots, train.offload_fraction_min)
    feats = normalized_features(slots, mec)
    if dynamic:
      k, l = sample_kl(kkl, state.step, (train.batch,), train, model)
      if exits is not None:
        picked_k, picked_l = exits(feats, x)
        policy_half = jnp.arange(train.batch) < train.batch // 2
        k, l = jnp.where(policy_half, picked_k, k), jnp.where(policy_half, picked_l, l)
    else:
      k = l = None

    def extras(params, out):
      """The distillation and load-balancing terms: (bandwidth part, CPU part, metrics)."""
      parts, metrics = [0.0, 0.0], {}
      if distill:
        teacher = apply(params, feats, x, K, L, kn)
        kl_b, kl_f = share_divergence(out, teacher, x)
        parts = [train.distill_weight * kl_b, train.distill_weight * kl_f]
        metrics['distill'] = kl_b + kl_f
      if balance:
        imbalance = load_imbalance(out.gate)
        parts = [p + train.balance_weight * imbalance for p in parts]
        metrics['imbalance'] = imbalance
      return parts, metrics

    if train.loss == 'objective':
      t_inf = delay.pipeline(model, mec, k, l, x.sum(-1), slots.mask.sum(-1),
                             policy=dynamic, static=not dynamic).edge
      temperature = miss_temperature(state.step, total, train)

      def objective(params):
        out = apply(params, feats, x, k, l, kn)
        value = objective_loss(out, slots, x, mec, t_inf, temperature)
        parts, metrics = extras(params, out)
        return value + parts[0] + parts[1], {'loss_objective': value, **metrics}

      (_, metrics), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
      return (state.apply_gradients(tx, grads),
              {**metrics, 'miss_temperature': temperature})

    def loss(params, which):
      out = apply(params, feats, x, k, l, kn)
      value = weighted_parts(out, slots, x, mec)[which]
      parts, metrics = extras(params, out)
      return value + parts[which], {('loss_tra', 'loss_com')[which]: value, **metrics}

    params, opt_state, metrics = state.params, state.opt_state, {}
    for which in (0, 1):
      (_, aux), grads = jax.value_and_grad(loss, has_aux=True)(params, which)
      metrics.update(aux)
      params, opt_state = update(tx, params, opt_state, grads)
    return TrainState(params, opt_state, state.step + 1), metrics
  return step


def moe_apply(model: ModelConfig):
  return lambda params, feats, x, k, l, key: moe_forward(model, params, feats, x, k, l, key)


def static_apply(model: ModelConfig):
  net = StaticAllocator(model)
  return lambda params, feats, x, k, l, key: net.apply({'params': params}, feats, x)


# ------------------------------------------------------------------- policy


def edge_costs(out: Allocation, slots: Slots, x: Array, mec: MECConfig,
               t_inf_edge: Array) -> Array:
  """C_edge_i = alpha (w_i T_inf_edge + T_edge_i) + beta E_edge_i, per user [..., W]."""
  w = importance_weight(slots, mec)
  t_tra, t_com = output_delays(out, slots, x, mec)
  cost = user_cost(mec, w * t_inf_edge[..., None] + t_tra + t_com, t_tra,
                   energy_weight=mec.beta * mec.p_tx, zero_weight_drops=False)
  return jnp.where(x, cost, 0.0)


def local_costs(slots: Slots, mec: MECConfig, t_inf_loc: Array) -> Array:
  """C_loc_i = alpha (w_i T_inf_loc + T_loc_i) + beta E_loc_i, per user [..., W]."""
  w = importance_weight(slots, mec)
  energy = local_energy(slots, mec)
  cost = user_cost(mec, w * jnp.asarray(t_inf_loc)[..., None] + local_delay(slots), energy,
                   zero_weight_drops=False)
  return jnp.where(slots.mask, cost, 0.0)


def user_costs(out: Allocation, slots: Slots, x: Array, mec: MECConfig, t_inf_edge: Array,
               loss: str) -> Array:
  """Per-user edge cost [..., W] of an allocator output: SPEC section 4's C_edge
  ('paper') or the user's hard share of the slot objective ('objective')."""
  if loss == 'paper':
    return edge_costs(out, slots, x, mec, t_inf_edge)
  decision = allocate(out, x, mec)
  return edge_user_costs(slots, x, decision.b, decision.f, mec, t_inf_edge)


def option_costs(model: ModelConfig, mec: MECConfig, alloc_params: Any, slots: Slots,
                 x: Array, delay: Any = None, loss: str = 'paper',
                 feature_config: MECConfig | None = None) -> Array:
  """Summed edge cost over the offloaded users of every option (k, l), each with its own
  inference delay in `delay`'s model (`dynn_jax.delay`, the evaluation's): [..., K * L].
  Features are normalised with `feature_config` (default `mec`)."""
  feats = normalized_features(slots, mec if feature_config is None else feature_config)
  out = all_subnetworks(model, {'params': alloc_params}, feats, x)
  t_edge = delay_model.table(delay, model, mec, x.sum(-1), slots.mask.sum(-1)).edge
  t_edge = jnp.moveaxis(t_edge, (-2, -1), (0, 1))         # [K, L, B]
  cost = user_costs(out, slots, x, mec, t_edge, loss).sum(-1)   # [K, L, B]
  return jnp.moveaxis(cost.reshape((model.num_options,) + cost.shape[2:]), 0, -1)


def policy_loss(policy: Policy, params: Any, feats: Array, x: Array, costs: Array,
                target: str = 'labels', context: Array | None = None) -> Array:
  """The policy's loss on slots whose options cost `costs` [..., K * L] (see
  TrainConfig.policy_target)."""
  logits = policy.apply({'params': params}, feats, x, context)
  if target == 'labels':
    return optax.softmax_cross_entropy_with_integer_labels(logits, jnp.argmin(costs, -1)).mean()
  best = costs.min(-1, keepdims=True)
  excess = (costs - best) / jnp.maximum(best, 1e-30)   # 0 for the cheapest option
  return (jax.nn.softmax(logits) * jax.lax.stop_gradient(excess)).sum(-1).mean()


def policy_system(key: Array, mec: MECConfig, model: ModelConfig, train: TrainConfig):
  """The system a policy step's costs are computed in: f_ser drawn as in the joint loop
  (`training_system`) when the policy reads the server's CPU, else `mec`."""
  if model.policy_context == 'none':
    return mec
  return training_system(key, mec, train)


def policy_step(tx: optax.GradientTransformation, mec: MECConfig, model: ModelConfig,
                train: TrainConfig, alloc_params: Any, delay: Any = None):
  """Supervised pre-training on slots with every task offloaded, allocator frozen."""
  policy = Policy(model)

  def step(state: TrainState, key: Array):
    slots = training_slots(key, mec, train)
    x = slots.mask
    feats = normalized_features(slots, mec)
    env = policy_system(jax.random.fold_in(key, 3), mec, model, train)
    costs = option_costs(model, env, alloc_params, slots, x, delay, train.loss,
                         feature_config=mec)
    value, grads = jax.value_and_grad(policy_loss, 1)(
        policy, state.params, feats, x, costs, train.policy_target,
        policy_context(model, env, mec))
    return state.apply_gradients(tx, grads), {'loss_policy': value}
  return step


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
  shared = allocate(cf, x, mec)
  b, f = shared.b, shared.f
  actual = Decision(x=x, b=jnp.where(x, b, 0.0), f=jnp.where(x, f, 0.0))
  nu_b, nu_f = resource_prices(slots, actual, mec)
  return jnp.where(slots.mask, nu_b[..., None] * b + nu_f[..., None] * f, 0.0)


def joint_step(tx_s: optax.GradientTransformation, tx_p: optax.GradientTransformation,
               mec: MECConfig, model: ModelConfig, train: TrainConfig, alloc_params: Any,
               delay: Any = None):
  """Case 2: one scheduler update (policy gradient) and one policy update (labels under
  the scheduler's offloading) per step, allocator frozen."""
  scheduler, policy = Scheduler(model), Policy(model)

  def step(state: JointState, key: Array):
    ks, kx = jax.random.split(key)
    slots = training_slots(ks, mec, train)
    feats = normalized_features(slots, mec)
    env = training_system(jax.random.fold_in(key, 2), mec, train)
    context = scheduler_context(model, env, mec)

    def sched_prob(params):
      return scheduler.apply({'params': params}, feats, slots.mask, context).prob

    p = sched_prob(state.scheduler.params)
    x = slots.mask & (jax.random.uniform(kx, p.shape) < p)
    p_context = policy_context(model, env, mec)
    logits = policy.apply({'params': state.policy.params}, feats, x, p_context)
    k, l = choose_kl(logits, model)
    t_edge_table, t_loc = delay_model.table(delay, model, env, x.sum(-1), slots.mask.sum(-1))
    t_edge = jnp.take_along_axis(
        t_edge_table.reshape(t_edge_table.shape[:-2] + (-1,)),
        ((k - 1) * model.max_depth + l - 1)[..., None], -1)[..., 0]
    out_all = moe_forward(model, alloc_params, feats, slots.mask, k, l)
    b_share, f_share = counterfactual_shares(out_all, x)
    cf = Allocation(out_all.b_logits, out_all.f_logits, b_share, f_share, out_all.gate)
    c_edge = user_costs(cf, slots, slots.mask, env, t_edge, train.loss)
    if train.loss == 'paper':
      gain = local_costs(slots, env, t_loc) - c_edge     # > 0: offloading is cheaper
    else:
      gain = (local_user_costs(slots, env, t_loc) - c_edge
              - congestion_costs(cf, slots, x, env))
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
    sched = state.scheduler.apply_gradients(tx_s, grads)
    costs = option_costs(model, env, alloc_params, slots, x, delay, train.loss,
                         feature_config=mec)
    loss_p, grads = jax.value_and_grad(policy_loss, 1)(policy, state.policy.params, feats,
                                                       x, costs, train.policy_target,
                                                       p_context)
    pol = state.policy.apply_gradients(tx_p, grads)
    metrics = {'loss_scheduler': loss_s, 'loss_policy': loss_p,
               'offload_ratio': x.sum() / jnp.maximum(slots.mask.sum(), 1)}
    return JointState(sched, pol, state.step + 1), metrics
  return step
