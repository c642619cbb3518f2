"""dynn_jax: dynamic neural networks for resource management in mobile edge computing."""
from dynn_jax.config import ConfigError, MECConfig
from dynn_jax.env import Costs, Decision, Slots, sample_slots, slot_costs
from dynn_jax.solvers import (equal_split, objective_allocation, objective_bound,
                              optimal_allocation)

__all__ = ['ConfigError', 'Costs', 'Decision', 'MECConfig', 'Slots', 'equal_split',
           'objective_allocation', 'objective_bound', 'optimal_allocation', 'sample_slots',
           'slot_costs']
