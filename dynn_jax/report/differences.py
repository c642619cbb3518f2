"""The report's "why our numbers differ" section: where our setting departs from the
paper's, each figure in it computed from the MECConfig defaults, the networks' own
configs (what they were trained on), the sweeps, the paper's published values
(`dynn_jax.paper`) and the cost-study files the run read.

It must hold no typed-in figure: prose without numbers may stay, a number comes from one
of those sources. It evaluates nothing and reads no file (the launcher hands the
studies in).
"""

from __future__ import annotations

import textwrap

import numpy as np

from dynn_jax import ops, paper
from dynn_jax.config import MECConfig
from dynn_jax.env import NUM_FEATURES
from dynn_jax.networks import Networks
from dynn_jax.reproduce import OBJECTIVE_PREFIX, SWEEPS, sweep_field
from dynn_jax.training.config import SCHEDULES, TrainConfig

# The MECConfig fields whose per-slot scale factor a TrainConfig draws ('size': s_avg
# by size_scale_min..max), i.e. the sweeps whose values a network saw in training.
TRAINED_SCALES = {'s_avg': 'size', 'c_avg': 'workload'}


def _bullet(text: str) -> str:
  """A markdown list item, wrapped as the rest of the section."""
  return textwrap.fill(text, 88, initial_indent='- ', subsequent_indent='  ',
                       break_long_words=False, break_on_hyphens=False)


def _trained_with(networks: Networks) -> dict:
  """The TrainConfig fields a networks file records, defaults for the fields it predates
  (a file written before an option existed was trained without it)."""
  return {**TrainConfig().to_dict(), **networks.meta.get('train', {})}


def _who(names: list[tuple[int, str]], available: list[tuple[int, str]]) -> str:
  """'case-2' when every loss of case 2 is named, else 'case-2 objective-trained', per
  case, joined by 'and'."""
  parts = []
  for case in sorted({c for c, _ in names}):
    losses = [loss for c, loss in names if c == case]
    every = [loss for c, loss in available if c == case]
    parts.append(f'case-{case}' if sorted(losses) == sorted(every)
                 else f'case-{case} {" and ".join(losses)}-trained')
  return ' and '.join(parts)


def _scale_range(train: dict, kind: str) -> str:
  law = 'log-U' if train['scale_law'] == 'log_uniform' else 'U'
  return f'{law}[{train[f"{kind}_scale_min"]:g}, {train[f"{kind}_scale_max"]:g}]'


def _training_ranges(sweeps: dict, networks: dict) -> str:
  """What the networks' training drew (the data size and workload factors) and which
  sweep values lie outside it."""
  groups: dict[str, list] = {}
  for name, nets in networks.items():
    train = _trained_with(nets)
    text = (f'data sizes scaled by {_scale_range(train, "size")} and workloads by '
            f'{_scale_range(train, "workload")}')
    groups.setdefault(text, []).append(name)
  seen = '; '.join(f'the {_who(names, list(networks))} networks saw {text}'
                   for text, names in groups.items())
  outside: dict[tuple, list] = {}  # (sweep, values past, range): the networks
  for key, points in sweeps.items():
    field = sweep_field(key.sweep)
    if field not in TRAINED_SCALES:
      continue
    _, _, label, value_scale = SWEEPS[key.sweep]
    for (case, loss), nets in networks.items():
      if case != key.case:
        continue
      train, kind = _trained_with(nets), TRAINED_SCALES[field]
      base = getattr(nets.mec, field)
      low, high = base * train[f'{kind}_scale_min'], base * train[f'{kind}_scale_max']
      # The bounds are products of floats: a value on a bound may land a hair outside.
      past = [p['value'] for p in points
              if not low * (1 - 1e-9) <= p['value'] <= high * (1 + 1e-9)]
      if past:
        values = ', '.join(f'{v * value_scale:g}' for v in past)
        outside.setdefault((label, values, low * value_scale, high * value_scale),
                           []).append((case, loss))
  where = ('so every sweep stays inside what they learned' if not outside else
           'and these sweeps extrapolate: ' + '; '.join(
               f'{label} {values}, past the {low:g} to {high:g} the '
               f'{_who(names, list(networks))} networks saw'
               for (label, values, low, high), names in outside.items()))
  return f'In training, {seen}, {where}.'


def _cost_study(cost: dict, variants: dict[str, dict]) -> str | None:
  """The training-cost bullet: the fully dynamic network's speed-up against the paper's,
  which exits limit it, and the same speed-up in each variant study."""
  if 'full' not in cost['speedup']:
    return None
  runs = {s: [r for r in cost['results'] if r['kind'] == 'full' and r['schedule'] == s]
          for s in SCHEDULES}
  speedup = cost['speedup']['full']
  prog_s, scratch_s = paper.TRAINING_SECONDS['full']
  depths = sorted({l for r in runs['progressive'] + runs['scratch'] for _, l in r['limiting']})
  full_step = {s: np.median([r['first_at_bar'][-1][-1] for r in rs]) for s, rs in runs.items()}
  last_stage = np.median([r['steps'] - r['stage_starts'][-1]['step']
                          for r in runs['progressive']])
  scratch_steps = np.median([r['steps'] for r in runs['scratch']])
  # Steps after the full exit until the last width at depth L reaches the bar.
  widths_after = max(max(row[-1] for row in r['first_at_bar']) - r['first_at_bar'][-1][-1]
                     for r in runs['progressive'] + runs['scratch'])
  depth_prog, depth_scratch = paper.TRAINING_SECONDS['depth']
  text = (f"Training cost (Fig. 12): progressive shrinking is {'not ' if speedup <= 1 else ''}"
          f"faster here ({speedup:.2f}x as fast as training from scratch), while the paper "
          f"reports {scratch_s / prog_s:.2f}x for the fully dynamic network. The last "
          f"sub-networks to reach the bar are the depth-{'/'.join(map(str, depths))} exits. "
          f"The full network (K, L) reaches it at step {full_step['progressive']:g} "
          f"progressive and {full_step['scratch']:g} from scratch (medians over seeds), and "
          f"the last progressive stage, where the depth-1 exits train, takes "
          f"{last_stage:g} steps against {scratch_steps:g} for the whole from-scratch run. "
          + ("A depth-1 exit reads its first layer's output through the heads that the "
             "deeper exits trained, so the full network's weights give it almost no head "
             "start. " if depths == [1] else '')
          + "Widths come nearly free either way: every width at depth L reaches the bar "
          f"within {widths_after} steps of the full network. The paper's own depth-only "
          f"figures ({depth_prog:g} s against {depth_scratch:g} s) show only a small gain.")
  others = [(_variant(study, cost), study['speedup']['full'], name)
            for name, study in sorted(variants.items()) if 'full' in study['speedup']]
  for i, (how, value, name) in enumerate(others):
    text += (f' With {how}, progressive shrinking is {value:.2f}x as fast (`{name}`)' if not i
             else f'; with {how}, {value:.2f}x (`{name}`)')
  return _bullet(text + ('.' if others else ''))


def _variant(study: dict, main: dict) -> str:
  """How a variant cost study's settings differ from the main study's."""
  parts = []
  if study['bar'] != main['bar']:
    parts.append(f'a {100 * study["bar"]:g}% bar')
  for part in ('mec', 'model', 'train'):
    ours = main.get('config', {}).get(part, {})
    theirs = study.get('config', {}).get(part, {})
    for name in sorted(set(ours) | set(theirs)):
      a, b = ours.get(name), theirs.get(name)
      if a == b:
        continue
      numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (a, b))
      parts.append(f'{name} {b / a:g}x as large' if numbers and a else f'{name}={b}')
  return ' and '.join(parts) or 'the same settings'


def differences(sweeps: dict, nets: dict[int, Networks],
                objective: dict[int, Networks | None] | None = None,
                cost: dict | None = None, cost_variants: dict[str, dict] | None = None
                ) -> list[str]:
  """The section's bullets (markdown lines). `nets` and `objective` are the paper-trained
  and objective-trained networks per case, `cost` the cost study and `cost_variants` the
  other cost studies beside it ({file name: study})."""
  defaults = MECConfig()
  networks = {(case, 'paper'): n for case, n in sorted(nets.items())}
  networks.update({(case, 'objective'): n for case, n in sorted((objective or {}).items())
                   if n is not None})
  out = [f"""- Constants the paper does not publish are our choices (WORKSPACE.md): l0 = {defaults.l0:g} m,
  delta = {defaults.delta:g}, deadlines from U[{1e3 * defaults.d_min:g} ms, {1e3 * defaults.d_max:g} ms], mu = {defaults.mu:g} in SI. They shift absolute
  delays and miss ratios; orderings and trends are what we compare."""]
  first = nets.get(1) or next(iter(nets.values()), None)
  if first is not None:
    ours = ops.table_one(first.model, first.mec.n_users)['fixed_ops']
    larger = paper.TABLE_ONE['fixed ops'] > ours
    out.append(f"""- Modelled inference delay counts dense-layer ops over f_ser (SPEC section 2); the
  paper's fixed part is {'larger' if larger else 'smaller'} than ours (gate and heads are not specified), so our
  static and DyNN pipelines carry slightly {'less' if larger else 'more'} fixed inference time.""")
  ga_first, ga_last = paper.MEAN_DELAY_MS['case1_data']['ga']
  ga = f'{ga_first:g} ms' if ga_first == ga_last else f'{ga_first:g} to {ga_last:g} ms'
  out.append(f"""- The GA's own run time counts as inference delay only in measured mode (the paper
  counted its GA's run time: a mean delay of {ga} across case 1's data sweep). In
  modelled mode the GA is a quality baseline, not a latency one.""")
  out.append("""- `kkt_weighted` (the exact allocation of SPEC section 5) minimises the paper's
  importance-weighted delay, the target its networks are trained on, not the objective;
  `oracle` is the best solution we find of the objective itself (for a fixed offloading
  set checked against the enumeration of every rescued set on small N in
  `tests/test_objective.py`), and `lower bound` a Lagrangian bound on it. The paper
  reports neither.""")
  trained_on_objective = [n for (_, loss), n in networks.items() if loss == 'objective']
  if trained_on_objective:
    deltas = ', '.join(f'{d:g}' for d in sorted({n.mec.delta for n in trained_on_objective}))
    out.append(f"""- The networks trained with `--loss=objective` (`{OBJECTIVE_PREFIX}*`) saw delta = {deltas} only; the
  delta sweep evaluates the same networks at every delta, so it shows how each
  pipeline's trade-off between delay and misses fares when misses cost more or less,
  not what a network trained at that delta would do.""")
  tuned = {name: _trained_with(n)['tune_steps'] for name, n in networks.items()
           if _trained_with(n)['tune_steps']}
  for steps in sorted(set(tuned.values())):
    who = _who([name for name, s in tuned.items() if s == steps], list(networks))
    out.append(_bullet(
        f'After progressive shrinking and the policy, the {who} networks spend {steps} '
        'steps on the exits their policy picks (`--tune_steps`), and the policy is trained '
        'again. Their policy picks small exits, whose inference delay is lowest; the exits '
        'it does not pick, the full network among them, lose quality, which is why '
        f'`{OBJECTIVE_PREFIX}fix_moe` is further from the oracle than the allocation '
        'quality of a full network suggests.'))
  normalized = [name for name, n in networks.items() if _trained_with(n)['normalize_rewards']]
  rewards = ('' if not normalized else
             f" The {_who(normalized, list(networks))} scheduler's rewards are normalised per "
             'slot (`--normalize_rewards`); without it, slots with large tasks set its '
             'gradient and it learned to offload too little.')
  out.append(_bullet('Networks are trained once and evaluated across each sweep, with features '
                    'normalised by the training ranges; the paper may have retrained per '
                    f'point. {_training_ranges(sweeps, networks)}{rewards}'))
  reads_cpu = [name for name, n in networks.items() if n.model.scheduler_context == 'server_cpu']
  if reads_cpu:
    drawn = sorted({(n.mec.f_ser, _trained_with(n)['server_cpu_scale_min'],
                     _trained_with(n)['server_cpu_scale_max'])
                    for name, n in networks.items() if name in reads_cpu})
    reference = ', '.join(f'{f / 1e9:g} GHz' for f in sorted({f for f, _, _ in drawn}))
    ranges = ', '.join(f'{f * low / 1e9:g} to {f * high / 1e9:g} GHz' for f, low, high in drawn)
    out.append(f"""- Beyond the paper, the {_who(reads_cpu, list(networks))} schedulers also read the server's CPU
  (log(f_ser / {reference}), `--scheduler_context=server_cpu`) and were trained with f_ser
  drawn from {ranges} per joint step. With the paper's {NUM_FEATURES} per-user inputs alone, a
  trained scheduler offloaded the same users at every f_ser: at a slow server about as
  many as at the default one, and its mean delay was above running everything
  locally.""")
  out.append("""- Fig. 4's absolute values are in our unit (sum_i w_i T_i in ms per slot); compare the
  shapes: bigger is better without inference delay, a small network is best with it.""")
  cost_text = _cost_study(cost, cost_variants or {}) if cost else None
  if cost_text:
    out.append(cost_text)
  return out
