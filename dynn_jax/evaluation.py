"""Evaluation of every method on the same sampled slots (SPEC sections 1, 5 and 6).

A *method* maps (static, env, key, slots, params) to an `Outcome`: the decision, the
inference delays its users see and the counted ops it ran. `evaluate` samples slots in
chunks (memory stays bounded for any number of slots), runs every method on the same
chunk, scores it with `slot_costs` and accumulates per-slot metrics into means with 95%
confidence intervals.

Two arguments go all the way down: `Static` (case, width, networks' config, feature
ranges, delay model: hashable, what the compiled chunk is specialised on) and the
system's numbers, `EnvParams` (traced: every system of one `Static` shares a compile).
`Setting`, what users build from a `MECConfig`, gives both (`static`, `mec.params()`).

Inference delay modes: 'modelled' (counted ops * cycles_per_op / f_ser, SPEC
section 2) or 'measured' (a per-device latency table from the benchmark module, see
`dynn_jax.latency`). The optimum, equal split, GA and the offloading baselines have no
network: in modelled mode they add no inference delay; in measured mode their own
measured per-slot run time is added when the table has it.

Networks read features normalised with the ranges of the configuration they were
trained on (`feature_config`), so that a sweep (e.g. of s_avg) shows them inputs they
can tell apart.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dynn_jax import delay as delay_model
from dynn_jax import ops
from dynn_jax.config import POSITIVE_INT, EnvParams, MECConfig, point_params, sweep_params
from dynn_jax.env import (Decision, Slots, decision_from_shares, normalized_features,
                          sample_slots, slot_costs)
from dynn_jax.batching import blocked
from dynn_jax.models import (Allocation, ModelConfig, Policy, Scheduler, StaticAllocator,
                             all_subnetworks, allocate, exit_sorted_apply, moe_forward,
                             kl_to_option, option_to_kl, per_slot_forward, policy_context,
                             scheduler_context)
from dynn_jax.networks import Params
from dynn_jax.rl.agent import deterministic_decision  # flax only: no gymnax, no optax
from dynn_jax.runs import Progress
from dynn_jax.solvers import (GAConfig, all_local, equal_split, exhaustive_search, ga_solve,
                              joint_objective_bound, objective_bound, optimal_allocation,
                              oracle, random_offload)

Array = jax.Array


class Outcome(NamedTuple):
  decision: Decision
  t_inf_edge: Array   # [...] s
  t_inf_loc: Array    # [...] s
  ops: Array          # [...] counted ops run for the slot
  # [...] the option index (k - 1) * L + (l - 1) each slot ran, for methods that pick
  # one per slot (their results then hold the share of slots per exit, `pick_<k>_<l>`).
  option: Array | None = None


@dataclasses.dataclass(frozen=True)
class Static:
  """What fixes a method's program, never a number of the system: the jit static
  argument of the compiled chunk. The system's numbers come beside it as `EnvParams`."""
  case: int
  width: int
  model: ModelConfig
  feature_config: MECConfig
  # The inference-delay model (`dynn_jax.delay`): delay.MODELLED (None means it too),
  # delay.NONE, or a dynn_jax.latency.MeasuredTable.
  delay: Any = None

  @property
  def mode(self) -> str:
    return delay_model.resolve(self.delay).mode


@dataclasses.dataclass(frozen=True)
class Setting:
  """An evaluation's front door: the system, the networks' config, the ranges their
  features were normalised with and the delay model. The methods get it split: its
  `static` part and the system's numbers (`mec.params()`, or a sweep's)."""
  mec: MECConfig
  model: ModelConfig
  feature_config: MECConfig
  delay: Any = None  # as Static.delay

  @property
  def static(self) -> Static:
    return Static(case=self.mec.case, width=self.mec.width, model=self.model,
                  feature_config=self.feature_config, delay=self.delay)

  @property
  def mode(self) -> str:
    return self.static.mode


# (static, env, key, slots, params) -> Outcome, traced inside the compiled chunk.
Method = Callable[[Static, EnvParams, Array, Slots, Params], Outcome]


# Methods that decide offloading and so need case 2 (users with CPUs).
OFFLOADING_METHODS = ('random', 'local', 'exhaustive')
NEEDS = {'policy_moe': ('allocator', 'policy'), 'pmrl': ('allocator', 'policy', 'scheduler'),
         'fix_width': ('allocator', 'policy'), 'fix_depth': ('allocator', 'policy'),
         'fix_moe': ('allocator',), 'static': ('static',), 'ppo': ('agent',)}


def _zeros(slots: Slots) -> Array:
  return jnp.zeros(slots.mask.shape[:-1], slots.s.dtype)


def _scheduler_x(static: Static, env: EnvParams, params: Params, feats: Array,
                 slots: Slots) -> Array:
  """Case 2: offload where the scheduler's probability exceeds 1/2; case 1: everyone."""
  if static.case == 1:
    return slots.mask
  context = scheduler_context(static.model, env, static.feature_config)
  prob = Scheduler(static.model).apply({'params': params.scheduler}, feats, slots.mask,
                                       context).prob
  return slots.mask & (prob > 0.5)


def _restricted_choice(logits: Array, model: ModelConfig, fix: str) -> tuple[Array, Array]:
  """The policy's best option with k = K ('width' fixed) or l = L ('depth' fixed)."""
  k, l = option_to_kl(jnp.arange(model.num_options), model)
  allowed = {'none': jnp.ones_like(k, bool), 'width': k == model.num_experts,
             'depth': l == model.max_depth}[fix]
  return option_to_kl(jnp.argmax(jnp.where(allowed, logits, -jnp.inf), -1), model)


def _pipeline_delays(static: Static, env: EnvParams, k, l, x: Array, slots: Slots,
                     policy: bool, static_allocator: bool = False
                     ) -> tuple[Array, Array, Array]:
  """(t_inf_edge, t_inf_loc, ops) of the network pipeline that decided the slot."""
  n_off, n_users = x.sum(-1), slots.mask.sum(-1)
  scheduler = static.case == 2
  net_ops = ops.pipeline_ops(static.model, k, l, n_off, n_users, policy=policy,
                             scheduler=scheduler, static=static_allocator)
  d = delay_model.resolve(static.delay).pipeline(
      static.model, env, k, l, n_off, n_users, policy=policy, scheduler=scheduler,
      static=static_allocator)
  return (jnp.broadcast_to(d.edge, n_off.shape), jnp.broadcast_to(d.loc, n_off.shape),
          net_ops)


def _moe_method(fix: str, use_policy: bool):
  def run(static: Static, env: EnvParams, key, slots: Slots, params: Params) -> Outcome:
    model = static.model
    feats = normalized_features(slots, static.feature_config)
    x = _scheduler_x(static, env, params, feats, slots)
    batch = slots.mask.shape[:-1]
    if use_policy:
      context = policy_context(model, env, static.feature_config)
      logits = Policy(model).apply({'params': params.policy}, feats, x, context)
      k, l = _restricted_choice(logits, model, fix)
    else:
      k = jnp.full(batch, model.num_experts, jnp.int32)
      l = jnp.full(batch, model.max_depth, jnp.int32)
    variables = {'params': params.allocator}
    if use_policy:  # each slot runs only the exit it picked, not all of them masked
      out = exit_sorted_apply(model, variables, feats, x, k, l)
    else:  # every slot runs the full network: the masked path, block by block
      out = blocked(lambda f, m: moe_forward(model, variables, f, m, model.num_experts,
                                             model.max_depth))(feats, x)
    edge, loc, n_ops = _pipeline_delays(static, env, k, l, x, slots, policy=use_policy)
    option = kl_to_option(k, l, model) if use_policy else None
    return Outcome(allocate(out, x, env), edge, loc, n_ops, option)
  return run


def _exit_method(k: int, l: int):
  """One sub-network (k, l) for every slot: its per-slot path (only k experts, l layers),
  block by block; no policy runs."""
  def run(static: Static, env: EnvParams, key, slots: Slots, params: Params) -> Outcome:
    model = static.model
    feats = normalized_features(slots, static.feature_config)
    x = _scheduler_x(static, env, params, feats, slots)
    variables = {'params': params.allocator}
    out = blocked(lambda f, m: per_slot_forward(model, k, l, variables, f, m))(feats, x)
    edge, loc, n_ops = _pipeline_delays(static, env, k, l, x, slots, policy=False)
    return Outcome(allocate(out, x, env), edge, loc, n_ops)
  return run


def exit_objectives(static: Static, env: EnvParams, out: Allocation, x: Array,
                    slots: Slots, policy: bool = True) -> tuple[Array, Array, Array]:
  """Slot objective [..., K, L] of every exit's allocation `out` (leaves [K, L, ...]),
  each with its own inference delay (a policy's pipeline when `policy`), and those
  delays (edge [..., K, L], loc [...])."""
  table = delay_model.table(static.delay, static.model, env, x.sum(-1),
                            slots.mask.sum(-1), policy=policy, scheduler=static.case == 2)
  t_edge = jnp.moveaxis(table.edge, (-2, -1), (0, 1))              # [K, L, ...]
  decision = allocate(out, x, env)
  objective = slot_costs(slots, decision, env, t_edge, table.loc).objective
  return jnp.moveaxis(objective, (0, 1), (-2, -1)), table.edge, table.loc


def _hindsight(static: Static, env: EnvParams, key, slots: Slots, params: Params
               ) -> Outcome:
  """Per slot, the exit whose objective (its inference delay included, with a policy's
  cost) is lowest after trying all of them: the best any policy over these networks
  can do on these slots."""
  model = static.model
  feats = normalized_features(slots, static.feature_config)
  x = _scheduler_x(static, env, params, feats, slots)
  variables = {'params': params.allocator}

  def best(f, m, s):
    out = all_subnetworks(model, variables, f, m)                    # leaves [K, L, b, ...]
    objective, _, _ = exit_objectives(static, env, out, m, s)
    option = jnp.argmin(objective.reshape(objective.shape[:-2] + (-1,)), -1)
    flat = jax.tree.map(lambda a: a.reshape((-1,) + a.shape[2:]), out._replace(gate=None))
    pick = lambda a: jnp.take_along_axis(a, option[None, :, None], 0)[0]
    return pick(flat.b_share), pick(flat.f_share), option

  b_share, f_share, option = blocked(best)(feats, x, slots)
  k, l = option_to_kl(option, model)
  decision = decision_from_shares(x, b_share, f_share, env)
  edge, loc, n_ops = _pipeline_delays(static, env, k, l, x, slots, policy=True)
  return Outcome(decision, edge, loc, n_ops, option)


def _static(static: Static, env: EnvParams, key, slots: Slots, params: Params) -> Outcome:
  feats = normalized_features(slots, static.feature_config)
  x = _scheduler_x(static, env, params, feats, slots)
  allocator = StaticAllocator(static.model)
  out = blocked(lambda f, m: allocator.apply({'params': params.static}, f, m))(feats, x)
  edge, loc, n_ops = _pipeline_delays(static, env, None, None, x, slots, policy=False,
                                      static_allocator=True)
  return Outcome(allocate(out, x, env), edge, loc, n_ops)


# The solver whose measured run time each method adds in measured mode (the others,
# e.g. all-local, run nothing worth timing).
TIMED_SOLVERS = {'kkt_weighted': 'kkt_weighted', 'equal_split': 'equal_split',
                 'random': 'kkt_weighted', 'ga': 'ga', 'oracle': 'oracle'}


def _own_time(static: Static, method: str, slots: Slots) -> Array:
  """A solver method's own run time per slot [...]: its inference delay in measured
  mode, 0 in modelled mode."""
  zeros = _zeros(slots)
  if method not in TIMED_SOLVERS:
    return zeros
  return delay_model.resolve(static.delay).solver(TIMED_SOLVERS[method], zeros)


def _solver_method(method: str, offload: Callable, allocate_fn: Callable):
  def run(static: Static, env: EnvParams, key, slots: Slots, params: Params) -> Outcome:
    x = offload(key, slots)
    decision = allocate_fn(slots, x, env)
    own = _own_time(static, method, slots)
    return Outcome(decision, own, own, _zeros(slots))
  return run


def _everyone(key, slots):
  return slots.mask


def _ga(static: Static, env: EnvParams, key, slots: Slots, params: Params) -> Outcome:
  own = _own_time(static, 'ga', slots)
  decision, _ = ga_solve(key, slots, env, GAConfig(), own, own)
  return Outcome(decision, own, own, _zeros(slots))


def _oracle(static: Static, env: EnvParams, key, slots: Slots, params: Params) -> Outcome:
  own = _own_time(static, 'oracle', slots)
  return Outcome(oracle(slots, env, own, own), own, own, _zeros(slots))


def lower_bound(static: Static, env: EnvParams, slots: Slots) -> Array:
  """A lower bound of every method's slot objective (no inference delay): [...]."""
  if static.case == 1:
    return objective_bound(slots, slots.mask, env)
  return joint_objective_bound(slots, env)


def _exhaustive(static: Static, env: EnvParams, key, slots: Slots, params: Params
                ) -> Outcome:
  own = _zeros(slots)
  return Outcome(exhaustive_search(slots, env, own, own), own, own, own)


def _ppo(static: Static, env: EnvParams, key, slots: Slots, params: Params) -> Outcome:
  """The PPO agent of `launch/train_rl.py` (`dynn_jax.rl`), deterministic: x = p > 0.5
  (case 2; case 1 offloads everyone), shares the softmax of its means over the offloaded
  users. Its inference delay is 0 in every mode (modelled, measured, none): the delay
  model knows the DyNN pipeline's ops and the solvers' run times, not this network, so
  the agent is treated as free, and its objective is a lower estimate of what it costs.
  A networks file without an agent, or an agent of the other case, is refused at trace
  time, before any slot is evaluated."""
  if params.agent is None:
    raise ValueError("method 'ppo' needs a trained agent (Params.agent): train one with "
                     'launch/train_rl.py and pass its networks file')
  zeros = _zeros(slots)
  decision = deterministic_decision(params.agent, slots, env, static.feature_config)
  return Outcome(decision, zeros, zeros, zeros)


METHODS: dict[str, Method] = {
    'policy_moe': _moe_method('none', True),
    'pmrl': _moe_method('none', True),
    'fix_width': _moe_method('width', True),
    'fix_depth': _moe_method('depth', True),
    'fix_moe': _moe_method('none', False),
    'static': _static,
    'kkt_weighted': _solver_method('kkt_weighted', _everyone, optimal_allocation),
    'equal_split': _solver_method('equal_split', _everyone, equal_split),
    'random': _solver_method('random', lambda key, s: random_offload(key, s),
                             optimal_allocation),
    'local': _solver_method('local', lambda key, s: all_local(s), equal_split),
    'ga': _ga,
    'oracle': _oracle,
    'exhaustive': _exhaustive,
    'hindsight': _hindsight,
    'ppo': _ppo,
}
EXIT_PATTERN = re.compile(r'exit_(\d+)_(\d+)')


def parse_exit(name: str) -> tuple[int, int] | None:
  """(k, l) of a method name 'exit_<k>_<l>', or None for any other name."""
  match = EXIT_PATTERN.fullmatch(name)
  return None if match is None else (int(match.group(1)), int(match.group(2)))


def method(name: str) -> Method:
  """The method of a name: one of METHODS, or 'exit_<k>_<l>' (that sub-network for
  every slot; its range is checked by `check_methods`)."""
  kl = parse_exit(name)
  if kl is not None:
    return _exit_method(*kl)
  return METHODS[name]


def is_method(name: str) -> bool:
  return name in METHODS or parse_exit(name) is not None


def _problem(name: str, params: Params, mec: MECConfig, model: ModelConfig | None = None
             ) -> str | None:
  """Why `name` cannot run with these networks on this system, or None."""
  kl = parse_exit(name)
  if kl is not None and model is not None and not (
      1 <= kl[0] <= model.num_experts and 1 <= kl[1] <= model.max_depth):
    return (f'method {name!r}: exit (k, l) = {kl} is outside the networks\' range k = '
            f'1..{model.num_experts}, l = 1..{model.max_depth}')
  if name == 'pmrl' and mec.case != 2:
    return "method 'pmrl' is the case-2 pipeline; use 'policy_moe' in case 1"
  if name in OFFLOADING_METHODS and mec.case != 2:
    return f'method {name!r} decides offloading: it needs case 2'
  if name == 'exhaustive' and mec.width > 12:
    return f"method 'exhaustive' needs N_max <= 12, got {mec.width}"
  needs = NEEDS.get(name, ('allocator',) if kl is not None or name == 'hindsight' else ())
  if needs and mec.case == 2 and 'agent' not in needs:  # pipelines offload by scheduler
    needs = needs + ('scheduler',) * ('scheduler' not in needs)
  missing = [n for n in needs if getattr(params, n) is None]
  if missing:
    return f'method {name!r} needs trained {missing}; train them first'
  return None


def check_methods(names, params: Params, setting: Setting) -> None:
  """Unknown names, missing networks and impossible choices fail before any work."""
  unknown = [name for name in names if not is_method(name)]
  if unknown:
    raise ValueError(f'unknown method(s) {unknown}; known: {sorted(METHODS)} and '
                     'exit_<k>_<l> (one sub-network for every slot, e.g. exit_1_1)')
  for name in names:
    problem = _problem(name, params, setting.mec, setting.model)
    if problem:
      raise ValueError(problem)
    solver = TIMED_SOLVERS.get(name)
    if setting.mode == 'measured' and solver is not None:
      timed = dict(setting.delay.solvers_s)
      if solver not in timed:
        raise ValueError(
            f'method {name!r} in measured mode: the latency table has no run time of '
            f'{solver!r} (it has {sorted(timed)}); make the table again with '
            'launch/benchmark.py --suite=exits')


def default_methods(mec: MECConfig, params: Params) -> tuple[str, ...]:
  """The paper's comparison for the case, less what these networks cannot run."""
  if mec.case == 1:
    names = ('policy_moe', 'fix_width', 'fix_depth', 'fix_moe', 'static', 'kkt_weighted',
             'equal_split', 'oracle')
  else:
    names = ('pmrl', 'fix_moe', 'static', 'kkt_weighted', 'random', 'local', 'oracle')
  return tuple(n for n in names if _problem(n, params, mec) is None)


@dataclasses.dataclass(frozen=True)
class EvalResult:
  """What `evaluate` returns: for every method and metric, the mean over the slots and
  the 95% confidence half-width ({'mean': ..., 'ci95': ...}).

  `bound` is the objective's lower bound on the same slots (when the oracle ran);
  `slots_of` names the methods that were evaluated on other slots than `slots` (a
  reproduction point runs the GA and the oracle on fewer).
  """
  methods: dict
  slots: int
  mode: str = 'modelled'
  devices: int = 1
  bound: dict | None = None
  slots_of: dict = dataclasses.field(default_factory=dict)

  def __getitem__(self, name: str) -> dict:
    return self.methods[name]

  def __contains__(self, name: str) -> bool:
    return name in self.methods

  @property
  def names(self) -> tuple[str, ...]:
    return tuple(self.methods)

  def mean(self, name: str, metric: str = 'objective') -> float:
    return self.methods[name][metric]['mean']

  def merged(self, other: 'EvalResult', prefix: str = '', names=None,
             bound: bool = False) -> 'EvalResult':
    """These results plus `other`'s methods (those in `names`, default all) under
    `prefix`; `other`'s bound too when `bound`. Methods whose slots differ from these
    are recorded in `slots_of`."""
    names = other.names if names is None else tuple(names)
    slots_of = dict(self.slots_of)
    for name in names:
      theirs = other.slots_of.get(name, other.slots)
      if theirs != self.slots:
        slots_of[prefix + name] = theirs
    return dataclasses.replace(
        self, methods=self.methods | {prefix + n: other.methods[n] for n in names},
        bound=other.bound if bound else self.bound, slots_of=slots_of)

  def to_dict(self) -> dict:
    out = dataclasses.asdict(self)
    if self.bound is None:  # absent rather than null: JSON readers need no None case
      del out['bound']
    return out

  @classmethod
  def from_dict(cls, data: dict) -> 'EvalResult':
    """From `to_dict`, or from the flat layout of files written before this type (method
    entries beside '_slots', '_mode', '_devices', '_bound', '_ga_slots')."""
    if 'methods' in data:
      return cls(**data)
    methods = {k: v for k, v in data.items() if not k.startswith('_')}
    slots = data['_slots']
    return cls(methods=methods, slots=slots, mode=data.get('_mode', 'modelled'),
               devices=data.get('_devices', 1),
               bound=data['_bound']['objective'] if '_bound' in data else None,
               slots_of={'ga': data['_ga_slots']} if '_ga_slots' in data else {})


# Key of the objective's lower bound among a chunk's sums (present when 'oracle' runs).
BOUND = '_bound'
METRICS = ('objective', 'mean_delay', 'miss_ratio', 'total_energy', 'weighted_delay',
           'weighted_service', 'inference_share', 'ops', 'offload_ratio')


def _slot_metrics(static: Static, env: EnvParams, outcome: Outcome, slots: Slots
                  ) -> dict[str, Array]:
  costs = slot_costs(slots, outcome.decision, env, outcome.t_inf_edge,
                     outcome.t_inf_loc)
  n = jnp.maximum(slots.mask.sum(-1), 1)
  metrics = {'objective': costs.objective, 'mean_delay': costs.mean_delay,
             'miss_ratio': costs.miss_ratio, 'total_energy': costs.total_energy,
             'weighted_delay': costs.weighted_delay,
             # The paper's Fig. 4 with inference delay: sum_i w_i (T_inf + T_tra + T_com).
             'weighted_service': costs.weighted_delay + jnp.where(
                 outcome.decision.x & slots.mask & (costs.weight > 0),
                 costs.weight * costs.t_inf, 0.0).sum(-1),
             'inference_share': costs.inference_share,
             'ops': jnp.asarray(outcome.ops, costs.objective.dtype),
             'offload_ratio': (outcome.decision.x & slots.mask).sum(-1) / n}
  if outcome.option is not None:
    model = static.model
    for option in range(model.num_options):
      k, l = option // model.max_depth + 1, option % model.max_depth + 1
      metrics[pick_metric(k, l)] = (outcome.option == option).astype(costs.objective.dtype)
  return metrics


def pick_metric(k: int, l: int) -> str:
  """The metric holding the share of slots on which a method ran exit (k, l)."""
  return f'pick_{k}_{l}'


def batch_mesh() -> Mesh:
  """One mesh over every device (of every host under jax.distributed), axis 'batch'."""
  return Mesh(np.asarray(jax.devices()), ('batch',))


_TRACES = collections.Counter()

# Slots are sampled at the padded width W, but a system of N < W users leaves the last
# W - N positions masked out, and every method's cost grows with the positions it sees.
# So the methods run on the first `rows` positions only: N rounded up to ROW_MULTIPLE
# (systems whose N rounds alike share a compile), at most W. Masked positions add
# nothing to any result, so the numbers are those of the full width (tested). The
# methods below keep the full width: their random draws (GA, random offloading) or
# their search (exhaustive) are shaped by it, and trimming would change their results.
ROW_MULTIPLE = 8
FULL_WIDTH_METHODS = ('ga', 'random', 'exhaustive')


def active_rows(n_users, width: int) -> int:
  """User positions the methods run on for systems of `n_users` users (an int, or the
  stacked values of a sweep: the most of them)."""
  most = int(np.max(np.asarray(n_users)))
  return min(width, ROW_MULTIPLE * math.ceil(max(most, 1) / ROW_MULTIPLE))


def first_rows(slots: Slots, rows: int) -> Slots:
  """The first `rows` user positions of every per-user array."""
  if rows >= slots.mask.shape[-1]:
    return slots
  return jax.tree.map(lambda a: a[..., :rows], slots)


def chunk_trace_count() -> int:
  """How many times the evaluation chunk has been traced (compiles, in effect)."""
  return _TRACES['chunk']


def chunk_sums(static: Static, env: EnvParams, names: tuple[str, ...], key: Array,
               params: Params, chunk: int, valid: Array, mesh: Mesh | None = None,
               rows: int | None = None) -> dict:
  """Sums and sums of squares of every metric over the first `valid` of `chunk` fresh
  slots, on the system `env` (traced: every value of a sweep runs this one program).
  Methods not in FULL_WIDTH_METHODS see only the first `rows` user positions (default
  all), which must cover every user of `env` (see `active_rows`).

  With a mesh, the slots are split over its devices along the batch axis; the sampled
  values do not depend on the number of devices (partitionable threefry).
  """
  _TRACES['chunk'] += 1  # runs at trace time only
  if (env.case, env.width) != (static.case, static.width):
    raise ValueError(f'system of case {env.case}, width {env.width} evaluated with '
                     f'methods built for case {static.case}, width {static.width}')
  k_slots, k_methods = jax.random.split(key)
  slots = sample_slots(k_slots, env, chunk)
  if mesh is not None:
    slots = jax.lax.with_sharding_constraint(slots, NamedSharding(mesh, P('batch')))
  # The last chunk of an evaluation is cut to the slots asked: the rest weigh nothing.
  weight = (jnp.arange(chunk) < valid).astype(slots.s.dtype)
  count = jnp.maximum(weight.sum(), 1.0)

  def sums(v):  # (sum, sum of squared deviations from the chunk's mean): see _combine
    total = (weight * v).sum()
    return total, (weight * jnp.square(v - total / count)).sum()

  out = {}
  trimmed = slots if rows is None else first_rows(slots, rows)
  if 'oracle' in names:  # the yardstick's yardstick: how far the oracle itself may be
    out[BOUND] = {'objective': sums(lower_bound(static, env, trimmed))}
  for i, name in enumerate(names):
    seen = slots if name in FULL_WIDTH_METHODS else trimmed
    outcome = method(name)(static, env, jax.random.fold_in(k_methods, i), seen, params)
    metrics = _slot_metrics(static, env, outcome, seen)
    out[name] = {m: sums(v) for m, v in metrics.items()}
  return out


# One program per (static, names, chunk, mesh, rows): every system's numbers are traced.
compiled_chunk_sums = jax.jit(chunk_sums,
                              static_argnames=('static', 'names', 'chunk', 'mesh', 'rows'))


def _chunks(slots: int, chunk: int, devices: int) -> tuple[int, int]:
  """(number of chunks, slots per chunk): `chunk` (no more than `slots`) rounded up
  to a multiple of the device count; the last chunk may be only partly counted."""
  for name, value in (('slots', slots), ('chunk', chunk)):
    if not POSITIVE_INT.admits(value):
      raise ValueError(f'{name} = {value!r}; must be {POSITIVE_INT}')
  chunk = devices * math.ceil(min(chunk, slots) / devices)
  return math.ceil(slots / chunk), chunk


def evaluate(setting: Setting, names, params: Params, *, slots: int, chunk: int = 8192,
             seed: int = 0, n_users=None, mesh: Mesh | None = None,
             env: EnvParams | None = None, progress: Progress | None = None,
             rows: int | None = None) -> EvalResult:
  """Means and 95% confidence half-widths of every metric, for every method, over
  exactly `slots` slots.

  Slots come in chunks of about `chunk` (a multiple of the device count), so memory
  does not grow with `slots`; every chunk is split over `mesh` (default: all devices).
  The system's numbers are traced (`env`, default `setting.mec.params()`, with
  `n_users` if given), so evaluations that differ only in them share one compile.
  Methods run on the first `rows` user positions (default `active_rows` of the
  system's users); a sweep passes the most users of any of its points.
  """
  names = tuple(names)
  check_methods(names, params, setting)
  mesh = batch_mesh() if mesh is None else mesh
  devices = mesh.devices.size
  n_chunks, chunk = _chunks(slots, chunk, devices)
  env = setting.mec.params() if env is None else env
  if n_users is not None:
    env = env.replace(n_users=jnp.asarray(n_users, jnp.int32))
  most = int(np.max(np.asarray(env.n_users)))
  rows = active_rows(most, setting.mec.width) if rows is None else rows
  if not POSITIVE_INT.admits(rows) or not most <= rows <= setting.mec.width:
    raise ValueError(f'rows = {rows!r}; must be an integer in [{most}, '
                     f'{setting.mec.width}] (the users present to the padded width)')
  static = setting.static
  key = jax.random.PRNGKey(seed)
  totals = None
  for i in range(n_chunks):
    valid = min(chunk, slots - i * chunk)
    key_i = jax.random.fold_in(key, i)
    sums = jax.device_get(compiled_chunk_sums(static, env, names, key_i, params, chunk,
                                              valid, mesh, rows))
    part = jax.tree.map(lambda t: _Moments.of(valid, *t), sums,
                        is_leaf=lambda t: isinstance(t, tuple))
    totals = part if totals is None else jax.tree.map(
        _Moments.combine, totals, part, is_leaf=lambda t: isinstance(t, _Moments))
    if progress is not None:
      progress.add(valid)
  stats = {name: {m: moments.mean_ci() for m, moments in metrics.items()}
           for name, metrics in totals.items()}
  bound = stats.pop(BOUND, None)
  return EvalResult(methods=stats, slots=slots, mode=setting.mode, devices=devices,
                    bound=None if bound is None else bound['objective'])


def evaluate_sweep(setting: Setting, names, params: Params, field: str, values, *,
                   slots: int, chunk: int = 8192, seed: int = 0, mesh: Mesh | None = None,
                   progress: bool = False) -> list[EvalResult]:
  """`evaluate` at every value of one MECConfig field, in one compilation: the field is
  a traced leaf of `EnvParams`, so every point runs the same compiled chunk. Every
  point sees the same random draws (same seed), so differences between points are the
  field's effect, not sampling noise. A field that fixes shapes is refused."""
  envs = sweep_params(setting.mec, field, values)
  values = list(values)
  rows = active_rows(envs.n_users, setting.mec.width)
  tracker = (Progress(f'sweep {field}', slots * len(values), every_s=10.0, unit='slot')
             if progress else None)
  return [evaluate(setting, names, params, slots=slots, chunk=chunk, seed=seed, mesh=mesh,
                   env=point_params(envs, i), progress=tracker, rows=rows)
          for i in range(len(values))]


class _Moments(NamedTuple):
  """Count, mean and sum of squared deviations of one metric, merged chunk by chunk in
  float64 (Chan et al.'s pairwise update): a float32 sum of squares minus the squared
  mean would lose the spread where it is small next to the mean."""
  n: int
  mean: float
  m2: float

  @classmethod
  def of(cls, n: int, total, m2) -> '_Moments':
    return cls(n, float(total) / n, float(m2))

  def combine(self, other: '_Moments') -> '_Moments':
    n = self.n + other.n
    delta = other.mean - self.mean
    return _Moments(n, self.mean + delta * other.n / n,
                    self.m2 + other.m2 + delta * delta * self.n * other.n / n)

  def mean_ci(self) -> dict:
    var = max(self.m2, 0.0) / max(self.n - 1, 1)
    return {'mean': self.mean, 'ci95': 1.96 * math.sqrt(var / self.n)}


def objective_gaps(results: EvalResult) -> dict[str, dict[str, float]]:
  """Each method's mean objective over the oracle's and over the lower bound, minus 1
  (the keys present are those the results allow)."""
  refs = {}
  if 'oracle' in results:
    refs['oracle'] = results.mean('oracle')
  if results.bound is not None:
    refs['bound'] = results.bound['mean']
  return {name: {ref: m['objective']['mean'] / value - 1.0 for ref, value in refs.items()}
          for name, m in results.methods.items()}


def methods_table(results: EvalResult) -> str:
  """One evaluation's methods as a fixed-width text table (what the launchers and the
  training summary print), with each method's gap to the oracle and the bound."""
  gaps = objective_gaps(results)
  refs = next(iter(gaps.values()), {}).keys()
  header = (f'{"method":12s} {"objective":>10s} ' + ''.join(f'{"vs " + r + " %":>12s} ' for r in refs)
            + f'{"delay ms":>9s} {"miss %":>7s} '
            f'{"energy J":>9s} {"w.delay":>8s} {"inf.share":>9s} {"Mops":>7s} {"offload":>7s}')
  lines = [header]
  for name, m in results.methods.items():
    lines.append(f'{name:12s} {m["objective"]["mean"]:10.4f} '
                 + ''.join(f'{100 * gaps[name][r]:12.2f} ' for r in refs)
                 + f'{1e3 * m["mean_delay"]["mean"]:9.3f}'
                 f' {100 * m["miss_ratio"]["mean"]:7.2f} {m["total_energy"]["mean"]:9.4f}'
                 f' {m["weighted_delay"]["mean"]:8.4f} {m["inference_share"]["mean"]:9.4f}'
                 f' {m["ops"]["mean"] / 1e6:7.3f} {m["offload_ratio"]["mean"]:7.3f}')
  if results.bound is not None:
    lines.append(f'{"lower bound":12s} {results.bound["mean"]:10.4f}')
  return '\n'.join(lines)
