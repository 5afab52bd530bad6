"""Turn result folders into comparison tables, paired confidence intervals and plots.

    flexmoe-report multirun/cifar10_dirichlet multirun/search --out docs/results

Every folder below the given ones that holds ``config.yaml`` is one run. A run counts
as a result only when it *completed*: ``summary.json`` exists and, if it has a
``status``, that status is ``"completed"``. Failed and unfinished runs are listed as
such and left out of the figures.

Completed runs are grouped by **setup** (dataset, partition, model, experts, clients,
capacities, rounds) and, within a setup, by **strategy**: the strategy's name, plus
any method setting that differs from ``conf/``'s default (``flexmoe β=0.2``), so an
ablation sits beside the default as a strategy of its own. Per setup the report gives

- mean ± std over seeds of every column of :data:`COLUMNS` (the figures of
  :class:`~flexmoe_core.records.RunSummary`);
- FLEX-MoE (the default ``flexmoe``) against every other strategy: the **paired**
  per-seed difference (strategies of one seed share its data partition and its
  initial model) with a 95 % Student-t confidence interval on the paired differences,
  and a verdict (better / no detectable difference / worse);
- plots: accuracy and expert-load CV per round (mean ± std band over seeds) and the
  expert-load heatmaps on one colour scale; across setups, the differences with their
  intervals in one figure.

``runs.csv`` has one row per run. A folder holding sweep jobs (``status.json``, written
by ``flexmoe-sweep``) also gets a trials table. This package also defines what a run's
objective is (:data:`OBJECTIVES`) and how a job's status is recorded
(:class:`JobStatus`).

Modules: :mod:`.runs` reads run folders, :mod:`.compare` groups and compares them,
:mod:`.tables` writes the tables, :mod:`.sweeps` the sweep jobs' trials, :mod:`.cli`
puts it together (``flexmoe-report``).
"""

from ..records import COLUMNS
from ..results import COMPLETED, FAILED
from .cli import build_report, main, plot_setup
from .compare import (
    BETTER,
    COMPARED,
    CONFIDENCE,
    LOWER_IS_BETTER,
    NO_DIFFERENCE,
    TOO_FEW,
    WORSE,
    PairedDifference,
    aggregate_runs,
    base_strategy,
    compare_to_reference,
    group_runs,
    paired_t_interval,
    pairing_problems,
    verdict,
)
from .runs import (
    INCOMPLETE,
    OBJECTIVES,
    REFERENCE,
    SINGLE_EXPERT,
    STRATEGY_ORDER,
    UNBOUNDED_STRATEGIES,
    VARIANT_KEYS,
    Run,
    describe_data,
    describe_partition,
    describe_setup,
    find_runs,
    load_run,
    run_objective,
    run_state,
    strategy_label,
    variant_settings,
)
from .sweeps import (
    JOB_STATUS_FILE,
    SEARCH_RESULTS_FILE,
    JobStatus,
    best_job,
    find_sweep_jobs,
    varying_params,
    write_trials,
)
from .tables import COMPARISON_COLUMNS, RUN_COLUMNS, comparison_table, write_run_rows, write_tables

__all__ = [
    "BETTER",
    "COLUMNS",
    "COMPARED",
    "COMPARISON_COLUMNS",
    "COMPLETED",
    "CONFIDENCE",
    "FAILED",
    "INCOMPLETE",
    "JOB_STATUS_FILE",
    "LOWER_IS_BETTER",
    "NO_DIFFERENCE",
    "OBJECTIVES",
    "REFERENCE",
    "RUN_COLUMNS",
    "SEARCH_RESULTS_FILE",
    "SINGLE_EXPERT",
    "STRATEGY_ORDER",
    "TOO_FEW",
    "UNBOUNDED_STRATEGIES",
    "VARIANT_KEYS",
    "WORSE",
    "JobStatus",
    "PairedDifference",
    "Run",
    "aggregate_runs",
    "base_strategy",
    "best_job",
    "build_report",
    "compare_to_reference",
    "comparison_table",
    "describe_data",
    "describe_partition",
    "describe_setup",
    "find_runs",
    "find_sweep_jobs",
    "group_runs",
    "load_run",
    "main",
    "paired_t_interval",
    "pairing_problems",
    "plot_setup",
    "run_objective",
    "run_state",
    "strategy_label",
    "variant_settings",
    "varying_params",
    "verdict",
    "write_run_rows",
    "write_tables",
    "write_trials",
]
