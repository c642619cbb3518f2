"""Reliability: damaged files are refused, results are strict JSON, bad flags and sizes
fail before any work, and a run directory is used by one run at a time and resumes to
exactly the files of an uninterrupted run."""

import glob
import json
import math
import os
import socket
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import app

from dynn_jax import MECConfig, cli, cost_study, io, latency, runs
from dynn_jax.evaluation import Params
from dynn_jax.models import ModelConfig, MoEAllocator
from dynn_jax.networks import init_params
from dynn_jax.runs import RunDir
from dynn_jax.training import TrainConfig, load_networks, save_networks, train_allocator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MEC = MECConfig(n_users=4)
MODEL = ModelConfig.for_env(MEC, num_experts=2, max_depth=2, width=4, static_width=4)
TINY = ['--n_users=4', '--num_experts=2', '--max_depth=2', '--width=4', '--static_width=4',
        '--batch=4', '--full_steps=2', '--width_steps=2', '--depth_steps=2',
        '--static_steps=0', '--policy_steps=0', '--joint_steps=0', '--steps_per_call=2']


def launch(script, *args, timeout=120):
  return subprocess.run([sys.executable, os.path.join('launch', script), *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=timeout)


def flip_byte(path, offset):
  data = bytearray(open(path, 'rb').read())
  data[offset] ^= 0x01
  open(path, 'wb').write(bytes(data))


@pytest.fixture(scope='module')
def networks():
  # Real (untrained) networks: a file's arrays must have the shapes its configs give.
  return Params(allocator=init_params(MoEAllocator(MODEL), jax.random.PRNGKey(0), MEC))


# ----------------------------------------------------------- item 2: checksums


def test_networks_file_with_a_flipped_byte_is_refused(tmp_path, networks):
  path = str(tmp_path / 'networks.msgpack')
  save_networks(path, networks, MEC, MODEL, TrainConfig())
  params, _, _, _ = load_networks(path)
  np.testing.assert_array_equal(params.allocator['layer1_kernel'],
                                networks.allocator['layer1_kernel'])
  flip_byte(path, os.path.getsize(path) - 200)  # inside the parameters
  with pytest.raises(ValueError, match=f'{path} is corrupt.*checksum'):
    load_networks(path)


def test_networks_files_without_checksum_still_load(tmp_path, networks):
  path = str(tmp_path / 'networks.msgpack')
  save_networks(path, networks, MEC, MODEL, TrainConfig())
  with open(path, 'rb') as f:
    legacy = io.unseal(f.read(), path, 'networks')
  with open(path, 'wb') as f:
    f.write(legacy)
  params, mec, _, _ = load_networks(path)
  assert mec == MEC
  np.testing.assert_array_equal(params.allocator['layer2_kernel'],
                                networks.allocator['layer2_kernel'])


@pytest.mark.parametrize('path', sorted(glob.glob(os.path.join(ROOT, 'checkpoints',
                                                               '*.msgpack'))))
def test_shipped_networks_carry_a_checksum_and_load(path):
  with open(path, 'rb') as f:
    data = f.read()
  assert data.startswith(b'\x82\xa6sha256'), path
  params, mec, model, meta = load_networks(path)
  # A DyNN pipeline's file, or a PPO agent's (launch/train_rl.py).
  assert params.allocator is not None or params.agent is not None, path
  assert model.max_users >= mec.width and 'train' in meta


def test_run_checkpoint_with_a_flipped_byte_is_refused(tmp_path):
  run = RunDir(str(tmp_path / 'run'))
  state = {'w': np.arange(64, dtype=np.float32), 'step': np.int32(7)}
  run.save('phase', state)
  restored = run.restore('phase', state)
  np.testing.assert_array_equal(restored['w'], state['w'])
  path = run.checkpoint_path('phase')
  flip_byte(path, open(path, 'rb').read().index(state['w'][40:41].tobytes()))  # w[40]
  with pytest.raises(ValueError, match='checkpoint .*phase.msgpack is corrupt'):
    run.restore('phase', state)


def test_json_files_carry_a_checksum_checked_on_load(tmp_path):
  path = str(tmp_path / 'results.json')
  value = {'a': [1, 2.5, {'b': 'x'}], 'c': np.float32(0.25), 'd': np.arange(3)}
  io.write_json_atomic(path, value)
  assert io.read_json(path) == {'a': [1, 2.5, {'b': 'x'}], 'c': 0.25, 'd': [0, 1, 2]}
  assert 'sha256' in json.load(open(path))  # still plain JSON for any other reader
  text = open(path).read()
  open(path, 'w').write(text.replace('2.5', '2.6'))
  with pytest.raises(io.ChecksumError, match='results.json is corrupt or was edited'):
    io.read_json(path, 'results')


def test_damaged_latency_table_and_cost_study_are_refused(tmp_path):
  table = tmp_path / 'table.json'
  io.write_json_atomic(str(table), _table())
  latency.load_table(str(table), MODEL, MEC)
  table.write_text(table.read_text().replace('0.002', '0.003'))
  with pytest.raises(ValueError, match='latency table .*checksum'):
    latency.load_table(str(table), MODEL, MEC)
  study = tmp_path / 'cost.json'
  io.write_json_atomic(str(study), _study())
  cost_study.load_study(str(study))
  study.write_text(study.read_text().replace('"steps": 6', '"steps": 7'))
  with pytest.raises(ValueError, match='cost study .*checksum'):
    cost_study.load_study(str(study))


def test_shipped_json_without_checksum_still_loads():
  for path in glob.glob(os.path.join(ROOT, 'docs', 'measured', '*.json')):
    assert isinstance(io.read_json(path), dict)
  table = io.read_json(os.path.join(ROOT, 'docs', 'measured', 'latency_cpu_cpu_n45.json'))
  assert len(latency.from_dict(table).allocator_s) == 10


@pytest.mark.parametrize('value,where', [
    ({'results': {'oracle': {'delay_ms': {'mean': float('nan')}}}},
     r'results\.oracle\.delay_ms\.mean = nan'),
    ({'results': {'static': {'objective': np.array([1.0, np.inf])}}},
     r'results\.static\.objective\[1\] = inf'),
    ({'gap': np.float32('-inf')}, r'gap = -inf'),
])
def test_json_output_refuses_non_finite_values_naming_the_key(tmp_path, value, where):
  path = tmp_path / 'out.json'
  with pytest.raises(io.NonFiniteError, match=where):
    io.write_json_atomic(str(path), value)
  assert not path.exists() and not os.listdir(tmp_path)


# ------------------------------------------------------ items 3, 7: latency tables


def _table(**changes):
  table = {'format': 1, 'device': latency.current_device(), 'n_users': MEC.width,
           'model': MODEL.to_dict(), 'allocator_s': [[0.001, 0.002], [0.003, 0.004]],
           'static_s': 0.001, 'policy_s': 0.0005, 'scheduler_s': 0.0005,
           'solvers_s': {'kkt_weighted': 0.01, 'ga': 0.5}}
  table.update(changes)
  return table


@pytest.mark.parametrize('changes,field', [
    ({'allocator_s': [[0.001, float('nan')], [0.003, 0.004]]}, r'allocator_s\[0\]\[1\] = nan'),
    ({'allocator_s': [[0.001, 0.002], [-0.003, 0.004]]}, r'allocator_s\[1\]\[0\] = -0.003'),
    ({'allocator_s': [[0.001, 0.002], [0.003]]}, 'allocator_s is ragged'),
    ({'allocator_s': []}, 'allocator_s must be a non-empty list'),
    ({'static_s': 0.0}, 'static_s = 0.0'),
    ({'policy_s': float('inf')}, 'policy_s = inf'),
    ({'scheduler_s': '0.001'}, "scheduler_s = '0.001'"),
    ({'solvers_s': {'ga': -1.0}}, r'solvers_s\.ga = -1\.0'),
])
def test_latency_table_entries_finite_positive_and_rectangular(tmp_path, changes, field):
  with pytest.raises(ValueError, match=field):
    latency.from_dict(_table(**changes), 'table.json')
  path = tmp_path / 'table.json'
  path.write_text(json.dumps(_table(**changes)))  # NaN as written by a plain json.dump
  with pytest.raises(ValueError, match='table.json'):
    latency.load_table(str(path), MODEL, MEC)


def test_pipeline_refuses_concrete_exits_out_of_range():
  table = latency.from_dict(_table())
  edge, _ = table.pipeline(MODEL, MEC, 2, 2, 1, policy=False, scheduler=False)
  assert float(edge) == pytest.approx(0.004)
  for k, l in ((0, 1), (3, 1), (1, 0), (1, 3), (np.array([1, 2, 5]), 1)):
    with pytest.raises(ValueError, match='MeasuredTable.pipeline'):
      table.pipeline(MODEL, MEC, k, l, 1, policy=False, scheduler=False)
  traced = jax.jit(lambda k, l: table.pipeline(MODEL, MEC, k, l, 1, policy=True,
                                               scheduler=False)[0])
  assert float(traced(jnp.int32(1), jnp.int32(2))) == pytest.approx(0.0025)


# -------------------------------------------------- items 4, 11, 12: flag checks


def test_check_range_refuses_non_finite_floats():
  for value in (float('nan'), float('inf'), -float('inf')):
    with pytest.raises(app.UsageError, match='--bar = .*finite'):
      cli.check_range('bar', value, 0.0)
  cli.check_range('bar', 0.5, 0.0)


def test_check_writable(tmp_path):
  (tmp_path / 'file').write_text('x')
  cli.check_writable('out', str(tmp_path / 'new' / 'deeper' / 'out.json'))
  cli.check_writable('out', None)
  cli.check_writable('run_dir', str(tmp_path), directory=True)
  for args, message in [(('out', ''), '--out is empty'),
                        (('out', str(tmp_path)), 'is a folder, not a file'),
                        (('out', str(tmp_path / 'file' / 'out.json')), 'is a file, not a folder'),
                        (('run_dir', str(tmp_path / 'file'), True), 'is a file, not a folder')]:
    with pytest.raises(app.UsageError, match=message):
      cli.check_writable(*args)
  if os.geteuid() != 0:  # root writes anywhere
    locked = tmp_path / 'locked'
    locked.mkdir(mode=0o500)
    with pytest.raises(app.UsageError, match='not writable'):
      cli.check_writable('out', str(locked / 'out.json'))


def test_check_memory_states_the_estimate_and_the_machine():
  limit, where = cli.machine_memory()
  assert limit > 2 ** 26 and where
  with pytest.raises(app.UsageError, match=r'--batch=1e9: needs at least 1\.5 TiB .*'
                     r'this machine has 16 GiB \(host memory\)'):
    cli.check_memory('--batch=1e9', 1.5 * 2 ** 40, (16 * 2 ** 30, 'host memory'))
  cli.check_memory('--batch=64', 2 ** 20)
  train = TrainConfig(batch=64)
  assert cli.training_step_bytes(MEC, MODEL, train) == 64 * 4 * 2 * 2 * 4 * 4


@pytest.mark.parametrize('script,args,message', [
    ('train_cost.py', ['--bar=nan'], r'--bar = nan'),
    ('benchmark.py', ['--min_seconds=inf'], r'--min_seconds = inf'),
    ('train_cost.py', ['--out='], r'--out is empty'),
    ('benchmark.py', ['--out={tmp}'], r'is a folder, not a file'),
    ('train.py', ['--batch=1000000000', '--run_dir={tmp}/run'], r'needs at least .* memory'),
    ('train.py', ['--n_users=100000000', '--run_dir={tmp}/run'], r'this machine has'),
])
def test_launchers_refuse_before_work(script, args, message, tmp_path):
  result = launch(script, *[a.format(tmp=tmp_path) for a in args], '--dry_run')
  assert result.returncode != 0, result.stdout[-1000:]
  assert 'Traceback' not in result.stderr and __import__('re').search(message, result.stderr), \
      result.stderr[-1500:]
  assert os.listdir(tmp_path) == []


# ------------------------------------------------- items 8-10, 12: run directories


def _write_lock(path, **info):
  with open(os.path.join(path, runs.LOCK_NAME), 'w') as f:
    json.dump({'host': socket.gethostname(), 'started': 'then', 'token': 'x', **info}, f)


def test_a_run_directory_is_used_by_one_run_at_a_time(tmp_path):
  path = str(tmp_path / 'run')
  run = RunDir(path)
  with run.locked():
    with run.locked():  # the same run, e.g. a phase inside the launcher's block
      info = json.load(open(os.path.join(path, runs.LOCK_NAME)))
      assert info['pid'] == os.getpid() and info['host'] == socket.gethostname()
    with pytest.raises(runs.RunDirError, match=f'in use by pid {os.getpid()}'):
      with RunDir(path).locked():
        pass
    with pytest.raises(runs.RunDirError, match='in use'):
      runs.check_start(path, {}, resume=True)
  assert not os.path.exists(os.path.join(path, runs.LOCK_NAME))
  _write_lock(path, pid=1)
  with pytest.raises(runs.RunDirError, match='in use by pid 1'):
    RunDir(path).locked().__enter__()
  _write_lock(path, pid=1234, host='elsewhere')
  with pytest.raises(runs.RunDirError, match="host 'elsewhere'.*delete"):
    RunDir(path).locked().__enter__()


def test_a_stale_lock_is_reported_and_taken_over(tmp_path, capsys):
  path = str(tmp_path / 'run')
  run = RunDir(path)
  dead = subprocess.Popen([sys.executable, '-c', 'pass'])
  dead.wait()
  _write_lock(path, pid=dead.pid)
  with run.locked():
    assert json.load(open(os.path.join(path, runs.LOCK_NAME)))['pid'] == os.getpid()
  assert f'taking over the lock left by pid {dead.pid}' in capsys.readouterr().err
  assert os.listdir(path) == ['checkpoints']


def test_leftover_temporary_files_are_removed_at_the_next_start(tmp_path):
  path = str(tmp_path / 'run')
  run = RunDir(path)
  leftovers = [tempfile.mkstemp(dir=folder, prefix='.' + name + '.')[1]
               for folder, name in ((path, 'networks.msgpack'),
                                    (os.path.join(path, 'checkpoints'), 'allocator.msgpack'))]
  keep = os.path.join(path, '.notes')
  open(keep, 'w').close()
  assert all(io.is_temporary(os.path.basename(p)) for p in leftovers)
  with run.locked():
    assert not any(os.path.exists(p) for p in leftovers) and os.path.exists(keep)


def _records(path):
  with open(path) as f:
    return [{k: v for k, v in json.loads(line).items() if k != 'time'} for line in f]


def test_resumed_metrics_equal_the_uninterrupted_run(tmp_path):
  # The static baseline: the same checkpointed loop as every phase, the cheapest compile.
  train = TrainConfig(batch=4, static_steps=8, steps_per_call=2, checkpoint_every=2)
  seen = []

  class Killed(Exception):
    pass

  def kill_between_checkpoints(step, state):
    if step == 6:  # chunk 3: logged; the last checkpoint is at step 4
      seen.extend(_records(run.file('metrics.jsonl')))
      raise Killed

  run = RunDir(str(tmp_path / 'run'))
  with pytest.raises(Killed):
    train_allocator(MEC, MODEL, train, run, name='static', static=True,
                    on_chunk=kill_between_checkpoints)
  with open(run.file('metrics.jsonl'), 'a') as f:
    f.write('{"phase": "static", "ste')  # a write cut short by a full disk
  train_allocator(MEC, MODEL, train, RunDir(run.path), name='static', static=True)
  records = _records(run.file('metrics.jsonl'))
  # Up to the kill, the records are the uninterrupted run's; resume is exact from there.
  assert [r['step'] for r in records] == [2, 4, 6, 8]
  assert records[:3] == seen


def test_rewind_keeps_earlier_phases_and_drops_torn_lines(tmp_path):
  run = RunDir(str(tmp_path / 'run'))
  lines = [{'phase': 'allocator', 'step': s} for s in (2, 4)] + \
          [{'phase': 'policy', 'step': s} for s in (2, 4, 6)]
  with open(run.file('metrics.jsonl'), 'w') as f:
    f.writelines(json.dumps(r) + '\n' for r in lines)
    f.write('{"phase": "policy", "step": 8}{"phase"')  # two records glued on one line
  run.rewind_metrics('allocator', 4)
  assert len(_records(run.file('metrics.jsonl'))) == 5
  run.rewind_metrics('policy', 2)
  assert _records(run.file('metrics.jsonl')) == lines[:3]
  run.rewind_metrics('static', 0)  # a phase without records: nothing else goes
  assert _records(run.file('metrics.jsonl')) == lines[:3]


def test_a_run_that_failed_before_its_first_checkpoint_can_be_restarted(tmp_path):
  path = str(tmp_path / 'run')
  run = RunDir(path)
  old = {'train': {'batch': 10 ** 9}}
  run.write_config(old, resume=False)
  run.log({'phase': 'allocator', 'step': 2})
  new = {'train': {'batch': 64}}
  assert runs.check_start(path, new, resume=False) == 'restart'
  assert runs.check_start(path, new, resume=True) == 'restart'
  with run.locked():
    run.write_config(new, resume=False)
  assert io.read_json(run.file('config.json')) == new
  assert not os.path.exists(run.file('metrics.jsonl'))
  run.save('allocator', {'step': np.int32(2)})
  with pytest.raises(runs.RunDirError, match='already holds a run'):
    runs.check_start(path, new, resume=False)
  with pytest.raises(runs.RunDirError, match=r"differing fields: \['train'\]"):
    runs.check_start(path, old, resume=True)
  assert runs.check_start(path, new, resume=True) == 'resume'


def test_train_dry_run_checks_the_run_directory(tmp_path):
  failed = RunDir(str(tmp_path / 'failed'))  # config written, killed before a checkpoint
  failed.write_config({'train': {'batch': 10 ** 9}}, resume=False)
  result = launch('train.py', *TINY, f'--run_dir={failed.path}', '--dry_run')
  assert result.returncode == 0 and '"start": "restart"' in result.stdout, result.stderr[-1500:]

  resumed = RunDir(str(tmp_path / 'resumed'))  # a run with a checkpoint, other settings
  resumed.write_config({'train': {'batch': 5}}, resume=False)
  resumed.save('allocator', {'step': np.int32(2)})
  result = launch('train.py', *TINY, f'--run_dir={resumed.path}', '--resume', '--dry_run')
  assert result.returncode != 0 and 'differing fields' in result.stderr, result.stderr[-1500:]

  _write_lock(failed.path, pid=os.getpid(), proc_start=runs.proc_start(os.getpid()))
  result = launch('train.py', *TINY, f'--run_dir={failed.path}', '--resume', '--dry_run')
  assert result.returncode != 0 and f'in use by pid {os.getpid()}' in result.stderr, \
      result.stderr[-1500:]

  (tmp_path / 'file').write_text('x')
  result = launch('train.py', *TINY, f'--run_dir={tmp_path / "file" / "run"}', '--dry_run')
  assert result.returncode != 0 and 'is a file, not a folder' in result.stderr


# -------------------------------------------------------------- item 13: flagfiles


def test_flagfile_problems_are_one_line(tmp_path):
  good = tmp_path / 'good.flags'
  good.write_text('# comment\n--batch=4\n')
  binary = tmp_path / 'binary.flags'
  binary.write_bytes(b'\x00\x01\x02')
  latin = tmp_path / 'latin.flags'
  latin.write_bytes(b'--out=caf\xe9.json\n')
  nested = tmp_path / 'nested.flags'
  nested.write_text(f'--batch=4\n--flagfile={latin}\n')
  circular = tmp_path / 'circular.flags'
  circular.write_text(f'--flagfile={circular}\n--flagfile={good}\n')
  assert cli.flagfile_problem([f'--flagfile={good}', '--x=1']) is None
  assert cli.flagfile_problem(['--flagfile', str(circular)]) is None
  assert 'a binary file' in cli.flagfile_problem([f'--flagfile={binary}'])
  assert 'not UTF-8 text (byte 0xe9 at offset 9)' in cli.flagfile_problem([
      f'--flagfile={latin}'])
  assert cli.flagfile_problem([f'--flagfile={nested}']).endswith(f'(named in {nested})')
  assert 'cannot be read' in cli.flagfile_problem([f'--flagfile={tmp_path / "missing"}'])
  assert 'cannot be read' in cli.flagfile_problem([f'--flagfile={tmp_path}'])


def test_launcher_with_a_binary_flagfile_says_so_in_one_line(tmp_path):
  binary = tmp_path / 'binary.flags'
  binary.write_bytes(b'\xff\xfe\x00garbage')
  outer = tmp_path / 'outer.flags'
  outer.write_text(f'--flagfile={binary}\n')
  result = launch('train.py', f'--flagfile={outer}', f'--run_dir={tmp_path / "run"}')
  assert result.returncode != 0
  assert result.stderr.strip().count('\n') == 0, result.stderr[-1500:]
  assert f'--flagfile={binary}: a binary file' in result.stderr


# ------------------------------------------------------------- item 14: schemas


def _run(kind='full', schedule='progressive', steps=6):
  return {'kind': kind, 'schedule': schedule, 'seed': 0, 'reached': True, 'steps': steps,
          'seconds': 1.5, 'history': [{'stage_target': 'top', 'step': 2, 'worst_gap': 0.1}],
          'stage_starts': [{'target': 'top', 'step': 0}], 'first_at_bar': [[2, 2], [2, 2]],
          'limiting': [[2, 2]]}


def _study():
  return {'bar': 0.15, 'results': [_run(), _run(schedule='scratch', steps=2)],
          'speedup': {'full': 0.3}, 'speedup_range': {'full': [0.3, 0.3]},
          'step_speedup': {'full': 0.33}}


@pytest.mark.parametrize('change,field', [
    (lambda s: s['results'][0].update(steps='6'), r'results\[0\]\.steps: expected an integer'),
    (lambda s: s['results'][1].update(history=[]), r'results\[1\]\.history: empty list'),
    (lambda s: s.update(results=[]), r'results: empty list'),
    (lambda s: s['results'][0].update(reached=1), r'results\[0\]\.reached: expected true'),
    (lambda s: s['results'][0].update(kind='sideways'), r'results\[0\]\.kind: expected one of'),
    (lambda s: s['results'][0]['limiting'].append([1]), r'results\[0\]\.limiting\[1\]'),
    (lambda s: s['speedup_range'].update(full=[0.3]), r'speedup_range\.full'),
    (lambda s: s['results'][0]['history'][0].pop('worst_gap'),
     r'results\[0\]\.history\[0\]\.worst_gap is missing'),
])
def test_cost_study_is_checked_against_its_schema(tmp_path, change, field):
  study = _study()
  change(study)
  path = tmp_path / 'cost.json'
  io.write_json_atomic(str(path), study)
  with pytest.raises(io.SchemaError, match=f'cost study {path}: field {field}'):
    cost_study.load_study(str(path))


def test_cached_study_parts_are_checked_against_their_schema(tmp_path):
  path = str(tmp_path / 'part.json')
  io.write_json_atomic(path, {**_run(), 'seconds': 'fast'})
  with pytest.raises(io.SchemaError, match=r'part\.json: field seconds'):
    io.cached_json(path, lambda: pytest.fail('recomputed'), 'part',
                   schema=cost_study.RUN_SCHEMA)
  io.write_json_atomic(path, _run())
  assert io.cached_json(path, lambda: None, 'part', schema=cost_study.RUN_SCHEMA) == _run()


def test_check_schema_basics():
  schema = {'n': io.Integer(1), 'x': float, 'tags': io.ListOf(str, min_len=0),
            'pair': (int, str), 'opt': io.Optional(bool), 'by': io.DictOf(io.Number(0.0))}
  good = {'n': 3, 'x': 2, 'tags': [], 'pair': [1, 'a'], 'by': {'a': 0.5}}
  io.check_schema(good, schema, 'f.json')
  for bad, field in [({'n': 0}, 'n'), ({'n': True}, 'n'), ({'x': math.nan}, 'x'),
                     ({'tags': ['a', 1]}, r'tags\[1\]'), ({'pair': [1]}, 'pair'),
                     ({'opt': 'yes'}, 'opt'), ({'by': {'a': -1.0}}, r'by\.a')]:
    with pytest.raises(io.SchemaError, match=f'f.json: field {field}'):
      io.check_schema({**good, **bad}, schema, 'f.json')
