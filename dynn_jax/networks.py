"""Trained networks: their parameters, the configs they belong to, init / save / load.

A `Networks` value is what a training run produces and what evaluation, the benchmark
and the reproduction consume: `Params` (the four networks' parameters, None where one
was not trained), the `MECConfig` it was trained on (whose ranges normalise its
features), the `ModelConfig` of its sizes and the loss that trained it. One msgpack
file holds it (`save_networks` / `Networks.load`), checksummed (`io.seal`) so that a
file damaged after it was written is refused on load. This module must not depend on
training: a launcher that only reads networks does not import optax.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import serialization

from dynn_jax.config import MECConfig
from dynn_jax.env import normalized_features, sample_slots
from dynn_jax.io import seal, tree_digest, unseal, write_bytes_atomic
from dynn_jax.models import ModelConfig, MoEAllocator, Policy, Scheduler, StaticAllocator
from dynn_jax.rl.agent import agent_module

NETWORKS_FORMAT = 1
# The losses a network can be trained with (see dynn_jax.training).
LOSSES = ('paper', 'objective')


class Params(NamedTuple):
  """Trained parameters (None where a network was not trained)."""
  allocator: Any = None
  static: Any = None
  policy: Any = None
  scheduler: Any = None
  # The RL agent of launch/train_rl.py (dynn_jax.rl); files written before it load
  # without it (None).
  agent: Any = None


def init_params(module, key: jax.Array, mec: MECConfig, *args) -> Any:
  """Fresh parameters of a flax module of `dynn_jax.models` for this system's width."""
  slots = sample_slots(jax.random.PRNGKey(0), mec, 1)
  feats = normalized_features(slots, mec)
  return module.init(key, feats, slots.mask, *args)['params']


@dataclasses.dataclass(frozen=True)
class Networks:
  """Trained networks and what they belong to (see the module docstring)."""
  params: Params
  mec: MECConfig
  model: ModelConfig
  loss: str = 'paper'
  meta: dict = dataclasses.field(default_factory=dict, compare=False, hash=False)

  @functools.cached_property
  def fingerprint(self) -> str:
    """A digest of the parameters and configs: results cached for other networks are
    never read back as these networks' (see `dynn_jax.reproduce`)."""
    return tree_digest((self.mec, self.model, self.loss, self.params))[:16]

  @classmethod
  def load(cls, path: str, expect_mec: MECConfig | None = None,
           expect_model: ModelConfig | None = None) -> 'Networks':
    params, mec, model, meta = load_networks(path, expect_mec, expect_model)
    return cls(params, mec, model, trained_loss(meta), meta)


def save_networks(path: str, params: Params, mec: MECConfig, model: ModelConfig,
                  train) -> None:
  """One msgpack file with every trained network and the configs they belong to
  (`train`: the TrainConfig, recorded whole; its `loss` names the loss)."""
  payload = {'format': NETWORKS_FORMAT,
             'meta': json.dumps({'mec': mec.to_dict(), 'model': model.to_dict(),
                                 'train': train.to_dict()}, sort_keys=True),
             'params': {k: serialization.to_state_dict(v)
                        for k, v in params._asdict().items() if v is not None}}
  write_bytes_atomic(path, seal(serialization.msgpack_serialize(payload)))


def trained_loss(meta: dict) -> str:
  """The loss a networks file was trained with (files before `loss` existed: 'paper')."""
  return meta.get('train', {}).get('loss', 'paper')


def load_networks(path: str, expect_mec: MECConfig | None = None,
                  expect_model: ModelConfig | None = None):
  """(Params, mec, model, meta) from `save_networks`; clear errors for a missing,
  corrupt or mismatched file (the configs' fields that differ are named)."""
  if os.path.isdir(path):  # a run directory
    path = os.path.join(path, 'networks.msgpack')
  if not os.path.exists(path):
    raise FileNotFoundError(f'trained networks not found: {path} (train them with '
                            'launch/train.py, or pass another --networks)')
  with open(path, 'rb') as f:
    data = unseal(f.read(), path, 'trained networks file')
  try:
    payload = serialization.msgpack_restore(data)
    meta = json.loads(payload['meta'])
    mec, model = MECConfig.from_dict(meta['mec']), ModelConfig.from_dict(meta['model'])
  except Exception as e:  # any decoding failure means the file cannot be trusted
    raise ValueError(f'trained networks file {path} is corrupt or not a networks file: '
                     f'{type(e).__name__}: {e}') from None
  if payload.get('format') != NETWORKS_FORMAT:
    raise ValueError(f'{path}: format {payload.get("format")!r}, expected {NETWORKS_FORMAT}')
  for label, want, got in (('model', expect_model, model), ('system', expect_mec, mec)):
    if want is None:
      continue
    diff = sorted(k for k, v in want.to_dict().items() if got.to_dict().get(k) != v)
    if diff:
      raise ValueError(f'{path} was trained for a different {label} configuration; '
                       f'differing fields: ' + ', '.join(
                           f'{k} (trained {got.to_dict().get(k)!r}, asked '
                           f'{want.to_dict()[k]!r})' for k in diff))
  params = Params(**{k: jax.tree.map(jnp.asarray, v) for k, v in payload['params'].items()})
  check_params(params, mec, model, path)
  return params, mec, model, meta


def _expected_params(name: str, params: Params, mec: MECConfig, model: ModelConfig,
                     path: str):
  """The shapes and dtypes (a tree of ShapeDtypeStruct) the configs give network `name`."""
  key = jax.random.PRNGKey(0)
  if name == 'agent':  # its sizes are read from its own parameters (rl.agent_module)
    try:
      module = agent_module(params.agent, mec.case, mec.width)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
      raise ValueError(f'{path}: agent: {e}') from None
    # Its third argument is the offloading; only its shape matters here.
    offload = jnp.ones((1, mec.width), bool)
    return jax.eval_shape(lambda: init_params(module, key, mec, offload))
  module = {'allocator': MoEAllocator(model), 'static': StaticAllocator(model),
            'policy': Policy(model), 'scheduler': Scheduler(model)}[name]
  return jax.eval_shape(lambda: init_params(module, key, mec))


def check_params(params: Params, mec: MECConfig, model: ModelConfig, path: str) -> None:
  """ValueError naming the array, for a network whose arrays are not the shapes and
  dtypes its configs give, or hold a NaN or an infinity: such a file would evaluate to
  plausible numbers (a NaN policy always picks the first exit, a NaN scheduler offloads
  nobody), checksum or not."""
  for name in Params._fields:
    tree = getattr(params, name)
    if tree is None:
      continue
    want = _expected_params(name, params, mec, model, path)
    got_leaves = dict(jax.tree_util.tree_flatten_with_path(tree)[0])
    want_leaves = dict(jax.tree_util.tree_flatten_with_path(want)[0])
    for key in sorted(set(got_leaves) | set(want_leaves), key=jax.tree_util.keystr):
      where = f'{path}: {name}{jax.tree_util.keystr(key)}'
      if key not in got_leaves or key not in want_leaves:
        raise ValueError(f'{where} is {"missing" if key not in got_leaves else "unexpected"}'
                         ' for the configs the file records')
      got, spec = got_leaves[key], want_leaves[key]
      if got.shape != spec.shape or got.dtype != spec.dtype:
        raise ValueError(f'{where} has shape {got.shape} {got.dtype}; its configs give '
                         f'{spec.shape} {spec.dtype}')
      if not bool(jnp.isfinite(got).all()):
        raise ValueError(f'{where} holds NaN or infinite values: the file cannot be used')


# ModelConfig fields that shape the allocators (the DyNN and the static network): two
# configs equal on these can share trained allocators whatever their policy or scheduler.
ALLOCATOR_FIELDS = ('num_experts', 'max_depth', 'width', 'static_width', 'leaky_slope',
                    'gate_noise', 'max_users', 'depth_heads', 'expert_context')


def load_allocators(path: str, model: ModelConfig, loss: str) -> tuple[Any, Any]:
  """(allocator, static) parameters of a networks file, for a run that trains only the
  policy (and scheduler) over them: the file's allocator fields of ModelConfig and its
  loss must be this run's (ValueError naming what differs)."""
  params, _, trained, meta = load_networks(path)
  diff = [f'{k} (file {getattr(trained, k)!r}, here {getattr(model, k)!r})'
          for k in ALLOCATOR_FIELDS if getattr(trained, k) != getattr(model, k)]
  if diff:
    raise ValueError(f'{path}: its allocators were built for another model: ' + ', '.join(diff))
  if trained_loss(meta) != loss:
    raise ValueError(f'{path} was trained with loss={trained_loss(meta)!r}; this run has '
                     f'loss={loss!r}')
  if params.allocator is None:
    raise ValueError(f'{path} holds no trained allocator')
  return params.allocator, params.static
