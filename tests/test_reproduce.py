"""Reproduction points: read back only when made with the same settings."""

from dynn_jax import reproduce


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
