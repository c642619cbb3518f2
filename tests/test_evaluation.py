"""Evaluation: the accumulation is exact, sharding changes nothing, bad requests fail."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from dynn_jax import MECConfig, optimal_allocation, sample_slots, slot_costs
from dynn_jax.config import ConfigError
from dynn_jax.evaluation import (EvalResult, Params, Setting, check_methods,
                                 chunk_trace_count, evaluate, evaluate_sweep, methods_table,
                                 objective_gaps)
from dynn_jax.latency import MeasuredTable
from dynn_jax.models import ModelConfig, MoEAllocator, Policy, Scheduler, StaticAllocator
from dynn_jax.reproduce import SweepKey, compared, parse_sweeps
from dynn_jax.report.markdown import points_network_ops, tally
from dynn_jax.report.tables import headline_table, objective_gap_table
from dynn_jax.networks import init_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MEC2 = MECConfig(case=2, n_users=6)
MODEL = ModelConfig.for_env(MEC2, num_experts=2, max_depth=2, width=8, static_width=8)


def random_networks(mec=MEC2, model=MODEL) -> Params:
  key = jax.random.PRNGKey(0)
  return Params(*(init_params(m(model), jax.random.fold_in(key, i), mec)
                  for i, m in enumerate((MoEAllocator, StaticAllocator, Policy, Scheduler))))


# A network method (exit-sorted dispatch), the KKT solver and both offloading rules: the
# GA and the static network add compile time, not paths the sharding could break.
SHARDED_METHODS = ('pmrl', 'kkt_weighted', 'random', 'local')
SHARDED_SCRIPT = """
import json, jax
import test_evaluation as t
from dynn_jax.evaluation import Setting, evaluate
r = evaluate(Setting(t.MEC2, t.MODEL, t.MEC2), t.SHARDED_METHODS, t.random_networks(),
             slots=256, chunk=128)
print(json.dumps({'devices': jax.device_count(), 'results': r.to_dict()}))
"""


def test_sharded_over_8_devices_equals_one_device():
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8',
             PYTHONPATH=os.path.join(ROOT, 'tests') + os.pathsep + ROOT)
  out = subprocess.run([sys.executable, '-c', SHARDED_SCRIPT], capture_output=True, text=True,
                       env=env, cwd=ROOT, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  sharded = json.loads(out.stdout.strip().splitlines()[-1])
  assert sharded['devices'] == 8 and sharded['results']['devices'] == 8
  single = evaluate(Setting(MEC2, MODEL, MEC2), SHARDED_METHODS, random_networks(),
                    slots=256, chunk=128)
  assert single.devices == 1
  for method in SHARDED_METHODS:
    for metric, value in single[method].items():
      np.testing.assert_allclose(sharded['results']['methods'][method][metric]['mean'],
                                 value['mean'],
                                 rtol=1e-5, atol=1e-9, err_msg=f'{method} {metric}')


@pytest.mark.parametrize('mec', [MECConfig(case=1, n_users=6), MEC2])
def test_oracle_and_bound_frame_every_method(mec):
  names = ('kkt_weighted', 'equal_split', 'oracle') + (('random', 'local') if mec.case == 2
                                                       else ())
  result = evaluate(Setting(mec, MODEL, mec), names, Params(), slots=128, chunk=128)
  objective = {name: result[name]['objective']['mean'] for name in names}
  assert result.bound['mean'] <= min(objective.values())
  assert objective['oracle'] <= min(objective.values())
  gaps = objective_gaps(result)
  assert gaps['oracle'] == {'oracle': 0.0, 'bound': pytest.approx(
      objective['oracle'] / result.bound['mean'] - 1)}
  table = methods_table(result)
  assert 'vs oracle %' in table and 'lower bound' in table


def test_accumulated_means_equal_a_direct_computation():
  mec = MECConfig(n_users=5)
  # 250 slots in chunks of 100: the last chunk counts only its first 50 slots.
  result = evaluate(Setting(mec, MODEL, mec), ('kkt_weighted',), Params(), slots=250, chunk=100,
                    seed=3)
  assert result.slots == 250
  objectives = []
  for i in range(3):
    k_slots, _ = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(3), i))
    slots = sample_slots(k_slots, mec, 100)
    objectives.append(np.asarray(slot_costs(slots, optimal_allocation(slots, slots.mask, mec),
                                            mec).objective))
  objectives = np.concatenate(objectives)[:250]
  np.testing.assert_allclose(result['kkt_weighted']['objective']['mean'], objectives.mean(),
                             rtol=1e-5)
  half_width = 1.96 * objectives.std(ddof=1) / np.sqrt(250)
  np.testing.assert_allclose(result['kkt_weighted']['objective']['ci95'], half_width, rtol=1e-3)


def test_measured_mode_adds_the_table_latency():
  mec = MECConfig(n_users=5)
  model = ModelConfig.for_env(mec, num_experts=2, max_depth=2, width=8, static_width=8)
  nets = random_networks(mec, model)

  def table(full_s):
    return MeasuredTable(allocator_s=((1e-4, 2e-4), (3e-4, full_s)), static_s=5e-4,
                         policy_s=1e-5, scheduler_s=2e-5, solvers_s=(('kkt_weighted', 7e-4),),
                         device=())

  def delay(full_s):
    r = evaluate(Setting(mec, model, mec, table(full_s)), ('fix_moe', 'kkt_weighted'), nets,
                 slots=256, chunk=256)
    assert r.mode == 'measured'
    return r

  a, b = delay(4e-4), delay(1.4e-3)
  np.testing.assert_allclose(b['fix_moe']['mean_delay']['mean'] - a['fix_moe']['mean_delay']['mean'],
                             1e-3, rtol=1e-4)
  modelled = evaluate(Setting(mec, model, mec), ('kkt_weighted',), nets, slots=256, chunk=256)
  np.testing.assert_allclose(a['kkt_weighted']['mean_delay']['mean']
                             - modelled['kkt_weighted']['mean_delay']['mean'], 7e-4, rtol=1e-4)


@pytest.mark.parametrize('names,params,mec,message', [
    (('policy_moe', 'nope'), Params(), MECConfig(n_users=4), 'unknown method'),
    (('policy_moe',), Params(), MECConfig(n_users=4), 'needs trained'),
    (('exhaustive',), Params(), MECConfig(case=2, n_users=13), 'N_max <= 12'),
    (('local',), Params(), MECConfig(n_users=4), 'needs case 2'),
])
def test_bad_requests_fail_before_work(names, params, mec, message):
  with pytest.raises(ValueError, match=message):
    check_methods(names, params, Setting(mec, ModelConfig.for_env(mec), mec))


def test_a_system_of_another_case_than_the_setting_is_refused():
  # The compiled methods are those of the setting's case: a case-1 system would run the
  # case-2 pipeline (scheduler, offloading) on users without CPUs.
  with pytest.raises(ValueError, match='methods built for case 2'):
    evaluate(Setting(MEC2, MODEL, MEC2), ('kkt_weighted',), Params(), slots=8,
             env=MECConfig(case=1, n_users=6).params())


def test_measured_mode_refuses_a_solver_the_table_has_not_timed():
  # Counting its run time as zero would make a slow solver look free.
  mec = MECConfig(case=2, n_users=4)
  table = MeasuredTable(allocator_s=((1e-4,),), static_s=5e-4, policy_s=1e-5,
                        scheduler_s=2e-5, solvers_s=(('kkt_weighted', 7e-4),), device=())
  setting = Setting(mec, ModelConfig.for_env(mec), mec, table)
  check_methods(('kkt_weighted', 'random', 'local'), Params(), setting)
  for name, solver in (('oracle', 'oracle'), ('ga', 'ga'), ('equal_split', 'equal_split')):
    with pytest.raises(ValueError, match=f"no run time of '{solver}'"):
      check_methods((name,), Params(), setting)
  with pytest.raises(ValueError, match="no run time of 'oracle'"):
    table.solver('oracle', 0.0)


def test_report_tables_compute_gaps_from_the_results():
  def entry(objective):
    metrics = {m: {'mean': 0.0, 'ci95': 0.0} for m in ('mean_delay', 'miss_ratio',
                                                        'total_energy', 'inference_share',
                                                        'ops')}
    return {**metrics, 'objective': {'mean': objective, 'ci95': 0.0}}
  points = [{'value': v, 'results': EvalResult(
      {'a': entry(1.1 * v), 'oracle': entry(v)}, slots=1, bound={'mean': 0.5 * v, 'ci95': 0.0})}
            for v in (1.0, 2.0)]
  table = objective_gap_table(points, 1.0)
  assert '| 1 | +10.0 | +100.0 |' in table and '| 2 | +10.0 | +100.0 |' in table
  headline = headline_table(points[0]['results'])
  rows = headline.splitlines()
  assert rows[2].startswith('| oracle | 1.0000 | +0.0 | +100.0 |')  # best objective first
  assert rows[3].startswith('| a | 1.1000 | +10.0 | +120.0 |')
  assert rows[-1].startswith('| lower bound | 0.5000 |')


def test_orderings_with_the_oracle_compare_methods_on_the_same_slots():
  def results(**means):
    return EvalResult({m: {'objective': {'mean': v, 'ci95': 0.0}} for m, v in means.items()},
                      slots=1)
  # On the GA's own slots the oracle wins; the oracle's mean over its own larger sample
  # would have lost to the GA's over different slots.
  point = {'value': 1.0, 'results': results(oracle=0.40, ga=0.39, equal_split=0.5),
           'yardstick': results(oracle=0.40, equal_split=0.45),
           'ga_yardstick': results(oracle=0.38, ga=0.39)}
  assert compared(point, 'oracle', 'ga') is point['ga_yardstick']
  assert compared(point, 'oracle', 'equal_split') is point['yardstick']
  assert compared(point, 'ga', 'equal_split') is point['results']
  sweeps = {SweepKey(1, 'data'): [point]}
  assert tally(sweeps, 1, 'oracle', 'ga', 'objective') == (
      'oracle ≤ ga on objective at 1 of 1 points')
  assert tally(sweeps, 1, 'equal_split', 'ga', 'objective') == (
      'equal_split ≤ ga on objective at 0 of 1 points (not at data=1)')


def test_network_ops_of_the_points_count_every_result_set_at_its_own_slots():
  def results(slots, slots_of=None, **ops):
    return EvalResult({m: {'ops': {'mean': v, 'ci95': 0.0}} for m, v in ops.items()},
                      slots=slots, slots_of=slots_of or {})
  point = {'value': 1.0, 'results': results(100, {'ga': 4}, net=10.0, ga=0.0),
           'yardstick': results(8, net=10.0, oracle=0.0)}
  assert points_network_ops({SweepKey(1, 'data'): [point, point]}) == 2 * (1000 + 80)


def test_sweep_names_may_name_a_case_and_bad_ones_are_refused():
  assert parse_sweeps(['data', '2:cpu']) == {'data', '2:cpu'}
  for bad in (['sideways'], ['3:data'], ['1:sideways']):
    with pytest.raises(ValueError, match='--sweeps: unknown'):
      parse_sweeps(bad)


def test_a_sweep_compiles_once_and_equals_evaluations_point_by_point():
  mec = MEC2.replace(n_max=8)
  # A scheduler that reads the server CPU: traced in the sweep, a constant at the point.
  model = ModelConfig.for_env(mec, num_experts=2, max_depth=2, width=8, static_width=8,
                              scheduler_context='server_cpu')
  nets, names = random_networks(mec, model), ('pmrl', 'kkt_weighted', 'local')
  # Its logit is the context alone: offload everyone above the reference CPU, no one below.
  hidden = np.zeros((6, model.scheduler_hidden), np.float32)
  hidden[5] = 1.0
  nets = nets._replace(scheduler={
      'hidden': {'kernel': hidden, 'bias': np.zeros(model.scheduler_hidden, np.float32)},
      'out': {'kernel': np.ones((model.scheduler_hidden, 1), np.float32),
              'bias': np.zeros(1, np.float32)}})
  setting = Setting(mec, model, mec)
  before = chunk_trace_count()
  cpu = evaluate_sweep(setting, names, nets, 'f_ser', [1e9, 4e9], slots=64, chunk=64)
  tasks = evaluate_sweep(setting, names, nets, 'n_users', [3, 8], slots=64, chunk=64)
  assert chunk_trace_count() - before == 1  # two sweeps, four points, one program
  # A plain evaluation of one point gives the same numbers.
  point = evaluate(Setting(mec.replace(f_ser=4e9), model, mec), names, nets, slots=64, chunk=64)
  for name in names:
    for metric, value in point[name].items():
      np.testing.assert_allclose(cpu[1][name][metric]['mean'], value['mean'], rtol=1e-6)
  assert cpu[0]['pmrl']['mean_delay']['mean'] > cpu[1]['pmrl']['mean_delay']['mean']
  assert (cpu[0]['pmrl']['offload_ratio']['mean'], cpu[1]['pmrl']['offload_ratio']['mean']
          ) == (0.0, 1.0)
  assert tasks[0]['local']['total_energy']['mean'] < tasks[1]['local']['total_energy']['mean']
  with pytest.raises(ConfigError, match='fields that can be swept'):
    evaluate_sweep(setting, names, nets, 'n_max', [8], slots=64)
  with pytest.raises(ConfigError, match='padded width'):
    evaluate_sweep(Setting(MEC2, MODEL, MEC2), names, random_networks(), 'n_users', [7], slots=64)
  with pytest.raises(ConfigError, match='f_ser'):
    evaluate_sweep(setting, names, nets, 'f_ser', [-1.0], slots=64)


def test_methods_on_the_active_rows_give_the_full_width_numbers():
  # Case 1: its oracle compiles far faster than case 2's joint search; the scheduler and
  # random offloading are per-user and full-width respectively, nothing to trim.
  mec = MECConfig(case=1, n_users=6, n_max=20)       # 6 users: the methods see 8 positions
  model = ModelConfig.for_env(mec, num_experts=2, max_depth=2, width=8, static_width=8)
  nets, setting = random_networks(mec, model), Setting(mec, model, mec)
  names = ('policy_moe', 'fix_moe', 'static', 'kkt_weighted', 'equal_split', 'oracle')
  before = chunk_trace_count()
  trimmed = evaluate(setting, names, nets, slots=64, chunk=64)
  full = evaluate(setting, names, nets, slots=64, chunk=64, rows=20)
  assert chunk_trace_count() - before == 2           # the row count is part of the program
  for name in names:
    # The oracle iterates to its optimum, and sums over fewer positions round otherwise:
    # its objective agrees to 2e-6, the metrics it does not optimise to 1e-4.
    rtol = 1e-4 if name == 'oracle' else 2e-6
    for metric, value in full[name].items():
      np.testing.assert_allclose(trimmed[name][metric]['mean'], value['mean'],
                                 rtol=2e-6 if metric == 'objective' else rtol, atol=1e-9,
                                 err_msg=f'{name} {metric}')
  np.testing.assert_allclose(trimmed.bound['mean'], full.bound['mean'], rtol=2e-6)
  with pytest.raises(ValueError, match=r'rows = 5; must be an integer in \[6, 20\]'):
    evaluate(setting, names, nets, slots=64, rows=5)


def test_results_round_trip_and_read_the_flat_layout_of_older_files():
  metric = {'mean': 1.0, 'ci95': 0.1}
  result = EvalResult({'a': {'objective': metric}}, slots=8, bound=metric, slots_of={'a': 4})
  assert EvalResult.from_dict(json.loads(json.dumps(result.to_dict()))) == result
  old = EvalResult.from_dict({'a': {'objective': metric}, '_slots': 8, '_mode': 'measured',
                              '_devices': 2, '_bound': {'objective': metric}, '_ga_slots': 4})
  assert (old.names, old.slots, old.mode, old.devices, old.bound, old.slots_of) == (
      ('a',), 8, 'measured', 2, metric, {'ga': 4})
  merged = result.merged(EvalResult({'b': {'objective': metric}}, slots=2), prefix='x_')
  assert merged.names == ('a', 'x_b') and merged.slots_of == {'a': 4, 'x_b': 2}
