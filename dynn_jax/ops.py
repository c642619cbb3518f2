"""Counted ops, parameter counts and the modelled inference delay (SPEC section 2).

A dense layer D_in -> D_out applied once counts M = zeta * D_in * D_out + iota ops
(`ModelConfig.op_zeta`, `op_iota`; 2 and 0 by default: a multiply and an add per
weight). Only dense layers count: biases, activations, pooling, the gate's top-k, the
softmaxes and the gate-weighted sum of the experts are not counted. What the counts
take in seconds is `dynn_jax.delay`'s (`delay.modelled_seconds`).

Per slot, with n offloaded users (n_offloaded) and N real users (n_users):

* allocation (k, l): dynamic = k * n * (ops of the first l layers of one expert on one
  user); fixed = gate (z W_g once per slot; the noise branch runs only in training)
  + two heads (width -> 1) per offloaded user;
* static baseline: its L layers and two heads per offloaded user;
* scheduler: per-user MLP on every real user (N); policy: once per slot.

T_inf_edge = scheduler + policy + allocation(k, l) (`pipeline_ops`); T_inf_loc =
scheduler only. In case 1 no scheduler runs (every task is offloaded); the fixed-exit
baselines run no policy: both are flags. Seconds (modelled, measured or none) are
`dynn_jax.delay`'s.

Functions of (k, l, n) return jnp arrays of the default float dtype and work under
jit with traced, batched arguments (shapes broadcast). Concrete values out of range
(k outside 1..K, l outside 1..L, n outside 0..max_users) raise ValueError; traced ones
give NaN rather than a clipped number. Parameter counts are Python ints and include
biases; `count_params` counts the leaves of an initialised model for cross-checks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from dynn_jax.models import (POOLED_DIM, ModelConfig, check_int, check_kl, policy_inputs,
                             scheduler_inputs)

Array = jax.Array

def dense_ops(config: ModelConfig, d_in: int, d_out: int) -> float:
  return config.op_zeta * d_in * d_out + config.op_iota


def dense_params(d_in: int, d_out: int, bias: bool = True) -> int:
  return d_in * d_out + (d_out if bias else 0)


def as_float(value) -> Array:
  return jnp.asarray(value, jnp.result_type(float))


def _checked_n(config: ModelConfig, name: str, n, batch_shape=()) -> tuple[Array, Array]:
  n = check_int(name, n, 0, config.max_users,
                f'0..ModelConfig.max_users={config.max_users}', batch_shape)
  return n, (n >= 0) & (n <= config.max_users)


def _shape(*values) -> tuple[int, ...]:
  return np.broadcast_shapes(*(np.shape(v) for v in values))


# --------------------------------------------------------------------------- ops


def expert_ops_by_depth(config: ModelConfig) -> np.ndarray:
  """[L]: ops of the first l layers of one expert on one user, l = 1..L."""
  return np.cumsum([dense_ops(config, *dims) for dims in config.expert_dims])


def gate_ops(config: ModelConfig) -> float:
  return dense_ops(config, POOLED_DIM, config.num_experts)


def allocation_dynamic_ops(config: ModelConfig, k, l, n_offloaded) -> Array:
  """k * n * ops(first l layers of one expert): the part that (k, l) scales."""
  shape = _shape(k, l, n_offloaded)
  k, l, valid = check_kl(config, k, l, shape)
  n, n_ok = _checked_n(config, 'n_offloaded', n_offloaded, shape)
  per_user = as_float(expert_ops_by_depth(config))[jnp.where(valid, l - 1, 0)]
  return jnp.where(valid & n_ok, k * n * per_user, jnp.nan)


def allocation_fixed_ops(config: ModelConfig, n_offloaded) -> Array:
  """Gate once per slot plus the two heads per offloaded user."""
  n, n_ok = _checked_n(config, 'n_offloaded', n_offloaded, np.shape(n_offloaded))
  heads = 2 * dense_ops(config, config.width, 1)
  return jnp.where(n_ok, gate_ops(config) + n * as_float(heads), jnp.nan)


def allocation_ops(config: ModelConfig, k, l, n_offloaded) -> Array:
  return (allocation_dynamic_ops(config, k, l, n_offloaded)
          + allocation_fixed_ops(config, n_offloaded))


def _grid(config: ModelConfig) -> tuple[Array, Array]:
  """k [K, 1] and l [1, L]: every option, broadcastable to a [K, L] table."""
  return (jnp.arange(1, config.num_experts + 1)[:, None],
          jnp.arange(1, config.max_depth + 1)[None, :])


def _per_slot(n):
  """A count of shape [...] made to broadcast against a [K, L] table."""
  return n if n is None or isinstance(n, int) else jnp.asarray(n)[..., None, None]


def ops_table(config: ModelConfig, n_offloaded) -> Array:
  """Allocation ops of every (k, l): [..., K, L] for n_offloaded of shape [...]."""
  return allocation_ops(config, *_grid(config), _per_slot(n_offloaded))


def static_ops(config: ModelConfig, n_offloaded) -> Array:
  n, n_ok = _checked_n(config, 'n_offloaded', n_offloaded, np.shape(n_offloaded))
  per_user = sum(dense_ops(config, *dims) for dims in config.static_dims)
  per_user += 2 * dense_ops(config, config.static_width, 1)
  return jnp.where(n_ok, n * as_float(per_user), jnp.nan)


def scheduler_ops(config: ModelConfig, n_users) -> Array:
  n, n_ok = _checked_n(config, 'n_users', n_users, np.shape(n_users))
  per_user = (dense_ops(config, scheduler_inputs(config), config.scheduler_hidden)
              + dense_ops(config, config.scheduler_hidden, 1))
  return jnp.where(n_ok, n * as_float(per_user), jnp.nan)


def policy_ops(config: ModelConfig) -> float:
  return (dense_ops(config, policy_inputs(config), config.policy_hidden)
          + dense_ops(config, config.policy_hidden, config.num_options))


# ------------------------------------------------------------------------ params


def expert_params(config: ModelConfig, l: int | None = None) -> int:
  """Weights and biases of the first l layers of one expert (all L by default)."""
  l = config.max_depth if l is None else l
  check_kl(config, 1, l)
  return sum(dense_params(*dims) for dims in config.expert_dims[:l])


def allocation_dynamic_params(config: ModelConfig, k: int | None = None,
                              l: int | None = None) -> int:
  k = config.num_experts if k is None else k
  check_kl(config, k, 1)
  return k * expert_params(config, l)


def allocation_fixed_params(config: ModelConfig) -> int:
  """Gate (and its noise kernel, trained though not run at inference) and two heads (a
  pair per depth with `depth_heads`; an exit runs one pair)."""
  gates = 2 if config.gate_noise else 1
  pairs = config.max_depth if config.depth_heads else 1
  return (gates * dense_params(POOLED_DIM, config.num_experts, bias=False)
          + 2 * pairs * dense_params(config.width, 1, bias=False))


def allocation_params(config: ModelConfig, k: int | None = None,
                      l: int | None = None) -> int:
  """Parameters of sub-network (k, l); the whole allocator's by default."""
  return allocation_dynamic_params(config, k, l) + allocation_fixed_params(config)


def static_params(config: ModelConfig) -> int:
  return (sum(dense_params(*dims) for dims in config.static_dims)
          + 2 * dense_params(config.static_width, 1, bias=False))


def scheduler_params(config: ModelConfig) -> int:
  return (dense_params(scheduler_inputs(config), config.scheduler_hidden)
          + dense_params(config.scheduler_hidden, 1))


def policy_params(config: ModelConfig) -> int:
  return (dense_params(policy_inputs(config), config.policy_hidden)
          + dense_params(config.policy_hidden, config.num_options))


def count_params(variables) -> int:
  """Number of scalars in a parameter tree (e.g. `model.init(...)`)."""
  return sum(int(np.size(leaf)) for leaf in jax.tree.leaves(variables))


# ------------------------------------------------------------------------ pipeline


def pipeline_ops(config: ModelConfig, k, l, n_offloaded, n_users=None, *, policy: bool,
                 scheduler: bool, static: bool = False) -> Array:
  """Counted ops an offloaded user of the slot waits for: the allocator (k, l), or the
  static network, plus the scheduler (on every real user) and the policy where they
  run. A local user waits for the scheduler's `scheduler_ops` only."""
  net = static_ops(config, n_offloaded) if static else allocation_ops(config, k, l,
                                                                       n_offloaded)
  if scheduler:
    if n_users is None:
      raise ValueError('n_users is needed when the scheduler runs')
    net = net + scheduler_ops(config, n_users)
  if policy and not static:
    net = net + policy_ops(config)
  return net


def table_one(config: ModelConfig, n_offloaded: int) -> dict[str, float]:
  """Our counterpart of the paper's Table I (`dynn_jax.paper.TABLE_ONE`).

  'fixed_*' is the allocator's own fixed part (gate and heads); 'pipeline_fixed_*' adds
  the scheduler (on n_offloaded users, i.e. case 1 with everyone offloaded) and the
  policy, since the paper does not say which networks its fixed part holds.
  """
  n = n_offloaded
  fixed_ops = float(allocation_fixed_ops(config, n))
  fixed_params = allocation_fixed_params(config)
  return {
      'dynamic_ops': float(allocation_dynamic_ops(config, config.num_experts,
                                                  config.max_depth, n)),
      'dynamic_params': float(allocation_dynamic_params(config)),
      'fixed_ops': fixed_ops,
      'fixed_params': float(fixed_params),
      'pipeline_fixed_ops': fixed_ops + float(scheduler_ops(config, n)) + policy_ops(config),
      'pipeline_fixed_params': float(fixed_params + scheduler_params(config)
                                     + policy_params(config)),
  }
