"""The published figures we reproduce (SPEC section 6; readings of the paper's plots,
approximate). Delays in ms, miss ratios in %, energy in J. Each entry gives the values
at the first and the last point of the sweep."""

MEAN_DELAY_MS = {
    'case1_data': {'policy_moe': (7.0, 52.0), 'fix_moe': (10.0, 54.5), 'static': (20.0, 64.0),
                   'ga': (4670.0, 4670.0)},
    'case1_tasks': {'policy_moe': (4.8, 19.3), 'fix_moe': (5.7, 24.8), 'static': (8.9, 39.8)},
    'case1_cpu': {'policy_moe': (28.5, 8.8), 'static': (59.5, 16.5)},
    'case2_data': {'pmrl': (3.8, 28.0), 'static': (7.5, 30.0), 'local': (8.0, 62.0)},
    'case2_tasks': {'local': (15.4, 15.4)},
}
MISS_PERCENT = {
    'case1_data': {'policy_moe': (5.5, 63.0), 'static': (25.0, 71.0), 'ga': (100.0, 100.0)},
}
# Fig. 11, 3 -> 10 kbit: share of the inference delay in the total delay.
INFERENCE_SHARE = {'static': (0.21, 0.07), 'fix_moe': (0.068, 0.021),
                   'policy_moe': (0.019, 0.010)}
# Fig. 4: weighted delay (the paper's unit) at depth 3, 1 -> 10 experts.
MODEL_SIZE = {'without_inference_depth1': (19.12, 18.60),
              'without_inference_depth3': (18.54, 18.31),
              'with_inference_depth3_k2': 18.61, 'with_inference_depth3_k10': 19.11}
# Fig. 12: training wall time (s), progressive shrinking vs from scratch (the order of
# training.config.SCHEDULES).
TRAINING_SECONDS = {'full': (29.5, 75.5), 'width': (11.0, 47.0), 'depth': (11.0, 12.5)}
# Table I: the allocation network's dynamic part (experts) and fixed part.
TABLE_ONE = {'dynamic ops': 5.126e6, 'dynamic parameters': 87.04e3, 'fixed ops': 0.302e6,
             'fixed parameters': 7.291e3}
