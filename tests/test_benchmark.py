"""Benchmarks: every exit timed, bucketed == masked, the table round-trips through
dynn_jax.latency, the fit, the launcher's files, the evaluation suite's record and the
one timer. Nothing here asserts a speed."""

import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from dynn_jax import evaluation, latency
from dynn_jax.benchmark import (bucketed_apply, evaluation_suite, fit_line, fit_with_experts,
                                format_evaluation, group_by_exit, network_variables,
                                time_calls, time_interleaved)
from dynn_jax.config import MECConfig
from dynn_jax.env import normalized_features, sample_slots
from dynn_jax.io import read_json
from dynn_jax.models import ModelConfig, kl_to_option, moe_forward, option_to_kl
from dynn_jax.networks import Params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MEC = MECConfig(n_users=6)
MODEL = ModelConfig.for_env(MEC, num_experts=3, max_depth=2, width=8, static_width=8)
TINY = ['--n_users=6', '--num_experts=3', '--max_depth=2', '--width=8', '--static_width=8',
        '--min_seconds=0.01', '--min_calls=5', '--heavy_calls=2', '--exit_batch=32',
        '--ga_generations=3']


@pytest.fixture(scope='module')
def launched(tmp_path_factory):
  """One tiny launcher run (exits suite + profile) shared by the tests below."""
  out = tmp_path_factory.mktemp('bench')
  result = subprocess.run(
      [sys.executable, 'launch/benchmark.py', '--flagfile=launch/flags/bench_exits.flags',
       *TINY, f'--out={out / "exits.json"}', f'--profile_dir={out / "profile"}'],
      cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  with open(out / 'exits.json') as f:
    return out, json.load(f), result.stdout


def test_launcher_writes_json_table_png_and_profile(launched):
  out, results, stdout = launched
  table = out / 'latency_cpu_cpu_n6.json'
  png = out / 'latency_cpu_cpu_n6.png'
  assert results['latency_table_path'] == str(table) and table.exists()
  assert results['plot_path'] == str(png)
  assert png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  assert read_json(str(table)) == results['exits']['latency_table']
  assert os.path.exists(results['profile']['perfetto'])
  assert os.path.exists(results['profile']['xplane'])
  assert 'smallest_over_floor' in stdout and 'fit: latency' in stdout


def test_every_exit_timed(launched):
  _, results, _ = launched
  exits = results['exits']['exits']
  assert sorted((e['k'], e['l']) for e in exits) == [(k, l) for k in (1, 2, 3) for l in (1, 2)]
  for e in exits:
    assert math.isfinite(e['median_s']) and e['median_s'] > 0, e
    assert e['p10_s'] <= e['median_s'] <= e['p90_s'], e
    assert e['calls'] >= 5 and e['compile_s'] > 0 and e['ops'] > 0, e
  ops_by_exit = {(e['k'], e['l']): e['ops'] for e in exits}
  assert ops_by_exit[(1, 1)] < ops_by_exit[(3, 2)]
  for name in ('dispatch_floor', 'static', 'scheduler', 'policy', 'optimal_allocation',
               'equal_split', 'ga', 'oracle', 'batched_masked', 'batched_bucketed',
               'batched_sorted'):
    r = results['exits'][name]
    assert r['median_s'] > 0 and r['p10_s'] <= r['median_s'] <= r['p90_s'], name
  for name in ('batched_bucketed', 'batched_sorted'):
    r = results['exits'][name]
    assert r['slots_per_s'] > 0 and r['max_abs_share_diff'] < 1e-5, name
    assert r['compile_s'] > 0 and r['padded_slots'] >= 0, name
  assert results['exits']['batched_sorted']['block'] >= 1
  assert set(results['exits']['targets']) == {
      'smallest_over_floor', 'full_over_smallest', 'bucketed_over_masked_throughput',
      'sorted_over_masked_throughput'}


def test_table_is_device_versioned(launched, tmp_path):
  out, _, _ = launched
  path = str(out / 'latency_cpu_cpu_n6.json')
  table = latency.load_table(path, MODEL, MEC)
  assert len(table.allocator_s) == 3 and len(table.allocator_s[0]) == 2
  assert table.static_s > 0 and table.policy_s > 0 and table.scheduler_s > 0
  assert {name for name, _ in table.solvers_s} == {'kkt_weighted', 'ga', 'equal_split',
                                                   'oracle'}
  data = read_json(path)  # without its checksum: the edit below is deliberate
  data['device']['device_kind'] = 'some other chip'
  moved = tmp_path / 'other.json'
  moved.write_text(json.dumps(data))
  with pytest.raises(ValueError, match='device'):
    latency.load_table(str(moved), MODEL, MEC)
  assert latency.load_table(str(moved), MODEL, MEC, allow_other_device=True).allocator_s \
      == table.allocator_s
  with pytest.raises(ValueError, match='user'):
    latency.load_table(path, MODEL, MEC.replace(n_max=8))


def test_bucketed_matches_masked_on_mixed_batch():
  # Exit (1, 1) gets 12 slots (three calls of 4, one padded), the others 3 (one padded
  # call each): padding and several calls per exit are both exercised.
  option = np.concatenate([np.zeros(12, int), np.arange(1, 6).repeat(3)])
  option = np.random.default_rng(0).permutation(option)
  k, l = (np.asarray(a) for a in option_to_kl(option, MODEL))
  slots = sample_slots(jax.random.PRNGKey(3), MEC, len(option))
  feats = normalized_features(slots, MEC)
  mask = slots.mask & (jax.random.uniform(jax.random.PRNGKey(4), slots.mask.shape) < 0.7)
  variables = network_variables(MEC, MODEL, seed=1)[0]['allocator']
  got = bucketed_apply(MODEL, variables, feats, mask, k, l, chunk=4)
  want = jax.jit(lambda *a: moe_forward(MODEL, *a))(variables, feats, mask, k, l)
  for name in ('b_share', 'f_share', 'b_logits', 'f_logits', 'gate'):
    np.testing.assert_allclose(getattr(got, name), getattr(want, name), atol=1e-5,
                               err_msg=name)


def test_grouping_covers_every_slot_once():
  option = np.random.default_rng(1).integers(0, MODEL.num_options, 100)
  k, l = (np.asarray(a) for a in option_to_kl(option, MODEL))
  calls = group_by_exit(MODEL, k, l, chunk=8)
  for o in range(MODEL.num_options):
    mine = [index for kk, ll, index in calls if kl_to_option(kk, ll, MODEL) == o]
    assert len(mine) == -(-np.sum(option == o) // 8)
    assert set(np.concatenate(mine)) == set(np.flatnonzero(option == o))
  for kk, ll, index in calls:
    assert len(index) == 8
    assert np.all(k[index] == kk) and np.all(l[index] == ll)
  with pytest.raises(ValueError, match='outside'):
    group_by_exit(MODEL, np.array([4]), np.array([1]))
  with pytest.raises(ValueError, match='chunk'):
    group_by_exit(MODEL, k, l, chunk=0)


def test_fit_recovers_a_known_line():
  x = np.linspace(1e3, 5e6, 30)
  noise = np.random.default_rng(0).normal(0.0, 1e-8, x.shape)
  fit = fit_line(x, 12e-6 + 3e-11 * x + noise)
  assert fit['overhead_s'] == pytest.approx(12e-6, rel=1e-2)
  assert fit['seconds_per_op'] == pytest.approx(3e-11, rel=1e-2)
  assert fit['r2'] > 0.999 and fit['points'] == 30
  flat = fit_line([5.0, 5.0], [1e-5, 3e-5])
  assert flat['seconds_per_op'] == 0.0 and flat['overhead_s'] == pytest.approx(2e-5)


def test_fit_with_experts_recovers_a_known_plane():
  k = np.repeat(np.arange(1, 11), 3)
  ops_count = k * np.tile([2.7e4, 2.7e5, 5.2e5], 10)
  fit = fit_with_experts(k, ops_count, 27e-6 + 2e-6 * k + 1.6e-11 * ops_count)
  assert fit['overhead_s'] == pytest.approx(27e-6, rel=1e-6)
  assert fit['seconds_per_expert'] == pytest.approx(2e-6, rel=1e-6)
  assert fit['seconds_per_op'] == pytest.approx(1.6e-11, rel=1e-6)
  assert fit['r2'] == pytest.approx(1.0)


def _positive(value) -> bool:
  return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_evaluation_suite_records_rate_compile_and_memory_per_method():
  variables = network_variables(MEC, MODEL, seed=2)[0]
  params = Params(allocator=variables['allocator']['params'])
  setting = evaluation.Setting(mec=MEC, model=MODEL, feature_config=MEC)
  results = evaluation_suite(setting, params, methods=('fix_moe', 'equal_split'), slots=24,
                             chunk=16, min_calls=2, min_seconds=0.0, rss=True,
                             reference_slots=(1, 2), log=None)
  assert set(results['methods']) == {'fix_moe', 'equal_split'}
  assert set(results['memory_measures']) == {'xla', 'rss'}
  for name, m in results['methods'].items():
    assert m['slots'] == 24 and m['calls'] >= 2, name
    for key in ('slots_per_s', 'slots_per_s_p10', 'slots_per_s_p90', 'median_s',
                'first_call_s'):
      assert _positive(m[key]), (name, key, m[key])
    assert m['slots_per_s_p10'] <= m['slots_per_s'] <= m['slots_per_s_p90'], name
    assert math.isfinite(m['compile_s']) and m['compile_s'] >= 0, name
    assert m['memory']['chunk'] == 16
    xla, rss = m['memory']['xla'], m['memory']['rss']
    assert _positive(xla['peak_bytes']) and xla['peak_bytes'] >= xla['temp_bytes'], name
    assert rss['peak_bytes'] >= 0 and _positive(rss['baseline_bytes']), name
  assert _positive(results['methods']['fix_moe']['ops_per_slot'])
  assert results['methods']['equal_split']['ops_per_slot'] == 0
  flops = results['fix_moe_flops']
  for key in ('achieved_gflops', 'dense_gflops', 'dense_over_achieved'):
    assert _positive(flops[key]), (key, flops[key])
  assert [d['rows'] for d in flops['dense_matmul']] == [MEC.width, 2 * MEC.width]
  assert all(_positive(d['gflops']) and d['flops_per_call'] > 0 for d in flops['dense_matmul'])
  assert flops['dense_gflops'] == max(d['gflops'] for d in flops['dense_matmul'])
  assert set(results['targets']) == {'fix_moe_dense_over_achieved', 'max_peak_bytes_chunk_16'}
  table = format_evaluation(results)
  assert 'fix_moe' in table and 'GFLOP/s' in table and 'RSS MB' in table
  json.dumps(results)  # what the launcher writes


def test_launcher_refuses_unknown_eval_methods_before_work(tmp_path):
  result = subprocess.run(
      [sys.executable, 'launch/benchmark.py', '--flagfile=launch/flags/bench_eval.flags',
       '--eval_methods=policy_moe,nonsense', f'--out={tmp_path / "eval.json"}'],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode != 0 and 'nonsense' in result.stderr, result.stderr[-1500:]
  assert not (tmp_path / 'eval.json').exists()


def test_time_calls_is_the_interleaved_timer_with_one_function():
  calls = []
  fn = lambda: calls.append(1)
  t = time_calls(fn, min_calls=7, min_seconds=0.0, warmup=2, compile_s=0.5)
  assert t.calls >= 7 and len(calls) == t.calls + 2 and t.compile_s == 0.5
  assert 0 <= t.p10_s <= t.median_s <= t.p90_s
  both = time_interleaved({'a': (fn, (), 3, 0.0), 'b': (fn, (), 5, 0.0)}, min_seconds=0.0,
                          warmup=0)
  assert both['a'].calls >= 3 and both['b'].calls >= 5
