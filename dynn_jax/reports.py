"""Human-readable summaries of trained networks (tables for stdout and summary.json)."""

from __future__ import annotations

import numpy as np

from dynn_jax.config import MECConfig
from dynn_jax.evaluation import BOUND, Params, Setting, default_methods, evaluate
from dynn_jax.models import ModelConfig
from dynn_jax.training import TrainConfig, held_out, static_gap, subnetwork_gaps

HELD_OUT_SEED = 10_007  # never a training seed's stream: training keys come from fold_in


def quality_gaps(mec: MECConfig, model: ModelConfig, params: Params, slots: int,
                 seed: int = HELD_OUT_SEED) -> dict:
  """Weighted-delay gap to the optimal allocation, every task offloaded, no inference
  delay: [K][L] for the DyNN and one number for the static baseline."""
  held = held_out(mec, slots, seed)
  gaps = np.asarray(subnetwork_gaps(model, mec, params.allocator, held))
  out = {'subnetwork_gap': gaps.tolist(), 'full_gap': float(gaps[-1, -1]),
         'worst_gap': float(gaps.max()), 'slots': slots}
  if params.static is not None:
    out['static_gap'] = float(static_gap(model, mec, params.static, held))
  return out


def objective_gaps(results: dict) -> dict[str, dict[str, float]]:
  """Each method's mean objective over the oracle's and over the lower bound, minus 1
  (the keys present are those the results allow)."""
  refs = {}
  if 'oracle' in results:
    refs['oracle'] = results['oracle']['objective']['mean']
  if BOUND in results:
    refs['bound'] = results[BOUND]['objective']['mean']
  return {name: {ref: m['objective']['mean'] / value - 1.0 for ref, value in refs.items()}
          for name, m in results.items() if not name.startswith('_')}


def methods_table(results: dict) -> str:
  gaps = objective_gaps(results)
  refs = next(iter(gaps.values()), {}).keys()
  header = (f'{"method":12s} {"objective":>10s} ' + ''.join(f'{"vs " + r + " %":>12s} ' for r in refs)
            + f'{"delay ms":>9s} {"miss %":>7s} '
            f'{"energy J":>9s} {"w.delay":>8s} {"inf.share":>9s} {"Mops":>7s} {"offload":>7s}')
  lines = [header]
  for name, m in results.items():
    if name.startswith('_'):
      continue
    lines.append(f'{name:12s} {m["objective"]["mean"]:10.4f} '
                 + ''.join(f'{100 * gaps[name][r]:12.2f} ' for r in refs)
                 + f'{1e3 * m["mean_delay"]["mean"]:9.3f}'
                 f' {100 * m["miss_ratio"]["mean"]:7.2f} {m["total_energy"]["mean"]:9.4f}'
                 f' {m["weighted_delay"]["mean"]:8.4f} {m["inference_share"]["mean"]:9.4f}'
                 f' {m["ops"]["mean"] / 1e6:7.3f} {m["offload_ratio"]["mean"]:7.3f}')
  if BOUND in results:
    lines.append(f'{"lower bound":12s} {results[BOUND]["objective"]["mean"]:10.4f}')
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
  setting = Setting(mec=mec, model=model, feature_config=mec)
  results = evaluate(setting, default_methods(mec, params), params, slots=train.eval_slots,
                     chunk=chunk, seed=HELD_OUT_SEED)
  text = [gap_table(quality['subnetwork_gap'])]
  if 'static_gap' in quality:
    text.append(f'static baseline gap: {100 * quality["static_gap"]:.2f} %')
  text.append(f'\nheld-out evaluation (case {mec.case}, trained with loss={train.loss}), '
              f'{results["_slots"]} slots, {results["_mode"]} inference delay:')
  text.append(methods_table(results))
  return {'quality': quality, 'evaluation': results, 'text': '\n'.join(text)}


# ------------------------------------------------------------- reproduction report

def _fmt_ci(metric: dict, scale: float) -> str:
  mean, ci = scale * metric['mean'], scale * metric['ci95']
  digits = 2 if abs(mean) >= 1 else 4  # shares and small ratios need more decimals
  return f'{mean:.{digits}f} ± {ci:.{digits}f}'


def sweep_table(points: list[dict], metric: str, scale: float, value_scale: float) -> str:
  methods = [m for m in points[0]['results'] if not m.startswith('_')]
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


def ordering_checks(points: list[dict], pairs: list[tuple[str, str]], metric: str) -> str:
  """For each (better, worse) pair: at how many points `better` has the lower mean."""
  lines = []
  for better, worse in pairs:
    if better not in points[0]['results'] or worse not in points[0]['results']:
      continue
    lost = [p['value'] for p in points
            if p['results'][better][metric]['mean'] > p['results'][worse][metric]['mean']]
    where = f' (not at {", ".join(f"{v:g}" for v in lost)})' if lost else ''
    lines.append(f'- {better} ≤ {worse} on {metric}: {len(points) - len(lost)} of '
                 f'{len(points)} points{where}')
  return '\n'.join(lines)


def objective_gap_table(points: list[dict], value_scale: float) -> str:
  """Per point: every method's mean objective over the oracle's, minus 1 (%), and the
  oracle's over the lower bound."""
  methods = [m for m in points[0]['results'] if not m.startswith('_') and m != 'oracle']
  has_bound = BOUND in points[0]['results']
  lines = ['| value | ' + ' | '.join(methods) + (' | oracle vs bound |' if has_bound else ' |'),
           '|---' * (len(methods) + 1 + has_bound) + '|']
  for p in points:
    gaps = objective_gaps(p['results'])
    cells = [f'{100 * gaps[m]["oracle"]:+.1f}' for m in methods]
    if has_bound:
      cells.append(f'{100 * gaps["oracle"]["bound"]:+.1f}')
    lines.append(f'| {p["value"] * value_scale:g} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def headline_table(results: dict) -> str:
  """One point's methods, best objective first, with their gaps to the oracle and bound."""
  gaps = objective_gaps(results)
  names = sorted((m for m in results if not m.startswith('_')),
                 key=lambda m: results[m]['objective']['mean'])
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
  if BOUND in results:
    lines.append(f'| lower bound | {results[BOUND]["objective"]["mean"]:.4f} |'
                 + ' |' * (5 + len(refs)))
  return '\n'.join(lines)
