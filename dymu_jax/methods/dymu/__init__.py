"""DYMU: controllable dynamic multi-task architectures (METHODS.md section 1).

Modules: `method` (the stage method, its controller and deployment), `regulariser` (parent
sampling and the branching regulariser), `hypernets` (edge and weight hypernetworks), `anchor`
(anchor losses and task weights, streams from a trunk, stream divergence, probe trees).

Given a task preference `r` (on the simplex) and a resource preference `c` in [0, 1] (larger is
more frugal), one trained system outputs a tree-structured multi-task network (`branched.Tree`)
and batch-norm-adapted weights, without retraining. The training stages share one
`DymuMethod` (field `stage`):

0. **"pretrain"** (with `anchor_init="trunk"`, the default): one trunk trained with hard
   sharing on every task (the shared tree of stream 0 and all decoders), the stand-in for the
   paper's one pretrained backbone that every stream fine-tunes.
1. **"anchor"** [known]: the N single-task streams of a `branched.BranchedNet`, trained on the
   separate tree with `sum_t w_t L_t` (streams share no parameters, so each learns alone). Then
   frozen; `affinity.task_affinity` computes the RSA task affinity A from it, and
   `anchor_task_losses` the single-task losses that set `w_i = 1 / L_i^anchor`, scaled to
   mean 1 [ours], measured on held-out images. The paper's anchor "is initialized using
   weights from N pre-trained single-task models" that fine-tune one pretrained backbone: with
   `anchor_init="trunk"` every stream starts as a copy of the pretrained trunk and is
   fine-tuned gently (its own learning rate and steps), so the streams' channels still
   correspond and a low-level cross-task edge is cheap. Streams from one random draw
   ("shared") or independent draws ("independent") end as far apart as independent networks,
   and every cross edge is catastrophic (`stream_divergence` and `probe_trees` measure this
   on a trained anchor).
2. **"edge"** [known]: the edge hypernetwork h(r, c) -> parent logits (L, N, N), trained with
   `sum_i r_i w_i L_i + Omega` on the soft mixing of the frozen anchor, parents drawn by
   Gumbel-softmax (temperature 5, x0.97 every 300 steps) [known]; soft weighted-sum relaxation
   [ours, as in the branched-search code it builds on].
3. **"weight"** [known]: the weight hypernetwork g(r, c) -> additive shifts of every node's
   batch-norm scale and bias, trained with the task loss `sum_i r_i w_i L_i` only; anchor and
   edge hypernetwork frozen; the network is the argmax tree of h(r, c) [ours], run as the soft
   mixing with one-hot parents (equal to the tree forward, and one compiled program whatever
   tree the preference selects).

Every step draws one preference per batch, r ~ Dirichlet(0.2 * 1_N), c ~ Uniform(0, 1) [known]
(`controls.sample_controls`).

**Branching regulariser** (`branching_regularizer`) [known form]: A = {i : r_i >= tau} (active
tasks), I the rest, tau = 0.6 / N;

  L_active = sum_{l=1..L} sum_{i != j in A} ((L - l) / L) A(i, j) P_use(l, i) P_use(l, j)
             ||nu_l(i) - nu_l(j)||^2
  L_inactive = sum_l sum_{j in I} min_{i in A} ||nu_l(i) - nu_l(j)||^2
  Omega = c * lambda_A * L_active + lambda_I * L_inactive   (lambda_A = 1, lambda_I = 0.1)

with `nu_l(j)` = `nu[l - 1][j]`, the parent distribution of node (l, j) (decoder j for l = L).
As printed, the depth factor is (L - l) / L with l = 1..L (`depth_factor="paper"`, the default):
the decoders' parent choice weighs 0, the first weighs (L - 1) / L, so sharing is pulled into
low layers first. `depth_factor="shifted"` [ours, earlier default] counts l from 0 (1 down to
1 / L, every choice pulled). `P_use(l, i)`, the probability that node (l, i) is in the sampled
tree [ours]: decoders (node layer L) have P_use = 1; going down,
`P_use(l, i) = 1 - prod_k (1 - nu[l][k, i] P_use(l + 1, k))` (`parent_use_probability`). It is
a usage weight: by default its gradient is stopped (`use_gradient="stop"`); "flow" lets h lower
the term by making nodes unused, which measured as strong a pull at the decoders as at the
first block. There is no FLOPs loss: cost emerges from c.

**Batch norm [ours].** The anchor is frozen with its running statistics: stages 2 and 3 run
its batch norms in evaluation mode, so the only thing that adapts normalisation is the weight
hypernetwork's shift.

**Hypernetworks** [known sizes]: each has learned task embeddings e_1..e_N and a resource
embedding e_c (dimension 32) and reads `p = sum_i r_i e_i + c e_c`. The edge hypernetwork has an
MLP of 2 hidden layers of width 100 and L linear heads of N x N logits; the weight
hypernetwork an MLP of 3 hidden layers of width 100 and one linear head onto every batch-norm
scale and bias of every node (equivalent to one head per batch-norm layer). Its head starts at
zero [ours], so stage 3 starts from the anchor exactly.

**Controls and inference.** `predict(variables, images, {"preference": r, "resource": c})`;
`{"tree": Tree}` runs a given tree on the anchor, None the anchor itself. `controller(variables)
.predict(r, c)` returns the argmax tree and the adapted variables; `BranchedNet.apply_tree` then
computes only the used nodes and `BranchedNet.tree_cost` prices them. r and c are checked by
`controls.check_preference` and `controls.check_resource` (one sentence for a bad value).

Variables per stage (the engine differentiates "params" only; the frozen parts ride along as
other collections of the model state):

  pretrain, anchor: {"params": <BranchedNet params>, "batch_stats": ...}
  edge:   {"params": {"edge_hypernet": ...}, "anchor": <anchor variables>}
  weight: {"params": {"weight_hypernet": ...}, "anchor": ..., "edge_hypernet": {"params": ...}}

A stage starts from the earlier stage's variables as those collections: the stage runner
(`dymu_jax.train.stages`, with the stages `Config.plan` returns and the hooks of
`dymu.stages`: affinity, anchor report) restores the earlier stage's checkpoint and hands them to
`train.train(..., initial_variables=...)` (the anchor from a trunk: its "params" and
"batch_stats", `streams_from_trunk` of the trunk); `DymuMethod.required_variables` names the
ones a stage needs, and training refuses to start without them. A stage's own checkpoint holds
them, so a trained stage loads without its earlier stages' folders. In Python,
`stage_variables(trunk=..., anchor=..., edge_params=...)` makes those collections out of the
earlier stages' variables: give them to `train.train(..., initial_variables=...)`, or, calling
`init`/`loss`/`predict` directly, put them over `init`'s stand-ins:
`{**method.init(rng, batch), **stage_variables(anchor=anchor_variables)}`.
"""

from dymu_jax.methods.dymu.anchor import (anchor_task_losses, probe_trees, stream_divergence,
                                          streams_from_trunk, task_weights_from_losses)
from dymu_jax.methods.dymu.hypernets import (ControlEmbedding, EdgeHypernet, WeightHypernet,
                                             shift_unraveler)
from dymu_jax.methods.dymu.method import (ANCHOR_INITS, MODEL_OPTIONS, OPTIONS, STAGES,
                                          DymuController, DymuMethod, apply_tree, build,
                                          build_registered)
from dymu_jax.methods.dymu.config import TASK_WEIGHTS, Config
from dymu_jax.methods.dymu.stages import stage_variables
from dymu_jax.methods.dymu.regulariser import (DEPTH_FACTORS, USE_GRADIENTS, active_tasks,
                                               branching_regularizer, depth_weights,
                                               gumbel_softmax, hard_parents,
                                               parent_use_probability, temperature)

__all__ = ["ANCHOR_INITS", "DEPTH_FACTORS", "MODEL_OPTIONS", "OPTIONS", "STAGES",
           "TASK_WEIGHTS", "USE_GRADIENTS", "Config", "ControlEmbedding", "DymuController", "DymuMethod", "EdgeHypernet",
           "WeightHypernet", "active_tasks", "anchor_task_losses", "apply_tree",
           "branching_regularizer", "build", "build_registered", "depth_weights", "gumbel_softmax", "hard_parents",
           "parent_use_probability", "probe_trees", "shift_unraveler", "stage_variables",
           "stream_divergence", "streams_from_trunk", "task_weights_from_losses", "temperature"]
