"""The dynamic network's own machinery: fixed-exit and hindsight methods, the delay
models (none / modelled / measured answer the same calls), per-depth heads, the policy's
system context and the DyNN training options (sandwich rule, in-place distillation,
load balancing, measured-delay training)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dynn_jax import ConfigError, MECConfig, delay, evaluation, latency, ops
from dynn_jax.env import normalized_features, sample_slots, slot_costs
from dynn_jax.models import (ModelConfig, MoEAllocator, Policy, allocate, exit_sorted_apply,
                             moe_forward, per_slot_forward)
from dynn_jax.networks import Params, init_params, save_networks
from dynn_jax.training import TrainConfig, sample_kl, train_all, train_allocator
from dynn_jax.training.steps import load_imbalance, share_divergence

MEC = MECConfig(case=1, n_users=6)
MODEL = ModelConfig.for_env(MEC, num_experts=3, max_depth=2, width=8, static_width=8)
HEADS = MODEL.replace(depth_heads=True)
TINY = TrainConfig(batch=8, full_steps=2, width_steps=2, depth_steps=4, static_steps=0,
                   policy_steps=0, joint_steps=0, steps_per_call=2)


@pytest.fixture(scope='module')
def params():
  key = jax.random.PRNGKey(0)
  return Params(allocator=init_params(MoEAllocator(MODEL), key, MEC),
                policy=init_params(Policy(MODEL), key, MEC))


@pytest.fixture(scope='module')
def slots():
  return sample_slots(jax.random.PRNGKey(1), MEC, 16)


# ----------------------------------------------------------------- methods


def test_exit_method_is_the_masked_path_of_that_exit(params, slots):
  setting = evaluation.Setting(mec=MEC, model=MODEL, feature_config=MEC)
  run_on = (setting.static, MEC.params())
  feats = normalized_features(slots, MEC)
  for k, l in ((1, 1), (2, 1), (3, 2)):
    outcome = evaluation.method(f'exit_{k}_{l}')(*run_on, None, slots, params)
    masked = moe_forward(MODEL, {'params': params.allocator}, feats, slots.mask, k, l)
    want = allocate(masked, slots.mask, MEC)
    np.testing.assert_allclose(outcome.decision.b, want.b, rtol=2e-5, atol=1e-3)
    np.testing.assert_allclose(outcome.decision.f, want.f, rtol=2e-5, atol=1.0)
    # No policy runs for a fixed exit: the allocator's ops only (case 1, no scheduler).
    np.testing.assert_allclose(outcome.ops, ops.allocation_ops(MODEL, k, l, 6), rtol=1e-6)


def test_hindsight_is_the_best_exit_of_every_slot(params, slots):
  for mode in (delay.MODELLED, delay.NONE):
    setting = evaluation.Setting(mec=MEC, model=MODEL, feature_config=MEC, delay=mode)
    run_on = (setting.static, MEC.params())
    best = evaluation.method('hindsight')(*run_on, None, slots, params)
    got = slot_costs(slots, best.decision, MEC, best.t_inf_edge, best.t_inf_loc).objective
    each = []
    for k in range(1, 4):
      for l in range(1, 3):
        o = evaluation.method(f'exit_{k}_{l}')(*run_on, None, slots, params)
        # The hindsight pipeline runs a policy: each exit is charged as a policy's pick.
        d = mode.pipeline(MODEL, MEC, k, l, slots.mask.sum(-1), policy=True)
        each.append(slot_costs(slots, o.decision, MEC, d.edge, d.loc).objective)
    each = np.stack(each)
    assert np.all(np.asarray(got) <= each.min(0) * (1 + 1e-5) + 1e-9)
    np.testing.assert_allclose(got, each.min(0), rtol=1e-5)


def test_exit_methods_outside_the_networks_name_the_range(params):
  setting = evaluation.Setting(mec=MEC, model=MODEL, feature_config=MEC)
  for name in ('exit_4_1', 'exit_1_3', 'exit_0_1'):
    with pytest.raises(ValueError, match=r'k = 1\.\.3, l = 1\.\.2'):
      evaluation.check_methods([name], params, setting)
  with pytest.raises(ValueError, match='exit_<k>_<l>'):
    evaluation.check_methods(['exit_1'], params, setting)


def test_evaluate_without_inference_delay_charges_none(params):
  results = {}
  for mode in (delay.NONE, delay.MODELLED):
    setting = evaluation.Setting(mec=MEC, model=MODEL, feature_config=MEC, delay=mode)
    results[mode.mode] = evaluation.evaluate(setting, ['exit_3_2', 'fix_moe'], params,
                                             slots=64, chunk=64)
  none, modelled = results['none'], results['modelled']
  assert none.mode == 'none' and modelled.mode == 'modelled'
  assert none.mean('exit_3_2', 'inference_share') == 0.0
  assert modelled.mean('exit_3_2', 'inference_share') > 0.0
  # The full exit for every slot is fix_moe: same allocation, same delays.
  assert none.mean('exit_3_2') == pytest.approx(none.mean('fix_moe'), rel=1e-5)
  assert modelled.mean('exit_3_2') == pytest.approx(modelled.mean('fix_moe'), rel=1e-5)
  assert none.mean('exit_3_2') < modelled.mean('exit_3_2')


# ------------------------------------------------------------ delay models


def _table(model, **changes):
  table = {'format': 1, 'device': latency.current_device(), 'n_users': MEC.width,
           'model': model.to_dict(),
           'allocator_s': [[1e-4 * (k + 1) * (l + 1) for l in range(model.max_depth)]
                           for k in range(model.num_experts)],
           'static_s': 1e-3, 'policy_s': 1e-5, 'scheduler_s': 2e-5,
           'solvers_s': {'kkt_weighted': 1e-4}}
  table.update(changes)
  return table


def test_the_three_delay_models_answer_the_same_calls(tmp_path):
  path = tmp_path / 'table.json'
  path.write_text(json.dumps(_table(MODEL)))
  measured = latency.load_table(str(path), MODEL, MEC)
  n = jnp.array([2, 6])
  for mode in (delay.NONE, delay.MODELLED, measured):
    one = mode.pipeline(MODEL, MEC, 2, 1, n, policy=True)
    grid = delay.table(mode, MODEL, MEC, n)
    assert one.edge.shape == (2,) and grid.edge.shape == (2, 3, 2)
    np.testing.assert_allclose(grid.edge[:, 1, 0], one.edge, rtol=1e-6)
  assert float(measured.pipeline(MODEL, MEC, 3, 2, 6).edge) == pytest.approx(6e-4 + 1e-5)
  assert float(delay.MODELLED.pipeline(MODEL, MEC, 3, 2, 6).edge) == pytest.approx(
      float(delay.modelled_seconds(ops.allocation_ops(MODEL, 3, 2, 6) + ops.policy_ops(MODEL),
                                   MEC)), rel=1e-6)


# ------------------------------------------------------------ per-depth heads


def test_per_depth_heads_agree_on_every_path(slots):
  variables = MoEAllocator(HEADS).init(jax.random.PRNGKey(2), normalized_features(slots, MEC),
                                       slots.mask)
  assert variables['params']['head_b_kernel'].shape == (2, 8)
  assert ops.count_params(variables) == ops.allocation_params(HEADS)
  feats = normalized_features(slots, MEC)
  k = jnp.array([1, 2, 3, 1] * 4)
  l = jnp.array([1, 2, 1, 2] * 4)
  masked = MoEAllocator(HEADS).apply(variables, feats, slots.mask, k, l)
  sorted_ = exit_sorted_apply(HEADS, variables, feats, slots.mask, k, l, block=4)
  np.testing.assert_allclose(sorted_.b_share, masked.b_share, rtol=1e-5, atol=1e-6)
  for i in range(4):
    one = per_slot_forward(HEADS, int(k[i]), int(l[i]), variables, feats[i], slots.mask[i])
    np.testing.assert_allclose(one.f_share, masked.f_share[i], rtol=1e-5, atol=1e-6)
  # Depths read their own heads: zeroing depth 2's heads changes depth 2 only.
  p = jax.tree.map(jnp.asarray, variables['params'])
  p = {**p, 'head_b_kernel': p['head_b_kernel'].at[1].set(0.0)}
  changed = MoEAllocator(HEADS).apply({'params': p}, feats, slots.mask, k, l)
  depth2 = np.asarray(l == 2)
  np.testing.assert_array_equal(changed.b_share[~depth2], masked.b_share[~depth2])
  assert not np.allclose(changed.b_share[depth2], masked.b_share[depth2])


def test_policy_reads_the_server_cpu_context(slots):
  model = MODEL.replace(policy_context='server_cpu')
  policy = Policy(model)
  p = init_params(policy, jax.random.PRNGKey(3), MEC)
  assert p['hidden']['kernel'].shape[0] == 12
  assert ops.policy_params(model) == ops.count_params(p)
  assert ops.policy_ops(model) == ops.policy_ops(MODEL) + 2 * model.policy_hidden
  feats = normalized_features(slots, MEC)
  zero = policy.apply({'params': p}, feats, slots.mask)
  np.testing.assert_array_equal(zero, policy.apply({'params': p}, feats, slots.mask,
                                                   jnp.zeros(1)))
  assert not np.allclose(zero, policy.apply({'params': p}, feats, slots.mask, jnp.ones(1)))
  per_slot = policy.apply({'params': p}, feats, slots.mask, jnp.ones((16, 1)))
  np.testing.assert_allclose(per_slot, policy.apply({'params': p}, feats, slots.mask,
                                                    jnp.ones(1)), rtol=1e-6)


# ------------------------------------------------------------ training options


def test_sandwich_rule_trains_the_largest_and_smallest_exits_every_step():
  train = TINY.replace(sandwich=True)
  step = jnp.int32(TINY.alloc_steps - 1)   # the last step: every exit allowed
  k, l = sample_kl(jax.random.PRNGKey(0), step, (16,), train, MODEL)
  assert np.all(np.asarray(k[:4]) == 3) and np.all(np.asarray(l[:4]) == 2)
  assert np.all(np.asarray(k[4:8]) == 1) and np.all(np.asarray(l[4:8]) == 1)
  # During the full stage the smallest allowed exit is the largest one.
  k, l = sample_kl(jax.random.PRNGKey(0), jnp.int32(0), (16,), train, MODEL)
  assert np.all(np.asarray(k) == 3) and np.all(np.asarray(l) == 2)
  # sandwich_middle = 1: the middle slots share one random exit.
  k, l = sample_kl(jax.random.PRNGKey(5), step, (16,), train.replace(sandwich_middle=1),
                   MODEL)
  assert len({(int(a), int(b)) for a, b in zip(k[8:], l[8:])}) == 1


def test_distillation_and_balance_terms_against_numpy():
  rng = np.random.default_rng(0)
  x = np.array([[True, True, True, False], [True, False, True, True]])

  def shares(logits):
    e = np.where(x, np.exp(logits), 0.0)
    return e / e.sum(-1, keepdims=True)

  t, s = shares(rng.normal(size=(2, 4))), shares(rng.normal(size=(2, 4)))
  out = lambda a: evaluation.Allocation(a, a, jnp.asarray(a, jnp.float32),
                                        jnp.asarray(a, jnp.float32), None)
  kl_b, kl_f = share_divergence(out(s), out(t), jnp.asarray(x))
  want = np.where(x, t * (np.log(np.where(x, t, 1)) - np.log(np.where(x, s, 1))), 0).sum(-1)
  assert float(kl_b) == pytest.approx(want.mean(), rel=1e-5) and float(kl_f) == float(kl_b)
  same, _ = share_divergence(out(t), out(t), jnp.asarray(x))
  assert abs(float(same)) < 1e-6
  gate = rng.dirichlet(np.ones(3), size=(5,))
  importance = gate.sum(0)
  assert float(load_imbalance(jnp.asarray(gate))) == pytest.approx(
      importance.var() / importance.mean() ** 2, rel=1e-5)
  assert float(load_imbalance(jnp.full((5, 3), 1 / 3))) == pytest.approx(0.0, abs=1e-7)


@pytest.fixture(scope='module')
def base_allocator():
  return train_allocator(MEC, MODEL, TINY)


@pytest.mark.parametrize('option', [{'sandwich': True}, {'distill_weight': 1.0},
                                    {'balance_weight': 1.0}])
def test_each_option_changes_training(option, base_allocator):
  changed = train_allocator(MEC, MODEL, TINY.replace(**option))
  assert not np.allclose(changed['layer1_kernel'], base_allocator['layer1_kernel'])


def test_training_with_a_measured_table_and_its_refusals(tmp_path):
  path = tmp_path / 'table.json'
  path.write_text(json.dumps(_table(MODEL)))
  train = TINY.replace(loss='objective', policy_steps=2, inference_delay='measured',
                       latency_table=str(path))
  params = train_all(MEC, MODEL, train)
  assert params.policy is not None
  other = _table(MODEL, device={**latency.current_device(), 'device_kind': 'elsewhere'})
  path.write_text(json.dumps(other))
  with pytest.raises(ValueError, match='another device'):
    train_all(MEC, MODEL, train)
  assert train_all(MEC, MODEL, train.replace(allow_other_device=True)).policy is not None
  bigger = MODEL.replace(num_experts=4)
  path.write_text(json.dumps(_table(MODEL)))
  with pytest.raises(ValueError, match=r'no exit k = 4'):
    train_all(MEC, bigger, train)


@pytest.mark.parametrize('changes,field', [
    ({'inference_delay': 'none', 'policy_steps': 1}, 'policy would learn nothing'),
    ({'inference_delay': 'measured'}, 'needs latency_table'),
    ({'latency_table': 'x.json'}, "only read\\s+with inference_delay = 'measured'"),
    ({'sandwich_middle': 2}, 'needs sandwich = True'),
    ({'distill_weight': -1.0}, 'distill_weight'),
])
def test_bad_option_settings_name_the_field(changes, field):
  with pytest.raises(ConfigError, match=field):
    TINY.replace(**changes)


def test_options_off_train_what_the_code_before_them_trained():
  # tests/golden_training_sums.json holds the sum of every parameter array of this tiny
  # case-2 pipeline (allocator, static, policy, scheduler; both losses) as trained by
  # the code before the DyNN options and the shared delay model existed: with every
  # option off, training must not have moved by a bit.
  with open(os.path.join(os.path.dirname(__file__), 'golden_training_sums.json')) as f:
    golden = json.load(f)
  mec = MECConfig(case=2, n_users=6)
  model = ModelConfig.for_env(mec, num_experts=3, max_depth=2, width=8, static_width=8)
  for loss, want in golden.items():
    train = TrainConfig(batch=8, full_steps=2, width_steps=2, depth_steps=4, static_steps=2,
                        policy_steps=2, joint_steps=2, steps_per_call=2, loss=loss,
                        offload_fraction_min=0.5)
    params = train_all(mec, model, train)
    got = {f'{net}/{"/".join(str(getattr(k, "key", k)) for k in path)}':
           float(np.asarray(v, np.float64).sum())
           for net in ('allocator', 'static', 'policy', 'scheduler')
           for path, v in jax.tree_util.tree_leaves_with_path(getattr(params, net))}
    assert got.keys() == want.keys()
    for name, value in want.items():
      assert got[name] == pytest.approx(value, rel=1e-6, abs=1e-9), (loss, name)


def test_a_policy_trained_over_the_allocators_of_a_networks_file(tmp_path, params):
  path = str(tmp_path / 'networks.msgpack')
  save_networks(path, params, MEC, MODEL, TINY)
  train = TINY.replace(allocator_from=path, policy_steps=2)
  got = train_all(MEC, MODEL.replace(policy_context='server_cpu'),
                  train.replace(server_cpu_scale_min=0.5, server_cpu_scale_max=2.0))
  for a, b in zip(jax.tree.leaves(got.allocator), jax.tree.leaves(params.allocator)):
    np.testing.assert_array_equal(a, b)
  assert got.policy['hidden']['kernel'].shape[0] == 12
  with pytest.raises(ValueError, match=r'another model: num_experts'):
    train_all(MEC, MODEL.replace(num_experts=2), train)
  with pytest.raises(ValueError, match="loss='paper'"):
    train_all(MEC, MODEL, train.replace(loss='objective'))
