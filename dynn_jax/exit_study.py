"""Fig. 4 of the paper, for both pipelines: what every exit (k, l) of the DyNN is worth,
with and without inference delay, at several data sizes, and whether bigger exits are
better (`exit_study`, `monotonicity`).

Each exit runs as the evaluation's `exit_<k>_<l>` method (its per-slot path for every
slot), every exit on the same slots, one compiled program per delay model for all data
sizes (`evaluate_sweep` over s_avg). The networks' own policy and the `hindsight` bound
(each slot's best exit, inference delay included) run beside them, so a study point also
says how far the policy is from the best fixed exit and from the best per-slot choice.
"""

from __future__ import annotations

from dynn_jax import delay as delay_model
from dynn_jax.evaluation import EvalResult, Setting, evaluate_sweep, pick_metric
from dynn_jax.networks import Networks

# The loss each pipeline is trained for, and so the metric its exits are judged by: the
# paper's weighted delay (with each exit's inference delay weighted in, as the paper's
# Fig. 4 counts it), or the objective. Policies and hindsight are judged by the
# objective, which is what the policy's choice of exit trades.
LOSS_METRIC = {'paper': 'weighted_service', 'objective': 'objective'}
DATA_SIZES = (1000.0, 3000.0, 6000.0, 10000.0)


def exit_names(model) -> list[str]:
  return [f'exit_{k}_{l}' for k in range(1, model.num_experts + 1)
          for l in range(1, model.max_depth + 1)]


def policy_method(case: int) -> str:
  return 'policy_moe' if case == 1 else 'pmrl'


def exit_study(nets: Networks, *, slots: int, seed: int, sizes=DATA_SIZES,
               delays=None) -> dict:
  """{mode: [EvalResult dict per data size]} for every exit, the hindsight bound and
  the networks' policy, with the delay models `delays` (default none and modelled)."""
  delays = (delay_model.NONE, delay_model.MODELLED) if delays is None else delays
  names = exit_names(nets.model) + ['hindsight']
  if nets.params.policy is not None:
    names.append(policy_method(nets.mec.case))
  out = {'sizes': [float(v) for v in sizes], 'slots': slots, 'loss': nets.loss,
         'modes': [delay_model.resolve(mode).mode for mode in delays]}
  for mode in delays:
    setting = Setting(mec=nets.mec, model=nets.model, feature_config=nets.mec, delay=mode)
    results = evaluate_sweep(setting, names, nets.params, 's_avg', list(sizes), slots=slots,
                             seed=seed, progress=True)
    out[delay_model.resolve(mode).mode] = [r.to_dict() for r in results]
  return out


def exit_grid(result: EvalResult, model, metric: str) -> list[list[float]]:
  """[K][L] means of `metric` of every exit in one result."""
  return [[result.mean(f'exit_{k}_{l}', metric) for l in range(1, model.max_depth + 1)]
          for k in range(1, model.num_experts + 1)]


def monotonicity(grid: list[list[float]]) -> dict:
  """How far bigger exits are from being better: the largest relative excess of an exit
  over the one with one expert fewer, or one layer fewer (> 0: the bigger one is worse),
  where it is, and the full exit's value relative to (1, 1)."""
  worst, where = float('-inf'), None
  for k, row in enumerate(grid):
    for l, value in enumerate(row):
      for kk, ll in ((k - 1, l), (k, l - 1)):
        if kk < 0 or ll < 0:
          continue
        excess = value / grid[kk][ll] - 1.0
        if excess > worst:
          worst, where = excess, ((k + 1, l + 1), (kk + 1, ll + 1))
  return {'worst_excess': worst, 'bigger': where[0], 'smaller': where[1],
          'full_vs_smallest': grid[-1][-1] / grid[0][0] - 1.0}


def policy_gaps(result: EvalResult, model, policy: str, metric: str = 'objective') -> dict:
  """The policy against the best fixed exit and the hindsight bound (relative), the best
  fixed exit's name, and the policy's picks (share of slots per exit, largest first)."""
  exits = exit_names(model)
  best = min(exits, key=lambda name: result.mean(name, metric))
  value = result.mean(policy, metric)
  picks = {name[5:]: result.mean(policy, pick_metric(*map(int, name[5:].split('_'))))
           for name in exits}
  picks = dict(sorted(((k, v) for k, v in picks.items() if v > 0), key=lambda kv: -kv[1]))
  return {'best_exit': best, 'vs_best_exit': value / result.mean(best, metric) - 1.0,
          'vs_hindsight': value / result.mean('hindsight', metric) - 1.0, 'picks': picks}
