"""Training-cost study (the paper's Fig. 12): wall time for progressive shrinking and for
from-scratch training to bring every sub-network within --bar of the optimum.

  python launch/train_cost.py --flagfile=launch/flags/train_cost.flags --out=results/cost.json
"""

import os

from absl import app, flags

from dynn_jax import cli, cost_study, plots
from dynn_jax.io import write_json_atomic

flags.DEFINE_string('out', 'results/train_cost.json', 'JSON file for the study.')
flags.DEFINE_float('bar', 0.15, 'Relative gap to the optimum every sub-network must reach.')
flags.DEFINE_integer('max_steps', 20_000, 'Give up on a schedule after this many steps.')
flags.DEFINE_integer('study_eval_slots', 1024, 'Held-out slots of the quality checks.')
flags.DEFINE_list('kinds', list(cost_study.KINDS), 'Network kinds: full, width, depth.')
flags.DEFINE_list('seeds', ['0'], 'Training seeds; each kind and schedule runs once per seed.')
cli.define_training_flags()
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  mec, model, train = cli.training_configs()
  cli.check_range('bar', FLAGS.bar, 0.0)
  cli.check_range('max_steps', FLAGS.max_steps, 1)
  cli.check_range('study_eval_slots', FLAGS.study_eval_slots, 1)
  try:
    cost_study.check_kinds(FLAGS.kinds)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  seeds = _seeds(FLAGS.seeds)
  cli.check_training_memory(mec, model, train)
  cli.check_writable('out', FLAGS.out)
  cache_dir = os.path.splitext(FLAGS.out)[0] + '_runs'
  cli.check_writable('out', cache_dir, directory=True, what='its folder of cached runs')
  cli.stop_if_dry_run(mec=mec.to_dict(), model=model.to_dict(), train=train.to_dict(),
                      kinds=FLAGS.kinds, bar=FLAGS.bar, seeds=seeds, cache_dir=cache_dir)
  study = cost_study.run_study(mec, model, train, bar=FLAGS.bar, max_steps=FLAGS.max_steps,
                               eval_slots=FLAGS.study_eval_slots, kinds=tuple(FLAGS.kinds),
                               seeds=seeds, cache_dir=cache_dir)
  study['config'] = {'mec': mec.to_dict(), 'model': model.to_dict(), 'train': train.to_dict()}
  write_json_atomic(FLAGS.out, study)
  print(f'{"kind":8s} {"schedule":12s} {"seed":>5s} {"reached":>8s} {"steps":>7s} '
        f'{"seconds":>9s}  last to the bar (k, l)')
  for r in study['results']:
    print(f'{r["kind"]:8s} {r["schedule"]:12s} {r["seed"]:5d} {str(r["reached"]):>8s} '
          f'{r["steps"]:7d} {r["seconds"]:9.2f}  {r["limiting"]}')
  for kind, speedup in study['speedup'].items():
    low, high = study['speedup_range'][kind]
    print(f'{kind}: progressive shrinking is {speedup:.2f}x as fast as scratch (median '
          f'over {len(seeds)} seeds, range {low:.2f}-{high:.2f}; '
          f'{study["step_speedup"][kind]:.2f}x in steps)')
  png = os.path.splitext(FLAGS.out)[0] + '.png'
  plots.training_cost(study, png)
  print(f'wrote {FLAGS.out} and {png}')


def _seeds(values: list[str]) -> tuple[int, ...]:
  try:
    seeds = tuple(int(v) for v in values)
  except ValueError:
    raise app.UsageError(f'--seeds: {values} must be non-negative integers') from None
  if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
    raise app.UsageError(f'--seeds: {values} must be distinct non-negative integers')
  if max(seeds) > 2 ** 32 - 1:
    raise app.UsageError(f'--seeds: {max(seeds)} is out of range; allowed range [0, '
                         f'{2 ** 32 - 1}] (the PRNG keeps 32 bits of a seed)')
  return seeds


if __name__ == '__main__':
  cli.run(main)
