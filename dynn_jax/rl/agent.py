"""The PPO agent's network and its deterministic policy.

`ActorCritic` is a per-user actor-critic in the manner of the DyNN's experts: one MLP
shared by every user reads that user's normalised features (and their logarithms:
shares of the optimum are near powers of s and c), a pooled summary of all users
(`models.pool_offloaded`: mean, max and count of the per-user embeddings) is the slot
context, and per-user heads read [own embedding, context]:

* offloading (case 2 only): a logit per user, context pooled over the real users;
  x_i ~ Bernoulli(sigmoid(logit_i)). Case 1 offloads every real user (no CPU).
* shares: a mean per user of the bandwidth and CPU log-shares, context pooled over
  the *offloaded* users (the shares split the budgets among them, so that set is their
  context); log-shares ~ Gaussian(mean, exp(log_std)), one learned std per budget,
  turned into shares by `actions.logit_shares` and normalised over the offloaded users
  (a softmax over them).
* value: an MLP of the context pooled over the real users.

`deterministic_decision` is the evaluation policy: x = sigmoid(logit) > 0.5, shares =
the softmax of the means over the offloaded users. Its sizes are read from the
parameters (`agent_module`), so a networks file needs no more than `Params.agent`.

This module imports neither gymnax nor optax: the evaluation runs agents with it.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import linen as nn

from dynn_jax.config import Config, MECConfig
from dynn_jax.env import Decision, Slots, normalized_features
from dynn_jax.models import pool_offloaded
from dynn_jax.rl.actions import logit_shares, shares_decision

Array = jax.Array

# Normalised features of tasks drawn at 16-bit resolution reach 1.5e-5; below this floor
# their logarithms would only spread the inputs.
LOG_FLOOR = 1e-4
# Initial output scale of the heads: every user starts near the same share (the equal
# split) and, in case 2, near a fair coin.
HEAD_INIT_SCALE = 0.01


class AgentOutput(NamedTuple):
  offload_logit: Array | None  # [..., W] (None in case 1)
  mean: Array                  # [..., W, 2]: log-share means (bandwidth, CPU)
  log_std: Array               # [2]
  value: Array                 # [...]


def user_inputs(features: Array) -> Array:
  """[..., W, 5] normalised features -> [..., W, 10]: the features and their logs."""
  return jnp.concatenate([features, jnp.log(features + LOG_FLOOR)], -1)


class ActorCritic(nn.Module):
  """See the module docstring. `max_users`: the width the count feature is divided by
  (the training system's W, also at evaluation, where slots may be trimmed)."""
  hidden: int = 64
  layers: int = 2
  offload: bool = False
  max_users: int = 30
  log_std_init: float = -0.7

  def setup(self):
    dense = lambda name, n=None, scale=None: nn.Dense(
        self.hidden if n is None else n, name=name,
        kernel_init=(nn.initializers.lecun_normal() if scale is None
                     else nn.initializers.variance_scaling(scale, 'fan_in', 'normal')))
    self.user = [dense(f'user_{i}') for i in range(self.layers)]
    self.context = dense('context')
    if self.offload:
      self.offload_hidden = dense('offload_hidden')
      self.offload_out = dense('offload_out', 1, HEAD_INIT_SCALE)
    self.share_hidden = dense('share_hidden')
    self.share_out = dense('share_out', 2, HEAD_INIT_SCALE)
    # A linear path from the inputs: the optimum's log-shares are near linear in the
    # log-features (compute: 0.5 log(c s)), which the MLP then only corrects.
    self.share_skip = dense('share_skip', 2, HEAD_INIT_SCALE)
    self.value_hidden = dense('value_hidden')
    self.value_out = dense('value_out', 1)
    self.log_std = self.param('log_std', nn.initializers.constant(self.log_std_init), (2,))

  def encode(self, features: Array, mask: Array) -> Array:
    """Per-user embeddings [..., W, hidden] (0 at padded users)."""
    h = user_inputs(features)
    for layer in self.user:
      h = nn.silu(layer(h))
    return jnp.where(mask[..., None], h, 0.0)

  def _with_context(self, h: Array, over: Array) -> Array:
    context = nn.silu(self.context(pool_offloaded(h, over, self.max_users)))
    return jnp.concatenate([h, jnp.broadcast_to(context[..., None, :], h.shape)], -1)

  def offload_logit(self, h: Array, mask: Array) -> Array:
    return self.offload_out(nn.silu(self.offload_hidden(self._with_context(h, mask))))[..., 0]

  def share_mean(self, h: Array, x: Array, features: Array) -> Array:
    return (self.share_out(nn.silu(self.share_hidden(self._with_context(h, x))))
            + self.share_skip(user_inputs(features)))

  def value(self, h: Array, mask: Array) -> Array:
    pooled = pool_offloaded(h, mask, self.max_users)
    return self.value_out(nn.silu(self.value_hidden(pooled)))[..., 0]

  def __call__(self, features: Array, mask: Array, x: Array) -> AgentOutput:
    """Every head, the shares' context pooled over the given offloading `x`."""
    h = self.encode(features, mask)
    logit = self.offload_logit(h, mask) if self.offload else None
    return AgentOutput(logit, self.share_mean(h, x, features), self.log_std,
                       self.value(h, mask))


def agent_module(agent: Any, case: int, max_users: int) -> ActorCritic:
  """The `ActorCritic` whose parameters `agent` are (sizes read from them), for a system
  of `case`; ValueError when the agent was built for the other case."""
  layers = sum(1 for name in agent if name.startswith('user_'))
  if layers == 0 or 'share_out' not in agent:
    raise ValueError(f'not the parameters of a dynn_jax.rl agent (keys {sorted(agent)})')
  offload = 'offload_out' in agent
  if offload != (case == 2):
    raise ValueError(f'the agent was built for case {2 if offload else 1} (offloading head '
                     f'{"present" if offload else "absent"}); the system is case {case}')
  return ActorCritic(hidden=agent['user_0']['kernel'].shape[-1], layers=layers,
                     offload=offload, max_users=max_users)


def greedy_offload(module: ActorCritic, variables, h: Array, mask: Array) -> Array:
  """x = p > 0.5 at the real users (case 2); every real user in case 1."""
  if not module.offload:
    return mask
  return mask & (module.apply(variables, h, mask, method='offload_logit') > 0)


def deterministic_decision(agent: Any, slots: Slots, config: Config,
                           feature_config: MECConfig) -> Decision:
  """The agent's evaluation decision on `slots` (any batch shape) of the system `config`
  (EnvParams or MECConfig), features normalised with `feature_config` (the system it
  was trained on, whose width divides the count feature)."""
  module = agent_module(agent, config.case, feature_config.width)
  variables = {'params': agent}
  features = normalized_features(slots, feature_config)
  h = module.apply(variables, features, slots.mask, method='encode')
  x = greedy_offload(module, variables, h, slots.mask)
  mean = module.apply(variables, h, x, features, method='share_mean')
  return shares_decision(x, logit_shares(mean[..., 0]), logit_shares(mean[..., 1]), config)
