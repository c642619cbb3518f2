"""The markdown reproduction report (`report`): its sections in order, and every
conclusion in it computed from the points it shows (orderings tallied over the sweeps,
gaps at the default point, the exit study's checks, the model size against the paper's
Table I).

It formats through `tables` and `differences`; it evaluates nothing, reads no file and
writes none (launch/reproduce.py hands the points in and writes the text).
"""

from __future__ import annotations

from dynn_jax import cost_study, delay, exit_study, ops, paper
from dynn_jax.config import MECConfig
from dynn_jax.evaluation import EvalResult, objective_gaps
from dynn_jax.models import POOLED_DIM
from dynn_jax.report.differences import differences
from dynn_jax.report.tables import (POLICIES, headline_table, objective_gap_table,
                                    paper_comparison, picks_table, sweep_table)
from dynn_jax.reproduce import (AGENT_METHOD, OBJECTIVE_PREFIX, POINT_RESULTS, SWEEPS, SweepKey,
                                compared)
from dynn_jax.training.config import SCHEDULES

OBJ = OBJECTIVE_PREFIX
# The comparisons with a yardstick (the oracle, or the objective-trained policy against
# the paper's allocators), per case: each sweep's ordering and the conclusions count them.
YARDSTICK_PAIRS = {
    1: [('oracle', w) for w in ('kkt_weighted', 'equal_split', 'ga')]
       + [(OBJ + 'policy_moe', w) for w in ('equal_split', 'ga', 'policy_moe')],
    2: [('oracle', w) for w in ('kkt_weighted', 'ga', 'random')]}
DELAY_PAIRS = {1: [('policy_moe', 'fix_moe'), ('policy_moe', 'static'), ('policy_moe', 'fix_width'),
                   ('policy_moe', 'fix_depth')],
               2: [('pmrl', 'local'), ('pmrl', 'random'), ('pmrl', 'static'),
                   (OBJ + 'pmrl', 'local'), (OBJ + 'pmrl', 'random')]}
OBJECTIVE_PAIRS = {
    1: YARDSTICK_PAIRS[1] + [('policy_moe', 'equal_split'), ('kkt_weighted', 'equal_split')],
    2: YARDSTICK_PAIRS[2] + [('pmrl', 'local'), ('pmrl', 'random'), (OBJ + 'pmrl', 'local'),
                             (OBJ + 'pmrl', 'random'), (OBJ + 'pmrl', 'pmrl')]}


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


def default_point(sweeps: dict, nets: dict, case: int) -> dict | None:
  """The case's data-sweep point at its networks' own mean data size, if it was
  evaluated."""
  if case not in nets:
    return None
  points = sweeps.get(SweepKey(case, 'data'), [])
  return next((p for p in points if p['value'] == nets[case].mec.s_avg), None)


def conclusions(sweeps: dict, nets: dict) -> list[str]:
  """The targets of the objective study, each computed from the points above."""
  lines = []
  both = ('objective', 'mean_delay')
  checks = {1: [(b, w, 'objective') for b, w in YARDSTICK_PAIRS[1]]
               # Paper Fig. 5: the policy below every fixed-size network, both pipelines.
               + [('policy_moe', w, m) for w in ('fix_moe', 'fix_width', 'fix_depth', 'static')
                  for m in both]
               + [(OBJ + 'policy_moe', OBJ + w, m) for w in ('fix_moe', 'static') for m in both]
               # The RL baseline against the objective-trained pipeline.
               + [(AGENT_METHOD, OBJ + 'policy_moe', 'objective')],
            2: [(b, w, 'objective') for b, w in YARDSTICK_PAIRS[2]]
               + [(f'{pre}pmrl', w, m) for pre in ('', OBJ) for w in ('local', 'random')
                  for m in both]
               + [(OBJ + 'pmrl', 'pmrl', 'objective'), (AGENT_METHOD, 'random', 'objective'),
                  (AGENT_METHOD, OBJ + 'pmrl', 'objective')]}
  for case, pairs in checks.items():
    for better, worse, metric in pairs:
      line = tally(sweeps, case, better, worse, metric)
      if line:
        lines.append(f'- Case {case}: {line}.')
    point = default_point(sweeps, nets, case)
    if point is not None:
      gaps = objective_gaps(compared(point, 'oracle'))
      for name in POLICIES + (AGENT_METHOD,):
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


def table_one_lines(nets: dict, large: list[dict] | None, measured: bool) -> list[str]:
  """The paper's Table I beside ours (`ops.table_one`), and what the difference in the
  fixed part does."""
  if 1 not in nets:
    return []
  model, mec = nets[1].model, nets[1].mec
  n = mec.n_users
  counted = ops.table_one(model, n)
  # paper.TABLE_ONE's names ('fixed parameters') for ops.table_one's ('fixed_params').
  ours = {name: counted[name.replace('parameters', 'params').replace(' ', '_')]
          for name in paper.TABLE_ONE}
  rows = ['| quantity | ours | paper |', '|---|---|---|']
  for name, value in ours.items():
    rows.append(f'| {name} | {value:,.0f} | {paper.TABLE_ONE[name]:,.0f} |')
  extra_s = delay.modelled_seconds(paper.TABLE_ONE['fixed ops'] - ours['fixed ops'], mec)
  return ['## Model size against the paper\'s Table I', '',
          f'Full allocation network (K = {model.num_experts}, L = {model.max_depth}, width '
          f'{model.width}) at N = {n} offloaded users, from `dynn_jax.ops`:', '', *rows, '',
          'The dynamic part (the experts) matches. The fixed part does not: ours is the gate '
          f'(one linear map of the {POOLED_DIM} pooled features, plus its noise kernel in '
          'training) and two linear heads of one weight vector each, as SPEC section 3 '
          'describes them; the paper does not describe its gate or heads, and its '
          f'{paper.TABLE_ONE["fixed parameters"] / 1e3:g} K fixed parameters '
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
      mean_delay = p['results'][m]['mean_delay']['mean']
      cells.append(f'{share:.4f} → '
                   f'{(share * mean_delay + extra_s) / (mean_delay + extra_s):.4f}')
    rows.append(f'| {p["value"] * 1e-3:g} | ' + ' | '.join(cells) + ' |')
  return ['Inference share of the total delay (Fig. 11) with that extra fixed delay:', '',
          *rows, '', f'Paper: {paper.INFERENCE_SHARE}.', '']


def points_seconds(sweeps: dict) -> float:
  """The wall time the runs that computed the points spent on them."""
  return sum(p.get('seconds', 0.0) for points in sweeps.values() for p in points)


def points_network_ops(sweeps: dict) -> float:
  """The networks' counted inference ops over every slot every point ran (each
  method's mean ops per slot times its slots, in every result set of the point): the
  work no implementation of these points can skip."""
  total = 0.0
  for points in sweeps.values():
    for p in points:
      for part in POINT_RESULTS:
        r = p.get(part)
        if r is None:
          continue
        total += sum(r[name]['ops']['mean'] * r.slots_of.get(name, r.slots)
                     for name in r.names if 'ops' in r[name])
  return total


def report(sweeps: dict, exits: dict | None, cost: dict | None, mode: str,
           seconds: float, nets: dict, settings: dict, models: dict | None = None, *,
           objective: dict | None = None, cost_variants: dict | None = None,
           training: dict | None = None) -> str:
  """The markdown reproduction report; `settings` holds the slots per point ('slots',
  'ga_slots', 'oracle_slots') that every point was computed with; `exits` the case-1
  exit studies per pipeline (`reproduce.exit_studies`) and `models` their ModelConfigs;
  `objective` the objective-trained networks per case and `cost_variants` the cost
  studies beside `cost` ({file name: study}), both read by `differences`; `training`
  each pipeline's training record (`training_section`)."""
  out = ['# Reproduction report', '',
         f'Inference delay: **{mode}**. Slots per point: {settings["slots"]} (GA: {settings["ga_slots"]}; '
         f'oracle and lower bound: {settings["oracle_slots"]}, on which every method runs again so '
         'that each gap to them is taken on the same slots). '
         f'Computing the sweep points took {points_seconds(sweeps):.0f} s of wall time '
         '(compiles included, summed over the runs that computed them); this run took '
         f'{seconds:.0f} s (points written by earlier runs are read back, not recomputed). '
         f'The networks\' counted inference ops over every slot of these points: '
         f'{points_network_ops(sweeps) / 1e12:.3g} T (SPEC section 2\'s count: 2 per '
         'weight and user, the FLOPs of the matmuls). '
         'Values are means ± 95% confidence half-widths. '
         f'Methods named `{OBJ}*` are the networks trained with `--loss=objective`; the '
         'others are trained with the paper\'s losses; `ppo` is the PPO agent of '
         '`launch/train_rl.py` (`dynn_jax.rl`), trained through the gymnax environment for '
         'the objective. `kkt_weighted` is the exact minimiser '
         'of the paper\'s weighted delay, `oracle` the best solution found of the objective '
         'itself, `lower bound` a bound no method can beat.', '']
  found = conclusions(sweeps, nets)
  if found:
    out += ['## Conclusions, computed from the points below', '', *found, '']
  for case in (1, 2):
    point = default_point(sweeps, nets, case)
    if point is not None:
      out += [f'## Case {case} at the default point: both pipelines beside the oracle', '',
              headline_table(compared(point, 'oracle')), '']
  if training:
    out += training_section(training)
  for key, points in sweeps.items():
    out += sweep_section(key, points)
  out += table_one_lines(nets, sweeps.get(SweepKey(1, 'data_large')), mode == 'measured')
  if exits:
    out += exit_study_section(exits, models)
  if cost:
    out += cost_section(cost)
  out += ['## Why our numbers differ', '',
          *differences(sweeps, nets, objective, cost, cost_variants), '']
  return '\n'.join(out) + '\n'


def training_section(training: dict) -> list[str]:
  """Each pipeline's networks file and the wall time its training recorded
  ({label: {'file', 'seconds' (None: not recorded), 'source'}})."""
  lines = ['## Training wall time of each pipeline', '',
           '| pipeline | networks file | training wall time | recorded by |', '|---|---|---|---|']
  for label, record in training.items():
    seconds = record['seconds']
    shown = 'not recorded' if seconds is None else f'{seconds:.0f} s ({seconds / 60:.1f} min)'
    lines.append(f'| {label} | `{record["file"]}` | {shown} | {record["source"]} |')
  return lines + ['']


def sweep_section(key: SweepKey, points: list[dict]) -> list[str]:
  """One sweep: its figure, every metric's table, the gaps to the oracle, the paper's
  values where it publishes them, the policies' picks and the orderings."""
  case, sweep = key
  _, _, label, value_scale = SWEEPS[sweep]
  out = [f'## Case {case}: {label}', '', f'![{key.name}]({key.name}.png)', '',
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
  return out + ['### Ordering', '', ordering_checks(points, DELAY_PAIRS[case], 'mean_delay'),
                ordering_checks(points, OBJECTIVE_PAIRS[case], 'objective'), '']


def cost_section(cost: dict) -> list[str]:
  """Fig. 12: every run of the cost study beside the paper's seconds, and per kind the
  speed of progressive shrinking over training from scratch."""
  out = ['## Training cost (Fig. 12)', '', f'Bar: every sub-network within '
         f'{100 * cost["bar"]:g}% of the optimum; seconds exclude compilation.', '',
         '| kind | schedule | seed | reached | steps | seconds | (K, L) at the bar, step '
         '| steps of the last stage | last to the bar (k, l) | paper seconds |',
         '|---|---|---|---|---|---|---|---|---|---|']
  for r in cost['results']:
    p = paper.TRAINING_SECONDS[r['kind']][SCHEDULES.index(r['schedule'])]
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
  return out + ['']


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
    policy = next((m for m in POLICIES if m in study['none'][0]['methods']), None)
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
