"""The held-out summary of a trained run (what `job.train_and_evaluate` writes as
summary.json and prints): every sub-network's gap to the weighted optimum and the
case's default methods evaluated on held-out slots, with the inference delays the
networks were trained for.

It evaluates and formats (with the evaluation's and quality's own tables); it trains nothing
and writes no file (the job writes the run directory).
"""

from __future__ import annotations

from dynn_jax.config import MECConfig
from dynn_jax.evaluation import Setting, default_methods, evaluate, methods_table
from dynn_jax.models import ModelConfig
from dynn_jax.networks import Params
from dynn_jax.quality import HELD_OUT_SEED, gap_table, quality_gaps
from dynn_jax.training.config import TrainConfig, training_delay


def training_summary(mec: MECConfig, model: ModelConfig, train: TrainConfig,
                     params: Params, chunk: int = 8192) -> dict:
  """{'quality', 'evaluation', 'text'}: the quality gaps, the held-out results as a dict
  and both as the text a launcher prints."""
  quality = quality_gaps(mec, model, params, min(train.eval_slots, 4096))
  # Judged with the delays it was trained for (a measured table's, for a device's policy).
  setting = Setting(mec=mec, model=model, feature_config=mec,
                    delay=training_delay(model, mec, train))
  results = evaluate(setting, default_methods(mec, params), params, slots=train.eval_slots,
                     chunk=chunk, seed=HELD_OUT_SEED)
  text = [gap_table(quality['subnetwork_gap'])]
  if 'static_gap' in quality:
    text.append(f'static baseline gap: {100 * quality["static_gap"]:.2f} %')
  text.append(f'\nheld-out evaluation (case {mec.case}, trained with loss={train.loss}), '
              f'{results.slots} slots, {results.mode} inference delay:')
  text.append(methods_table(results))
  return {'quality': quality, 'evaluation': results.to_dict(), 'text': '\n'.join(text)}
