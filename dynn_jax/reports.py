"""Human-readable results: summaries of trained networks (tables for stdout and
summary.json) and the reproduction report, whose every conclusion is computed from the
points it summarises."""

from __future__ import annotations

import csv
import io

import numpy as np

from dynn_jax import cost_study, exit_study, ops, paper

from dynn_jax.config import MECConfig
from dynn_jax.evaluation import EvalResult, Params, Setting, default_methods, evaluate
from dynn_jax.io import write_bytes_atomic
from dynn_jax.models import ModelConfig
from dynn_jax.quality import HELD_OUT_SEED, quality_gaps
from dynn_jax.reproduce import OBJECTIVE_PREFIX, SWEEPS, SweepKey
from dynn_jax.training import TrainConfig, training_delay


def objective_gaps(results: dict) -> dict[str, dict[str, float]]:
  """Each method's mean objective over the oracle's and over the lower bound, minus 1
  (the keys present are those the results allow)."""
  refs = {}
  if 'oracle' in results:
    refs['oracle'] = results.mean('oracle')
  if results.bound is not None:
    refs['bound'] = results.bound['mean']
  return {name: {ref: m['objective']['mean'] / value - 1.0 for ref, value in refs.items()}
          for name, m in results.methods.items()}


def methods_table(results: EvalResult) -> str:
  gaps = objective_gaps(results)
  refs = next(iter(gaps.values()), {}).keys()
  header = (f'{"method":12s} {"objective":>10s} ' + ''.join(f'{"vs " + r + " %":>12s} ' for r in refs)
            + f'{"delay ms":>9s} {"miss %":>7s} '
            f'{"energy J":>9s} {"w.delay":>8s} {"inf.share":>9s} {"Mops":>7s} {"offload":>7s}')
  lines = [header]
  for name, m in results.methods.items():
    lines.append(f'{name:12s} {m["objective"]["mean"]:10.4f} '
                 + ''.join(f'{100 * gaps[name][r]:12.2f} ' for r in refs)
                 + f'{1e3 * m["mean_delay"]["mean"]:9.3f}'
                 f' {100 * m["miss_ratio"]["mean"]:7.2f} {m["total_energy"]["mean"]:9.4f}'
                 f' {m["weighted_delay"]["mean"]:8.4f} {m["inference_share"]["mean"]:9.4f}'
                 f' {m["ops"]["mean"] / 1e6:7.3f} {m["offload_ratio"]["mean"]:7.3f}')
  if results.bound is not None:
    lines.append(f'{"lower bound":12s} {results.bound["mean"]:10.4f}')
  return '\n'.join(lines)


def gap_table(gaps: list[list[float]]) -> str:
  gaps = np.asarray(gaps)
  lines = ['weighted-delay gap to kkt_weighted (%), every (k, l):\n' + ' ' * 20 + ' '.join(f'l={l + 1:<6d}' for l in range(gaps.shape[1]))]
  for k in range(gaps.shape[0]):
    lines.append(f'k={k + 1:<18d}' + ' '.join(f'{100 * g:<8.2f}' for g in gaps[k]))
  return '\n'.join(lines)


def training_summary(mec: MECConfig, model: ModelConfig, train: TrainConfig,
                     params: Params, chunk: int = 8192) -> dict:
  quality = quality_gaps(mec, model, params, min(train.eval_slots, 4096))
  # Judged with the delays it was trained for (a measured table's, for a device's policy).
  setting = Setting(mec=mec, model=model, feature_config=mec,
                    delay=training_delay(model, mec, train))
  results = evaluate(setting, default_methods(mec, params), params, slots=train.eval_slots,
                     chunk=chunk, seed=HELD_OUT_SEED)
  text = [gap_table(quality['subnetwork_gap'])]
  if 'static_gap' in quality:
    text.append(f'static baseline gap: {100 * quality["static_gap"]:.2f} %')
  text.append(f'\nheld-out evaluation (case {mec.case}, trained with loss={train.loss}), '
              f'{results.slots} slots, {results.mode} inference delay:')
  text.append(methods_table(results))
  return {'quality': quality, 'evaluation': results.to_dict(), 'text': '\n'.join(text)}


# ------------------------------------------------------------- reproduction report

def _fmt_ci(metric: dict, scale: float) -> str:
  mean, ci = scale * metric['mean'], scale * metric['ci95']
  digits = 2 if abs(mean) >= 1 else 4  # shares and small ratios need more decimals
  return f'{mean:.{digits}f} ± {ci:.{digits}f}'


def sweep_table(points: list[dict], metric: str, scale: float, value_scale: float) -> str:
  methods = list(points[0]['results'].names)
  lines = ['| value | ' + ' | '.join(methods) + ' |',
           '|---' * (len(methods) + 1) + '|']
  for p in points:
    cells = [_fmt_ci(p['results'][m][metric], scale) for m in methods]
    lines.append(f'| {p["value"] * value_scale:g} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def paper_comparison(points: list[dict], paper: dict, metric: str, scale: float) -> str:
  """First and last point of the sweep, ours next to the paper's, per method."""
  lines = ['| method | ours (first → last) | paper (first → last) |', '|---|---|---|']
  for method, (first, last) in paper.items():
    if method not in points[0]['results']:
      lines.append(f'| {method} | not run | {first:g} → {last:g} |')
      continue
    a = scale * points[0]['results'][method][metric]['mean']
    b = scale * points[-1]['results'][method][metric]['mean']
    digits = 2 if max(abs(a), abs(b)) >= 1 else 4
    lines.append(f'| {method} | {a:.{digits}f} → {b:.{digits}f} | {first:g} → {last:g} |')
  return '\n'.join(lines)


def compared(point: dict, *names: str) -> EvalResult:
  """The results in which to compare `names` at a sweep point: with the oracle among
  them, the first yardstick that ran them all on the same slots (every method beside
  the oracle on the oracle's slots; or the GA beside the oracle on the GA's), else the
  point's main results."""
  for yard in (point.get('yardstick'), point.get('ga_yardstick')):
    if 'oracle' in names and yard is not None and all(n in yard for n in names):
      return yard
  return point['results']


def ordering_checks(points: list[dict], pairs: list[tuple[str, str]], metric: str) -> str:
  """For each (better, worse) pair: at how many points `better` has the lower mean."""
  lines = []
  for better, worse in pairs:
    first = compared(points[0], better, worse)
    if better not in first or worse not in first:
      continue
    lost = [p['value'] for p, r in ((p, compared(p, better, worse)) for p in points)
            if r[better][metric]['mean'] > r[worse][metric]['mean']]
    where = f' (not at {", ".join(f"{v:g}" for v in lost)})' if lost else ''
    lines.append(f'- {better} ≤ {worse} on {metric}: {len(points) - len(lost)} of '
                 f'{len(points)} points{where}')
  return '\n'.join(lines)


def objective_gap_table(points: list[dict], value_scale: float) -> str:
  """Per point: every method's mean objective over the oracle's, minus 1 (%), and the
  oracle's over the lower bound, each on the same slots (`compared`)."""
  first = compared(points[0], 'oracle')
  methods = [m for m in first.names if m != 'oracle']
  has_bound = first.bound is not None
  lines = ['| value | ' + ' | '.join(methods) + (' | oracle vs bound |' if has_bound else ' |'),
           '|---' * (len(methods) + 1 + has_bound) + '|']
  for p in points:
    gaps = objective_gaps(compared(p, 'oracle'))
    cells = [f'{100 * gaps[m]["oracle"]:+.1f}' for m in methods]
    if has_bound:
      cells.append(f'{100 * gaps["oracle"]["bound"]:+.1f}')
    lines.append(f'| {p["value"] * value_scale:g} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


POLICIES = ('policy_moe', 'pmrl', OBJECTIVE_PREFIX + 'policy_moe', OBJECTIVE_PREFIX + 'pmrl')


def top_picks(stats: dict, count: int = 3) -> str:
  """A policy method's most picked exits, '(k, l) share%' from its pick_<k>_<l> metrics."""
  picks = sorted(((m['mean'], name[5:]) for name, m in stats.items()
                  if name.startswith('pick_') and m['mean'] > 0), reverse=True)
  return ', '.join(f'({kl.replace("_", ", ")}) {100 * share:.0f}%'
                   for share, kl in picks[:count])


def picks_table(points: list[dict], value_scale: float) -> str | None:
  """Per point, each policy's most picked exits and its gap to its pipeline's hindsight
  (each slot's best exit) on the objective; None when no policy ran."""
  first = points[0]['results']
  policies = [m for m in POLICIES if m in first]
  if not policies:
    return None
  lines = ['| value | ' + ' | '.join(f'{m}: picks (vs hindsight)' for m in policies) + ' |',
           '|---' * (len(policies) + 1) + '|']
  for p in points:
    r, cells = p['results'], []
    for m in policies:
      hind = m.replace('policy_moe', 'hindsight').replace('pmrl', 'hindsight')
      gap = (f' ({100 * (r.mean(m) / r.mean(hind) - 1):+.2f}%)' if hind in r else '')
      cells.append(top_picks(r[m]) + gap)
    lines.append(f'| {p["value"] * value_scale:g} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def headline_table(results: EvalResult) -> str:
  """One point's methods, best objective first, with their gaps to the oracle and bound."""
  gaps = objective_gaps(results)
  names = sorted(results.names, key=results.mean)
  refs = list(next(iter(gaps.values()), {}))
  lines = ['| method | objective | ' + ' | '.join(f'vs {r} (%)' for r in refs)
           + ' | mean delay (ms) | miss (%) | energy (J) | inference share | Mops run |',
           '|---' * (7 + len(refs)) + '|']
  for m in names:
    r = results[m]
    lines.append(f'| {m} | {r["objective"]["mean"]:.4f} | '
                 + ''.join(f'{100 * gaps[m][ref]:+.1f} | ' for ref in refs)
                 + f'{1e3 * r["mean_delay"]["mean"]:.2f} | {100 * r["miss_ratio"]["mean"]:.2f} | '
                 f'{r["total_energy"]["mean"]:.3f} | {r["inference_share"]["mean"]:.4f} | '
                 f'{r["ops"]["mean"] / 1e6:.3f} |')
  if results.bound is not None:
    lines.append(f'| lower bound | {results.bound["mean"]:.4f} |'
                 + ' |' * (5 + len(refs)))
  return '\n'.join(lines)


def write_csv(path: str, points: list[dict]) -> None:
  rows = [['value', 'method', 'metric', 'mean', 'ci95']]
  for p in points:
    for method, metrics in p['results'].methods.items():
      for metric, v in metrics.items():
        rows.append([p['value'], method, metric, v['mean'], v['ci95']])
    if p['results'].bound is not None:
      bound = p['results'].bound
      rows.append([p['value'], 'lower_bound', 'objective', bound['mean'], bound['ci95']])
  buffer = io.StringIO()
  csv.writer(buffer).writerows(rows)
  write_bytes_atomic(path, buffer.getvalue().encode())


OBJ = OBJECTIVE_PREFIX
DELAY_PAIRS = {1: [('policy_moe', 'fix_moe'), ('policy_moe', 'static'), ('policy_moe', 'fix_width'),
                   ('policy_moe', 'fix_depth')],
               2: [('pmrl', 'local'), ('pmrl', 'random'), ('pmrl', 'static'),
                   (OBJ + 'pmrl', 'local'), (OBJ + 'pmrl', 'random')]}
OBJECTIVE_PAIRS = {
    1: [('oracle', 'kkt_weighted'), ('oracle', 'equal_split'), ('oracle', 'ga'),
        (OBJ + 'policy_moe', 'equal_split'), (OBJ + 'policy_moe', 'ga'),
        (OBJ + 'policy_moe', 'policy_moe'), ('policy_moe', 'equal_split'),
        ('kkt_weighted', 'equal_split')],
    2: [('oracle', 'kkt_weighted'), ('oracle', 'ga'), ('oracle', 'random'),
        ('pmrl', 'local'), ('pmrl', 'random'), (OBJ + 'pmrl', 'local'),
        (OBJ + 'pmrl', 'random'), (OBJ + 'pmrl', 'pmrl')]}


def tally(sweeps: dict, case: int, better: str, worse: str, metric: str) -> str | None:
  """'better ≤ worse on metric at W of P points (not at: sweep=value, ...)' over every
  sweep of the case that ran both methods; None if none did."""
  total, lost = 0, []
  for key, points in sweeps.items():
    if key.case != case:
      continue
    for p in points:
      r = compared(p, better, worse)
      if better in r and worse in r:
        total += 1
        if r[better][metric]['mean'] > r[worse][metric]['mean']:
          lost.append(f'{key.sweep}={p["value"]:g}')
  if not total:
    return None
  where = f' (not at {", ".join(lost)})' if lost else ''
  return f'{better} ≤ {worse} on {metric} at {total - len(lost)} of {total} points{where}'


def conclusions(sweeps: dict, nets: dict) -> list[str]:
  """The targets of the objective study, each computed from the points above."""
  lines = []
  checks = {1: [('oracle', w, 'objective') for w in ('kkt_weighted', 'equal_split', 'ga')]
               + [(OBJ + 'policy_moe', w, 'objective')
                  for w in ('equal_split', 'ga', 'policy_moe')]
               # Paper Fig. 5: the policy below every fixed-size network, both pipelines.
               + [('policy_moe', w, m) for w in ('fix_moe', 'fix_width', 'fix_depth', 'static')
                  for m in ('objective', 'mean_delay')]
               + [(OBJ + 'policy_moe', OBJ + w, m) for w in ('fix_moe', 'static')
                  for m in ('objective', 'mean_delay')],
            2: [('oracle', w, 'objective') for w in ('kkt_weighted', 'ga', 'random')]
               + [(f'{pre}pmrl', w, m) for pre in ('', OBJ) for w in ('local', 'random')
                  for m in ('objective', 'mean_delay')]
               + [(OBJ + 'pmrl', 'pmrl', 'objective')]}
  for case, pairs in checks.items():
    for better, worse, metric in pairs:
      line = tally(sweeps, case, better, worse, metric)
      if line:
        lines.append(f'- Case {case}: {line}.')
    point = (default_point(sweeps.get(SweepKey(case, 'data'), []), nets[case].mec.s_avg)
             if case in nets else None)
    if point is not None:
      gaps = objective_gaps(compared(point, 'oracle'))
      for name in ('policy_moe', 'pmrl', OBJ + 'policy_moe', OBJ + 'pmrl'):
        if name in gaps and 'oracle' in gaps[name]:
          share = point['results'][name]['inference_share']['mean']
          lines.append(f'- Case {case}, default point: {name} is '
                       f'{100 * gaps[name]["oracle"]:+.2f}% from the oracle on the objective, '
                       f'inference share {100 * share:.2f}% of the total delay; '
                       + gap_terms(compared(point, 'oracle'), name, nets[case].mec) + '.')
      if 'bound' in gaps.get('oracle', {}):
        lines.append(f'- Case {case}, default point: the oracle is within '
                     f'{100 * gaps["oracle"]["bound"]:.2f}% of the lower bound.')
  return lines


def gap_terms(results: EvalResult, name: str, mec: MECConfig) -> str:
  """Where a method's gap to the oracle comes from: the objective's delay, energy and
  miss terms (alpha N mean delay, beta energy, delta N miss ratio per slot), each as a
  share of the oracle's objective."""
  base = results.mean('oracle')
  terms = {'delay': mec.alpha * mec.n_users * (results.mean(name, 'mean_delay')
                                               - results.mean('oracle', 'mean_delay')),
           'energy': mec.beta * (results.mean(name, 'total_energy')
                                 - results.mean('oracle', 'total_energy')),
           'misses': mec.delta * mec.n_users * (results.mean(name, 'miss_ratio')
                                                - results.mean('oracle', 'miss_ratio'))}
  return 'of it ' + ', '.join(f'{k} {100 * v / base:+.2f}%' for k, v in terms.items())


def default_point(points: list[dict], s_avg: float) -> dict | None:
  """The data sweep's point at the networks' own mean data size, if it was evaluated."""
  return next((p for p in points if p['value'] == s_avg), None)


def table_one(nets: dict, large: list[dict] | None, measured: bool) -> list[str]:
  """The paper's Table I beside ours, and what the difference in the fixed part does."""
  if 1 not in nets:
    return []
  model, mec = nets[1].model, nets[1].mec
  n = mec.n_users
  ours = {'dynamic ops': float(ops.allocation_dynamic_ops(model, model.num_experts,
                                                          model.max_depth, n)),
          'dynamic parameters': ops.allocation_dynamic_params(model),
          'fixed ops': float(ops.allocation_fixed_ops(model, n)),
          'fixed parameters': ops.allocation_fixed_params(model)}
  rows = ['| quantity | ours | paper |', '|---|---|---|']
  for name, value in ours.items():
    rows.append(f'| {name} | {value:,.0f} | {paper.TABLE_ONE[name]:,.0f} |')
  extra_s = (paper.TABLE_ONE['fixed ops'] - ours['fixed ops']) * mec.cycles_per_op / mec.f_ser
  return ['## Model size against the paper\'s Table I', '',
          f'Full allocation network (K = {model.num_experts}, L = {model.max_depth}, width '
          f'{model.width}) at N = {n} offloaded users, from `dynn_jax.ops`:', '', *rows, '',
          'The dynamic part (the experts) matches. The fixed part does not: ours is the gate '
          '(one linear map of the 11 pooled features, plus its noise kernel in training) and '
          'two linear heads of one weight vector each, as SPEC section 3 describes them; the '
          'paper does not describe its gate or heads, and its 7.291 K fixed parameters '
          'suggest hidden layers there. At the paper\'s fixed part every DyNN pipeline would '
          f'carry {1e3 * extra_s:.3f} ms more modelled inference delay per slot at '
          f'f_ser = {mec.f_ser / 1e9:g} GHz.', ''] + fixed_part_effect(large, extra_s, measured)


def fixed_part_effect(points: list[dict] | None, extra_s: float, measured: bool) -> list[str]:
  """Fig. 11's inference share with `extra_s` more inference delay for every user
  (share' = (share D + extra) / (D + extra) at the mean delay D: an approximation, since
  the share is a mean of per-slot ratios)."""
  if not points or measured:
    return []
  methods = [m for m in ('policy_moe', 'fix_moe') if m in points[0]['results']]
  rows = ['| mean data size (kbit) | ' + ' | '.join(f'{m}: ours → at the paper\'s fixed part'
                                                   for m in methods) + ' |',
          '|---' * (len(methods) + 1) + '|']
  for p in points:
    cells = []
    for m in methods:
      share = p['results'][m]['inference_share']['mean']
      delay = p['results'][m]['mean_delay']['mean']
      cells.append(f'{share:.4f} → {(share * delay + extra_s) / (delay + extra_s):.4f}')
    rows.append(f'| {p["value"] * 1e-3:g} | ' + ' | '.join(cells) + ' |')
  return ['Inference share of the total delay (Fig. 11) with that extra fixed delay:', '',
          *rows, '', f'Paper: {paper.INFERENCE_SHARE}.', '']


def _points_seconds(sweeps: dict) -> float:
  return sum(p.get('seconds', 0.0) for points in sweeps.values() for p in points)


def points_network_ops(sweeps: dict) -> float:
  """The networks' counted inference ops over every slot every point ran (each
  method's mean ops per slot times its slots, in every result set of the point): the
  work no implementation of these points can skip."""
  total = 0.0
  for points in sweeps.values():
    for p in points:
      for part in ('results', 'yardstick', 'ga_yardstick'):
        r = p.get(part)
        if r is None:
          continue
        total += sum(r[name]['ops']['mean'] * r.slots_of.get(name, r.slots)
                     for name in r.names if 'ops' in r[name])
  return total


def report(sweeps: dict, exits: dict | None, cost: dict | None, mode: str,
           seconds: float, nets: dict, settings: dict, models: dict | None = None) -> str:
  """The markdown reproduction report; `settings` holds the slots per point ('slots',
  'ga_slots', 'oracle_slots') that every point was computed with; `exits` the case-1
  exit studies per pipeline (`reproduce.exit_studies`) and `models` their ModelConfigs."""
  out = ['# Reproduction report', '',
         f'Inference delay: **{mode}**. Slots per point: {settings["slots"]} (GA: {settings["ga_slots"]}; '
         f'oracle and lower bound: {settings["oracle_slots"]}, on which every method runs again so '
         'that each gap to them is taken on the same slots). '
         f'Computing the sweep points took {_points_seconds(sweeps):.0f} s of wall time '
         '(compiles included, summed over the runs that computed them); this run took '
         f'{seconds:.0f} s (points written by earlier runs are read back, not recomputed). '
         f'The networks\' counted inference ops over every slot of these points: '
         f'{points_network_ops(sweeps) / 1e12:.3g} T (SPEC section 2\'s count: 2 per '
         'weight and user, the FLOPs of the matmuls). '
         'Values are means ± 95% confidence half-widths. '
         f'Methods named `{OBJ}*` are the networks trained with `--loss=objective`; the '
         'others are trained with the paper\'s losses. `kkt_weighted` is the exact minimiser '
         'of the paper\'s weighted delay, `oracle` the best solution found of the objective '
         'itself, `lower bound` a bound no method can beat.', '']
  found = conclusions(sweeps, nets)
  if found:
    out += ['## Conclusions, computed from the points below', '', *found, '']
  for case in (1, 2):
    point = (default_point(sweeps.get(SweepKey(case, 'data'), []), nets[case].mec.s_avg)
             if case in nets else None)
    if point is not None:
      out += [f'## Case {case} at the default point: both pipelines beside the oracle', '',
              headline_table(compared(point, 'oracle')), '']
  for key, points in sweeps.items():
    case, sweep = key
    _, _, label, value_scale = SWEEPS[sweep]
    out += [f'## Case {case}: {label}', '', f'![{key.name}]({key.name}.png)', '',
            '### Mean service delay (ms)', '', sweep_table(points, 'mean_delay', 1e3, value_scale),
            '', '### Deadline-miss ratio (%)', '',
            sweep_table(points, 'miss_ratio', 100.0, value_scale), '',
            '### Objective per slot', '', sweep_table(points, 'objective', 1.0, value_scale), '']
    if 'oracle' in points[0]['results']:
      out += ['### Gap to the oracle on the objective (%)', '',
              objective_gap_table(points, value_scale), '']
    if key.name in paper.MEAN_DELAY_MS:
      out += ['### Against the paper: mean delay (ms)', '',
              paper_comparison(points, paper.MEAN_DELAY_MS[key.name], 'mean_delay', 1e3), '']
    if key.name in paper.MISS_PERCENT:
      out += ['### Against the paper: miss ratio (%)', '',
              paper_comparison(points, paper.MISS_PERCENT[key.name], 'miss_ratio', 100.0), '']
    if sweep == 'data_large':
      out += ['### Inference share of the total delay (Fig. 11)', '',
              sweep_table(points, 'inference_share', 1.0, value_scale), '',
              paper_comparison(points, paper.INFERENCE_SHARE, 'inference_share', 1.0), '',
              '### Counted ops actually run (Fig. 10), millions', '',
              sweep_table(points, 'ops', 1e-6, value_scale), '']
    picks = picks_table(points, value_scale)
    if picks:
      out += ['### The policies\' picks (share of slots per exit) and their gap to hindsight '
              'on the objective', '', picks, '']
    out += ['### Ordering', '', ordering_checks(points, DELAY_PAIRS[case], 'mean_delay'),
            ordering_checks(points, OBJECTIVE_PAIRS[case], 'objective'), '']
  out += table_one(nets, sweeps.get(SweepKey(1, 'data_large')), mode == 'measured')
  if exits:
    out += exit_study_section(exits, models)
  if cost:
    out += ['## Training cost (Fig. 12)', '', f'Bar: every sub-network within '
            f'{100 * cost["bar"]:g}% of the optimum; seconds exclude compilation.', '',
            '| kind | schedule | seed | reached | steps | seconds | (K, L) at the bar, step '
            '| steps of the last stage | last to the bar (k, l) | paper seconds |',
            '|---|---|---|---|---|---|---|---|---|---|']
    for r in cost['results']:
      p = paper.TRAINING_SECONDS[r['kind']][0 if r['schedule'] == 'progressive' else 1]
      limiting = ' '.join(f'({k}, {l})' for k, l in r['limiting'])
      last_stage = r['steps'] - r['stage_starts'][-1]['step']
      out.append(f'| {r["kind"]} | {r["schedule"]} | {r["seed"]} | {r["reached"]} | '
                 f'{r["steps"]} | {r["seconds"]:.1f} | {r["first_at_bar"][-1][-1]} | '
                 f'{last_stage} | {limiting} | {p} |')
    out += ['', '| kind | progressive speed over scratch (median, range over seeds) | '
            'in steps | paper |', '|---|---|---|---|']
    for kind in (k for k in cost_study.KINDS if k in cost['speedup']):
      speedup = cost['speedup'][kind]
      low, high = cost['speedup_range'][kind]
      paper_prog, paper_scratch = paper.TRAINING_SECONDS[kind]
      out.append(f'| {kind} | {speedup:.2f}x ({low:.2f}-{high:.2f}) | '
                 f'{cost["step_speedup"][kind]:.2f}x | '
                 f'{paper_scratch / paper_prog:.2f}x |')
    out.append('')
  out += ['## Why our numbers differ', '', DIFFERENCES]
  return '\n'.join(out) + '\n'


def _change(first: float, last: float) -> str:
  return f'{100 * (last / first - 1):+.1f}%'


def exit_study_section(studies: dict, models: dict) -> list[str]:
  """Fig. 4 for each pipeline ({'paper': study, 'objective': study} from
  `exit_study.exit_study`, models the pipelines' ModelConfigs): every exit without and
  with inference delay at each data size, on the loss the pipeline was trained for;
  whether bigger exits are better, and the policy against the best fixed exit and the
  hindsight bound, all computed here."""
  out = ['## Every exit, with and without inference delay (Fig. 4)', '',
         'Each exit (k, l) runs for every slot (`exit_<k>_<l>`), on the same slots at every '
         'data size; values are relative to the full exit (K, L) without inference delay '
         '(%; lower is better), on the loss each pipeline was trained for (the paper\'s '
         'weighted delay, or the objective). `hindsight` takes each slot\'s best exit, '
         'inference delay included: the bound of any policy over these networks.', '',
         f'Paper (Fig. 4, weighted delay, default point): without inference delay, depth 1 '
         f'from 1 to 10 experts {_change(*paper.MODEL_SIZE["without_inference_depth1"])}, '
         f'depth 3 {_change(*paper.MODEL_SIZE["without_inference_depth3"])}; with it, depth 3 '
         f'at 10 experts is {_change(paper.MODEL_SIZE["with_inference_depth3_k2"], paper.MODEL_SIZE["with_inference_depth3_k10"])} '
         'from its best (2 experts).', '', '![exits](exits.png)', '']
  for pipeline, study in studies.items():
    model, metric = models[pipeline], exit_study.LOSS_METRIC[study['loss']]
    policy = next((m for m in ('policy_moe', 'pmrl') if m in study['none'][0]['methods']),
                  None)
    out += [f'### {pipeline} pipeline ({metric}, {study["slots"]} slots per size)', '']
    for i, size in enumerate(study['sizes']):
      none = EvalResult.from_dict(study['none'][i])
      base = none.mean(f'exit_{model.num_experts}_{model.max_depth}', metric)
      rows = ['| l \\ k | ' + ' | '.join(str(k) for k in range(1, model.num_experts + 1))
              + ' |', '|---' * (model.num_experts + 1) + '|']
      for mode in study['modes']:
        r = EvalResult.from_dict(study[mode][i])
        grid = exit_study.exit_grid(r, model, metric)
        for l in range(model.max_depth):
          cells = [f'{100 * (grid[k][l] / base - 1):+.2f}' for k in range(model.num_experts)]
          rows.append(f'| {l + 1} ({mode}) | ' + ' | '.join(cells) + ' |')
      mono = exit_study.monotonicity(exit_study.exit_grid(none, model, metric))
      out += [f'**{size * 1e-3:g} kbit**', '', *rows, '',
              f'- Without inference delay, the worst exit against one with an expert or a '
              f'layer fewer: {mono["bigger"]} is {100 * mono["worst_excess"]:+.2f}% from '
              f'{mono["smaller"]}; the full exit is {100 * mono["full_vs_smallest"]:+.2f}% '
              'from (1, 1).']
      for mode in study['modes']:
        r = EvalResult.from_dict(study[mode][i])
        best = min(exit_study.exit_names(model), key=lambda name: r.mean(name))
        line = (f'- {mode} inference delay, on the objective: hindsight '
                f'{100 * (r.mean("hindsight") / r.mean(best) - 1):+.2f}% from the best fixed '
                f'exit')
        if policy is not None:
          gaps = exit_study.policy_gaps(r, model, policy)
          picks = ', '.join(f'({k.replace("_", ", ")}) {100 * v:.0f}%'
                            for k, v in list(gaps['picks'].items())[:4])
          line += (f'; {policy} {100 * gaps["vs_best_exit"]:+.2f}% from the best fixed exit '
                   f'({gaps["best_exit"][5:].replace("_", ", ")}) and '
                   f'{100 * gaps["vs_hindsight"]:+.2f}% from hindsight; picks {picks}')
        out.append(line + '.')
      out.append('')
  return out


DIFFERENCES = """\
- Constants the paper does not publish are our choices (WORKSPACE.md): l0 = 1 m,
  delta = 0.01, deadlines from U[1 ms, 160 ms], mu = 1e-23 in SI. They shift absolute
  delays and miss ratios; orderings and trends are what we compare.
- Modelled inference delay counts dense-layer ops over f_ser (SPEC section 2); the
  paper's fixed part is larger than ours (gate and heads are not specified), so our
  static and DyNN pipelines carry slightly less fixed inference time.
- The GA's own run time counts as inference delay only in measured mode (the paper
  counted seconds of GA run time; ours runs in tens of milliseconds per slot). In
  modelled mode the GA is a quality baseline, not a latency one.
- `kkt_weighted` (the exact allocation of SPEC section 5) minimises the paper's
  importance-weighted delay, the target its networks are trained on, not the objective;
  `oracle` is the best solution we find of the objective itself (for a fixed offloading
  set within 1% of the enumeration of every rescued set on small N, see
  `tests/test_objective.py`), and `lower bound` a Lagrangian bound on it. The paper
  reports neither.
- The networks trained with `--loss=objective` (`obj_*`) saw delta = 0.01 only; the
  delta sweep evaluates the same networks at every delta, so it shows how each
  pipeline's trade-off between delay and misses fares when misses cost more or less,
  not what a network trained at that delta would do. The objective-trained case-2
  networks saw data sizes and workloads scaled as in case 1.
- After progressive shrinking and the policy, the objective-trained networks spend 3000
  steps on the exits their policy picks (`--tune_steps`), and the policy is trained
  again. Their policy picks small exits, whose inference delay is lowest; the exits it
  does not pick, the full network among them, lose quality, which is why `obj_fix_moe`
  is further from the oracle than the allocation quality of a full network suggests.
- Networks are trained once and evaluated across each sweep, with features normalised
  by the training ranges; the paper may have retrained per point. Networks of both
  cases and both losses saw data sizes scaled by U[0.5, 4] and workloads by U[0.5, 2]
  in training, so the sweeps stay inside what they learned (the 3-10 kbit sweep
  extrapolates past 4 kbit). The case-2 scheduler's rewards are normalised per slot
  (`--normalize_rewards`); without it, slots with large tasks set its gradient and it
  learned to offload too little.
- Beyond the paper, both case-2 schedulers also read the server's CPU
  (log(f_ser / 2.5 GHz), `--scheduler_context=server_cpu`) and were trained with f_ser
  drawn from 0.75 to 5 GHz per joint step. With the paper's five per-user inputs one
  trained scheduler offloads the same users at every f_ser: at 1 GHz it offloaded
  about as many as at 2.5 GHz, and its mean delay was above running everything
  locally.
- Fig. 4's absolute values are in our unit (sum_i w_i T_i in ms per slot); compare the
  shapes: bigger is better without inference delay, a small network is best with it.
- Training cost (Fig. 12): progressive shrinking is not faster here, while the paper
  reports 2.56x for the fully dynamic network. The last sub-networks to reach the bar
  are the depth-1 exits. The full network (K, L) reaches it as fast with either
  schedule, and the last progressive stage, where the depth-1 exits train, takes about
  as many steps as the whole from-scratch run. A depth-1 exit reads its first layer's
  output through the heads that the deeper exits trained, so the full network's
  weights give it almost no head start. Widths come nearly free either way: every width
  at depth L reaches the bar about as fast as the full network does. The paper's own
  depth-only figures (11 s against 12.5 s) show the same small gain. The same holds with
  a 5% bar and with a 3x higher learning rate (`train_cost_bar05.json`,
  `train_cost_lr3e-3.json` beside this report).
"""
