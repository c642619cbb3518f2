"""Training (SPEC section 4): the allocation DyNN by progressive shrinking, the static
baseline, the policy (supervised) and the scheduler (policy gradient).

  config  TrainConfig, phase keys, the (k, l) schedule, the miss temperature, the slots
          each step draws;
  steps   the update (`TrainState`, `update`) and one step of each phase: allocator
          (paper or objective loss), policy, joint scheduler + policy;
  loop    the scanned, checkpointed, resumable chunk loop and the phases run on it
          (`train_allocator`, `train_policy`, `train_joint`, `train_all`);
  job     `train_and_evaluate` (a run directory, trained, saved and summarised);
  summary `training_summary` (quality gaps and the held-out evaluation of a run).

A training flagfile's configs come from `dynn_jax.cli.read_flagfile`.

The quality measure lives in `dynn_jax.quality`, the networks file in
`dynn_jax.networks`; both are re-exported here for the callers that import them from
this package.
"""

from dynn_jax.networks import (LOSSES, Params, init_params, load_allocators, load_networks,
                               save_networks, trained_loss)
from dynn_jax.quality import (HELD_OUT_SEED, HeldOut, held_out, static_gap, subnetwork_gaps,
                              weighted_delays)
from dynn_jax.training.config import (DYNAMIC, SCHEDULES, TrainConfig, alloc_learning_rate,
                                      check_scheduler_training,
                                      kl_bounds, miss_temperature, phase_key, sample_kl,
                                      sample_offload, training_delay, training_slots)
from dynn_jax.training.job import run_config, train_and_evaluate
from dynn_jax.training.loop import (TrainingDiverged, chunked_phase, scan_chunk, train_all,
                                    train_allocator,
                                    train_joint, train_policy, tune_allocator)
from dynn_jax.training.steps import (JointState, TrainState, allocator_step, joint_step,
                                     moe_apply, objective_loss,
                                     option_costs, policy_loss, policy_step,
                                     static_apply, update, user_costs)
from dynn_jax.training.summary import training_summary

__all__ = [
    'DYNAMIC', 'HELD_OUT_SEED', 'TrainingDiverged', 'load_allocators', 'HeldOut', 'JointState', 'LOSSES', 'Params',
    'SCHEDULES', 'TrainConfig', 'TrainState', 'alloc_learning_rate',
    'check_scheduler_training', 'tune_allocator',
    'allocator_step',
    'chunked_phase', 'held_out', 'init_params', 'joint_step', 'kl_bounds', 'load_networks',
    'miss_temperature', 'moe_apply', 'objective_loss', 'training_delay',
    'option_costs', 'phase_key', 'policy_loss', 'policy_step',
    'run_config',
    'sample_kl', 'sample_offload', 'save_networks', 'scan_chunk', 'static_apply',
    'static_gap', 'subnetwork_gaps', 'train_all', 'train_allocator', 'train_and_evaluate',
    'train_joint', 'train_policy', 'trained_loss', 'training_slots', 'training_summary',
    'update', 'user_costs',
    'weighted_delays',
]
