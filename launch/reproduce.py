"""Reproduces the paper's studies from the shipped checkpoints (or retrains them) and
writes JSON, CSV, PNG figures and a markdown report that sets our numbers beside the
paper's.

  python launch/reproduce.py --flagfile=launch/flags/reproduce.flags

Every point is written as soon as it is computed; rerunning continues an interrupted
reproduction from the points already written.
"""

import os
import time

from absl import app, flags

from dynn_jax import cli, cost_study, distributed, latency, plots, reproduce, training
from dynn_jax.io import SchemaError, write_bytes_atomic, write_json_atomic
from dynn_jax.networks import Networks
from dynn_jax.report.markdown import report
from dynn_jax.report.tables import sweep_csv

flags.DEFINE_string('results_dir', 'results/reproduce', 'Where points, figures and the '
                    'report go.')
flags.DEFINE_string('networks_case1', 'checkpoints/paper_case1.msgpack', 'Case-1 networks.')
flags.DEFINE_string('networks_case2', 'checkpoints/paper_case2.msgpack', 'Case-2 networks.')
flags.DEFINE_string('objective_networks_case1', 'checkpoints/objective_case1.msgpack',
                    'Case-1 networks trained with --loss=objective (empty: skip).')
flags.DEFINE_string('objective_networks_case2', 'checkpoints/objective_case2.msgpack',
                    'Case-2 networks trained with --loss=objective (empty: skip).')
flags.DEFINE_string('agent_networks_case1', 'checkpoints/ppo_case1.msgpack',
                    'Case-1 PPO agent (launch/train_rl.py), method ppo (empty: skip).')
flags.DEFINE_string('agent_networks_case2', 'checkpoints/ppo_case2.msgpack',
                    'Case-2 PPO agent (launch/train_rl.py), method ppo (empty: skip).')
flags.DEFINE_bool('retrain', False, 'Train both cases and both losses from '
                  'launch/flags/{paper,objective}_case*.flags first (resumable) instead of '
                  'loading the shipped checkpoints.')
flags.DEFINE_list('cases', ['1', '2'], 'Cases to reproduce.')
flags.DEFINE_list('sweeps', list(reproduce.SWEEPS),
                  'Sweeps to run (see dynn_jax.reproduce.SWEEPS); a case prefix runs a '
                  'sweep for that case only, e.g. 1:delta,2:data.')
flags.DEFINE_integer('points_per_sweep', None, 'Evaluate only this many values of each '
                     'sweep, evenly spaced, both ends kept (default: all).')
flags.DEFINE_integer('slots', 16384, 'Slots per sweep point (shared by all methods).')
flags.DEFINE_integer('ga_slots', 64, 'Slots per point for the GA (0: skip the GA).')
flags.DEFINE_integer('oracle_slots', 1024, 'Slots per point for the oracle and the lower '
                     'bound, with every method evaluated again on them for paired gaps '
                     '(0: skip the oracle).')
flags.DEFINE_integer('model_size_slots', 4096, 'Slots per data size of the Fig. 4 study: '
                     'every exit of both case-1 pipelines with and without inference '
                     'delay at 1, 3, 6 and 10 kbit (0: skip).')
flags.DEFINE_integer('seed', 0, 'Seed of the evaluation slots.', lower_bound=0,
                     upper_bound=2 ** 32 - 1)
flags.DEFINE_string('cost_study', 'results/train_cost.json', 'Fig. 12 results from '
                    'launch/train_cost.py; used when the file exists, with the studies '
                    'beside it named <its name>_*.json (other settings of the same study).')
flags.DEFINE_string('latency_table', None, 'Measured latency table: evaluate in measured '
                    'mode instead of modelled.')
flags.DEFINE_bool('allow_other_device', False, 'Accept a latency table from another device.')
distributed.define_flags()
FLAGS = flags.FLAGS


def networks_for(case: int, loss: str = 'paper') -> Networks | None:
  prefix = '' if loss == 'paper' else 'objective_'
  path = FLAGS[f'{prefix}networks_case{case}'].value
  if not path:
    return None
  if FLAGS.retrain and not FLAGS.dry_run:
    mec, model, train, _ = cli.read_flagfile(f'launch/flags/{loss}_case{case}.flags')
    cli.check_training_memory(mec, model, train)
    run_dir = os.path.join(FLAGS.results_dir, f'train_{loss}_case{case}')
    resume = os.path.exists(os.path.join(run_dir, 'config.json'))
    _, summary = training.train_and_evaluate(mec, model, train, run_dir, resume=resume)
    print(summary['text'])
    path = os.path.join(run_dir, 'networks.msgpack')
  nets = Networks.load(path)
  if nets.mec.case != case:
    raise app.UsageError(f'{path} holds case-{nets.mec.case} networks; expected case {case}')
  if nets.loss != loss:
    raise app.UsageError(f'{path} was trained with --loss={nets.loss}; '
                         f'--{prefix}networks_case{case} needs networks trained with '
                         f'--loss={loss}')
  return nets


def agent_for(case: int) -> Networks | None:
  """The case's RL agent (None when its flag is empty); the same file whether or not
  --retrain trains the DyNN pipelines (launch/train_rl.py trains agents)."""
  path = FLAGS[f'agent_networks_case{case}'].value
  if not path:
    return None
  agent = Networks.load(path)
  if agent.params.agent is None:
    raise app.UsageError(f'{path} holds no RL agent (--agent_networks_case{case} takes a '
                         'launch/train_rl.py networks file)')
  if agent.mec.case != case:
    raise app.UsageError(f'{path} holds a case-{agent.mec.case} agent; expected case {case}')
  return agent


def training_records(cases) -> dict:
  """Each pipeline's recorded training wall time, for the report."""
  out = {}
  for case in cases:
    for label, flag, loss in (('paper', 'networks_case{}', 'paper'),
                              ('objective (`obj_`)', 'objective_networks_case{}', 'objective'),
                              ('ppo', 'agent_networks_case{}', None)):
      path = FLAGS[flag.format(case)].value
      if not path:
        continue
      if FLAGS.retrain and loss is not None:  # networks_for trained them there
        path = os.path.join(FLAGS.results_dir, f'train_{loss}_case{case}')
      out[f'{label}, case {case}'] = reproduce.training_record(path)
  return out


def main(argv):
  if FLAGS.retrain and (FLAGS.num_processes or 1) > 1:  # refused before any peer is awaited
    raise app.UsageError('--retrain runs in one process: train first (launch/train.py), '
                         f'then reproduce from the networks files with {FLAGS.num_processes} '
                         'processes')
  processes = distributed.initialize_from_flags()
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if FLAGS.retrain and processes > 1:
    raise app.UsageError('--retrain runs in one process: train first (launch/train.py), '
                         f'then reproduce from the networks files with {processes} processes')
  if set(FLAGS.cases) - {'1', '2'}:
    raise app.UsageError(f'--cases: {FLAGS.cases}; allowed 1, 2')
  try:  # an empty selection would replace a finished report by an empty one
    reproduce.selected_sweeps([int(c) for c in FLAGS.cases], FLAGS.sweeps)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  # A confidence interval needs two slots (0 skips the GA, the oracle, the exit study).
  cli.check_range('slots', FLAGS.slots, 2)
  for name in ('ga_slots', 'oracle_slots', 'model_size_slots'):
    if FLAGS[name].value == 1:
      raise app.UsageError(f'--{name} = 1; give 0 (skip) or at least 2 slots')
  cli.check_range('model_size_slots', FLAGS.model_size_slots, 0)
  cli.check_range('ga_slots', FLAGS.ga_slots, 0)
  cli.check_range('oracle_slots', FLAGS.oracle_slots, 0)
  if FLAGS.points_per_sweep is not None:
    cli.check_range('points_per_sweep', FLAGS.points_per_sweep, 1)
  start = time.perf_counter()
  cases = [int(c) for c in FLAGS.cases]
  try:
    nets = {case: networks_for(case) for case in cases}
    objective = {case: networks_for(case, 'objective') for case in cases}
    agents = {case: agent_for(case) for case in cases}
  except (FileNotFoundError, ValueError) as e:
    raise app.UsageError(str(e)) from None
  delay = None
  if FLAGS.latency_table:
    first = nets[cases[0]]
    try:
      delay = latency.load_table(FLAGS.latency_table, first.model, first.mec,
                                 FLAGS.allow_other_device)
    except (OSError, ValueError) as e:   # missing, a folder, a symlink loop, damaged
      raise app.UsageError(str(e)) from None
  try:
    cost = (cost_study.load_study(FLAGS.cost_study) if os.path.exists(FLAGS.cost_study)
            else None)
    cost_variants = ({os.path.basename(path): cost_study.load_study(path)
                      for path in cost_study.variant_paths(FLAGS.cost_study)}
                     if cost is not None else {})
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  cli.check_writable('results_dir', FLAGS.results_dir, directory=True)
  cli.stop_if_dry_run(cases=cases, sweeps=FLAGS.sweeps, slots=FLAGS.slots,
                      networks={c: n.mec.to_dict() for c, n in nets.items()})
  distributed.check_same('flags or files', (
      cases, FLAGS.sweeps, FLAGS.slots, FLAGS.ga_slots, FLAGS.oracle_slots, FLAGS.seed,
      FLAGS.points_per_sweep, {c: n.fingerprint for c, n in nets.items()},
      {c: n.fingerprint for c, n in objective.items() if n},
      {c: n.fingerprint for c, n in agents.items() if n},
      reproduce.delay_fingerprint(delay)))
  results_dir = distributed.main_folder_view(FLAGS.results_dir, ('points',))
  try:
    _reproduce(nets, objective, agents, delay, cost, cost_variants, cases, results_dir,
               start)
  except (reproduce.PointError, SchemaError) as e:  # a damaged point file: one line
    raise SystemExit(str(e)) from None


def _reproduce(nets, objective, agents, delay, cost, cost_variants, cases, results_dir,
               start):
  sweeps = reproduce.run_sweeps(nets, results_dir, cases=cases, sweeps=FLAGS.sweeps,
                                slots=FLAGS.slots, ga_slots=FLAGS.ga_slots, seed=FLAGS.seed,
                                delay=delay, points_per_sweep=FLAGS.points_per_sweep,
                                objective={c: n for c, n in objective.items() if n},
                                oracle_slots=FLAGS.oracle_slots,
                                agents={c: n for c, n in agents.items() if n})
  if not distributed.is_main_process():
    return
  for key, points in sweeps.items():
    write_bytes_atomic(os.path.join(results_dir, f'{key.name}.csv'),
                       sweep_csv(points).encode())
    plots.sweep(points, reproduce.SWEEPS[key.sweep],
                os.path.join(results_dir, f'{key.name}.png'), title=key.name)
  exits, models = None, {}
  if FLAGS.model_size_slots and 1 in nets:
    pipelines = {'paper': nets[1], 'objective': objective.get(1)}
    pipelines = {name: n for name, n in pipelines.items() if n is not None}
    exits = reproduce.exit_studies(pipelines, results_dir, slots=FLAGS.model_size_slots,
                                   seed=FLAGS.seed, delay=delay)
    models = {name: n.model for name, n in pipelines.items()}
    plots.exit_grids(exits, models, os.path.join(results_dir, 'exits.png'))
  seconds = time.perf_counter() - start
  mode = 'modelled' if delay is None else delay.mode
  write_json_atomic(os.path.join(results_dir, 'results.json'),
                    {'sweeps': {key.name: [reproduce.point_to_json(p) for p in points]
                                for key, points in sweeps.items()},
                     'exits': exits, 'cost_study': cost,
                     'mode': mode, 'seconds': seconds})
  text = report(sweeps, exits, cost, mode, seconds, nets,
                {'slots': FLAGS.slots, 'ga_slots': FLAGS.ga_slots,
                 'oracle_slots': FLAGS.oracle_slots}, models, objective=objective,
                cost_variants=cost_variants, training=training_records(cases))
  write_bytes_atomic(os.path.join(results_dir, 'report.md'), text.encode())
  print(f'wrote {results_dir}/report.md ({seconds:.0f} s)')


if __name__ == '__main__':
  cli.run(main)
