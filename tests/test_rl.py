"""The PPO baseline (dynn_jax.rl): action decoding against NumPy, a tiny training that
beats its initial policy, exact resume, one agent per system under vmap, the 'ppo'
evaluation method, and the launcher's checks.

One tiny config serves every training test, so its compiled chunk is built once.
"""

import functools
import json
import math
import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from dynn_jax import evaluation
from dynn_jax.config import ConfigError, MECConfig, point_params, sweep_params
from dynn_jax.env import normalized_features, sample_slots, slot_costs
from dynn_jax.gym import MECEnv
from dynn_jax.networks import load_networks
from dynn_jax.rl.actions import LOGIT_LIMIT
from dynn_jax.rl.agent import AgentOutput, agent_module, deterministic_decision
from dynn_jax.rl.ppo import (PHASE, PPOConfig, check_case, env_action, init_state,
                             make_train, save_agent, train_ppo, update_trace_count,
                             user_log_probs)
from dynn_jax.runs import RunDir
from dynn_jax.training.config import phase_key

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MEC = MECConfig(case=2, n_users=6, n_max=8)
W = 8
TINY = PPOConfig(agent_case=2, num_envs=128, updates=24, update_epochs=2, num_minibatches=2,
                 hidden=16, lr=3e-3, steps_per_call=8, checkpoint_every=1, eval_slots=64)


def _softmax_over(z, x):
  """NumPy: softmax of the clipped logits z over the users in x, 0 elsewhere."""
  z = np.clip(np.asarray(z, np.float64), -LOGIT_LIMIT, LOGIT_LIMIT)
  e = np.where(x, np.exp(z - z.max(-1, keepdims=True)), 0.0)
  return e / np.maximum(e.sum(-1, keepdims=True), 1e-300)


def test_config_errors_name_the_field_and_range():
  with pytest.raises(ConfigError, match=r'PPOConfig.num_envs = 0; allowed range an integer'):
    PPOConfig(num_envs=0)
  with pytest.raises(ConfigError, match=r'PPOConfig.clip_eps = 1.5; allowed range \(0.0, 1.0\]'):
    PPOConfig(clip_eps=1.5)
  with pytest.raises(ConfigError, match=r'PPOConfig.agent_case = 3; allowed values: 1, 2'):
    PPOConfig(agent_case=3)
  with pytest.raises(ConfigError, match=r'num_minibatches = 3; must divide num_envs \* '
                                        r'num_steps = 1024'):
    PPOConfig(num_minibatches=3)
  with pytest.raises(ConfigError, match='agent_case = 1 but the environment has case = 2'):
    check_case(PPOConfig(agent_case=1), MEC)


def test_actions_decode_against_numpy():
  rng = np.random.default_rng(0)
  mask = np.arange(W) < 6
  x = (rng.random((16, W)) < 0.6) & mask
  z = rng.normal(0.0, 5.0, (16, W, 2)).astype(np.float32)
  z[0, 0, 0] = 40.0  # beyond the clip
  action = env_action(jnp.asarray(x), jnp.asarray(z))
  env = MECEnv(MEC)
  assert bool(jax.vmap(env.action_space().contains)(action._replace(
      x=action.x.astype(jnp.int32))).all())
  slots = sample_slots(jax.random.PRNGKey(0), MEC, 16)
  decision = jax.vmap(env.decision, in_axes=(0, 0, None))(slots, action, MEC.params())
  for i, budget, field in ((0, MEC.b_max, 'b'), (1, MEC.f_ser, 'f')):
    want = _softmax_over(z[..., i], x) * budget
    np.testing.assert_allclose(getattr(decision, field), want, rtol=1e-5, atol=1e-6 * budget)

  # Log-probabilities: Bernoulli bits at real users, Gaussians at offloaded ones (scipy).
  mean = rng.normal(size=(16, W, 2)).astype(np.float32)
  logit = rng.normal(size=(16, W)).astype(np.float32)
  log_std = np.array([-0.5, 0.3], np.float32)
  out = AgentOutput(jnp.asarray(logit), jnp.asarray(mean), jnp.asarray(log_std), None)
  got = user_log_probs(out, jnp.asarray(x), jnp.asarray(z), jnp.asarray(np.broadcast_to(
      mask, x.shape)))
  p = 1 / (1 + np.exp(-logit.astype(np.float64)))
  want = np.where(mask, stats.bernoulli.logpmf(x, p), 0.0) + np.where(
      x, stats.norm.logpdf(z, mean, np.exp(log_std)).sum(-1), 0.0)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def _fixed_slots():
  return sample_slots(jax.random.PRNGKey(123), MEC, 512)


@jax.jit
def _policy_objective(agent, slots):
  return slot_costs(slots, deterministic_decision(agent, slots, MEC, MEC), MEC).objective.mean()


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """The tiny config trained uninterrupted into a run directory."""
  run = RunDir(str(tmp_path_factory.mktemp('ppo') / 'run'))
  return run, train_ppo(TINY, MEC, run)


def test_tiny_training_beats_the_initial_policy(trained):
  run, agent = trained
  initial = init_state(TINY, MEC, phase_key(TINY.seed, PHASE)).train.params  # its start
  before, after = (float(_policy_objective(a, _fixed_slots())) for a in (initial, agent))
  assert after < 0.5 * before, (before, after)  # it learns to offload (0.058 -> 0.018)
  records = [json.loads(line) for line in open(run.file('metrics.jsonl'))]
  assert [r['step'] for r in records] == [8, 16, 24]
  assert all(math.isfinite(r['objective']) for r in records)
  assert records[-1]['objective'] < records[0]['objective']


def test_resume_equals_uninterrupted(trained, tmp_path):
  run_a, agent_a = trained
  run = RunDir(str(tmp_path / 'run'))
  traces = update_trace_count()

  def killed(step, state):  # dies after the chunk ending at 16, before its checkpoint
    if step == 16:
      raise KeyboardInterrupt
  with pytest.raises(KeyboardInterrupt):
    train_ppo(TINY, MEC, run, on_chunk=killed)
  agent_b = train_ppo(TINY, MEC, run)  # resumes from the checkpoint at 8
  chex.assert_trees_all_equal(agent_a, agent_b)
  assert update_trace_count() == traces  # the fixture's compiled chunk, reused
  strip = lambda path: [{k: v for k, v in json.loads(line).items() if k != 'time'}
                        for line in open(path)]
  assert strip(run.file('metrics.jsonl')) == strip(run_a.file('metrics.jsonl'))


def test_one_agent_per_system_under_vmap():
  config = TINY.replace(updates=2)
  sweep = sweep_params(MEC, 'f_ser', [0.1e9, 10e9])
  train = make_train(config, MEC)
  out = jax.jit(jax.vmap(train, in_axes=(None, 0)))(jax.random.PRNGKey(0), sweep)
  objective = out['metrics']['objective']
  assert objective.shape == (2, 2)
  assert bool((objective[0] > objective[1]).all())  # a slower server costs more
  # Each system's agent is the one trained on that system alone.
  alone = jax.jit(train)(jax.random.PRNGKey(0), point_params(sweep, 1))
  chex.assert_trees_all_close(jax.tree.map(lambda a: a[1], out['runner_state'].train.params),
                              alone['runner_state'].train.params, rtol=1e-4, atol=1e-6)
  first = jax.tree.leaves(out['runner_state'].train.params)[0]
  assert not np.allclose(first[0], first[1])


def test_ppo_method(trained, tmp_path):
  _, agent = trained
  path = str(tmp_path / 'ppo.msgpack')
  save_agent(path, agent, MEC, TINY)
  params, mec, model, meta = load_networks(path)
  assert meta['train']['loss'] == 'objective' and meta['train']['algorithm'] == 'ppo'
  assert params.allocator is None
  setting = evaluation.Setting(mec=mec, model=model, feature_config=mec)
  ppo = functools.partial(evaluation.METHODS['ppo'], setting.static, mec.params())
  slots = sample_slots(jax.random.PRNGKey(3), MEC, 32)
  outcome = ppo(jax.random.PRNGKey(0), slots, params)
  np.testing.assert_array_equal(outcome.t_inf_edge, 0.0)  # treated as free
  # The same decision redone from the module's outputs: x = p > 0.5, softmax of means.
  module = agent_module(params.agent, 2, W)
  features = normalized_features(slots, MEC)
  h = module.apply({'params': params.agent}, features, slots.mask, method='encode')
  logit = module.apply({'params': params.agent}, h, slots.mask, method='offload_logit')
  x = np.asarray(slots.mask) & (np.asarray(logit) > 0)
  mean = np.asarray(module.apply({'params': params.agent}, h, jnp.asarray(x), features,
                                 method='share_mean'))
  np.testing.assert_array_equal(outcome.decision.x, x)
  np.testing.assert_allclose(outcome.decision.b, _softmax_over(mean[..., 0], x) * MEC.b_max,
                             rtol=1e-4, atol=1e-3)
  np.testing.assert_allclose(outcome.decision.f, _softmax_over(mean[..., 1], x) * MEC.f_ser,
                             rtol=1e-4, atol=1e-3 * MEC.f_ser / MEC.b_max)
  # Trimmed to the users present (evaluation.active_rows), the same decision.
  trimmed = ppo(None, evaluation.first_rows(slots, 6), params)
  np.testing.assert_allclose(trimmed.decision.b, outcome.decision.b[:, :6], rtol=1e-5)
  result = evaluation.evaluate(setting, ('ppo',), params, slots=64)
  assert result.mean('ppo', 'ops') == 0 and math.isfinite(result.mean('ppo'))
  with pytest.raises(ValueError, match='built for case 2'):
    agent_module(params.agent, 1, W)
  with pytest.raises(ValueError, match="'ppo' needs a trained agent"):
    ppo(None, slots, params._replace(agent=None))


def test_networks_files_without_an_agent_load():
  params = load_networks(os.path.join(ROOT, 'checkpoints', 'paper_case1.msgpack'))[0]
  assert params.agent is None and params.allocator is not None


def _launch(*args):
  return subprocess.run([sys.executable, os.path.join('launch', 'train_rl.py'), *args],
                        cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_launcher_dry_run_and_case_mismatch(tmp_path):
  run_dir = tmp_path / 'run'
  ok = _launch('--flagfile=launch/flags/ppo_case2.flags', f'--run_dir={run_dir}',
               f'--export={tmp_path / "x.msgpack"}', '--dry_run')
  assert ok.returncode == 0, ok.stderr[-2000:]
  assert 'dry run: every flag checked' in ok.stdout and '"agent_case": 2' in ok.stdout
  bad = _launch('--flagfile=launch/flags/ppo_case2.flags', f'--run_dir={run_dir}', '--case=1')
  assert bad.returncode != 0
  assert 'PPOConfig.agent_case = 2 but the environment has case = 1' in bad.stderr
  assert not run_dir.exists() and not (tmp_path / 'x.msgpack').exists()
