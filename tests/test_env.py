"""The environment against an independent NumPy implementation and its invariants."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import numpy_reference as ref
from dynn_jax import ConfigError, Decision, MECConfig, equal_split, sample_slots, slot_costs
from dynn_jax.env import normalized_features, weighted_edge_delay

CASE2 = MECConfig(case=2, n_users=8, n_max=10)


def _slot(slots, i):
  n = int(slots.mask[i].sum())
  return {k: np.asarray(getattr(slots, k)[i][:n], np.float64)
          for k in ('s', 'c', 'd', 'l', 'f_loc')}, n


@pytest.mark.parametrize('x64', [False, True])
def test_slot_costs_match_numpy(x64):
  with jax.enable_x64(x64):
    cfg = CASE2
    slots = sample_slots(jax.random.PRNGKey(1), cfg, 16)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.random(slots.s.shape) < 0.6) & slots.mask
    b = jnp.asarray(rng.random(slots.s.shape) * 1e5, slots.s.dtype)
    f = jnp.asarray(rng.random(slots.s.shape) * 5e8, slots.s.dtype)
    t_edge, t_loc = jnp.linspace(1e-3, 3e-3, 16), 2e-4
    got = jax.jit(slot_costs, static_argnums=2)(slots, Decision(x, b, f), cfg, t_edge, t_loc)
    rtol = 1e-10 if x64 else 2e-5
    for i in range(16):
      slot, n = _slot(slots, i)
      want = ref.costs(slot, np.asarray(x[i][:n]), np.asarray(b[i][:n], np.float64),
                       np.asarray(f[i][:n], np.float64), cfg, float(t_edge[i]), t_loc)
      for name in ('t_tra', 't_com', 'delay', 'energy', 'weight'):
        np.testing.assert_allclose(getattr(got, name)[i][:n], want[name], rtol=rtol,
                                   atol=1e-30, err_msg=name)
        np.testing.assert_array_equal(getattr(got, name)[i][n:], 0.0)
      np.testing.assert_array_equal(got.miss[i][:n], want['miss'])
      for name in ('objective', 'mean_delay', 'miss_ratio', 'total_energy', 'weighted_delay'):
        np.testing.assert_allclose(getattr(got, name)[i], want[name], rtol=rtol, err_msg=name)


def test_zero_tasks_cost_nothing_and_starved_users_cost_inf():
  cfg = MECConfig(case=2, n_users=4)
  slots = sample_slots(jax.random.PRNGKey(0), cfg)
  slots = slots._replace(s=slots.s.at[0].set(0.0), c=slots.c.at[1].set(0.0))
  x = jnp.array([True, True, True, False])
  b = jnp.array([0.0, 1e5, 0.0, 0.0])     # user 2 is offloaded with no bandwidth
  f = jnp.array([0.0, 0.0, 1e9, 0.0])     # user 1 has c = 0 and needs no CPU
  costs = slot_costs(slots, Decision(x, b, f), cfg)
  assert costs.delay[0] == 0.0 and costs.energy[0] == 0.0 and not costs.miss[0]
  assert costs.t_com[1] == 0.0 and np.isfinite(costs.delay[1]) and costs.delay[1] > 0
  assert costs.delay[2] == np.inf and costs.miss[2] and costs.energy[2] == np.inf
  assert not np.isnan(np.asarray(costs.cost)).any()
  # Zero-size local task: no local delay, no NaN from 0 / f_loc.
  local = slot_costs(slots, Decision(jnp.zeros(4, bool), b, f), cfg)
  assert local.delay[0] == 0.0 and not np.isnan(np.asarray(local.cost)).any()


def test_case1_local_execution_is_impossible():
  cfg = MECConfig(n_users=3)
  slots = sample_slots(jax.random.PRNGKey(0), cfg)
  costs = slot_costs(slots, Decision(jnp.zeros(3, bool), jnp.zeros(3), jnp.zeros(3)), cfg)
  assert np.all(np.asarray(costs.delay) == np.inf)


def test_padded_users_never_count():
  cfg = MECConfig(case=2, n_users=30, n_max=45)
  slots = sample_slots(jax.random.PRNGKey(3), cfg, 4, n_users=jnp.array(12))
  assert np.all(np.asarray(slots.n_users) == 12)
  everyone = jnp.ones_like(slots.mask)
  dec = equal_split(slots, everyone, cfg)
  costs = slot_costs(slots, dec, cfg, 1e-3, 1e-4)
  trimmed = jax.tree.map(lambda a: a[:, :12], slots)
  small = MECConfig(case=2, n_users=12)
  dec12 = equal_split(trimmed, trimmed.mask, small)
  costs12 = slot_costs(trimmed, dec12, small, 1e-3, 1e-4)
  for name in ('objective', 'mean_delay', 'miss_ratio', 'total_energy', 'weighted_delay'):
    np.testing.assert_allclose(getattr(costs, name), getattr(costs12, name), rtol=1e-6)
  assert np.all(np.asarray(dec.b)[:, 12:] == 0) and np.all(np.asarray(costs.delay)[:, 12:] == 0)


def test_sampling_ranges_and_reproducibility():
  cfg = MECConfig(case=2)
  a = sample_slots(jax.random.PRNGKey(7), cfg, 2000)
  b = sample_slots(jax.random.PRNGKey(7), cfg, 2000)
  chex.assert_trees_all_equal(a, b)
  assert 0 < float(a.s.min()) and float(a.s.max()) <= cfg.s_max
  assert 0 < float(a.c.min()) and float(a.c.max()) <= cfg.c_max
  assert cfg.d_min <= float(a.d.min()) and float(a.d.max()) <= cfg.d_max
  assert cfg.dist_min <= float(a.l.min()) and float(a.l.max()) <= cfg.dist_max
  assert cfg.f_loc_min <= float(a.f_loc.min()) and float(a.f_loc.max()) <= cfg.f_loc_max
  np.testing.assert_allclose(float(a.s.mean()), cfg.s_avg, rtol=0.02)
  np.testing.assert_allclose(float(a.c.mean()), cfg.c_avg, rtol=0.02)
  u = normalized_features(a, cfg)
  assert u.shape == (2000, 30, 5) and float(u.min()) >= 0 and float(u.max()) <= 1


def test_local_energy_matches_paper_scale():
  # SPEC: local execution at the defaults costs about 1.92 J summed over 30 users.
  cfg = MECConfig(case=2)
  slots = sample_slots(jax.random.PRNGKey(0), cfg, 20000)
  costs = slot_costs(slots, Decision(jnp.zeros_like(slots.mask), slots.s * 0, slots.s * 0), cfg)
  np.testing.assert_allclose(float(costs.total_energy.mean()), 1.92, rtol=0.05)


@pytest.mark.parametrize('field,value', [
    ('n_users', 0), ('b_max', 0.0), ('b_max', -1.0), ('f_ser', float('nan')),
    ('dist_min', -5.0), ('case', 3), ('d_max', 1e-3), ('alpha', -1.0), ('n_max', 10),
    ('f_loc_max', 0.001e9), ('gamma', 0.0)])
def test_bad_config_names_field_and_range(field, value):
  with pytest.raises(ConfigError, match=rf'MECConfig\.{field} = .*(range|allowed|must)'):
    MECConfig(**{field: value})


def test_config_round_trip_and_unknown_field():
  cfg = MECConfig(case=2, n_users=12)
  assert MECConfig.from_dict(cfg.to_dict()) == cfg and hash(cfg) == hash(MECConfig.from_dict(cfg.to_dict()))
  with pytest.raises(ConfigError, match='bogus'):
    MECConfig.from_dict({'bogus': 1})


def test_no_retrace_on_new_values():
  cfg = MECConfig(case=2, n_max=45)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def run(key, n):
    slots = sample_slots(key, cfg, 8, n_users=n)
    dec = equal_split(slots, slots.mask, cfg)
    return slot_costs(slots, dec, cfg, 1e-3, 0.0).objective

  for i, n in enumerate((10, 30, 45)):
    run(jax.random.PRNGKey(i), jnp.array(n))


def test_weighted_edge_delay_matches_costs():
  cfg = CASE2
  slots = sample_slots(jax.random.PRNGKey(2), cfg, 8)
  dec = equal_split(slots, slots.mask, cfg)
  np.testing.assert_allclose(weighted_edge_delay(slots, dec.x, dec.b, dec.f, cfg),
                             slot_costs(slots, dec, cfg).weighted_delay, rtol=1e-6)


def test_zero_objective_weights_drop_infinite_terms():
  cfg = MECConfig(n_users=3, alpha=0.0, beta=0.0)
  slots = sample_slots(jax.random.PRNGKey(0), cfg)
  starved = Decision(jnp.ones(3, bool), jnp.zeros(3), jnp.zeros(3))
  costs = slot_costs(slots, starved, cfg)
  assert np.all(np.isinf(np.asarray(costs.delay)))
  np.testing.assert_allclose(costs.objective, 3 * cfg.delta)


def test_traced_constants_give_what_the_static_config_gives_in_one_compile():
  from dynn_jax import optimal_allocation, sweep_params
  from dynn_jax.config import point_params

  def body(key, params):
    slots = sample_slots(key, params, 16)
    costs = slot_costs(slots, optimal_allocation(slots, slots.mask, params), params)
    return slots, costs.objective

  run = jax.jit(chex.assert_max_traces(body, n=1))

  values = [1e9, 2.5e9, 4e9]
  stacked = sweep_params(CASE2, 'f_ser', values)
  for i, f_ser in enumerate(values):
    config = CASE2.replace(f_ser=f_ser)
    slots, got = run(jax.random.PRNGKey(3), point_params(stacked, i))
    want_slots = sample_slots(jax.random.PRNGKey(3), config, 16)
    np.testing.assert_array_equal(slots.mask, want_slots.mask)
    want = slot_costs(want_slots, optimal_allocation(want_slots, want_slots.mask, config),
                      config).objective
    np.testing.assert_allclose(got, want, rtol=1e-5)
  # vmap over the stacked values: the sweep as one batched program.
  _, batched = jax.vmap(lambda p: body(jax.random.PRNGKey(3), p))(stacked)
  assert batched.shape == (3, 16) and bool((batched[0] > batched[2]).all())
