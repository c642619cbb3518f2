"""The training loop: every phase is a sequence of jit-compiled *chunks*, each
`steps_per_call` steps of a `steps` function under `lax.scan`, with fresh slots sampled
on device every step. The key of step t is `fold_in(phase_key, t)`, so a run resumed
from a checkpoint at any chunk boundary ends with exactly the parameters of an
uninterrupted run.

A chunk donates the state it is given (its buffers become the returned state's): the
loop never reads a state after passing it to the next chunk, and copies the state it
starts from, which may share buffers with the caller's arguments.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dynn_jax.config import MECConfig
from dynn_jax.models import (ModelConfig, MoEAllocator, Policy, Scheduler, StaticAllocator,
                             choose_kl)
from dynn_jax.networks import Params, init_params, load_allocators
from dynn_jax.runs import Progress, RunDir
from dynn_jax.training.config import (TrainConfig, alloc_learning_rate, check_scheduler_training,
                                      phase_key, training_delay)
from dynn_jax.training.steps import (JointState, TrainState, allocator_step, joint_step,
                                     moe_apply, policy_step, static_apply)

Array = jax.Array


class TrainingDiverged(ValueError):
  """A loss or metric of a training chunk was NaN or infinite."""


def chunked_phase(name: str, run: RunDir | None, state: Any, total: int,
                  train: TrainConfig, chunk: Callable,
                  on_chunk: Callable[[int, Any], bool | None] | None = None) -> Any:
  """Runs `chunk` until `total` steps, resuming and checkpointing through `run`.

  `on_chunk(step, state)` runs after every chunk (e.g. a quality check); returning
  True ends the phase there. Its `state` is valid during the call only: the next chunk
  donates it. With `run`, the phase holds the run directory's lock, and metrics logged
  after the restored checkpoint (by a run killed between checkpoints) are dropped
  before they are logged again.
  """
  if run is not None and not run.holds_lock:
    with run.locked():
      return chunked_phase(name, run, state, total, train, chunk, on_chunk)
  if run is not None:
    restored = run.restore(name, state)
    if restored is not None:
      state = restored
    run.rewind_metrics(name, int(state.step))
  state = jax.tree.map(jnp.copy, state)
  done = int(state.step)
  progress = Progress(name, total, start_step=done)
  chunks = 0
  while done < total:
    steps = min(train.steps_per_call, total - done)
    state, metrics = chunk(state, steps)
    done = int(state.step)
    chunks += 1
    metrics = {k: float(np.mean(v)) for k, v in jax.device_get(metrics).items()}
    bad = sorted(k for k, v in metrics.items() if not math.isfinite(v))
    if bad:
      # Nothing of this chunk is logged or saved: the last checkpoint stays the last
      # good state, and no networks are written from NaN parameters.
      raise TrainingDiverged(f'phase {name!r} diverged: non-finite {", ".join(bad)} in the '
                             f'chunk ending at step {done} (lower the learning rate, e.g. '
                             '--alloc_lr / --policy_lr / --scheduler_lr)')
    if run is not None:
      run.log({'phase': name, 'step': done, 'time': time.time(), **metrics})
    stop = on_chunk is not None and bool(on_chunk(done, state))
    progress.update(done, force=done >= total or stop, **metrics)
    if run is not None and (chunks % train.checkpoint_every == 0 or done >= total or stop):
      run.save(name, state)
    if stop:
      break
  return state


def scan_chunk(step_fn: Callable, key: Array, donate: bool = False):
  """(state, steps) -> (state, metrics): `step_fn(state, step_key)` `steps` times under
  scan. With `donate`, the state passed in is consumed (see the module docstring)."""
  def chunk(state, steps_array):
    def body(state, _):
      return step_fn(state, jax.random.fold_in(key, state.step))
    return jax.lax.scan(body, state, steps_array)

  compiled = jax.jit(chunk, donate_argnums=0 if donate else ())
  # The scan length is static: a short final chunk is a second (and last) compile.
  return lambda state, steps: compiled(state, jnp.zeros((steps,)))


def train_allocator(mec: MECConfig, model: ModelConfig, train: TrainConfig,
                    run: RunDir | None = None, params: Any = None,
                    name: str = 'allocator', static: bool = False,
                    on_chunk: Callable[[int, Any], bool | None] | None = None,
                    delay: Any = None) -> Any:
  """Trains the DyNN (or the static baseline) and returns its parameters."""
  key = phase_key(train.seed, name)
  module = StaticAllocator(model) if static else MoEAllocator(model)
  if params is None:
    params = init_params(module, jax.random.fold_in(key, 0), mec)
  apply = static_apply(model) if static else moe_apply(model)
  total = train.static_steps if static else train.alloc_steps
  tx = optax.adam(alloc_learning_rate(train, total))
  step = allocator_step(apply, tx, mec, train, model, dynamic=not static, total=total,
                        delay=delay)
  chunk = scan_chunk(step, jax.random.fold_in(key, 1), donate=True)
  return chunked_phase(name, run, TrainState.create(tx, params), total, train, chunk,
                       on_chunk).params


def tune_allocator(mec: MECConfig, model: ModelConfig, train: TrainConfig, alloc_params: Any,
                   policy_params: Any, run: RunDir | None = None, name: str = 'tune',
                   delay: Any = None) -> Any:
  """`train.tune_steps` allocator steps where half of each batch trains the exit the
  policy picks for each slot, as at inference, and the other half the exits of the end
  of the schedule, with the miss temperature at its final value.

  Progressive shrinking spreads the updates over every exit, and the exits share
  weights; the policy ends up using few of them, and these gain from updates of their
  own. Training only those made the exits it did not pick worse (the full network by
  +2% on the objective), so the schedule's exits keep their half.
  """
  key = phase_key(train.seed, name)
  policy = Policy(model)

  def exits(feats, x):
    # The policy at the training system: its context is zero there.
    return choose_kl(policy.apply({'params': policy_params}, feats, x), model)

  settled = train.replace(miss_temperature_start=train.miss_temperature_end)
  tx = optax.adam(alloc_learning_rate(train, train.tune_steps))
  step = allocator_step(moe_apply(model), tx, mec, settled, model, dynamic=True,
                        total=train.tune_steps, exits=exits, delay=delay)
  chunk = scan_chunk(step, jax.random.fold_in(key, 1), donate=True)
  return chunked_phase(name, run, TrainState.create(tx, alloc_params), train.tune_steps,
                       train, chunk).params


def train_policy(mec: MECConfig, model: ModelConfig, train: TrainConfig, alloc_params: Any,
                 run: RunDir | None = None, delay: Any = None, name: str = 'policy') -> Any:
  """Pre-trains the policy on slots with every task offloaded."""
  key = phase_key(train.seed, name)
  params = init_params(Policy(model), jax.random.fold_in(key, 0), mec)
  tx = optax.adam(train.policy_lr)
  step = policy_step(tx, mec, model, train, alloc_params, delay)
  chunk = scan_chunk(step, jax.random.fold_in(key, 1), donate=True)
  return chunked_phase(name, run, TrainState.create(tx, params), train.policy_steps, train,
                       chunk).params


def train_joint(mec: MECConfig, model: ModelConfig, train: TrainConfig, alloc_params: Any,
                policy_params: Any, run: RunDir | None = None,
                delay: Any = None, name: str = 'joint'
                ) -> tuple[Any, Any]:
  """Case 2: the scheduler and the policy trained together, allocator frozen."""
  key = phase_key(train.seed, name)
  sched_params = init_params(Scheduler(model), jax.random.fold_in(key, 0), mec)
  tx_s, tx_p = optax.adam(train.scheduler_lr), optax.adam(train.policy_lr)
  step = joint_step(tx_s, tx_p, mec, model, train, alloc_params, delay)
  state = JointState(TrainState.create(tx_s, sched_params),
                     TrainState.create(tx_p, policy_params), jnp.int32(0))
  chunk = scan_chunk(step, jax.random.fold_in(key, 1), donate=True)
  state = chunked_phase(name, run, state, train.joint_steps, train, chunk)
  return state.scheduler.params, state.policy.params


def train_all(mec: MECConfig, model: ModelConfig, train: TrainConfig,
              run: RunDir | None = None) -> Params:
  """Allocator, static baseline, policy and (case 2) scheduler, in the paper's order;
  with `tune_steps`, the exits the policy picks are tuned after the policy, which is
  then trained again (phases 'tune' and 'policy_tuned')."""
  check_scheduler_training(model, train)
  delay = training_delay(model, mec, train)
  if train.allocator_from:
    allocator, static = load_allocators(train.allocator_from, model, train.loss)
  else:
    allocator = train_allocator(mec, model, train, run, delay=delay)
    static = (train_allocator(mec, model, train, run, name='static', static=True,
                              delay=delay) if train.static_steps else None)
  policy = (train_policy(mec, model, train, allocator, run, delay=delay)
            if train.policy_steps else None)
  if train.tune_steps:
    allocator = tune_allocator(mec, model, train, allocator, policy, run, delay=delay)
    policy = train_policy(mec, model, train, allocator, run, delay=delay, name='policy_tuned')
  scheduler = None
  if mec.case == 2 and train.joint_steps:
    if policy is None:
      policy = init_params(Policy(model), phase_key(train.seed, 'policy'), mec)
    scheduler, policy = train_joint(mec, model, train, allocator, policy, run, delay=delay)
  return Params(allocator=allocator, static=static, policy=policy, scheduler=scheduler)
