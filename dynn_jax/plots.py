"""Figures as PNG files, drawn with matplotlib's Agg canvas.

`matplotlib.figure.Figure` is used directly rather than pyplot: no global backend or
figure state, so plotting works headless and inside tests.
"""

from __future__ import annotations

import io

import numpy as np
from matplotlib.figure import Figure

from dynn_jax.io import write_bytes_atomic


def save_png(fig: Figure, path: str, dpi: int = 150) -> None:
  """Writes the figure atomically (a killed run never leaves half a PNG)."""
  buffer = io.BytesIO()
  fig.savefig(buffer, format='png', dpi=dpi, bbox_inches='tight')
  write_bytes_atomic(path, buffer.getvalue())


def latency_vs_ops(results: dict, path: str) -> None:
  """Per-slot latency (us) of every exit against its counted ops, from `exits_suite`.

  Points carry their (k, l) and p10-p90 bars; the fitted line and the dispatch floor
  show how much of each exit's time is fixed cost.
  """
  exits = results['exits']
  x = np.array([e['ops'] for e in exits])
  y = np.array([e['median_s'] for e in exits]) * 1e6
  low = y - np.array([e['p10_s'] for e in exits]) * 1e6
  high = np.array([e['p90_s'] for e in exits]) * 1e6 - y
  fig = Figure(figsize=(7, 4.5))
  ax = fig.add_subplot()
  ax.errorbar(x, y, yerr=[low, high], fmt='o', ms=4, capsize=2, label='exit (k, l): median, p10-p90')
  for e, xi, yi in zip(exits, x, y):
    ax.annotate(f'({e["k"]},{e["l"]})', (xi, yi), textcoords='offset points', xytext=(3, 3),
                fontsize=7)
  fit = results['fit']
  line = np.linspace(0.0, x.max() * 1.05, 50)
  ax.plot(line, (fit['overhead_s'] + fit['seconds_per_op'] * line) * 1e6, '-',
          label=f'fit: {fit["overhead_s"] * 1e6:.1f} us + {fit["seconds_per_op"] * 1e12:.2f} '
                'ps/op')
  floor = results['dispatch_floor']['median_s'] * 1e6
  ax.axhline(floor, color='grey', ls='--', label=f'dispatch floor {floor:.1f} us')
  ax.set_xlabel('counted ops per slot')
  ax.set_ylabel('per-slot latency (us)')
  ax.set_ylim(bottom=0.0)
  device = results.get('latency_table', {}).get('device', {})
  ax.set_title(f'Allocation DyNN exits, W = {results["width"]}, '
               f'{device.get("platform", "?")} {device.get("device_kind", "")}')
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8, loc='upper left')
  save_png(fig, path)
