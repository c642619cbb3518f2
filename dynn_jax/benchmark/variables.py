"""Network variables for the timing suites: trained where given, random elsewhere.

Latency does not depend on parameter values, so the exits suite, the block sweep and
the profile time random networks of the right shapes unless trained ones are given.
Owns `network_variables`; it must not be used where results depend on the values
(the evaluation suite takes trained networks).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from dynn_jax.config import MECConfig
from dynn_jax.env import normalized_features, sample_slots
from dynn_jax.models import ModelConfig, MoEAllocator, Policy, Scheduler, StaticAllocator

Array = jax.Array


def network_variables(mec: MECConfig, model: ModelConfig, seed: int = 0,
                      params=None) -> tuple[dict, dict]:
  """({name: flax variables}, {name: 'trained' | 'random'}) for the four networks.

  Latency does not depend on the parameter values, so networks missing from `params`
  (a `dynn_jax.evaluation.Params`, or None) get random ones: N(0, 1 / fan_in), finite
  and of a trained network's scale (no subnormals to slow the CPU down). They come from
  the modules' parameter shapes (`jax.eval_shape`), not from `init`, whose compile
  takes seconds for the allocator.
  """
  slots = sample_slots(jax.random.PRNGKey(0), mec)
  feats = normalized_features(slots, mec)
  modules = {'allocator': MoEAllocator(model), 'static': StaticAllocator(model),
             'policy': Policy(model), 'scheduler': Scheduler(model)}
  rng = np.random.default_rng(seed)
  variables, sources = {}, {}
  for name, module in modules.items():
    trained = None if params is None else getattr(params, name)
    if trained is not None:
      variables[name], sources[name] = {'params': trained}, 'trained'
      continue
    shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), feats, slots.mask)
    variables[name] = jax.tree.map(lambda leaf: _random_leaf(rng, leaf), shapes)
    sources[name] = 'random'
  return variables, sources


def _random_leaf(rng: np.random.Generator, leaf) -> Array:
  fan_in = leaf.shape[-2] if len(leaf.shape) >= 2 else leaf.shape[0]
  values = rng.normal(0.0, 1.0 / np.sqrt(max(fan_in, 1)), leaf.shape)
  return jnp.asarray(values, leaf.dtype)
