"""Evaluation across several processes with `jax.distributed`.

Each process runs the same command (only --process_id differs); after `initialize`,
`jax.devices()` lists every process's devices, so `evaluation.evaluate` splits every
chunk of slots over all of them and every process receives the same sums. Process 0
prints and writes; the others compute their share and exit quietly.

When a run joins several processes (`initialize`):
  * --coordinator_address / --num_processes / --process_id, any of them given;
  * or the environment variables that jax.distributed itself reads (jax 0.10.2):
    JAX_COORDINATOR_ADDRESS (host:port of process 0's coordinator; with
    JAX_COORDINATOR_PORT, JAX_COORDINATOR_BIND_ADDRESS, JAX_LOCAL_DEVICE_IDS as
    refinements), and the job managers it detects: Slurm (srun: SLURM_JOB_ID,
    SLURM_STEP_NODELIST, SLURM_NTASKS, SLURM_PROCID, SLURM_LOCALID) and Open MPI
    (mpirun: OMPI_MCA_orte_hnp_uri, OMPI_COMM_WORLD_SIZE, OMPI_COMM_WORLD_RANK), which
    give the address, the number of processes and each one's id.
Under Slurm or Open MPI a run joins by itself only when the job has more than one task.
jax also detects Kubernetes and Cloud TPU jobs, but their variables are present in
every pod or VM, not only in multi-process jobs, so there a run joins only when a flag
or JAX_COORDINATOR_ADDRESS asks (jax then fills in what is missing).

Joining waits at most --initialization_timeout seconds (60 by default, a line on stderr
says so): a process missing, or one given other flags, ends every process with a
one-line error instead of jax's five minutes of silence and abort. Process 0 first
checks that the coordinator's port is free on its host.

Every process reads its own inputs (networks, latency table), so every host needs
them at the same paths; `check_same` refuses a run whose processes disagree.

CPU processes exchange their sums through gloo (`jax_cpu_collectives_implementation`);
GPUs use NCCL, which needs no setting.
"""

from __future__ import annotations

import atexit
import errno
import json
import os
import shutil
import socket
import sys
import tempfile
import threading

import jax
import numpy as np
from absl import app, flags
from jax.experimental import multihost_utils

from dynn_jax.io import is_temporary, tree_digest

FLAGS = flags.FLAGS

_SLURM = ('SLURM_JOB_ID', 'SLURM_STEP_NODELIST', 'SLURM_NTASKS', 'SLURM_PROCID',
          'SLURM_LOCALID')


def define_flags() -> None:
  """The three flags of a multi-process run (defined once, whichever launcher asks)."""
  if 'num_processes' in FLAGS:
    return
  flags.DEFINE_string('coordinator_address', None, 'host:port of process 0, where the '
                      'processes meet (default: JAX_COORDINATOR_ADDRESS, or the Slurm / '
                      'Open MPI job). Every process gives the same address.')
  flags.DEFINE_integer('num_processes', None, 'Processes evaluating together (default: 1, '
                       'or the Slurm / Open MPI job\'s task count).')
  flags.DEFINE_integer('process_id', None, 'This process\'s id in [0, --num_processes); '
                       'process 0 prints and writes the results.')
  flags.DEFINE_integer('initialization_timeout', DEFAULT_TIMEOUT_S, 'Seconds every process '
                       'waits for all --num_processes to join before it gives up with an '
                       'error (jax\'s own default, 300 s, ends in an abort).')


# How long a process waits for the others by default: long enough for every process of
# a job to start (imports take seconds), short enough that a missing one is reported
# before anyone wonders.
DEFAULT_TIMEOUT_S = 60
# jax's own deadline comes this much later than ours: at its deadline jax aborts the
# process with a C++ stack trace, so ours must fire first.
_JAX_DEADLINE_MARGIN_S = 30


def _check_address(address: str, name: str) -> None:
  host, colon, port = address.rpartition(':')
  if not colon or not host or (':' in host and not host.startswith('[')):
    raise ValueError(f'{name} = {address!r}; must be host:port, e.g. 10.0.0.1:8476 or '
                     '[::1]:8476')
  if not port.isdigit() or not 1 <= int(port) <= 65535:
    raise ValueError(f'{name} = {address!r}; the port must be a number in [1, 65535]')


def cluster_processes() -> int | None:
  """The task count of the Slurm or Open MPI job this process belongs to, or None."""
  if all(v in os.environ for v in _SLURM):
    count = os.environ['SLURM_NTASKS']
  elif 'OMPI_MCA_orte_hnp_uri' in os.environ:
    count = os.environ.get('OMPI_COMM_WORLD_SIZE', '')
  else:
    return None
  return int(count) if count.isdigit() else None


def check_port_free(address: str) -> None:
  """ValueError when process 0 cannot open the coordinator's port on this host (another
  program holds it): jax would otherwise wait out its whole timeout, then abort."""
  port = int(address.rpartition(':')[2])
  for family, host in ((socket.AF_INET, '0.0.0.0'), (socket.AF_INET6, '::')):
    try:
      sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError:
      continue  # no IPv6 here
    with sock:
      # As a server would: a port left in TIME_WAIT by an earlier run is free.
      sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
      try:
        sock.bind((host, port))
      except OSError as e:
        if e.errno in (errno.EADDRINUSE, errno.EACCES):
          raise ValueError(f'--coordinator_address = {address!r}: port {port} cannot be '
                           f'opened on this host ({e.strerror}); process 0 runs the '
                           'coordinator there: choose a free port for every process, or '
                           'stop the program that holds it') from None
        # Other errors (no such address family configured): nothing to learn here.


def _join(address: str | None, num_processes: int | None, process_id: int | None,
          total: int, timeout_s: int) -> None:
  """jax.distributed.initialize, with a line while waiting and, if the `total`
  processes do not all join within `timeout_s`, a one-line error and exit status 1."""
  who = 'this process' if process_id is None else f'process {process_id}'
  where = address or 'the job\'s coordinator'
  print(f'{who}: waiting up to {timeout_s} s for {total} processes to join at {where}',
        file=sys.stderr, flush=True)
  joined = threading.Event()

  def give_up():
    if joined.is_set():
      return
    # jax waits inside C++ (the GIL released): this thread can still report and end
    # the process before jax's own deadline aborts it with a stack trace.
    sys.stdout.flush()
    sys.stderr.write(f'error: {who}: the {total} processes did not all join at {where} '
                     f'within {timeout_s} s (--initialization_timeout): start every '
                     'process (--process_id 0 to --num_processes - 1, 0 first), with the '
                     'same --num_processes and --coordinator_address, reachable from '
                     'every host\n')
    sys.stderr.flush()
    os._exit(1)

  timer = threading.Timer(timeout_s, give_up)
  timer.daemon = True
  timer.start()
  try:
    jax.distributed.initialize(address, num_processes, process_id,
                               initialization_timeout=timeout_s + _JAX_DEADLINE_MARGIN_S)
  finally:
    joined.set()
    timer.cancel()


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, connect: bool = True,
               timeout_s: int = DEFAULT_TIMEOUT_S) -> int:
  """Joins the processes of a multi-process run when one is asked for (see the module
  docstring) and returns the number of processes (1: nothing to join).

  Bad values raise ValueError naming the flag, before anything connects (process 0
  also checks that the coordinator's port is free). Call before any JAX computation:
  jax.distributed cannot join once a backend exists. With `connect=False` the values
  are only checked (a dry run must not wait for the others). When the processes do not
  all join within `timeout_s`, the process prints one line and exits with status 1.
  """
  if isinstance(timeout_s, bool) or not isinstance(timeout_s, int) or timeout_s < 1:
    raise ValueError(f'--initialization_timeout = {timeout_s!r}; must be an integer >= 1 '
                     '(seconds)')
  if num_processes is not None and num_processes < 1:
    raise ValueError(f'--num_processes = {num_processes}; must be >= 1')
  if process_id is not None and process_id < 0:
    raise ValueError(f'--process_id = {process_id}; must be >= 0')
  if coordinator_address is not None:
    _check_address(coordinator_address, '--coordinator_address')
  env_address = os.environ.get('JAX_COORDINATOR_ADDRESS') or None
  if env_address is not None and coordinator_address is None:
    _check_address(env_address, 'JAX_COORDINATOR_ADDRESS')
  cluster = cluster_processes()
  given = (coordinator_address, num_processes, process_id) != (None, None, None)
  if not (given or env_address or (cluster or 1) > 1):
    return 1
  total = num_processes if num_processes is not None else cluster
  if total is None:
    raise ValueError('--num_processes is required to join several processes (no Slurm '
                     'or Open MPI job detected to tell it)')
  if process_id is not None and process_id >= total:
    raise ValueError(f'--process_id = {process_id}; must be in [0, {total - 1}] '
                     f'(--num_processes={total})')
  if total == 1:
    return 1
  if process_id is None and cluster is None:
    raise ValueError(f'--process_id is required with --num_processes={total}: this '
                     f'process\'s id in [0, {total - 1}], 0 where the coordinator runs')
  address = coordinator_address or env_address
  if address is None and cluster is None:
    raise ValueError(f'--coordinator_address is required with --num_processes={total} '
                     '(host:port of process 0, the same for every process), or set '
                     'JAX_COORDINATOR_ADDRESS')
  if not connect:
    return total
  if jax.distributed.is_initialized():
    return jax.process_count()
  # The pinned jax already defaults to gloo; an unset value (older jax, or
  # JAX_CPU_COLLECTIVES_IMPLEMENTATION=none) would leave CPU processes unable to add
  # their sums. An explicit 'mpi' is kept.
  if not jax.config.jax_cpu_collectives_implementation:
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  if address is not None and process_id == 0:
    check_port_free(address)
  _join(address, num_processes, process_id, total, timeout_s)
  return jax.process_count()


def initialize_from_flags() -> int:
  """`initialize` from the flags of `define_flags`, first thing in a launcher's main:
  bad values are usage errors; --dry_run only checks them. In processes other than 0,
  stdout goes to /dev/null (library progress lines included): only process 0 reports;
  stderr stays, so every process's errors are seen."""
  dry_run = 'dry_run' in FLAGS and FLAGS['dry_run'].value
  try:
    processes = initialize(FLAGS.coordinator_address, FLAGS.num_processes,
                           FLAGS.process_id, connect=not dry_run,
                           timeout_s=FLAGS.initialization_timeout)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  if processes > 1 and not dry_run and not is_main_process():
    # At the descriptor, not just sys.stdout: gloo prints its connections from C++.
    sys.stdout.flush()
    try:
      os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (AttributeError, OSError):  # a stdout without a descriptor (captured)
      sys.stdout = open(os.devnull, 'w')
  return processes


def is_main_process() -> bool:
  """Process 0 of a multi-process run, or the only process: the one that reports."""
  return jax.process_index() == 0


def _digest(value) -> np.ndarray:
  return np.frombuffer(bytes.fromhex(tree_digest(value)), np.uint8)


def check_same(what: str, value) -> None:
  """Usage error in every process unless all passed the same `value` (a pytree of
  arrays, numbers and strings). Every process assumes the others run the same program
  on the same inputs: other flags or files in one would mix its numbers into the sums
  silently, or leave the others waiting in a collective it never joins. Collective:
  every process must call it."""
  if jax.process_count() == 1:
    return
  every = multihost_utils.process_allgather(_digest(value))
  other = [p for p in range(len(every)) if not np.array_equal(every[p], every[0])]
  if other:
    raise app.UsageError(f'process(es) {other} have other {what} than process 0; every '
                         'process must run the same command on the same files (only '
                         '--process_id differs)')


def _broadcast_bytes(data: bytes) -> bytes:
  size = int(multihost_utils.broadcast_one_to_all(np.int32(len(data))))
  buffer = np.zeros(size, np.uint8)
  if is_main_process():
    buffer[:] = np.frombuffer(data, np.uint8)
  return multihost_utils.broadcast_one_to_all(buffer).tobytes()


def main_folder_view(folder: str, parts: tuple[str, ...]) -> str:
  """`folder` in process 0; in the others, a new temporary folder holding the files of
  process 0's `folder/<part>` for each part (sent over, so hosts need no shared file
  system), removed at exit.

  Studies read back the parts they already computed: every process must skip the same
  ones, or some would wait in collectives the others never start. The others then
  write only into their own copy. Collective: every process must call it.
  """
  if jax.process_count() == 1:
    return folder
  blob = b''
  if is_main_process():
    names, payload = [], []
    for part in parts:
      where = os.path.join(folder, part)
      for name in sorted(os.listdir(where)) if os.path.isdir(where) else ():
        path = os.path.join(where, name)
        if os.path.isfile(path) and not is_temporary(name):
          with open(path, 'rb') as f:
            payload.append(f.read())
          names.append((part, name, len(payload[-1])))
    header = json.dumps(names).encode()
    blob = len(header).to_bytes(8, 'little') + header + b''.join(payload)
  blob = _broadcast_bytes(blob)
  if is_main_process():
    return folder
  scratch = tempfile.mkdtemp(prefix=f'dynn_process{jax.process_index()}_')
  atexit.register(shutil.rmtree, scratch, ignore_errors=True)
  start = 8 + int.from_bytes(blob[:8], 'little')
  for part, name, size in json.loads(blob[8:start]):
    os.makedirs(os.path.join(scratch, part), exist_ok=True)
    with open(os.path.join(scratch, part, name), 'wb') as f:
      f.write(blob[start:start + size])
    start += size
  return scratch
