"""A PPO baseline trained through the gymnax environment (`dynn_jax.gym.MECEnv`).

`make_train(config, env)` returns `train(key, env_params)` in purejaxrl's shape: a pure
function whose updates run in one `lax.scan`, so it jits, and `jax.vmap` over stacked
`EnvParams` (`config.sweep_params`) trains one agent per system in one program. Each
update collects `num_steps` steps of `num_envs` one-slot episodes with the stochastic
policy of `dynn_jax.rl.agent.ActorCritic`, computes GAE advantages (with one-slot
episodes: the reward minus the value of the slot) and takes `update_epochs` passes of
`num_minibatches` clipped-surrogate steps.

`train_ppo` runs the same update in chunks (`training.loop.chunked_phase` /
`scan_chunk`): checkpointed into a `RunDir`, logged to metrics.jsonl, printed as
Progress lines, and resumed after a kill with exactly the parameters of an
uninterrupted run (the key of update t is fold_in(key, t)). `train_and_save` is the
whole job of `launch/train_rl.py`: run directory, networks file (`Params.agent`),
held-out summary against the oracle.

Choices where PPO leaves room:
* The policy factorises over users (each user's offloading bit and, when offloaded,
  its two log-shares), so the probability ratio is clipped per user (the factor of the
  action that user owns), all sharing the slot's advantage: the unclipped gradient is
  the joint ratio's, and one user's large ratio no longer clips the other users' updates
  (with 30 users the joint ratio of 90 factors leaves the clip range after a few steps).
* Log-shares of users that are not offloaded are drawn but change nothing: they are not
  in the log-probability (nor the entropy).
* The learning rate falls linearly from `lr` to `lr * lr_final` over the run.
* `group` > 1 (off by default) plays each slot `group` times per step and takes the
  mean reward of the slot's other draws as an action's baseline (leave-one-out), in
  place of the value head's estimate: the slot's own difficulty then leaves the
  advantage. One-slot episodes make this possible (after every step the envs are
  given fresh slots, each drawn for a group); the value head is still trained.

The shipped checkpoints (launch/flags/ppo_case1.flags, ppo_case2.flags: the defaults,
200 updates of 1024 slots) come within about 2 % of the oracle in both cases; the
numbers are those of `launch/evaluate.py --networks=checkpoints/ppo_caseN.msgpack
--methods=ppo,oracle`.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from dynn_jax import runs
from dynn_jax.config import (NON_NEGATIVE, POSITIVE, POSITIVE_INT, SEED_RANGE, ConfigBase,
                             ConfigError, EnvParams, MECConfig, Range, check_choice,
                             check_ranges)
from dynn_jax.evaluation import Setting, evaluate
from dynn_jax.gym import Action, EnvState, MECEnv, split_obs
from dynn_jax.models import ModelConfig
from dynn_jax.networks import Params, save_networks
from dynn_jax.quality import HELD_OUT_SEED
from dynn_jax.rl.actions import logit_shares
from dynn_jax.rl.agent import ActorCritic, AgentOutput
from dynn_jax.runs import RunDir
from dynn_jax.training.config import phase_key
from dynn_jax.training.loop import chunked_phase, scan_chunk
from dynn_jax.training.steps import TrainState

Array = jax.Array
PHASE = 'ppo'
_TRACES = collections.Counter()


def update_trace_count() -> int:
  """How many times a PPO update has been traced (compiles, in effect)."""
  return _TRACES['update']

_PPO_RANGES = {
    'seed': SEED_RANGE,
    **{name: POSITIVE_INT for name in ('num_envs', 'num_steps', 'updates', 'update_epochs',
                                       'num_minibatches', 'hidden', 'layers', 'group',
                                       'steps_per_call', 'checkpoint_every')},
    'eval_slots': Range(2, integer=True),  # a confidence interval needs two slots
    'lr': Range(0.0, 1.0, False), 'lr_final': Range(0.0, 1.0),
    'max_grad_norm': POSITIVE, 'clip_eps': Range(0.0, 1.0, False),
    'vf_coef': NON_NEGATIVE, 'ent_coef': NON_NEGATIVE,
    'discount': Range(0.0, 1.0), 'gae_lambda': Range(0.0, 1.0),
    'log_std_init': Range(-10.0, 2.0),
}


@dataclasses.dataclass(frozen=True)
class PPOConfig(ConfigBase):
  """Everything about a PPO run that is not the system (MECConfig)."""
  agent_case: int = 1        # the environment case the agent is built for (2: offloading head)
  seed: int = 0
  num_envs: int = 1024       # one-slot episodes per step of the rollout
  num_steps: int = 1         # rollout steps per update
  # Actions drawn per slot: with group > 1 the envs play num_envs / group slots, each
  # `group` times, and an action's baseline is the mean reward of the slot's other
  # draws (leave-one-out) instead of the value head (see the module docstring).
  group: int = 1
  updates: int = 200
  update_epochs: int = 4
  num_minibatches: int = 4
  lr: float = 1e-3
  lr_final: float = 0.1      # the last update's learning rate, as a fraction of lr
  max_grad_norm: float = 1.0
  clip_eps: float = 0.2
  vf_coef: float = 0.5
  ent_coef: float = 0.0
  discount: float = 0.99     # episodes are one slot: only num_steps > 1 rollouts use it
  gae_lambda: float = 0.95
  hidden: int = 64           # units of every layer of the agent
  layers: int = 2            # layers of the per-user encoder
  log_std_init: float = -0.7  # initial log std of the log-shares
  steps_per_call: int = 10   # updates per compiled chunk
  checkpoint_every: int = 3  # chunks between checkpoints
  eval_slots: int = 1024     # held-out slots of the final summary

  def __post_init__(self):
    check_choice(self, 'agent_case', (1, 2))
    check_ranges(self, _PPO_RANGES)
    if self.num_envs % self.group:
      raise ConfigError(f'PPOConfig.group = {self.group}; must divide num_envs = '
                        f'{self.num_envs}')
    batch = self.num_envs * self.num_steps
    if batch % self.num_minibatches:
      raise ConfigError(f'PPOConfig.num_minibatches = {self.num_minibatches}; must divide '
                        f'num_envs * num_steps = {batch}')

  @property
  def minibatch(self) -> int:
    return self.num_envs * self.num_steps // self.num_minibatches


def check_case(config: PPOConfig, mec: MECConfig | EnvParams) -> None:
  """ConfigError unless the environment is of the case the agent is built for."""
  if config.agent_case != mec.case:
    raise ConfigError(f'PPOConfig.agent_case = {config.agent_case} but the environment has '
                      f'case = {mec.case}: an agent is built for one case (the offloading '
                      'head is case 2\'s); set both alike')


class PPOState(NamedTuple):
  """What a chunk carries and a checkpoint holds."""
  train: TrainState       # the agent's parameters and optimizer state
  env_state: EnvState     # [num_envs] the slots in play
  obs: Array              # [num_envs, W, 6]
  env_params: EnvParams   # the system (traced: one compile serves every system)
  step: Array             # updates done


class Transition(NamedTuple):
  obs: Array         # [..., W, 6]
  x: Array           # [..., W] bool: offloaded
  z: Array           # [..., W, 2] log-shares drawn
  log_prob: Array    # [..., W] per-user log-probabilities
  value: Array       # [...]
  reward: Array      # [...]
  done: Array        # [...]
  objective: Array   # [...]
  miss_ratio: Array  # [...]


def agent_for(config: PPOConfig, env: MECEnv) -> ActorCritic:
  return ActorCritic(hidden=config.hidden, layers=config.layers, offload=env.case == 2,
                     max_users=env.width, log_std_init=config.log_std_init)


def user_log_probs(out: AgentOutput, x: Array, z: Array, mask: Array) -> Array:
  """log pi per user [..., W]: its Bernoulli bit (case 2, real users) plus, where it is
  offloaded, its two Gaussian log-shares."""
  gauss = (-0.5 * jnp.square((z - out.mean) / jnp.exp(out.log_std)) - out.log_std
           - 0.5 * math.log(2 * math.pi)).sum(-1)
  log_prob = jnp.where(x, gauss, 0.0)
  if out.offload_logit is not None:
    bit = jnp.where(x, jax.nn.log_sigmoid(out.offload_logit),
                    jax.nn.log_sigmoid(-out.offload_logit))
    log_prob = log_prob + jnp.where(mask, bit, 0.0)
  return log_prob


def user_entropy(out: AgentOutput, x: Array, mask: Array) -> Array:
  """Entropy per user [..., W] of the factors in `user_log_probs`."""
  gauss = (out.log_std + 0.5 * math.log(2 * math.pi * math.e)).sum()
  entropy = jnp.where(x, gauss, 0.0)
  if out.offload_logit is not None:
    p = jax.nn.sigmoid(out.offload_logit)
    bit = -(p * jax.nn.log_sigmoid(out.offload_logit)
            + (1 - p) * jax.nn.log_sigmoid(-out.offload_logit))
    entropy = entropy + jnp.where(mask, bit, 0.0)
  return entropy


def env_action(x: Array, z: Array) -> Action:
  """The env's action of offloading bits and log-shares (`logit_shares`: in the space)."""
  return Action(x=x, b_share=logit_shares(z[..., 0]), f_share=logit_shares(z[..., 1]))


def act(module: ActorCritic, params: Any, obs: Array, key: Array
        ) -> tuple[Array, Array, Array, Array]:
  """A stochastic action for a batch of observations: (x, z, per-user log-probs, value)."""
  features, mask = split_obs(obs)
  variables = {'params': params}
  h = module.apply(variables, features, mask, method='encode')
  k_x, k_z = jax.random.split(key)
  logit = None
  if module.offload:
    logit = module.apply(variables, h, mask, method='offload_logit')
    x = mask & jax.random.bernoulli(k_x, jax.nn.sigmoid(logit))
  else:
    x = mask
  mean = module.apply(variables, h, x, features, method='share_mean')
  log_std = params['log_std']
  z = mean + jnp.exp(log_std) * jax.random.normal(k_z, mean.shape, mean.dtype)
  value = module.apply(variables, h, mask, method='value')
  out = AgentOutput(logit, mean, log_std, value)
  return x, z, user_log_probs(out, x, z, mask), value


def gae(traj: Transition, last_value: Array, discount: float, lam: float
        ) -> tuple[Array, Array]:
  """(advantages, value targets) [T, E] by generalised advantage estimation."""
  def back(carry, t):
    advantage, next_value = carry
    live = 1.0 - t.done.astype(t.reward.dtype)
    delta = t.reward + discount * next_value * live - t.value
    advantage = delta + discount * lam * live * advantage
    return (advantage, t.value), advantage

  _, advantages = jax.lax.scan(back, (jnp.zeros_like(last_value), last_value), traj,
                               reverse=True)
  return advantages, advantages + traj.value


def ppo_loss(module: ActorCritic, config: PPOConfig, params: Any, batch: Transition,
             advantages: Array, targets: Array) -> tuple[Array, dict[str, Array]]:
  """Clipped surrogate (per user, see the module docstring), clipped value loss and
  entropy bonus on one minibatch."""
  features, mask = split_obs(batch.obs)
  out = module.apply({'params': params}, features, mask, batch.x)
  log_prob = user_log_probs(out, batch.x, batch.z, mask)
  log_ratio = log_prob - batch.log_prob
  ratio = jnp.exp(log_ratio)
  adv = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
  adv = adv[..., None]
  surrogate = jnp.minimum(ratio * adv,
                          jnp.clip(ratio, 1 - config.clip_eps, 1 + config.clip_eps) * adv)
  users = jnp.maximum(mask.sum(), 1)
  per_user = lambda v: jnp.where(mask, v, 0.0).sum() / users
  policy_loss = -per_user(surrogate)
  value_clipped = batch.value + jnp.clip(out.value - batch.value, -config.clip_eps,
                                         config.clip_eps)
  value_loss = 0.5 * jnp.maximum(jnp.square(out.value - targets),
                                 jnp.square(value_clipped - targets)).mean()
  entropy = per_user(user_entropy(out, batch.x, mask))
  loss = policy_loss + config.vf_coef * value_loss - config.ent_coef * entropy
  return loss, {'policy_loss': policy_loss, 'value_loss': value_loss, 'entropy': entropy,
                'approx_kl': per_user((ratio - 1) - log_ratio),
                'clip_frac': per_user((jnp.abs(ratio - 1) > config.clip_eps).astype(ratio.dtype))}


def optimizer(config: PPOConfig) -> optax.GradientTransformation:
  steps = config.updates * config.update_epochs * config.num_minibatches
  schedule = optax.linear_schedule(config.lr, config.lr * config.lr_final, steps)
  return optax.chain(optax.clip_by_global_norm(config.max_grad_norm), optax.adam(schedule))


def _env_and_check(config: PPOConfig, env) -> MECEnv:
  env = env if isinstance(env, MECEnv) else MECEnv(env)
  check_case(config, env.config)
  return env


def reset_grouped(config: PPOConfig, env: MECEnv, key: Array, env_params: EnvParams
                  ) -> tuple[Array, EnvState]:
  """`num_envs` fresh slots: num_envs / group distinct ones, each repeated `group`
  times in a row (all distinct with group = 1)."""
  obs, state = jax.vmap(env.reset, in_axes=(0, None))(
      jax.random.split(key, config.num_envs // config.group), env_params)
  return jax.tree.map(lambda a: jnp.repeat(a, config.group, axis=0), (obs, state))


def leave_one_out(reward: Array, group: int) -> Array:
  """[..., E] rewards minus the mean of the other draws on the same slot (envs in
  consecutive groups of `group`): an unbiased baseline that knows the slot."""
  grouped = reward.reshape(reward.shape[:-1] + (-1, group))
  others = (grouped.sum(-1, keepdims=True) - grouped) / (group - 1)
  return (grouped - others).reshape(reward.shape)


def make_update(config: PPOConfig, env: MECEnv | MECConfig) -> Callable:
  """`update(state, key) -> (state, metrics)`: one PPO update (rollout, advantages,
  epochs of minibatch steps); pure, so it scans, jits and vmaps."""
  env = _env_and_check(config, env)
  module, tx = agent_for(config, env), optimizer(config)
  step_envs = jax.vmap(env.step, in_axes=(0, 0, 0, None))

  def rollout_step(carry, key):
    train, env_state, obs, env_params = carry
    k_act, k_env = jax.random.split(key)
    x, z, log_prob, value = act(module, train.params, obs, k_act)
    keys = jax.random.split(k_env, config.num_envs)
    next_obs, env_state, reward, terminated, truncated, info = step_envs(
        keys, env_state, env_action(x, z), env_params)
    if config.group > 1:  # every episode ended: the next slots, each drawn for a group
      next_obs, env_state = reset_grouped(config, env, jax.random.fold_in(k_env, 1),
                                          env_params)
    t = Transition(obs, x, z, log_prob, value, reward, terminated | truncated,
                   info['objective'], info['miss_ratio'])
    return (train, env_state, next_obs, env_params), t

  def minibatch_step(train, batch):
    grads, metrics = jax.grad(
        lambda p: ppo_loss(module, config, p, *batch), has_aux=True)(train.params)
    return train.apply_gradients(tx, grads), metrics

  def epoch(train, key, data):
    perm = jax.random.permutation(key, config.num_envs * config.num_steps)
    shuffled = jax.tree.map(
        lambda a: a[perm].reshape((config.num_minibatches, config.minibatch) + a.shape[1:]),
        data)
    return jax.lax.scan(minibatch_step, train, shuffled)

  def update(state: PPOState, key: Array) -> tuple[PPOState, dict[str, Array]]:
    _TRACES['update'] += 1  # runs at trace time only
    k_roll, k_epochs = jax.random.split(key)
    carry = (state.train, state.env_state, state.obs, state.env_params)
    (_, env_state, obs, _), traj = jax.lax.scan(
        rollout_step, carry, jax.random.split(k_roll, config.num_steps))
    features, mask = split_obs(obs)
    h = module.apply({'params': state.train.params}, features, mask, method='encode')
    last_value = module.apply({'params': state.train.params}, h, mask, method='value')
    advantages, targets = gae(traj, last_value, config.discount, config.gae_lambda)
    if config.group > 1:
      advantages = leave_one_out(traj.reward, config.group)
    flat = lambda a: a.reshape((-1,) + a.shape[2:])
    data = (jax.tree.map(flat, traj), flat(advantages), flat(targets))
    train, losses = jax.lax.scan(lambda t, k: epoch(t, k, data), state.train,
                                 jax.random.split(k_epochs, config.update_epochs))
    real = split_obs(traj.obs)[1]
    metrics = {'reward': traj.reward.mean(), 'objective': traj.objective.mean(),
               'miss_ratio': traj.miss_ratio.mean(),
               'offload': (traj.x.sum((-1)) / jnp.maximum(real.sum(-1), 1)).mean(),
               'std': jnp.exp(train.params['log_std']).mean(),
               **{k: v.mean() for k, v in losses.items()}}
    state = PPOState(train, env_state, obs, state.env_params, state.step + 1)
    return state, metrics

  return update


def init_state(config: PPOConfig, env: MECEnv | MECConfig, key: Array,
               env_params: EnvParams | MECConfig | None = None) -> PPOState:
  """Fresh agent (from fold_in(key, 0)), optimizer state and slots (fold_in(key, 2))."""
  env = _env_and_check(config, env)
  env_params = env.checked_params(env_params)
  module = agent_for(config, env)
  obs, env_state = reset_grouped(config, env, jax.random.fold_in(key, 2), env_params)
  features, mask = split_obs(obs[:1])
  params = module.init(jax.random.fold_in(key, 0), features, mask, mask)['params']
  train = TrainState.create(optimizer(config), params)
  return PPOState(train, env_state, obs, env_params, jnp.int32(0))


def make_train(config: PPOConfig, env: MECEnv | MECConfig) -> Callable:
  """`train(key, env_params) -> {'runner_state': PPOState, 'metrics': {name: [updates]}}`,
  purejaxrl's shape: every update in one `lax.scan`, update t keyed fold_in(fold_in(key,
  1), t) as in `train_ppo`. Jit it; vmap it over stacked EnvParams for one agent per
  system (`env` fixes the case, the width and the features' ranges)."""
  env = _env_and_check(config, env)
  update = make_update(config, env)

  def train(key: Array, env_params: EnvParams) -> dict[str, Any]:
    state = init_state(config, env, key, env_params)
    k_updates = jax.random.fold_in(key, 1)
    state, metrics = jax.lax.scan(
        lambda s, _: update(s, jax.random.fold_in(k_updates, s.step)), state, None,
        length=config.updates)
    return {'runner_state': state, 'metrics': metrics}

  return train


def train_ppo(config: PPOConfig, mec: MECConfig, run: RunDir | None = None,
              env_params: EnvParams | None = None,
              on_chunk: Callable[[int, Any], bool | None] | None = None) -> Any:
  """Trains the agent in chunks of `steps_per_call` updates (checkpointed in `run`,
  resumed from it) and returns its parameters (`Params.agent`)."""
  env = _env_and_check(config, mec)
  state = init_state(config, env, phase_key(config.seed, PHASE), env_params)
  state = chunked_phase(PHASE, run, state, config.updates, config, _chunk(config, env),
                        on_chunk)
  return state.train.params


@functools.lru_cache(maxsize=8)
def _chunk(config: PPOConfig, env: MECEnv) -> Callable:
  """The jitted chunk of `train_ppo`, built once per (config, env): a resumed or
  repeated run in the same process compiles nothing again (params are traced, in the
  state)."""
  key = jax.random.fold_in(phase_key(config.seed, PHASE), 1)
  return scan_chunk(make_update(config, env), key, donate=True)


# ------------------------------------------------------------------ the job


def run_config(mec: MECConfig, config: PPOConfig) -> dict:
  """What a run directory records, and what a resumed run must match."""
  return {'mec': mec.to_dict(), 'ppo': config.to_dict()}


class _Recorded(NamedTuple):
  """What a networks file records of the training (`save_networks` reads `to_dict`)."""
  config: PPOConfig

  def to_dict(self) -> dict:
    # The reward is minus the slot objective: the networks' loss is 'objective'.
    return {'algorithm': 'ppo', 'loss': 'objective', **self.config.to_dict()}


def save_agent(path: str, agent: Any, mec: MECConfig, config: PPOConfig) -> None:
  """A networks file holding only `Params.agent` (atomic, checksummed)."""
  save_networks(path, Params(agent=agent), mec, ModelConfig.for_env(mec), _Recorded(config))


def held_out(mec: MECConfig, agent: Any, slots: int) -> dict:
  """The deterministic agent and the oracle on `slots` held-out slots (the training
  summaries' seed): EvalResult.to_dict()."""
  setting = Setting(mec=mec, model=ModelConfig.for_env(mec), feature_config=mec)
  return evaluate(setting, ('ppo', 'oracle'), Params(agent=agent), slots=slots,
                  seed=HELD_OUT_SEED).to_dict()


def train_and_save(mec: MECConfig, config: PPOConfig, run_dir: str, *, resume: bool,
                   export: str | None = None) -> dict:
  """Trains into `run_dir` (continuing its checkpoint with `resume`), writes
  networks.msgpack and summary.json there (and the networks file to `export` too), and
  returns the summary. RunDirError before any work for a directory in use, holding a
  run without `resume`, or of another config."""
  check_case(config, mec)
  config_dict = run_config(mec, config)
  runs.check_start(run_dir, config_dict, resume)
  run = RunDir(run_dir)
  with run.locked():
    run.write_config(config_dict, resume=resume)
    start = time.perf_counter()
    agent = train_ppo(config, mec, run)
    wall = time.perf_counter() - start
    save_agent(run.file('networks.msgpack'), agent, mec, config)
    results = held_out(mec, agent, config.eval_slots)
    ppo, oracle = (results['methods'][m]['objective']['mean'] for m in ('ppo', 'oracle'))
    summary = {'train_wall_s': wall, 'updates': config.updates,
               'slots_trained': config.updates * config.num_envs * config.num_steps,
               'gap_to_oracle': ppo / oracle - 1.0, 'evaluation': results,
               'text': (f'case {mec.case}: ppo objective {ppo:.4f}, oracle {oracle:.4f}, '
                        f'gap {100 * (ppo / oracle - 1):.2f} % on {config.eval_slots} '
                        f'held-out slots; training {wall:.1f} s (this process; a resumed '
                        'run counts its own part)')}
    run.write_summary(summary)
    if export:
      save_agent(export, agent, mec, config)
  return summary
