"""GradSplit: per-task gradient routing over channel groups of the last encoder stages.

METHODS.md section 3. The network is the hard-sharing `MultiTaskNet` (so inference costs the
same as `static`); only the backward pass differs. In the last `split_stages` stages of the
encoder, the output channels of every layer are split into T groups, one per task (relative
sizes `group_sizes`, equal by default). A routing matrix M (T x T) decides which task's gradient
reaches which group:

    M[t, s] = 1  <=>  group t takes task s's gradient;   M[t, t] = 1 always.

M = identity is the strictest split, M all ones is plain hard sharing; M may be asymmetric.

Split modules: every layer that owns parameters (convolution, batch norm, dense) inside the
split stages, named by its path below the encoder ("stage2_block0/bn2"; `split_modules`, in the
order of the params tree). Each split module k has its own routing matrix M_k (K x T x T in all):
group t of module k's output channels takes task s's gradient iff M_k[t, s] = 1. With routing
"fixed" or criterion "pooled" every M_k is the same M. (A layer that is itself a direct encoder
submodule of a split stage, such as LeNet's `fc` and `bn_fc`, is a split module too.)

Routing modes:

* "activation" (default): for task s's loss the output h of split module k is replaced by
  `h * m_ks + stop_gradient(h * (1 - m_ks))`, m_ks the channel mask of module k's groups with
  M_k[:, s] = 1. `route_gradient` is that operation written as a custom VJP (identity forward,
  cotangent times m_ks backward): same value, same gradient, but its forward does not depend
  on the mask, so the T per-task gradients share one forward pass (XLA merges the identical
  forward computations) and differ only in their backward passes. Every split module is routed,
  not just the stage output, so with M_k[t, s] = 0 task s leaves exactly zero gradient on group
  t's filters of module k (a zero cotangent on a channel also stops at the layers below it in
  the same stage), while the layers below the split still receive every task's gradient.
* "weight": the split modules' weight gradients are masked per task and module (filter = last
  axis of a kernel, bias or batch-norm scale; mask of module k from M_k); activation gradients
  flow unchanged.

Routing source:

* "learned" (default): during the first `warmup_steps` steps every M_k is all ones (hard
  sharing) while conflict statistics accumulate in the non-param collection "gradsplit" of the
  model state, for each split module k and pooled over all of them: the sum of
  cos(g_t, g_s) on group t's filters (g_t: task t's gradient restricted to group t's filters,
  i.e. to the slice of the last axis of the module's parameters) and the number of steps where
  that cosine is negative. From then on M is frozen (the statistics stop at the end of the
  warm-up) and set by `criterion` with threshold `margin`:

  - "module_mean" (default) [ours]: M_k[t, s] = 1 iff module k's running mean cosine on group t
    is >= margin (default 0.0);
  - "module_frequency" [ours]: M_k[t, s] = 1 iff the fraction of warm-up steps with a negative
    cosine on module k's group t is <= margin (default 0.5: split where most steps conflict);
  - "pooled" [ours, the first version]: one M from the cosine pooled over every split parameter,
    M[t, s] = 1 iff its running mean is >= margin (default 0.0), the same for every module.
    Measured on UTKFace and the synthetic scenes, the pooled mean came out slightly positive for
    every pair (the large aligned kernels dominate), so M was all ones, while single steps and
    single modules (the stage's last batch norm) conflicted: hence the per-module default.

  The diagonal is always 1. The switch is a `jnp.where` on the step inside the one compiled
  train step; the statistics have fixed shapes, so no criterion recompiles it.
* "fixed": M is given (`routing_matrix`), the same for every module, and used from the first
  step; no statistics.

Logged every step: "gradsplit/M_<t>_<s>", the fraction of split modules whose group t takes task
s's gradient (M[t, s] itself when every module has the same M), and "gradsplit/cos_<t>_<s>", the
pooled running mean cosine. `GradSplitMethod.save_routing` writes the routing (JSON: per-module M,
mean cosines and conflict frequencies, and the pooled ones for reference) and its heat maps (PNG)
to a folder.

Stages: a stage is the set of the encoder's direct submodules whose widths follow that stage's
multiplier (`stage_modules`; known for the LeNet, ResNet and MobileNetV2 families, or given by a
backbone's own `stage_modules()` method).
"""

from dymu_jax.methods.gradsplit.method import OPTIONS, Config, GradSplitMethod, build
from dymu_jax.methods.gradsplit.plot import plot_routing
from dymu_jax.methods.gradsplit.routing import (
    CRITERIA, DEFAULT_MARGINS, HEATMAP_FILE, MODES, ROUTING_FILE, ROUTINGS, STATE_COLLECTION,
    check_margin, group_assignment, group_boundaries, group_cosines, module_cosines,
    module_names, parse_routing_matrix, route_gradient, routing_from_cosines,
    routing_from_frequencies, routing_interceptor, stage_modules, validate_routing_matrix)

__all__ = ["CRITERIA", "DEFAULT_MARGINS", "HEATMAP_FILE", "MODES", "OPTIONS", "ROUTINGS",
           "ROUTING_FILE", "STATE_COLLECTION", "Config", "GradSplitMethod", "build",
           "check_margin", "group_assignment", "group_boundaries", "group_cosines",
           "module_cosines", "module_names", "parse_routing_matrix", "plot_routing",
           "route_gradient", "routing_from_cosines", "routing_from_frequencies",
           "routing_interceptor", "stage_modules", "validate_routing_matrix"]
