"""Times the environment, the solvers, every DyNN exit and every evaluation method.

  python launch/benchmark.py --flagfile=launch/flags/bench_env.flags --out=results.json
  python launch/benchmark.py --flagfile=launch/flags/bench_exits.flags --out=results/exits.json
  python launch/benchmark.py --flagfile=launch/flags/bench_eval.flags

--suite=exits (or all) also writes, into --out_dir (default: the folder of --out), the
measured latency table latency_<platform>_<device_kind>_n<W>.json that
`launch/evaluate.py --inference_delay=measured --latency_table=...` loads, and a PNG of
latency against ops per exit. --profile_dir=DIR writes a jax.profiler trace of a few
per-slot calls and training steps (TensorBoard or Perfetto). Parameters are random
unless --networks names a trained run: latency does not depend on their values.

--suite=eval (or all) times `dynn_jax.evaluation.evaluate` for every method of the
networks (--networks, default the shipped checkpoints/paper_case1.msgpack): slots/s,
compile time, peak memory of the chunk program, and fix_moe's GFLOP/s against a dense
matmul (see dynn_jax.benchmark.evaluation).
"""

import dataclasses
import os

import jax
from absl import app, flags

from dynn_jax import benchmark, cli, evaluation, plots
from dynn_jax.config import MECConfig
from dynn_jax.io import write_json_atomic
from dynn_jax.models import ModelConfig
from dynn_jax.networks import load_networks
from dynn_jax.solvers.ga import GAConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_NETWORKS = os.path.join(ROOT, 'checkpoints', 'paper_case1.msgpack')

flags.DEFINE_enum('suite', 'env', ['env', 'exits', 'eval', 'all'], 'Which benchmarks to run '
                  '(all: env, exits and eval).')
flags.DEFINE_string('out', None, 'JSON file for the results (written atomically).')
flags.DEFINE_string('out_dir', None, 'Folder for the latency table and the plot '
                    '(default: the folder of --out, else results/benchmark).')
flags.DEFINE_string('profile_dir', None, 'Write a jax.profiler trace here.')
flags.DEFINE_string('networks', None, 'networks.msgpack, or the run directory holding it: '
                    'time the trained networks (model sizes come from it). Default: random '
                    'networks, or with --suite=eval/all the shipped '
                    'checkpoints/paper_case1.msgpack.')
flags.DEFINE_integer('seed', 0, 'PRNG seed.', lower_bound=0,
                     upper_bound=2 ** 32 - 1)
flags.DEFINE_integer('batch', 100_000, 'Slots per call for sampling + evaluation.')
flags.DEFINE_integer('alloc_batch', 10_000, 'Slots per call for the batched exact allocation.')
flags.DEFINE_integer('ga_batch', 4, 'Slots per call for the batched GA.')
flags.DEFINE_integer('oracle_batch', 1024, 'Slots per call for the batched oracle.')
flags.DEFINE_integer('exit_batch', 4096, 'Slots per call for the masked and exit-bucketed '
                     'batched throughput.')
flags.DEFINE_integer('chunk', 16, 'Slots per call of the exit-bucketed batched path.')
flags.DEFINE_float('min_seconds', 1.0, 'Time each benchmark for at least this long.')
flags.DEFINE_integer('min_calls', 1000, 'Time each per-slot benchmark for at least this many '
                     'calls.')
flags.DEFINE_integer('heavy_calls', 10, 'At least this many calls (capped by --min_calls) for '
                     'the GA and the batched paths.')
flags.DEFINE_list('eval_methods', None, 'Evaluation methods to time (default: the case\'s '
                  'set that the networks can run).')
flags.DEFINE_integer('eval_slots', 8192, 'Slots per timed evaluate call.')
flags.DEFINE_integer('eval_slow_slots', 256, 'Slots per timed evaluate call of the oracle, '
                     'the GA and exhaustive search.')
flags.DEFINE_integer('eval_chunk', 8192, 'Chunk of the timed evaluate calls, and the chunk '
                     'whose program\'s peak memory is measured.')
flags.DEFINE_integer('eval_min_calls', 3, 'Time each evaluation method for at least this '
                     'many calls (and --min_seconds).')
flags.DEFINE_list('eval_reference_slots', ['16', '128', '1024'], 'Sizes (slots of W users '
                  'per call) of the dense matmul set beside fix_moe; the fastest is the '
                  'ceiling.')
flags.DEFINE_bool('eval_rss', False, 'Also measure each method\'s peak RSS in a fresh '
                  'process (one more compile per method).')
flags.DEFINE_bool('cpu_async_dispatch', False, 'Keep jax\'s asynchronous CPU dispatch: it '
                  'hands every call to a worker thread, which dominates and blurs the '
                  'latency of calls of a few tens of microseconds.')
cli.define_flags(MECConfig)
cli.define_flags(ModelConfig, skip=('max_users',))
cli.define_flags(GAConfig, prefix='ga_')
FLAGS = flags.FLAGS


def networks_path() -> str | None:
  if FLAGS.networks or FLAGS.suite not in ('eval', 'all'):
    return FLAGS.networks
  return DEFAULT_NETWORKS


def configs():
  """(mec, model, params, trained): from the flags, or a trained run with given flags on
  top (`trained`, the system it was trained on, normalises its features)."""
  path = networks_path()
  if not path:
    mec = cli.from_flags(MECConfig)
    return mec, cli.from_flags(ModelConfig, max_users=mec.width), None, mec
  try:
    params, trained, model, _ = load_networks(path)
  except (FileNotFoundError, ValueError) as e:
    raise app.UsageError(str(e)) from None
  given = [f.name for f in dataclasses.fields(ModelConfig) if f.name in FLAGS
           and FLAGS[f.name].present]
  if given:
    raise app.UsageError(f'--networks fixes the model; drop {", ".join("--" + g for g in given)}')
  system = {f.name: FLAGS[f.name].value for f in dataclasses.fields(MECConfig)
            if FLAGS[f.name].present}
  try:
    mec = trained.replace(**system)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  if mec.width > model.max_users:
    raise app.UsageError(f'--n_users/--n_max give {mec.width} user positions; the networks '
                         f'accept at most {model.max_users}')
  return mec, model, params, trained


def eval_setting(mec, model, params, trained):
  """The evaluation suite's setting and methods, checked before any work."""
  if mec.case != trained.case:
    raise app.UsageError(f'--case={mec.case} but the networks were trained for case '
                         f'{trained.case}')
  setting = evaluation.Setting(mec=mec, model=model, feature_config=trained)
  names = FLAGS.eval_methods or evaluation.default_methods(mec, params)
  try:
    evaluation.check_methods(names, params, setting)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  return setting, tuple(names)


def reference_sizes() -> tuple[int, ...]:
  try:
    sizes = tuple(int(n) for n in FLAGS.eval_reference_slots)
  except ValueError:
    sizes = ()
  if not sizes or min(sizes) < 1:
    raise app.UsageError(f'--eval_reference_slots={",".join(FLAGS.eval_reference_slots)}; '
                         'give one or more positive integers, e.g. 16,128,1024')
  return sizes


def output_dir() -> str:
  if FLAGS.out_dir:
    return FLAGS.out_dir
  if FLAGS.out:
    return os.path.dirname(FLAGS.out) or '.'
  return os.path.join('results', 'benchmark')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  # Before anything starts the backend: the CPU client reads it once, at creation.
  jax.config.update('jax_cpu_enable_async_dispatch', FLAGS.cpu_async_dispatch)
  for name in ('batch', 'alloc_batch', 'ga_batch', 'oracle_batch', 'exit_batch', 'min_calls',
               'heavy_calls', 'chunk', 'eval_slots', 'eval_slow_slots', 'eval_chunk',
               'eval_min_calls'):
    cli.check_range(name, FLAGS[name].value, 1)
  reference_slots = reference_sizes()
  cli.check_range('min_seconds', FLAGS.min_seconds, 0.0)
  mec, model, params, trained = configs()
  if FLAGS.suite in ('eval', 'all'):
    setting, names = eval_setting(mec, model, params, trained)
  ga_config = cli.from_flags(GAConfig, prefix='ga_')
  cli.check_writable('out', FLAGS.out)
  cli.check_writable('out_dir', FLAGS.out_dir, directory=True)
  cli.check_writable('profile_dir', FLAGS.profile_dir, directory=True)
  out_dir = output_dir()
  if FLAGS.suite in ('exits', 'all'):
    cli.check_writable('out_dir', out_dir, directory=True, what="the latency table's folder")
  cli.stop_if_dry_run(mec=mec.to_dict(), suite=FLAGS.suite, networks=networks_path(),
                      **({'eval_methods': list(names)} if FLAGS.suite in ('eval', 'all')
                         else {}))
  results = {'device': benchmark.device_info(), 'config': mec.to_dict(),
             'model': model.to_dict(), 'ga': dataclasses.asdict(ga_config),
             'seed': FLAGS.seed, 'networks': networks_path()}
  if FLAGS.suite in ('env', 'all'):
    results['environment'] = benchmark.environment_suite(
        mec, batch=FLAGS.batch, alloc_batch=FLAGS.alloc_batch, ga_batch=FLAGS.ga_batch,
        oracle_batch=FLAGS.oracle_batch,
        ga_config=ga_config, seed=FLAGS.seed, min_seconds=FLAGS.min_seconds)
    print(benchmark.format_table(results['environment']))
  if FLAGS.suite in ('exits', 'all'):
    exits = benchmark.exits_suite(
        mec, model, seed=FLAGS.seed, min_seconds=FLAGS.min_seconds, min_calls=FLAGS.min_calls,
        heavy_calls=FLAGS.heavy_calls, batch=FLAGS.exit_batch, chunk=FLAGS.chunk,
        ga_config=ga_config, params=params, log=lambda m: print(m, flush=True))
    results['exits'] = exits
    print(benchmark.format_exits(exits))
    results['latency_table_path'] = benchmark.write_table(out_dir, exits['latency_table'])
    results['plot_path'] = benchmark.table_path(out_dir, exits['latency_table']['device'],
                                                mec.width, 'png')
    plots.latency_vs_ops(exits, results['plot_path'])
    print(f'wrote {results["latency_table_path"]} and {results["plot_path"]}')
  if FLAGS.suite in ('eval', 'all'):
    results['evaluation'] = benchmark.evaluation_suite(
        setting, params, methods=names, slots=FLAGS.eval_slots,
        slow_slots=FLAGS.eval_slow_slots, chunk=FLAGS.eval_chunk, seed=FLAGS.seed,
        min_calls=FLAGS.eval_min_calls, min_seconds=FLAGS.min_seconds, rss=FLAGS.eval_rss,
        reference_slots=reference_slots, log=lambda m: print(m, flush=True))
    print(benchmark.format_evaluation(results['evaluation']))
  if FLAGS.profile_dir:
    variables, _ = benchmark.network_variables(mec, model, FLAGS.seed, params)
    results['profile'] = benchmark.write_profile(FLAGS.profile_dir, mec, model, variables,
                                                 seed=FLAGS.seed)
    print(f'wrote a profile trace under {FLAGS.profile_dir}: tensorboard --logdir '
          f'{FLAGS.profile_dir} (Profile tab), or open {results["profile"]["perfetto"]} '
          'at https://ui.perfetto.dev')
  if FLAGS.out:
    write_json_atomic(FLAGS.out, results)
    print(f'wrote {FLAGS.out}')


if __name__ == '__main__':
  cli.run(main)
