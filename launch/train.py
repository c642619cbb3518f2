"""Trains the allocation DyNN, the static baseline, the policy and (case 2) the scheduler,
then evaluates them on held-out slots.

  python launch/train.py --flagfile=launch/flags/quick.flags
  python launch/train.py --flagfile=launch/flags/paper_case1.flags --run_dir=runs/case1

Every field of MECConfig, ModelConfig (except max_users, which follows n_max) and
TrainConfig is a flag. A killed run continues with --resume and ends with the same
parameters as an uninterrupted one.
"""

import os

from absl import app, flags

from dynn_jax import cli, training
from dynn_jax.reports import training_summary
from dynn_jax.runs import RunDir

flags.DEFINE_string('run_dir', None, 'Run directory (config, metrics, checkpoints, summary).')
flags.DEFINE_bool('resume', False, 'Continue the run in --run_dir from its checkpoints.')
flags.DEFINE_integer('eval_chunk', 8192, 'Slots per compiled evaluation chunk.')
cli.define_training_flags()
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not FLAGS.run_dir:
    raise app.UsageError('--run_dir is required')
  mec, model, train = cli.training_configs()
  cli.check_range('eval_chunk', FLAGS.eval_chunk, 1)
  if (os.path.exists(os.path.join(FLAGS.run_dir, 'config.json')) and not FLAGS.resume):
    raise app.UsageError(f'{FLAGS.run_dir} already holds a run; pass --resume to continue '
                         'it or choose another --run_dir')
  cli.stop_if_dry_run(mec=mec.to_dict(), model=model.to_dict(), train=train.to_dict(),
                      run_dir=FLAGS.run_dir)
  run = RunDir(FLAGS.run_dir)
  run.write_config({'mec': mec.to_dict(), 'model': model.to_dict(),
                    'train': train.to_dict()}, resume=FLAGS.resume)
  params = training.train_all(mec, model, train, run)
  training.save_networks(run.file('networks.msgpack'), params, mec, model, train)
  summary = training_summary(mec, model, train, params, chunk=FLAGS.eval_chunk)
  run.write_summary(summary)
  print(summary['text'])
  print(f'run directory: {FLAGS.run_dir}')


if __name__ == '__main__':
  app.run(main)
