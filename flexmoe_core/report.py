"""Turn result folders into the comparison table (Markdown + CSV) and plots.

    flexmoe-report multirun/2026-11-22_10-00-00 --out docs/results

Every folder below the given ones that holds ``metrics.jsonl`` and ``config.yaml``
is one run. Runs are grouped by setup (dataset, partition, model, experts, clients,
capacities, rounds) and strategy; figures are mean ± std over seeds.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import OmegaConf

from .results import CONFIG_FILE, METRICS_FILE, read_metrics

STRATEGY_ORDER = ["flexmoe", "greedy", "random", "dense", "expert_choice"]

# (column, what it means, how a run is reduced to one number)
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


@dataclass
class Run:
    """One run: its setup, strategy, seed and per-round records."""

    path: Path
    setup: str
    strategy: str
    seed: int
    records: list[dict[str, Any]] = field(default_factory=list)

    def series(self, key: str) -> np.ndarray:
        """Return ``key`` per round (NaN where a round did not measure it)."""
        return np.array([float(r.get(key, np.nan)) for r in self.records])

    def summary(self) -> dict[str, float]:
        """Reduce the run to the report's columns."""

        def last(key: str) -> float:
            values = self.series(key)
            values = values[~np.isnan(values)]
            return float(values[-1]) if values.size else np.nan

        def best(key: str) -> float:
            values = self.series(key)
            return float(np.nanmax(values)) if np.isfinite(values).any() else np.nan

        traffic = self.series("bytes_sent") + self.series("bytes_received")
        return {
            "final_local_acc": last("local_acc"),
            "best_local_acc": best("local_acc"),
            "final_global_acc": last("global_acc"),
            "best_global_acc": best("global_acc"),
            "load_cv": float(np.nanmean(self.series("load_clients_cv"))),
            "load_var": float(np.nanmean(self.series("load_clients_var"))),
            "cum_load_cv": last("cum_load_clients_cv"),
            "samples_cv": float(np.nanmean(self.series("load_samples_cv"))),
            "cum_samples_cv": last("cum_load_samples_cv"),
            "mb_per_round": float(np.nanmean(traffic)) / 1e6,
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


def find_runs(folders: Sequence[str | Path]) -> list[Run]:
    """Return every run below ``folders`` (runs without a finished round are skipped)."""
    runs = []
    for folder in folders:
        for metrics in sorted(Path(folder).rglob(METRICS_FILE)):
            run_dir = metrics.parent
            if not (run_dir / CONFIG_FILE).is_file():
                continue
            cfg = OmegaConf.load(run_dir / CONFIG_FILE)
            records = read_metrics(run_dir)
            if records:
                runs.append(
                    Run(
                        run_dir, describe_setup(cfg), str(cfg.strategy.name), int(cfg.seed), records
                    )
                )
    return runs


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


def write_tables(table: dict[str, dict[str, dict[str, Any]]], out: Path) -> None:
    """Write ``results.md`` and ``results.csv`` under ``out``."""
    lines = ["Accuracies in %, mean ± std over seeds. Columns:", ""]
    lines += [f"- `{column}`: {meaning}" for column, meaning in COLUMNS]
    for setup, by_strategy in table.items():
        lines += ["", f"### {setup}", ""]
        lines.append("| strategy | seeds | " + " | ".join(c for c, _ in COLUMNS) + " |")
        lines.append("|---" * (len(COLUMNS) + 2) + "|")
        for strategy, stats in by_strategy.items():
            cells = [_fmt(*stats[c], c) for c, _ in COLUMNS]
            lines.append(f"| {strategy} | {len(stats['seeds'])} | " + " | ".join(cells) + " |")
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


def slug(text: str) -> str:
    """Return a file-name-safe version of ``text``."""
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()[:80]


def draw_load_heatmap(ax: Any, loads_per_round: Sequence[Sequence[int]]) -> None:
    """Draw clients holding each expert (rows) per round (columns) on ``ax``."""
    heat = np.asarray(loads_per_round, dtype=float).T
    image = ax.imshow(
        heat,
        aspect="auto",
        cmap="viridis",
        interpolation="nearest",
        extent=(0.5, heat.shape[1] + 0.5, heat.shape[0] - 0.5, -0.5),
    )
    ax.set_xlabel("round")
    ax.set_ylabel("expert")
    ax.figure.colorbar(image, ax=ax, label="clients holding")


def plot_setup(setup: str, runs: Sequence[Run], out: Path) -> list[Path]:
    """Plot accuracy and load CV per round by strategy, and a load heatmap per strategy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_strategy: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        by_strategy[run.strategy].append(run)
    strategies = sorted(by_strategy, key=_order)
    written = []

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    for strategy in strategies:
        for ax, key, label in (
            (axes[0], "local_acc", "personalised accuracy (local split)"),
            (axes[1], "load_clients_cv", "expert load CV (clients holding)"),
            (axes[2], "load_samples_cv", "routed-samples CV"),
        ):
            curves = np.array([r.series(key) for r in by_strategy[strategy]])
            rounds = np.arange(1, curves.shape[1] + 1)
            mean, std = np.nanmean(curves, 0), np.nanstd(curves, 0)
            ax.plot(rounds, mean, label=strategy)
            ax.fill_between(rounds, mean - std, mean + std, alpha=0.2)
            ax.set_title(label)
            ax.set_xlabel("round")
    axes[0].legend()
    fig.suptitle(setup, fontsize=10)
    fig.tight_layout()
    path = out / f"curves_{slug(setup)}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)

    fig, axes = plt.subplots(1, len(strategies), figsize=(4 * len(strategies), 3.4), squeeze=False)
    for ax, strategy in zip(axes[0], strategies, strict=True):
        run = min(by_strategy[strategy], key=lambda r: r.seed)
        draw_load_heatmap(ax, [r["load_clients"] for r in run.records])
        ax.set_title(f"{strategy} (seed {run.seed})")
    fig.suptitle(f"Expert load over rounds — {setup}", fontsize=10)
    fig.tight_layout()
    path = out / f"load_heatmap_{slug(setup)}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)
    return written


def build_report(folders: Sequence[str | Path], out: str | Path) -> dict[str, Any]:
    """Write tables and plots for the runs below ``folders``; return the table."""
    runs = find_runs(folders)
    if not runs:
        raise FileNotFoundError(
            f"No runs (folders with {METRICS_FILE} and {CONFIG_FILE}) below {list(folders)}"
        )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    table = aggregate_runs(runs)
    write_tables(table, out)
    for setup in table:
        plot_setup(setup, [r for r in runs if r.setup == setup], out)
    (out / "runs.json").write_text(
        json.dumps(
            [
                {
                    "path": str(r.path),
                    "setup": r.setup,
                    "strategy": r.strategy,
                    "seed": r.seed,
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
    print((Path(args.out) / "results.md").read_text(encoding="utf-8"))
    print(f"Tables and plots written to {Path(args.out).resolve()}")


if __name__ == "__main__":
    main()
