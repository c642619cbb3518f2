"""Reinforcement learning through the gymnax environment (`dynn_jax.gym`).

  actions.py   the share arithmetic of actions (no gymnax: the evaluation reads it)
  agent.py     ActorCritic (per-user actor-critic) and its deterministic decision (no
               gymnax, no optax: the evaluation's 'ppo' method runs it)
  ppo.py       PPOConfig, make_train (purejaxrl's shape), train_ppo (chunked,
               checkpointed, resumable), train_and_save (launch/train_rl.py's job);
               needs the RL extra (gymnax)

Importing this package imports only the light modules; import `dynn_jax.rl.ppo` for
training.
"""

from dynn_jax.rl.actions import (LOGIT_LIMIT, SHARE_MIN, logit_shares, normalize_shares,
                                 shares_decision)
from dynn_jax.rl.agent import ActorCritic, AgentOutput, agent_module, deterministic_decision

__all__ = ['LOGIT_LIMIT', 'SHARE_MIN', 'logit_shares', 'normalize_shares', 'shares_decision',
           'ActorCritic', 'AgentOutput', 'agent_module', 'deterministic_decision']
