"""Trains the PPO baseline through the gymnax environment, then compares it with the
oracle on held-out slots.

  python launch/train_rl.py --flagfile=launch/flags/ppo_case2.flags
  python launch/train_rl.py --flagfile=launch/flags/ppo_case1.flags --run_dir=runs/x --resume

Every field of MECConfig and PPOConfig (dynn_jax.rl.ppo) is a flag. The agent is built
for --agent_case, which must equal the system's --case (refused before any work). The
run directory holds config.json, metrics.jsonl, checkpoints/ppo.msgpack,
networks.msgpack (Params.agent) and summary.json; a killed run continues with --resume
and ends with the parameters of an uninterrupted one. --export also writes the networks
file elsewhere, e.g. checkpoints/, for launch/evaluate.py --networks=... --methods=ppo,oracle.
"""

import os

from absl import app, flags

from dynn_jax import cli, runs
from dynn_jax.config import ConfigError, MECConfig
from dynn_jax.io import NonFiniteError
from dynn_jax.rl.ppo import PPOConfig, check_case, run_config, train_and_save
from dynn_jax.training import TrainingDiverged

cli.define_run_flags()
flags.DEFINE_string('export', None, 'Also write the networks file here (e.g. '
                    'checkpoints/ppo_case2.msgpack).')
cli.define_flags(MECConfig)
cli.define_flags(PPOConfig)
FLAGS = flags.FLAGS


def main(argv):
  cli.check_run_args(argv)
  mec, config = cli.from_flags(MECConfig), cli.from_flags(PPOConfig)
  try:
    check_case(config, mec)
  except ConfigError as e:
    raise app.UsageError(f'{e} (flags --case, --agent_case)') from None
  cli.check_writable('run_dir', FLAGS.run_dir, directory=True)
  cli.check_writable('export', FLAGS.export)
  if FLAGS.resume and not os.path.isdir(FLAGS.run_dir):
    raise app.UsageError(f'--resume: {FLAGS.run_dir} is not a run directory (misspelt? '
                         'leave out --resume to start a new run there)')
  try:
    start = runs.check_start(FLAGS.run_dir, run_config(mec, config), FLAGS.resume)
  except runs.RunDirError as e:   # one line: absl's usage text would bury it
    raise SystemExit(str(e)) from None
  cli.stop_if_dry_run(**run_config(mec, config), run_dir=FLAGS.run_dir, start=start,
                      export=FLAGS.export)
  try:
    summary = train_and_save(mec, config, FLAGS.run_dir, resume=FLAGS.resume,
                             export=FLAGS.export)
  except runs.RunDirError as e:  # another run took the directory since the check
    raise SystemExit(str(e)) from None
  except (TrainingDiverged, NonFiniteError) as e:
    raise SystemExit(f'training stopped, no networks written: {e}') from None
  print(summary['text'])
  print(f'run directory: {FLAGS.run_dir}' + (f'; exported to {FLAGS.export}'
                                             if FLAGS.export else ''))


if __name__ == '__main__':
  cli.run(main)
