"""Reproduction points: read back only when made with the same settings."""

import os
import types

from dynn_jax import evaluation, reproduce

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_a_point_made_with_other_settings_is_recomputed(tmp_path):
  calls = []

  def compute(value):
    calls.append(value)
    return {'sweep': 'cpu', 'value': value, 'results': {}}

  first = {'slots': 64, 'seed': 0, 'networks': 'a', 'delay': None}
  point = reproduce.cached(str(tmp_path), 'p', lambda: compute(1), first, dict)
  assert point['settings'] == first and calls == [1]
  assert reproduce.cached(str(tmp_path), 'p', lambda: compute(2), dict(first), dict) == point
  assert calls == [1]  # same settings: read back
  for change in ({'slots': 128}, {'seed': 1}, {'networks': 'b'}, {'delay': 'table'}):
    again = reproduce.cached(str(tmp_path), 'p', lambda: compute(3), first | change, dict)
    assert again['settings'] == first | change and again['value'] == 3
  assert calls == [1, 3, 3, 3, 3]


def test_a_damaged_point_is_refused_with_the_field_named(tmp_path):
  import pytest
  from dynn_jax.io import SchemaError, write_json_atomic
  settings = {'slots': 8}
  point = {'sweep': 'cpu', 'value': 1e9, 'settings': settings,
           'results': {'methods': {'a': {'objective': {'mean': 1.0, 'ci95': 0.1}}},
                       'slots': 8, 'mode': 'modelled', 'devices': 1, 'slots_of': {}}}
  write_json_atomic(reproduce.point_path(str(tmp_path), 'p'), point)
  assert reproduce.cached(str(tmp_path), 'p', lambda: {}, settings)['value'] == 1e9
  point['results']['methods'] = {}
  write_json_atomic(reproduce.point_path(str(tmp_path), 'p'), point)
  with pytest.raises(SchemaError, match='results.methods'):
    reproduce.cached(str(tmp_path), 'p', lambda: {}, settings)


def test_why_our_numbers_differ_is_computed_from_the_networks_sweeps_and_studies():
  from dynn_jax import paper
  from dynn_jax.config import MECConfig
  from dynn_jax.models import ModelConfig
  from dynn_jax.networks import Networks
  from dynn_jax.report.differences import differences
  mec = MECConfig(case=2, n_users=6)
  model = ModelConfig.for_env(mec, num_experts=2, max_depth=2, width=8)
  trained = {'size_scale_min': 0.5, 'size_scale_max': 3.0, 'tune_steps': 7}
  nets = {2: Networks(None, mec, model, 'paper', {'train': trained})}
  sweeps = {reproduce.SweepKey(2, 'data'): [{'value': 1000.0}, {'value': 4000.0}]}
  run = {'kind': 'full', 'limiting': [[2, 1]], 'first_at_bar': [[9, 5], [8, 4]],
         'steps': 20, 'stage_starts': [{'step': 0}, {'step': 12}]}
  cost = {'bar': 0.15, 'speedup': {'full': 0.5}, 'config': {'train': {'alloc_lr': 1e-3}},
          'results': [run | {'schedule': 'progressive'}, run | {'schedule': 'scratch'}]}
  variant = {'bar': 0.05, 'speedup': {'full': 0.9}, 'config': {'train': {'alloc_lr': 3e-3}}}
  text = ' '.join('\n'.join(differences(sweeps, nets, cost=cost,
                                        cost_variants={'v.json': variant})).split())
  assert f'l0 = {MECConfig().l0:g} m' in text
  assert 'data sizes scaled by U[0.5, 3]' in text
  assert 'mean data size (kbit) 4, past the 0.5 to 3 the case-2 networks saw' in text
  assert 'the case-2 networks spend 7 steps' in text
  prog, scratch = paper.TRAINING_SECONDS['full']
  assert 'not faster here (0.50x' in text and f'{scratch / prog:.2f}x' in text
  assert 'depth-1 exits' in text and 'takes 8 steps against 20' in text
  assert 'With a 5% bar and alloc_lr 3x as large, progressive shrinking is 0.90x' in text


def test_agent_points_merge_onto_the_same_slots(tmp_path):
  """The agent's points are evaluated apart from the sweep's; merging them is sound only
  if the slots do not depend on which methods run beside it."""
  from dynn_jax.networks import Networks
  agent = Networks.load(os.path.join(ROOT, 'checkpoints', 'ppo_case2.msgpack'))
  setting = evaluation.Setting(mec=agent.mec, model=agent.model, feature_config=agent.mec)
  alone = evaluation.evaluate_sweep(setting, ('ppo',), agent.params, 'f_ser', [1e9, 4e9],
                                    slots=32)
  beside = evaluation.evaluate_sweep(setting, ('local', 'ppo'), agent.params, 'f_ser',
                                     [1e9, 4e9], slots=32)
  for a, b in zip(alone, beside):
    assert a.methods['ppo'] == b.methods['ppo']
  nets = types.SimpleNamespace(mec=agent.mec)
  key = reproduce.SweepKey(2, 'cpu')
  first = reproduce.agent_points(agent, nets, key, [1e9, 4e9], str(tmp_path), slots=32,
                                 oracle_slots=0, seed=0)
  assert first[0]['results'].methods['ppo'] == alone[0].methods['ppo']
  assert 'yardstick' not in first[0]
  point = {'sweep': 'cpu', 'value': 1e9, 'results': beside[0]}
  merged = reproduce.with_agent(point, first[0])
  assert merged['results'].methods['ppo'] == alone[0].methods['ppo']
  stamp = os.stat(reproduce.point_path(str(tmp_path), 'ppo_case2_cpu_1e+09')).st_mtime_ns
  again = reproduce.agent_points(agent, nets, key, [1e9, 4e9], str(tmp_path), slots=32,
                                 oracle_slots=0, seed=0)  # read back, not recomputed
  assert again[1]['results'].methods == first[1]['results'].methods
  assert os.stat(reproduce.point_path(str(tmp_path), 'ppo_case2_cpu_1e+09')).st_mtime_ns == stamp
