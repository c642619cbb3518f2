"""absl flags generated from config dataclasses, so every config field is a flag.

`define_flags(MECConfig)` defines one flag per field with the field's default;
`from_flags(MECConfig)` builds the config and turns a bad value into a usage error
that names the flag and the allowed range, before any work starts.

The checks every launcher makes before work: `check_range` (finite, in range),
`check_writable` (output paths), `check_memory` (sizes that cannot fit), and `run`
(absl's `app.run` after checking that every --flagfile is readable text).

Flagfiles have one reader, `flagfile_lines` (absl's rules): `flagfile_problem` checks the
ones a command line names, `read_flagfile` turns a training flagfile into its configs
without absl (for `launch/reproduce.py --retrain`).
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import json
import math
import os
import sys
import typing
from typing import Any, NamedTuple

import jax
from absl import app, flags

from dynn_jax import delay, latency
from dynn_jax.config import ConfigError, MECConfig
from dynn_jax.models import ModelConfig
from dynn_jax.training.config import TrainConfig, check_scheduler_training

FLAGS = flags.FLAGS
flags.DEFINE_bool('dry_run', False, 'Parse and check every flag and input file, print the '
                  'resolved configuration and stop before any work.')


# Not a flag: the model's user axis follows the system's width.
MODEL_DERIVED = ('max_users',)


def _field_kinds(cls, skip: tuple[str, ...] = ()) -> dict[str, type]:
  """Each field's type but `skip`'s, `X | None` read as X (a flag cannot say None)."""
  hints = typing.get_type_hints(cls)
  kinds = {}
  for field in dataclasses.fields(cls):
    if field.name not in skip:
      args = [a for a in typing.get_args(hints[field.name]) if a is not type(None)]
      kinds[field.name] = args[0] if args else hints[field.name]
  return kinds


def define_flags(cls, prefix: str = '', skip: tuple[str, ...] = ()) -> None:
  defaults = {field.name: field.default for field in dataclasses.fields(cls)}
  for field_name, kind in _field_kinds(cls, skip).items():
    name = prefix + field_name
    if name in FLAGS:
      continue
    default = defaults[field_name]
    help_text = f'{cls.__name__}.{field_name}'
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
  for name, value in values.items():
    if isinstance(value, float) and not math.isfinite(value):
      raise app.UsageError(f'--{prefix}{name} = {value!r}; must be a finite number '
                           f'({cls.__name__}.{name})')
  values.update(fixed)
  try:
    return cls(**values)
  except ValueError as e:
    raise app.UsageError(f'{e} (flag --{prefix}<field>)') from None


def check_range(name: str, value, low=None, high=None) -> None:
  """Usage error for a launcher flag outside [low, high], or not a finite number (a NaN
  passes every comparison, so it would pass any range)."""
  if isinstance(value, float) and not math.isfinite(value):
    raise app.UsageError(f'--{name} = {value!r}; must be a finite number')
  if (low is not None and value < low) or (high is not None and value > high):
    lo = '-inf' if low is None else low
    hi = 'inf' if high is None else high
    raise app.UsageError(f'--{name} = {value!r}; allowed range [{lo}, {hi}]')


def define_training_flags() -> None:
  """Flags for every field of MECConfig, ModelConfig (but MODEL_DERIVED) and
  TrainConfig."""
  define_flags(MECConfig)
  define_flags(ModelConfig, skip=MODEL_DERIVED)
  define_flags(TrainConfig)


def training_configs():
  """(MECConfig, ModelConfig, TrainConfig) from the flags of `define_training_flags`."""
  mec = from_flags(MECConfig)
  model, train = from_flags(ModelConfig, max_users=mec.width), from_flags(TrainConfig)
  try:
    check_scheduler_training(model, train)
  except ValueError as e:
    raise app.UsageError(f'{e} (flags --scheduler_context or --policy_context, '
                         '--server_cpu_scale_min/max)') from None
  return mec, model, train


def define_run_flags() -> None:
  """--run_dir and --resume, for the launchers that train into a run directory."""
  flags.DEFINE_string('run_dir', None, 'Run directory (config, metrics, checkpoints, '
                      'summary).')
  flags.DEFINE_bool('resume', False, 'Continue the run in --run_dir from its checkpoints.')


def check_run_args(argv) -> None:
  """Usage errors for positional arguments or a missing --run_dir (`define_run_flags`)."""
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not FLAGS.run_dir:
    raise app.UsageError('--run_dir is required')


def define_delay_flags(modes=('none', 'modelled', 'measured')) -> None:
  """--inference_delay, --latency_table and --allow_other_device (`delay_from_flags`)."""
  flags.DEFINE_enum('inference_delay', 'modelled', list(modes),
                    'Inference delay (dynn_jax.delay): ' + ', '.join(
                        {'none': 'none (every network free)',
                         'modelled': 'modelled (counted ops / f_ser)',
                         'measured': 'measured (the latency table of --latency_table)'}[m]
                        for m in modes))
  flags.DEFINE_string('latency_table', None,
                      'Measured latency table (launch/benchmark.py --suite=exits).')
  flags.DEFINE_bool('allow_other_device', False,
                    'Accept a latency table measured on another device.')


def delay_from_flags(model, mec):
  """The delay model of the flags of `define_delay_flags`, its table loaded and checked
  against the model, the width and this device (usage errors before any work)."""
  mode = FLAGS.inference_delay
  if mode != 'measured':
    if FLAGS.latency_table:
      raise app.UsageError(f'--latency_table is only read with --inference_delay=measured '
                           f'(got --inference_delay={mode})')
    return delay.NONE if mode == 'none' else delay.MODELLED
  if not FLAGS.latency_table:
    raise app.UsageError('--inference_delay=measured needs --latency_table')
  try:
    return latency.load_table(FLAGS.latency_table, model, mec,
                              allow_other_device=FLAGS.allow_other_device)
  except (OSError, ValueError) as e:   # missing, a folder, a symlink loop, damaged
    raise app.UsageError(str(e)) from None


def stop_if_dry_run(**resolved) -> None:
  """With --dry_run: print what would run and exit successfully."""
  if FLAGS.dry_run:
    print(json.dumps(resolved, indent=2, sort_keys=True, default=str))
    print('dry run: every flag checked, nothing run')
    raise SystemExit(0)


# ------------------------------------------------------------------ output paths


def check_writable(flag_name: str, path: str | None, directory: bool = False,
                   what: str | None = None) -> None:
  """Usage error, before any work, unless `path` (a file, or with `directory` a folder)
  can be written: an empty value, an existing path of the wrong kind, or a nearest
  existing parent folder that is not a writable folder. Creates nothing. `what` names
  a path derived from the flag (e.g. 'its folder of cached runs')."""
  if path is None:
    return
  if not path.strip():
    raise app.UsageError(f'--{flag_name} is empty; give a {"folder" if directory else "file"}'
                         ' path (or leave the flag out)')
  path = os.path.abspath(os.path.expanduser(path))
  label = f'--{flag_name} ({what}: {path})' if what else f'--{flag_name}={path}'
  if os.path.exists(path):
    if directory and not os.path.isdir(path):
      raise app.UsageError(f'{label} is a file, not a folder')
    if not directory and os.path.isdir(path):
      raise app.UsageError(f'{label} is a folder, not a file')
    if not os.access(path, os.W_OK | (os.X_OK if directory else 0)):
      raise app.UsageError(f'{label} is not writable')
    if directory:
      return
  parent = os.path.dirname(path)
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    raise app.UsageError(f'{label}: {parent} is a file, not a folder')
  if not os.access(parent, os.W_OK | os.X_OK):
    raise app.UsageError(f'{label}: the folder {parent} is not writable')


# ------------------------------------------------------------------------ memory


def _cgroup_limit() -> int | None:
  for path in ('/sys/fs/cgroup/memory.max', '/sys/fs/cgroup/memory/memory.limit_in_bytes'):
    try:
      with open(path) as f:
        text = f.read().strip()
    except OSError:
      continue
    if text.isdigit():
      return int(text)
  return None


def machine_memory() -> tuple[int, str]:
  """(bytes, description) of the memory a computation here can use at most: the host's
  physical memory, a container's limit, and an accelerator's own memory if it reports
  one, whichever is smallest."""
  try:
    host = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
  except (ValueError, OSError, AttributeError):
    host = None
  limits = [(host, 'host memory')] if host else []
  cgroup = _cgroup_limit()
  if cgroup:
    limits.append((cgroup, 'container memory limit'))
  device = jax.local_devices()[0]
  if device.platform != 'cpu':
    try:
      stats = device.memory_stats() or {}
    except Exception:  # not every backend reports memory
      stats = {}
    if stats.get('bytes_limit'):
      limits.append((int(stats['bytes_limit']), f'{device.device_kind} memory'))
  if not limits:
    return sys.maxsize, 'unknown'
  return min(limits)


def _size(n: float) -> str:
  for unit in ('B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'):
    if n < 1024 or unit == 'PiB':
      return f'{n:.3g} {unit}'
    n /= 1024
  raise AssertionError


def check_memory(flag_desc: str, estimated_bytes: float,
                 available: tuple[int, str] | None = None) -> None:
  """Usage error, before any work, when `estimated_bytes` (a lower bound of what the
  run needs) exceeds the machine's memory (`machine_memory()` unless `available`)."""
  limit, where = available if available is not None else machine_memory()
  if estimated_bytes > limit:
    raise app.UsageError(f'{flag_desc}: needs at least {_size(estimated_bytes)} of memory '
                         f'(estimated); this machine has {_size(limit)} ({where})')


def training_step_bytes(mec, model, train) -> int:
  """A lower bound on the memory of one training step: the MoE step runs every layer of
  every expert for every user of the batch and keeps each layer's [batch, W, K, width]
  float32 activations for the backward pass, i.e. K * L * width * 4 bytes per user
  position and slot (the static baseline: L * static_width * 4). Parameters, optimizer
  state and XLA's temporaries come on top, so a refused size never fits."""
  per_user = 4 * max(model.num_experts * model.max_depth * model.width,
                     model.max_depth * model.static_width)
  return train.batch * mec.width * per_user


def evaluation_chunk_bytes(width: int, chunk: int) -> int:
  """A lower bound on the memory of one evaluation chunk: the sampled slots (6 arrays of
  [chunk, W]) and one method's decision and per-user costs (about 10 more), float32."""
  return 16 * 4 * chunk * width


def check_training_memory(mec, model, train) -> None:
  check_memory(f'--batch={train.batch} with {mec.width} user positions (--n_users / '
               '--n_max)', training_step_bytes(mec, model, train))


# ---------------------------------------------------------------------- flagfiles


def _flagfile_args(args: list[str]):
  """The files named by --flagfile=F, -flagfile=F, --flagfile F (as absl reads them)."""
  args = list(args)
  while args:
    arg = args.pop(0)
    if arg == '--':
      return
    if arg in ('--flagfile', '-flagfile'):
      if args:
        yield os.path.expanduser(args.pop(0))
    elif arg.startswith(('--flagfile=', '-flagfile=')):
      yield os.path.expanduser(arg.split('=', 1)[1].strip())


def flagfile_lines(path: str, stack: tuple[str, ...] = ()):
  """('file:line', line) of each flag line of a flagfile, read as absl reads it: blank
  lines and `#` or `//` comments skipped, a nested `--flagfile=` read in place (named
  relative to the working directory; an empty or circular one ignored), every other
  line stripped. `stack`: the files that named this one.

  Raises ConfigError, one line naming the file (and the files that named it), for a file
  that cannot be read, a binary file or one that is not UTF-8 text.
  """
  try:
    with open(path, 'rb') as f:
      data = f.read()
  except OSError as e:
    raise ConfigError(f'--flagfile={path}: cannot be read ({e.strerror or e})') from None
  if b'\0' in data:
    raise ConfigError(f'--flagfile={path}: a binary file, not a flagfile of text lines')
  try:
    text = data.decode('utf-8')
  except UnicodeDecodeError as e:
    raise ConfigError(f'--flagfile={path}: not UTF-8 text (byte 0x{data[e.start]:02x} at '
                      f'offset {e.start})') from None
  for number, line in enumerate(text.splitlines(), 1):
    if line.isspace() or not line or line.startswith(('#', '//')):
      continue
    if line.startswith(('--flagfile=', '-flagfile=')):
      nested = os.path.expanduser(line.split('=', 1)[1].strip())
      if nested and nested not in stack + (path,):
        try:
          yield from flagfile_lines(nested, stack + (path,))
        except ConfigError as e:
          raise ConfigError(f'{e} (named in {path})') from None
      continue
    yield f'{path}:{number}', line.strip()


def flagfile_problem(args: list[str]) -> str | None:
  """Why a flagfile named in `args` (or nested in one) cannot be read as text, or None."""
  for path in _flagfile_args(args):
    if not path:
      continue  # absl ignores an empty flagfile name
    try:
      for _ in flagfile_lines(path):
        pass
    except ConfigError as e:
      return str(e)
  return None


# launch/train.py's own flags (`define_run_flags`, --eval_chunk), which a training
# flagfile may set too.
LAUNCHER_FLAGS = {'run_dir': str, 'resume': bool, 'eval_chunk': int}
_TRUE, _FALSE = ('true', 't', '1'), ('false', 'f', '0')
_EXPECTED = {bool: 'true or false', int: 'an integer', float: 'a finite number',
             str: 'a value'}


class TrainingFlags(NamedTuple):
  mec: MECConfig
  model: ModelConfig
  train: TrainConfig
  launcher: dict  # the LAUNCHER_FLAGS the flagfile sets, typed


def read_flagfile(path: str) -> TrainingFlags:
  """The configs of a `launch/train.py` flagfile without absl: `--name=value` lines
  (`--name` and `--noname` for booleans), read by `flagfile_lines`; a later value wins.
  Fields not set keep their defaults.

  Raises ConfigError naming the file and line of an unknown name or a value of the
  wrong type, and the field of a value its config refuses.
  """
  kinds = dict(LAUNCHER_FLAGS)
  owners: dict[str, list[type]] = {}
  for cls in (MECConfig, ModelConfig, TrainConfig):
    skip = MODEL_DERIVED if cls is ModelConfig else ()
    for name, kind in _field_kinds(cls, skip).items():
      kinds[name] = kind
      owners.setdefault(name, []).append(cls)
  values = {cls: {} for cls in (MECConfig, ModelConfig, TrainConfig)}
  launcher = {}
  for where, line in flagfile_lines(path):
    if line.lstrip('-') == '' or not line.startswith('-'):
      raise ConfigError(f'{where}: {line!r} is not a --name=value flag')
    name, eq, text = line.lstrip('-').partition('=')
    text = text if eq else None
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


def run(main) -> None:
  """absl's app.run(main), after checking every --flagfile in sys.argv (recursively)
  is readable text: absl would otherwise end a binary one with a traceback."""
  problem = flagfile_problem(sys.argv[1:])
  if problem:
    sys.stderr.write(f'FATAL Flags parsing error: {problem}\n')
    raise SystemExit(1)
  app.run(functools.partial(one_line_errors, main))


def one_line_errors(main, argv):
  """`main(argv)` with the failures a user causes or meets ending in one line rather than
  a traceback: Ctrl-C (every file is written atomically, so what was written stands and
  a training resumes with --resume) and a full or unwritable disk."""
  try:
    return main(argv)
  except KeyboardInterrupt:
    sys.stderr.write('interrupted: every file written so far is complete (a training '
                     'continues with --resume, a reproduction from its points)\n')
    raise SystemExit(130) from None
  except OSError as e:
    if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES):
      raise
    where = f' writing {e.filename}' if e.filename else ''
    raise SystemExit(f'stopped{where}: {e.strerror}; nothing half-written was left '
                     '(files are written atomically): free space and run again') from None
