"""Honest wall-clock timing of jitted functions.

Compile time is measured apart (ahead-of-time `lower().compile()`), then the compiled
function is warmed up and called until both `min_calls` and `min_seconds` are reached,
each call timed on its own with `block_until_ready`. Report medians and percentiles,
never a single run.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

import jax
import numpy as np


@dataclasses.dataclass(frozen=True)
class Timing:
  median_s: float
  p10_s: float
  p90_s: float
  calls: int
  compile_s: float

  def per_item(self, items: int) -> 'Timing':
    """The same timing divided by the number of items (e.g. slots) per call."""
    return dataclasses.replace(self, median_s=self.median_s / items,
                               p10_s=self.p10_s / items, p90_s=self.p90_s / items)

  def rate(self, items: int) -> float:
    """Items per second at the median."""
    return items / self.median_s

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


def compile_ahead(fn: Callable, *args: Any) -> tuple[Callable, float]:
  """jit + lower + compile `fn` for `args`; returns the executable and compile seconds."""
  start = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  return compiled, time.perf_counter() - start


def time_calls(compiled: Callable, *args: Any, min_calls: int = 20, min_seconds: float = 0.5,
               max_calls: int = 100_000, warmup: int = 3, compile_s: float = 0.0) -> Timing:
  """Times repeated calls of an already compiled function on fixed inputs."""
  for _ in range(warmup):
    jax.block_until_ready(compiled(*args))
  times = []
  start = time.perf_counter()
  while len(times) < max_calls and (len(times) < min_calls
                                    or time.perf_counter() - start < min_seconds):
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - t0)
  times = np.asarray(times)
  return Timing(median_s=float(np.median(times)), p10_s=float(np.percentile(times, 10)),
                p90_s=float(np.percentile(times, 90)), calls=len(times), compile_s=compile_s)


def benchmark(fn: Callable, *args: Any, **kwargs) -> Timing:
  """Compiles `fn` ahead of time for `args`, then times it (see `time_calls`)."""
  compiled, compile_s = compile_ahead(fn, *args)
  return time_calls(compiled, *args, compile_s=compile_s, **kwargs)
