"""Files written so that a killed run never leaves a half-written one behind."""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Callable


def write_bytes_atomic(path: str, data: bytes) -> None:
  """Writes to a temporary file in the same folder, fsyncs, then renames over `path`."""
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, prefix='.' + os.path.basename(path) + '.')
  try:
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; results are meant to be shared
    with os.fdopen(fd, 'wb') as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def write_json_atomic(path: str, obj: Any) -> None:
  write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=True, default=_jsonable)
                            + '\n').encode())


def _jsonable(value):
  if hasattr(value, 'tolist'):
    return value.tolist()
  raise TypeError(f'cannot write {type(value).__name__} as JSON')


def read_json(path: str, what: str = 'file') -> Any:
  """Loads JSON with an error that names the file and what it should have been."""
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    raise FileNotFoundError(f'{what} not found: {path}') from None
  except json.JSONDecodeError as e:
    raise ValueError(f'{what} {path} is not valid JSON ({e}); it may be corrupt') from None


def append_jsonl(path: str, record: dict) -> None:
  """One metrics record per line; a line is written whole or not at all by one write()."""
  line = json.dumps(record, sort_keys=True, default=_jsonable) + '\n'
  with open(path, 'a') as f:
    f.write(line)
    f.flush()


def cached_json(path: str, compute: Callable[[], Any], label: str,
                valid: Callable[[Any], bool] | None = None) -> Any:
  """The JSON at `path` if it exists (and passes `valid`), else `compute()` written
  atomically: a killed study resumes without redoing finished parts."""
  if os.path.exists(path):
    value = read_json(path, label)
    if valid is None or valid(value):
      return value
    print(f'{label} at {path} was made with other settings: recomputing', flush=True)
  print(f'computing {label}', flush=True)
  value = compute()
  write_json_atomic(path, value)
  return value
