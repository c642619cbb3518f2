"""What a measurement ran on and under: the device, the runtime settings, the load.

The device's identity (platform, device kind, jax version) is `dynn_jax.latency`'s
`current_device`, the key a latency table is versioned by; this module adds what
describes the host around it and never defines a second device key.
"""

from __future__ import annotations

import os
import platform

import jax

from dynn_jax import latency


def device_info() -> dict:
  return {**latency.current_device(), 'device_count': jax.device_count(),
          'machine': platform.machine(), 'processor': platform.processor(),
          'cpu_count': os.cpu_count(), **runtime_info()}


def runtime_info() -> dict:
  """Runtime settings that move per-call latency (they are not part of the device key)."""
  return {'cpu_async_dispatch': bool(jax.config.read('jax_cpu_enable_async_dispatch')),
          'xla_flags': os.environ.get('XLA_FLAGS', '')}


def host_load() -> dict:
  """Load averages: latencies on a shared machine are only comparable at a known load."""
  one, five, fifteen = os.getloadavg()
  return {'load_1m': one, 'load_5m': five, 'load_15m': fifteen, 'cpu_count': os.cpu_count()}


def load_line(start: dict, end: dict) -> str:
  """The load a suite ran under, from `host_load()` at its start and end."""
  return (f'load average (1 min) {start["load_1m"]:.2f} -> {end["load_1m"]:.2f} on '
          f'{start["cpu_count"]} cores')


def target_lines(targets: dict) -> list[str]:
  """One line per recorded target: value, target, met or missed (never asserted)."""
  return [f'{name:34s} {t["value"]:10.4g}  target {t["target"]:10s} '
          f'{"met" if t["met"] else "MISSED"}' for name, t in targets.items()]
