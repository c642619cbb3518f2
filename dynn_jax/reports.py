"""Human-readable summaries of trained networks (tables for stdout and summary.json)."""

from __future__ import annotations

import numpy as np

from dynn_jax.config import MECConfig
from dynn_jax.evaluation import Params, Setting, default_methods, evaluate
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


def methods_table(results: dict) -> str:
  header = (f'{"method":12s} {"objective":>10s} {"delay ms":>9s} {"miss %":>7s} '
            f'{"energy J":>9s} {"w.delay":>8s} {"inf.share":>9s} {"Mops":>7s} {"offload":>7s}')
  lines = [header]
  for name, m in results.items():
    if name.startswith('_'):
      continue
    lines.append(f'{name:12s} {m["objective"]["mean"]:10.4f} {1e3 * m["mean_delay"]["mean"]:9.3f}'
                 f' {100 * m["miss_ratio"]["mean"]:7.2f} {m["total_energy"]["mean"]:9.4f}'
                 f' {m["weighted_delay"]["mean"]:8.4f} {m["inference_share"]["mean"]:9.4f}'
                 f' {m["ops"]["mean"] / 1e6:7.3f} {m["offload_ratio"]["mean"]:7.3f}')
  return '\n'.join(lines)


def gap_table(gaps: list[list[float]]) -> str:
  gaps = np.asarray(gaps)
  lines = ['gap to optimum (%)  ' + ' '.join(f'l={l + 1:<6d}' for l in range(gaps.shape[1]))]
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
  text.append(f'\nheld-out evaluation, {results["_slots"]} slots, {results["_mode"]} '
              'inference delay:')
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
    wins = sum(p['results'][better][metric]['mean'] <= p['results'][worse][metric]['mean']
               for p in points)
    lines.append(f'- {better} ≤ {worse} on {metric}: {wins} of {len(points)} points')
  return '\n'.join(lines)
