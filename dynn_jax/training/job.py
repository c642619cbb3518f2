"""A training job as one function: `train_and_evaluate` trains every network into a run
directory, saves them and writes the held-out summary (what `launch/train.py` runs and
`launch/reproduce.py --retrain` calls).

This module does not parse command lines or flagfiles (`dynn_jax.cli` does, and
`cli.read_flagfile` gives the configs this job takes).
"""

from __future__ import annotations

import time

from dynn_jax import runs
from dynn_jax.config import MECConfig
from dynn_jax.models import ModelConfig
from dynn_jax.networks import Networks, save_networks
from dynn_jax.runs import RunDir
from dynn_jax.training.config import TrainConfig, check_scheduler_training
from dynn_jax.training.loop import train_all
from dynn_jax.training.summary import training_summary


def run_config(mec: MECConfig, model: ModelConfig, train: TrainConfig) -> dict:
  """What a run directory records, and what a resumed run must match."""
  return {'mec': mec.to_dict(), 'model': model.to_dict(), 'train': train.to_dict()}


def train_and_evaluate(mec: MECConfig, model: ModelConfig, train: TrainConfig,
                       run_dir: str, *, resume: bool, eval_chunk: int = 8192
                       ) -> tuple[Networks, dict]:
  """Trains every network in `run_dir` (continuing its checkpoints with `resume`),
  writes `networks.msgpack` and `summary.json` there, and returns the networks and the
  summary (`summary.training_summary`: quality gaps and the held-out evaluation,
  `eval_chunk` slots per compiled call).

  Raises runs.RunDirError, before any work, for a directory that another run uses, that
  holds a run without `resume`, or whose run had another config.
  """
  if isinstance(eval_chunk, bool) or not isinstance(eval_chunk, int) or eval_chunk < 1:
    raise ValueError(f'eval_chunk = {eval_chunk!r}; must be a positive integer')
  check_scheduler_training(model, train)
  config = run_config(mec, model, train)
  runs.check_start(run_dir, config, resume)
  run = RunDir(run_dir)
  with run.locked():
    run.write_config(config, resume=resume)
    start = time.perf_counter()
    params = train_all(mec, model, train, run)
    wall = time.perf_counter() - start
    save_networks(run.file('networks.msgpack'), params, mec, model, train)
    # This process's part (a resumed run counts its own): the report's training cost.
    summary = training_summary(mec, model, train, params, chunk=eval_chunk) | {
        'train_wall_s': wall}
    run.write_summary(summary)
  return Networks(params, mec, model, train.loss, config), summary
