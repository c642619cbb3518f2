"""Tables of results: one evaluation's methods (for stdout and summaries), the sub-networks'
quality gaps, and the markdown and CSV tables of sweep points.

Pure functions from results to text: nothing here evaluates, decides a conclusion or
writes a file (`markdown` draws the conclusions, launchers write the files).
"""

from __future__ import annotations

import csv
import io

import numpy as np

from dynn_jax.evaluation import EvalResult
from dynn_jax.reproduce import OBJECTIVE_PREFIX, compared

# The methods that pick an exit per slot: each pipeline's policy, of both losses.
POLICIES = ('policy_moe', 'pmrl', OBJECTIVE_PREFIX + 'policy_moe', OBJECTIVE_PREFIX + 'pmrl')


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
