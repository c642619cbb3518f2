"""The slot scheduling problem as a gymnax environment for RL users.

`MECEnv` subclasses `gymnax.environments.environment.Environment`, so gymnax's wrappers
(`LogWrapper`, `FlattenObservationWrapper`, `gymnax.experimental.RolloutWrapper`) and
RL libraries built on gymnax take it as it is. It owns the episode structure, the
observation, the action format and the reward; the physics stays in `dynn_jax.env`
(`sample_slots`, `slot_costs`) and the constants in `EnvParams` (`dynn_jax.config`).
Its static fields (case, padded width W, the feature ranges) are fixed at construction;
its methods are pure functions of (key, state, action, params), so `jax.jit` and
`jax.vmap` take them as they are. Two envs built from equal configs are equal (and hash
alike), so gymnax's jitted `step` / `reset` (static `self`) compile once for both. This
module needs the RL extra (gymnax); the share arithmetic it applies (`SHARE_MIN`,
`normalize_shares`, `logit_shares`) lives in `dynn_jax.rl.actions`, which imports no
gymnax (the evaluation runs agents with it), and is re-exported here.

* One episode is one slot: `reset` draws a slot with `sample_slots(key, params)`, and
  the first `step` scores the decision for it and ends the episode (`terminated` is
  always True, `truncated` True too since `params.max_steps_in_episode` is 1, the
  discount 0). gymnax's `step` then resets with a key split from its own, so the
  returned obs and state belong to the next slot (the scored slot's obs is
  `info['final_observation']`); `step_env` is the same step without the reset.
  `EnvParams.max_steps_in_episode` must stay 1 (ValueError otherwise): it is there
  because gymnax's time limit and `RolloutWrapper` read it.
* Observation: `spaces.Box(0, 1, (W, 6))`. Columns 0..4 are `normalized_features` (s,
  c, d, l, f_loc) of each user position, column 5 is the user mask as 0.0 / 1.0;
  padded positions are all zero. `split_obs(obs)` gives back (features [..., W, 5],
  mask bool [..., W]), the inputs of the networks in `dynn_jax.models`. The features
  are normalised with the ranges of a fixed `MECConfig` given at construction
  (`feature_config`, default: the env's config), never with the traced `params`: the
  networks are trained on one set of ranges, and a slot must look the same to them
  whatever params it was drawn under. Hence obs lies in [0, 1] as long as the params'
  sampling ranges stay inside the feature config's; a sweep beyond them gives values
  above 1, kept as they are (clipping would hide that the slot is out of range).
* Action: `Action(x, b_share, f_share)` (or the mapping `action_space().sample` gives,
  with those keys), each [W] for one slot; the space is `spaces.Dict` of `Bits` (a
  0/1 `spaces.Box` sampled as a fair coin) for x and `spaces.Box(SHARE_MIN, 1)` for
  each share. x (bool or integer, nonzero = offload) is restricted to the real users;
  in case 1 users have no CPU, so x is ignored and every real user offloads. Shares
  are taken at the offloaded users only (elsewhere ignored), normalised to sum to 1
  over them, then b = b_share * params.b_max and f = f_share * params.f_ser.
  **Zero shares are outside the space**: SHARE_MIN > 0 is its lower bound, so every
  action in the space gives every offloaded user some bandwidth and CPU and a finite
  reward (at worst SHARE_MIN / W of a budget: a very long, finite delay). Values outside
  it are still scored, as before: negative shares count as 0, all-zero shares at the
  offloaded users give the equal split, and an offloaded user left with a zero share
  while others have some gets no bandwidth (or CPU), so its delay and the reward are
  infinite, as `slot_costs` defines it. Shares must be finite: a NaN or infinite share
  is refused (ValueError) when the action is concrete (an eager call), and under jit a
  non-finite share at an offloaded user gives a NaN reward, never one as good as a
  valid action's. `FlatActionWrapper` offers one flat `Box` action instead, every value
  of which decodes into this space.
* Params: `EnvParams.replace` checks concrete values against MECConfig's ranges; params
  out of range under jit give a NaN reward (`slot_costs`), never a valid-looking one.
  A `MECConfig` is accepted wherever params are taken (`step`, `reset`, the spaces).
* Reward: minus `slot_costs(slots, Decision(x, b, f), params).objective`, with no
  inference delay (the environment does not know how long the agent thought; add it
  with `slot_costs(state.slots, ..., t_inf_edge, t_inf_loc)` if it matters). `info`
  holds the slot's 'objective', 'mean_delay' (s), 'miss_ratio', 'energy' (J, summed
  over users), 'discount', and gymnax's 'terminated', 'truncated', 'final_observation'.

Every numeric constant is traced, so one compiled step serves any `EnvParams` with the
env's case and width, and `jax.vmap` can run over the params' leaves (`sweep_params`).
Example, a random agent on 64 slots at once::

    env = MECEnv(MECConfig(case=2))
    params = env.default_params
    key_reset, key_act = jax.random.split(jax.random.PRNGKey(0))
    reset = jax.jit(jax.vmap(env.reset, in_axes=(0, None)))
    step = jax.jit(jax.vmap(env.step, in_axes=(0, 0, 0, None)))
    sample = jax.jit(jax.vmap(env.sample_action))
    obs, state = reset(jax.random.split(key_reset, 64), params)
    for t in range(10):
      keys = jax.random.split(jax.random.fold_in(key_act, t), 2 * 64)
      action = sample(keys[:64])
      obs, state, reward, terminated, truncated, info = step(keys[64:], state, action,
                                                             params)
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from gymnax.environments import environment, spaces
from gymnax.wrappers.purerl import GymnaxWrapper

from dynn_jax.config import EnvParams, MECConfig
from dynn_jax.env import (NUM_FEATURES, Decision, Slots, normalized_features, sample_slots,
                          slot_costs)
# The share arithmetic lives where the evaluation can read it without gymnax; re-exported.
from dynn_jax.rl.actions import (LOGIT_LIMIT, SHARE_MIN, logit_shares,  # noqa: F401
                                 normalize_shares, shares_decision)

Array = jax.Array

OBS_COLUMNS = NUM_FEATURES + 1
# The flat action's bound: its share entries are logits (`logit_shares`).
FLAT_LIMIT = LOGIT_LIMIT


@struct.dataclass
class EnvState(environment.EnvState):
  """The slot of the current episode and the steps taken in it (0 after a reset)."""
  slots: Slots


class Action(NamedTuple):
  """One slot's decision; every field is [W] (batch axes come from `jax.vmap`)."""
  x: Array         # bool or integer: offload where nonzero (ignored in case 1)
  b_share: Array   # > 0 (>= SHARE_MIN in the space): relative uplink bandwidth
  f_share: Array   # > 0 (>= SHARE_MIN in the space): relative server CPU


class Bits(spaces.Box):
  """A gymnax `Box` of 0/1 int32 entries whose `sample` is a fair coin per entry
  (`Box.sample` draws U[low, high) and casts, which would give 0 every time)."""

  def __init__(self, shape: tuple[int, ...]):
    super().__init__(0, 1, shape, jnp.int32)

  def sample(self, key: Array) -> Array:
    return jax.random.bernoulli(key, 0.5, self.shape).astype(self.dtype)


def split_obs(obs: Array) -> tuple[Array, Array]:
  """obs [..., W, 6] -> (features [..., W, 5], user mask bool [..., W])."""
  return obs[..., :NUM_FEATURES], obs[..., NUM_FEATURES] > 0.5


def _float_dtype():
  return jnp.zeros(()).dtype  # float64 under jax_enable_x64


class MECEnv(environment.Environment[EnvState, EnvParams]):
  """One edge server, one slot per episode (see the module docstring).

  `config` fixes the case, the padded width W and the default params; `feature_config`
  (default `config`, same case required) fixes the ranges that normalise the
  observation. Methods take `params=None` for `default_params`.
  """

  def __init__(self, config: MECConfig | None = None,
               feature_config: MECConfig | None = None):
    config = MECConfig() if config is None else config
    feature_config = config if feature_config is None else feature_config
    for name, value in (('config', config), ('feature_config', feature_config)):
      if not isinstance(value, MECConfig):
        raise TypeError(f'MECEnv {name} must be a MECConfig, got {type(value).__name__}')
    if feature_config.case != config.case:
      raise ValueError(f'MECEnv: feature_config.case = {feature_config.case} but '
                       f'config.case = {config.case}; the f_loc feature range depends on '
                       'the case, so both must agree')
    self.config = config
    self.feature_config = feature_config

  # Equal configs, equal envs: gymnax jits `step` and `reset` with `self` static.
  def __eq__(self, other) -> bool:
    return type(other) is type(self) and self._key() == other._key()

  def __hash__(self) -> int:
    return hash(self._key())

  def _key(self) -> tuple:
    return (self.config, self.feature_config, self._transition_gradients_enabled)

  # ---------------------------------------------------------------- static info

  @property
  def name(self) -> str:
    return f'MEC-case{self.case}-W{self.width}'

  @property
  def case(self) -> int:
    return self.config.case

  @property
  def width(self) -> int:
    """W: user positions in every per-user array (real users are masked)."""
    return self.config.width

  @property
  def num_actions(self) -> int:
    """Entries of one action: W offloading bits and W shares of each budget (the size
    of `FlatActionWrapper`'s Box)."""
    return 3 * self.width

  @property
  def default_params(self) -> EnvParams:
    return self.config.params()

  def observation_space(self, params: EnvParams | MECConfig | None = None) -> spaces.Box:
    """[W, 6] in [0, 1] (see the module docstring for when values exceed 1)."""
    return spaces.Box(0.0, 1.0, (self.width, OBS_COLUMNS), _float_dtype())

  def action_space(self, params: EnvParams | MECConfig | None = None) -> spaces.Dict:
    """x: `Bits`; each share: Box [SHARE_MIN, 1] (zero is outside: see the module
    docstring). Any positive scale is normalised away; [SHARE_MIN, 1] is where every
    action is scored finitely."""
    vector = (self.width,)
    share = spaces.Box(SHARE_MIN, 1.0, vector, _float_dtype())
    return spaces.Dict({'x': Bits(vector), 'b_share': share, 'f_share': share})

  def state_space(self, params: EnvParams | MECConfig | None = None) -> spaces.Dict:
    """`EnvState` as spaces: the slot's arrays within the params' sampling ranges
    (padded users hold 0 or the upper bound), and the time step."""
    p = self.checked_params(params)
    vector, dtype = (self.width,), _float_dtype()
    box = lambda low, high: spaces.Box(low, high, vector, dtype)
    slots = spaces.Dict({'s': box(0.0, p.s_max), 'c': box(0.0, p.c_max),
                         'd': box(p.d_min, p.d_max), 'l': box(p.dist_min, p.dist_max),
                         'f_loc': box(0.0, p.f_loc_max if self.case == 2 else 0.0),
                         'mask': Bits(vector)})
    return spaces.Dict({'slots': slots, 'time': spaces.Discrete(p.max_steps_in_episode + 1)})

  def sample_action(self, key: Array, params: EnvParams | MECConfig | None = None
                    ) -> Action:
    """A uniformly random action of the space for one slot: fair coin x, shares
    U[SHARE_MIN, 1]."""
    return Action(**self.action_space(params).sample(key))

  # ---------------------------------------------------------------- episode

  def reset(self, key: Array, params: EnvParams | MECConfig | None = None
            ) -> tuple[Array, EnvState]:
    """gymnax's `reset`, with params checked (and a MECConfig turned into EnvParams)
    before its jit."""
    return super().reset(key, self.checked_params(params))

  def step(self, key: Array, state: EnvState, action, params=None):
    """gymnax's `step` (score `action`, then auto-reset: (obs, state, reward,
    terminated, truncated, info)), with the action and params checked before its jit:
    a concrete non-finite share is refused here (under gymnax's jit it would not be)."""
    return super().step(key, state, self._check_action(action), self.checked_params(params))

  def reset_env(self, key: Array, params: EnvParams) -> tuple[Array, EnvState]:
    params = self.checked_params(params)
    slots = sample_slots(key, params)
    state = EnvState(time=jnp.zeros((), jnp.int32), slots=slots)
    return self.get_obs(state, params), state

  def step_env(self, key: Array, state: EnvState, action, params: EnvParams
               ) -> tuple[Array, EnvState, Array, Array, dict[str, Array]]:
    """The step without the reset: obs and state are the scored slot's."""
    params = self.checked_params(params)
    decision = self.decision(state.slots, action, params)
    costs = slot_costs(state.slots, decision, params)
    state = state.replace(time=state.time + 1)
    terminated = self.is_terminated(state, params)
    info = {'objective': costs.objective, 'mean_delay': costs.mean_delay,
            'miss_ratio': costs.miss_ratio, 'energy': costs.total_energy,
            'discount': self.discount(state, params)}
    return self.get_obs(state, params), state, -costs.objective, terminated, info

  def get_obs(self, state: EnvState, params: EnvParams | None = None,
              key: Array | None = None) -> Array:
    slots = state.slots
    features = normalized_features(slots, self.feature_config)
    return jnp.concatenate([features, slots.mask[..., None].astype(features.dtype)], -1)

  def is_terminated(self, state: EnvState, params: EnvParams | None = None) -> Array:
    """Always: the slot is decided in one step."""
    return jnp.ones(jnp.shape(state.time), jnp.bool_)

  def is_terminal(self, state: EnvState, params: EnvParams | None = None) -> Array:
    return self.is_terminated(state, params)

  def discount(self, state: EnvState, params: EnvParams | None = None) -> Array:
    return jnp.where(self.is_terminated(state, params), 0.0, 1.0)

  # ---------------------------------------------------------------- decision

  def decision(self, slots: Slots, action, params: EnvParams | MECConfig | None = None
               ) -> Decision:
    """The `Decision` an action stands for on `slots` (what `step` scores)."""
    params = self.checked_params(params)
    x, b_share, f_share = self._check_action(action)
    x = slots.mask if self.case == 1 else slots.mask & (x != 0)
    return shares_decision(x, b_share, f_share, params)

  def _check_action(self, action) -> Action:
    # Shapes are known at trace time, so a wrong action fails at the call, not as a
    # broadcast deep inside slot_costs (or, worse, a silent broadcast).
    if isinstance(action, Mapping) and set(action) == set(Action._fields):
      action = Action(**action)  # what the Dict space's `sample` gives
    if not isinstance(action, tuple) or len(action) != 3:
      raise TypeError(f'{self.name}: action must be Action(x, b_share, f_share) or a '
                      f'mapping with those keys, got {type(action).__name__}')
    x, b_share, f_share = (jnp.asarray(a) for a in action)
    want = (self.width,)
    for field, value in zip(Action._fields, (x, b_share, f_share)):
      if value.shape != want:
        raise ValueError(f'{self.name}: action.{field} has shape {value.shape}; expected '
                         f'{want} (one slot of width W = {self.width}; use jax.vmap '
                         'for a batch of episodes)')
    if not (x.dtype == jnp.bool_ or jnp.issubdtype(x.dtype, jnp.integer)):
      raise TypeError(f'{self.name}: action.x has dtype {x.dtype}; expected bool or '
                      'integer offloading bits (threshold probabilities first)')
    for field, value in (('b_share', b_share), ('f_share', f_share)):
      if not jnp.issubdtype(value.dtype, jnp.floating):
        raise TypeError(f'{self.name}: action.{field} has dtype {value.dtype}; expected '
                        'a float dtype')
      # Values only where they are concrete; under jit a non-finite share gives a NaN
      # reward (`normalize_shares`).
      if not isinstance(value, jax.core.Tracer) and not np.isfinite(np.asarray(value)).all():
        raise ValueError(f'{self.name}: action.{field} holds {np.asarray(value).tolist()}; '
                         'shares must be finite')
    return Action(x, b_share, f_share)

  def checked_params(self, params) -> EnvParams:
    """The `EnvParams` meant by `params` (None: `default_params`; a `MECConfig`: its
    params); TypeError or ValueError where they cannot drive this env's shapes."""
    if params is None:
      return self.default_params
    if isinstance(params, MECConfig):
      params = params.params()
    if not isinstance(params, EnvParams):
      raise TypeError(f'{self.name}: params must be EnvParams (MECConfig.params()) or a '
                      f'MECConfig, got {type(params).__name__}')
    if params.case != self.case or params.width != self.width:
      raise ValueError(f'{self.name}: params have case {params.case} and width '
                       f'{params.width}; this env has case {self.case} and width '
                       f'{self.width} (they fix shapes and code paths)')
    if params.max_steps_in_episode != 1:
      raise ValueError(f'{self.name}: EnvParams.max_steps_in_episode = '
                       f'{params.max_steps_in_episode!r}; allowed range an integer in '
                       '[1, 1] (one slot per episode)')
    return params


class FlatActionWrapper(GymnaxWrapper):
  """`MECEnv` with one flat `spaces.Box` action, for libraries that only know Boxes.

  The action a has 3 W entries in [-FLAT_LIMIT, FLAT_LIMIT] (`decode`): the first W are
  the offloading bits, x = a > 0 (ignored in case 1); the next W the bandwidth shares
  and the last W the CPU shares, each share `logit_shares(a)` = exp(a - FLAT_LIMIT), a
  strictly positive map onto [SHARE_MIN, 1] that the env normalises over the offloaded
  users (a softmax of the entries, in effect). Every value decodes into the env's action space, so every
  action gets a finite reward. Out-of-range entries are **mapped, not refused** (RL
  libraries run the step under jit, where nothing can raise, and one NaN reward would
  spoil a learner's statistics): entries beyond the bounds are clipped to them, ±inf
  included, and a NaN entry counts as 0 (a bit: not offloaded; a share: the middle of
  the range, sqrt(SHARE_MIN)). Negative entries are ordinary values (x = 0, a share
  below the middle). Everything else (observation, reward, info, params) is the env's.
  """

  @property
  def width(self) -> int:
    return self._env.width

  @property
  def num_actions(self) -> int:
    return 3 * self.width

  def action_space(self, params=None) -> spaces.Box:
    return spaces.Box(-FLAT_LIMIT, FLAT_LIMIT, (self.num_actions,), _float_dtype())

  def decode(self, action: Array) -> Action:
    """The env's `Action` of a flat action [3 W] (see the class docstring)."""
    action = jnp.asarray(action)
    if action.shape != (self.num_actions,):
      raise ValueError(f'{self._env.name} (flat actions): action has shape {action.shape}; '
                       f'expected ({self.num_actions},) (3 W for W = {self.width}; use '
                       'jax.vmap for a batch of episodes)')
    if not jnp.issubdtype(action.dtype, jnp.floating):
      action = action.astype(_float_dtype())
    a = jnp.nan_to_num(action, nan=0.0)
    w = self.width
    return Action(x=a[:w] > 0, b_share=logit_shares(a[w:2 * w]),
                  f_share=logit_shares(a[2 * w:]))

  @functools.partial(jax.jit, static_argnames=('self',))
  def _step(self, key, state, action, params):
    return self._env.step(key, state, self.decode(action), params)

  def step(self, key: Array, state: EnvState, action: Array, params=None):
    """The env's `step` on the decoded action (params checked before the jit)."""
    return self._step(key, state, action, self._env.checked_params(params))

  def reset(self, key: Array, params=None) -> tuple[Array, EnvState]:
    return self._env.reset(key, params)

  # The wrapper is static in gymnax's jitted wrappers: equal envs, equal wrappers.
  def __eq__(self, other) -> bool:
    return type(other) is type(self) and self._env == other._env

  def __hash__(self) -> int:
    return hash((type(self), self._env))

  def __deepcopy__(self, memo) -> 'FlatActionWrapper':
    # Immutable, so a copy is itself; copying it field by field would recurse forever in
    # GymnaxWrapper.__getattr__ (a copy has no `_env` yet). RL libraries that deep-copy
    # their config (rejax) copy the env in it.
    return self
