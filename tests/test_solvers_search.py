"""Tests of the offloading baselines, the exhaustive search and the GA.

Configs and shapes are shared between tests so that each solver compiles only a few
times (the GA takes seconds to compile on CPU).
"""

import contextlib
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dynn_jax import ConfigError, MECConfig, sample_slots, slot_costs
from dynn_jax.env import importance_weight, weighted_edge_delay
from dynn_jax.solvers import (GAConfig, all_local, all_offload, exhaustive_search,
                              ga_solve, optimal_allocation, random_offload)

# delta = 0 removes the deadline-miss term, which makes the objective's optimum known
# (see `uniform_weight_slots`). One padded user checks the mask everywhere.
CASE1 = MECConfig(case=1, n_users=5, n_max=6, delta=0.0)
CASE2 = MECConfig(case=2, n_users=5, n_max=6, delta=0.0)
CASE2_DEFAULT = MECConfig(case=2, n_users=6)
BATCH = 4
T_EDGE, T_LOC = 2e-3, 5e-4


# Jitted once per config and shape: eager calls of these are slow on CPU.
optimal = jax.jit(optimal_allocation, static_argnames='config')


@functools.partial(jax.jit, static_argnames='config')
def objective(slots, decision, config, t_edge=0.0, t_loc=0.0):
  return slot_costs(slots, decision, config, t_edge, t_loc).objective


@contextlib.contextmanager
def count_traces():
  """Counts the jit traces started inside the block (JAX reports each as an event)."""
  events = []
  def listener(event, duration, **kwargs):
    if event == '/jax/core/compile/jaxpr_trace_duration':
      events.append(event)
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield events
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)


def uniform_weight_slots(slots, config, w0=1.0):
  """Deadlines chosen so that every real user has importance weight w0.

  With equal weights and delta = 0, the objective of a fixed offloading set is
  (alpha + beta p) sum T_tra + alpha sum T_com + const: b and f enter separate terms,
  each a positive multiple of the part that `optimal_allocation` minimises
  (w0 sum T_tra and w0 sum T_com). So the optimal allocation is then the exact
  minimiser of the objective, a true lower bound for any other allocation.
  """
  d_ms = config.gamma * (slots.c / config.c_max) * (slots.s / config.s_max) / w0
  return slots._replace(d=jnp.where(slots.mask, d_ms * 1e-3, slots.d))


@pytest.fixture(scope='module')
def case1_run():
  slots = uniform_weight_slots(sample_slots(jax.random.key(0), CASE1, batch=BATCH), CASE1)
  decision, history = ga_solve(jax.random.key(1), slots, CASE1)
  return slots, decision, history


@pytest.fixture(scope='module')
def case2_run():
  slots = sample_slots(jax.random.key(2), CASE2, batch=BATCH)
  decision, history = ga_solve(jax.random.key(3), slots, CASE2, GAConfig(), T_EDGE, T_LOC)
  return slots, decision, history


def test_uniform_weight_slots_have_equal_weights():
  slots = uniform_weight_slots(sample_slots(jax.random.key(0), CASE1, batch=BATCH), CASE1)
  w = importance_weight(slots, CASE1)
  np.testing.assert_allclose(w[slots.mask], 1.0, rtol=1e-5)


# ----------------------------------------------------------------------------- GA


def test_ga_never_beats_the_optimal_allocation(case1_run):
  """Case 1 (everyone offloads, the set is fixed), two like-for-like comparisons.

  * Weighted edge delay: `optimal_allocation` minimises it over all allocations of the
    set; the GA's allocation is one of them, whatever the GA optimised.
  * Objective: with equal weights and delta = 0 the optimal allocation also minimises
    the objective (see `uniform_weight_slots`), which is the GA's fitness.
  The tolerance covers float32 rounding of the optimum only. The GA must also come
  close (within 10%), so that a GA that returns garbage fails.
  """
  slots, decision, _ = case1_run
  opt = optimal(slots, slots.mask, config=CASE1)
  np.testing.assert_array_equal(decision.x, slots.mask)
  wd_ga = weighted_edge_delay(slots, decision.x, decision.b, decision.f, CASE1)
  wd_opt = weighted_edge_delay(slots, opt.x, opt.b, opt.f, CASE1)
  assert np.all(wd_ga >= wd_opt * (1 - 1e-5)), (wd_ga, wd_opt)
  obj_ga = objective(slots, decision, CASE1)
  obj_opt = objective(slots, opt, CASE1)
  assert np.all(obj_ga >= obj_opt * (1 - 1e-5)), (obj_ga, obj_opt)
  assert np.all(obj_ga <= obj_opt * 1.1), (obj_ga, obj_opt)


def test_ga_never_beats_the_exhaustive_search_in_case2():
  """Case 2: with equal weights, delta = 0 and no inference delay, the optimal
  allocation minimises the objective of each set, so the exhaustive search over sets
  is the joint optimum of (x, b, f): a lower bound for the GA's objective."""
  slots = uniform_weight_slots(sample_slots(jax.random.key(4), CASE2, batch=BATCH), CASE2)
  decision, _ = ga_solve(jax.random.key(5), slots, CASE2, GAConfig(), 0.0, 0.0)
  best = exhaustive_search(slots, CASE2, 0.0, 0.0)
  obj_ga = objective(slots, decision, CASE2)
  obj_best = objective(slots, best, CASE2)
  assert np.all(obj_ga >= obj_best * (1 - 1e-5)), (obj_ga, obj_best)
  assert np.all(obj_ga <= obj_best * 1.2), (obj_ga, obj_best)


@pytest.mark.parametrize('run', ['case1_run', 'case2_run'])
def test_ga_history_improves_and_never_worsens(run, request):
  slots, decision, history = request.getfixturevalue(run)
  config, t_edge, t_loc = (CASE1, 0.0, 0.0) if run == 'case1_run' else (CASE2, T_EDGE, T_LOC)
  assert history.shape == (BATCH, GAConfig().generations)
  assert np.all(np.isfinite(history))
  assert np.all(np.diff(history, axis=-1) <= 0), 'elitism: the best never gets worse'
  assert np.all(history[:, -1] < history[:, 0])
  # The returned decision is the one the history reports (inference delay included).
  final = objective(slots, decision, config, t_edge, t_loc)
  np.testing.assert_allclose(final, history[:, -1], rtol=1e-5)


@pytest.mark.parametrize('run', ['case1_run', 'case2_run'])
def test_ga_meets_budgets_and_ignores_padding(run, request):
  slots, decision, _ = request.getfixturevalue(run)
  config = CASE1 if run == 'case1_run' else CASE2
  x, b, f = (np.asarray(a) for a in decision)
  mask = np.asarray(slots.mask)
  assert not np.any(x & ~mask), 'a padded user was offloaded'
  assert np.all(b[~x] == 0) and np.all(f[~x] == 0), 'a local or padded user got resources'
  assert np.all(b >= 0) and np.all(f >= 0)
  some = x.any(-1)
  assert some.any()
  np.testing.assert_allclose(b.sum(-1)[some], config.b_max, rtol=1e-5)
  np.testing.assert_allclose(f.sum(-1)[some], config.f_ser, rtol=1e-5)
  if config.case == 2:  # the search really decides offloading
    assert np.any(~x & mask)


def test_ga_single_slot_does_not_retrace():
  """Same shapes, new values (slots, key, inference delays passed any way): no trace."""
  config = CASE1
  slots_a = sample_slots(jax.random.key(6), config)
  slots_b = sample_slots(jax.random.key(7), config)
  key_a, key_b, t_edge = jax.random.key(0), jax.random.key(1), jnp.float32(1e-3)
  decision, history = ga_solve(key_a, slots_a, config)
  assert decision.b.shape == (config.width,) and history.shape == (GAConfig().generations,)
  with count_traces() as traces:
    decision_b, _ = ga_solve(key_b, slots_b, config, t_inf_edge=t_edge,
                             t_inf_loc=np.float64(2e-3))
    jax.block_until_ready(decision_b)
  assert not traces
  assert not np.allclose(decision.b, decision_b.b)


def test_count_traces_sees_a_retrace():
  """The counter itself works: a new shape traces again."""
  slots = sample_slots(jax.random.key(6), CASE1, batch=3)
  with count_traces() as traces:
    all_offload(slots)
  assert traces


def test_ga_chunking_does_not_change_results(case1_run):
  """4 slots in chunks of 3 (the last chunk padded) give the one-chunk answer."""
  slots, decision, history = case1_run
  chunked, history_chunked = ga_solve(jax.random.key(1), slots, CASE1, GAConfig(slot_chunk=3))
  np.testing.assert_allclose(history_chunked, history, rtol=1e-6)
  np.testing.assert_allclose(chunked.b, decision.b, rtol=1e-5)


def test_ga_is_reproducible_with_the_same_key(case2_run):
  slots, decision, history = case2_run
  again, history_again = ga_solve(jax.random.key(3), slots, CASE2, GAConfig(), T_EDGE, T_LOC)
  np.testing.assert_array_equal(history, history_again)
  np.testing.assert_array_equal(decision.b, again.b)


@pytest.mark.parametrize('field, value', [
    ('generations', 0), ('generations', 2.5), ('population_per_task', 0),
    ('crossover_rate', 1.5), ('crossover_rate', float('nan')), ('mutation_rate', -0.1),
    ('crossover_decay', 0.0), ('mutation_decay', 2.0), ('decay_interval', 0),
    ('decay_interval_case2', True), ('slot_chunk', 0),
])
def test_bad_ga_config_raises(field, value):
  with pytest.raises(ValueError, match=f'GAConfig.{field} = .*allowed range') as info:
    GAConfig(**{field: value})
  assert repr(value) in str(info.value)
  assert isinstance(info.value, ConfigError)


# ------------------------------------------------------------------ offloading sets


def test_fixed_policies_follow_the_mask():
  slots = sample_slots(jax.random.key(8), CASE2, batch=BATCH)
  np.testing.assert_array_equal(all_offload(slots), slots.mask)
  x = all_local(slots)
  assert x.shape == slots.mask.shape and x.dtype == jnp.bool_ and not x.any()


def test_random_offload_is_keyed_and_has_mean_p():
  config = MECConfig(case=2, n_users=1000, n_max=1024)
  slots = sample_slots(jax.random.key(9), config, batch=200)
  x = random_offload(jax.random.key(10), slots, 0.3)
  np.testing.assert_array_equal(x, random_offload(jax.random.key(10), slots, 0.3))
  assert np.any(x != random_offload(jax.random.key(11), slots, 0.3))
  assert not np.any(x & ~slots.mask)
  # 200k users: the standard error of the mean is 0.001.
  assert abs(float(x[slots.mask].mean()) - 0.3) < 0.005


def _brute_force(slots, config, t_edge, t_loc):
  """Objective of every offloading set of one slot, enumerated in Python."""
  @jax.jit
  def objective(x):
    decision = optimal_allocation(slots, x, config)
    return slot_costs(slots, decision, config, t_edge, t_loc).objective
  width = slots.mask.shape[-1]
  return {bits: float(objective(np.array(bits, bool)))
          for bits in itertools.product([False, True], repeat=width)}


def test_exhaustive_search_matches_brute_force():
  slots = sample_slots(jax.random.key(12), CASE2_DEFAULT, batch=BATCH)
  best = exhaustive_search(slots, CASE2_DEFAULT, T_EDGE, T_LOC)
  best_obj = objective(slots, best, CASE2_DEFAULT, T_EDGE, T_LOC)
  # Check a slot whose optimum is a real mix: neither everyone nor nobody offloads.
  n_off = np.asarray(best.x.sum(-1))
  mixed = np.flatnonzero((n_off > 0) & (n_off < CASE2_DEFAULT.width))
  assert mixed.size, n_off
  i = int(mixed[0])
  table = _brute_force(jax.tree.map(lambda a: a[i], slots), CASE2_DEFAULT, T_EDGE, T_LOC)
  minimum = min(table.values())
  np.testing.assert_allclose(best_obj[i], minimum, rtol=1e-5)
  # Compare the set too, through the brute-force value of the chosen set (ties allowed).
  chosen = tuple(bool(v) for v in np.asarray(best.x[i]))
  np.testing.assert_allclose(table[chosen], minimum, rtol=1e-5)


def test_exhaustive_search_beats_fixed_policies():
  slots = sample_slots(jax.random.key(13), CASE2_DEFAULT, batch=BATCH)
  best = exhaustive_search(slots, CASE2_DEFAULT, T_EDGE, T_LOC)
  best_obj = objective(slots, best, CASE2_DEFAULT, T_EDGE, T_LOC)
  for policy in (all_offload, all_local):
    fixed = optimal(slots, policy(slots), config=CASE2_DEFAULT)
    other = objective(slots, fixed, CASE2_DEFAULT, T_EDGE, T_LOC)
    assert np.all(best_obj <= other * (1 + 1e-6)), (policy.__name__, best_obj, other)
  assert not np.any(best.x & ~slots.mask)


def test_exhaustive_search_offloads_everyone_in_case1():
  slots = sample_slots(jax.random.key(14), CASE1, batch=BATCH)
  best = exhaustive_search(slots, CASE1, T_EDGE, T_LOC)
  np.testing.assert_array_equal(best.x, slots.mask)
  assert np.all(np.isfinite(objective(slots, best, CASE1)))


def test_exhaustive_search_does_not_retrace():
  slots_a = sample_slots(jax.random.key(15), CASE1, batch=BATCH)
  slots_b = sample_slots(jax.random.key(16), CASE1, batch=BATCH)
  exhaustive_search(slots_a, CASE1, T_EDGE, T_LOC)
  with count_traces() as traces:
    jax.block_until_ready(exhaustive_search(slots_b, CASE1, 3e-3, t_inf_loc=jnp.float32(1e-3)))
  assert not traces


def test_exhaustive_search_refuses_wide_slots():
  config = MECConfig(case=2, n_users=13)
  slots = sample_slots(jax.random.key(0), config, batch=1)
  with pytest.raises(ValueError, match='limit of 12'):
    exhaustive_search(slots, config)
