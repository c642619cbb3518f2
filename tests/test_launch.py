"""Every shipped flagfile runs (in a tiny setting), and bad input fails before any work."""

import glob
import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_MODEL = ['--n_users=6', '--num_experts=2', '--max_depth=2', '--width=8',
              '--static_width=8']
TINY = {
    'train.py': TINY_MODEL + [
        '--batch=8', '--full_steps=2', '--width_steps=2', '--depth_steps=2',
        '--scratch_steps=2', '--static_steps=2', '--policy_steps=2', '--joint_steps=2',
        '--steps_per_call=2', '--eval_slots=64'],
    'benchmark.py': TINY_MODEL + [
        '--batch=256', '--alloc_batch=16', '--ga_batch=2', '--oracle_batch=8',
        '--min_seconds=0.01', '--min_calls=3', '--exit_batch=32'],
    'evaluate.py': ['--slots=128', '--chunk=64'],  # the shipped checkpoints
    'train_cost.py': TINY_MODEL + ['--batch=8', '--max_steps=4', '--steps_per_call=2',
                                   '--study_eval_slots=32', '--kinds=depth', '--seeds=0'],
    'reproduce.py': ['--cases=2', '--sweeps=cpu', '--points_per_sweep=2', '--slots=64',
                     '--ga_slots=4', '--oracle_slots=16', '--model_size_slots=0'],
}


def run(script, *args, timeout=600):
  return subprocess.run([sys.executable, os.path.join('launch', script), *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=timeout)


def flagfiles():
  out = []
  for path in sorted(glob.glob(os.path.join(ROOT, 'launch', 'flags', '*.flags'))):
    with open(path) as f:
      first = f.readline()
    match = re.match(r'#\s*python launch/(\w+\.py)', first)
    assert match, f'{path}: the first line must name its script: # python launch/<x>.py'
    out.append((os.path.relpath(path, ROOT), match.group(1)))
  return out


@pytest.fixture(scope='module')
def tiny_networks(tmp_path_factory):
  """The README's main job (quick.flags) in a tiny setting; its networks serve the
  evaluation tests."""
  run_dir = str(tmp_path_factory.mktemp('tiny') / 'run')
  result = run('train.py', '--flagfile=launch/flags/quick.flags', f'--run_dir={run_dir}',
               *TINY['train.py'])
  assert result.returncode == 0, result.stderr[-3000:]
  for name in ('config.json', 'metrics.jsonl', 'networks.msgpack', 'summary.json'):
    assert os.path.exists(os.path.join(run_dir, name)), name
  return run_dir


# One flagfile per script runs in full (tiny sizes); the others are checked with
# --dry_run, which parses and validates every flag and input file and stops before work.
FULL_RUNS = ('launch/flags/quick.flags', 'launch/flags/bench_exits.flags',
             'launch/flags/eval_case1.flags', 'launch/flags/reproduce.flags',
             'launch/flags/train_cost.flags')


@pytest.mark.parametrize('flagfile,script', flagfiles())
def test_flagfile_runs(flagfile, script, tmp_path, tiny_networks):
  if flagfile == 'launch/flags/quick.flags':
    return  # run in full by the tiny_networks fixture
  if flagfile not in FULL_RUNS:
    result = run(script, f'--flagfile={flagfile}', '--dry_run',
                 *(['--run_dir', str(tmp_path / 'run')] if script in ('train.py', 'train_rl.py')
                   else []))
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'dry run: every flag checked' in result.stdout
    assert not (tmp_path / 'run').exists()
    return
  assert script in TINY, f'add tiny overrides for {script} to this test'
  args = [f'--flagfile={flagfile}', *TINY[script]]
  if script in ('train.py',):
    args.append(f'--run_dir={tmp_path / "run"}')
  if script in ('benchmark.py', 'evaluate.py', 'train_cost.py'):
    args.append(f'--out={tmp_path / "out.json"}')
  expected = tmp_path / ('report.md' if script == 'reproduce.py' else 'out.json')
  if script == 'reproduce.py':
    args += [f'--networks_case2={tiny_networks}', f'--results_dir={tmp_path}',
             f'--cost_study={tmp_path / "no_cost_study.json"}']
  result = run(script, *args)
  assert result.returncode == 0, result.stderr[-3000:]
  if script != 'train.py':
    assert expected.exists()
  if script == 'evaluate.py':  # a result says which slots it holds
    written = json.loads(expected.read_text())
    assert {'seed', 'chunk', 'inference_delay'} <= set(written), sorted(written)
  if script == 'reproduce.py':  # a second run reads every point back: resume
    points = sorted((tmp_path / 'points').iterdir())
    assert {'yardstick', 'ga_yardstick'} <= set(json.loads(points[0].read_text()))
    # The shipped PPO agent runs on the same slots, cached in files of its own.
    assert [p.name for p in points if p.name.startswith('ppo_')] == [
        'ppo_case2_cpu_1e+09.json', 'ppo_case2_cpu_4.5e+09.json']
    text = expected.read_text()
    assert '| ppo |' in text and '## Training wall time of each pipeline' in text
    assert '| ppo, case 2 | `checkpoints/ppo_case2.msgpack` |' in text
    stamps = [p.stat().st_mtime_ns for p in points]
    again = run(script, *args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert 'computing point' not in again.stdout
    assert [p.stat().st_mtime_ns for p in points] == stamps


@pytest.mark.parametrize('args,message', [
    (['--batch=0'], r'TrainConfig\.batch = 0'),
    (['--b_max=-1'], r'MECConfig\.b_max = -1'),
    (['--num_experts=0'], r'ModelConfig\.num_experts = 0'),
    (['--schedule=sideways'], r'TrainConfig\.schedule'),
    (['--loss=weighted'], r'TrainConfig\.loss'),
    (['--miss_temperature_end=nan'], r'TrainConfig\.miss_temperature_end'),
    (['--no_such_flag=1'], r'no_such_flag'),
])
def test_bad_train_flags_fail_before_work(args, message, tmp_path):
  run_dir = tmp_path / 'run'
  result = run('train.py', f'--run_dir={run_dir}', *args, timeout=120)
  assert result.returncode != 0
  assert re.search(message, result.stderr + result.stdout), result.stderr[-2000:]
  assert not run_dir.exists()


def test_evaluate_refuses_bad_networks_and_methods(tmp_path, tiny_networks):
  corrupt = tmp_path / 'networks.msgpack'
  corrupt.write_bytes(b'not msgpack at all')
  cases = [([f'--networks={tmp_path / "missing"}'], 'not found'),
           ([f'--networks={corrupt}'], 'corrupt'),
           ([f'--networks={tiny_networks}', '--methods=policy_moe,nonsense'], 'nonsense'),
           ([f'--networks={tiny_networks}', '--case=1'], 'trained for case 2'),
           ([f'--networks={tiny_networks}', '--n_users=50'], 'accept at most 6'),
           ([f'--networks={tiny_networks}', '--loss=objective'], 'trained with --loss=paper'),
           ([f'--networks={tiny_networks}', '--methods=optimal'], 'optimal'),
           ([f'--networks={tiny_networks}', '--out='], '--out is empty'),
           ([f'--networks={tiny_networks}', f'--out={tmp_path}'], 'is a folder')]
  for args, message in cases:
    result = run('evaluate.py', '--slots=64', *args, timeout=120)
    assert result.returncode != 0 and message in result.stderr, (args, result.stderr[-1500:])


def test_reproduce_refuses_a_cost_study_it_cannot_report(tmp_path):
  old = tmp_path / 'old_cost.json'
  old.write_text('{"bar": 0.15, "speedup": {}, "results": [{"kind": "full"}]}')
  result = run('reproduce.py', '--flagfile=launch/flags/reproduce.flags', '--dry_run',
               f'--cost_study={old}', f'--results_dir={tmp_path / "out"}', timeout=120)
  assert result.returncode != 0
  assert 'results[0].schedule' in result.stderr and 'older' in result.stderr, \
      result.stderr[-1500:]
  assert not (tmp_path / 'out').exists()
  blocked = tmp_path / 'a_file'
  blocked.write_text('')
  result = run('reproduce.py', '--flagfile=launch/flags/reproduce.flags', '--dry_run',
               f'--results_dir={blocked}', timeout=120)
  assert result.returncode != 0 and 'is a file, not a folder' in result.stderr, \
      result.stderr[-1500:]


@pytest.mark.parametrize('args,message', [
    (['--seeds=0,0'], '--seeds'),
    (['--seeds=zero'], '--seeds'),
    (['--kinds=full,sideways'], 'sideways'),
    (['--bar=-0.1'], '--bar'),
])
def test_bad_train_cost_flags_fail_before_work(args, message, tmp_path):
  out = tmp_path / 'cost.json'
  result = run('train_cost.py', f'--out={out}', *args, timeout=120)
  assert result.returncode != 0 and message in result.stderr, result.stderr[-1500:]
  assert not out.exists() and not (tmp_path / 'cost_runs').exists()
