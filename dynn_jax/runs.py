"""The run directory: resolved config, metrics, atomic checkpoints, progress, summary.

  run_dir/config.json        everything needed to rerun (written once, checked on resume)
  run_dir/metrics.jsonl      one JSON record per logged step
  run_dir/checkpoints/<name>.msgpack   latest state of each training phase (atomic)
  run_dir/summary.json       final figures
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

from flax import serialization

from dynn_jax.io import append_jsonl, read_json, write_bytes_atomic, write_json_atomic


class RunDir:
  def __init__(self, path: str):
    self.path = path
    os.makedirs(os.path.join(path, 'checkpoints'), exist_ok=True)

  def file(self, name: str) -> str:
    return os.path.join(self.path, name)

  def write_config(self, config: dict, resume: bool) -> None:
    """Records the config; on resume it must equal the recorded one."""
    path = self.file('config.json')
    if resume and os.path.exists(path):
      recorded = read_json(path, 'run config')
      normalised = json.loads(json.dumps(config, sort_keys=True))
      diff = sorted(k for k in set(recorded) | set(normalised)
                    if recorded.get(k) != normalised.get(k))
      if diff:
        raise ValueError(f'--resume: {path} was written with a different config; '
                         f'differing fields: {diff}')
      return
    write_json_atomic(path, config)

  def log(self, record: dict) -> None:
    append_jsonl(self.file('metrics.jsonl'), record)

  def checkpoint_path(self, name: str) -> str:
    return os.path.join(self.path, 'checkpoints', f'{name}.msgpack')

  def save(self, name: str, state: Any) -> None:
    write_bytes_atomic(self.checkpoint_path(name), serialization.to_bytes(state))

  def restore(self, name: str, target: Any) -> Any | None:
    """The saved state shaped like `target`, or None when there is no checkpoint."""
    path = self.checkpoint_path(name)
    if not os.path.exists(path):
      return None
    with open(path, 'rb') as f:
      data = f.read()
    try:
      return serialization.from_bytes(target, data)
    except Exception as e:  # msgpack and flax raise several kinds for bad bytes
      raise ValueError(f'checkpoint {path} is corrupt or from another model: {e}') from None

  def write_summary(self, summary: dict) -> None:
    write_json_atomic(self.file('summary.json'), summary)


class Progress:
  """Prints step, loss, steps per second and ETA at most every `every_s` seconds."""

  def __init__(self, label: str, total_steps: int, start_step: int = 0,
               every_s: float = 5.0, stream=sys.stdout):
    self.label, self.total, self.start_step = label, total_steps, start_step
    self.every_s, self.stream = every_s, stream
    self.t0 = self.last = time.perf_counter()

  def update(self, step: int, force: bool = False, **metrics: float) -> None:
    now = time.perf_counter()
    if not force and now - self.last < self.every_s and step < self.total:
      return
    self.last = now
    rate = (step - self.start_step) / max(now - self.t0, 1e-9)
    eta = (self.total - step) / rate if rate > 0 else float('inf')
    shown = ' '.join(f'{k}={v:.5g}' for k, v in metrics.items())
    print(f'[{self.label}] step {step}/{self.total} {shown} {rate:.1f} steps/s '
          f'ETA {eta:.0f}s', file=self.stream, flush=True)
