"""Figures as PNG files, drawn with matplotlib's Agg canvas.

`matplotlib.figure.Figure` is used directly rather than pyplot: no global backend or
figure state, so plotting works headless and inside tests.
"""

from __future__ import annotations

import io

import matplotlib
import numpy as np
from matplotlib.figure import Figure

from dynn_jax.evaluation import EvalResult
from dynn_jax.exit_study import LOSS_METRIC, exit_grid
from dynn_jax.io import write_bytes_atomic


def save_png(fig: Figure, path: str, dpi: int = 150) -> None:
  """Writes the figure atomically (a killed run never leaves half a PNG)."""
  buffer = io.BytesIO()
  fig.savefig(buffer, format='png', dpi=dpi, bbox_inches='tight')
  write_bytes_atomic(path, buffer.getvalue())


def latency_vs_ops(results: dict, path: str) -> None:
  """Per-slot latency (us) of every exit against its counted ops, from `exits_suite`.

  Points carry their (k, l) and p10-p90 bars, one colour per depth; the ops axis is
  logarithmic because depth 1 costs ~10x less than depth 2 and its exits would pile
  up at the origin. The fitted line and the dispatch floor show how much of each
  exit's time is fixed cost.
  """
  exits = results['exits']
  fig = Figure(figsize=(7.5, 4.8))
  ax = fig.add_subplot()
  for depth in sorted({e['l'] for e in exits}):
    group = [e for e in exits if e['l'] == depth]
    x = np.array([e['ops'] for e in group])
    y = np.array([e['median_s'] for e in group]) * 1e6
    bars = [y - np.array([e['p10_s'] for e in group]) * 1e6,
            np.array([e['p90_s'] for e in group]) * 1e6 - y]
    ax.errorbar(x, y, yerr=bars, fmt='o', ms=4, capsize=2, label=f'exits l = {depth} '
                '(median, p10-p90)')
    for e, xi, yi in zip(group, x, y):
      ax.annotate(f'{e["k"]},{e["l"]}', (xi, yi), textcoords='offset points',
                  xytext=(3, 3), fontsize=6)
  ops_all = np.array([e['ops'] for e in exits])
  fit = results['fit']
  line = np.geomspace(ops_all.min() / 1.3, ops_all.max() * 1.2, 100)
  ax.plot(line, (fit['overhead_s'] + fit['seconds_per_op'] * line) * 1e6, '-', color='k',
          lw=1, label=f'fit: {fit["overhead_s"] * 1e6:.1f} us + '
                      f'{fit["seconds_per_op"] * 1e12:.2f} ps/op')
  floor = results['dispatch_floor']['median_s'] * 1e6
  ax.axhline(floor, color='grey', ls='--', label=f'dispatch floor {floor:.1f} us')
  ax.set_xscale('log')
  ax.set_xlabel('counted ops per slot')
  ax.set_ylabel('per-slot latency (us)')
  ax.set_ylim(bottom=0.0)
  device = results.get('latency_table', {}).get('device', {})
  ax.set_title(f'Allocation DyNN exits (k, l), W = {results["width"]}, '
               f'{device.get("platform", "?")} ({device.get("device_kind", "?")})')
  ax.grid(alpha=0.3, which='both')
  ax.legend(fontsize=7, loc='upper left')
  save_png(fig, path)


def training_cost(study: dict, path: str) -> None:
  """The paper's Fig. 12 from `dynn_jax.cost_study.run_study`: training time to the
  quality bar per network kind, progressive shrinking against from scratch (median over
  seeds, bars from the fastest to the slowest seed), and the worst sub-network gap over
  training steps for the first seed."""
  results = study['results']
  kinds = list(dict.fromkeys(r['kind'] for r in results))
  first_seed = results[0]['seed'] if results else 0
  schedules = list(dict.fromkeys(r['schedule'] for r in results))
  fig = Figure(figsize=(10, 4), layout='constrained')
  bars, curves = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
  width = 0.38
  for j, schedule in enumerate(schedules):
    runs = [[r for r in results if r['kind'] == kind and r['schedule'] == schedule]
            for kind in kinds]
    seconds = [np.array([r['seconds'] for r in rs] or [0.0]) for rs in runs]
    median = [float(np.median(t)) for t in seconds]
    spread = np.array([[m - t.min() for m, t in zip(median, seconds)],
                       [t.max() - m for m, t in zip(median, seconds)]])
    drawn = bars.bar(np.arange(len(kinds)) + (j - 0.5) * width, median, width,
                     yerr=spread, capsize=3, label=schedule)
    for patch, rs in zip(drawn, runs):
      if not all(r['reached'] for r in rs):
        patch.set_hatch('//')  # a seed stopped at max_steps without reaching the bar
  bars.set_xticks(np.arange(len(kinds)), kinds)
  bars.set_ylabel('training seconds to the bar')
  bars.set_title(f'median of {len(study.get("seeds", [0]))} seeds; hatched: bar not reached',
                 fontsize=8)
  bars.legend(fontsize=8)
  for r in results:
    if r['history'] and r['seed'] == first_seed:
      steps = [h['step'] for h in r['history']]
      gaps = [max(h['worst_gap'], 1e-6) for h in r['history']]
      curves.plot(steps, gaps, '.-' if r['schedule'] == 'progressive' else '.--',
                  label=f'{r["kind"]}, {r["schedule"]}')
  curves.axhline(study['bar'], color='grey', lw=1, label=f'bar {study["bar"]:g}')
  curves.set_yscale('log')
  curves.set_xlabel(f'training steps (seed {first_seed})')
  curves.set_ylabel('worst sub-network gap to the optimum')
  curves.legend(fontsize=7)
  speedups = ', '.join(f'{k} {v:.2f}x' for k, v in study.get('speedup', {}).items())
  fig.suptitle('Progressive shrinking vs from scratch, speed of progressive '
               f'({speedups or "none: a bar missed"})')
  save_png(fig, path)


def sweep(points: list[dict], sweep_def: tuple, path: str, title: str = '') -> None:
  """Mean delay (ms), miss ratio (%) and objective of every method along one sweep, with
  CI95; networks trained on the objective (`obj_*`) dashed, the objective's lower bound
  (when the oracle ran) dotted."""
  _, _, label, value_scale = sweep_def
  x = np.array([p['value'] for p in points], dtype=float) * value_scale
  methods = list(points[0]['results'].names)
  fig = Figure(figsize=(15, 4.2), layout='constrained')
  axes = fig.subplots(1, 3)
  # More methods than the default cycle has colours: tab20 keeps each one distinct.
  colours = dict(zip(methods, matplotlib.colormaps['tab20'].colors))
  for ax, metric, scale, ylabel in ((axes[0], 'mean_delay', 1e3, 'mean service delay (ms)'),
                                    (axes[1], 'miss_ratio', 100.0, 'deadline misses (%)'),
                                    (axes[2], 'objective', 1.0, 'objective per slot')):
    for method in methods:
      y = np.array([p['results'][method][metric]['mean'] for p in points]) * scale
      err = np.array([p['results'][method][metric]['ci95'] for p in points]) * scale
      ax.errorbar(x, y, yerr=err, marker='o', ms=3, capsize=2, label=method,
                  color=colours[method], ls='--' if method.startswith('obj_') else '-')
    if metric == 'objective' and points[0]['results'].bound is not None:
      ax.plot(x, [p['results'].bound['mean'] for p in points], ':',
              color='k', label='lower bound')
    ax.set_xlabel(label)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
  axes[2].legend(fontsize=6)
  fig.suptitle(title)
  save_png(fig, path)



def exit_grids(studies: dict, models: dict, path: str) -> None:
  """Fig. 4 for each pipeline and data size: every exit's value relative to the full
  exit without inference delay (%), against k, one line per depth, solid without and
  dashed with inference delay (from `exit_study.exit_study`)."""
  rows, cols = len(studies), max(len(s['sizes']) for s in studies.values())
  fig = Figure(figsize=(3.2 * cols, 2.8 * rows))
  axes = np.atleast_2d(fig.subplots(rows, cols, squeeze=False))
  for r, (pipeline, study) in enumerate(studies.items()):
    model, metric = models[pipeline], LOSS_METRIC[study['loss']]
    for c, size in enumerate(study['sizes']):
      ax = axes[r, c]
      none = exit_grid(EvalResult.from_dict(study['none'][c]), model, metric)
      base = none[-1][-1]
      ks = np.arange(1, model.num_experts + 1)
      for mode, style in zip(study['modes'], ('-', '--')):
        grid = np.asarray(exit_grid(EvalResult.from_dict(study[mode][c]), model, metric))
        for l in range(model.max_depth):
          ax.plot(ks, 100 * (grid[:, l] / base - 1), style, marker='o', ms=2,
                  color=f'C{l}', label=f'l = {l + 1}, {mode}')
      ax.set_title(f'{pipeline}, {size * 1e-3:g} kbit', fontsize=8)
      ax.set_xlabel('experts k', fontsize=7)
      ax.set_ylabel(f'{metric} vs full exit (%)', fontsize=7)
      ax.tick_params(labelsize=6)
      ax.grid(alpha=0.3)
  axes[0, 0].legend(fontsize=5)
  save_png(fig, path)
