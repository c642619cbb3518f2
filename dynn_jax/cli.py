"""absl flags generated from config dataclasses, so every config field is a flag.

`define_flags(MECConfig)` defines one flag per field with the field's default;
`from_flags(MECConfig)` builds the config and turns a bad value into a usage error
that names the flag and the allowed range, before any work starts.
"""

from __future__ import annotations

import dataclasses
import typing

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_bool('dry_run', False, 'Parse and check every flag and input file, print the '
                  'resolved configuration and stop before any work.')


def _kind(cls, field: dataclasses.Field):
  hint = typing.get_type_hints(cls)[field.name]
  args = [a for a in typing.get_args(hint) if a is not type(None)]
  return args[0] if args else hint


def define_flags(cls, prefix: str = '', skip: tuple[str, ...] = ()) -> None:
  for field in dataclasses.fields(cls):
    name = prefix + field.name
    if name in FLAGS or field.name in skip:
      continue
    kind, default = _kind(cls, field), field.default
    help_text = f'{cls.__name__}.{field.name}'
    if kind is bool:
      flags.DEFINE_bool(name, default, help_text)
    elif kind is int:
      flags.DEFINE_integer(name, default, help_text)
    elif kind is float:
      flags.DEFINE_float(name, default, help_text)
    else:
      flags.DEFINE_string(name, default, help_text)


def from_flags(cls, prefix: str = '', **fixed):
  """The config from the flags; `fixed` fields are not flags (see `define_flags(skip=)`)."""
  values = {f.name: FLAGS[prefix + f.name].value for f in dataclasses.fields(cls)
            if f.name not in fixed}
  values.update(fixed)
  try:
    return cls(**values)
  except ValueError as e:
    raise app.UsageError(f'{e} (flag --{prefix}<field>)') from None


def check_range(name: str, value, low=None, high=None) -> None:
  """Usage error for a launcher flag outside [low, high]."""
  if (low is not None and value < low) or (high is not None and value > high):
    lo = '-inf' if low is None else low
    hi = 'inf' if high is None else high
    raise app.UsageError(f'--{name} = {value!r}; allowed range [{lo}, {hi}]')


def define_training_flags() -> None:
  """Flags for every field of MECConfig, ModelConfig (max_users follows the system's
  width) and TrainConfig."""
  from dynn_jax.config import MECConfig
  from dynn_jax.models import ModelConfig
  from dynn_jax.training import TrainConfig
  define_flags(MECConfig)
  define_flags(ModelConfig, skip=('max_users',))
  define_flags(TrainConfig)


def training_configs():
  """(MECConfig, ModelConfig, TrainConfig) from the flags of `define_training_flags`."""
  from dynn_jax.config import MECConfig
  from dynn_jax.models import ModelConfig
  from dynn_jax.training import TrainConfig
  mec = from_flags(MECConfig)
  return mec, from_flags(ModelConfig, max_users=mec.width), from_flags(TrainConfig)


def stop_if_dry_run(**resolved) -> None:
  """With --dry_run: print what would run and exit successfully."""
  if FLAGS.dry_run:
    import json
    print(json.dumps(resolved, indent=2, sort_keys=True, default=str))
    print('dry run: every flag checked, nothing run')
    raise SystemExit(0)
