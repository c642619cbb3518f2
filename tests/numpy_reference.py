"""Independent NumPy versions of the system model, written from SPEC section 1."""

import numpy as np


def rate(b, l, cfg):
  snr = cfg.g0 * (cfg.l0 / l) ** cfg.path_loss_exp * cfg.p_tx / (np.maximum(b, 1e-300) * cfg.noise_psd)
  return np.where(b > 0, b * np.log2(1.0 + snr), 0.0)


def divide(num, den):
  with np.errstate(divide='ignore', invalid='ignore'):
    out = num / den
  out = np.where(num == 0, 0.0, out)
  return np.where((num != 0) & (den == 0), np.inf, out)


def weights(s, c, d, cfg):
  return cfg.gamma * (c / (2 * cfg.c_avg)) * (s / (2 * cfg.s_avg)) / (d * 1000.0)


def costs(slot, x, b, f, cfg, t_inf_edge=0.0, t_inf_loc=0.0):
  """One slot, real users only (arrays of length N). Returns a dict of everything."""
  s, c, d, l, f_loc = (np.asarray(slot[k], np.float64) for k in ('s', 'c', 'd', 'l', 'f_loc'))
  x = np.asarray(x, bool)
  t_tra = divide(s, rate(b, l, cfg))
  t_com = divide(c * s, f)
  t_loc = divide(c * s, f_loc)
  out = {'t_tra': np.where(x, t_tra, 0.0), 't_com': np.where(x, t_com, 0.0)}
  delay = np.where(x, t_inf_edge + t_tra + t_com, t_inf_loc + t_loc)
  energy = np.where(x, cfg.p_tx * t_tra, cfg.mu * c * s * f_loc ** 2)
  miss = delay > d
  w = weights(s, c, d, cfg)
  out.update(
      delay=delay, energy=energy, miss=miss, weight=w,
      objective=np.sum(cfg.alpha * delay + cfg.beta * energy + cfg.delta * miss),
      mean_delay=delay.mean(), miss_ratio=miss.mean(), total_energy=energy.sum(),
      weighted_delay=np.sum(np.where(x & (w > 0), w * (t_tra + t_com), 0.0)))
  return out


def optimal_bandwidth(ws, k, b_max, iters=200):
  """Nested bisection straight on the KKT condition -d/db [ws / r(b)] = nu."""
  def marginal(b):  # -d/db of ws / (b log2(1 + k/b)), decreasing in b
    g = b * np.log2(1 + k / b)
    dg = np.log2(1 + k / b) - (k / b) / ((1 + k / b) * np.log(2))
    return ws * dg / g ** 2

  def b_of(nu):
    lo, hi = np.full_like(ws, 1e-12 * b_max), np.full_like(ws, b_max * 10)
    for _ in range(iters):
      mid = np.sqrt(lo * hi)
      big = marginal(mid) > nu
      lo, hi = np.where(big, mid, lo), np.where(big, hi, mid)
    return np.sqrt(lo * hi)

  lo, hi = 1e-30, 1e30
  for _ in range(iters):
    mid = np.sqrt(lo * hi)
    if b_of(mid).sum() > b_max:
      lo = mid
    else:
      hi = mid
  b = b_of(np.sqrt(lo * hi))
  return b * b_max / b.sum()
