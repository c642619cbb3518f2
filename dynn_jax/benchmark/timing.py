"""One wall-clock timer for every suite, and the table of its results.

Owns `Timing` (median, p10, p90 of single calls, the call count and the compile time
measured apart), ahead-of-time compilation (`compile_ahead`) and the interleaved timer
`time_interleaved`: functions are warmed up, then called in shuffled round-robin
rounds, each call timed on its own with `block_until_ready`. `time_calls` and
`benchmark` are that timer with one function. It must not know any suite: what is
timed, on which inputs and how the figures are read belong to the suites.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, NamedTuple

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


class Entry(NamedTuple):
  """One function for `time_interleaved`: called as `fn(*args)`."""
  fn: Callable
  args: tuple
  min_calls: int = 1
  compile_s: float = 0.0


def compile_ahead(fn: Callable, *args: Any) -> tuple[Callable, float]:
  """jit + lower + compile `fn` for `args`; returns the executable and compile seconds."""
  start = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  return compiled, time.perf_counter() - start


def time_interleaved(entries: dict, *, min_seconds: float, round_seconds: float = 0.02,
                     warmup: int = 3, max_calls: int = 100_000, seed: int = 0
                     ) -> dict[Any, Timing]:
  """Times functions in shuffled round-robin rounds, not one after another.

  `entries`: {name: Entry(fn, args, min_calls, compile_s)} (or plain 4-tuples). After
  `warmup` untimed calls each, every round gives every function about `round_seconds`
  of back-to-back calls (at least one), each call timed on its own with
  `block_until_ready`; a function leaves the rounds once it has `min_calls` calls and
  `min_seconds` of call time, or `max_calls` calls. On a shared machine the load
  drifts over a run: timed one after another, two functions can differ by 2x from the
  load alone, while interleaved they see the same mix, so their ratios mean something.
  """
  entries = {name: Entry(*entry) for name, entry in entries.items()}
  rng = np.random.default_rng(seed)
  for entry in entries.values():
    for _ in range(warmup):
      jax.block_until_ready(entry.fn(*entry.args))
  times = {name: [] for name in entries}
  estimate = {name: None for name in entries}  # None: one call, then size the rounds
  pending = list(entries)
  while pending:
    for i in rng.permutation(len(pending)):
      name = pending[i]
      fn, args = entries[name].fn, entries[name].args
      calls = 1 if estimate[name] is None else max(
          1, int(round_seconds / max(estimate[name], 1e-7)))
      got = times[name]
      for _ in range(calls):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        got.append(time.perf_counter() - start)
      estimate[name] = float(np.median(got[-calls:]))
    pending = [name for name in pending
               if len(times[name]) < max_calls
               and (len(times[name]) < entries[name].min_calls
                    or sum(times[name]) < min_seconds)]
  out = {}
  for name, got in times.items():
    got = np.asarray(got)
    out[name] = Timing(median_s=float(np.median(got)), p10_s=float(np.percentile(got, 10)),
                       p90_s=float(np.percentile(got, 90)), calls=int(got.size),
                       compile_s=entries[name].compile_s)
  return out


def time_calls(compiled: Callable, *args: Any, min_calls: int = 20, min_seconds: float = 0.5,
               max_calls: int = 100_000, warmup: int = 3, compile_s: float = 0.0) -> Timing:
  """Times repeated calls of an already compiled function on fixed inputs: the
  interleaved timer with one function, so its rounds are back-to-back calls."""
  return time_interleaved({0: Entry(compiled, args, min_calls, compile_s)},
                          min_seconds=min_seconds, max_calls=max_calls, warmup=warmup)[0]


def benchmark(fn: Callable, *args: Any, **kwargs) -> Timing:
  """Compiles `fn` ahead of time for `args`, then times it (see `time_calls`)."""
  compiled, compile_s = compile_ahead(fn, *args)
  return time_calls(compiled, *args, compile_s=compile_s, **kwargs)


def timed(timing: Timing, **extra) -> dict:
  """A timing as a JSON-ready dict, with `extra` fields beside it."""
  return {**timing.to_dict(), **extra}


def format_table(results: dict) -> str:
  """One line per benchmark: median, p10, p90 per item and the rate."""
  lines = [f'{"benchmark":32s} {"median":>12s} {"p10":>12s} {"p90":>12s} {"items/s":>12s}'
           f' {"compile s":>10s}']
  for name, r in results.items():
    if not isinstance(r, dict) or 'median_s' not in r:
      continue
    lines.append(f'{name:32s} {format_seconds(r["median_s"]):>12s} '
                 f'{format_seconds(r["p10_s"]):>12s} {format_seconds(r["p90_s"]):>12s} '
                 f'{r.get("slots_per_s", 1 / r["median_s"]):12.4g} {r["compile_s"]:10.2f}')
  return '\n'.join(lines)


def format_seconds(seconds: float) -> str:
  if seconds >= 1:
    return f'{seconds:.3f} s'
  if seconds >= 1e-3:
    return f'{seconds * 1e3:.3f} ms'
  return f'{seconds * 1e6:.2f} us'
