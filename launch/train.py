"""Trains the allocation DyNN, the static baseline, the policy and (case 2) the scheduler,
then evaluates them on held-out slots.

  python launch/train.py --flagfile=launch/flags/quick.flags
  python launch/train.py --flagfile=launch/flags/paper_case1.flags --run_dir=runs/case1

Every field of MECConfig, ModelConfig (except max_users, which follows n_max) and
TrainConfig is a flag. A killed run continues with --resume and ends with the same
parameters as an uninterrupted one. One run at a time uses a run directory; a run that
stopped before its first checkpoint can simply be started again.
"""

import os

from absl import app, flags

from dynn_jax import cli, runs, training
from dynn_jax.io import NonFiniteError

cli.define_run_flags()
flags.DEFINE_integer('eval_chunk', 8192, 'Slots per compiled evaluation chunk.')
cli.define_training_flags()
FLAGS = flags.FLAGS


def main(argv):
  cli.check_run_args(argv)
  mec, model, train = cli.training_configs()
  cli.check_range('eval_chunk', FLAGS.eval_chunk, 1)
  cli.check_training_memory(mec, model, train)
  cli.check_writable('run_dir', FLAGS.run_dir, directory=True)
  config = training.run_config(mec, model, train)
  if FLAGS.resume and not os.path.isdir(FLAGS.run_dir):
    raise app.UsageError(f'--resume: {FLAGS.run_dir} is not a run directory (misspelt? '
                         'leave out --resume to start a new run there)')
  try:
    start = runs.check_start(FLAGS.run_dir, config, FLAGS.resume)
    if train.allocator_from:
      training.load_allocators(train.allocator_from, model, train.loss)
    training.training_delay(model, mec, train)   # the latency table, checked before work
  except runs.RunDirError as e:   # one line: absl's usage text would bury it
    raise SystemExit(str(e)) from None
  except (FileNotFoundError, ValueError) as e:
    raise app.UsageError(str(e)) from None
  cli.stop_if_dry_run(**config, run_dir=FLAGS.run_dir, start=start)
  try:
    _, summary = training.train_and_evaluate(mec, model, train, FLAGS.run_dir,
                                             resume=FLAGS.resume, eval_chunk=FLAGS.eval_chunk)
  except runs.RunDirError as e:  # another run took the directory since the check
    raise SystemExit(str(e)) from None
  except (training.TrainingDiverged, NonFiniteError) as e:
    raise SystemExit(f'training stopped, no networks written: {e}') from None
  print(summary['text'])
  print(f'run directory: {FLAGS.run_dir}')


if __name__ == '__main__':
  cli.run(main)
