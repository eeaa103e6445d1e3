r"""The results page: finished runs collected into one Markdown page, each number with the
commands that reproduce it (`python -m experiments.results` is its command line).

    from dymu_jax import results
    found, notes = results.load_runs(["workdirs/*"], defaults)
    text = results.render(found, notes, "workdirs/results.md", "experiments/flags", plots=True,
                          defaults=defaults, reference_method="single_task")

(`defaults`: {flag: default} of the training command's flags, which the command line passes.)
Modules: `collect` (finding runs, their saved flags, summaries and evaluations, seed groups,
flag files and commands), `tables` (mean ± std with n, Delta_m, hypervolume reference points,
the tables), `plots` (loss fronts, cost against hypervolume, the evaluations' plots), `page`
(`render`).

For every workdir (a glob or a comma-separated list) that holds a finished
`python -m experiments.train` run (`summary.json` and a checkpoint): its flags are read from
the checkpoint; the flag file under `experiments/flags/` whose every setting equals the run's
flags names the training command (other flags that differ from their defaults are appended);
its final test metrics and wall time come from `summary.json`; and where
`python -m experiments.evaluate` was run (`<workdir>/eval/results.json`), its measures and the
evaluate command.

Seeds: runs whose saved training flags are all equal except `--seed` (and where they live:
`--workdir`, `--data_dir`, how they print; the folders of earlier runs that a method reads,
`MethodConfig.INPUT_DIRS` such as `--dymu_anchor_dir`, may differ as long as both are set or
both empty) form one group, shown as one row: each number is the mean ± sample standard
deviation (ddof = 1) over the group's runs with its count, `0.912 ± 0.004 (n=3)`; a number
without ± is the same in every run; a group of one run shows the run's own value, and its seed
column says n=1. A group's training and evaluation commands are one `for seed in ...` loop (one
command per seed where the runs' folders do not follow the seed).

Runs are grouped by dataset: one table of the fixed methods (baselines, GradSplit, PCGrad:
metrics, Delta_m, inference and training MACs, parameters; Delta_m of each seed against the
single-task run of the same seed, or against the mean of the single-task group where it has no
run of that seed), one table of the preference-controlled runs (DYMU, PHN and PHN-BN; the parent
folder of a staged run, whose `summary.json` lists its "stages" as DYMU's `--dymu_stage=all`
does, counts as one run: hypervolume against one shared reference point, uniformity, rank
controllability, mean cost; with a plot of the loss fronts for two tasks), one table per
budget-swept group such as ECMT's (one row per budget), and one plot of cost against hypervolume
across the methods (`<output stem>/<dataset>_cost_vs_hv.png`: MACs per example against the
hypervolume of the test losses at one reference point; PHN and PHN-BN one point, ECMT one per
budget, DYMU one per variant and resource c, plus its cost-band entries where the evaluation
wrote them; error bars over seeds). A shared reference point is the one every evaluation
concerned used where they agree (Multi-MNIST's fixed point, one `--hv_reference`), else one just
worse than all their losses. The sweeps' and ECMT's Delta_m are their evaluations' own (per
seed, then averaged). Which table a run joins follows its evaluation report (a preference sweep,
a budget sweep, or neither), else the controls training recorded. With `--copy_plots` (`plots`),
the evaluation plots are copied next to the page (`<output stem>/<run>/*.png`) and embedded (for
a seed group, those of its first run).

Nothing is re-measured here: the page shows what the runs recorded, so regenerate it after new
runs. Wall times are those of the machine and load each run had.
"""

from dymu_jax.results.collect import group_runs, load_runs
from dymu_jax.results.page import render

__all__ = ["group_runs", "load_runs", "render"]
