"""The slot scheduling problem as a gymnax-style environment for RL users.

`MECEnv` owns the episode structure, the observation, the action format and the
reward; the physics stays in `dynn_jax.env` (`sample_slots`, `slot_costs`) and the
constants in `EnvParams` (`dynn_jax.config`). Like a gymnax environment it is a plain
object whose static fields (case, padded width W, the feature ranges) are fixed at
construction, and whose methods are pure functions of (key, state, action, params):
wrap them in `jax.jit` / `jax.vmap` as they are.

* One episode is one slot: `reset` draws a slot with `sample_slots(key, params)`, and
  the first `step` scores the decision for it and ends the episode (`done` is always
  True, the discount 0). As in gymnax, `step` then resets with a key split from its
  own, so the returned obs and state belong to the next slot; `step_env` is the same
  step without the reset (its obs and state are the scored slot's).
* Observation: float array [W, 6]. Columns 0..4 are `normalized_features` (s, c, d, l,
  f_loc) of each user position, column 5 is the user mask as 0.0 / 1.0; padded
  positions are all zero. `split_obs(obs)` gives back (features [..., W, 5],
  mask bool [..., W]), the inputs of the networks in `dynn_jax.models`. The features
  are normalised with the ranges of a fixed `MECConfig` given at construction
  (`feature_config`, default: the env's config), never with the traced `params`: the
  networks are trained on one set of ranges, and a slot must look the same to them
  whatever params it was drawn under. Hence obs lies in [0, 1] as long as the params'
  sampling ranges stay inside the feature config's; a sweep beyond them gives values
  above 1, kept as they are (clipping would hide that the slot is out of range).
* Action: `Action(x, b_share, f_share)`, each [W] for one slot. x (bool or integer,
  nonzero = offload) is restricted to the real users; in case 1 users have no CPU, so x
  is ignored and every real user offloads. Shares are taken at the offloaded users only
  (elsewhere ignored), negative values count as 0, and they are normalised to sum to 1
  over the offloaded users; all-zero shares there give the equal split. Then
  b = b_share * params.b_max and f = f_share * params.f_ser. Shares must be finite: a
  NaN or infinite share is refused (ValueError) when the action is concrete (an eager
  call), and under jit a non-finite share at an offloaded user gives a NaN reward, never
  one as good as a valid action's (it used to fall back to the equal split). An
  offloaded user left with a zero share while others have some gets no bandwidth (or
  CPU): its delay, and so the reward, is infinite, as `slot_costs` defines it.
* Params: `EnvParams.replace` checks concrete values against MECConfig's ranges; params
  out of range under jit give a NaN reward (`slot_costs`), never a valid-looking one.
* Reward: minus `slot_costs(slots, Decision(x, b, f), params).objective`, with no
  inference delay (the environment does not know how long the agent thought; add it
  with `slot_costs(state.slots, ..., t_inf_edge, t_inf_loc)` if it matters). `info`
  holds the slot's 'objective', 'mean_delay' (s), 'miss_ratio', 'energy' (J, summed
  over users) and 'discount'.

Every numeric constant is traced, so one compiled step serves any `EnvParams` with the
env's case and width, and `jax.vmap` can run over the params' leaves (`sweep_params`).
Example, a random agent on 64 slots at once::

    env = MECEnv(MECConfig(case=2))
    params = env.default_params
    key_reset, key_act = jax.random.split(jax.random.PRNGKey(0))
    reset = jax.jit(jax.vmap(env.reset, in_axes=(0, None)))
    step = jax.jit(jax.vmap(env.step, in_axes=(0, 0, 0, None)))
    obs, state = reset(jax.random.split(key_reset, 64), params)
    for t in range(10):
      keys = jax.random.split(jax.random.fold_in(key_act, t), 2 * 64)
      action = jax.vmap(env.sample_action)(keys[:64])
      obs, state, reward, done, info = step(keys[64:], state, action, params)
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from dynn_jax.config import EnvParams, MECConfig
from dynn_jax.env import (NUM_FEATURES, Decision, Slots, normalized_features, sample_slots,
                          slot_costs)

Array = jax.Array

OBS_COLUMNS = NUM_FEATURES + 1


@struct.dataclass
class EnvState:
  """The slot of the current episode and the steps taken in it (0 after a reset)."""
  slots: Slots
  time: Array


class Action(NamedTuple):
  """One slot's decision; every field is [W] (batch axes come from `jax.vmap`)."""
  x: Array         # bool or integer: offload where nonzero (ignored in case 1)
  b_share: Array   # >= 0, relative uplink bandwidth; normalised over offloaded users
  f_share: Array   # >= 0, relative server CPU; normalised over offloaded users


class Box(NamedTuple):
  """A description of a space, in the manner of gymnax's `spaces.Box`."""
  low: float
  high: float
  shape: tuple[int, ...]
  dtype: Any


def split_obs(obs: Array) -> tuple[Array, Array]:
  """obs [..., W, 6] -> (features [..., W, 5], user mask bool [..., W])."""
  return obs[..., :NUM_FEATURES], obs[..., NUM_FEATURES] > 0.5


def normalize_shares(share: Array, x: Array) -> Array:
  """Non-negative shares summing to 1 over `x` (equal split if all are 0), 0 elsewhere;
  NaN over `x` where a share there is NaN or infinite (not the equal split: that would
  score a broken action as a valid one)."""
  share = jnp.where(x, jnp.maximum(share, 0.0), 0.0)
  total = share.sum(-1, keepdims=True)
  count = x.sum(-1, keepdims=True).astype(share.dtype)
  equal = jnp.where(x, 1.0 / jnp.maximum(count, 1.0), 0.0)
  # The safe denominator keeps gradients finite on the equal-split branch.
  shares = jnp.where(total > 0, share / jnp.where(total > 0, total, 1.0), equal)
  return jnp.where(jnp.isfinite(total), shares, jnp.where(x, jnp.nan, 0.0))


class MECEnv:
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
  def default_params(self) -> EnvParams:
    return self.config.params()

  def observation_space(self, params: EnvParams | None = None) -> Box:
    """[W, 6] in [0, 1] (see the module docstring for when values exceed 1)."""
    return Box(0.0, 1.0, (self.width, OBS_COLUMNS), jnp.zeros(()).dtype)

  def action_space(self, params: EnvParams | None = None) -> Action:
    """An `Action` of Boxes. Shares accept any finite value >= 0; [0, 1] is what
    `sample_action` draws, and any scale is normalised away."""
    vector = (self.width,)
    return Action(x=Box(0, 1, vector, jnp.bool_),
                  b_share=Box(0.0, 1.0, vector, jnp.zeros(()).dtype),
                  f_share=Box(0.0, 1.0, vector, jnp.zeros(()).dtype))

  def sample_action(self, key: Array, params: EnvParams | None = None) -> Action:
    """A uniformly random action for one slot: fair coin x, shares U[0, 1]."""
    kx, kb, kf = jax.random.split(key, 3)
    vector = (self.width,)
    return Action(x=jax.random.bernoulli(kx, 0.5, vector),
                  b_share=jax.random.uniform(kb, vector),
                  f_share=jax.random.uniform(kf, vector))

  # ---------------------------------------------------------------- episode

  def reset(self, key: Array, params: EnvParams | None = None) -> tuple[Array, EnvState]:
    return self.reset_env(key, self._params(params))

  def step(self, key: Array, state: EnvState, action: Action,
           params: EnvParams | None = None
           ) -> tuple[Array, EnvState, Array, Array, dict[str, Array]]:
    """Scores `action` on `state`'s slot, then resets (gymnax's auto-reset)."""
    params = self._params(params)
    key_step, key_reset = jax.random.split(key)
    obs_st, state_st, reward, done, info = self.step_env(key_step, state, action, params)
    obs_re, state_re = self.reset_env(key_reset, params)
    # `done` is always True; the select keeps gymnax's form for wrappers that rely on it.
    state = jax.tree.map(lambda a, b: jnp.where(done, a, b), state_re, state_st)
    obs = jnp.where(done, obs_re, obs_st)
    return obs, state, reward, done, info

  def reset_env(self, key: Array, params: EnvParams) -> tuple[Array, EnvState]:
    params = self._params(params)
    slots = sample_slots(key, params)
    state = EnvState(slots=slots, time=jnp.zeros((), jnp.int32))
    return self.get_obs(state, params), state

  def step_env(self, key: Array, state: EnvState, action: Action, params: EnvParams
               ) -> tuple[Array, EnvState, Array, Array, dict[str, Array]]:
    """The step without the reset: obs and state are the scored slot's."""
    params = self._params(params)
    decision = self.decision(state.slots, action, params)
    costs = slot_costs(state.slots, decision, params)
    state = state.replace(time=state.time + 1)
    done = self.is_terminal(state, params)
    info = {'objective': costs.objective, 'mean_delay': costs.mean_delay,
            'miss_ratio': costs.miss_ratio, 'energy': costs.total_energy,
            'discount': self.discount(state, params)}
    return self.get_obs(state, params), state, -costs.objective, done, info

  def get_obs(self, state: EnvState, params: EnvParams | None = None) -> Array:
    slots = state.slots
    features = normalized_features(slots, self.feature_config)
    return jnp.concatenate([features, slots.mask[..., None].astype(features.dtype)], -1)

  def is_terminal(self, state: EnvState, params: EnvParams | None = None) -> Array:
    return jnp.ones(jnp.shape(state.time), jnp.bool_)

  def discount(self, state: EnvState, params: EnvParams | None = None) -> Array:
    return jnp.where(self.is_terminal(state, params), 0.0, 1.0)

  # ---------------------------------------------------------------- decision

  def decision(self, slots: Slots, action: Action, params: EnvParams | None = None
               ) -> Decision:
    """The `Decision` an action stands for on `slots` (what `step` scores)."""
    params = self._params(params)
    x, b_share, f_share = self._check_action(action)
    x = slots.mask if self.case == 1 else slots.mask & x
    return Decision(x=x, b=normalize_shares(b_share, x) * params.b_max,
                    f=normalize_shares(f_share, x) * params.f_ser)

  def _check_action(self, action) -> tuple[Array, Array, Array]:
    # Shapes are known at trace time, so a wrong action fails at the call, not as a
    # broadcast deep inside slot_costs (or, worse, a silent broadcast).
    if not isinstance(action, tuple) or len(action) != 3:
      raise TypeError(f'{self.name}: action must be Action(x, b_share, f_share), got '
                      f'{type(action).__name__}')
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
    return x != 0, b_share, f_share

  def _params(self, params) -> EnvParams:
    if params is None:
      return self.default_params
    if isinstance(params, MECConfig):
      params = params.params()
    if not isinstance(params, EnvParams):
      raise TypeError(f'{self.name}: params must be EnvParams (MECConfig.params()), got '
                      f'{type(params).__name__}')
    if params.case != self.case or params.width != self.width:
      raise ValueError(f'{self.name}: params have case {params.case} and width '
                       f'{params.width}; this env has case {self.case} and width '
                       f'{self.width} (they fix shapes and code paths)')
    return params
