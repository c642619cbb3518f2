"""A training job as one function: `train_and_evaluate` trains every network into a run
directory, saves them and writes the held-out summary (what `launch/train.py` runs and
`launch/reproduce.py --retrain` calls), and `read_flagfile` turns a training flagfile
into the configs that job takes.

This module does not parse command lines (absl's flags are the launchers'); its
flagfile reader accepts exactly the names `launch/train.py` defines for a flagfile.
"""

from __future__ import annotations

import dataclasses
import math
import os
import typing
from typing import Any, NamedTuple

from dynn_jax import runs
from dynn_jax.config import ConfigError, MECConfig
from dynn_jax.models import ModelConfig
from dynn_jax.networks import Networks, save_networks
from dynn_jax.runs import RunDir
from dynn_jax.training.config import TrainConfig, check_scheduler_training
from dynn_jax.training.loop import train_all


def run_config(mec: MECConfig, model: ModelConfig, train: TrainConfig) -> dict:
  """What a run directory records, and what a resumed run must match."""
  return {'mec': mec.to_dict(), 'model': model.to_dict(), 'train': train.to_dict()}


def train_and_evaluate(mec: MECConfig, model: ModelConfig, train: TrainConfig,
                       run_dir: str, *, resume: bool, eval_chunk: int = 8192
                       ) -> tuple[Networks, dict]:
  """Trains every network in `run_dir` (continuing its checkpoints with `resume`),
  writes `networks.msgpack` and `summary.json` there, and returns the networks and the
  summary (`dynn_jax.reports.training_summary`: quality gaps and the held-out
  evaluation, `eval_chunk` slots per compiled call).

  Raises runs.RunDirError, before any work, for a directory that another run uses, that
  holds a run without `resume`, or whose run had another config.
  """
  # Imported here: reports imports the cost study, which imports this package.
  from dynn_jax.reports import training_summary
  if isinstance(eval_chunk, bool) or not isinstance(eval_chunk, int) or eval_chunk < 1:
    raise ValueError(f'eval_chunk = {eval_chunk!r}; must be a positive integer')
  check_scheduler_training(model, train)
  config = run_config(mec, model, train)
  runs.check_start(run_dir, config, resume)
  run = RunDir(run_dir)
  with run.locked():
    run.write_config(config, resume=resume)
    params = train_all(mec, model, train, run)
    save_networks(run.file('networks.msgpack'), params, mec, model, train)
    summary = training_summary(mec, model, train, params, chunk=eval_chunk)
    run.write_summary(summary)
  return Networks(params, mec, model, train.loss, config), summary


# ------------------------------------------------------------------ flagfiles

# launch/train.py's own flags, which a training flagfile may set too.
LAUNCHER_FLAGS = {'run_dir': str, 'resume': bool, 'eval_chunk': int}
# Not a flag: the model's user axis follows the system's width.
_DERIVED = {ModelConfig: ('max_users',)}
_TRUE, _FALSE = ('true', 't', '1'), ('false', 'f', '0')
_EXPECTED = {bool: 'true or false', int: 'an integer', float: 'a finite number',
             str: 'a value'}


class TrainingFlags(NamedTuple):
  mec: MECConfig
  model: ModelConfig
  train: TrainConfig
  launcher: dict  # the LAUNCHER_FLAGS the flagfile sets, typed


def read_flagfile(path: str) -> TrainingFlags:
  """The configs of a `launch/train.py` flagfile: `--name=value` lines (`--name` and
  `--noname` for booleans), `#` or `//` comments, nested `--flagfile=` read in place
  (relative to the working directory, and a circular one ignored, as absl does); a
  later value wins. Fields not set keep their defaults.

  Raises ConfigError naming the file and line of an unknown name or a value of the
  wrong type, and the field of a value its config refuses.
  """
  kinds = dict(LAUNCHER_FLAGS)
  owners: dict[str, list[type]] = {}
  for cls in (MECConfig, ModelConfig, TrainConfig):
    for name, kind in _field_kinds(cls).items():
      kinds[name] = kind
      owners.setdefault(name, []).append(cls)
  values = {cls: {} for cls in (MECConfig, ModelConfig, TrainConfig)}
  launcher = {}
  for where, name, text in _flag_lines(path, ()):
    if name not in kinds and name.startswith('no') and kinds.get(name[2:]) is bool \
        and text is None:
      name, text = name[2:], 'false'
    if name not in kinds:
      raise ConfigError(f'{where}: unknown flag --{name} (a training flagfile sets fields of '
                        'MECConfig, ModelConfig, TrainConfig or '
                        f'{", ".join("--" + n for n in LAUNCHER_FLAGS)})')
    value = _convert(kinds[name], name, text, where)
    for cls in owners.get(name, ()):
      values[cls][name] = value
    if name in LAUNCHER_FLAGS:
      launcher[name] = value
  try:
    mec = MECConfig.from_dict(values[MECConfig])
    model = ModelConfig.from_dict({**values[ModelConfig], 'max_users': mec.width})
    train = TrainConfig.from_dict(values[TrainConfig])
  except ConfigError as e:
    raise ConfigError(f'flagfile {path}: {e}') from None
  return TrainingFlags(mec, model, train, launcher)


def _field_kinds(cls) -> dict[str, type]:
  """Each flag field's type, `X | None` read as X (a flag cannot say None)."""
  hints = typing.get_type_hints(cls)
  kinds = {}
  for field in dataclasses.fields(cls):
    if field.name in _DERIVED.get(cls, ()):
      continue
    args = [a for a in typing.get_args(hints[field.name]) if a is not type(None)]
    kinds[field.name] = args[0] if args else hints[field.name]
  return kinds


def _flag_lines(path: str, stack: tuple[str, ...]):
  """('file:line', name, value or None) of each flag of a flagfile, nested ones in place."""
  try:
    with open(path, encoding='utf-8') as f:
      lines = f.read().splitlines()
  except (OSError, UnicodeDecodeError) as e:
    raise ConfigError(f'flagfile {path}: cannot be read as text ({e})') from None
  for number, line in enumerate(lines, 1):
    line = line.strip()
    if not line or line.startswith(('#', '//')):
      continue
    where = f'{path}:{number}'
    if not line.startswith('-') or line.lstrip('-') == '':
      raise ConfigError(f'{where}: {line!r} is not a --name=value flag')
    name, eq, value = line.lstrip('-').partition('=')
    if name == 'flagfile':
      nested = os.path.expanduser(value.strip())
      if nested and nested not in stack + (path,):
        yield from _flag_lines(nested, stack + (path,))
      continue
    yield where, name, value if eq else None


def _convert(kind: type, name: str, text: str | None, where: str) -> Any:
  if kind is bool:
    if text is None or text.lower() in _TRUE:
      return True
    if text.lower() in _FALSE:
      return False
  elif kind not in _EXPECTED:
    raise ConfigError(f'{where}: --{name} has a type ({kind}) no flag can give')
  elif text is None:
    pass
  elif kind is str:
    return text
  else:
    try:
      value = kind(text)
    except ValueError:
      pass
    else:
      if kind is int or math.isfinite(value):
        return value
  raise ConfigError(f'{where}: --{name}={text if text is not None else ""}: expected '
                    f'{_EXPECTED[kind]}')
