"""The networks of SPEC section 3: the allocation DyNN, the static baseline, scheduler, policy.

Everything reads `normalized_features` ([..., W, 5], see `dynn_jax.env`) and a bool
mask [..., W]; leading batch axes are optional and free. Sizes live in `ModelConfig`
(frozen and hashable, so it can be a static jit argument, like `MECConfig`).

Allocation DyNN (`MoEAllocator`), one set of parameters, three inference paths:

* Batched (training, large evaluations)::

    model = MoEAllocator(config)
    variables = model.init(key, features, offload_mask)
    out = model.apply(variables, features, offload_mask, k, l, noise_key=None)

  Every expert and every layer is computed; the gate is masked to its top k and the
  depth is chosen by masking. `k` and `l` may be Python ints, traced int scalars or int
  arrays broadcastable to the batch shape, so `jax.vmap` over (k, l) evaluates all
  K x L sub-networks in one call (`all_subnetworks`); the expert work does not depend
  on (k, l) and is not repeated by the vmap. Gradients reach only the selected
  experts and the first l layers.
* Per slot (`per_slot_apply(config, k, l)`): one cached, jitted variant per static
  (k, l) whose graph holds only the k selected experts (gathered with `lax.top_k`) and
  their first l layers. It runs on all W user positions, padded ones included: its
  real cost follows W, while the modelled count (`dynn_jax.ops`) follows the number
  of offloaded users. `switch_apply(config)` dispatches a traced scalar (k, l) to
  those variants with `lax.switch`. Both match the batched path to 1e-5. Under `vmap`
  a `lax.switch` on a batched index becomes a select that runs every branch, so a
  batch only skips work when all its slots share one (k, l) (group slots by (k, l)).
* Exit-sorted (`exit_sorted_apply(config, variables, features, offload_mask, k, l,
  block=EXIT_SORTED_BLOCK)`, features [B, W, 5], k and l [B]): the grouping done on
  device, inside one traced function, so it can sit inside a jitted evaluation. The
  masked path costs every slot all K experts and L layers whatever it picked; here a
  batch whose slots pick different exits pays only for the exits picked. Slots are
  stably sorted by option, each option's group is padded to whole blocks of `block`
  slots (a static layout of ceil(B / block) + K * L - 1 blocks, the unused ones empty)
  and a `lax.map` over the blocks `lax.switch`es on the block's option to the
  per-slot variant of that exit, vmapped over the block's slots; the results are
  gathered back into slot order. The option is a per-block scalar, never a batched
  one, because under `vmap` a switch on a batched index runs every branch. It
  compiles all K * L variants once (a few seconds at the paper's size) and retraces
  only for a new shape, never for a new mix of exits; padding slots re-read a real
  slot and are never read back. Under an outer `vmap` the option becomes batched and
  the saving is lost: keep the slot axis the function's own.

  Block size: on a 2-core x86 CPU shared with other jobs, with B = 8192 slots, W = 45,
  K = 10, L = 3, width 64 and random parameters, `python -c 'from dynn_jax.benchmark
  import block_sweep; block_sweep()'` (all paths timed in interleaved rounds, medians
  of >= 5 calls, load average 3-4 from other jobs) gave, in thousands of slots/s for
  block 8 / 16 / 32 / 64 / 128: a uniform mix 22 / 23 / 22 / 19 / 12 (masked path
  3.5, exit-bucketed with chunk 16 on the host 19) and a skewed mix (P(option) ~
  1 / (option + 1)^2, about 60% at (1, 1), every exit present) 77 / 84 / 69 / 40 / 24
  (masked 1.9, exit-bucketed 61). Small blocks win for the reason small chunks win in
  `bucketed_apply`: every slot gathers its own k experts' weights, [block, k, width,
  width] per layer, which should stay in cache; below 16 the per-block overhead
  takes over. Hence `EXIT_SORTED_BLOCK = 16`. The shipped policies pick one exit for
  nearly every sampled slot, where the layout wastes at most one partial block.

The output is an `Allocation`: per-user logits of head A (bandwidth) and head B (CPU),
their masked softmax over the offloaded users (`b_share`, `f_share`: in [0, 1], summing
to 1 over the offloaded users, 0 elsewhere, all 0 when nobody is offloaded) and the
gate weights [..., K]. `allocate(out, offload_mask, mec_config)` turns shares into a
`Decision`. Training takes loss 1 through `b_share` and loss 2 through `f_share`: head A
receives no gradient from loss 2 and head B none from loss 1.

Gate: H(z) = z W_g + eps * softplus(z W_noise) with eps ~ N(0, 1) when `noise_key` is
given (training) and eps = 0 otherwise (inference); logits outside the top k get zero
weight, the k kept ones are softmax-normalised. Ties go to the lower expert index in
both paths. With `ModelConfig.gate_noise = False` there is no W_noise and `noise_key`
is ignored. The gate and the heads have no bias: a softmax is shift invariant, so a
bias there would never receive a gradient.

Pooled summary z (gate and policy), `pool_offloaded`: the mean and the max of the
offloaded users' features and their number divided by `max_users` (2 * 5 + 1 = 11
values). The count is there because the cost of a sub-network grows with it. With no
offloaded user z = 0 and nothing becomes NaN.

Out-of-range inputs: a concrete (k, l) outside 1..K x 1..L, a user axis longer than
`max_users` (N_max), a wrong feature width or a non-bool mask raise `ValueError` where
they enter (`ModelConfig`, `apply`, `per_slot_apply`, `dynn_jax.ops`). A *traced* (k, l)
cannot raise, so out-of-range traced values make every output NaN instead of being
clipped (per slot in the batched and exit-sorted paths). `option_to_kl` and
`kl_to_option` raise for concrete out-of-range values and pass traced ones through.

`Scheduler` (per-user offload probability), `Policy` (logits over the K * L options,
option = (k - 1) * L + (l - 1); see `option_to_kl`, `kl_to_option`) and
`StaticAllocator` (one MLP of the deepest expert's shape, `static_width` units, the
same two heads) complete the set. Op and parameter counts are in `dynn_jax.ops`.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from dynn_jax.config import (NON_NEGATIVE, POSITIVE, POSITIVE_INT, ConfigBase, MECConfig,
                             Range, check_choice, check_ranges)
from dynn_jax.env import NUM_FEATURES, Decision, decision_from_shares

Array = jax.Array

POOLED_DIM = 2 * NUM_FEATURES + 1

# MECConfig fields a scheduler reads, per ModelConfig.scheduler_context.
SCHEDULER_CONTEXTS = {'none': (), 'server_cpu': ('f_ser',)}


_MODEL_RANGES = {
    'num_experts': POSITIVE_INT, 'max_depth': POSITIVE_INT, 'width': POSITIVE_INT,
    'static_width': POSITIVE_INT, 'scheduler_hidden': POSITIVE_INT,
    'policy_hidden': POSITIVE_INT, 'max_users': POSITIVE_INT,
    'leaky_slope': Range(0.0, 1.0, True, False), 'op_zeta': POSITIVE, 'op_iota': NON_NEGATIVE,
}


@dataclasses.dataclass(frozen=True)
class ModelConfig(ConfigBase):
  """Sizes of every network; defaults are the paper's (K = 10, L = 3, width 64)."""
  num_experts: int = 10        # K
  max_depth: int = 3           # L: layers of the deepest expert
  width: int = 64              # hidden units of every expert layer
  static_width: int = 384      # hidden units of the static baseline
  scheduler_hidden: int = 32
  policy_hidden: int = 32
  leaky_slope: float = 0.01    # LeakyReLU negative slope
  gate_noise: bool = True      # noisy top-k gate during training (needs a noise key)
  max_users: int = 30          # N_max: the longest user axis accepted
  op_zeta: float = 2.0         # counted ops of a dense layer: zeta * D_in * D_out + iota
  op_iota: float = 0.0
  # System inputs of the scheduler besides each user's 5 features (SCHEDULER_CONTEXTS).
  # 'none' is the paper's scheduler. With 'server_cpu' it also reads
  # log(f_ser / f_ser of the features' system): without it one trained scheduler offloads
  # the same users whatever the server's capacity, and at a slow server that is worse
  # than running everything locally.
  scheduler_context: str = 'none'
  # One pair of output heads per depth (early-exit networks' per-exit heads) instead of
  # one pair that every depth reads: with shared heads a depth-1 exit reads its layer
  # through heads that the deeper exits also train, and the two pull them apart.
  depth_heads: bool = False
  # System inputs of the policy besides the pooled summary (SCHEDULER_CONTEXTS' choices):
  # with 'server_cpu' it reads log(f_ser / f_ser of the features' system), which sets
  # what every exit's modelled inference delay costs.
  policy_context: str = 'none'
  # Each user's expert input also holds the slot's pooled summary z (the gate's input):
  # the allocation that is best for a user depends on the other users (the budgets'
  # prices, which late users can still be rescued), which a per-user MLP can otherwise
  # only see through the gate's mixing weights. The static baseline reads it too.
  expert_context: bool = False

  def __post_init__(self):
    check_ranges(self, _MODEL_RANGES)
    check_choice(self, 'gate_noise', (True, False))
    check_choice(self, 'depth_heads', (True, False))
    check_choice(self, 'expert_context', (True, False))
    check_choice(self, 'policy_context', tuple(SCHEDULER_CONTEXTS))
    check_choice(self, 'scheduler_context', tuple(SCHEDULER_CONTEXTS))

  @classmethod
  def for_env(cls, mec_config: MECConfig, **overrides) -> 'ModelConfig':
    """A config whose N_max is the environment's padded width."""
    return cls(**{'max_users': mec_config.width, **overrides})

  @property
  def num_options(self) -> int:
    return self.num_experts * self.max_depth

  @property
  def expert_dims(self) -> tuple[tuple[int, int], ...]:
    """(D_in, D_out) of each expert layer, first to last."""
    return _mlp_dims(self.expert_inputs, self.width, self.max_depth)

  @property
  def static_dims(self) -> tuple[tuple[int, int], ...]:
    return _mlp_dims(self.expert_inputs, self.static_width, self.max_depth)

  @property
  def expert_inputs(self) -> int:
    """Inputs per user of an expert's (and the static network's) first layer."""
    return NUM_FEATURES + (POOLED_DIM if self.expert_context else 0)


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _mlp_dims(inputs: int, width: int, depth: int) -> tuple[tuple[int, int], ...]:
  return ((inputs, width),) + ((width, width),) * (depth - 1)


def expert_input(config: ModelConfig, features: Array, z: Array) -> Array:
  """Each user's input to the experts: its features, and with `expert_context` the
  slot's pooled summary z [..., 11] beside them."""
  if not config.expert_context:
    return features
  z = jnp.broadcast_to(z[..., None, :], features.shape[:-1] + z.shape[-1:])
  return jnp.concatenate([features, z.astype(features.dtype)], -1)


# ----------------------------------------------------------------------------- checks


def check_int(name: str, value, low: int, high: int, what: str,
              batch_shape: tuple[int, ...]) -> Array:
  """`value` as int32; concrete values outside [low, high] raise, traced ones pass."""
  if not jnp.issubdtype(jnp.result_type(value), jnp.integer):  # bool and float too
    raise ValueError(f'{name} = {value!r}; must be an integer in [{low}, {high}] ({what})')
  shape = np.shape(value)
  if np.broadcast_shapes(shape, batch_shape) != tuple(batch_shape):
    raise ValueError(f'{name} has shape {shape}; must broadcast to the batch shape '
                     f'{tuple(batch_shape)}')
  if not isinstance(value, jax.core.Tracer):
    concrete = np.asarray(value)
    if concrete.size and (concrete.min() < low or concrete.max() > high):
      raise ValueError(f'{name} = {value!r}; allowed range [{low}, {high}] ({what})')
  return jnp.asarray(value, jnp.int32)


def check_kl(config: ModelConfig, k, l, batch_shape: tuple[int, ...] = ()
             ) -> tuple[Array, Array, Array]:
  """(k, l, valid): int32 arrays and a bool that is False only for traced bad values.

  None means the largest value. Concrete values outside 1..K x 1..L raise ValueError.
  """
  k = config.num_experts if k is None else k
  l = config.max_depth if l is None else l
  k = check_int('k', k, 1, config.num_experts,
                f'1..ModelConfig.num_experts={config.num_experts}', batch_shape)
  l = check_int('l', l, 1, config.max_depth,
                f'1..ModelConfig.max_depth={config.max_depth}', batch_shape)
  return k, l, kl_valid(config, k, l)


def kl_valid(config: ModelConfig, k, l) -> Array:
  """Whether (k, l) lies in 1..K x 1..L, elementwise (traced values cannot raise)."""
  return (k >= 1) & (k <= config.num_experts) & (l >= 1) & (l <= config.max_depth)


def check_static_kl(config: ModelConfig, k, l) -> tuple[int, int]:
  """(k, l) as Python ints for a static variant; anything else raises ValueError."""
  out = []
  for name, value, high, field in (('k', k, config.num_experts, 'num_experts'),
                                   ('l', l, config.max_depth, 'max_depth')):
    if isinstance(value, np.integer):
      value = int(value)
    if not _is_int(value) or not 1 <= value <= high:
      raise ValueError(f'{name} = {value!r}; must be a Python int in [1, {high}] '
                       f'(1..ModelConfig.{field}={high}) for a per-slot variant')
    out.append(value)
  return tuple(out)


def check_inputs(config: ModelConfig, features, mask, mask_name: str = 'offload_mask'
                 ) -> tuple[Array, Array]:
  """Shape and dtype checks at the call boundary."""
  features, mask = jnp.asarray(features), jnp.asarray(mask)
  if features.ndim < 2 or features.shape[-1] != NUM_FEATURES:
    raise ValueError(f'features have shape {features.shape}; expected [..., W, '
                     f'{NUM_FEATURES}] (normalized_features)')
  if not jnp.issubdtype(features.dtype, jnp.floating):
    raise ValueError(f'features have dtype {features.dtype}; expected a float dtype')
  users = features.shape[-2]
  if users > config.max_users:
    raise ValueError(f'features have {users} user positions, more than '
                     f'ModelConfig.max_users = {config.max_users} (N_max); use '
                     'ModelConfig.for_env(mec_config) or raise max_users')
  if mask.shape != features.shape[:-1]:
    raise ValueError(f'{mask_name} has shape {mask.shape}; expected {features.shape[:-1]} '
                     '(features without the last axis)')
  if mask.dtype != jnp.bool_:
    raise ValueError(f'{mask_name} has dtype {mask.dtype}; expected bool')
  return features, mask


# ------------------------------------------------------------------ shared pure pieces


class Allocation(NamedTuple):
  """Allocator output. Logits and shares are [..., W]; `gate` is [..., K] (None: static).

  Logits are 0 at users that are not offloaded; shares are 0 there.
  """
  b_logits: Array
  f_logits: Array
  b_share: Array
  f_share: Array
  gate: Array | None


def masked_softmax(logits: Array, mask: Array) -> Array:
  """Softmax over the last axis restricted to `mask`; 0 outside it and when it is empty."""
  any_on = mask.any(-1, keepdims=True)
  top = jnp.max(jnp.where(mask, logits, -jnp.inf), -1, keepdims=True)
  top = jnp.where(any_on, top, 0.0)
  e = jnp.where(mask, jnp.exp(jnp.where(mask, logits - top, 0.0)), 0.0)
  total = e.sum(-1, keepdims=True)
  return e / jnp.where(any_on, total, 1.0)


def pool_offloaded(features: Array, mask: Array, max_users: int) -> Array:
  """z = [mean, max, count / max_users] over the offloaded users: [..., 2 F + 1]."""
  m = mask[..., None]
  count = mask.sum(-1, keepdims=True).astype(features.dtype)
  mean = jnp.where(m, features, 0.0).sum(-2) / jnp.maximum(count, 1.0)
  top = jnp.max(jnp.where(m, features, -jnp.inf), -2)
  top = jnp.where(count > 0, top, 0.0)
  return jnp.concatenate([mean, top, count / max_users], -1)


def top_k_mask(logits: Array, k: Array) -> Array:
  """True for the k largest logits on the last axis (ties: lower index); vmappable in k.

  Rank by pairwise comparison rather than a sort: K is small and this has no
  data-dependent shape, so a traced or batched k works.
  """
  n = logits.shape[-1]
  above = logits[..., None, :] > logits[..., :, None]      # [..., i, j]: j beats i
  tied_before = (logits[..., None, :] == logits[..., :, None]) & (
      jnp.arange(n)[None, :] < jnp.arange(n)[:, None])
  rank = (above | tied_before).sum(-1)
  return rank < jnp.asarray(k)[..., None]


def _act(x: Array, config: ModelConfig) -> Array:
  return jax.nn.leaky_relu(x, config.leaky_slope)


def _expert_layers(layers, x: Array, config: ModelConfig) -> list[Array]:
  """Runs experts stacked on axis 0 of every kernel: every layer's output [E, ..., W, H].

  `layers` is [(kernel [E, D_in, D_out], bias [E, D_out]), ...]; both paths use this,
  the batched one with all K experts, the per-slot one with the k gathered ones. Every
  user row of the batch goes through one matmul per expert and layer, with the expert
  axis leading: about a fifth faster on CPU than keeping it beside the user axis.
  """
  kernel, bias = layers[0]
  h = _act(jnp.einsum('nf,efh->enh', x.reshape(-1, x.shape[-1]), kernel)
           + bias[:, None, :], config)
  outs = [h]
  for kernel, bias in layers[1:]:
    h = _act(jnp.einsum('enh,ehj->enj', h, kernel) + bias[:, None, :], config)
    outs.append(h)
  return [h.reshape((h.shape[0],) + x.shape[:-1] + (h.shape[-1],)) for h in outs]


def _heads(p: dict, y: Array, mask: Array, gate: Array | None, l=None) -> Allocation:
  """Both heads on y [..., W, H]; with per-depth heads (kernels [L, H]) the kernels of
  depth `l` (an int, or int32 [...] per slot)."""
  def head(kernel):
    if kernel.ndim == 1:
      return y @ kernel
    kernel = kernel[jnp.clip(jnp.asarray(l) - 1, 0, kernel.shape[0] - 1)]  # [..., H]
    return jnp.einsum('...wh,...h->...w', y, kernel)
  b_logits = jnp.where(mask, head(p['head_b_kernel']), 0.0)
  f_logits = jnp.where(mask, head(p['head_f_kernel']), 0.0)
  return Allocation(b_logits, f_logits, masked_softmax(b_logits, mask),
                    masked_softmax(f_logits, mask), gate)


def _poison(out: Allocation, valid: Array) -> Allocation:
  """NaN everywhere for a traced (k, l) out of range: never a silently clipped value."""
  return jax.tree.map(lambda a: jnp.where(valid[..., None], a, jnp.nan), out)


def _layer_names(depth: int) -> list[tuple[str, str]]:
  return [(f'layer{i}_kernel', f'layer{i}_bias') for i in range(1, depth + 1)]


def _unwrap(variables: dict) -> dict:
  return variables['params'] if 'params' in variables else variables


def _gate_logits(p: dict, z: Array, noise_key, config: ModelConfig) -> Array:
  h = z @ p['gate_kernel']
  if noise_key is not None and config.gate_noise:
    eps = jax.random.normal(noise_key, h.shape, h.dtype)
    h = h + eps * jax.nn.softplus(z @ p['noise_kernel'])
  return h


def _expert_init():
  # One fan-in per expert: the expert axis is a batch axis for the initializer.
  return nn.initializers.lecun_normal(batch_axis=(0,))


def _vector_init(size: int):
  return nn.initializers.normal(stddev=1.0 / math.sqrt(size))


# ------------------------------------------------------------------- batched path


def moe_forward(config: ModelConfig, variables: dict, features: Array, offload_mask: Array,
                k: Array, l: Array, noise_key=None) -> Allocation:
  """Batched path on checked inputs (see `MoEAllocator`); k, l ints, maybe traced.

  No input checks here: call `MoEAllocator.apply` (or `check_inputs` and `check_kl`
  first) unless the inputs are known good, e.g. inside a training step.
  """
  p = _unwrap(variables)
  k, l = jnp.asarray(k, jnp.int32), jnp.asarray(l, jnp.int32)
  valid = kl_valid(config, k, l)
  z = pool_offloaded(features, offload_mask, config.max_users)
  h = _gate_logits(p, z, noise_key, config)
  gate = masked_softmax(h, top_k_mask(h, k))
  layers = [(p[kn], p[bn]) for kn, bn in _layer_names(config.max_depth)]
  outs = _expert_layers(layers, expert_input(config, features, z), config)  # [E, ..., W, H]
  depth = l[None, ..., None, None]
  chosen = outs[0]
  for i, out in enumerate(outs[1:], start=2):
    chosen = jnp.where(depth == i, out, chosen)  # where: no gradient to deeper layers
  y = jnp.einsum('...e,e...wh->...wh', gate, chosen)
  return _poison(_heads(p, y, offload_mask, gate, l), valid)


class MoEAllocator(nn.Module):
  """The allocation DyNN; `__call__(features, offload_mask, k=K, l=L, noise_key=None)`.

  features [..., W, 5] (normalized_features), offload_mask bool [..., W] (offloaded and
  real). Parameters: gate_kernel [11, K], noise_kernel [11, K] (if gate_noise),
  layer{i}_kernel [K, D_in, width] and layer{i}_bias [K, width] for i = 1..L,
  head_b_kernel and head_f_kernel [width] ([L, width] with `depth_heads`).
  """
  config: ModelConfig

  @nn.compact
  def __call__(self, features, offload_mask, k=None, l=None, noise_key=None) -> Allocation:
    config = self.config
    features, offload_mask = check_inputs(config, features, offload_mask)
    k, l, _ = check_kl(config, k, l, features.shape[:-2])
    K, width = config.num_experts, config.width
    p = {'gate_kernel': self.param('gate_kernel', nn.initializers.lecun_normal(),
                                   (POOLED_DIM, K))}
    if config.gate_noise:
      p['noise_kernel'] = self.param('noise_kernel', nn.initializers.lecun_normal(),
                                     (POOLED_DIM, K))
    for (kn, bn), (d_in, d_out) in zip(_layer_names(config.max_depth), config.expert_dims):
      p[kn] = self.param(kn, _expert_init(), (K, d_in, d_out))
      p[bn] = self.param(bn, nn.initializers.zeros, (K, d_out))
    heads = (config.max_depth, width) if config.depth_heads else (width,)
    for name in ('head_b_kernel', 'head_f_kernel'):
      p[name] = self.param(name, _vector_init(width), heads)
    return moe_forward(config, p, features, offload_mask, k, l, noise_key)


def all_subnetworks(config: ModelConfig, variables: dict, features: Array,
                    offload_mask: Array) -> Allocation:
  """Every (k, l) at once (batched path, no noise): outputs with leading axes [K, L]."""
  model = MoEAllocator(config)
  ks = jnp.arange(1, config.num_experts + 1)
  ls = jnp.arange(1, config.max_depth + 1)
  run = lambda k, l: model.apply(variables, features, offload_mask, k, l)
  return jax.vmap(jax.vmap(run, (None, 0)), (0, None))(ks, ls)


# ------------------------------------------------------------------- per-slot path


def _per_slot_one(config: ModelConfig, k: int, l: int, p: dict, features: Array,
                  mask: Array) -> Allocation:
  z = pool_offloaded(features, mask, config.max_users)
  h = z @ p['gate_kernel']  # inference: eps = 0, the noise branch is not run
  top, idx = jax.lax.top_k(h, k)
  weights = jax.nn.softmax(top)
  gate = jnp.zeros_like(h).at[idx].set(weights)
  layers = [(p[kn][idx], p[bn][idx]) for kn, bn in _layer_names(l)]
  y = jnp.einsum('e,ewh->wh', weights,
                 _expert_layers(layers, expert_input(config, features, z), config)[-1])
  return _heads(p, y, mask, gate, l)


def per_slot_forward(config: ModelConfig, k: int, l: int, variables: dict, features: Array,
                     offload_mask: Array) -> Allocation:
  """Per-slot path for a static (k, l): only k experts and l layers are computed.

  Leading batch axes are vmapped; they share (k, l), so the work is still skipped.
  """
  k, l = check_static_kl(config, k, l)
  features, offload_mask = check_inputs(config, features, offload_mask)
  run = functools.partial(_per_slot_one, config, k, l, _unwrap(variables))
  for _ in range(features.ndim - 2):
    run = jax.vmap(run)
  return run(features, offload_mask)


_TRACES: collections.Counter = collections.Counter()


def per_slot_trace_count(config: ModelConfig, k: int, l: int) -> int:
  """How many times the `per_slot_apply(config, k, l)` variant has been traced."""
  return _TRACES[(config, k, l)]


def switch_trace_count(config: ModelConfig) -> int:
  """How many times the `switch_apply(config)` dispatcher has been traced."""
  return _TRACES[(config, 'switch')]


def per_slot_apply(config: ModelConfig, k: int, l: int):
  """The cached, jitted per-slot variant `f(variables, features, offload_mask)`.

  One jit per (config, k, l), built on first use; it retraces only for a new shape or
  dtype. AOT: `per_slot_apply(c, k, l).lower(variables, features, mask).compile()`.
  """
  return _per_slot_jit(config, *check_static_kl(config, k, l))


@functools.lru_cache(maxsize=None)
def _per_slot_jit(config: ModelConfig, k: int, l: int):
  def run(variables, features, offload_mask):
    _TRACES[(config, k, l)] += 1  # runs at trace time only
    return per_slot_forward(config, k, l, variables, features, offload_mask)

  return jax.jit(run)


@functools.lru_cache(maxsize=None)
def switch_apply(config: ModelConfig):
  """Jitted `f(variables, features, offload_mask, k, l)` with k, l int32 scalars.

  `lax.switch` on the option index runs only the chosen variant when k, l are
  unbatched; under `vmap` over k or l it runs all K * L branches (a select). Traced
  out-of-range (k, l) give NaN; concrete ones raise. `.jitted` is the underlying jitted
  function (int32 k, l, no checks) for AOT lowering.
  """
  options = [(k, l) for k in range(1, config.num_experts + 1)
             for l in range(1, config.max_depth + 1)]

  def run(variables, features, offload_mask, k, l):
    _TRACES[(config, 'switch')] += 1  # runs at trace time only
    valid = kl_valid(config, k, l)
    branches = [functools.partial(per_slot_forward, config, kk, ll) for kk, ll in options]
    index = jnp.where(valid, kl_to_option(k, l, config), 0)
    return _poison(jax.lax.switch(index, branches, variables, features, offload_mask), valid)

  jitted = jax.jit(run)

  def call(variables, features, offload_mask, k, l):
    k, l, _ = check_kl(config, k, l)
    return jitted(variables, features, offload_mask, k, l)

  call.jitted = jitted
  return call


def exit_sorted_trace_count(config: ModelConfig) -> int:
  """How many times `exit_sorted_apply(config, ...)` has been traced (any block size)."""
  return _TRACES[(config, 'exit_sorted')]


EXIT_SORTED_BLOCK = 16  # measured: see the module docstring


def exit_sorted_apply(config: ModelConfig, variables: dict, features: Array,
                      offload_mask: Array, k, l, *, block: int = EXIT_SORTED_BLOCK
                      ) -> Allocation:
  """Exit-sorted batched inference on device: every slot runs only its own exit (k, l).

  features [B, W, 5], offload_mask bool [B, W], k and l int [B] (or scalars), concrete
  or traced; config and block are static. Slots are sorted by option, each option's
  group is padded to whole blocks of `block` slots, and a `lax.map` over the blocks
  `lax.switch`es on the block's (unbatched) option to the per-slot variant of that
  exit vmapped over the block; empty blocks take a branch that computes nothing. Same
  `Allocation` as `moe_forward` to float rounding; concrete (k, l) out of range raise,
  traced ones give NaN for their slots. Cost: ceil(B / block) + K * L - 1 block steps
  at most, a compile of all K * L variants, no host round trip (see the module
  docstring for when this beats the masked path).
  """
  if not ((_is_int(block) or isinstance(block, np.integer)) and block >= 1):
    raise ValueError(f'block = {block!r}; must be a positive integer (slots per block)')
  features, offload_mask = check_inputs(config, features, offload_mask)
  if features.ndim != 3:
    raise ValueError(f'features have shape {features.shape}; expected [B, W, '
                     f'{NUM_FEATURES}] (one batch axis)')
  batch = features.shape[:1]
  k, l, _ = check_kl(config, k, l, batch)
  k, l = jnp.broadcast_to(k, batch), jnp.broadcast_to(l, batch)
  return _exit_sorted_jit(config, int(block))(variables, features, offload_mask, k, l)


@functools.lru_cache(maxsize=None)
def _exit_sorted_jit(config: ModelConfig, block: int):
  options = [(k, l) for k in range(1, config.num_experts + 1)
             for l in range(1, config.max_depth + 1)]
  num = len(options)

  def variant(kk, ll):
    return jax.vmap(functools.partial(_per_slot_one, config, kk, ll), (None, 0, 0))

  def run(variables, features, offload_mask, k, l):
    _TRACES[(config, 'exit_sorted')] += 1  # runs at trace time only
    p = _unwrap(variables)
    size = k.shape[0]
    if size == 0:  # the gathers below need a slot to point padding at
      shapes = jax.eval_shape(variant(1, 1), p, features, offload_mask)
      return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    valid = kl_valid(config, k, l)
    option = jnp.where(valid, kl_to_option(k, l, config), 0)  # bad slots: NaN below
    order = jnp.argsort(option, stable=True).astype(jnp.int32)
    counts = jnp.bincount(option, length=num).astype(jnp.int32)
    group_blocks = (counts + block - 1) // block
    block_end = jnp.cumsum(group_blocks)
    block_start = block_end - group_blocks
    slot_start = jnp.cumsum(counts) - counts
    # sum_g ceil(c_g / block) <= ceil(B / block) + (groups with a remainder) - 1.
    n_blocks = max(-(-size // block) + num - 1, 1)

    b = jnp.arange(n_blocks, dtype=jnp.int32)
    group = jnp.searchsorted(block_end, b, side='right').astype(jnp.int32)
    live_block = group < num
    g = jnp.minimum(group, num - 1)
    offset = (b - block_start[g])[:, None] * block + jnp.arange(block, dtype=jnp.int32)
    live = live_block[:, None] & (offset < counts[g][:, None])
    # Padding reads the group's first slot: real inputs, never read back below.
    sorted_at = jnp.where(live, slot_start[g][:, None] + offset, slot_start[g][:, None])
    block_slots = order[jnp.clip(sorted_at, 0, size - 1)]
    block_option = jnp.where(live_block, group, num)  # num: the empty branch

    branches = [variant(kk, ll) for kk, ll in options]
    f0 = jnp.zeros((block,) + features.shape[1:], features.dtype)
    m0 = jnp.zeros((block,) + offload_mask.shape[1:], offload_mask.dtype)
    shapes = jax.eval_shape(branches[0], p, f0, m0)
    branches.append(lambda p, f, m: jax.tree.map(
        lambda s: jnp.zeros(s.shape, s.dtype), shapes))

    def step(xs):
      opt, slots = xs
      return jax.lax.switch(opt, branches, p, features[slots], offload_mask[slots])

    out = jax.lax.map(step, (block_option, block_slots))  # leaves [n_blocks, block, ...]
    # Each slot has exactly one live position in the padded layout: gather it back.
    rank = jnp.arange(size, dtype=jnp.int32) - slot_start[option[order]]
    position = jnp.zeros(size, jnp.int32).at[order].set(
        block_start[option[order]] * block + rank)
    flat = jax.tree.map(lambda a: a.reshape((n_blocks * block,) + a.shape[2:])[position],
                        out)
    return _poison(flat, valid)

  return jax.jit(run)


def allocate(out: Allocation, offload_mask: Array, mec_config: MECConfig) -> Decision:
  """Shares -> `Decision`: b = b_share * b_max, f = f_share * f_ser, x = offload_mask."""
  return decision_from_shares(offload_mask, out.b_share, out.f_share, mec_config)


# ------------------------------------------------------------------- static baseline


class StaticAllocator(nn.Module):
  """One MLP of the deepest expert's shape (`static_width` units), the same two heads.

  `__call__(features, offload_mask) -> Allocation` with `gate = None`. Parameters:
  layer{i}_kernel [D_in, static_width], layer{i}_bias, head_b_kernel, head_f_kernel.
  """
  config: ModelConfig

  @nn.compact
  def __call__(self, features, offload_mask) -> Allocation:
    config = self.config
    features, offload_mask = check_inputs(config, features, offload_mask)
    layers = []
    for (kn, bn), (d_in, d_out) in zip(_layer_names(config.max_depth), config.static_dims):
      kernel = self.param(kn, nn.initializers.lecun_normal(), (d_in, d_out))
      bias = self.param(bn, nn.initializers.zeros, (d_out,))
      layers.append((kernel[None], bias[None]))  # an expert stack of one
    p = {name: self.param(name, _vector_init(config.static_width), (config.static_width,))
         for name in ('head_b_kernel', 'head_f_kernel')}
    z = pool_offloaded(features, offload_mask, config.max_users)
    y = _expert_layers(layers, expert_input(config, features, z), config)[-1][0]
    return _heads(p, y, offload_mask, None)


# ------------------------------------------------------------ scheduler and policy


class SchedulerOutput(NamedTuple):
  logits: Array  # [..., W]; meaningful for real users only
  prob: Array    # [..., W] offload probability, 0 for padded users


def system_context(choice: str, mec, reference) -> Array:
  """A network's system inputs [C] (C = 0 for 'none'): the log of each field of
  SCHEDULER_CONTEXTS[choice] relative to its value in `reference`, the system the
  features are normalised by, so 0 there. `mec` is a MECConfig or EnvParams (scalar
  leaves, or leaves with a batch shape [...] giving [..., C])."""
  fields = SCHEDULER_CONTEXTS[choice]
  if not fields:
    return jnp.zeros((0,))
  return jnp.stack([jnp.log(jnp.asarray(getattr(mec, name)) / getattr(reference, name))
                    for name in fields], -1)


def scheduler_context(config: ModelConfig, mec, reference) -> Array:
  """The scheduler's system inputs (`system_context` of `config.scheduler_context`)."""
  return system_context(config.scheduler_context, mec, reference)


def policy_context(config: ModelConfig, mec, reference) -> Array:
  """The policy's system inputs (`system_context` of `config.policy_context`)."""
  return system_context(config.policy_context, mec, reference)


def _with_context(name: str, inputs: Array, choice: str, context) -> Array:
  """`inputs` [..., D] with the context [C] or [..., C] appended on the last axis
  (broadcast over the axes it lacks); None means zeros (the features' own system)."""
  extra = len(SCHEDULER_CONTEXTS[choice])
  if not extra:
    return inputs
  context = (jnp.zeros((extra,), inputs.dtype) if context is None
             else jnp.asarray(context, inputs.dtype))
  if context.shape[-1:] != (extra,):
    raise ValueError(f'{name} context: shape {context.shape}, expected [..., {extra}] '
                     f'({choice!r})')
  if context.ndim > 1 and context.ndim < inputs.ndim:
    context = context.reshape(context.shape[:-1] + (1,) * (inputs.ndim - context.ndim)
                              + context.shape[-1:])
  context = jnp.broadcast_to(context, inputs.shape[:-1] + (extra,))
  return jnp.concatenate([inputs, context], -1)


def scheduler_inputs(config: ModelConfig) -> int:
  return NUM_FEATURES + len(SCHEDULER_CONTEXTS[config.scheduler_context])


def policy_inputs(config: ModelConfig) -> int:
  return POOLED_DIM + len(SCHEDULER_CONTEXTS[config.policy_context])


class Scheduler(nn.Module):
  """Per-user MLP (5 + C -> scheduler_hidden -> 1, LeakyReLU) giving offload
  probabilities.

  `__call__(features, user_mask, context=None) -> SchedulerOutput`; each user sees its
  own features and the slot's system inputs `context` ([C] or [..., C], from
  `scheduler_context`; None means the features' own system, zeros), so any N works.
  Parameters: hidden/{kernel, bias}, out/{kernel, bias}.
  """
  config: ModelConfig

  @nn.compact
  def __call__(self, features, user_mask, context=None) -> SchedulerOutput:
    config = self.config
    features, user_mask = check_inputs(config, features, user_mask, 'user_mask')
    if context is not None and jnp.ndim(context) > 1:
      context = jnp.asarray(context)[..., None, :]   # a slot's context, for its users
    features = _with_context('Scheduler', features, config.scheduler_context, context)
    h = _act(nn.Dense(config.scheduler_hidden, name='hidden')(features), config)
    logits = nn.Dense(1, name='out')(h)[..., 0]
    return SchedulerOutput(logits, jnp.where(user_mask, jax.nn.sigmoid(logits), 0.0))


class Policy(nn.Module):
  """MLP (pooled z [+ context] -> policy_hidden -> K * L) over the offloaded users'
  features.

  `__call__(features, offload_mask, context=None) -> logits [..., K * L]` (context: see
  `policy_context`; None means the features' own system), option = (k-1) * L + (l-1),
  so `logits.reshape(..., K, L)[k - 1, l - 1]` is option (k, l). Reads the same pooled
  summary as the gate (`pool_offloaded`). Parameters: hidden/{kernel, bias},
  out/{kernel, bias}.
  """
  config: ModelConfig

  @nn.compact
  def __call__(self, features, offload_mask, context=None) -> Array:
    config = self.config
    features, offload_mask = check_inputs(config, features, offload_mask)
    z = pool_offloaded(features, offload_mask, config.max_users)
    z = _with_context('Policy', z, config.policy_context, context)
    h = _act(nn.Dense(config.policy_hidden, name='hidden')(z), config)
    return nn.Dense(config.num_options, name='out')(h)


def _check_concrete_range(name: str, value, low: int, high: int, what: str) -> None:
  """Concrete values outside [low, high] raise ValueError; traced ones cannot be read."""
  if isinstance(value, jax.core.Tracer):
    return
  concrete = np.asarray(value)
  if concrete.size and (concrete.min() < low or concrete.max() > high):
    bad = concrete[(concrete < low) | (concrete > high)].ravel()[0].item()
    raise ValueError(f'{name} = {bad!r} is out of range; allowed range [{low}, {high}] '
                     f'({what})')


def option_to_kl(option, config: ModelConfig) -> tuple[Array, Array]:
  """Option index in [0, K * L) -> (k, l), both 1-based int32; works on arrays.

  Concrete options out of range raise ValueError; traced ones map to out-of-range
  (k, l), which the allocator paths turn into NaN.
  """
  _check_concrete_range('option', option, 0, config.num_options - 1,
                        f'0..K*L-1 = 0..{config.num_options - 1}')
  option = jnp.asarray(option, jnp.int32)
  return option // config.max_depth + 1, option % config.max_depth + 1


def kl_to_option(k, l, config: ModelConfig) -> Array:
  """(k, l), 1-based -> option index (k - 1) * L + (l - 1).

  Concrete k outside 1..K or l outside 1..L raise ValueError (otherwise a bad pair could
  alias a valid option); traced ones pass unchecked.
  """
  _check_concrete_range('k', k, 1, config.num_experts,
                        f'1..ModelConfig.num_experts={config.num_experts}')
  _check_concrete_range('l', l, 1, config.max_depth,
                        f'1..ModelConfig.max_depth={config.max_depth}')
  return (jnp.asarray(k, jnp.int32) - 1) * config.max_depth + jnp.asarray(l, jnp.int32) - 1


def choose_kl(policy_logits: Array, config: ModelConfig) -> tuple[Array, Array]:
  """The greedy (k, l) of the policy's logits [..., K * L]."""
  return option_to_kl(jnp.argmax(policy_logits, -1), config)
