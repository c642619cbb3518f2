"""Allocation and offloading solvers: exact optimum, heuristics and baselines."""
from dynn_jax.solvers.allocation import equal_split, optimal_allocation
from dynn_jax.solvers.ga import GAConfig, ga_solve
from dynn_jax.solvers.objective import (joint_objective_bound, objective_allocation,
                                        objective_bound, oracle, oracle_offload)
from dynn_jax.solvers.offloading import (all_local, all_offload, exhaustive_search,
                                         random_offload)

__all__ = ['GAConfig', 'all_local', 'all_offload', 'equal_split', 'exhaustive_search',
           'ga_solve', 'joint_objective_bound', 'objective_allocation', 'objective_bound',
           'optimal_allocation', 'oracle', 'oracle_offload', 'random_offload']
