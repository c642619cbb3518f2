"""Files written so that a killed run never leaves a half-written one behind, and read
back so that a damaged one is refused rather than used.

Every file the project writes carries a sha256 of its content, checked on load:
  * JSON (`write_json_atomic` / `read_json`): a top-level "sha256" field over the
    canonical form of the rest (sorted keys, no spaces), so the file stays plain JSON
    that any reader can open; `read_json` checks and removes it.
  * binary (`seal` / `unseal`, for msgpack networks and checkpoints): a two-field
    msgpack map {"sha256": hex, "body": bytes} around the original bytes.
Files without a checksum (written before checksums existed) still load unchecked.

JSON output is strict: NaN and Infinity are refused with the key path of the value
(`NonFiniteError`), so a failed metric is an error, never a number in a results file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import tempfile
from typing import Any, Callable

import jax
import msgpack
import numpy as np

CHECKSUM_KEY = 'sha256'
# msgpack of a map of two entries whose first key is "sha256": how a sealed file starts.
_SEAL_PREFIX = b'\x82\xa6' + CHECKSUM_KEY.encode()


class ChecksumError(ValueError):
  """A file whose content does not match the checksum written with it."""


class NonFiniteError(ValueError):
  """A NaN or infinite number on its way into a JSON file."""


class SchemaError(ValueError):
  """A value read back from a file without the structure its writer gives it."""


def write_bytes_atomic(path: str, data: bytes) -> None:
  """Writes to a temporary file in the same folder, fsyncs, then renames over `path`.

  The temporary file is named '.' + basename + '.' + 8 random characters
  (`is_temporary`): a run directory removes the ones a killed writer left. A symlink
  is written through: the rename replaces its target (in the target's folder), so the
  link stays a link and whatever else reads the target sees the new content.
  """
  path = os.path.realpath(path)
  folder = os.path.dirname(path)
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
  except BaseException as e:
    if os.path.exists(tmp):
      os.remove(tmp)
    if isinstance(e, OSError) and e.errno is not None and not e.filename:
      # A failed write of an open file (a full disk) names no file: name the one meant.
      raise OSError(e.errno, e.strerror, path) from None
    raise


def is_temporary(name: str) -> bool:
  """Whether a file name is one of `write_bytes_atomic`'s temporary files."""
  base, dot, suffix = name.rpartition('.')
  return (name.startswith('.') and bool(dot) and len(base) > 1 and len(suffix) == 8
          and all(c in 'abcdefghijklmnopqrstuvwxyz0123456789_' for c in suffix))


# ------------------------------------------------------------------ binary checksums


def seal(body: bytes) -> bytes:
  """`body` wrapped with its sha256 (see the module docstring)."""
  return msgpack.packb({CHECKSUM_KEY: hashlib.sha256(body).hexdigest(), 'body': body},
                       use_bin_type=True)


def unseal(data: bytes, path: str, what: str) -> bytes:
  """The body of a sealed file after checking its sha256; an unsealed (older) file's
  bytes unchanged."""
  if not data.startswith(_SEAL_PREFIX):
    return data
  try:
    sealed = msgpack.unpackb(data, raw=False)
    digest, body = sealed[CHECKSUM_KEY], sealed['body']
    if not isinstance(digest, str) or not isinstance(body, bytes) or len(sealed) != 2:
      raise ValueError('unexpected fields')
  except Exception as e:  # msgpack raises several kinds for bad bytes
    raise ChecksumError(f'{what} {path} is corrupt: its checksummed envelope cannot be '
                        f'read ({type(e).__name__}: {e})') from None
  if hashlib.sha256(body).hexdigest() != digest:
    raise ChecksumError(f'{what} {path} is corrupt: its content does not match the sha256 '
                        'checksum written with it')
  return body


# ------------------------------------------------------------------------- JSON


def _key_path(path: str, key) -> str:
  return f'{path}.{key}' if path else str(key)


def _json_key(key) -> str:
  """The string json.dumps makes of a dict key (so that a value and the JSON read back
  from it have the same canonical form)."""
  if isinstance(key, str):
    return key
  if key is True or key is False or key is None:
    return json.dumps(key)
  if isinstance(key, (int, float)):
    return json.dumps(key.item() if hasattr(key, 'item') else key)
  raise TypeError(f'cannot write a {type(key).__name__} dict key as JSON')


def to_plain(value: Any, path: str = '') -> Any:
  """`value` as dicts, lists, str, int, float, bool and None only; NonFiniteError
  naming the key path of any NaN or infinity (e.g. 'results.oracle.delay.mean')."""
  if isinstance(value, dict):
    return {_json_key(k): to_plain(v, _key_path(path, k)) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [to_plain(v, f'{path}[{i}]') for i, v in enumerate(value)]
  if value is None or isinstance(value, (str, bool)):
    return value
  if isinstance(value, int):
    return int(value)
  if isinstance(value, float):
    if not math.isfinite(value):
      raise NonFiniteError(f'{path or "<value>"} = {float(value)!r}: JSON output must be '
                           'finite (strict JSON has no NaN or Infinity)')
    return float(value)
  if dataclasses.is_dataclass(value) and not isinstance(value, type):
    return to_plain(dataclasses.asdict(value), path)
  if hasattr(value, 'tolist'):  # numpy / jax arrays and scalars
    return to_plain(value.tolist(), path)
  raise TypeError(f'{path or "<value>"}: cannot write {type(value).__name__} as JSON')


def _canonical(plain: Any) -> bytes:
  return json.dumps(plain, sort_keys=True, separators=(',', ':'), ensure_ascii=True,
                    allow_nan=False).encode()


def _digest(plain: Any) -> str:
  return hashlib.sha256(_canonical(plain)).hexdigest()


def json_bytes(obj: Any, where: str = '') -> bytes:
  """Strict, indented JSON of `obj`, with a checksum field when `obj` is a dict."""
  try:
    plain = to_plain(obj)
  except NonFiniteError as e:
    raise NonFiniteError(f'{where}: {e}' if where else str(e)) from None
  if isinstance(plain, dict):
    if CHECKSUM_KEY in plain:
      raise ValueError(f'{where}: the field {CHECKSUM_KEY!r} is reserved for the checksum')
    plain = {**plain, CHECKSUM_KEY: _digest(plain)}
  return (json.dumps(plain, indent=2, sort_keys=True, allow_nan=False) + '\n').encode()


def write_json_atomic(path: str, obj: Any) -> None:
  """Strict JSON (NonFiniteError names the key path of a NaN or infinity, before
  anything is written) with its checksum, written atomically."""
  write_bytes_atomic(path, json_bytes(obj, f'not writing {path}'))


def _refuse_constant(name: str):
  raise ValueError(f'{name} is not a JSON number')


def read_json(path: str, what: str = 'file') -> Any:
  """Loads JSON with an error that names the file and what it should have been; checks
  and removes the checksum field of a file `write_json_atomic` wrote."""
  try:
    with open(path, 'rb') as f:
      raw = f.read()
    value = json.loads(raw.decode('utf-8'), parse_constant=_refuse_constant)
  except FileNotFoundError:
    raise FileNotFoundError(f'{what} not found: {path}') from None
  except IsADirectoryError:
    raise ValueError(f'{what} {path} is a folder, not a file') from None
  except (UnicodeDecodeError, ValueError) as e:  # JSONDecodeError is a ValueError
    raise ValueError(f'{what} {path} is not valid JSON ({e}); it may be corrupt') from None
  if isinstance(value, dict) and CHECKSUM_KEY in value:
    value = dict(value)
    recorded = value.pop(CHECKSUM_KEY)
    if recorded != _digest(value):
      raise ChecksumError(f'{what} {path} is corrupt or was edited: its content does not '
                          f'match the sha256 checksum written with it (to accept a '
                          f'deliberate edit, delete its "{CHECKSUM_KEY}" field)')
  return value


def append_jsonl(path: str, record: dict) -> None:
  """One metrics record per line; a line is written whole or not at all by one write().
  Strict JSON like every other file: NonFiniteError names the key of a NaN or infinity
  before anything is written (a bare NaN would make the line unreadable to strict
  readers, and the run's own resume would drop it)."""
  try:
    plain = to_plain(record)
  except NonFiniteError as e:
    raise NonFiniteError(f'not logging to {path}: {e}') from None
  line = json.dumps(plain, sort_keys=True, allow_nan=False) + '\n'
  with open(path, 'a') as f:
    f.write(line)
    f.flush()


def cached_json(path: str, compute: Callable[[], Any], label: str,
                valid: Callable[[Any], bool] | None = None, schema: Any = None,
                stale: Callable[[Any], str | None] | None = None) -> Any:
  """The JSON at `path` if it exists (and passes `valid`), else `compute()` written
  atomically: a killed study resumes without redoing finished parts.

  `stale`, instead of `valid`, says why a value read back must be recomputed (None: it
  is current), and the message printed says so. A file read back is checked against
  `schema` (`check_schema`): a damaged or foreign part is refused with the field named,
  never reported.
  """
  if os.path.exists(path):
    value = read_json(path, label)
    if stale is not None:
      reason = stale(value)
    else:
      reason = None if valid is None or valid(value) else 'was made with other settings'
    if reason is None:
      if schema is not None:
        check_schema(value, schema, f'{label} {path}')
      return value
    print(f'{label} at {path} {reason}: recomputing', flush=True)
  print(f'computing {label}', flush=True)
  value = compute()
  write_json_atomic(path, value)
  return value


# ----------------------------------------------------------------------- schemas
#
# A schema is
#   a type (str, bool, int, float, dict, list): isinstance, where bool is not an int,
#     an int is a float, and a float must be finite;
#   {key: schema}: a JSON object with at least these keys (`Optional(s)`: may be absent);
#   [schema]: a non-empty list of items (`ListOf(s, min_len=0)` allows an empty one);
#   (s1, s2, ...): a list of exactly these items;
#   Number / Integer / OneOf / DictOf below.


@dataclasses.dataclass(frozen=True)
class Optional:
  schema: Any


@dataclasses.dataclass(frozen=True)
class ListOf:
  item: Any
  min_len: int = 1


@dataclasses.dataclass(frozen=True)
class DictOf:
  """A JSON object with any keys, every value matching `value`."""
  value: Any
  min_len: int = 0


@dataclasses.dataclass(frozen=True)
class OneOf:
  choices: tuple


@dataclasses.dataclass(frozen=True)
class Number:
  """A finite number in [low, high] (`low_open`: in (low, high])."""
  low: float | None = None
  high: float | None = None
  low_open: bool = False
  integer: bool = False


def Integer(low: int | None = None, high: int | None = None) -> Number:  # noqa: N802
  return Number(low, high, integer=True)


def _kind(value) -> str:
  if value is None:
    return 'null'
  if isinstance(value, (bool, int, float)):
    return f'{type(value).__name__} {value!r}'
  return {dict: 'an object', list: 'a list', str: 'a string'}.get(type(value),
                                                                  type(value).__name__)


def check_schema(value: Any, schema: Any, where: str) -> None:
  """SchemaError naming `where` and the field (e.g. 'results[0].history') where `value`
  departs from `schema` (see above)."""
  _check(value, schema, where, '')


def _fail(where: str, path: str, expected: str, value) -> None:
  raise SchemaError(f'{where}: field {path or "<top level>"}: expected {expected}, '
                    f'found {_kind(value)}')


def _is_number(value, integer: bool) -> bool:
  if isinstance(value, bool):
    return False
  if integer:
    return isinstance(value, int)
  return isinstance(value, (int, float)) and math.isfinite(value)


def _check(value, schema, where: str, path: str) -> None:
  if isinstance(schema, type):
    if schema in (int, float):
      if not _is_number(value, schema is int):
        _fail(where, path, 'an integer' if schema is int else 'a finite number', value)
    elif schema is bool:
      if not isinstance(value, bool):
        _fail(where, path, 'true or false', value)
    elif not isinstance(value, schema):
      _fail(where, path, {dict: 'an object', list: 'a list', str: 'a string'}.get(
          schema, schema.__name__), value)
  elif isinstance(schema, Number):
    if not _is_number(value, schema.integer):
      _fail(where, path, 'an integer' if schema.integer else 'a finite number', value)
    low_ok = (schema.low is None or
              (value > schema.low if schema.low_open else value >= schema.low))
    if not low_ok or (schema.high is not None and value > schema.high):
      lo = '-inf' if schema.low is None else schema.low
      hi = 'inf' if schema.high is None else schema.high
      _fail(where, path, f'a number in {"(" if schema.low_open else "["}{lo}, {hi}]', value)
  elif isinstance(schema, OneOf):
    if not any(type(value) is type(c) and value == c for c in schema.choices):
      _fail(where, path, 'one of ' + ', '.join(map(repr, schema.choices)), value)
  elif isinstance(schema, dict):
    if not isinstance(value, dict):
      _fail(where, path, 'an object', value)
    for key, sub in schema.items():
      optional = isinstance(sub, Optional)
      if key not in value:
        if optional:
          continue
        raise SchemaError(f'{where}: field {_key_path(path, key)} is missing')
      _check(value[key], sub.schema if optional else sub, where, _key_path(path, key))
  elif isinstance(schema, (list, ListOf)):
    item, min_len = (schema[0], 1) if isinstance(schema, list) else (schema.item,
                                                                      schema.min_len)
    if not isinstance(value, list):
      _fail(where, path, 'a list', value)
    if len(value) < min_len:
      raise SchemaError(f'{where}: field {path or "<top level>"}: '
                        + ('empty list' if not value else f'{len(value)} entries')
                        + f'; expected at least {min_len}')
    for i, v in enumerate(value):
      _check(v, item, where, f'{path}[{i}]')
  elif isinstance(schema, tuple):
    if not isinstance(value, list) or len(value) != len(schema):
      _fail(where, path, f'a list of {len(schema)} entries', value)
    for i, (v, sub) in enumerate(zip(value, schema)):
      _check(v, sub, where, f'{path}[{i}]')
  elif isinstance(schema, DictOf):
    if not isinstance(value, dict):
      _fail(where, path, 'an object', value)
    if len(value) < schema.min_len:
      raise SchemaError(f'{where}: field {path or "<top level>"}: empty object')
    for key, v in value.items():
      _check(v, schema.value, where, _key_path(path, key))
  else:
    raise TypeError(f'not a schema: {schema!r}')


def tree_digest(value: Any) -> str:
  """sha256 (hex) of a pytree: its structure, every array's dtype, shape and bytes, and
  the repr of every other leaf (numbers, strings, frozen configs). Two values with the
  same digest give the same numbers: what a cache key or a cross-process check needs."""
  leaves, treedef = jax.tree.flatten(value)
  digest = hashlib.sha256(repr(treedef).encode())
  for leaf in leaves:
    if isinstance(leaf, (jax.Array, np.ndarray, np.generic)):
      leaf = np.asarray(leaf)
      digest.update(repr((leaf.dtype.str, leaf.shape)).encode())
      digest.update(np.ascontiguousarray(leaf).tobytes())
    else:
      digest.update(repr(leaf).encode())
  return digest.hexdigest()
