"""Benchmarks that print figures and return them as dicts (never timed assertions).

  timing        the one interleaved timer (`time_interleaved`; `time_calls` is it with
                one function), ahead-of-time compiles, the generic timing table
  host          device, runtime settings and load a measurement ran under
  environment   sampling, the exact allocation, the oracle and the GA
  exits         per-exit latency, batched paths, the fit, the measured latency table,
                the block sweep
  evaluation    every evaluation method's slots/s, compile time and peak memory, and
                fix_moe's GFLOP/s against a dense matmul
  bucketed      the host-grouped batched path the exits suite compares against
  variables     random network variables of the right shapes for the timing suites
  profile       a jax.profiler trace of per-slot calls and training steps

`launch/benchmark.py` runs the suites. This package re-exports what launchers and
tests use, so `from dynn_jax.benchmark import X` does not depend on the layout.
"""

from dynn_jax.benchmark.bucketed import bucketed_apply, group_by_exit
from dynn_jax.benchmark.environment import environment_suite
from dynn_jax.benchmark.evaluation import (chunk_memory, dense_reference, evaluation_suite,
                                           format_evaluation)
from dynn_jax.benchmark.exits import (block_sweep, exit_mix, exits_suite, fit_line,
                                      fit_with_experts, format_block_sweep, format_exits,
                                      latency_table, sorted_layout, table_path, targets,
                                      write_table)
from dynn_jax.benchmark.host import device_info, host_load, runtime_info
from dynn_jax.benchmark.profile import write_profile
from dynn_jax.benchmark.timing import (Entry, Timing, compile_ahead, format_table,
                                       time_calls, time_interleaved)
from dynn_jax.benchmark.variables import network_variables

__all__ = ['Entry', 'Timing', 'block_sweep', 'bucketed_apply', 'chunk_memory',
           'compile_ahead', 'dense_reference', 'device_info', 'environment_suite',
           'evaluation_suite', 'exit_mix', 'exits_suite', 'fit_line', 'fit_with_experts',
           'format_block_sweep', 'format_evaluation', 'format_exits', 'format_table',
           'group_by_exit', 'host_load', 'latency_table', 'network_variables',
           'runtime_info', 'sorted_layout', 'table_path', 'targets', 'time_calls',
           'time_interleaved', 'write_profile', 'write_table']
