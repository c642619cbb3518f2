"""dynn_jax: dynamic neural networks for resource management in mobile edge computing."""
from dynn_jax.config import ConfigError, EnvParams, MECConfig, sweep_params
from dynn_jax.env import Costs, Decision, Slots, sample_slots, slot_costs
from dynn_jax.solvers import (equal_split, objective_allocation, objective_bound,
                              optimal_allocation)

__all__ = ['ConfigError', 'Costs', 'Decision', 'EnvParams', 'MECConfig', 'Slots',
           'equal_split', 'objective_allocation', 'objective_bound', 'optimal_allocation',
           'sample_slots', 'slot_costs', 'sweep_params']
