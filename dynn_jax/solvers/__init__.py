"""Allocation and offloading solvers: exact optimum, heuristics and baselines."""
from dynn_jax.solvers.allocation import equal_split, optimal_allocation
