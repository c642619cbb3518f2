"""The gymnax environment: episodes, reward against `slot_costs`, traced params, spaces,
the flat-action wrapper, and gymnax's own wrappers (and rejax, when installed) on both
action forms.

Compiles dominate the run time, so the tests share a few cached jitted functions and
feed them batches rather than compiling a variant per check.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gymnax.environments import environment, spaces
from gymnax.experimental import RolloutWrapper
from gymnax.wrappers import FlattenObservationWrapper, LogWrapper

import numpy_reference as ref
from dynn_jax.config import MECConfig, sweep_params
from dynn_jax.env import Decision, normalized_features, slot_costs
from dynn_jax.gym import (FLAT_LIMIT, SHARE_MIN, Action, FlatActionWrapper, MECEnv,
                          normalize_shares, split_obs)
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


def test_is_a_gymnax_environment():
  env = MECEnv(CASE2)
  assert isinstance(env, environment.Environment)
  assert env.default_params.max_steps_in_episode == 1
  assert env.num_actions == 3 * W and env.name == 'MEC-case2-W8'
  assert isinstance(env.observation_space(env.default_params), spaces.Box)
  action_space = env.action_space(CASE2)  # a MECConfig is accepted as params
  assert isinstance(action_space, spaces.Dict)
  assert all(isinstance(s, spaces.Box) for s in action_space.spaces.values())
  assert action_space.spaces['b_share'].low == SHARE_MIN > 0
  # Equal configs, equal envs: gymnax's jitted step (static self) compiles once for both.
  assert MECEnv(CASE2) == env and hash(MECEnv(CASE2)) == hash(env)
  assert MECEnv(CASE1) != env


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
  contains = jax.vmap(env.state_space(params).contains)
  assert bool(contains(state).all())
  for t in range(3):
    action = sample(_keys(10 + t))
    assert bool(jax.vmap(env.action_space(params).contains)(action).all())
    new_obs, new_state, reward, terminated, truncated, info = step(
        _keys(20 + t), state, action, params)
    assert reward.shape == terminated.shape == (EPISODES,)
    assert bool(jnp.isfinite(reward).all())  # actions of the space: finite rewards
    assert bool(terminated.all()) and bool(truncated.all())
    np.testing.assert_array_equal(info['discount'], 0.0)
    np.testing.assert_allclose(info['objective'], -reward)
    assert bool(((info['miss_ratio'] >= 0) & (info['miss_ratio'] <= 1)).all())
    assert bool((info['mean_delay'] > 0).all() & (info['energy'] > 0).all())
    # The scored slot's observation is the final one; the next episode is a fresh slot
    # at time 0, and obs shows it (gymnax's auto-reset).
    np.testing.assert_array_equal(info['final_observation'], obs)
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
  _, _, reward, _, _, info = step(_keys(2), state, action, params)
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


def test_zero_shares_are_outside_the_space():
  """The space's shares start at SHARE_MIN > 0: its extreme corners give finite rewards
  even at the smallest budgets and largest tasks MECConfig allows; a zero share at an
  offloaded user (outside the space) gives the infinite delay slot_costs defines."""
  env = MECEnv(CASE2)
  space = env.action_space()
  extreme = CASE2.replace(b_max=1.0, f_ser=1e3, s_avg=1e9, c_avg=1e6)
  reset, step, _ = _batched(CASE2)
  x = jnp.ones((EPISODES, W), jnp.int32)
  tiny = jnp.full((EPISODES, W), SHARE_MIN).at[:, 0].set(1.0)  # one user takes ~all
  inside = Action(x, tiny, tiny)
  outside = Action(x, tiny.at[:, 1].set(0.0), tiny)
  assert bool(jax.vmap(space.contains)(inside).all())
  assert not bool(jax.vmap(space.contains)(outside).any())
  for params in (CASE2.params(), extreme.params()):
    _, state = reset(_keys(4), params)
    _, _, reward, _, _, _ = step(_keys(5), state, inside, params)
    assert bool(jnp.isfinite(reward).all()), params.b_max
    _, _, reward, _, _, _ = step(_keys(5), state, outside, params)
    assert bool(jnp.isneginf(reward).all())


def test_case1_offloads_every_user():
  params = CASE1.params()
  reset, step, _ = _batched(CASE1)
  _, state = reset(_keys(3), params)
  x, b, f = _awkward_actions(1)
  x[:] = False  # ignored: users without a CPU always offload
  b, f = np.abs(b) + 0.1, np.abs(f) + 0.1  # no user left without bandwidth or CPU
  action = Action(jnp.asarray(x), jnp.asarray(b, jnp.float32), jnp.asarray(f, jnp.float32))
  _, _, reward, _, _, info = step(_keys(4), state, action, params)
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
  _, _, reward, terminated, _, _ = step(_keys(6), state, action, params)
  assert bool(jnp.isfinite(reward).all()) and bool(terminated.all())
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
    _, _, reward, _, _, info = step(jax.random.PRNGKey(9), state, action, mec.params())
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
  longer = CASE2.params().replace(max_steps_in_episode=5)
  with pytest.raises(ValueError, match=r'max_steps_in_episode = 5; allowed range an integer '
                                       r'in \[1, 1\]'):
    env.reset(key, longer)
  # The Dict space's own samples (a mapping) are actions too.
  sampled = env.action_space().sample(jax.random.PRNGKey(3))
  assert np.isfinite(float(env.step(key, state, dict(sampled))[2]))


def test_obs_uses_fixed_feature_ranges():
  small = CASE2.replace(s_avg=250.0)
  obs, state = _batched(CASE2)[0](_keys(0), small.params())
  features, _ = split_obs(obs)
  np.testing.assert_allclose(features, normalized_features(state.slots, CASE2))
  # Tasks drawn at a quarter of the size look a quarter as big to the networks.
  assert float(features[..., 0].max()) <= 0.25 + 1e-6


# ------------------------------------------------------------------ flat actions


def _flat_reference(state, flat, mec):
  """Reward of flat actions, decoded and scored in float64 NumPy (numpy_reference)."""
  flat = np.nan_to_num(np.asarray(flat, np.float64), nan=0.0)
  flat = np.clip(flat, -FLAT_LIMIT, FLAT_LIMIT)
  rewards = []
  for i in range(flat.shape[0]):
    slot = {k: np.asarray(getattr(state.slots, k)[i]) for k in ('s', 'c', 'd', 'l', 'f_loc')}
    m = np.asarray(state.slots.mask[i])
    slot = {k: v[m] for k, v in slot.items()}
    x = (flat[i, :W] > 0)[m] if mec.case == 2 else np.ones(m.sum(), bool)
    shares = []
    for part in (flat[i, W:2 * W], flat[i, 2 * W:]):
      e = np.exp(part[m])
      shares.append(np.where(x, e, 0.0) / max(np.where(x, e, 0.0).sum(), 1e-300))
    with np.errstate(over='ignore', invalid='ignore'):  # b = 0 where not offloaded
      rewards.append(-ref.costs(slot, x, shares[0] * mec.b_max, shares[1] * mec.f_ser,
                                mec)['objective'])
  return np.asarray(rewards)


def _awkward_flat(seed, n=EPISODES):
  """Flat actions with NaN, ±inf, entries beyond the bounds and negative ones."""
  rng = np.random.default_rng(seed)
  flat = rng.normal(0.0, 4.0, (n, 3 * W)).astype(np.float32)
  flat[0, W + 1] = np.nan
  flat[1, 0] = np.nan             # a NaN bit: not offloaded
  flat[2, 2 * W + 2] = np.inf
  flat[3, W:2 * W] = -np.inf      # every bandwidth share at the floor
  flat[4, W + 3] = 1e30
  return flat


@functools.lru_cache(maxsize=None)
def _flat_step(mec):
  flat = FlatActionWrapper(MECEnv(mec))
  return flat, jax.jit(jax.vmap(flat.step, in_axes=(0, 0, 0, None)))


@pytest.mark.parametrize('mec', [CASE1, CASE2], ids=['case1', 'case2'])
def test_flat_actions_decode_into_the_space(mec):
  flat_env, step = _flat_step(mec)
  env = MECEnv(mec)
  assert isinstance(flat_env.action_space(), spaces.Box) and flat_env.num_actions == 3 * W
  actions = _awkward_flat(0)
  decoded = jax.vmap(flat_env.decode)(jnp.asarray(actions))
  assert bool(jax.vmap(env.action_space().contains)(decoded).all())
  assert not bool(decoded.x[1, 0])  # NaN bit -> 0
  np.testing.assert_allclose(decoded.b_share[0, 1], np.sqrt(SHARE_MIN), rtol=1e-5)
  np.testing.assert_allclose(decoded.f_share[2, 2], 1.0)
  np.testing.assert_allclose(decoded.b_share[3], SHARE_MIN, rtol=1e-5)
  _, state = _batched(mec)[0](_keys(11), mec.params())
  _, _, reward, terminated, _, info = step(_keys(12), state, jnp.asarray(actions),
                                           mec.params())
  assert bool(jnp.isfinite(reward).all()) and bool(terminated.all())
  np.testing.assert_allclose(reward, _flat_reference(state, actions, mec), rtol=2e-4)
  # The space's own samples: finite too.
  sampled = jax.vmap(flat_env.action_space().sample)(_keys(13))
  assert bool(jnp.isfinite(step(_keys(14), state, sampled, mec.params())[2]).all())
  with pytest.raises(ValueError, match=r'action has shape \(8,\); expected \(24,\)'):
    flat_env.decode(jnp.zeros(W))


def _random_policy(space):
  return lambda policy_params, obs, key: space.sample(key)


@pytest.mark.parametrize('form', ['structured', 'flat'])
def test_gymnax_wrappers_run_both_forms(form):
  """LogWrapper over FlattenObservationWrapper, and RolloutWrapper, jitted and vmapped,
  with the params traced (stacked over a sweep of f_ser)."""
  inner = MECEnv(CASE2) if form == 'structured' else FlatActionWrapper(MECEnv(CASE2))
  env = LogWrapper(FlattenObservationWrapper(inner))
  sweep = sweep_params(CASE2, 'f_ser', [0.05e9, 2.5e9])
  space = env.action_space(CASE2.params())

  @jax.jit
  def episodes(key, params):
    keys = jax.random.split(key, 3 * EPISODES).reshape(3, EPISODES, 2)
    obs, state = jax.vmap(env.reset, in_axes=(0, None))(keys[0], params)
    action = jax.vmap(space.sample)(keys[1])
    return jax.vmap(env.step, in_axes=(0, 0, 0, None))(keys[2], state, action, params)

  obs, state, reward, terminated, truncated, info = jax.vmap(episodes, in_axes=(None, 0))(
      jax.random.PRNGKey(0), sweep)
  assert obs.shape == (2, EPISODES, W * 6)
  assert bool(jnp.isfinite(reward).all()) and bool(terminated.all())
  np.testing.assert_array_equal(info['returned_episode_returns'], reward)
  np.testing.assert_array_equal(info['returned_episode_lengths'], 1)
  assert float(reward[0].mean()) < float(reward[1].mean())  # less server CPU costs more

  def returns(params):
    rollout = RolloutWrapper(_random_policy(space), env=inner, env_params=params)
    assert rollout.num_env_steps == 1  # max_steps_in_episode
    return rollout.batch_rollout(jax.random.split(jax.random.PRNGKey(1), EPISODES), None)

  _, action, reward, _, done, cum_return = jax.jit(jax.vmap(returns))(sweep)
  assert reward.shape == (2, EPISODES, 1) and bool(done.all())
  np.testing.assert_allclose(cum_return[..., 0], reward[..., 0])
  assert bool(jnp.isfinite(cum_return).all())
  assert float(cum_return[0].mean()) < float(cum_return[1].mean())


def test_rejax_ppo_trains_on_the_flat_form():
  """rejax (not a requirement; skipped without it) trains its PPO on the flat form
  through gymnax's adapter to the five-value step API that rejax 0.1.3 still uses."""
  rejax = pytest.importorskip('rejax')
  from gymnax.wrappers.compat import LegacyStepAPIWrapper

  class Legacy(LegacyStepAPIWrapper):
    def __deepcopy__(self, memo):  # rejax deep-copies its config, env included
      return self

  mec = MECConfig(case=1, n_users=4)
  env = Legacy(FlattenObservationWrapper(FlatActionWrapper(MECEnv(mec))))
  params = env.default_params
  algo = rejax.PPO.create(env=env, env_params=params, total_timesteps=8192, num_envs=64,
                          num_steps=4, num_epochs=2, num_minibatches=4, eval_freq=8192,
                          skip_initial_evaluation=True, learning_rate=1e-3,
                          agent_kwargs={'hidden_layer_sizes': (16,)})
  key = jax.random.PRNGKey(0)
  trained, _ = jax.jit(algo.train)(key)

  @jax.jit
  def mean_reward(ts):  # rejax's (stochastic) act on the same slots and keys
    act = algo.make_act(ts)

    def one(k):
      k_reset, k_act, k_step = jax.random.split(k, 3)
      obs, state = env.reset(k_reset, params)
      return env.step(k_step, state, act(obs, k_act), params)[2]
    return jax.vmap(one)(jax.random.split(jax.random.PRNGKey(1), 2048)).mean()

  before, after = float(mean_reward(algo.init_state(key))), float(mean_reward(trained))
  assert np.isfinite(after) and after > before, (before, after)
