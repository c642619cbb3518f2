"""Evaluates methods on the same sampled slots and prints / writes their metrics.

  python launch/evaluate.py --flagfile=launch/flags/eval_case1.flags --networks=runs/case1

System flags (--s_avg, --n_users, ...) override the configuration the networks were
trained with; flags not given keep the trained values. Methods: see
dynn_jax.evaluation.METHODS, and exit_<k>_<l> (one sub-network for every slot).
"""

import dataclasses
import sys

import math

from absl import app, flags

from dynn_jax import cli, distributed, evaluation
from dynn_jax.config import MECConfig
from dynn_jax.io import write_json_atomic
from dynn_jax.runs import Progress
from dynn_jax.networks import LOSSES, load_networks, trained_loss

flags.DEFINE_string('networks', None, 'networks.msgpack, or the run directory holding it.')
flags.DEFINE_list('methods', None, 'Comma-separated method names (default: the case\'s set).')
flags.DEFINE_integer('slots', 100_000, 'Slots to evaluate.')
flags.DEFINE_integer('chunk', 8192, 'Slots per compiled chunk (memory bound).')
flags.DEFINE_integer('seed', 0, 'Seed of the evaluation slots.', lower_bound=0,
                     upper_bound=2 ** 32 - 1)
flags.DEFINE_integer('n_active', None, 'Real users per slot (default: n_users); <= n_max.')
flags.DEFINE_string('out', None, 'JSON file for the results (written atomically).')
flags.DEFINE_enum('loss', None, list(LOSSES), 'The loss the networks must have been trained '
                  'with (default: whichever the file records); a mismatch stops before work.')
cli.define_flags(MECConfig)
cli.define_delay_flags()
distributed.define_flags()
FLAGS = flags.FLAGS


def resolve_config(trained: MECConfig) -> MECConfig:
  """The trained system configuration with the explicitly given flags on top."""
  given = {f.name: FLAGS[f.name].value for f in dataclasses.fields(MECConfig)
           if FLAGS[f.name].present}
  try:
    return trained.replace(**given)
  except ValueError as e:
    raise app.UsageError(str(e)) from None


def main(argv):
  distributed.initialize_from_flags()
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not FLAGS.networks:
    raise app.UsageError('--networks is required')
  cli.check_range('slots', FLAGS.slots, 2)   # a confidence interval needs two slots
  cli.check_range('chunk', FLAGS.chunk, 1)
  try:
    params, trained, model, meta = load_networks(FLAGS.networks)
  except (FileNotFoundError, ValueError) as e:
    raise app.UsageError(str(e)) from None
  loss = trained_loss(meta)
  if FLAGS.loss is not None and FLAGS.loss != loss:
    raise app.UsageError(f'{FLAGS.networks} was trained with --loss={loss}; --loss='
                         f'{FLAGS.loss} asks for networks trained with the other loss')
  mec = resolve_config(trained)
  if mec.width > model.max_users:
    raise app.UsageError(f'--n_users/--n_max give {mec.width} user positions; the networks '
                         f'accept at most {model.max_users} (trained n_max)')
  if mec.case != trained.case:
    raise app.UsageError(f'--case={mec.case} but the networks were trained for case '
                         f'{trained.case}')
  cli.check_memory(f'--chunk={FLAGS.chunk} with {mec.width} user positions',
                   cli.evaluation_chunk_bytes(mec.width, min(FLAGS.chunk, FLAGS.slots)))
  if FLAGS.n_active is not None:
    cli.check_range('n_active', FLAGS.n_active, 1, mec.width)
  delay = cli.delay_from_flags(model, mec)
  setting = evaluation.Setting(mec=mec, model=model, feature_config=trained, delay=delay)
  names = FLAGS.methods or evaluation.default_methods(mec, params)
  try:
    evaluation.check_methods(names, params, setting)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  cli.check_writable('out', FLAGS.out)
  cli.stop_if_dry_run(mec=mec.to_dict(), model=model.to_dict(), methods=list(names),
                      mode=setting.mode, slots=FLAGS.slots, loss=loss)
  distributed.check_same('flags or files', (
      mec.to_dict(), model.to_dict(), list(names), FLAGS.slots, FLAGS.chunk, FLAGS.seed,
      FLAGS.n_active, repr(delay), params))
  results = evaluation.evaluate(setting, names, params, slots=FLAGS.slots, chunk=FLAGS.chunk,
                                seed=FLAGS.seed, n_users=FLAGS.n_active,
                                progress=Progress('eval', FLAGS.slots, every_s=10.0,
                                                  unit='slot'))
  if not distributed.is_main_process():
    if FLAGS.out:
      sys.stderr.write(f'process {FLAGS.process_id}: --out={FLAGS.out} is written by process '
                       '0 only\n')
    return
  print(f'case {mec.case}, networks {FLAGS.networks} (trained with loss={loss}), '
        f'{results.slots} slots, {results.mode} inference delay, '
        f'{results.devices} device(s)')
  print(evaluation.methods_table(results))
  bad = [f'{name}.{metric}.{key}' for name, metrics in results.methods.items()
         for metric, stat in metrics.items() for key in ('mean', 'ci95')
         if not math.isfinite(stat[key])]
  if bad:  # strict JSON has no NaN or Infinity, and such a mean is no result to keep
    raise SystemExit(f'non-finite results, nothing written: {", ".join(bad)}')
  if FLAGS.out:
    write_json_atomic(FLAGS.out, {'config': mec.to_dict(), 'networks': FLAGS.networks,
                                  'loss': loss, 'seed': FLAGS.seed, 'chunk': FLAGS.chunk,
                                  'n_active': FLAGS.n_active,
                                  'inference_delay': results.mode,
                                  'latency_table': FLAGS.latency_table,
                                  'results': results.to_dict()})
    print(f'wrote {FLAGS.out}')


if __name__ == '__main__':
  cli.run(main)
