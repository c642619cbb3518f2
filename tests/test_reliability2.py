"""Reliability, round 2: a reproduction point is trusted only for the sweep and value it
holds, and a damaged one is refused in one line; empty --sweeps / --cases / --kinds are
refused before they replace finished outputs; atomic writes go through symlinks;
metrics.jsonl stays strict JSON and loses only its bad lines on resume; damaged or
misfitting checkpoints are refused naming the file; the objective's weights are bounded
and numpy scalars accepted in MECConfig; slot_costs and the gym refuse impossible
decisions and parameters (NaN under jit); a multi-process run missing a peer ends in
one line within its timeout."""

import json
import os
import socket
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dynn_jax import MECConfig, cost_study, io, reproduce
from dynn_jax.runs import RunDir, RunDirError, check_start

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def launch(script, *args, timeout=120):
  return subprocess.run([sys.executable, os.path.join('launch', script), *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=timeout)


def one_line_error(result):
  """The launcher failed with a one-line message on stderr and no traceback."""
  assert result.returncode != 0, result.stdout[-1000:]
  assert 'Traceback' not in result.stderr, result.stderr[-2000:]
  return result.stderr.strip().splitlines()[-1]


# --------------------------------------------------- item 1: reproduction points

_RESULT = {'methods': {'a': {'objective': {'mean': 1.0, 'ci95': 0.1}}}, 'slots': 8,
           'mode': 'modelled', 'devices': 1, 'slots_of': {}}


def _sweep_setup(tmp_path, monkeypatch):
  """run_sweeps over two values of case 1's data sweep, with the evaluation replaced by
  a stub that records which values it computed."""
  computed = []

  def sweep_points(nets, sweep, values, methods, **_):
    computed.append(list(values))
    return [{'sweep': sweep, 'value': v, 'results': dict(_RESULT)} for v in values]

  monkeypatch.setattr(reproduce, 'sweep_points', sweep_points)
  monkeypatch.setattr(reproduce, 'sweep_methods', lambda nets: ('a',))
  nets = {1: types.SimpleNamespace(fingerprint='nets')}
  run = lambda: reproduce.run_sweeps(nets, str(tmp_path), cases=[1], sweeps=['data'], slots=8,
                                     ga_slots=0, seed=0, points_per_sweep=2)
  path = lambda v: reproduce.point_path(str(tmp_path), f'case1_data_{v}')
  return run, path, computed


def test_a_point_copied_over_another_is_recomputed_not_reported(tmp_path, monkeypatch,
                                                                  capsys):
  run, path, computed = _sweep_setup(tmp_path, monkeypatch)
  run()
  assert computed == [[500.0, 4000.0]]
  with open(path(4000), 'rb') as src, open(path(500), 'wb') as dst:
    dst.write(src.read())  # cp case1_data_4000.json case1_data_500.json
  points = run()[reproduce.SweepKey(1, 'data')]
  assert computed[-1] == [500.0] and [p['value'] for p in points] == [500.0, 4000.0]
  assert 'case1_data_500' in capsys.readouterr().out
  assert io.read_json(path(500))['value'] == 500.0


@pytest.mark.parametrize('damage', ['folder', 'edited', 'garbage'])
def test_a_damaged_point_is_refused_before_any_work(tmp_path, monkeypatch, damage):
  run, path, computed = _sweep_setup(tmp_path, monkeypatch)
  run()
  os.remove(path(4000))  # a missing point too: nothing may be computed before the refusal
  if damage == 'folder':
    os.remove(path(500))
    os.mkdir(path(500))
  elif damage == 'edited':
    text = open(path(500)).read()
    open(path(500), 'w').write(text.replace('"mean": 1.0', '"mean": 0.5'))
  else:
    open(path(500), 'w').write('{"sweep": "da')
  with pytest.raises(reproduce.PointError, match=r'case1_data_500\.json .*delete it'):
    run()
  assert computed == [[500.0, 4000.0]]  # the first run only


def test_reproduce_launcher_reports_a_damaged_point_in_one_line(tmp_path):
  os.makedirs(reproduce.point_path(str(tmp_path), 'case1_data_500'))  # a folder
  result = launch('reproduce.py', f'--results_dir={tmp_path}', '--cases=1', '--sweeps=data',
                  '--points_per_sweep=2', '--slots=8', '--ga_slots=0', '--oracle_slots=0',
                  '--model_size_slots=0', f'--cost_study={tmp_path}/none.json')
  assert 'case1_data_500.json is a folder' in one_line_error(result)


# ------------------------------------------------------- item 2: empty lists


def test_empty_selections_are_refused_naming_the_flag():
  with pytest.raises(ValueError, match='--sweeps is empty'):
    reproduce.selected_sweeps([1], [])
  with pytest.raises(ValueError, match='--cases is empty'):
    reproduce.selected_sweeps([], ['data'])
  with pytest.raises(ValueError, match='--sweeps=delta selects no sweep of --cases=2'):
    reproduce.selected_sweeps([2], ['delta'])
  assert reproduce.selected_sweeps([1, 2], ['1:delta', 'data']) == [
      (1, 'data'), (1, 'delta'), (2, 'data')]
  with pytest.raises(ValueError, match='--kinds is empty'):
    cost_study.check_kinds([])
  with pytest.raises(ValueError, match='--kinds is empty'):
    cost_study.run_study(MECConfig(n_users=4), None, None, kinds=())


@pytest.mark.parametrize('script,flag', [('reproduce.py', '--sweeps='),
                                         ('reproduce.py', '--cases='),
                                         ('train_cost.py', '--kinds=')])
def test_empty_lists_leave_finished_outputs_alone(tmp_path, script, flag):
  finished = {'reproduce.py': ['report.md', 'results.json'],
              'train_cost.py': ['study.json']}[script]
  for name in finished:
    (tmp_path / name).write_text('finished\n')
  out = (f'--results_dir={tmp_path}' if script == 'reproduce.py'
         else f'--out={tmp_path}/study.json')
  result = launch(script, flag, out)
  assert result.returncode != 0 and 'Traceback' not in result.stderr
  assert f'{flag.rstrip("=")} is empty' in result.stderr, result.stderr[-1500:]
  assert sorted(os.listdir(tmp_path)) == sorted(finished)
  assert all((tmp_path / name).read_text() == 'finished\n' for name in finished)


# ------------------------------------------------------------ item 3: symlinks


def test_atomic_writes_go_through_a_symlink(tmp_path):
  target = tmp_path / 'store' / 'results.json'
  target.parent.mkdir()
  target.write_text('old')
  link = tmp_path / 'results.json'
  link.symlink_to(target)
  io.write_json_atomic(str(link), {'a': 1})
  assert link.is_symlink() and io.read_json(str(target)) == {'a': 1}
  assert sorted(os.listdir(tmp_path)) == ['results.json', 'store']
  assert os.listdir(target.parent) == ['results.json']  # the temporary file went too


# --------------------------------------------------------- item 4: metrics.jsonl


def test_a_garbage_line_drops_alone_on_resume(tmp_path, capsys):
  run = RunDir(str(tmp_path / 'run'))
  records = [{'phase': 'allocator', 'step': s} for s in (2, 4, 6, 8)]
  lines = [json.dumps(r) + '\n' for r in records]
  lines.insert(2, '\x00\x17garbage}\n')  # line 3
  with open(run.file('metrics.jsonl'), 'w') as f:
    f.writelines(lines)
  run.rewind_metrics('allocator', 6)  # checkpoint at 6: step 8 is logged again
  with open(run.file('metrics.jsonl')) as f:
    assert [json.loads(line) for line in f] == records[:3]
  assert 'dropped line(s) 3: not a JSON record' in capsys.readouterr().err


@pytest.mark.parametrize('value', [float('nan'), float('inf'), np.float32('-inf')])
def test_metrics_refuse_non_finite_values_naming_the_key(tmp_path, value):
  run = RunDir(str(tmp_path / 'run'))
  run.log({'phase': 'policy', 'step': 2, 'loss': 0.5})
  with pytest.raises(io.NonFiniteError, match=r"phase 'policy' step 4: .*loss = "):
    run.log({'phase': 'policy', 'step': 4, 'loss': value})
  with open(run.file('metrics.jsonl')) as f:
    assert [json.loads(line, parse_constant=pytest.fail) for line in f] == [
        {'phase': 'policy', 'step': 2, 'loss': 0.5}]


# ---------------------------------------------------------- item 5: checkpoints


def _checkpointed_run(tmp_path):
  run = RunDir(str(tmp_path / 'run'))
  run.write_config({'a': 1}, resume=False)
  state = {'w': np.arange(8, dtype=np.float32).reshape(2, 4), 'step': np.int32(3)}
  run.save('allocator', state)
  return run, state


@pytest.mark.parametrize('damage,problem', [('truncate', 'is corrupt'), ('empty', 'is empty'),
                                            ('folder', 'is a folder, not a file')])
def test_a_damaged_checkpoint_is_refused_in_one_line(tmp_path, damage, problem):
  run, state = _checkpointed_run(tmp_path)
  path = run.checkpoint_path('allocator')
  data = open(path, 'rb').read()
  if damage == 'folder':
    os.remove(path)
    os.mkdir(path)
  else:
    open(path, 'wb').write(data[:len(data) // 2] if damage == 'truncate' else b'')
  message = rf'checkpoint {path} {problem}.*: delete it to train phase .allocator. again'
  with pytest.raises(RunDirError, match=message):
    run.restore('allocator', state)
  with pytest.raises(RunDirError, match=message):  # --resume refuses it before any work
    check_start(run.path, {'a': 1}, resume=True)


def test_a_checkpoint_of_other_sizes_is_refused_naming_the_array(tmp_path):
  run, state = _checkpointed_run(tmp_path)
  other = {'w': np.zeros((3, 4), np.float32), 'step': np.int32(0)}
  with pytest.raises(RunDirError, match=r"\['w'\] saved as \(2, 4\) float32, expected "
                                        r"\(3, 4\) float32"):
    run.restore('allocator', other)
  other = {'w': np.zeros((2, 4), np.float16), 'step': np.int32(0)}
  with pytest.raises(RunDirError, match=r"\['w'\] saved as .* float32, expected .* float16"):
    run.restore('allocator', other)
  np.testing.assert_array_equal(run.restore('allocator', state)['w'], state['w'])


# ----------------------------------------------------------- item 6: MECConfig


@pytest.mark.parametrize('field,value,allowed', [
    ('alpha', 1e30, r'\[0.0, 1000000.0\]'), ('beta', 1e7, r'\[0.0, 1000000.0\]'),
    ('gamma', 1e7, r'\(0.0, 1000000.0\]'), ('delta', float('inf'), r'\[0.0, 1000000.0\]'),
    ('mu', 1e-10, r'\[0.0, 1e-15\]'), ('f_loc_max', 1e20, r'\(0.0, 10000000000000.0\]')])
def test_objective_weights_are_bounded(field, value, allowed):
  with pytest.raises(ValueError, match=rf'MECConfig.{field} = .*; allowed range {allowed}'):
    MECConfig(case=2, **{field: value})


def test_numpy_scalars_are_taken_as_python_numbers():
  config = MECConfig(case=np.int64(2), n_users=np.int32(4), f_ser=np.float32(2e9),
                     alpha=np.float64(2.0))
  assert config == MECConfig(case=2, n_users=4, f_ser=2e9, alpha=2.0)
  assert type(config.n_users) is int and type(config.f_ser) is float
  hash(config)
  with pytest.raises(ValueError, match='MECConfig.n_users = True'):
    MECConfig(n_users=np.bool_(True))


def test_costs_stay_finite_at_the_largest_weights():
  from dynn_jax.env import sample_slots, slot_costs
  from dynn_jax.solvers import objective_allocation, objective_bound
  big = MECConfig(case=2, n_users=6, alpha=1e6, beta=1e6, gamma=1e6, delta=1e6, mu=1e-15,
                  f_loc_min=1e12, f_loc_max=1e13, s_avg=1e9, c_avg=1e6)
  params = big.params()
  slots = sample_slots(jax.random.PRNGKey(0), params, 4)
  local = slot_costs(slots, jax.tree.map(jnp.zeros_like, _decision(slots)), params)
  assert np.isfinite(np.asarray(local.objective)).all()
  decision = objective_allocation(slots, slots.mask, params)
  assert not np.isnan(np.asarray(slot_costs(slots, decision, params).objective)).any()
  assert not np.isnan(np.asarray(objective_bound(slots, slots.mask, params))).any()


def _decision(slots):
  from dynn_jax.env import Decision
  return Decision(x=slots.mask, b=jnp.zeros(slots.s.shape), f=jnp.zeros(slots.s.shape))


# ------------------------------------------------ item 7: slot_costs and the gym

CASE2 = MECConfig(case=2, n_users=4)


def _slots_and_split(batch=3):
  from dynn_jax.env import sample_slots
  from dynn_jax.solvers import equal_split
  slots = sample_slots(jax.random.PRNGKey(1), CASE2, batch)
  return slots, equal_split(slots, slots.mask, CASE2)


def _bad_decisions(split):
  """Impossible decisions, each spoiling slot 1 only: (what, decision, t_edge, t_loc)."""
  at_slot1 = lambda a, v: a.at[1].set(v)
  return [
      ('decision.f = -1', split._replace(f=at_slot1(split.f, -1.0)), 0.0, 0.0),
      ('decision.b sums to 5e\\+06', split._replace(b=at_slot1(split.b, 10 * split.b[1])),
       0.0, 0.0),
      ('decision.b = nan', split._replace(b=at_slot1(split.b, jnp.nan)), 0.0, 0.0),
      ('t_inf_edge = -0.001', split, jnp.array([0.0, -1e-3, 0.0]), 0.0),
      ('t_inf_loc = -0.001', split, 0.0, jnp.array([0.0, -1e-3, 0.0])),
  ]


def test_slot_costs_refuses_impossible_concrete_decisions():
  from dynn_jax.env import slot_costs
  slots, split = _slots_and_split()
  assert np.isfinite(np.asarray(slot_costs(slots, split, CASE2).objective)).all()
  for what, decision, t_edge, t_loc in _bad_decisions(split):
    with pytest.raises(ValueError, match=rf'slot_costs: {what}.* at slot \(1'):
      slot_costs(slots, decision, CASE2, t_edge, t_loc)
  one_slot = jax.tree.map(lambda a: a[0], split)
  with pytest.raises(ValueError, match=r'decision.x has shape \(4,\); expected .* \(3, 4\)'):
    slot_costs(slots, one_slot, CASE2)


def test_impossible_decisions_give_nan_under_jit():
  from dynn_jax.env import slot_costs
  slots, split = _slots_and_split()
  jitted = jax.jit(slot_costs, static_argnums=2)
  for what, decision, t_edge, t_loc in _bad_decisions(split):
    objective = np.asarray(jitted(slots, decision, CASE2, t_edge, t_loc).objective)
    assert np.isnan(objective[1]) and np.isfinite(objective[[0, 2]]).all(), what


def test_env_params_out_of_range_are_refused_or_nan():
  from dynn_jax.config import ConfigError, EnvParams
  from dynn_jax.env import slot_costs
  params = CASE2.params()
  with pytest.raises(ConfigError, match=r'EnvParams.f_ser = -1.0; allowed range \[1000.0'):
    params.replace(f_ser=-1.0)
  with pytest.raises(ConfigError, match='EnvParams.n_users = 9'):
    params.replace(n_users=9)
  assert isinstance(params.replace(f_ser=3e9), EnvParams)
  slots, split = _slots_and_split()
  negative = jax.tree.map(lambda a: a, params)
  object.__setattr__(negative, 'f_ser', jnp.float32(-1.0))  # past the check, as a jit input
  with pytest.raises(ConfigError, match='EnvParams.f_ser'):
    slot_costs(slots, split._replace(f=split.f * 0), negative)
  objective = jax.jit(slot_costs)(slots, split._replace(f=split.f * 0), negative).objective
  assert np.isnan(np.asarray(objective)).all()


def test_gym_refuses_non_finite_shares_and_params():
  from dynn_jax.gym import Action, MECEnv
  env = MECEnv(CASE2)
  obs, state = env.reset(jax.random.PRNGKey(0))
  x = jnp.ones(4, bool)
  good = Action(x, jnp.full(4, 0.25), jnp.full(4, 0.25))
  bad = good._replace(b_share=good.b_share.at[2].set(jnp.nan))
  with pytest.raises(ValueError, match='action.b_share holds .*nan.*must be finite'):
    env.step(jax.random.PRNGKey(1), state, bad)
  step = jax.jit(env.step)
  reward_good = step(jax.random.PRNGKey(1), state, good, env.default_params)[2]
  reward_bad = step(jax.random.PRNGKey(1), state, bad, env.default_params)[2]
  assert np.isfinite(reward_good) and np.isnan(reward_bad)
  params = jax.tree.map(lambda a: a, env.default_params)
  object.__setattr__(params, 'f_ser', jnp.float32(-1.0))
  assert np.isnan(step(jax.random.PRNGKey(1), state, good, params)[2])


# ------------------------------------------------------ item 8: jax.distributed


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_a_held_coordinator_port_is_refused():
  from dynn_jax import distributed
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
    holder.bind(('127.0.0.1', 0))
    holder.listen(1)
    address = f'127.0.0.1:{holder.getsockname()[1]}'
    with pytest.raises(ValueError, match=rf"'{address}': port \d+ cannot be opened on this "
                                         'host .*choose a free port'):
      distributed.check_port_free(address)
  distributed.check_port_free(address)  # released: free again
  with pytest.raises(ValueError, match='--initialization_timeout = 0'):
    distributed.initialize(address, 2, 0, connect=False, timeout_s=0)


@pytest.mark.parametrize('process_id', [0, 1])
def test_a_missing_process_ends_in_one_line_within_the_timeout(process_id):
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(('SLURM_', 'OMPI_', 'JAX_COORDINATOR_'))}
  argv = [sys.executable, os.path.join('launch', 'evaluate.py'),
          '--networks=checkpoints/paper_case2.msgpack', f'--process_id={process_id}',
          f'--coordinator_address=127.0.0.1:{_free_port()}', '--num_processes=2',
          '--initialization_timeout=3']
  result = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
  assert 'waiting up to 3 s for 2 processes' in result.stderr, result.stderr[-2000:]
  last = one_line_error(result)
  assert last.startswith(f'error: process {process_id}: the 2 processes did not all join at '
                         '127.0.0.1:'), result.stderr[-2000:]
  assert 'Check failure' not in result.stderr


# ------------------------------------------- full disk and Ctrl-C: one line, nothing torn


def test_a_full_disk_leaves_the_old_file_and_names_the_new_one(tmp_path, monkeypatch):
  import errno as errno_module
  from dynn_jax import io as dio
  path = tmp_path / 'results.json'
  dio.write_json_atomic(str(path), {'old': 1})
  before = path.read_bytes()

  def full(fd):
    raise OSError(errno_module.ENOSPC, 'No space left on device')

  monkeypatch.setattr(os, 'fsync', full)
  with pytest.raises(OSError, match='results.json') as caught:
    dio.write_json_atomic(str(path), {'new': 2})
  assert caught.value.errno == errno_module.ENOSPC
  assert path.read_bytes() == before
  assert sorted(p.name for p in tmp_path.iterdir()) == ['results.json']


@pytest.mark.parametrize('error,code,words', [
    (KeyboardInterrupt(), 130, 'interrupted'),
    (OSError(28, 'No space left on device', '/x/results.json'), 'stopped writing /x/results.json',
     'No space left'),
])
def test_launchers_end_ctrl_c_and_a_full_disk_in_one_line(error, code, words, capsys):
  from dynn_jax import cli as dcli

  def main(argv):
    raise error

  with pytest.raises(SystemExit) as caught:
    dcli.one_line_errors(main, ['prog'])
  message = caught.value.code if isinstance(caught.value.code, str) else capsys.readouterr().err
  if isinstance(code, int):
    assert caught.value.code == code
  else:
    assert code in message
  assert words in message and '\n' not in message.strip()


def test_sample_slots_refuses_more_users_than_the_width():
  from dynn_jax.env import sample_slots
  mec = MECConfig(n_users=4, n_max=6)
  with pytest.raises(ValueError, match=r'n_users = 7 .*allowed range \[0, 6\]'):
    sample_slots(jax.random.PRNGKey(0), mec, 2, n_users=7)
  assert sample_slots(jax.random.PRNGKey(0), mec, 2, n_users=6).mask.sum() == 12


def test_evaluate_refuses_a_chunk_that_cannot_fit_and_a_latency_table_loop(tmp_path):
  loop = tmp_path / 'table.json'
  os.symlink(str(loop), str(loop))
  for args, words in ((['--chunk=1000000000'], 'needs at least'),
                      (['--inference_delay=measured', f'--latency_table={loop}'],
                       'table.json')):
    result = launch('evaluate.py', '--networks=checkpoints/paper_case1.msgpack',
                    '--methods=equal_split', '--slots=1000000000', *args, '--dry_run')
    assert result.returncode != 0
    assert words in result.stderr and 'Traceback' not in result.stderr, result.stderr


def test_networks_with_nan_or_misshapen_arrays_are_refused_naming_the_array(tmp_path):
  from dynn_jax.models import ModelConfig, MoEAllocator, Policy
  from dynn_jax.networks import Params, init_params, load_networks, save_networks
  from dynn_jax.training import TrainConfig
  mec = MECConfig(n_users=4)
  model = ModelConfig.for_env(mec, num_experts=2, max_depth=2, width=4, static_width=4)
  good = Params(allocator=init_params(MoEAllocator(model), jax.random.PRNGKey(0), mec),
                policy=init_params(Policy(model), jax.random.PRNGKey(1), mec))
  path = str(tmp_path / 'networks.msgpack')
  nan_policy = jax.tree.map(lambda a: a, good.policy)
  nan_policy['out']['bias'] = nan_policy['out']['bias'].at[0].set(jnp.nan)
  save_networks(path, good._replace(policy=nan_policy), mec, model, TrainConfig())
  with pytest.raises(ValueError, match=r"policy\['out'\]\['bias'\] holds NaN"):
    load_networks(path)
  wide = init_params(MoEAllocator(model.replace(num_experts=3)), jax.random.PRNGKey(0), mec)
  save_networks(path, good._replace(allocator=wide), mec, model, TrainConfig())
  with pytest.raises(ValueError, match=r"allocator\['\w+'\] has shape \(\d+, 3\) float32; its"):
    load_networks(path)


def test_agent_with_nan_misshapen_or_foreign_arrays_is_refused(tmp_path):
  from dynn_jax.models import ModelConfig
  from dynn_jax.networks import Params, init_params, load_networks, save_networks
  from dynn_jax.rl import ActorCritic
  from dynn_jax.training import TrainConfig
  mec = MECConfig(n_users=4, case=2)
  model = ModelConfig.for_env(mec)
  mask = jnp.ones((1, mec.width), bool)
  agent = init_params(ActorCritic(hidden=8, layers=1, offload=True, max_users=mec.width),
                      jax.random.PRNGKey(0), mec, mask)
  path = str(tmp_path / 'agent.msgpack')
  save_networks(path, Params(agent=agent), mec, model, TrainConfig())
  assert load_networks(path)[0].agent['user_0']['kernel'].shape == (10, 8)
  nan = jax.tree.map(lambda a: a, agent)
  nan['share_out']['bias'] = nan['share_out']['bias'].at[1].set(jnp.nan)
  save_networks(path, Params(agent=nan), mec, model, TrainConfig())
  with pytest.raises(ValueError, match=r"agent\['share_out'\]\['bias'\] holds NaN"):
    load_networks(path)
  cut = jax.tree.map(lambda a: a, agent)
  cut['value_out']['kernel'] = cut['value_out']['kernel'][:4]
  save_networks(path, Params(agent=cut), mec, model, TrainConfig())
  with pytest.raises(ValueError, match=r"agent\['value_out'\]\['kernel'\] has shape \(4, 1\)"):
    load_networks(path)
  save_networks(path, Params(agent={'w': jnp.zeros(3)}), mec, model, TrainConfig())
  with pytest.raises(ValueError, match='agent: not the parameters of a dynn_jax.rl agent'):
    load_networks(path)


def test_reproduce_retrain_with_peers_is_refused_before_connecting():
  result = launch('reproduce.py', '--retrain', '--num_processes=2', '--process_id=0',
                  '--coordinator_address=127.0.0.1:1', timeout=60)
  assert result.returncode != 0 and '--retrain runs in one process' in result.stderr


def test_a_diverging_training_stops_at_the_first_non_finite_loss(tmp_path):
  from dynn_jax.models import ModelConfig
  from dynn_jax.runs import RunDir
  from dynn_jax.training import TrainConfig, TrainingDiverged, train_allocator
  mec = MECConfig(n_users=4)
  model = ModelConfig.for_env(mec, num_experts=2, max_depth=2, width=4, static_width=4)
  train = TrainConfig(batch=4, full_steps=4, width_steps=2, depth_steps=2, static_steps=0,
                      policy_steps=0, joint_steps=0, steps_per_call=2, alloc_lr=1e30,
                      checkpoint_every=1)
  run = RunDir(str(tmp_path / 'run'))
  with pytest.raises(TrainingDiverged, match=r"phase 'allocator' diverged: non-finite "
                                             r"loss_\w+.* step \d"):
    train_allocator(mec, model, train, run)
  metrics = tmp_path / 'run' / 'metrics.jsonl'
  for line in (metrics.read_text().splitlines() if metrics.exists() else []):
    json.loads(line, parse_constant=lambda name: pytest.fail(f'{name} in metrics.jsonl'))


# ------------------------------------------------------------- seeds, slots, resume


def test_seeds_beyond_the_prngs_32_bits_are_refused():
  from dynn_jax import ConfigError
  from dynn_jax.training import TrainConfig
  with pytest.raises(ConfigError, match='seed'):
    TrainConfig(seed=2 ** 32)
  assert TrainConfig(seed=2 ** 32 - 1).seed == 2 ** 32 - 1
  for script, args in (('evaluate.py', ['--networks=checkpoints/paper_case1.msgpack',
                                        '--seed=4294967296']),
                       ('train_cost.py', ['--seeds=0,4294967296']),
                       ('evaluate.py', ['--networks=checkpoints/paper_case1.msgpack',
                                        '--slots=1']),
                       ('reproduce.py', ['--model_size_slots=-5'])):
    result = launch(script, *args, '--dry_run')
    assert result.returncode != 0 and 'Traceback' not in result.stderr, result.stderr
    assert any(w in result.stderr for w in ('seed', 'slots')), result.stderr


def test_resume_of_a_missing_run_directory_is_refused(tmp_path):
  result = launch('train.py', '--flagfile=launch/flags/quick.flags',
                  f'--run_dir={tmp_path / "misspelt"}', '--resume', '--dry_run')
  assert result.returncode != 0 and 'is not a run directory' in result.stderr
  assert not (tmp_path / 'misspelt').exists()
