"""Inference delay: the one model that training and evaluation both read (SPEC section 2).

Three modes answer the same calls:

* `NONE` ('none'): no inference delay at all (Fig. 4's left panel: what each exit's
  allocation is worth by itself);
* `MODELLED` ('modelled'): counted ops (`dynn_jax.ops`) * cycles_per_op / f_ser
  (`modelled_seconds`, the one place ops become seconds);
* a `dynn_jax.latency.MeasuredTable` ('measured'): the median wall time of each network
  on one device, from the benchmark.

Every mode is a frozen, hashable object (a static jit argument) with

    mode.pipeline(model, mec, k, l, n_offloaded, n_users, *, policy, scheduler, static)
        -> InferenceDelay(edge, loc)      # what the users of a slot wait, [...]
    mode.solver(name, zeros) -> [...]     # a solver's own run time (0 unless measured)

and `table(mode, ...)` gives every exit's (k, l) delay at once ([..., K, L]), which the
policy's labels and the `hindsight` method read. What a pipeline *counts* (its ops) is
`ops.pipeline_ops` in every mode; only the seconds differ. Nothing here knows the
evaluation or training: they pass the mode they were given.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from dynn_jax import ops

Array = jax.Array

MODES = ('none', 'modelled', 'measured')


class InferenceDelay(NamedTuple):
  edge: Array  # s, seen by every offloaded user of the slot
  loc: Array   # s, seen by every local user of the slot


def modelled_seconds(ops, mec):
  """Server time of `ops` counted ops: cycles_per_op * ops / f_ser (s), rounded in that
  order. An array (traced too) gives an array, a Python number a Python float."""
  return mec.cycles_per_op * ops / mec.f_ser


def _scheduler_runs(mec, scheduler: bool | None) -> bool:
  return mec.case == 2 if scheduler is None else scheduler


@dataclasses.dataclass(frozen=True)
class Modelled:
  """Counted ops of the networks run, at cycles_per_op per op on the server's f_ser."""
  mode = 'modelled'

  def pipeline(self, model, mec, k, l, n_offloaded, n_users=None, *, policy: bool = True,
               scheduler: bool | None = None, static: bool = False) -> InferenceDelay:
    sched = _scheduler_runs(mec, scheduler)
    if sched and n_users is None:
      raise ValueError('n_users is needed when the scheduler runs (case 2 or scheduler=True)')
    loc = ops.scheduler_ops(model, n_users) if sched else ops.as_float(0.0)
    edge = ops.pipeline_ops(model, k, l, n_offloaded, n_users, policy=policy,
                            scheduler=sched, static=static)
    return InferenceDelay(modelled_seconds(edge, mec), modelled_seconds(loc, mec))

  def solver(self, name: str, zeros: Array) -> Array:
    return zeros


@dataclasses.dataclass(frozen=True)
class NoDelay:
  """No inference delay: every network and solver is free."""
  mode = 'none'

  def pipeline(self, model, mec, k, l, n_offloaded, n_users=None, *, policy: bool = True,
               scheduler: bool | None = None, static: bool = False) -> InferenceDelay:
    shape = jnp.broadcast_shapes(*(jnp.shape(v) for v in (k, l, n_offloaded)
                                   if v is not None))
    zero = jnp.zeros(shape, ops.as_float(0.0).dtype)
    return InferenceDelay(zero, zero)

  def solver(self, name: str, zeros: Array) -> Array:
    return zeros


MODELLED = Modelled()
NONE = NoDelay()


def resolve(delay):
  """The delay model of an argument that may be None (the modelled delay, as before)."""
  return MODELLED if delay is None else delay


def table(delay, model, mec, n_offloaded, n_users=None, *, policy: bool = True,
          scheduler: bool | None = None) -> InferenceDelay:
  """`pipeline` of every exit: edge [..., K, L], loc broadcast to [...] for counts of
  shape [...]."""
  k = jnp.arange(1, model.num_experts + 1)[:, None]
  l = jnp.arange(1, model.max_depth + 1)[None, :]
  per_slot = lambda n: None if n is None else jnp.asarray(n)[..., None, None]
  out = resolve(delay).pipeline(model, mec, k, l, per_slot(n_offloaded), per_slot(n_users),
                                policy=policy, scheduler=scheduler)
  edge = jnp.broadcast_to(out.edge, jnp.shape(n_offloaded) + k.shape[:1] + l.shape[1:])
  loc = jnp.broadcast_to(out.loc, edge.shape)[..., 0, 0]
  return InferenceDelay(edge, loc)
