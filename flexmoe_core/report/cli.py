"""``flexmoe-report``: tables, comparisons, trials and plots for the runs below some folders."""

from __future__ import annotations

import argparse
import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..plots import (
    CURVE_PANELS,
    OPTIONAL_CURVE_PANELS,
    plot_comparisons,
    plot_load_heatmaps,
    plot_strategy_curves,
    slug,
)
from ..results import COMPLETED, CONFIG_FILE, FAILED
from .compare import (
    COMPARED,
    LOWER_IS_BETTER,
    aggregate_runs,
    base_strategy,
    compare_to_reference,
    group_runs,
    pairing_problems,
)
from .runs import UNBOUNDED_STRATEGIES, Run, find_runs
from .sweeps import JOB_STATUS_FILE, find_sweep_jobs, write_trials
from .tables import write_run_rows, write_tables

CURVE_PANELS_ALL = CURVE_PANELS + OPTIONAL_CURVE_PANELS


def plot_setup(setup: str, runs: Sequence[Run], out: Path) -> list[Path]:
    """Plot curves per round by strategy, and the load heatmaps on one colour scale."""
    by_strategy = group_runs(runs).get(setup, {})
    curves = {
        strategy: {
            panel.name: _stack([r.series(panel.figure) for r in members])
            for panel in CURVE_PANELS_ALL
        }
        for strategy, members in by_strategy.items()
    }
    heatmaps = {}
    for strategy, members in by_strategy.items():
        if base_strategy(strategy) in UNBOUNDED_STRATEGIES:
            continue
        run = members[0]  # the lowest seed
        heatmaps[strategy] = (
            f"{strategy} (seed {run.seed})",
            [r.loads.clients or [] for r in run.records],
        )
    left_out = [s for s in by_strategy if s not in heatmaps]
    note = (
        f" ({', '.join(left_out)}: every client holds every expert, not shown)" if left_out else ""
    )
    paths = [plot_strategy_curves(setup, curves, out / f"curves_{slug(setup)}.png")]
    if heatmaps:
        paths.append(
            plot_load_heatmaps(setup + note, heatmaps, out / f"load_heatmap_{slug(setup)}.png")
        )
    return paths


def _stack(series: Sequence[np.ndarray]) -> np.ndarray:
    """Stack per-seed series into (seeds, rounds), padding shorter ones with NaN."""
    rounds = max(len(s) for s in series)
    padded = np.full((len(series), rounds), np.nan)
    for row, values in zip(padded, series, strict=True):
        row[: len(values)] = values
    return padded


def build_report(
    folders: Sequence[str | Path],
    out: str | Path,
    strategies: Sequence[str] | None = None,
    setup_keys: Sequence[str] = (),
) -> dict[str, Any]:
    """Write tables, comparisons, trials and plots for the runs below ``folders``.

    ``strategies`` keeps only runs of those strategy names (``flexmoe`` keeps the
    default and its ablations); ``setup_keys`` are settings added to every setup
    (:func:`load_run`). Returns the table of :func:`aggregate_runs`.

    Raises
    ------
    FileNotFoundError
        If there is neither a run nor a sweep job below ``folders``.
    """
    runs = find_runs(folders, setup_keys)
    if strategies:
        runs = [r for r in runs if base_strategy(r.strategy) in set(strategies)]
    sweeps = find_sweep_jobs(folders)
    if not runs and not sweeps:
        raise FileNotFoundError(
            f"No runs (folders with {CONFIG_FILE}) or sweep jobs ({JOB_STATUS_FILE}) "
            f"below {list(folders)}"
        )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    completed = [r for r in runs if r.state == COMPLETED and r.records]
    not_counted = {r.path: r.state for r in runs if r not in completed}
    for jobs in sweeps.values():  # jobs that failed before their run wrote anything
        for job in jobs:
            if job.status != COMPLETED and job.path is not None:
                not_counted.setdefault(job.path, FAILED)
    table = aggregate_runs(completed)
    groups = group_runs(completed)
    differences = {
        setup: compare_to_reference(by_strategy, setup) for setup, by_strategy in groups.items()
    }
    pairing = pairing_problems(completed)
    for problem in pairing:
        warnings.warn(f"pairing check: {problem}", stacklevel=2)
    write_tables(
        table,
        out,
        sorted((state, path) for path, state in not_counted.items()),
        differences,
        pairing,
    )
    write_run_rows(runs, out)
    if sweeps:
        write_trials(sweeps, out)
    for setup in table:
        plot_setup(setup, completed, out)
    if any(differences.values()):
        plot_comparisons(
            {setup: diffs for setup, diffs in differences.items() if diffs},
            dict(COMPARED),
            out / "comparisons.png",
            LOWER_IS_BETTER,
        )
    (out / "runs.json").write_text(
        json.dumps(
            [
                {
                    "path": str(r.path),
                    "setup": r.setup,
                    "strategy": r.strategy,
                    "seed": r.seed,
                    "state": r.state,
                    **r.summary(),
                }
                for r in runs
            ],
            indent=2,
        ),
        encoding="utf-8",
    )
    return table


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: ``flexmoe-report FOLDER [FOLDER ...] --out DIR [--strategies ...]``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folders", nargs="+", help="result folders (searched recursively)")
    parser.add_argument("--out", default="report", help="where to write tables and plots")
    parser.add_argument(
        "--strategies",
        nargs="+",
        default=None,
        help="keep only these strategy names (e.g. flexmoe: the default and its ablations)",
    )
    parser.add_argument(
        "--setup-keys",
        nargs="+",
        default=(),
        help="settings that make a setup of their own, as key=value (e.g. train.lr)",
    )
    args = parser.parse_args(argv)
    build_report(args.folders, args.out, args.strategies, args.setup_keys)
    out = Path(args.out)
    print((out / "results.md").read_text(encoding="utf-8"))
    if (out / "trials.md").is_file():
        print((out / "trials.md").read_text(encoding="utf-8"))
    print(f"Tables and plots written to {out.resolve()}")
