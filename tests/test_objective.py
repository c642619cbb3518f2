"""The objective's own allocation, its bounds and the joint oracle search.

References are independent of the solver: SLSQP (scipy) on every rescued set for small
N, the exhaustive enumeration of offloading sets, random feasible allocations.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import minimize

from dynn_jax import (MECConfig, equal_split, objective_allocation, objective_bound,
                      optimal_allocation, sample_slots, slot_costs)
from dynn_jax.env import Decision
from dynn_jax.solvers import joint_objective_bound, oracle_offload
from dynn_jax.solvers import objective as O
from dynn_jax.solvers.offloading import offloading_table
from test_solvers_search import count_traces

N = 5
# Budgets scaled to N users and deadlines of at most 30 ms: misses are common, and which
# late users to rescue matters (at the paper's defaults with 5 users nobody is late).
HARD = MECConfig(case=1, n_users=N, b_max=0.5e6 * N / 30, f_ser=2.5e9 * N / 30,
                 d_max=0.03, delta=0.02)


def objective(slots, decision, config, t_inf=0.0):
  return np.asarray(slot_costs(slots, decision, config, t_inf).objective)


def slsqp_rescue_reference(slots, config, i):
  """min over every rescued set R of [least convex cost with R on time] + delta misses."""
  s, c, d, l = (np.asarray(a[i], np.float64) for a in (slots.s, slots.c, slots.d, slots.l))
  n = len(s)
  k = config.g0 * (config.l0 / l) ** config.path_loss_exp * config.p_tx / config.noise_psd
  tra = config.alpha + config.beta * config.p_tx

  def delays(v):
    b = np.maximum(v[:n], 1e-12) * config.b_max
    f = np.maximum(v[n:], 1e-12) * config.f_ser
    return s / (b * np.log2(1 + k / b)), c * s / f

  def convex(v):
    t_tra, t_com = delays(v)
    return (tra * t_tra + config.alpha * t_com).sum()

  best = np.inf
  for rescued in itertools.product([False, True], repeat=n):
    rescued = np.array(rescued)
    cons = [{'type': 'eq', 'fun': lambda v: v[:n].sum() - 1},
            {'type': 'eq', 'fun': lambda v: v[n:].sum() - 1}]
    if rescued.any():
      cons.append({'type': 'ineq', 'fun': lambda v, r=rescued:
                   ((d - sum(delays(v))) / d)[r]})
    res = minimize(convex, np.full(2 * n, 1.0 / n), method='SLSQP', constraints=cons,
                   bounds=[(1e-9, 1.0)] * (2 * n), options={'maxiter': 500, 'ftol': 1e-14})
    total = sum(delays(res.x))
    if rescued.any() and (total[rescued] > d[rescued] * (1 + 1e-6)).any():
      continue  # this rescued set is infeasible
    value = convex(res.x) + config.delta * (total > d).sum()
    best = min(best, value)
  return best


@pytest.fixture(scope='module')
def hard64():
  with jax.enable_x64(True):
    slots = sample_slots(jax.random.PRNGKey(3), HARD, 12)
    return slots, objective_allocation(slots, slots.mask, HARD)


def test_within_one_percent_of_every_rescued_set_and_of_a_long_run(hard64):
  slots, decision = hard64
  with jax.enable_x64(True):
    ours = objective(slots, decision, HARD)
    long_run = objective(slots, objective_allocation(slots, slots.mask, HARD, steps=1000),
                         HARD)
  reference = np.array([slsqp_rescue_reference(slots, HARD, i) for i in range(12)])
  best = np.minimum(reference, long_run)
  assert (ours > 0).all()
  np.testing.assert_array_less(ours, 1.01 * best)
  # The enumeration does find rescues here: the miss term is not idle in this test.
  with jax.enable_x64(True):
    convex = objective(slots, O.convex_allocation(slots, slots.mask, HARD), HARD)
  assert (convex > 1.05 * reference).sum() >= 3


# Shared by several tests, so that each compiles once.
TIGHT = MECConfig(case=1, n_users=12, d_max=0.05)


@pytest.mark.parametrize('x64', [False, True])
def test_never_worse_than_the_weighted_optimum_or_equal_split(x64):
  config = TIGHT
  with jax.enable_x64(x64):
    slots = sample_slots(jax.random.PRNGKey(7), config, 64)
    ours = objective(slots, objective_allocation(slots, slots.mask, config, 1e-3), config,
                     1e-3)
    for other in (optimal_allocation, equal_split):
      theirs = objective(slots, other(slots, slots.mask, config), config, 1e-3)
      assert (ours <= theirs * (1 + 1e-6)).all()
    assert ours.mean() < 0.99 * objective(slots, equal_split(slots, slots.mask, config),
                                          config, 1e-3).mean()


BASE = MECConfig(case=1, n_users=6, n_max=8)


@pytest.mark.parametrize('config,x64', [(BASE, False), (BASE, True),
                                        (BASE.replace(alpha=0.0, beta=0.0), False)])
def test_budgets_shapes_and_no_nan_at_the_edges(config, x64):
  with jax.enable_x64(x64):
    slots = sample_slots(jax.random.PRNGKey(1), config, 3 * 4)
    s = slots.s.at[0, :3].set(0.0).at[1, 0].set(1e-9)
    c = slots.c.at[2, :].set(0.0).at[3, 1].set(0.0)
    slots = slots._replace(s=s, c=c)
    offload = slots.mask.at[4].set(False).at[5, 1:].set(False)
    batched = jax.tree.map(lambda a: a.reshape((3, 4) + a.shape[1:]), slots)
    d = objective_allocation(batched, offload.reshape(3, 4, -1), config, 2e-3)
    assert d.b.shape == (3, 4, 8)
    for value in (d.b, d.f):
      assert not np.isnan(np.asarray(value)).any()
    x = np.asarray(d.x)
    np.testing.assert_array_equal(x, np.asarray(offload).reshape(3, 4, -1))
    b, f = np.asarray(d.b), np.asarray(d.f)
    assert (b[~x] == 0).all() and (f[~x] == 0).all()
    sizes = np.asarray(batched.s) * x
    # Budgets are spent wherever a user needs them (nothing to send / compute: no matter).
    np.testing.assert_allclose(b.sum(-1)[(sizes > 0).any(-1)], config.b_max, rtol=1e-4)
    np.testing.assert_allclose(f.sum(-1)[(sizes * np.asarray(batched.c) > 0).any(-1)],
                               config.f_ser, rtol=1e-4)
    costs = slot_costs(batched, d, config, 2e-3)
    # Case 1: a user kept local has no CPU, so only offloaded users can be finite.
    assert np.isfinite(np.asarray(costs.cost)[x]).all()
    bound = np.asarray(objective_bound(batched, offload.reshape(3, 4, -1), config, 2e-3))
    assert not np.isnan(bound).any()


def random_feasible(key, slots, offload, config, count):
  """`count` random allocations per slot (Dirichlet shares over the offloaded users)."""
  kb, kf = jax.random.split(key)
  shape = (count,) + slots.s.shape
  x = jnp.broadcast_to(offload & slots.mask, shape)
  def shares(k):
    g = jnp.where(x, jax.random.gamma(k, 0.5, shape), 0.0)
    return g / jnp.maximum(g.sum(-1, keepdims=True), 1e-30)
  return Decision(x=x, b=config.b_max * shares(kb), f=config.f_ser * shares(kf))


@pytest.mark.parametrize('config', [TIGHT, TIGHT.replace(delta=0.0),
                                    TIGHT.replace(delta=0.5, d_max=0.02)])
def test_bound_never_exceeds_a_feasible_solution(config):
  slots = sample_slots(jax.random.PRNGKey(11), config, 64)
  bound = np.asarray(objective_bound(slots, slots.mask, config, 1e-3))
  many = jax.tree.map(lambda a: jnp.broadcast_to(a, (64,) + a.shape), slots)
  rand = objective(many, random_feasible(jax.random.PRNGKey(0), slots, slots.mask, config, 64),
                   config, 1e-3)
  assert (bound <= rand.min(0)).all()
  for solve in (optimal_allocation, equal_split, O.convex_allocation):
    assert (bound <= objective(slots, solve(slots, slots.mask, config), config, 1e-3)).all()
  ours = objective(slots, objective_allocation(slots, slots.mask, config, 1e-3), config, 1e-3)
  assert (bound <= ours).all()
  # At least the miss-free convex optimum, and equal to it without a miss weight.
  convex = O.convex_allocation(slots, slots.mask, config)
  costs = slot_costs(slots, convex, config, 1e-3)
  convex_part = np.asarray(costs.objective - config.delta * costs.miss.sum(-1))
  assert (bound >= convex_part * (1 - 1e-4)).all()
  if config.delta == 0.0:
    np.testing.assert_allclose(bound, ours, rtol=1e-4)


def exhaustive_objective(slots, config):
  """min over all 2^W offloading sets of the objective under objective_allocation."""
  table = offloading_table(slots.s.shape[-1])
  def one(sl):
    many = jax.tree.map(lambda a: jnp.broadcast_to(a, (table.shape[0],) + a.shape), sl)
    return slot_costs(many, objective_allocation(many, table, config), config).objective.min()
  return np.asarray(jax.jit(jax.vmap(one))(slots))


def test_oracle_against_exhaustive_offloading_and_its_bound():
  config = MECConfig(case=2, n_users=6, b_max=0.5e6 * 6 / 30, f_ser=2.5e9 * 6 / 30)
  slots = sample_slots(jax.random.PRNGKey(5), config, 32)
  exhaustive = exhaustive_objective(slots, config)
  ours = objective(slots, oracle_offload(slots, config), config)
  assert (ours >= exhaustive * (1 - 1e-5)).all()  # the enumeration holds every set
  assert ours.mean() <= 1.02 * exhaustive.mean()
  local = objective(slots, Decision(jnp.zeros_like(slots.mask), 0 * slots.s, 0 * slots.s),
                    config)
  everyone = objective(slots, objective_allocation(slots, slots.mask, config), config)
  assert (ours <= np.minimum(local, everyone) * (1 + 1e-6)).all()
  bound = np.asarray(joint_objective_bound(slots, config))
  assert (bound <= exhaustive).all()
  assert bound.mean() > 0.8 * exhaustive.mean()


def test_compiled_once_for_new_slots_delays_and_traced_constants():
  config = MECConfig(case=1, n_users=6)
  many = [sample_slots(jax.random.PRNGKey(i), config, 8) for i in range(3)]
  delays = [0.0, 1e-3, np.float32(2e-3)]
  objective_allocation(many[0], many[0].mask, config, delays[0])
  with count_traces() as traces:
    for slots, t_inf in zip(many[1:], delays[1:]):
      objective_allocation(slots, slots.mask, config, t_inf)
  assert not traces
  # EnvParams: the constants are traced, so other values reuse the same program and
  # give what the static config gives.
  others = [config.replace(f_ser=f_ser) for f_ser in (1e9, 4e9)]
  params = [other.params() for other in others]
  got = [objective_allocation(slots, slots.mask, params[0])]
  with count_traces() as traces:
    got.append(objective_allocation(slots, slots.mask, params[1]))
  assert not traces
  for decision, other in zip(got, others):
    want = objective(slots, objective_allocation(slots, slots.mask, other), other)
    np.testing.assert_allclose(objective(slots, decision, other), want, rtol=1e-4)


def _extreme_corners():
  """Every corner of the allowed ranges that the solvers' numerics feel: sizes,
  workloads, budgets and the SNR at both ends (K at its allowed limits)."""
  base = MECConfig(case=1, n_users=6)
  high = dict(dist_min=0.01, dist_max=0.02)
  low = dict(dist_min=1e6, dist_max=1e7)
  for end, d in (('high', high), ('low', low)):
    reach = base.replace(**d, p_tx=1.0)
    k = reach.snr_coefficient(d['dist_min'] if end == 'high' else d['dist_max'])
    d['p_tx'] = (0.99e25 if end == 'high' else 1.01e-12) / k
  for corner in itertools.product((1e-3, 1e9), (1e-3, 1e6), (1e3, 1e13), (1.0, 1e12),
                                  (high, low)):
    s_avg, c_avg, f_ser, b_max, snr = corner
    yield base.replace(s_avg=s_avg, c_avg=c_avg, f_ser=f_ser, b_max=b_max, **snr)


@pytest.mark.parametrize('x64', [False, True])
def test_solvers_stay_finite_at_every_corner_of_the_allowed_ranges(x64):
  with jax.enable_x64(x64):
    @jax.jit
    def finite(key, params):  # the constants are traced: one compile for every corner
      slots = sample_slots(key, params, 8)
      ok = []
      for solve in (optimal_allocation, objective_allocation):
        d = solve(slots, slots.mask, params)
        ok.append(jnp.isfinite(d.b).all() & jnp.isfinite(d.f).all()
                  & ~jnp.isnan(slot_costs(slots, d, params).objective).any())
      ok.append(~jnp.isnan(objective_bound(slots, slots.mask, params)).any())
      return jnp.stack(ok)

    for config in _extreme_corners():
      got = np.asarray(finite(jax.random.PRNGKey(0), config.params()))
      assert got.all(), (config, got)
