"""The exact allocation against independent references: grids, KKT bisection, perturbations."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import numpy_reference as ref
from dynn_jax import MECConfig, equal_split, optimal_allocation, sample_slots
from dynn_jax.env import weighted_edge_delay


def _objective_np(slot, b, f, cfg):
  w = ref.weights(slot['s'], slot['c'], slot['d'], cfg)
  return np.sum(w * (slot['s'] / ref.rate(b, slot['l'], cfg) + slot['c'] * slot['s'] / f), -1)


def _as_np(slots, i, n):
  return {k: np.asarray(getattr(slots, k)[i][:n], np.float64) for k in ('s', 'c', 'd', 'l')}


def test_matches_nested_bisection_reference_float64():
  with jax.enable_x64(True):
    cfg = MECConfig(n_users=30)
    slots = sample_slots(jax.random.PRNGKey(0), cfg, 6)
    dec = jax.jit(optimal_allocation, static_argnums=2)(slots, slots.mask, cfg)
    for i in range(6):
      slot = _as_np(slots, i, 30)
      w = ref.weights(slot['s'], slot['c'], slot['d'], cfg)
      k = cfg.g0 * (cfg.l0 / slot['l']) ** cfg.path_loss_exp * cfg.p_tx / cfg.noise_psd
      b_ref = ref.optimal_bandwidth(w * slot['s'], k, cfg.b_max)
      a = np.sqrt(w * slot['c'] * slot['s'])
      f_ref = cfg.f_ser * a / a.sum()
      want = _objective_np(slot, b_ref, f_ref, cfg)
      got = _objective_np(slot, np.asarray(dec.b[i]), np.asarray(dec.f[i]), cfg)
      assert abs(got - want) / want <= 1e-6
      np.testing.assert_allclose(dec.b[i], b_ref, rtol=1e-5)


@pytest.mark.parametrize('n', [2, 3])
def test_no_grid_point_beats_the_optimum(n):
  with jax.enable_x64(True):
    cfg = MECConfig(n_users=n)
    slots = sample_slots(jax.random.PRNGKey(n), cfg, 5)
    dec = optimal_allocation(slots, slots.mask, cfg)
    grid = np.linspace(1e-4, 1 - 1e-4, 801 if n == 2 else 161)
    if n == 2:
      shares = np.stack([grid, 1 - grid], -1)
    else:
      g1, g2 = np.meshgrid(grid, grid)
      keep = g1 + g2 < 1
      shares = np.stack([g1[keep], g2[keep], 1 - g1[keep] - g2[keep]], -1)
    for i in range(5):
      slot = _as_np(slots, i, n)
      best = _objective_np(slot, np.asarray(dec.b[i]), np.asarray(dec.f[i]), cfg)
      # b and f separate, so the joint grid minimum is the sum of two grid minima.
      only_b = _objective_np(slot, shares * cfg.b_max, np.asarray(dec.f[i]), cfg)
      only_f = _objective_np(slot, np.asarray(dec.b[i]), shares * cfg.f_ser, cfg)
      assert best <= only_b.min() * (1 + 1e-12) and best <= only_f.min() * (1 + 1e-12)
      assert only_b.min() <= best * (1 + 2e-3) and only_f.min() <= best * (1 + 2e-3)


def test_random_feasible_perturbations_are_never_better():
  with jax.enable_x64(True):
    cfg = MECConfig(case=2, n_users=30)
    slots = sample_slots(jax.random.PRNGKey(5), cfg, 4)
    x = jax.random.bernoulli(jax.random.PRNGKey(6), 0.7, slots.mask.shape)
    dec = optimal_allocation(slots, x, cfg)
    best = weighted_edge_delay(slots, x, dec.b, dec.f, cfg)
    rng = np.random.default_rng(0)
    for scale in (1e-4, 1e-2, 0.3):
      for _ in range(20):
        nb = np.asarray(dec.b) * np.exp(rng.normal(0, scale, dec.b.shape))
        nf = np.asarray(dec.f) * np.exp(rng.normal(0, scale, dec.f.shape))
        nb *= cfg.b_max / nb.sum(-1, keepdims=True)
        nf *= cfg.f_ser / nf.sum(-1, keepdims=True)
        worse = weighted_edge_delay(slots, x, jnp.asarray(nb), jnp.asarray(nf), cfg)
        assert np.all(np.asarray(worse) >= np.asarray(best) * (1 - 1e-12))
    eq = equal_split(slots, x, cfg)
    assert np.all(np.asarray(weighted_edge_delay(slots, x, eq.b, eq.f, cfg)) > np.asarray(best))


@pytest.mark.parametrize('x64', [False, True])
def test_budgets_met_exactly_and_nothing_to_others(x64):
  with jax.enable_x64(x64):
    cfg = MECConfig(case=2, n_users=20, n_max=32)
    slots = sample_slots(jax.random.PRNGKey(1), cfg, 64)
    x = jax.random.bernoulli(jax.random.PRNGKey(2), 0.5, slots.mask.shape)
    x = x.at[0].set(False)                     # a slot with nobody offloaded
    dec = optimal_allocation(slots, x, cfg)
    given = np.asarray(x & slots.mask)
    b, f = np.asarray(dec.b), np.asarray(dec.f)
    assert np.all(b[~given] == 0) and np.all(f[~given] == 0)
    assert np.all(b >= 0) and np.all(np.isfinite(b)) and np.all(np.isfinite(f))
    rtol = 1e-12 if x64 else 1e-6
    some = given.any(-1)
    np.testing.assert_allclose(b.sum(-1)[some], cfg.b_max, rtol=rtol)
    np.testing.assert_allclose(f.sum(-1)[some], cfg.f_ser, rtol=rtol)
    assert np.all(b[0] == 0) and np.all(f[0] == 0)


def test_float32_close_to_float64():
  cfg = MECConfig()
  with jax.enable_x64(True):
    s64 = sample_slots(jax.random.PRNGKey(9), cfg, 32)
    d64 = optimal_allocation(s64, s64.mask, cfg)
    o64 = np.asarray(weighted_edge_delay(s64, s64.mask, d64.b, d64.f, cfg))
  s32 = jax.tree.map(lambda a: a.astype(jnp.float32) if a.dtype == jnp.float64 else a, s64)
  d32 = optimal_allocation(s32, s32.mask, cfg)
  o32 = np.asarray(weighted_edge_delay(s32, s32.mask, d32.b, d32.f, cfg))
  np.testing.assert_allclose(o32, o64, rtol=1e-4)


def test_compiles_once():
  cfg = MECConfig()

  @jax.jit
  @chex.assert_max_traces(n=1)
  def solve(key):
    slots = sample_slots(key, cfg, 16)
    return optimal_allocation(slots, slots.mask, cfg)

  for i in range(3):
    solve(jax.random.PRNGKey(i))
