"""Tables of the reproduction: markdown and CSV tables of sweep points and the default
points (one evaluation's text table is `evaluation.methods_table`, the sub-networks'
gaps `quality.gap_table`).

Pure functions from results to text: nothing here evaluates, decides a conclusion or
writes a file (`markdown` draws the conclusions, launchers write the files).
"""

from __future__ import annotations

import csv
import io

from dynn_jax.evaluation import EvalResult, objective_gaps
from dynn_jax.reproduce import OBJECTIVE_PREFIX, compared

# The methods that pick an exit per slot: each pipeline's policy, of both losses.
POLICIES = ('policy_moe', 'pmrl', OBJECTIVE_PREFIX + 'policy_moe', OBJECTIVE_PREFIX + 'pmrl')


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


def objective_gap_table(points: list[dict], value_scale: float) -> str:
  """Per point: every method's mean objective over the oracle's, minus 1 (%), and the
  oracle's over the lower bound, each on the same slots (`reproduce.compared`)."""
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


def sweep_csv(points: list[dict]) -> str:
  """Every point's methods and metrics, one row per (value, method, metric)."""
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
  return buffer.getvalue()
