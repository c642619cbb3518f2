"""The run directory: resolved config, metrics, atomic checkpoints, progress, summary.

  run_dir/config.json        everything needed to rerun (written once, checked on resume)
  run_dir/metrics.jsonl      one JSON record per logged step
  run_dir/checkpoints/<name>.msgpack   latest state of each training phase (atomic,
                             checksummed)
  run_dir/summary.json       final figures
  run_dir/run.lock           {pid, host, ...} of the process using the directory

One process at a time uses a run directory (`RunDir.locked`): the lock file is created
with O_CREAT | O_EXCL; a lock left by a process that died on this host is reported and
taken over; a live one (or one from another host) is refused. Taking the lock also
removes the temporary files a killed atomic write left behind. On resume each phase
cuts `metrics.jsonl` back to its last checkpointed step (`rewind_metrics`), so the
file holds the records of an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import sys
import time
from typing import Any

import jax
import numpy as np
from flax import serialization

from dynn_jax.io import (ChecksumError, NonFiniteError, append_jsonl, is_temporary, read_json,
                         seal, unseal, write_bytes_atomic, write_json_atomic)

LOCK_NAME = 'run.lock'
# A lock file still empty this long after its creation was left by a process that died
# between creating and writing it (the two happen back to back).
_EMPTY_LOCK_GRACE_S = 5.0


class RunDirError(ValueError):
  """A run directory that cannot be used as asked (in use, other config, ...)."""


def proc_start(pid: int) -> str | None:
  """The process's start time in clock ticks since boot (Linux), to tell a reused pid
  from the process that wrote a lock."""
  try:
    with open(f'/proc/{pid}/stat') as f:
      return f.read().rsplit(')', 1)[1].split()[19]
  except (OSError, IndexError):
    return None


def _lock_info() -> dict:
  pid = os.getpid()
  return {'pid': pid, 'host': socket.gethostname(), 'proc_start': proc_start(pid),
          'started': time.strftime('%Y-%m-%d %H:%M:%S'), 'token': secrets.token_hex(8)}


def _read_lock(path: str) -> dict | None:
  """The lock's content; None if it is missing, empty or unreadable after a short wait
  (a writer may be between creating it and writing its content)."""
  for _ in range(10):
    try:
      with open(path) as f:
        info = json.loads(f.read())
      if isinstance(info, dict) and isinstance(info.get('pid'), int):
        return info
    except FileNotFoundError:
      return None
    except (OSError, ValueError):
      pass
    time.sleep(0.05)
  return None


def _holder_state(info: dict | None, path: str) -> str:
  """'live', 'dead' or 'unknown' (another host) for the process that wrote a lock."""
  if info is None:
    try:
      age = time.time() - os.path.getmtime(path)
    except OSError:
      return 'dead'
    return 'dead' if age > _EMPTY_LOCK_GRACE_S else 'live'
  if info.get('host') != socket.gethostname():
    return 'unknown'
  pid = info['pid']
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return 'dead'
  except PermissionError:
    pass  # another user's process: alive
  recorded = info.get('proc_start')
  if recorded is not None and proc_start(pid) not in (None, recorded):
    return 'dead'  # the pid now belongs to another process
  return 'live'


def _describe(info: dict | None) -> str:
  if info is None:
    return 'a process that left it empty'
  return f'pid {info["pid"]} on host {info.get("host")!r} (since {info.get("started")})'


def check_not_in_use(path: str, own_token: str | None = None) -> None:
  """RunDirError if a live process (or one on another host) holds the directory; a lock
  with `own_token` is the caller's own."""
  lock = os.path.join(path, LOCK_NAME)
  if not os.path.exists(lock):
    return
  info = _read_lock(lock)
  if own_token is not None and info is not None and info.get('token') == own_token:
    return
  state = _holder_state(info, lock)
  if state == 'live':
    raise RunDirError(f'run directory {path} is in use by {_describe(info)}: wait for that '
                      'run to end (or stop it) before starting or resuming a run here')
  if state == 'unknown':
    raise RunDirError(f'run directory {path} is locked by {_describe(info)}, which cannot be '
                      f'checked from here; if no run is using it, delete {lock}')


def has_checkpoints(path: str) -> bool:
  folder = os.path.join(path, 'checkpoints')
  return os.path.isdir(folder) and any(
      name.endswith('.msgpack') and not is_temporary(name) for name in os.listdir(folder))


def check_start(path: str, config: dict, resume: bool, own_token: str | None = None) -> str:
  """What starting a run in `path` with `config` would do, without touching anything
  (so that --dry_run checks what the run would refuse): 'new', 'resume' or 'restart'
  (a run that failed before its first checkpoint, started again from scratch).

  Raises RunDirError for a directory in use, a finished or checkpointed run without
  `resume`, or `resume` with a config other than the recorded one.
  """
  if os.path.exists(path) and not os.path.isdir(path):
    raise RunDirError(f'--run_dir {path} is a file, not a folder')
  check_not_in_use(path, own_token)
  config_path = os.path.join(path, 'config.json')
  if not os.path.exists(config_path):
    return 'new'
  if not has_checkpoints(path):
    return 'restart'  # nothing to lose: no phase got as far as a checkpoint
  if not resume:
    raise RunDirError(f'{path} already holds a run; pass --resume to continue it or choose '
                      'another --run_dir')
  folder = os.path.join(path, 'checkpoints')
  for name in sorted(os.listdir(folder)):  # a damaged one is refused before any work
    if name.endswith('.msgpack') and not is_temporary(name):
      checkpoint_body(os.path.join(folder, name))
  try:
    recorded = read_json(config_path, 'run config')
  except ValueError as e:  # corrupt, edited or not JSON
    raise RunDirError(f'--resume: {e}') from None
  normalised = json.loads(json.dumps(config, sort_keys=True))
  if not isinstance(recorded, dict):
    raise RunDirError(f'--resume: {config_path} is not a run config')
  diff = sorted(k for k in set(recorded) | set(normalised)
                if recorded.get(k) != normalised.get(k))
  if diff:
    raise RunDirError(f'--resume: {config_path} was written with a different config; '
                      f'differing fields: {diff}')
  return 'resume'


def _damaged(path: str, problem: str) -> RunDirError:
  name = os.path.splitext(os.path.basename(path))[0]
  return RunDirError(f'checkpoint {path} {problem}: delete it to train phase {name!r} '
                     'again from its start (--resume keeps the other phases), or put back '
                     'a good copy')


def checkpoint_body(path: str) -> bytes:
  """The checked bytes of a checkpoint file; RunDirError (`_damaged`) for a folder, an
  empty, unreadable, truncated or corrupt file."""
  if os.path.isdir(path):
    raise _damaged(path, 'is a folder, not a file')
  try:
    with open(path, 'rb') as f:
      data = f.read()
  except OSError as e:
    raise _damaged(path, f'cannot be read ({e.strerror})') from None
  if not data:
    raise _damaged(path, 'is empty')
  try:
    return unseal(data, path, 'checkpoint')
  except ChecksumError as e:
    raise _damaged(path, str(e).split(f'checkpoint {path} ', 1)[-1]) from None


def _shape_mismatch(state: Any, target: Any) -> str | None:
  """The first array of `target` whose restored counterpart in `state` has another
  shape or dtype (or is missing), as 'path: saved shape dtype, expected shape dtype'."""
  saved = {jax.tree_util.keystr(p): leaf
           for p, leaf in jax.tree_util.tree_flatten_with_path(state)[0]}
  for p, want in jax.tree_util.tree_flatten_with_path(target)[0]:
    if not hasattr(want, 'shape'):
      continue  # a Python number: nothing to compare
    key = jax.tree_util.keystr(p)
    if key not in saved:
      return f'{key} is missing'
    got = saved[key]
    dtypes_differ = hasattr(got, 'dtype') and np.dtype(got.dtype) != np.dtype(want.dtype)
    if np.shape(got) != tuple(want.shape) or dtypes_differ:
      described = lambda a: f'{tuple(np.shape(a))} {getattr(a, "dtype", type(a).__name__)}'
      return f'{key} saved as {described(got)}, expected {described(want)}'
  return None


def _metrics_record(line: bytes) -> dict | None:
  """The record of one metrics.jsonl line; None for a torn (no newline) or bad line."""
  if not line.endswith(b'\n'):
    return None
  try:
    record = json.loads(line)
  except ValueError:  # not JSON, or not UTF-8
    return None
  return record if isinstance(record, dict) else None


class RunDir:
  def __init__(self, path: str):
    self.path = path
    os.makedirs(os.path.join(path, 'checkpoints'), exist_ok=True)
    self._lock_depth = 0
    self._lock_token = None

  def file(self, name: str) -> str:
    return os.path.join(self.path, name)

  # ----------------------------------------------------------------- the lock

  @property
  def holds_lock(self) -> bool:
    return self._lock_depth > 0

  @contextlib.contextmanager
  def locked(self):
    """Holds the directory's lock for the block (re-entrant on this object)."""
    if self._lock_depth == 0:
      self._acquire()
    self._lock_depth += 1
    try:
      yield self
    finally:
      self._lock_depth -= 1
      if self._lock_depth == 0:
        self._release()

  def _acquire(self) -> None:
    lock = self.file(LOCK_NAME)
    info = _lock_info()
    for _ in range(5):
      try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        self._take_over_if_stale(lock)
        continue
      with os.fdopen(fd, 'w') as f:
        f.write(json.dumps(info))
        f.flush()
        os.fsync(f.fileno())
      self._lock_token = info['token']
      self._remove_temporary_files()
      return
    raise RunDirError(f'run directory {self.path}: could not take {lock} (other processes '
                      'keep taking it); try again')

  def _take_over_if_stale(self, lock: str) -> None:
    """Removes a lock whose process is gone (RunDirError for a live one)."""
    check_not_in_use(self.path)
    stale = _read_lock(lock)
    # Moved aside, not deleted: if another process replaced the stale lock by its own in
    # the meantime, what we moved is not what we judged stale and goes back.
    aside = f'{lock}.stale.{os.getpid()}.{secrets.token_hex(4)}'
    try:
      os.rename(lock, aside)
    except FileNotFoundError:
      return
    moved = _read_lock(aside)
    if moved is not None and (stale is None or moved.get('token') != stale.get('token')):
      try:
        os.link(aside, lock)
      except FileExistsError:
        pass  # a third process holds it now; the check below reports it
      finally:
        os.remove(aside)
      check_not_in_use(self.path)
      return
    os.remove(aside)
    print(f'run directory {self.path}: taking over the lock left by {_describe(stale)}, '
          'which is no longer running', file=sys.stderr, flush=True)

  def _release(self) -> None:
    lock = self.file(LOCK_NAME)
    info = _read_lock(lock)
    if info is not None and info.get('token') == self._lock_token:
      os.remove(lock)
    self._lock_token = None

  def _remove_temporary_files(self) -> None:
    """Temporary files of atomic writes that a killed process left (the lock is held,
    so no live writer owns them)."""
    removed = []
    for folder in (self.path, os.path.join(self.path, 'checkpoints')):
      for name in os.listdir(folder):
        if is_temporary(name) and os.path.isfile(os.path.join(folder, name)):
          os.remove(os.path.join(folder, name))
          removed.append(os.path.join(folder, name))
    if removed:
      print(f'run directory {self.path}: removed {len(removed)} temporary file(s) left by '
            f'an interrupted write: {", ".join(removed)}', file=sys.stderr, flush=True)

  # ------------------------------------------------------------ config, metrics

  def write_config(self, config: dict, resume: bool) -> None:
    """Records the config; on resume it must equal the recorded one. A run that failed
    before its first checkpoint starts again (its config and metrics replaced)."""
    state = check_start(self.path, config, resume, self._lock_token)
    if state == 'resume':
      return
    if state == 'restart':
      print(f'run directory {self.path}: its run stopped before its first checkpoint; '
            'starting it again', file=sys.stderr, flush=True)
      for name in ('metrics.jsonl', 'summary.json'):
        if os.path.exists(self.file(name)):
          os.remove(self.file(name))
    write_json_atomic(self.file('config.json'), config)

  def log(self, record: dict) -> None:
    """Appends one record; NonFiniteError naming the phase, step and key of a NaN or
    infinite value (metrics.jsonl is strict JSON, like every file of the run)."""
    try:
      append_jsonl(self.file('metrics.jsonl'), record)
    except NonFiniteError as e:
      raise NonFiniteError(f'phase {record.get("phase")!r} step {record.get("step")}: '
                           f'{e}') from None

  def rewind_metrics(self, phase: str, step: int) -> None:
    """Cuts metrics.jsonl before the first record of `phase` beyond `step` (its last
    checkpoint: those steps run again). Before that, a line that is not a JSON record
    (torn by a full disk, garbage) is dropped alone, with a warning naming its line
    number: the records around it are never logged again."""
    path = self.file('metrics.jsonl')
    if not os.path.exists(path):
      return
    with open(path, 'rb') as f:
      lines = f.read().splitlines(keepends=True)
    kept, bad, cut = [], [], None
    for number, line in enumerate(lines, 1):
      record = _metrics_record(line)
      if record is None:
        bad.append(number)
      elif record.get('phase') == phase and record.get('step', 0) > step:
        cut = number
        break
      else:
        kept.append(line)
    if not bad and cut is None:
      return
    write_bytes_atomic(path, b''.join(kept))
    if bad:
      print(f'{path}: dropped line(s) {", ".join(map(str, bad))}: not a JSON record (torn '
            'or damaged); the records around them are kept', file=sys.stderr, flush=True)
    if cut is not None:
      print(f'{path}: dropped {len(lines) - cut + 1} line(s) from line {cut} on, logged '
            f'after the checkpoint of {phase} at step {step}; the resumed run logs those '
            'steps again', file=sys.stderr, flush=True)

  # ---------------------------------------------------------------- checkpoints

  def checkpoint_path(self, name: str) -> str:
    return os.path.join(self.path, 'checkpoints', f'{name}.msgpack')

  def save(self, name: str, state: Any) -> None:
    write_bytes_atomic(self.checkpoint_path(name), seal(serialization.to_bytes(state)))

  def restore(self, name: str, target: Any) -> Any | None:
    """The saved state shaped like `target`, or None when there is no checkpoint.

    RunDirError, one line naming the file and what to do, for a checkpoint that is a
    folder, empty, truncated or corrupt, or whose arrays differ in shape or dtype from
    `target`'s (a run with other network sizes): restored, it would fail deep inside
    the first step, or train another model than the one asked."""
    path = self.checkpoint_path(name)
    if not os.path.lexists(path):
      return None
    data = checkpoint_body(path)
    try:
      state = serialization.from_bytes(target, data)
    except Exception as e:  # msgpack and flax raise several kinds for bad bytes
      raise _damaged(path, f'is corrupt or from another model ({type(e).__name__}: '
                     f'{str(e).splitlines()[0] if str(e) else ""})') from None
    problem = _shape_mismatch(state, target)
    if problem:
      raise RunDirError(f'checkpoint {path} does not fit this run: {problem}; it was saved '
                        'by a run with other network sizes: resume with the flags of that '
                        'run, or use another --run_dir')
    return state

  def write_summary(self, summary: dict) -> None:
    write_json_atomic(self.file('summary.json'), summary)


class Progress:
  """Prints progress (training steps, evaluated slots: `unit`), metrics, rate and ETA
  at most every `every_s` seconds."""

  def __init__(self, label: str, total_steps: int, start_step: int = 0,
               every_s: float = 5.0, stream=sys.stdout, unit: str = 'step'):
    self.label, self.total, self.start_step = label, total_steps, start_step
    self.every_s, self.stream, self.unit = every_s, stream, unit
    self.t0 = self.last = time.perf_counter()
    self.done = start_step

  def add(self, count: int) -> None:
    """`count` more units done."""
    self.done += count
    self.update(self.done)

  def update(self, step: int, force: bool = False, **metrics: float) -> None:
    now = time.perf_counter()
    if not force and now - self.last < self.every_s and step < self.total:
      return
    self.last = now
    rate = (step - self.start_step) / max(now - self.t0, 1e-9)
    eta = (self.total - step) / rate if rate > 0 else float('inf')
    shown = ' '.join(f'{k}={v:.5g}' for k, v in metrics.items())
    print(f'[{self.label}] {self.unit} {step}/{self.total} {shown} {rate:.1f} {self.unit}s/s '
          f'ETA {eta:.0f}s', file=self.stream, flush=True)
