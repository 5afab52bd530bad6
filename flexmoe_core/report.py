"""Turn result folders into the comparison table, a trials table per sweep, and plots.

    flexmoe-report multirun/cifar10_dirichlet multirun/search --out docs/results

Every folder below the given ones that holds ``config.yaml`` is one run. A run counts
as a result only when it *completed*: ``summary.json`` exists and, if it has a
``status``, that status is ``"completed"``. Failed and unfinished runs are listed as
such and left out of the figures. Completed runs are grouped by setup (dataset,
partition, model, experts, clients, capacities, rounds) and strategy; figures are
mean ± std over seeds.

A folder holding sweep jobs (``status.json``, written by ``flexmoe-sweep``) also gets
a trials table: job (trial) number, the parameters that vary between jobs, the
objective and the job's status. This module also defines what a run's objective is
(:data:`OBJECTIVES`) and how a job's status is recorded (:class:`JobStatus`).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import OmegaConf

from .plots import plot_load_heatmaps, plot_strategy_curves, slug
from .results import CONFIG_FILE, METRICS_FILE, SUMMARY_FILE, read_metrics

STRATEGY_ORDER = ["flexmoe", "greedy", "random", "dense", "expert_choice"]

# (column, what it means); every column is also a valid sweep objective
COLUMNS: list[tuple[str, str]] = [
    ("final_local_acc", "final personalised accuracy, local split"),
    ("best_local_acc", "best personalised accuracy, local split"),
    ("final_global_acc", "final personalised accuracy, global test"),
    ("best_global_acc", "best personalised accuracy, global test"),
    ("load_cv", "expert load CV per round (clients holding), mean over rounds"),
    ("load_var", "expert load variance per round (clients holding), mean over rounds"),
    ("cum_load_cv", "cumulative expert load CV (clients holding), last round"),
    ("samples_cv", "routed-samples CV per round, mean over rounds"),
    ("cum_samples_cv", "cumulative routed-samples CV, last round"),
    ("mb_per_round", "MB sent + received per round"),
    ("wall_s", "run wall time (sum of round times), s"),
]
OBJECTIVES = [column for column, _ in COLUMNS]

# What a run folder says about its run.
COMPLETED = "completed"  # summary.json, with no status or status "completed"
FAILED = "failed"  # summary.json with another status, or a sweep job that failed
INCOMPLETE = "incomplete"  # no summary.json: still running, or killed

JOB_STATUS_FILE = "status.json"
SEARCH_RESULTS_FILE = "optimization_results.yaml"  # written by Hydra's Optuna sweeper


def run_state(run_dir: str | Path) -> str:
    """Return :data:`COMPLETED`, :data:`FAILED` or :data:`INCOMPLETE` for a run folder.

    The exit code of ``flwr run`` says nothing (it is 0 when the ServerApp fails);
    only the summary the ServerApp writes at the end counts.
    """
    path = Path(run_dir) / SUMMARY_FILE
    if not path.is_file():
        return INCOMPLETE
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return FAILED
    status = summary.get("status", COMPLETED) if isinstance(summary, dict) else None
    return COMPLETED if status == COMPLETED else FAILED


@dataclass
class Run:
    """One run: its setup, strategy, seed, per-round records and state."""

    path: Path
    setup: str
    strategy: str
    seed: int
    records: list[dict[str, Any]] = field(default_factory=list)
    state: str = COMPLETED

    def series(self, key: str) -> np.ndarray:
        """Return ``key`` per round (NaN where a round did not measure it)."""
        return np.array([float(r.get(key, np.nan)) for r in self.records])

    def summary(self) -> dict[str, float]:
        """Reduce the run to the report's columns (NaN where not measured)."""
        if not self.records:
            return dict.fromkeys(OBJECTIVES, np.nan)

        def last(key: str) -> float:
            values = self.series(key)
            values = values[~np.isnan(values)]
            return float(values[-1]) if values.size else np.nan

        def best(key: str) -> float:
            values = self.series(key)
            return float(np.nanmax(values)) if np.isfinite(values).any() else np.nan

        def mean(key: str) -> float:
            values = self.series(key)
            return float(np.nanmean(values)) if np.isfinite(values).any() else np.nan

        traffic = self.series("bytes_sent") + self.series("bytes_received")
        return {
            "final_local_acc": last("local_acc"),
            "best_local_acc": best("local_acc"),
            "final_global_acc": last("global_acc"),
            "best_global_acc": best("global_acc"),
            "load_cv": mean("load_clients_cv"),
            "load_var": mean("load_clients_var"),
            "cum_load_cv": last("cum_load_clients_cv"),
            "samples_cv": mean("load_samples_cv"),
            "cum_samples_cv": last("cum_load_samples_cv"),
            "mb_per_round": float(np.nanmean(traffic)) / 1e6
            if np.isfinite(traffic).any()
            else np.nan,
            "wall_s": float(np.nansum(self.series("round_time_s"))),
        }


def describe_setup(cfg: Any) -> str:
    """Return a short, stable description of what a run trained on."""
    part = cfg.partition
    detail = {
        "dirichlet": f"α={part.get('alpha')}",
        "kclass": f"{part.get('classes_per_client')}-class",
    }.get(part.type, "")
    cap = cfg.capacity
    capacity = {
        "constant": f"k={cap.value}",
        "list": f"k∈{list(cap['values'])}",
        "uniform": f"k~U[{cap.low},{cap.high}]",
    }[cap.profile]
    return (
        f"{cfg.dataset.name} · {part.type}{' ' + detail if detail else ''} · "
        f"{cfg.model.backbone} E={cfg.model.num_experts} top-{cfg.model.top_k} · "
        f"{cfg.num_clients} clients · {capacity} · {cfg.num_rounds} rounds"
    )


def _visible_files(folder: Path, name: str) -> Iterator[Path]:
    """Yield ``folder/**/name``, skipping hidden folders (.hydra, .submitit, ...)."""
    for path in sorted(folder.rglob(name)):
        if not any(part.startswith(".") for part in path.relative_to(folder).parts[:-1]):
            yield path


def load_run(run_dir: str | Path) -> Run:
    """Read one run folder (``config.yaml``, and ``metrics.jsonl`` if it got that far)."""
    run_dir = Path(run_dir)
    cfg = OmegaConf.load(run_dir / CONFIG_FILE)
    records = read_metrics(run_dir) if (run_dir / METRICS_FILE).is_file() else []
    return Run(
        run_dir,
        describe_setup(cfg),
        str(cfg.strategy.name),
        int(cfg.seed),
        records,
        run_state(run_dir),
    )


def find_runs(folders: Sequence[str | Path]) -> list[Run]:
    """Return every run below ``folders`` (any state; see :attr:`Run.state`)."""
    return [
        load_run(config.parent)
        for folder in folders
        for config in _visible_files(Path(folder), CONFIG_FILE)
    ]


def run_objective(run_dir: str | Path, objective: str) -> float:
    """Return one of :data:`OBJECTIVES` for a run folder (NaN if it was not measured)."""
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}: choose one of {OBJECTIVES}")
    return load_run(run_dir).summary()[objective]


# ------------------------------------------------------------------ sweep jobs
@dataclass
class JobStatus:
    """How one sweep job went: ``<job dir>/status.json``, written by ``flexmoe-sweep``."""

    job: int  # Hydra's job number: the trial number of a search
    overrides: list[str]  # the overrides that define the run
    status: str  # COMPLETED or FAILED
    objective: str | None = None
    direction: str | None = None
    value: float | None = None  # the objective; None when failed or not measured
    exit_code: int | None = None
    seconds: float | None = None
    finished_at: float | None = None  # epoch seconds
    skipped_at: float | None = None  # when a later run of the sweep last skipped it
    resumed: bool = False  # picked up from a checkpoint of an interrupted attempt
    error: str | None = None
    path: Path | None = field(default=None, compare=False)  # the job dir (not stored)

    def write(self, job_dir: Path) -> None:
        """Write ``status.json`` into ``job_dir``."""
        data = {k: v for k, v in asdict(self).items() if k != "path"}
        if data["value"] is not None and not math.isfinite(data["value"]):
            data["value"] = None  # JSON has no NaN
        (job_dir / JOB_STATUS_FILE).write_text(json.dumps(data, indent=2), encoding="utf-8")

    @classmethod
    def read(cls, job_dir: Path) -> JobStatus | None:
        """Read ``status.json`` from ``job_dir`` (None if absent or unreadable)."""
        try:
            data = json.loads((job_dir / JOB_STATUS_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if "status" not in data and "ok" in data:  # written by an older flexmoe-sweep
            data["status"] = COMPLETED if data["ok"] else FAILED
        known = {f.name for f in fields(cls)} - {"path"}
        try:
            return cls(**{k: v for k, v in data.items() if k in known}, path=job_dir)
        except TypeError:
            return None

    def params(self) -> dict[str, str]:
        """Return the overrides as ``{key: value}``."""
        return dict(o.split("=", 1) for o in self.overrides if "=" in o)


def find_sweep_jobs(folders: Sequence[str | Path]) -> dict[Path, list[JobStatus]]:
    """Return ``{sweep dir: jobs in job order}`` for every sweep job below ``folders``."""
    sweeps: dict[Path, list[JobStatus]] = defaultdict(list)
    for folder in folders:
        for path in _visible_files(Path(folder), JOB_STATUS_FILE):
            status = JobStatus.read(path.parent)
            if status is not None:
                sweeps[path.parent.parent].append(status)
    return {sweep: sorted(jobs, key=lambda j: j.job) for sweep, jobs in sorted(sweeps.items())}


def best_job(jobs: Sequence[JobStatus], direction: str | None = None) -> JobStatus | None:
    """Return the completed job with the best objective (None if none has one)."""
    scored = [j for j in jobs if j.status == COMPLETED and j.value is not None]
    if not scored:
        return None
    sign = -1.0 if (direction or scored[0].direction) == "minimize" else 1.0
    return max(scored, key=lambda j: sign * float(j.value))  # type: ignore[arg-type]


def varying_params(jobs: Sequence[JobStatus]) -> list[str]:
    """Return the override keys whose value differs between jobs (all keys for one job)."""
    params = [j.params() for j in jobs]
    keys = sorted({k for p in params for k in p})
    if len(jobs) < 2:
        return keys
    return [k for k in keys if len({p.get(k) for p in params}) > 1]


def _short(value: str) -> str:
    """Shorten a float as Optuna writes it (0.09276005809908329 -> 0.09276)."""
    try:
        number = float(value)
    except ValueError:
        return value
    return value if len(value) <= 8 or number.is_integer() else f"{number:.4g}"


def write_trials(sweeps: dict[Path, list[JobStatus]], out: Path) -> None:
    """Write ``trials.md`` and ``trials.csv``: one row per sweep job (trial).

    The Markdown table shows numbers to 4 significant digits; the CSV has the
    overrides exactly as the jobs ran them.
    """
    lines = [
        "One row per sweep job; for a search, the job number is the trial number. "
        "`failed` jobs are not results.",
    ]
    rows: list[list[Any]] = []
    for sweep_dir, jobs in sweeps.items():
        keys = varying_params(jobs)
        best = best_job(jobs)
        objective = next((j.objective for j in jobs if j.objective), None) or "objective"
        direction = next((j.direction for j in jobs if j.direction), None)
        kind = "search" if (sweep_dir / SEARCH_RESULTS_FILE).is_file() else "sweep"
        counts = {s: sum(j.status == s for j in jobs) for s in (COMPLETED, FAILED)}
        lines += [
            "",
            f"### {kind} {sweep_dir}",
            "",
            f"{len(jobs)} jobs: {counts[COMPLETED]} completed, {counts[FAILED]} failed; "
            f"objective `{objective}` ({direction or 'maximize'})"
            + (f"; best: job {best.job}" if best else ""),
            "",
            "| job | status | " + objective + " | " + " | ".join(keys) + " |",
            "|---" * (len(keys) + 3) + "|",
        ]
        for job in jobs:
            params = job.params()
            value = "–" if job.value is None else f"{job.value:.4f}"
            mark = " (best)" if job is best else ""
            lines.append(
                f"| {job.job}{mark} | {job.status} | {value} | "
                + " | ".join(_short(params.get(k, "")) for k in keys)
                + " |"
            )
            rows.append(
                [
                    str(sweep_dir),
                    job.job,
                    job.status,
                    job.objective,
                    job.value,
                    " ".join(job.overrides),
                    job.seconds,
                ]
            )
    (out / "trials.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with open(out / "trials.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["sweep", "job", "status", "objective", "value", "overrides", "seconds"])
        writer.writerows(rows)


# ------------------------------------------------------------------ the comparison
def _order(strategy: str) -> tuple[int, str]:
    return (STRATEGY_ORDER.index(strategy) if strategy in STRATEGY_ORDER else 99, strategy)


def aggregate_runs(runs: Sequence[Run]) -> dict[str, dict[str, dict[str, Any]]]:
    """Return ``{setup: {strategy: {column: (mean, std), 'seeds': n}}}``."""
    groups: dict[str, dict[str, list[Run]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        groups[run.setup][run.strategy].append(run)
    table: dict[str, dict[str, dict[str, Any]]] = {}
    for setup, by_strategy in sorted(groups.items()):
        table[setup] = {}
        for strategy in sorted(by_strategy, key=_order):
            members = by_strategy[strategy]
            rows = [r.summary() for r in members]
            stats: dict[str, Any] = {"seeds": sorted(r.seed for r in members)}
            for column, _ in COLUMNS:
                values = np.array([row[column] for row in rows], dtype=float)
                finite = values[np.isfinite(values)]
                stats[column] = (
                    (float(finite.mean()), float(finite.std())) if finite.size else (np.nan, np.nan)
                )
            table[setup][strategy] = stats
    return table


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


def write_tables(
    table: dict[str, dict[str, dict[str, Any]]],
    out: Path,
    not_counted: Sequence[tuple[str, Path]] = (),
) -> None:
    """Write ``results.md`` and ``results.csv`` under ``out``.

    ``not_counted`` lists ``(state, path)`` of runs left out (failed, incomplete).
    """
    lines = ["Accuracies in %, mean ± std over seeds of completed runs. Columns:", ""]
    lines += [f"- `{column}`: {meaning}" for column, meaning in COLUMNS]
    if not table:
        lines += ["", "No completed run."]
    for setup, by_strategy in table.items():
        lines += ["", f"### {setup}", ""]
        lines.append("| strategy | seeds | " + " | ".join(c for c, _ in COLUMNS) + " |")
        lines.append("|---" * (len(COLUMNS) + 2) + "|")
        for strategy, stats in by_strategy.items():
            cells = [_fmt(*stats[c], c) for c, _ in COLUMNS]
            lines.append(f"| {strategy} | {len(stats['seeds'])} | " + " | ".join(cells) + " |")
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
            for strategy, stats in by_strategy.items():
                writer.writerow(
                    [setup, strategy, " ".join(map(str, stats["seeds"]))]
                    + [v for c, _ in COLUMNS for v in stats[c]]
                )


def plot_setup(setup: str, runs: Sequence[Run], out: Path) -> list[Path]:
    """Plot accuracy and load CV per round by strategy, and a load heatmap per strategy."""
    by_strategy: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        by_strategy[run.strategy].append(run)
    strategies = sorted(by_strategy, key=_order)
    curves = {
        strategy: {
            key: _stack([r.series(key) for r in by_strategy[strategy]])
            for key in ("local_acc", "load_clients_cv", "load_samples_cv")
        }
        for strategy in strategies
    }
    heatmaps = {}
    for strategy in strategies:
        run = min(by_strategy[strategy], key=lambda r: r.seed)
        caption = f"{strategy} (seed {run.seed})"
        heatmaps[strategy] = (caption, [r["load_clients"] for r in run.records])
    return [
        plot_strategy_curves(setup, curves, out / f"curves_{slug(setup)}.png"),
        plot_load_heatmaps(setup, heatmaps, out / f"load_heatmap_{slug(setup)}.png"),
    ]


def _stack(series: Sequence[np.ndarray]) -> np.ndarray:
    """Stack per-seed series into (seeds, rounds), padding shorter ones with NaN."""
    rounds = max(len(s) for s in series)
    padded = np.full((len(series), rounds), np.nan)
    for row, values in zip(padded, series, strict=True):
        row[: len(values)] = values
    return padded


def build_report(folders: Sequence[str | Path], out: str | Path) -> dict[str, Any]:
    """Write tables, trials and plots for the runs below ``folders``; return the table.

    Raises
    ------
    FileNotFoundError
        If there is neither a run nor a sweep job below ``folders``.
    """
    runs = find_runs(folders)
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
    write_tables(table, out, sorted((state, path) for path, state in not_counted.items()))
    if sweeps:
        write_trials(sweeps, out)
    for setup in table:
        plot_setup(setup, [r for r in completed if r.setup == setup], out)
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
    """Command line: ``flexmoe-report FOLDER [FOLDER ...] --out DIR``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folders", nargs="+", help="result folders (searched recursively)")
    parser.add_argument("--out", default="report", help="where to write tables and plots")
    args = parser.parse_args(argv)
    build_report(args.folders, args.out)
    out = Path(args.out)
    print((out / "results.md").read_text(encoding="utf-8"))
    if (out / "trials.md").is_file():
        print((out / "trials.md").read_text(encoding="utf-8"))
    print(f"Tables and plots written to {out.resolve()}")


if __name__ == "__main__":
    main()
