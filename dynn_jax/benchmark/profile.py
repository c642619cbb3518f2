"""A jax.profiler trace (TensorBoard / Perfetto) of a few per-slot calls and training
steps, everything compiled beforehand so the trace shows execution, not compilation.

Owns `write_profile` and finding the files of the trace it wrote; it times nothing.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import optax

from dynn_jax import training
from dynn_jax.config import MECConfig
from dynn_jax.env import normalized_features, sample_slots
from dynn_jax.models import ModelConfig, per_slot_apply


def write_profile(profile_dir: str, mec: MECConfig, model: ModelConfig,
                  variables: dict, *, calls: int = 5, train_steps: int = 3,
                  train_batch: int = 64, seed: int = 0) -> dict:
  """A jax.profiler trace (TensorBoard / Perfetto) of per-slot calls of the smallest and
  the full exit and of a few allocator training steps, all compiled beforehand so the
  trace shows execution, not compilation. `variables`: `network_variables(...)[0]`.

  Returns the files of this trace: {'dir', 'perfetto', 'xplane'} (jax writes each trace
  to a new <profile_dir>/plugins/profile/<time> folder).
  """
  slots = sample_slots(jax.random.PRNGKey(seed), mec)
  feats, mask = normalized_features(slots, mec), slots.mask
  alloc = variables['allocator']
  exits = sorted({(1, 1), (model.num_experts, model.max_depth)})
  compiled = {kl: per_slot_apply(model, *kl).lower(alloc, feats, mask).compile()
              for kl in exits}
  train = training.TrainConfig(seed=seed, batch=train_batch)
  tx = optax.adam(train.alloc_lr)
  params = alloc['params']
  state = training.TrainState(params, tx.init(params), jnp.int32(0))
  step = training.allocator_step(training.moe_apply(model), tx, mec, train, model,
                                 dynamic=True)
  chunk = training.scan_chunk(step, jax.random.PRNGKey(seed + 1))
  for kl, fn in compiled.items():
    jax.block_until_ready(fn(alloc, feats, mask))
  jax.block_until_ready(chunk(state, 1))

  with jax.profiler.trace(profile_dir, create_perfetto_trace=True):
    for (k, l), fn in compiled.items():
      for i in range(calls):
        with jax.profiler.TraceAnnotation(f'per_slot k={k} l={l} call {i}'):
          jax.block_until_ready(fn(alloc, feats, mask))
    for i in range(train_steps):
      with jax.profiler.StepTraceAnnotation('train_allocator', step_num=i):
        state, _ = chunk(state, 1)
        jax.block_until_ready(state)
  return _trace_files(profile_dir)


def _trace_files(profile_dir: str) -> dict:
  runs = os.path.join(profile_dir, 'plugins', 'profile')
  newest = max((os.path.join(runs, d) for d in os.listdir(runs)), key=os.path.getmtime)
  files = sorted(os.listdir(newest))
  pick = lambda suffix: next((os.path.join(newest, f) for f in files if f.endswith(suffix)),
                             None)
  return {'dir': newest, 'perfetto': pick('perfetto_trace.json.gz'),
          'xplane': pick('.xplane.pb')}
