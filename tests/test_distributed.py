"""Several processes under jax.distributed (gloo on CPU) give one process's numbers, only
process 0 reports, and bad multi-process flags fail before any work."""

import json
import os
import re
import socket
import subprocess
import sys
import time

import pytest

from dynn_jax import distributed
from dynn_jax.io import read_json
from dynn_jax.networks import save_networks
from dynn_jax.training import TrainConfig
from test_evaluation import MEC2, MODEL, random_networks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A hung collective would otherwise hold CI until jax's own timeouts (minutes).
TIMEOUT_S = 240
METHODS = ('pmrl', 'kkt_weighted', 'random', 'local')
# A process whose partner failed waits in a collective; it gets this long to end too.
GRACE_S = 20
# Variables that would make a subprocess join another job than the one a test starts.
FOREIGN_ENV = ('SLURM_', 'OMPI_', 'JAX_COORDINATOR_', 'JAX_LOCAL_DEVICE_IDS')


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def process_env(devices: int) -> dict:
  env = {k: v for k, v in os.environ.items() if not k.startswith(FOREIGN_ENV)}
  env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={devices}'
  env['PYTHONPATH'] = os.path.join(ROOT, 'tests') + os.pathsep + ROOT
  return env


def run_together(tmp_path, jobs: dict[str, tuple[list[str], int]]) -> dict:
  """Starts every job at once ({label: (argv, local devices)}) and waits for all. Each
  result holds exit code, stdout and stderr; '_report' shows every process's output,
  since the process that failed first is often not the one that reports it. Processes
  still running at the timeout, or GRACE_S after another one failed, are killed."""
  procs, files = {}, {}
  for label, (argv, devices) in jobs.items():
    out = open(tmp_path / f'{label}.stdout', 'w+')
    err = open(tmp_path / f'{label}.stderr', 'w+')
    files[label] = (out, err)
    procs[label] = subprocess.Popen([sys.executable, *argv], cwd=ROOT, stdout=out, stderr=err,
                                    env=process_env(devices), text=True)
  deadline = time.monotonic() + TIMEOUT_S
  while any(p.poll() is None for p in procs.values()) and time.monotonic() < deadline:
    if any(p.poll() not in (None, 0) for p in procs.values()):
      deadline = min(deadline, time.monotonic() + GRACE_S)
    time.sleep(0.2)
  killed = False
  for proc in procs.values():
    if proc.poll() is None:
      killed = True
      proc.kill()
      proc.wait()
  results = {}
  for label, (out, err) in files.items():
    out.seek(0)
    err.seek(0)
    results[label] = {'rc': procs[label].returncode, 'stdout': out.read(),
                      'stderr': err.read()}
    out.close()
    err.close()
  results['_report'] = '\n'.join(
      f'--- {label}: exit {r["rc"]}\nstdout (tail):\n{r["stdout"][-1500:]}\n'
      f'stderr (tail):\n{r["stderr"][-3000:]}' for label, r in results.items())
  if killed:
    pytest.fail('processes killed: still running after the timeout or after another one '
                'failed (a hung collective?)\n' + results['_report'])
  return results


def ci95_resolution(stat: dict, slots: int) -> float:
  """How far the 95% half-width can move when only the order of float32 additions
  changes. It comes from sums of squares, var = E[v^2] - mean^2: where the spread is
  small beside the mean (counted ops), the variance keeps only a few of float32's
  digits, in one process as in several (a generous 16 ulp of E[v^2] here)."""
  mean, ci = stat['mean'], stat['ci95']
  var = slots * (ci / 1.96) ** 2
  d_var = 16 * 2.0 ** -24 * (mean * mean + var)
  if ci == 0:
    return 1e-12 + 1.96 * (d_var / slots) ** 0.5
  return 1e-12 + 1.96 ** 2 * d_var / (2 * slots * ci)


@pytest.fixture(scope='module')
def networks_file(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('networks') / 'networks.msgpack')
  save_networks(path, random_networks(), MEC2, MODEL, TrainConfig())
  return path


def test_two_processes_give_one_process_results(tmp_path, networks_file):
  evaluate = ['launch/evaluate.py', f'--networks={networks_file}',
              f'--methods={",".join(METHODS)}', '--slots=256', '--chunk=128']
  address = f'127.0.0.1:{free_port()}'
  together = [f'--coordinator_address={address}', '--num_processes=2']
  out = {label: str(tmp_path / f'{label}.json') for label in ('single', 'p0', 'p1')}
  start = time.perf_counter()
  # Two devices per process: the chunk is split within and across processes.
  runs = run_together(tmp_path, {
      'single': (evaluate + [f'--out={out["single"]}'], 1),
      'p0': (evaluate + together + ['--process_id=0', f'--out={out["p0"]}'], 2),
      'p1': (evaluate + together + ['--process_id=1', f'--out={out["p1"]}'], 2),
  })
  seconds = time.perf_counter() - start
  assert all(runs[label]['rc'] == 0 for label in out), runs['_report']
  assert runs['p1']['stdout'] == '', runs['_report']
  assert not os.path.exists(out['p1']), 'process 1 wrote its --out'
  assert '4 device(s)' in runs['p0']['stdout'], runs['_report']
  single = read_json(out['single'], 'single')['results']
  shared = read_json(out['p0'], 'process 0')['results']
  assert (single['devices'], shared['devices']) == (1, 4)
  assert shared['slots'] == single['slots'] == 256
  assert set(shared['methods']) == set(single['methods']) == set(METHODS)
  for method, metrics in single['methods'].items():
    for metric, stat in metrics.items():
      theirs = shared['methods'][method][metric]
      assert theirs['mean'] == pytest.approx(stat['mean'], rel=1e-6, abs=1e-12), \
          (method, metric)
      assert theirs['ci95'] == pytest.approx(
          stat['ci95'], rel=1e-6, abs=ci95_resolution(stat, 256)), (method, metric)
  print(f'three evaluations (one process; two processes of two devices) in {seconds:.1f} s')


HELPERS_SCRIPT = """
import json, os, sys
from absl import app
from dynn_jax import distributed
address, process, folder = sys.argv[1], int(sys.argv[2]), sys.argv[3]
assert distributed.initialize(address, 2, process) == 2
assert distributed.is_main_process() == (process == 0)
view = distributed.main_folder_view(folder, ('points',))
files = {}
for name in sorted(os.listdir(os.path.join(view, 'points'))):
  with open(os.path.join(view, 'points', name)) as f:
    files[name] = f.read()
distributed.check_same('settings', {'slots': 256, 'seed': [0, 1]})
try:
  distributed.check_same('settings', {'slots': 256, 'seed': [0, process]})
  refused = None
except app.UsageError as e:
  refused = str(e)
print(json.dumps({'view': view, 'files': files, 'refused': refused}))
"""


def test_process_0_folder_and_mismatched_inputs(tmp_path):
  main = tmp_path / 'main'
  (main / 'points').mkdir(parents=True)
  (main / 'points' / 'a.json').write_text('{"a": 1}')
  (main / 'points' / 'b.json').write_text('{"b": 2}')
  (main / 'points' / '.b.json.k3j9x0qz').write_text('{"b": ')  # a killed writer's
  (main / 'report.md').write_text('not a part')
  address = f'127.0.0.1:{free_port()}'
  runs = run_together(tmp_path, {
      f'p{i}': (['-c', HELPERS_SCRIPT, address, str(i), str(tmp_path / folder)], 1)
      for i, folder in enumerate(('main', 'elsewhere'))})
  assert runs['p0']['rc'] == 0 and runs['p1']['rc'] == 0, runs['_report']
  p0, p1 = (json.loads(runs[p]['stdout'].strip().splitlines()[-1]) for p in ('p0', 'p1'))
  assert p0['view'] == str(main)
  assert p1['view'] != str(main) and not (tmp_path / 'elsewhere').exists()
  assert p1['files'] == {'a.json': '{"a": 1}', 'b.json': '{"b": 2}'}
  assert p0['files'] == p1['files'] | {'.b.json.k3j9x0qz': '{"b": '}
  # Both refuse, so neither waits for the other in a collective.
  for refused in (p0['refused'], p1['refused']):
    assert refused and 'process(es) [1]' in refused and 'settings' in refused
  assert not os.path.exists(p1['view']), 'scratch copy left behind'


@pytest.mark.parametrize('args,message', [
    (['--num_processes=0'], '--num_processes = 0; must be >= 1'),
    (['--coordinator_address=127.0.0.1:8476', '--num_processes=2', '--process_id=2'],
     '--process_id = 2; must be in [0, 1]'),
    (['--coordinator_address=localhost', '--num_processes=2', '--process_id=1'],
     "--coordinator_address = 'localhost'; must be host:port"),
])
def test_bad_process_flags_refused_before_work(args, message, networks_file):
  result = subprocess.run([sys.executable, 'launch/evaluate.py', f'--networks={networks_file}',
                           '--dry_run', *args], cwd=ROOT, env=process_env(1),
                          capture_output=True, text=True, timeout=TIMEOUT_S)
  assert result.returncode != 0 and message in result.stderr, result.stderr[-1500:]
  assert 'Traceback' not in result.stderr and 'dry run' not in result.stdout


def test_initialize_checks_flags_and_environment(monkeypatch):
  for name in list(os.environ):
    if name.startswith(FOREIGN_ENV):
      monkeypatch.delenv(name)
  check = lambda *a: distributed.initialize(*a, connect=False)
  assert check() == 1
  assert check(None, 1, 0) == 1
  assert check('10.0.0.1:8476', 3, 2) == 3
  assert check('[::1]:8476', 2, 0) == 2
  for args, message in [
      ((None, -1, None), '--num_processes = -1'),
      ((None, 2, -1), '--process_id = -1; must be >= 0'),
      ((None, 1, 1), '--process_id = 1; must be in [0, 0]'),
      (('10.0.0.1:8476', None, 0), '--num_processes is required'),
      (('10.0.0.1:8476', 2, None), '--process_id is required'),
      ((None, 2, 1), '--coordinator_address is required'),
      (('10.0.0.1:0', 2, 1), 'the port must be a number in [1, 65535]'),
      (('::1:8476', 2, 1), 'must be host:port'),
      ((':8476', 2, 1), 'must be host:port')]:
    with pytest.raises(ValueError, match=re.escape(message)):
      check(*args)
  monkeypatch.setenv('JAX_COORDINATOR_ADDRESS', 'nohost')
  with pytest.raises(ValueError, match='JAX_COORDINATOR_ADDRESS'):
    check()
  monkeypatch.setenv('JAX_COORDINATOR_ADDRESS', '10.0.0.1:8476')
  with pytest.raises(ValueError, match='--num_processes is required'):
    check()
  assert check(None, 2, 1) == 2
  monkeypatch.delenv('JAX_COORDINATOR_ADDRESS')
  slurm = {'SLURM_JOB_ID': '7', 'SLURM_STEP_NODELIST': 'node[1-2]', 'SLURM_NTASKS': '1',
           'SLURM_PROCID': '0', 'SLURM_LOCALID': '0'}
  for name, value in slurm.items():
    monkeypatch.setenv(name, value)
  assert check() == 1  # a one-task job is a plain run
  monkeypatch.setenv('SLURM_NTASKS', '4')
  assert check() == 4
  with pytest.raises(ValueError, match=r'--process_id = 4; must be in \[0, 3\]'):
    check(None, None, 4)

