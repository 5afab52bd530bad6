"""Strategies compared within a setup: mean ± std over seeds, paired differences, checks."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats

from ..records import COLUMNS
from .runs import PLACE_KEYS, REFERENCE, SINGLE_EXPERT, STRATEGY_ORDER, UNBOUNDED_STRATEGIES, Run

# (column, what it is) compared between FLEX-MoE and each other strategy, paired by seed
COMPARED: list[tuple[str, str]] = [
    ("final_local_acc", "final local accuracy"),
    ("final_global_acc", "final global accuracy"),
    ("load_cv", "expert load CV per round"),
]
# Compared columns where lower is better (the verdict flips); shown as raw differences,
# the accuracies in points. Not compared with strategies whose load is not k_c of E.
LOWER_IS_BETTER = ("load_cv", "cum_load_cv")
CONFIDENCE = 0.95
BETTER, NO_DIFFERENCE, WORSE, TOO_FEW = (
    "better",
    "no detectable difference",
    "worse",
    "too few seeds",
)


# ------------------------------------------------------------------ the comparison
def base_strategy(label: str) -> str:
    """Return the strategy a label names (``flexmoe β=0.2`` -> ``flexmoe``)."""
    return label.split(" ", 1)[0]


def _order(strategy: str) -> tuple[int, str]:
    name = base_strategy(strategy)
    return (STRATEGY_ORDER.index(name) if name in STRATEGY_ORDER else 99, strategy)


def _is_single_expert(run: Run) -> bool:
    return base_strategy(run.strategy) == SINGLE_EXPERT


def group_runs(runs: Sequence[Run]) -> dict[str, dict[str, list[Run]]]:
    """Return ``{setup: {strategy: runs sorted by seed}}``, setups and strategies ordered.

    Single-expert runs (:data:`SINGLE_EXPERT`) join every setup of the same data
    (:attr:`Run.data`) as a strategy of its own; with no such setup they form their own.
    """
    groups: dict[str, dict[str, list[Run]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        if not _is_single_expert(run):
            groups[run.setup][run.strategy].append(run)
    data_of = {run.setup: run.data for run in runs if not _is_single_expert(run)}
    for run in filter(_is_single_expert, runs):
        homes = [setup for setup, data in data_of.items() if data and data == run.data]
        for setup in homes or [run.setup]:
            groups[setup][run.strategy].append(run)
    return {
        setup: {
            strategy: sorted(by_strategy[strategy], key=lambda r: r.seed)
            for strategy in sorted(by_strategy, key=_order)
        }
        for setup, by_strategy in sorted(groups.items())
    }


def aggregate_runs(runs: Sequence[Run]) -> dict[str, dict[str, dict[str, Any]]]:
    """Return ``{setup: {strategy: {column: (mean, std), 'seeds': [...]}}}``.

    The std is the sample standard deviation over seeds (``ddof=1``; 0 for one seed).
    """
    table: dict[str, dict[str, dict[str, Any]]] = {}
    for setup, by_strategy in group_runs(runs).items():
        table[setup] = {}
        for strategy, members in by_strategy.items():
            rows = [r.summary() for r in members]
            stats_: dict[str, Any] = {"seeds": [r.seed for r in members]}
            for column, _ in COLUMNS:
                values = np.array([row[column] for row in rows], dtype=float)
                finite = values[np.isfinite(values)]
                stats_[column] = (
                    (float(finite.mean()), float(finite.std(ddof=1)) if finite.size > 1 else 0.0)
                    if finite.size
                    else (np.nan, np.nan)
                )
            table[setup][strategy] = stats_
    return table


def paired_t_interval(
    differences: Sequence[float], confidence: float = CONFIDENCE
) -> tuple[float, float, float]:
    """Return (mean, low, high): the Student-t confidence interval of a mean difference.

    ``differences`` are per-seed differences of paired runs; the interval is
    mean ± t_{(1+confidence)/2, n-1} · s / sqrt(n) with s the sample standard
    deviation. With fewer than two differences the bounds are NaN.
    """
    d = np.asarray(differences, dtype=float)
    if d.size == 0:
        return (np.nan, np.nan, np.nan)
    mean = float(d.mean())
    if d.size < 2:
        return (mean, np.nan, np.nan)
    half = float(stats.t.ppf((1 + confidence) / 2, d.size - 1) * d.std(ddof=1) / math.sqrt(d.size))
    return (mean, mean - half, mean + half)


def verdict(low: float, high: float, higher_is_better: bool = True) -> str:
    """Say what an interval of (reference − other) shows: better, worse, or neither.

    An interval that touches 0 detects no difference; ``higher_is_better=False`` (a
    load CV) flips the reading.
    """
    if math.isnan(low) or math.isnan(high):
        return TOO_FEW
    above, below = low > 0, high < 0
    if not higher_is_better:
        above, below = below, above
    if above:
        return BETTER
    if below:
        return WORSE
    return NO_DIFFERENCE


@dataclass(frozen=True)
class PairedDifference:
    """FLEX-MoE minus another strategy on one metric, over the seeds both completed."""

    setup: str
    other: str
    metric: str
    seeds: list[int]
    mean: float
    low: float
    high: float
    verdict: str


def compare_to_reference(
    by_strategy: Mapping[str, Sequence[Run]],
    setup: str = "",
    reference: str = REFERENCE,
    metrics: Sequence[str] = tuple(c for c, _ in COMPARED),
) -> list[PairedDifference]:
    """Return ``reference`` − every other strategy per metric, paired by seed.

    Only seeds both strategies completed (and measured the metric) are paired; the
    interval is :func:`paired_t_interval`'s. Load metrics (:data:`LOWER_IS_BETTER`)
    are not compared with strategies whose clients hold all experts
    (:data:`UNBOUNDED_STRATEGIES`). Empty if ``reference`` has no run.
    """
    if reference not in by_strategy:
        return []
    ours = {r.seed: r.summary() for r in by_strategy[reference]}
    out = []
    for other, runs in by_strategy.items():
        if other == reference:
            continue
        theirs = {r.seed: r.summary() for r in runs}
        unbounded = base_strategy(other) in UNBOUNDED_STRATEGIES
        for metric in metrics:
            if unbounded and metric in LOWER_IS_BETTER:
                continue
            seeds = sorted(
                s
                for s in set(ours) & set(theirs)
                if np.isfinite(ours[s][metric]) and np.isfinite(theirs[s][metric])
            )
            diffs = [ours[s][metric] - theirs[s][metric] for s in seeds]
            mean, low, high = paired_t_interval(diffs)
            judged = verdict(low, high, metric not in LOWER_IS_BETTER)
            out.append(PairedDifference(setup, other, metric, seeds, mean, low, high, judged))
    return out


def pairing_problems(runs: Sequence[Run]) -> list[str]:
    """Check that the runs of one (setup, seed) trained on the same data, once each.

    The partition and the initial model are functions of the setup and the seed, so
    every strategy of a seed must report the same number of training examples in
    round 1 (when every client took part). And a (setup, strategy, seed) must have one
    run: two are runs of settings the setup and label do not show (they would count
    as two seeds, and only one would be paired). Each problem is returned as a message.
    """
    problems = []
    for setup, by_strategy in group_runs(runs).items():
        seen: dict[int, dict[float, list[str]]] = defaultdict(lambda: defaultdict(list))
        for strategy, members in by_strategy.items():
            for run in members:
                examples = run.records[0].training.examples if run.records else None
                if examples is not None:
                    seen[run.seed][float(examples)].append(strategy)
            problems += _duplicates(setup, strategy, members)
        problems += [
            f"{setup}, seed {seed}: training examples in round 1 differ: "
            + "; ".join(f"{int(n)} ({', '.join(sorted(s))})" for n, s in sorted(counts.items()))
            for seed, counts in sorted(seen.items())
            if len(counts) > 1
        ]
    return problems


def _duplicates(setup: str, strategy: str, members: Sequence[Run]) -> list[str]:
    """Return a message per seed with more than one run of ``strategy``."""
    by_seed: dict[int, list[Run]] = defaultdict(list)
    for run in members:
        by_seed[run.seed].append(run)
    messages = []
    for seed, same in sorted(by_seed.items()):
        if len(same) < 2:
            continue
        keys = sorted(
            key
            for key in set().union(*(r.settings for r in same))
            if not key.startswith(PLACE_KEYS) and len({r.settings.get(key) for r in same}) > 1
        )
        hint = (
            f"they differ in {', '.join(keys)} (tell them apart: --setup-keys {' '.join(keys)})"
            if keys
            else "same settings (a repeated run?)"
        )
        messages.append(
            f"{setup}, {strategy}, seed {seed}: {len(same)} runs "
            f"({', '.join(r.path.name for r in same)}); {hint}"
        )
    return messages
