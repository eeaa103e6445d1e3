"""ECMT: a slimmable SuperNet trained with sampled SubNets and CI-KD, and its budget search.

Modules: `method` (the method: loss, prepare, deploy), `distill` (CI-KD, mutual learning),
`cost_table` (analytic MACs per width), `budget_search` (preference and budget -> widths),
`subnets` (slicing, batch-norm recalibration, the masked path, encoder scores).

METHODS.md section 2. The model is a `MultiTaskNet` (shared encoder, one decoder per task) whose
encoder stages and decoders each slim by a multiplier from `width_choices`. What is known and
what is ours:

* **Sandwich rule [ours, as in universally slimmable networks].** Every step trains K =
  `num_subnets` configurations on the same batch: the SuperNet (max), the smallest
  configuration (min) and K - 2 random ones whose encoder stages and decoders are drawn
  independently and uniformly from the choices with the step's key (`sandwich`).
* **Bounded compilation [ours].** The max and min configurations are fixed, so they run on the
  static, sliced path (their real cost). The K - 2 random ones run on the masked path
  (`DynamicWidths`: arrays drawn inside jit, full-width compute with the surplus channels
  zeroed), unrolled in the program on CPU (a `jax.vmap` over them batched the convolution
  gradients, about 1.25x slower there: `benchmarks/method_speed.py`) and vmapped on
  accelerators (`execution.choices().passes`). The compiled step is therefore ONE
  program whatever configurations are drawn; its size grows linearly with K, its number does
  not. The price is compute: each
  random SubNet costs a full-width pass instead of its own. With the default choices and K = 4 a
  step costs about 1 + 1/16 + 2 = 3.1 SuperNet forward/backward passes, against about 2.0 if
  the random SubNets ran sliced (a random configuration has ~45% of the SuperNet's MACs on
  average). The alternative, a fixed seeded list of static configurations, would compile one
  program per distinct list entry (or one `lax.switch` branch each), trading compile time and
  sampling diversity for that compute.
* **Task loss [known: fixed task weights; ours: normalisation].** For every configuration k,
  `L^k = sum_t w_t L_t^k`; the training loss uses the mean over the K configurations,
  `(1/K) sum_k L^k`, so that its scale (and a learning rate tuned for the static baseline) does
  not depend on K.
* **CI-KD [known in intent; ours: form].** `lambda_kd * mean_k mean_s ||sg(F_max_s)[..., :C] -
  F_k_s||^2 / (elements of the slice)`: for each of the K - 1 SubNets and each encoder stage s,
  the mean squared difference between the SubNet's stage output (its C active channels) and the
  leading C channels of the SuperNet's, with the SuperNet's features as a stop-gradient teacher.
  On the masked path the zeroed channels are excluded (mean over the active channels only), so
  both paths give the same value. `lambda_kd = 0` or `kd="none"` turns it off (ablation).
  Use it on normalised features: on LeNet without batch norm the raw-activation MSE diverged
  (the SuperNet's features, pulled along by the SubNets sharing its weights, grew without
  bound), so the Multi-MNIST ECMT flag files turn LeNet's batch norm on.
* **Mutual learning [ours option, `kd="mutual"`].** In addition to CI-KD, the SuperNet and each
  SubNet match each other's task predictions in both directions, each direction against the
  other's stop-gradient prediction (`mutual_loss`): KL of temperature-softened softmaxes
  (classification, segmentation) or sigmoids (edges, saliency), times T^2 (T =
  `mutual_temperature`, default 2 [ours]); mean squared error
  for regression and depth, and for normals on unit vectors. Weighted by `lambda_mutual`, mean
  over the K - 1 (SuperNet, SubNet) pairs, task weights as for the task loss.
* **Batch norm [ours].** Training normalises with batch statistics for every configuration; the
  running statistics are updated by the SuperNet pass only (a SubNet's channels would otherwise
  mix statistics of different widths). Before evaluating or exporting a SubNet, re-estimate its
  statistics with `recalibrate_bn`.
* **Search [known rule, ours procedure].** `search(preference, budget, cost_table=...)`, from a
  `CostTable` of analytic MACs and parameters (`build_cost_table`, cacheable to JSON; a SubNet's
  cost is read from it): for every encoder configuration that fits, the decoders share what is
  left in proportion to the preference (water-filling, then leftovers to the most preferred
  tasks first: `allocate_decoders`); the
  encoder is chosen by a preference-independent validation score when given
  (`score_encoders`), else the most expensive candidate wins. Two options of ours: an encoder
  must leave `decoder_reserve` of the decoders' MACs span free, and each decoder is capped at
  `r_t / max(r)` of its full extra MACs (`preference_cap`); without them the encoder tends to
  take the whole budget, and on datasets whose decoders are cheap (classification heads) every
  decoder ends at full width whatever the preference. The preference is checked, in float64
  and renormalised to sum 1, by `dymu_jax.controls.check_preference`.

`predict(variables, images, controls)` runs the static sliced path for `{"widths": WidthConfig}`,
`{"encoder": (...), "decoders": (...)}` or `{"preference": r, "budget": b}` (resolved by the
search), so an evaluated SubNet is the slimmed network itself.
"""

from dymu_jax.methods.ecmt.budget_search import (DECODER_RESERVE, allocate_decoders,
                                                 budget_macs, search)
from dymu_jax.methods.ecmt.cost_table import (CostTable, build_cost_table, cached_cost_table,
                                              model_signature)
from dymu_jax.methods.ecmt.distill import KD_MODES, ci_kd_loss, mutual_loss, prediction_distance
from dymu_jax.methods.ecmt.method import OPTIONS, Config, ECMTMethod, Prepared, build
from dymu_jax.methods.ecmt.subnets import (MaskedSuperNet, cached_encoder_scores,
                                           masked_evaluate, masked_variables, recalibrate_bn,
                                           score_encoders, slice_subnet)

__all__ = ["DECODER_RESERVE", "KD_MODES", "OPTIONS", "Config", "CostTable", "ECMTMethod", "MaskedSuperNet",
           "Prepared", "allocate_decoders", "budget_macs", "build", "build_cost_table",
           "cached_cost_table", "cached_encoder_scores", "ci_kd_loss", "masked_evaluate",
           "masked_variables", "model_signature", "mutual_loss", "prediction_distance",
           "recalibrate_bn", "score_encoders", "search", "slice_subnet"]
