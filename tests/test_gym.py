"""The gymnax-style environment: episodes, reward against `slot_costs`, traced params.

Compiles dominate the run time, so the tests share a few cached jitted functions and
feed them batches rather than compiling a variant per check.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dynn_jax.config import MECConfig, sweep_params
from dynn_jax.env import Decision, normalized_features, slot_costs
from dynn_jax.gym import Action, MECEnv, normalize_shares, split_obs
from dynn_jax.models import ModelConfig, MoEAllocator, Scheduler, allocate
from dynn_jax.networks import init_params

CASE2 = MECConfig(case=2, n_users=6, n_max=8)
CASE1 = MECConfig(case=1, n_users=6, n_max=8)
EPISODES = 64
W = 8


@functools.lru_cache(maxsize=None)
def _batched(mec):
  """jit(vmap(...)) of reset, step and sample_action for `mec`, built once."""
  env = MECEnv(mec)
  reset = jax.jit(jax.vmap(env.reset, in_axes=(0, None)))
  step = jax.jit(jax.vmap(env.step, in_axes=(0, 0, 0, None)))
  sample = jax.jit(jax.vmap(env.sample_action))
  return reset, step, sample


def _keys(seed, n=EPISODES):
  return jax.random.split(jax.random.PRNGKey(seed), n)


@jax.jit
def _costs(slots, decision, params):
  return slot_costs(slots, decision, params)


def _reference(slots, x, b_share, f_share, mec):
  """Offloading and share normalisation redone in NumPy, then `slot_costs`."""
  mask = np.asarray(slots.mask)
  x = mask.copy() if mec.case == 1 else np.asarray(x, bool) & mask
  shares = []
  for share in (b_share, f_share):
    share = np.where(x, np.maximum(np.asarray(share, np.float64), 0.0), 0.0)
    total = share.sum(-1, keepdims=True)
    equal = np.where(x, 1.0 / np.maximum(x.sum(-1, keepdims=True), 1), 0.0)
    share = np.where(total > 0, share / np.where(total > 0, total, 1.0), equal)
    shares.append(jnp.asarray(share, slots.s.dtype))
  decision = Decision(jnp.asarray(x), shares[0] * mec.b_max, shares[1] * mec.f_ser)
  return _costs(slots, decision, mec.params(slots.s.dtype))


@pytest.mark.parametrize('mec', [CASE1, CASE2], ids=['case1', 'case2'])
def test_random_agent_batch(mec):
  env = MECEnv(mec)
  params = env.default_params
  reset, step, sample = _batched(mec)
  obs, state = reset(_keys(0), params)
  assert obs.shape == (EPISODES, W, 6)
  assert env.observation_space().shape == obs.shape[1:]
  features, mask = split_obs(obs)
  np.testing.assert_array_equal(mask, state.slots.mask)
  np.testing.assert_array_equal(mask.sum(-1), mec.n_users)
  np.testing.assert_allclose(features, normalized_features(state.slots, mec))
  assert float(obs.min()) >= 0.0 and float(obs.max()) <= 1.0
  np.testing.assert_array_equal(state.time, 0)
  for t in range(3):
    action = sample(_keys(10 + t))
    new_obs, new_state, reward, done, info = step(_keys(20 + t), state, action, params)
    assert reward.shape == done.shape == (EPISODES,)
    assert bool(jnp.isfinite(reward).all())
    assert bool(done.all())
    np.testing.assert_array_equal(info['discount'], 0.0)
    np.testing.assert_allclose(info['objective'], -reward)
    assert bool(((info['miss_ratio'] >= 0) & (info['miss_ratio'] <= 1)).all())
    assert bool((info['mean_delay'] > 0).all() & (info['energy'] > 0).all())
    # Auto-reset: the next episode is a fresh slot at time 0, and obs shows it.
    np.testing.assert_array_equal(new_state.time, 0)
    assert not bool(jnp.all(new_state.slots.s == state.slots.s))
    np.testing.assert_array_equal(split_obs(new_obs)[1], new_state.slots.mask)
    np.testing.assert_allclose(split_obs(new_obs)[0],
                               normalized_features(new_state.slots, mec))
    obs, state = new_obs, new_state


def _awkward_actions(seed):
  """Actions whose shares do not sum to 1, with negative entries, entries at padded
  users, rows of all-zero shares and a row where nobody offloads."""
  rng = np.random.default_rng(seed)
  x = rng.random((EPISODES, W)) < 0.6
  b = rng.random((EPISODES, W)) * 7.0
  f = rng.random((EPISODES, W)) * 0.01
  b[:, 0], f[:, -1] = -3.0, 5.0
  b[1], f[2], x[3] = 0.0, 0.0, False
  return x, b, f


def test_reward_is_minus_objective():
  params = CASE2.params()
  reset, step, _ = _batched(CASE2)
  _, state = reset(_keys(1), params)
  x, b, f = _awkward_actions(0)
  action = Action(jnp.asarray(x), jnp.asarray(b, jnp.float32), jnp.asarray(f, jnp.float32))
  _, _, reward, _, info = step(_keys(2), state, action, params)
  want = _reference(state.slots, x, b, f, CASE2)
  np.testing.assert_allclose(reward, -want.objective, rtol=1e-6)
  for name, field in (('objective', 'objective'), ('mean_delay', 'mean_delay'),
                      ('miss_ratio', 'miss_ratio'), ('energy', 'total_energy')):
    np.testing.assert_allclose(info[name], getattr(want, field), rtol=1e-6, err_msg=name)
  # The shares the env derives: sum 1 over the offloaded users, 0 elsewhere.
  off = jnp.asarray(x) & state.slots.mask
  for share in (b, f):
    norm = normalize_shares(jnp.asarray(share, jnp.float32), off)
    some = np.asarray(off.any(-1))
    np.testing.assert_allclose(norm.sum(-1)[some], 1.0, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(norm)[~np.asarray(off)], 0.0)
  np.testing.assert_allclose(normalize_shares(jnp.zeros(W), off)[1][off[1]],
                             1.0 / int(off[1].sum()))


def test_case1_offloads_every_user():
  params = CASE1.params()
  reset, step, _ = _batched(CASE1)
  _, state = reset(_keys(3), params)
  x, b, f = _awkward_actions(1)
  x[:] = False  # ignored: users without a CPU always offload
  b, f = np.abs(b) + 0.1, np.abs(f) + 0.1  # no user left without bandwidth or CPU
  action = Action(jnp.asarray(x), jnp.asarray(b, jnp.float32), jnp.asarray(f, jnp.float32))
  _, _, reward, _, info = step(_keys(4), state, action, params)
  assert bool(jnp.isfinite(reward).all())
  want = _reference(state.slots, x, b, f, CASE1)
  np.testing.assert_allclose(reward, -want.objective, rtol=1e-6)


def test_networks_act_through_env():
  mec = CASE2
  model = ModelConfig.for_env(mec, num_experts=2, max_depth=2, width=8, static_width=8)
  # Jitted: one compile instead of a dispatch per initializer op.
  alloc_params = jax.jit(lambda k: init_params(MoEAllocator(model), k, mec))(
      jax.random.PRNGKey(1))
  sched_params = jax.jit(lambda k: init_params(Scheduler(model), k, mec))(
      jax.random.PRNGKey(2))
  params = mec.params()
  reset, step, _ = _batched(mec)
  obs, state = reset(_keys(5), params)
  features, mask = split_obs(obs)
  # Centre the random scheduler on the median user, so that it offloads some users and
  # keeps others and the check below covers both paths.
  logits = Scheduler(model).apply({'params': sched_params}, features, mask).logits
  sched_params['out']['bias'] = sched_params['out']['bias'] - jnp.median(logits[mask])

  @jax.jit
  def act(obs):
    features, mask = split_obs(obs)
    prob = Scheduler(model).apply({'params': sched_params}, features, mask).prob
    x = mask & (prob > 0.5)
    out = MoEAllocator(model).apply({'params': alloc_params}, features, x)
    return Action(x, out.b_share, out.f_share), out

  action, out = act(obs)
  assert 0 < int(action.x.sum()) < int(mask.sum())
  _, _, reward, done, _ = step(_keys(6), state, action, params)
  assert bool(jnp.isfinite(reward).all()) and bool(done.all())
  want = _costs(state.slots, allocate(out, action.x, mec), params).objective
  np.testing.assert_allclose(reward, -want, rtol=1e-6)


def test_params_are_traced():
  env = MECEnv(CASE2)
  _, batch = _batched(CASE2)[0](_keys(7), CASE2.params())
  state = jax.tree.map(lambda a: a[0], batch)
  action = env.sample_action(jax.random.PRNGKey(8))
  action = action._replace(x=action.x.at[:3].set(True))

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(key, state, action, params):
    return env.step(key, state, action, params)

  rewards = []
  for f_ser, delta in ((2.5e9, 0.01), (0.02e9, 0.01), (0.02e9, 10.0)):
    mec = CASE2.replace(f_ser=f_ser, delta=delta)
    _, _, reward, _, info = step(jax.random.PRNGKey(9), state, action, mec.params())
    want = _reference(state.slots, action.x, action.b_share, action.f_share, mec)
    np.testing.assert_allclose(reward, -want.objective, rtol=1e-6)
    rewards.append(float(reward))
  assert rewards[1] < rewards[0]  # less server CPU: longer edge delays
  assert float(info['miss_ratio']) > 0 and rewards[2] < rewards[1]  # misses cost more

  # vmap over the params' leaves: one episode per f_ser value of a sweep.
  sweep = sweep_params(CASE2, 'f_ser', [0.02e9, 2.5e9, 10e9])
  swept = jax.jit(jax.vmap(env.step_env, in_axes=(None, None, None, 0)))
  _, _, reward, done, _ = swept(jax.random.PRNGKey(9), state, action, sweep)
  assert reward.shape == done.shape == (3,) and bool(done.all())
  assert bool(jnp.all(jnp.diff(reward) > 0))
  np.testing.assert_allclose(reward[0], rewards[1], rtol=1e-6)


def test_bad_inputs_raise():
  env = MECEnv(CASE2)
  _, batch = _batched(CASE2)[0](_keys(0), CASE2.params())
  state = jax.tree.map(lambda a: a[0], batch)
  good = env.sample_action(jax.random.PRNGKey(1))
  step = jax.jit(env.step)  # the checks run at trace time
  key = jax.random.PRNGKey(2)
  with pytest.raises(ValueError, match=r'action.b_share has shape \(9,\); expected \(8,\)'):
    step(key, state, good._replace(b_share=jnp.ones(9)))
  with pytest.raises(ValueError, match='use jax.vmap'):
    step(key, state, jax.tree.map(lambda a: jnp.stack([a, a]), good))
  with pytest.raises(TypeError, match='action.x has dtype float32'):
    step(key, state, good._replace(x=jnp.full(W, 0.7)))
  with pytest.raises(TypeError, match='Action'):
    step(key, state, (good.x, good.b_share))
  with pytest.raises(ValueError, match='width 10'):
    env.reset(key, CASE2.replace(n_max=10).params())
  with pytest.raises(ValueError, match='case'):
    env.reset(key, CASE1.params())
  with pytest.raises(ValueError, match='case'):
    MECEnv(CASE2, feature_config=CASE1)


def test_obs_uses_fixed_feature_ranges():
  small = CASE2.replace(s_avg=250.0)
  obs, state = _batched(CASE2)[0](_keys(0), small.params())
  features, _ = split_obs(obs)
  np.testing.assert_allclose(features, normalized_features(state.slots, CASE2))
  # Tasks drawn at a quarter of the size look a quarter as big to the networks.
  assert float(features[..., 0].max()) <= 0.25 + 1e-6
