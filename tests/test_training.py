"""Training: the loss falls, a tiny network beats equal split, resume is exact."""

import json
import os
import subprocess
import sys

import chex
import jax
import numpy as np
import pytest

from dynn_jax import ConfigError, MECConfig, equal_split, sample_slots, slot_costs
from dynn_jax.env import weighted_edge_delay
from dynn_jax.models import ModelConfig, MoEAllocator, Policy, allocate
from dynn_jax.networks import Networks
from dynn_jax.runs import RunDir, RunDirError
from dynn_jax.training import (TrainConfig, alloc_learning_rate, init_params, kl_bounds,
                               check_scheduler_training, load_networks,
                               miss_temperature, policy_loss, run_config,
                               save_networks,
                               train_allocator, train_all, train_and_evaluate, trained_loss,
                               tune_allocator,
                               weighted_delays)
from dynn_jax.cli import read_flagfile
from dynn_jax.cost_study import limiting_subnetworks, without_compile
from dynn_jax.evaluation import Params
from dynn_jax.env import normalized_features

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MEC = MECConfig(n_users=8)
MODEL = ModelConfig.for_env(MEC, num_experts=3, max_depth=2, width=16)
TRAIN = TrainConfig(batch=32, full_steps=60, width_steps=60, depth_steps=60,
                    steps_per_call=20, static_steps=0, policy_steps=0, joint_steps=0)


def _held_out_delay(params, k, l):
  slots = sample_slots(jax.random.PRNGKey(123), MEC, 512)
  out = MoEAllocator(MODEL).apply({'params': params}, normalized_features(slots, MEC),
                                  slots.mask, k, l)
  return float(weighted_delays(out, slots, slots.mask, MEC).mean()), slots


@pytest.fixture(scope='module')
def trained():
  return train_allocator(MEC, MODEL, TRAIN)


def test_loss_falls_and_beats_equal_split(trained):
  fresh = init_params(MoEAllocator(MODEL), jax.random.PRNGKey(0), MEC)
  before, slots = _held_out_delay(fresh, 3, 2)
  eq = equal_split(slots, slots.mask, MEC)
  equal = float(weighted_edge_delay(slots, slots.mask, eq.b, eq.f, MEC).mean())
  for k in (1, 3):
    for l in (1, 2):
      after, _ = _held_out_delay(trained, k, l)
      assert after < 0.9 * before, (k, l, before, after)
      assert after < equal, (k, l, after, equal)


def test_progressive_schedule_grows_ranges_down_to_one():
  model = ModelConfig(num_experts=10, max_depth=3)
  train = TrainConfig(full_steps=10, width_steps=9, depth_steps=4)
  bounds = [tuple(int(v) for v in kl_bounds(s, train, model)) for s in range(23)]
  assert bounds[0] == bounds[9] == (10, 3)
  assert bounds[10][0] == 9 and bounds[18] == (1, 3)
  assert [b[0] for b in bounds[10:19]] == sorted([b[0] for b in bounds[10:19]], reverse=True)
  assert bounds[19] == (1, 3 - 1) or bounds[19][1] < 3
  assert bounds[22] == (1, 1)
  scratch = TrainConfig(schedule='scratch')
  assert tuple(int(v) for v in kl_bounds(0, scratch, model)) == (1, 1)
  width_only = TrainConfig(dynamic='width', full_steps=1, width_steps=1, depth_steps=5)
  assert tuple(int(v) for v in kl_bounds(6, width_only, model)) == (1, 3)


# The DyNN options (sandwich rule, distillation, load balancing, per-depth heads, the
# experts' slot context, log-uniform sizes) resume exactly too.
OPTIONS = {'sandwich': True, 'distill_weight': 0.5, 'balance_weight': 0.1,
           'scale_law': 'log_uniform', 'size_scale_max': 4.0}


@pytest.mark.parametrize('loss,decay,options', [('paper', 1.0, {}), ('objective', 0.05, {}),
                                                ('objective', 1.0, OPTIONS)])
def test_resume_equals_uninterrupted(tmp_path, loss, decay, options):
  # With a decaying learning rate the schedule's position must come back too.
  train = TrainConfig(batch=16, full_steps=20, width_steps=20, depth_steps=20,
                      steps_per_call=10, checkpoint_every=1, static_steps=0,
                      policy_steps=0, joint_steps=0, loss=loss, alloc_lr_decay=decay,
                      **options)
  model = MODEL.replace(depth_heads=True, expert_context=True) if options else MODEL
  whole = train_allocator(MEC, model, train)

  class Killed(Exception):
    pass

  def kill_after_three_chunks(step, state):
    if step == 30:
      raise Killed

  run = RunDir(str(tmp_path / 'run'))
  with pytest.raises(Killed):
    train_allocator(MEC, model, train, run, on_chunk=kill_after_three_chunks)
  resumed = train_allocator(MEC, model, train, RunDir(str(tmp_path / 'run')))
  chex.assert_trees_all_equal(whole, resumed)


def test_params_passed_in_stay_usable():
  # The training chunk donates its state: the caller's arrays must not be consumed.
  train = TrainConfig(batch=4, static_steps=4, steps_per_call=2)
  start = train_allocator(MEC, MODEL, train.replace(static_steps=2), name='static',
                          static=True)
  trained = train_allocator(MEC, MODEL, train, params=start, name='static', static=True)
  assert not any(leaf.is_deleted() for leaf in jax.tree.leaves(start))
  assert not any(leaf.is_deleted() for leaf in jax.tree.leaves(trained))
  assert not jax.tree.all(jax.tree.map(np.array_equal, start, trained))


def test_networks_file_round_trip_and_errors(tmp_path, trained):
  path = str(tmp_path / 'networks.msgpack')
  save_networks(path, Params(allocator=trained), MEC, MODEL, TRAIN)
  params, mec, model, _ = load_networks(path, MEC, MODEL)
  assert mec == MEC and model == MODEL and params.policy is None
  chex.assert_trees_all_close(params.allocator, trained)
  with pytest.raises(ValueError, match='different system configuration.*b_max'):
    load_networks(path, MEC.replace(b_max=1e6), MODEL)
  with pytest.raises(FileNotFoundError, match='not found'):
    load_networks(str(tmp_path / 'missing.msgpack'))
  (tmp_path / 'bad.msgpack').write_bytes(b'\x00garbage')
  with pytest.raises(ValueError, match='corrupt'):
    load_networks(str(tmp_path / 'bad.msgpack'))


@pytest.mark.parametrize('loss', ['paper', 'objective'])
def test_case2_pipeline_trains_every_network(loss, tmp_path):
  mec = MECConfig(case=2, n_users=6)
  # The objective variant also covers a scheduler reading the server CPU, trained with
  # f_ser drawn per step (costs in traced EnvParams); the paper variant, the defaults.
  objective = loss == 'objective'
  model = ModelConfig.for_env(mec, num_experts=2, max_depth=2, width=8,
                              scheduler_context='server_cpu' if objective else 'none')
  train = TrainConfig(batch=8, full_steps=4, width_steps=4, depth_steps=4, static_steps=4,
                      policy_steps=4, joint_steps=4, steps_per_call=4,
                      offload_fraction_min=0.3, loss=loss,
                      policy_target='expected_cost' if objective else 'labels',
                      server_cpu_scale_min=0.4 if objective else 1.0,
                      server_cpu_scale_max=2.0 if objective else 1.0)
  params = train_all(mec, model, train)
  assert all(getattr(params, n) is not None
             for n in ('allocator', 'static', 'policy', 'scheduler'))
  for leaf in jax.tree.leaves(params):
    assert np.all(np.isfinite(np.asarray(leaf)))
  path = str(tmp_path / 'networks.msgpack')
  save_networks(path, params, mec, model, train)
  assert trained_loss(load_networks(path)[3]) == loss


def test_objective_loss_lowers_the_slot_objective():
  train = TRAIN.replace(loss='objective', full_steps=120, width_steps=0, depth_steps=0)
  params = train_allocator(MEC, MODEL, train)
  fresh = init_params(MoEAllocator(MODEL), jax.random.PRNGKey(0), MEC)
  slots = sample_slots(jax.random.PRNGKey(123), MEC, 512)
  def slot_objective(p):
    out = MoEAllocator(MODEL).apply({'params': p}, normalized_features(slots, MEC),
                                    slots.mask, 3, 2)
    return float(slot_costs(slots, allocate(out, slots.mask, MEC), MEC).objective.mean())
  equal = float(slot_costs(slots, equal_split(slots, slots.mask, MEC), MEC).objective.mean())
  assert slot_objective(params) < min(0.95 * slot_objective(fresh), equal)


@pytest.mark.parametrize('changes,field', [
    ({'loss': 'weighted'}, 'TrainConfig.loss'),
    ({'miss_temperature_end': 0.0}, 'TrainConfig.miss_temperature_end'),
    ({'miss_temperature_end': float('nan')}, 'TrainConfig.miss_temperature_end'),
    ({'miss_temperature_end': float('inf')}, 'TrainConfig.miss_temperature_end'),
    ({'miss_temperature_start': -1.0}, 'TrainConfig.miss_temperature_start'),
    ({'alloc_lr_decay': 0.0}, 'TrainConfig.alloc_lr_decay'),
    ({'alloc_lr_decay': 1.5}, 'TrainConfig.alloc_lr_decay'),
    ({'alloc_lr_decay_from': 1.0}, 'TrainConfig.alloc_lr_decay_from'),
    ({'policy_target': 'argmin'}, 'TrainConfig.policy_target'),
    ({'tune_steps': 4, 'policy_steps': 0}, 'TrainConfig.tune_steps'),
    ({'tune_steps': -1}, 'TrainConfig.tune_steps'),
])
def test_bad_loss_settings_name_the_field(changes, field):
  with pytest.raises(ConfigError, match=field.replace('.', r'\.')):
    TrainConfig(**changes)


def test_a_scheduler_reading_the_server_cpu_needs_a_cpu_range_in_training():
  model = ModelConfig.for_env(MECConfig(case=2), scheduler_context='server_cpu')
  with pytest.raises(ConfigError, match=r'server_cpu_scale_min'):
    check_scheduler_training(model, TrainConfig())
  check_scheduler_training(model, TrainConfig(server_cpu_scale_min=0.5))
  with pytest.raises(ConfigError, match=r'TrainConfig\.server_cpu_scale_max'):
    TrainConfig(server_cpu_scale_min=2.0)
  with pytest.raises(ConfigError, match='ModelConfig.scheduler_context'):
    ModelConfig(scheduler_context='fleet')


def test_tuning_keeps_training_the_exits_the_policy_does_not_pick(trained):
  # A policy that picks (k, l) = (1, 1) for every slot. Half of each tuning batch trains
  # that exit, the other half the schedule's exits: the second layer, which (1, 1) never
  # reads, keeps being trained (tuning on the picked exits alone left it untouched and
  # the unpicked exits worse).
  policy = init_params(Policy(MODEL), jax.random.PRNGKey(1), MEC)
  policy = jax.tree.map(np.zeros_like, policy)
  policy['out']['bias'][0] = 1.0   # option 0 = (1, 1)
  train = TRAIN.replace(loss='objective', tune_steps=4, policy_steps=1, steps_per_call=4)
  tuned = tune_allocator(MEC, MODEL, train, trained, policy)
  assert not np.array_equal(tuned['layer2_kernel'], trained['layer2_kernel'])
  assert not np.array_equal(tuned['layer1_kernel'], trained['layer1_kernel'])


def test_policy_losses_against_numpy():
  model = MODEL
  policy = Policy(model)
  slots = sample_slots(jax.random.PRNGKey(3), MEC, 5)
  feats = normalized_features(slots, MEC)
  params = init_params(policy, jax.random.PRNGKey(4), MEC)
  costs = jax.random.uniform(jax.random.PRNGKey(5), (5, model.num_options), minval=1.0,
                             maxval=2.0)
  logits = np.asarray(policy.apply({'params': params}, feats, slots.mask), np.float64)
  c = np.asarray(costs, np.float64)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  expected = (p * (c / c.min(-1, keepdims=True) - 1.0)).sum(-1).mean()
  cross_entropy = -np.log(p[np.arange(5), c.argmin(-1)]).mean()
  np.testing.assert_allclose(policy_loss(policy, params, feats, slots.mask, costs,
                                         'expected_cost'), expected, rtol=1e-5)
  np.testing.assert_allclose(policy_loss(policy, params, feats, slots.mask, costs),
                             cross_entropy, rtol=1e-5)


def test_allocator_learning_rate_holds_then_decays_over_the_end_of_the_phase():
  assert alloc_learning_rate(TrainConfig(alloc_lr=1e-3), 100) == 1e-3
  lr = alloc_learning_rate(TrainConfig(alloc_lr=1e-3, alloc_lr_decay=0.1,
                                       alloc_lr_decay_from=0.6), 100)
  np.testing.assert_allclose([float(lr(s)) for s in (0, 59, 60, 80, 100)],
                             [1e-3, 1e-3, 1e-3, 1e-4 + 0.9e-3 * 0.5, 1e-4], rtol=1e-5)
  whole = alloc_learning_rate(TrainConfig(alloc_lr=1e-3, alloc_lr_decay=0.1), 100)
  np.testing.assert_allclose([float(whole(s)) for s in (0, 50, 100)],
                             [1e-3, 1e-4 + 0.9e-3 * 0.5, 1e-4], rtol=1e-5)


def test_miss_temperature_anneals_from_start_to_end():
  train = TrainConfig(miss_temperature_start=0.5, miss_temperature_end=0.005)
  temps = np.asarray([miss_temperature(s, 101, train) for s in (0, 50, 100, 200)])
  np.testing.assert_allclose(temps, [0.5, 0.05, 0.005, 0.005], rtol=1e-5)


def test_cost_study_counts_compile_once_per_stage_at_the_median():
  # Two stages; first chunks carry 5 s of compilation, other chunks take 1 s.
  chunks = [(30, [6.0, 1.0, 1.0]), (10, [5.5])]
  assert without_compile(chunks) == 1.0 + 1.0 + 1.0 + 1.0
  assert without_compile([(10, [4.0])]) == 4.0  # nothing to compare with: kept


def test_cost_study_limiting_subnetworks_are_the_last_or_never_at_the_bar():
  first = np.array([[10, 30], [20, -1]])
  assert limiting_subnetworks(first, np.ones((2, 2), bool)) == [[2, 2]]
  assert limiting_subnetworks(first, np.array([[True, False], [True, False]])) == [[2, 1]]
  assert limiting_subnetworks(np.array([[5, 5], [3, 5]]), np.ones((2, 2), bool)) == [
      [1, 1], [1, 2], [2, 2]]


def test_cost_study_stops_at_the_bar_and_resumes_from_its_cache(tmp_path, monkeypatch):
  import json
  from dynn_jax import cost_study
  mec = MECConfig(n_users=6)
  model = ModelConfig.for_env(mec, num_experts=2, max_depth=2, width=8)
  train = TrainConfig(batch=8, steps_per_call=2)
  kwargs = dict(bar=100.0, max_steps=20, eval_slots=32, kinds=('full',), seeds=(0,),
                cache_dir=str(tmp_path))
  study = cost_study.run_study(mec, model, train, **kwargs)
  prog, scratch = study['results']
  # A bar every network meets at once: each stage ends after its first chunk.
  assert scratch['reached'] and scratch['steps'] == 2
  assert prog['reached'] and prog['steps'] == 6
  assert [s['step'] for s in prog['stage_starts']] == [0, 2, 4]
  assert np.all(np.asarray(scratch['first_at_bar']) == 2)
  assert study['step_speedup']['full'] == pytest.approx(2 / 6)

  def rerun(*args, **kw):
    raise RuntimeError('a cached run was recomputed')
  monkeypatch.setattr(cost_study, 'time_to_bar', rerun)
  again = cost_study.run_study(mec, model, train, **kwargs)
  assert again['results'] == json.loads(json.dumps(study['results']))
  with pytest.raises(RuntimeError, match='recomputed'):  # other settings: not reused
    cost_study.run_study(mec, model, train, **{**kwargs, 'bar': 50.0})


TINY_MEC = MECConfig(n_users=6)
TINY_MODEL = ModelConfig.for_env(TINY_MEC, num_experts=2, max_depth=2, width=8, static_width=8)
TINY_TRAIN = TrainConfig(batch=8, full_steps=2, width_steps=2, depth_steps=2, static_steps=2,
                         policy_steps=2, tune_steps=2, joint_steps=0, steps_per_call=2,
                         eval_slots=64)


def test_train_and_evaluate_trains_saves_summarises_and_resumes(tmp_path):
  run_dir = str(tmp_path / 'run')
  with pytest.raises(ValueError, match='eval_chunk'):
    train_and_evaluate(TINY_MEC, TINY_MODEL, TINY_TRAIN, run_dir, resume=False, eval_chunk=0)
  assert not os.path.exists(run_dir)
  nets, summary = train_and_evaluate(TINY_MEC, TINY_MODEL, TINY_TRAIN, run_dir,
                                     resume=False, eval_chunk=32)
  saved = Networks.load(run_dir)
  chex.assert_trees_all_equal(saved.params, nets.params)
  assert (saved.mec, saved.model, saved.loss) == (TINY_MEC, TINY_MODEL, 'paper')
  with open(os.path.join(run_dir, 'summary.json')) as f:
    assert json.load(f)['text'] == summary['text']
  assert 'static baseline gap' in summary['text']
  with pytest.raises(RunDirError, match='already holds a run'):
    train_and_evaluate(TINY_MEC, TINY_MODEL, TINY_TRAIN, run_dir, resume=False)
  again, _ = train_and_evaluate(TINY_MEC, TINY_MODEL, TINY_TRAIN, run_dir, resume=True)
  chex.assert_trees_all_equal(again.params, nets.params)  # every phase already done


def test_read_flagfile_follows_nesting_and_refuses_unknown_names(tmp_path):
  base = tmp_path / 'base.flags'
  base.write_text('# a comment\n// another\n\n--case=2\n--n_users=6\n--batch=16\n'
                  '--normalize_rewards\n--run_dir=runs/x\n')
  top = tmp_path / 'top.flags'
  top.write_text(f'--flagfile={base}\n--flagfile={top}\n--batch=8\n--nogate_noise\n'
                 '--alloc_lr=2e-3\n')
  flags = read_flagfile(str(top))
  assert flags.mec == MECConfig(case=2, n_users=6)
  assert flags.model == ModelConfig.for_env(flags.mec, gate_noise=False)
  assert flags.train == TrainConfig(batch=8, normalize_rewards=True, alloc_lr=2e-3)
  assert flags.launcher == {'run_dir': 'runs/x'}
  for text, message in [('--batch=8\n--no_such_field=1\n', r'bad\.flags:2: unknown flag '
                                                              r'--no_such_field'),
                        ('--max_users=4\n', 'unknown flag --max_users'),
                        ('--batch=eight\n', 'expected an integer'),
                        ('--alloc_lr=nan\n', 'expected a finite number'),
                        ('--gate_noise=maybe\n', 'expected true or false'),
                        ('batch=8\n', 'not a --name=value flag'),
                        ('--batch=0\n', r'TrainConfig\.batch = 0'),
                        (f'--flagfile={tmp_path / "missing.flags"}\n', 'cannot be read')]:
    bad = tmp_path / 'bad.flags'
    bad.write_text(text)
    with pytest.raises(ConfigError, match=message):
      read_flagfile(str(bad))


def test_read_flagfile_reads_a_shipped_flagfile_as_the_launcher_does(tmp_path, monkeypatch):
  path = 'launch/flags/objective_case2.flags'  # nested twice, a bare boolean
  result = subprocess.run([sys.executable, 'launch/train.py', f'--flagfile={path}',
                           f'--run_dir={tmp_path / "run"}', '--dry_run'], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  resolved = json.loads(result.stdout[:result.stdout.rindex('}') + 1])
  monkeypatch.chdir(ROOT)  # nested flagfiles are named relative to the working directory
  flags = read_flagfile(path)
  mine = json.loads(json.dumps(run_config(flags.mec, flags.model, flags.train)))
  assert {k: resolved[k] for k in mine} == mine
