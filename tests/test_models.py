"""The allocation DyNN's two paths, its gate, masks, op counts, compiles and gradients."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dynn_jax import ConfigError, MECConfig, delay, ops
from dynn_jax.env import normalized_features, sample_slots
from dynn_jax.batching import blocked
from dynn_jax.models import (ModelConfig, MoEAllocator, Policy, Scheduler, StaticAllocator,
                             scheduler_context,
                             all_subnetworks, allocate, choose_kl, exit_sorted_apply,
                             exit_sorted_trace_count, kl_to_option, moe_forward,
                             option_to_kl, per_slot_apply, per_slot_forward,
                             per_slot_trace_count, switch_apply, switch_trace_count)

SMALL = ModelConfig(num_experts=3, max_depth=2, width=8, static_width=12,
                    scheduler_hidden=4, policy_hidden=4, max_users=6)
MEC = MECConfig(case=2, n_users=6)
OPTIONS = list(itertools.product(range(1, SMALL.num_experts + 1),
                                 range(1, SMALL.max_depth + 1)))
# Real users per slot and offloaded users among them; 0 and "all" included.
N_REAL = np.array([0, 1, 2, 3, 6, 6, 4, 5])
N_OFF = np.array([0, 1, 0, 3, 6, 2, 4, 3])


def _batch(key):
  """Features [8, 6, 5] with N_REAL real users, the first N_OFF of them offloaded."""
  slots = sample_slots(key, MEC, len(N_REAL))
  positions = np.arange(MEC.width)
  mask = jnp.asarray(positions < N_REAL[:, None])
  slots = slots._replace(mask=mask)
  offload = jnp.asarray(positions < N_OFF[:, None])
  return normalized_features(slots, MEC), mask, offload


@pytest.fixture(scope='module')
def data():
  return _batch(jax.random.PRNGKey(0))


@pytest.fixture(scope='module')
def moe_vars(data):
  features, _, offload = data
  return MoEAllocator(SMALL).init(jax.random.PRNGKey(1), features, offload)


def _close(got, want, atol=1e-5):
  for name in ('b_logits', 'f_logits', 'b_share', 'f_share', 'gate'):
    np.testing.assert_allclose(getattr(got, name), getattr(want, name), atol=atol,
                               rtol=0, err_msg=name)


# ------------------------------------------------------------------ paths agree


def test_batched_and_per_slot_paths_agree_for_every_kl_and_n(data, moe_vars):
  features, _, offload = data
  every = jax.jit(all_subnetworks, static_argnums=0)(SMALL, moe_vars, features, offload)
  assert every.b_share.shape == (SMALL.num_experts, SMALL.max_depth) + offload.shape
  switch = switch_apply(SMALL)
  for k, l in OPTIONS:
    batched = jax.tree.map(lambda a: a[k - 1, l - 1], every)
    _close(per_slot_apply(SMALL, k, l)(moe_vars, features, offload), batched)
    _close(switch(moe_vars, features, offload, jnp.int32(k), jnp.int32(l)), batched)
  # One slot without a batch axis, and a narrower padded width (N_max < max_users).
  one = per_slot_forward(SMALL, 2, 2, moe_vars, features[4], offload[4])
  _close(one, jax.tree.map(lambda a: a[1, 1, 4], every))
  narrow = MoEAllocator(SMALL).apply(moe_vars, features[3:5, :4], offload[3:5, :4], 3, 1)
  _close(per_slot_apply(SMALL, 3, 1)(moe_vars, features[3:5, :4], offload[3:5, :4]), narrow)


def test_batched_path_takes_per_slot_k_and_l(data, moe_vars):
  features, _, offload = data
  model = MoEAllocator(SMALL)
  ks = jnp.array([1, 2, 3, 3, 2, 1, 3, 2])
  ls = jnp.array([1, 2, 1, 2, 2, 1, 2, 1])
  mixed = jax.jit(model.apply)(moe_vars, features, offload, ks, ls)
  for i in range(len(ks)):
    want = per_slot_forward(SMALL, int(ks[i]), int(ls[i]), moe_vars, features[i], offload[i])
    _close(jax.tree.map(lambda a: a[i], mixed), want)


def test_per_slot_variant_has_only_k_experts_and_l_layers_of_work(moe_vars):
  # The compiled flop count must grow with k and l: no expert or layer is run masked.
  features, _, offload = _batch(jax.random.PRNGKey(5))
  flops = np.zeros((SMALL.num_experts, SMALL.max_depth))
  for k, l in OPTIONS:
    fn = jax.jit(functools.partial(per_slot_forward, SMALL, k, l))
    flops[k - 1, l - 1] = fn.lower(moe_vars, features[0], offload[0]).compile(
        ).cost_analysis()['flops']
  assert (np.diff(flops, axis=0) > 0).all() and (np.diff(flops, axis=1) > 0).all()
  # Hand count of the expert layers on all W = 6 positions (the per-slot path runs
  # padded positions too): the flops of (K, L) exceed (1, 1) by at least that much.
  extra = 2 * 6 * (3 * (5 * 8 + 8 * 8) - 5 * 8)
  assert flops[-1, -1] - flops[0, 0] >= extra


# ---------------------------------------------------------------------- the gate


def _numpy_gate_scores(features, offload, kernel):
  f = np.asarray(features, np.float64)
  m = np.asarray(offload)
  n = m.sum(-1, keepdims=True)
  mean = (f * m[..., None]).sum(-2) / np.maximum(n, 1)
  top = np.where(n > 0, np.where(m[..., None], f, -np.inf).max(-2), 0.0)
  z = np.concatenate([mean, top, n / SMALL.max_users], -1)
  return z @ np.asarray(kernel, np.float64)


def test_gate_keeps_exactly_the_k_best_experts(data, moe_vars):
  features, _, offload = data
  model = MoEAllocator(SMALL)
  scores = _numpy_gate_scores(features, offload, moe_vars['params']['gate_kernel'])
  apply = jax.jit(model.apply)
  for k in range(1, SMALL.num_experts + 1):
    gate = np.asarray(apply(moe_vars, features, offload, k, 1).gate)
    order = np.argsort(-scores, -1, kind='stable')  # ties: lower index first
    want = np.zeros_like(gate, bool)
    np.put_along_axis(want, order[:, :k], True, -1)
    np.testing.assert_array_equal(gate > 0, want)
    e = np.where(want, np.exp(scores - scores.max(-1, keepdims=True)), 0.0)
    np.testing.assert_allclose(gate, e / e.sum(-1, keepdims=True), atol=1e-5)
    noisy = apply(moe_vars, features, offload, k, 1, jax.random.PRNGKey(k))
    assert ((np.asarray(noisy.gate) > 0).sum(-1) == k).all()
  # The noise is really applied in training.
  quiet = apply(moe_vars, features, offload, 2, 1)
  noisy = apply(moe_vars, features, offload, 2, 1, jax.random.PRNGKey(9))
  assert np.abs(np.asarray(noisy.gate - quiet.gate)).max() > 1e-3


# --------------------------------------------------------------- masks and budgets


def _check_decision(out, offload):
  decision = allocate(out, offload, MEC)
  for value, total in ((decision.b, MEC.b_max), (decision.f, MEC.f_ser)):
    value = np.asarray(value)
    assert np.isfinite(value).all()
    assert (value[~np.asarray(offload)] == 0).all()
    sums = value.sum(-1)
    want = np.where(np.asarray(offload).any(-1), total, 0.0)
    np.testing.assert_allclose(sums, want, rtol=1e-5)
  np.testing.assert_array_equal(decision.x, offload)


def test_only_offloaded_users_get_resources_and_budgets_are_met(data, moe_vars):
  features, _, offload = data
  for k, l in ((1, 1), (3, 2)):
    _check_decision(MoEAllocator(SMALL).apply(moe_vars, features, offload, k, l), offload)
  static = StaticAllocator(SMALL)
  _check_decision(static.apply(static.init(jax.random.PRNGKey(2), features, offload),
                               features, offload), offload)


def test_nobody_offloaded_gives_zeros_and_finite_gradients(data, moe_vars):
  features, _, offload = data
  none = jnp.zeros_like(offload)
  model = MoEAllocator(SMALL)
  out = model.apply(moe_vars, features, none, 2, 2, jax.random.PRNGKey(0))
  assert all(np.isfinite(np.asarray(a)).all() for a in jax.tree.leaves(out))
  assert float(jnp.abs(out.b_share).sum() + jnp.abs(out.f_share).sum()) == 0.0
  loss = lambda v: model.apply(v, features, none, 2, 2).b_share.sum()
  grads = jax.grad(loss)(moe_vars)
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))


# ------------------------------------------------------------------- refusals


def test_config_refuses_bad_fields_naming_them():
  for field, value, allowed in (('num_experts', 0, '[1, inf)'), ('max_depth', 2.0, '[1, inf)'),
                                ('leaky_slope', 1.0, '[0.0, 1.0)'),
                                ('gate_noise', 1, 'True, False'),
                                ('op_zeta', 0.0, '(0.0, inf)'), ('max_users', -3, '[1, inf)')):
    with pytest.raises(ConfigError, match=rf'ModelConfig\.{field} = {value!r}.*'
                       + allowed.replace('[', r'\[').replace('(', r'\(').replace(')', r'\)')):
      ModelConfig(**{field: value})
  with pytest.raises(ConfigError, match='unknown'):
    ModelConfig.from_dict({'experts': 3})
  assert ModelConfig.for_env(MECConfig(n_users=8, n_max=12)).max_users == 12
  assert hash(SMALL) == hash(SMALL.replace()) and SMALL == ModelConfig.from_dict(SMALL.to_dict())


def test_out_of_range_k_l_and_too_many_users_are_refused(data, moe_vars):
  features, _, offload = data
  model = MoEAllocator(SMALL)
  for k, l, name in ((0, 1, 'k'), (4, 1, 'k'), (1, 0, 'l'), (1, 3, 'l')):
    with pytest.raises(ValueError, match=rf'{name} = .*\[1, \d\]'):
      model.apply(moe_vars, features, offload, k, l)
    with pytest.raises(ValueError, match=rf'{name} = '):
      per_slot_apply(SMALL, k, l)
    with pytest.raises(ValueError, match=rf'{name} = '):
      ops.allocation_ops(SMALL, k, l, 3)
  with pytest.raises(ValueError, match='integer'):
    model.apply(moe_vars, features, offload, 2.0, 1)
  with pytest.raises(ValueError, match='Python int'):
    per_slot_apply(SMALL, jnp.int32(2), 1)
  with pytest.raises(ValueError, match='k = '):
    model.apply(moe_vars, features, offload, jnp.array([1, 2, 4, 1, 1, 1, 1, 1]), 1)
  with pytest.raises(ValueError, match='n_offloaded = 7'):
    ops.allocation_ops(SMALL, 1, 1, 7)
  wide = jnp.zeros((2, 7, 5))
  with pytest.raises(ValueError, match='7 user positions.*max_users = 6'):
    model.apply(moe_vars, wide, jnp.ones((2, 7), bool), 1, 1)
  with pytest.raises(ValueError, match='max_users'):
    per_slot_apply(SMALL, 1, 1)(moe_vars, wide, jnp.ones((2, 7), bool))
  with pytest.raises(ValueError, match='bool'):
    model.apply(moe_vars, features, offload.astype(jnp.float32), 1, 1)
  # Traced values cannot raise: they poison the output instead of being clipped.
  bad = jax.jit(lambda k: model.apply(moe_vars, features, offload, k, 1))(jnp.int32(4))
  assert np.isnan(np.asarray(bad.b_share)).all()
  bad = switch_apply(SMALL).jitted(moe_vars, features, offload, jnp.int32(1), jnp.int32(3))
  assert np.isnan(np.asarray(bad.f_share)).all()
  assert np.isnan(float(jax.jit(lambda l: ops.allocation_ops(SMALL, 1, l, 3))(0)))


# ------------------------------------------------------------------ op counts


def test_paper_size_op_and_parameter_counts():
  paper = ModelConfig()
  dynamic = 2 * (5 * 64 + 64 * 64 + 64 * 64) * 10 * 30
  assert dynamic == 5_107_200
  assert float(ops.allocation_dynamic_ops(paper, 10, 3, 30)) == dynamic
  assert abs(dynamic - 5.126e6) / 5.126e6 < 0.01
  expert = (5 * 64 + 64) + 2 * (64 * 64 + 64)
  assert ops.allocation_dynamic_params(paper) == 10 * expert == 87_040
  table = ops.table_one(paper, 30)
  assert table['fixed_ops'] == 2 * 11 * 10 + 30 * 2 * (2 * 64)
  assert table['fixed_params'] == 2 * 11 * 10 + 2 * 64


def _hand_ops(k, l, n, zeta, iota):
  layer = lambda a, b: zeta * a * b + iota
  expert = [layer(5, 8), layer(8, 8)][:l]
  return k * n * sum(expert) + layer(11, 3) + 2 * n * layer(8, 1)


@pytest.mark.parametrize('zeta,iota', [(2.0, 0.0), (3.0, 1.0)])
def test_op_counts_and_delays_match_a_hand_count(zeta, iota):
  config = SMALL.replace(op_zeta=zeta, op_iota=iota)
  table = np.asarray(ops.ops_table(config, 4))
  for k, l in OPTIONS:
    for n in (0, 1, 4, 6):
      assert float(ops.allocation_ops(config, k, l, n)) == pytest.approx(
          _hand_ops(k, l, n, zeta, iota), rel=1e-6)
    assert table[k - 1, l - 1] == pytest.approx(_hand_ops(k, l, 4, zeta, iota), rel=1e-6)
  scheduler = 5 * (zeta * 5 * 4 + iota + zeta * 4 + iota)   # 5 real users
  policy = zeta * 11 * 4 + iota + zeta * 4 * 6 + iota
  delays = jax.jit(lambda k, l, n, m: delay.MODELLED.pipeline(config, MEC, k, l, n, m))(
      jnp.array([1, 3]), jnp.array([2, 1]), jnp.array([3, 4]), 5)
  for i, (k, l, n) in enumerate(((1, 2, 3), (3, 1, 4))):
    want = (_hand_ops(k, l, n, zeta, iota) + scheduler + policy) / MEC.f_ser
    assert float(delays.edge[i]) == pytest.approx(want, rel=1e-6)
  assert float(delays.loc) == pytest.approx(scheduler / MEC.f_ser, rel=1e-6)
  case1 = MECConfig(n_users=6, f_ser=1e9, cycles_per_op=2.0)
  grid = delay.table(delay.MODELLED, config, case1, 3, policy=False)
  assert grid.edge.shape == (3, 2) and float(grid.loc) == 0.0
  none = delay.table(delay.NONE, config, MEC, jnp.array([3, 4]), 5)
  assert none.edge.shape == (2, 3, 2) and not np.any(np.asarray(none.edge))
  assert float(grid.edge[2, 1]) == pytest.approx(2.0 * _hand_ops(3, 2, 3, zeta, iota) / 1e9,
                                                 rel=1e-6)


def test_parameter_counts_match_the_initialised_models(data):
  features, mask, offload = data
  key = jax.random.PRNGKey(3)
  for config in (SMALL, SMALL.replace(gate_noise=False)):
    variables = MoEAllocator(config).init(key, features, offload)
    assert ops.count_params(variables) == ops.allocation_params(config)
  assert ops.allocation_params(SMALL) == 3 * ((5 * 8 + 8) + (8 * 8 + 8)) + 2 * 11 * 3 + 2 * 8
  assert ops.allocation_params(SMALL, 2, 1) == 2 * (5 * 8 + 8) + 2 * 11 * 3 + 2 * 8
  for model, count in ((StaticAllocator(SMALL), ops.static_params),
                       (Scheduler(SMALL), ops.scheduler_params),
                       (Policy(SMALL), ops.policy_params)):
    m = mask if isinstance(model, Scheduler) else offload
    assert ops.count_params(model.init(key, features, m)) == count(SMALL)
  assert ops.static_params(SMALL) == (5 * 12 + 12) + (12 * 12 + 12) + 2 * 12


# ---------------------------------------------------------------- compile once


def test_per_slot_variant_compiles_once(moe_vars):
  features, _, offload = _batch(jax.random.PRNGKey(10))
  before = per_slot_trace_count(SMALL, 2, 2)
  run = per_slot_apply(SMALL, 2, 2)
  assert per_slot_apply(SMALL, 2, 2) is run
  run(moe_vars, features, offload)
  first = per_slot_trace_count(SMALL, 2, 2)
  assert first - before <= 1  # 0 when an earlier test already traced this shape
  for seed in range(3):  # new values, new offloading sets, same shapes: no retrace
    f, _, o = _batch(jax.random.PRNGKey(20 + seed))
    run(moe_vars, f, jnp.roll(o, seed, -1))
  params = jax.tree.map(lambda a: a * 1.5, moe_vars)
  run(params, features, offload)
  assert per_slot_trace_count(SMALL, 2, 2) == first
  switch = switch_apply(SMALL)
  switch(moe_vars, features, offload, 1, 1)
  traced = switch_trace_count(SMALL)
  for k, l in OPTIONS:
    switch(moe_vars, features, offload, k, l)
  assert switch_trace_count(SMALL) == traced


# ------------------------------------------------------------------- gradients


def _nonzero(tree):
  return {name: np.abs(np.asarray(g)) > 0 for name, g in tree['params'].items()}


def _one_slot(data):
  features, _, offload = data
  return features[6], offload[6]  # 4 users offloaded


def test_gradients_reach_only_the_selected_experts_layers_and_head(data, moe_vars):
  features, offload = _one_slot(data)
  weights = jnp.linspace(0.5, 2.0, offload.shape[-1])
  model = MoEAllocator(SMALL)

  def loss(v, head, k, l, key):
    out = model.apply(v, features, offload, k, l, key)
    return (weights * getattr(out, head)).sum()

  key = jax.random.PRNGKey(4)
  selected = np.asarray(model.apply(moe_vars, features, offload, 2, 1, key).gate) > 0
  assert selected.sum() == 2
  g = _nonzero(jax.grad(loss)(moe_vars, 'b_share', 2, 1, key))
  assert not g['layer2_kernel'].any() and not g['layer2_bias'].any()
  assert not g['head_f_kernel'].any() and g['head_b_kernel'].any()
  assert g['gate_kernel'].any() and g['noise_kernel'].any()
  per_expert = g['layer1_kernel'].any((1, 2))
  np.testing.assert_array_equal(per_expert, selected)
  np.testing.assert_array_equal(g['layer1_bias'].any(1), selected)
  # Loss 2 reaches head B only; without noise the noise kernel gets nothing.
  g = _nonzero(jax.grad(loss)(moe_vars, 'f_share', 2, 2, None))
  assert g['head_f_kernel'].any() and not g['head_b_kernel'].any()
  assert not g['noise_kernel'].any() and g['layer2_kernel'].any()
  # One expert: its gate weight is 1 whatever the scores, so the gate learns nothing.
  g = _nonzero(jax.grad(loss)(moe_vars, 'b_share', 1, 2, None))
  assert not g['gate_kernel'].any() and g['layer2_kernel'].any()


def test_full_network_trains_every_parameter(data, moe_vars):
  features, offload = _one_slot(data)
  weights = jnp.linspace(0.5, 2.0, offload.shape[-1])

  def both_heads(out):
    return (weights * (out.b_share + jnp.log(out.f_share + 1e-3))).sum()

  model = MoEAllocator(SMALL)
  loss = lambda v: both_heads(model.apply(v, features, offload, 3, 2, jax.random.PRNGKey(5)))
  for name, mask in _nonzero(jax.grad(loss)(moe_vars)).items():
    axes = tuple(range(1, mask.ndim))
    assert mask.any(axes).all() if name.startswith('layer') else mask.any(), name
  static = StaticAllocator(SMALL)
  variables = static.init(jax.random.PRNGKey(6), features, offload)
  grads = jax.grad(lambda v: both_heads(static.apply(v, features, offload)))(variables)
  assert all(np.abs(np.asarray(g)).max() > 0 for g in jax.tree.leaves(grads))
  scheduler, policy = Scheduler(SMALL), Policy(SMALL)
  ramp = jnp.arange(1.0, 7.0)  # 6 users, and K * L = 6 options
  for model, output in ((scheduler, lambda v: scheduler.apply(v, features, offload).prob),
                        (policy, lambda v: policy.apply(v, features, offload))):
    variables = model.init(jax.random.PRNGKey(7), features, offload)
    grads = jax.grad(lambda v: (ramp * output(v)).sum())(variables)
    assert all(np.abs(np.asarray(g)).max() > 0 for g in jax.tree.leaves(grads)), model


# --------------------------------------------------------- scheduler and policy


def test_scheduler_reading_the_server_cpu(data):
  features, mask, _ = data
  config = SMALL.replace(scheduler_context='server_cpu')
  scheduler = Scheduler(config)
  variables = scheduler.init(jax.random.PRNGKey(8), features, mask)
  assert variables['params']['hidden']['kernel'].shape == (6, config.scheduler_hidden)
  assert ops.count_params(variables) == ops.scheduler_params(config)
  assert ops.scheduler_ops(config, 1) == 2 * 6 * 4 + 2 * 4
  # log(f_ser / reference f_ser): 0 at the features' own system.
  context = scheduler_context(config, MEC.replace(f_ser=2 * MEC.f_ser), MEC)
  np.testing.assert_allclose(context, [np.log(2.0)], rtol=1e-6)
  assert scheduler_context(SMALL, MEC, MEC).shape == (0,)
  logits = lambda c: np.asarray(scheduler.apply(variables, features, mask, c).logits)
  np.testing.assert_array_equal(logits(None), logits(jnp.zeros(1)))
  assert not np.allclose(logits(context), logits(None))
  # One context per slot [B, 1] equals slot-by-slot application.
  per_slot = jnp.linspace(-1.0, 1.0, features.shape[0])[:, None]
  expected = np.stack([logits(c)[i] for i, c in enumerate(per_slot)])
  np.testing.assert_allclose(logits(per_slot), expected, rtol=1e-6)
  with pytest.raises(ValueError, match='context'):
    scheduler.apply(variables, features, mask, jnp.zeros(2))


def test_scheduler_and_policy_outputs(data):
  features, mask, offload = data
  key = jax.random.PRNGKey(8)
  scheduler = Scheduler(SMALL)
  prob = scheduler.apply(scheduler.init(key, features, mask), features, mask).prob
  assert (np.asarray(prob)[~np.asarray(mask)] == 0).all()
  assert ((np.asarray(prob)[np.asarray(mask)] > 0) & (np.asarray(prob)[np.asarray(mask)] < 1)).all()
  policy = Policy(SMALL)
  logits = policy.apply(policy.init(key, features, offload), features, offload)
  assert logits.shape == (len(N_REAL), SMALL.num_options)
  assert np.isfinite(np.asarray(logits)).all()  # slot 0 offloads nobody
  k, l = choose_kl(logits, SMALL)
  table = np.asarray(logits).reshape(-1, SMALL.num_experts, SMALL.max_depth)
  best = table.reshape(len(N_REAL), -1).argmax(-1)
  np.testing.assert_array_equal(np.asarray(k - 1), best // SMALL.max_depth)
  np.testing.assert_array_equal(np.asarray(l - 1), best % SMALL.max_depth)


def test_option_index_round_trip():
  options = jnp.arange(SMALL.num_options)
  k, l = option_to_kl(options, SMALL)
  assert sorted(zip(np.asarray(k).tolist(), np.asarray(l).tolist())) == OPTIONS
  np.testing.assert_array_equal(kl_to_option(k, l, SMALL), options)
  np.testing.assert_array_equal(np.asarray(k), [1, 1, 2, 2, 3, 3])


def test_option_index_refuses_concrete_out_of_range_values_only():
  K, L = SMALL.num_experts, SMALL.max_depth
  for bad in (K * L, -1, np.array([0, K * L])):
    with pytest.raises(ValueError, match=r'option .*\[0, 5\]'):
      option_to_kl(bad, SMALL)
  with pytest.raises(ValueError, match=r'k = 0 .*\[1, 3\]'):
    kl_to_option(0, 1, SMALL)
  with pytest.raises(ValueError, match=r'l = 3 .*\[1, 2\]'):
    kl_to_option(jnp.array([1, 1]), jnp.array([1, 3]), SMALL)
  # Traced values cannot be checked: they map through unchanged (the paths give NaN).
  k, l = jax.jit(lambda o: option_to_kl(o, SMALL))(K * L)
  assert (int(k), int(l)) == (K + 1, 1)
  assert int(jax.jit(lambda k, l: kl_to_option(k, l, SMALL))(0, 1)) == -L


# ------------------------------------------------------------- exit-sorted path


def _mixed_batch(size, seed):
  slots = sample_slots(jax.random.PRNGKey(seed), MEC, size)
  offload = slots.mask & (jax.random.uniform(jax.random.PRNGKey(seed + 1),
                                             slots.mask.shape) < 0.7)
  return normalized_features(slots, MEC), offload.at[0].set(False)  # one slot offloads nobody


def _random_exits(size, seed):
  option = np.random.default_rng(seed).integers(0, SMALL.num_options, size)
  return option_to_kl(option, SMALL)


def test_exit_sorted_path_matches_the_batched_path_and_traces_once(moe_vars):
  masked = jax.jit(functools.partial(moe_forward, SMALL))
  features, offload = _mixed_batch(37, 30)  # 37 slots, blocks of 8: partial blocks
  before = exit_sorted_trace_count(SMALL)
  full = lambda value: jnp.full(37, value, jnp.int32)
  mixes = [_random_exits(37, 0), _random_exits(37, 1), (full(2), full(1))]  # last: one exit
  counts = []
  for k, l in mixes:
    got = exit_sorted_apply(SMALL, moe_vars, features, offload, k, l, block=8)
    _close(got, masked(moe_vars, features, offload, k, l))
    counts.append(exit_sorted_trace_count(SMALL))
  assert counts[0] - before <= 1 and counts[-1] == counts[0]  # a new mix is no new shape
  # Scalar (k, l) are broadcast over the batch.
  _close(exit_sorted_apply(SMALL, moe_vars, features, offload, 3, 2, block=8),
         masked(moe_vars, features, offload, full(3), full(2)))


def test_exit_sorted_path_poisons_traced_bad_exits_and_refuses_bad_arguments(moe_vars):
  features, offload = _mixed_batch(12, 50)  # fewer slots than one block
  run = jax.jit(lambda k, l: exit_sorted_apply(SMALL, moe_vars, features, offload, k, l,
                                               block=16))
  masked = jax.jit(lambda k, l: moe_forward(SMALL, moe_vars, features, offload, k, l))
  k, l = _random_exits(12, 3)
  _close(run(k, l), masked(k, l))
  k = jnp.array([1, 2, 3, 4, 0, 1, 2, 3, 1, 2, 3, 1])
  l = jnp.array([1, 2, 1, 1, 1, 3, 2, 1, 0, 2, 1, 1])
  out = run(k, l)
  bad = np.array([3, 4, 5, 8])
  for name, leaf in out._asdict().items():
    leaf = np.asarray(leaf)
    assert np.isnan(leaf[bad]).all(), name
    assert np.isfinite(np.delete(leaf, bad, 0)).all(), name
  _close(out, masked(k, l))  # NaN where the masked path has NaN too
  for block in (0, -4, 2.5, True, '8', None):
    with pytest.raises(ValueError, match='block'):
      exit_sorted_apply(SMALL, moe_vars, features, offload, k, l, block=block)
  with pytest.raises(ValueError, match='k = '):
    exit_sorted_apply(SMALL, moe_vars, features, offload, k, jnp.ones(12, int))
  with pytest.raises(ValueError, match=r'\[B, W'):
    exit_sorted_apply(SMALL, moe_vars, features[0], offload[0], 1, 1)


def test_blocked_full_width_paths_equal_the_whole_batch(moe_vars):
  features, offload = _mixed_batch(37, 60)  # 37 slots in blocks of 16: a padded last block
  K, L = SMALL.num_experts, SMALL.max_depth
  whole = moe_forward(SMALL, moe_vars, features, offload, K, L)
  run = jax.jit(blocked(lambda f, m: moe_forward(SMALL, moe_vars, f, m, K, L), block=16))
  _close(run(features, offload), whole)
  static = StaticAllocator(SMALL)
  variables = static.init(jax.random.PRNGKey(3), features, offload)
  got = blocked(lambda f, m: static.apply(variables, f, m), block=16)(features, offload)
  want = static.apply(variables, features, offload)
  for name in ('b_logits', 'f_logits', 'b_share', 'f_share'):  # no gate in the static net
    np.testing.assert_allclose(getattr(got, name), getattr(want, name), atol=1e-5, rtol=0)
  with pytest.raises(ValueError, match='block'):
    blocked(lambda f: f, block=0)
