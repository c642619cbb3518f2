"""Times the environment, the solvers and (with --suite=exits) every DyNN exit.

  python launch/benchmark.py --flagfile=launch/flags/bench_env.flags --out=results.json
"""

from absl import app, flags

from dynn_jax import benchmark, cli
from dynn_jax.config import MECConfig
from dynn_jax.io import write_json_atomic

flags.DEFINE_enum('suite', 'env', ['env'], 'Which benchmarks to run.')
flags.DEFINE_string('out', None, 'JSON file for the results (written atomically).')
flags.DEFINE_integer('seed', 0, 'PRNG seed.')
flags.DEFINE_integer('batch', 100_000, 'Slots per call for sampling + evaluation.')
flags.DEFINE_integer('alloc_batch', 10_000, 'Slots per call for the batched exact allocation.')
flags.DEFINE_integer('ga_batch', 4, 'Slots per call for the batched GA.')
flags.DEFINE_float('min_seconds', 1.0, 'Time each benchmark for at least this long.')
cli.define_flags(MECConfig)
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  for name in ('batch', 'alloc_batch', 'ga_batch'):
    cli.check_range(name, FLAGS[name].value, 1)
  cli.check_range('min_seconds', FLAGS.min_seconds, 0.0)
  config = cli.from_flags(MECConfig)
  results = {'device': benchmark.device_info(), 'config': config.to_dict(),
             'seed': FLAGS.seed}
  results['environment'] = benchmark.environment_suite(
      config, batch=FLAGS.batch, alloc_batch=FLAGS.alloc_batch, ga_batch=FLAGS.ga_batch,
      seed=FLAGS.seed, min_seconds=FLAGS.min_seconds)
  print(benchmark.format_table(results['environment']))
  if FLAGS.out:
    write_json_atomic(FLAGS.out, results)
    print(f'wrote {FLAGS.out}')


if __name__ == '__main__':
  app.run(main)
