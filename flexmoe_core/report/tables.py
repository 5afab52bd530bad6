"""The report's tables: ``results.md``, ``results.csv``, ``comparisons.csv``, ``runs.csv``."""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..records import COLUMNS
from .compare import COMPARED, CONFIDENCE, LOWER_IS_BETTER, PairedDifference, _order
from .runs import REFERENCE, Run

COMPARISON_COLUMNS = [
    "setup",
    "reference",
    "other",
    "metric",
    "seeds",
    "mean",
    "ci_low",
    "ci_high",
    "verdict",
]


def _fmt(mean: float, std: float, column: str) -> str:
    if np.isnan(mean):
        return "–"
    if column.endswith("acc"):
        return f"{100 * mean:.1f} ± {100 * std:.1f}"
    if column == "wall_s":
        return f"{mean:.0f} ± {std:.0f}"
    if column == "mb_per_round":
        return f"{mean:.2f}"
    return f"{mean:.3f} ± {std:.3f}"


def _fmt_difference(diff: PairedDifference) -> str:
    """Accuracies in points (one decimal), load CVs as they are (three decimals)."""
    if not diff.seeds:
        return "–"
    scale, form = (1, "{:+.3f}") if diff.metric in LOWER_IS_BETTER else (100, "{:+.1f}")
    text = form.format(scale * diff.mean)
    if math.isnan(diff.low):
        return text
    return f"{text} [{form.format(scale * diff.low)}, {form.format(scale * diff.high)}]"


def comparison_table(differences: Sequence[PairedDifference]) -> list[str]:
    """Return the Markdown table of one setup's paired differences.

    Accuracies in points; load CVs as they are (lower is better, so a negative
    difference is ``better``).
    """
    metrics = list(dict.fromkeys(d.metric for d in differences))
    names = dict(COMPARED)
    head = "| FLEX-MoE − | seeds | " + " | ".join(
        f"{names.get(m, m)}: Δ{'' if m in LOWER_IS_BETTER else ' points'} [95 % CI] | verdict"
        for m in metrics
    )
    lines = [head + " |", "|---" * (2 + 2 * len(metrics)) + "|"]
    by_other: dict[str, dict[str, PairedDifference]] = defaultdict(dict)
    for diff in differences:
        by_other[diff.other][diff.metric] = diff
    for other, by_metric in by_other.items():
        seeds = max((len(d.seeds) for d in by_metric.values()), default=0)
        cells = []
        for metric in metrics:
            diff = by_metric.get(metric)
            cells += ["–", "–"] if diff is None else [_fmt_difference(diff), diff.verdict]
        lines.append(f"| {other} | {seeds} | " + " | ".join(cells) + " |")
    return lines


def write_tables(
    table: dict[str, dict[str, dict[str, Any]]],
    out: Path,
    not_counted: Sequence[tuple[str, Path]] = (),
    differences: Mapping[str, Sequence[PairedDifference]] | None = None,
    pairing: Sequence[str] = (),
) -> None:
    """Write ``results.md``, ``results.csv`` and ``comparisons.csv`` under ``out``.

    ``not_counted`` lists ``(state, path)`` of runs left out (failed, incomplete);
    ``differences`` the paired comparisons per setup; ``pairing`` the problems
    :func:`pairing_problems` found.
    """
    differences = differences or {}
    lines = [
        "Accuracies in %, mean ± std (sample standard deviation) over seeds of completed "
        "runs. Columns:",
        "",
    ]
    lines += [f"- `{column}`: {meaning}" for column, meaning in COLUMNS]
    lines += [
        "",
        f"FLEX-MoE against each other strategy: `{REFERENCE}` − other, per seed, over the "
        "seeds both completed (strategies of one seed share its data partition and initial "
        f"model), in accuracy points; {100 * CONFIDENCE:.0f} % Student-t confidence "
        "interval on the paired differences. Verdict: `better` (the interval is above 0), "
        "`worse` (below 0), `no detectable difference` (it contains 0); for the load CV "
        "lower is better, so the reading flips (a negative difference is `better`).",
    ]
    if not table:
        lines += ["", "No completed run."]
    for setup, by_strategy in table.items():
        lines += ["", f"### {setup}", ""]
        lines.append("| strategy | seeds | " + " | ".join(c for c, _ in COLUMNS) + " |")
        lines.append("|---" * (len(COLUMNS) + 2) + "|")
        for strategy, stats_ in by_strategy.items():
            cells = [_fmt(*stats_[c], c) for c, _ in COLUMNS]
            lines.append(f"| {strategy} | {len(stats_['seeds'])} | " + " | ".join(cells) + " |")
        if differences.get(setup):
            lines += ["", *comparison_table(differences[setup])]
    lines += ["", "### Pairing check", ""]
    lines += (
        [f"- {problem}" for problem in pairing]
        if pairing
        else [
            "Every strategy of a (setup, seed) trained on the same number of examples, "
            "and each (setup, strategy, seed) has one run."
        ]
    )
    if not_counted:
        lines += ["", f"### Not counted ({len(not_counted)})", ""]
        lines += [f"- {state}: `{path}`" for state, path in not_counted]
    (out / "results.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with open(out / "results.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(
            ["setup", "strategy", "seeds"]
            + [f"{c}_{s}" for c, _ in COLUMNS for s in ("mean", "std")]
        )
        for setup, by_strategy in table.items():
            for strategy, stats_ in by_strategy.items():
                writer.writerow(
                    [setup, strategy, " ".join(map(str, stats_["seeds"]))]
                    + [v for c, _ in COLUMNS for v in stats_[c]]
                )
    with open(out / "comparisons.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(COMPARISON_COLUMNS)
        for diffs in differences.values():
            for d in diffs:
                seeds = " ".join(map(str, d.seeds))
                writer.writerow(
                    [d.setup, REFERENCE, d.other, d.metric, seeds, d.mean, d.low, d.high, d.verdict]
                )


RUN_COLUMNS = [
    "setup",
    "strategy",
    "seed",
    "state",
    "rounds",
    "final_local_acc",
    "best_local_acc",
    "final_global_acc",
    "best_global_acc",
    "load_cv",
    "cum_load_cv",
    "samples_cv",
    "cum_samples_cv",
    "bytes_total",
    "mb_per_round",
    "wall_s",
    "load_cv_per_round",
    "cum_load_cv_per_round",
    "local_acc_per_round",
    "run",
]


def _series_text(values: np.ndarray, digits: int) -> str:
    return " ".join("" if np.isnan(v) else f"{v:.{digits}f}" for v in values)


def write_run_rows(runs: Sequence[Run], out: Path) -> Path:
    """Write ``runs.csv``: one row per run (any state), per-round series space-separated."""
    path = out / "runs.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=RUN_COLUMNS)
        writer.writeheader()
        for run in sorted(runs, key=lambda r: (r.setup, _order(r.strategy), r.seed)):
            summary = run.summary()
            traffic = run.series(lambda r: r.traffic.sent) + run.series(
                lambda r: r.traffic.received
            )
            writer.writerow(
                {
                    "setup": run.setup,
                    "strategy": run.strategy,
                    "seed": run.seed,
                    "state": run.state,
                    "rounds": len(run.records),
                    **{c: summary[c] for c in RUN_COLUMNS if c in summary},
                    "bytes_total": int(np.nansum(traffic)) if run.records else 0,
                    "load_cv_per_round": _series_text(run.series(lambda r: r.loads.clients_cv), 4),
                    "cum_load_cv_per_round": _series_text(
                        run.series(lambda r: r.loads.cumulative_clients_cv), 4
                    ),
                    "local_acc_per_round": _series_text(
                        run.series(lambda r: r.evaluation.local_acc), 4
                    ),
                    "run": run.path.name,
                }
            )
    return path
