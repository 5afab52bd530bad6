"""Plots of run results: curves per strategy, expert-load heatmaps, paired differences.

Plain data in, PNG files out; nothing here reads result folders (that is
:mod:`flexmoe_core.report`), so both the report and a run's W&B logging
(:mod:`flexmoe_core.results`) can use these helpers without importing each other.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

# (per-round key, panel title, y is a share in [0, 1]) of the curves figure
CURVE_PANELS: list[tuple[str, str, bool]] = [
    ("local_acc", "personalised accuracy, local split", True),
    ("global_acc", "personalised accuracy, global test", True),
    ("load_clients_cv", "expert load CV per round (clients holding)", False),
    ("cum_load_clients_cv", "cumulative expert load CV", False),
]
# Panels drawn only when some run measured them (purity: federations with known groups).
OPTIONAL_CURVE_PANELS: list[tuple[str, str, bool]] = [
    ("trained_local_acc", "accuracy of the just-trained models, local split", True),
    ("purity", "assignment purity (known groups)", False),
    ("churn", "share of clients changing experts", False),
]


def slug(text: str) -> str:
    """Return a file-name-safe version of ``text``."""
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()[:80]


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def _integer_ticks(axis: Any) -> None:
    from matplotlib.ticker import MaxNLocator

    axis.set_major_locator(MaxNLocator(integer=True))


def _integer_rounds(ax: Any) -> None:
    _integer_ticks(ax.xaxis)
    ax.set_xlabel("round")


def strategy_colours(names: Sequence[str]) -> dict[str, Any]:
    """Return one colour per name, in order (the same name: the same colour in a figure)."""
    plt = _pyplot()
    cmap = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    return {name: cmap(i % cmap.N) for i, name in enumerate(names)}


def draw_load_heatmap(
    ax: Any,
    loads_per_round: Sequence[Sequence[int]],
    vmin: float | None = None,
    vmax: float | None = None,
    colorbar: bool = True,
) -> Any:
    """Draw clients holding each expert (rows) per round (columns) on ``ax``.

    ``vmin``/``vmax`` fix the colour scale (to share it between panels); returns the
    image, for a colour bar shared by several panels (``colorbar=False``).
    """
    heat = np.asarray(loads_per_round, dtype=float).T
    image = ax.imshow(
        heat,
        aspect="auto",
        cmap="viridis",
        interpolation="nearest",
        vmin=vmin,
        vmax=vmax,
        extent=(0.5, heat.shape[1] + 0.5, heat.shape[0] - 0.5, -0.5),
    )
    _integer_rounds(ax)
    _integer_ticks(ax.yaxis)
    ax.set_ylabel("expert")
    if colorbar:
        ax.figure.colorbar(image, ax=ax, label="clients holding")
    return image


def plot_strategy_curves(
    title: str, curves: Mapping[str, Mapping[str, np.ndarray]], path: Path
) -> Path:
    """Plot mean ± std over seeds per round, one line per strategy, one panel per key.

    Parameters
    ----------
    title : str
        Figure title (the setup).
    curves : mapping
        ``curves[strategy][key]`` is a (seeds, rounds) array, NaN where a round did
        not measure ``key``; keys are those of :data:`CURVE_PANELS` (a missing key
        leaves its panel empty) and of :data:`OPTIONAL_CURVE_PANELS` (drawn only when
        measured). Rounds measured only sometimes (the global test) are
        drawn as points joined over the gaps.
    path : Path
        Where to write the PNG.
    """
    plt = _pyplot()
    colours = strategy_colours(list(curves))
    measured = {
        key
        for by_key in curves.values()
        for key, values in by_key.items()
        if np.isfinite(np.asarray(values, dtype=float)).any()
    }
    panels = CURVE_PANELS + [p for p in OPTIONAL_CURVE_PANELS if p[0] in measured]
    columns = min(len(panels), 4)
    rows = -(-len(panels) // columns)
    fig, grid = plt.subplots(rows, columns, figsize=(5 * columns, 4.4 * rows), squeeze=False)
    axes = list(grid.flat)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    for strategy, by_key in curves.items():
        for ax, (key, _, _) in zip(axes, panels, strict=False):
            if key not in by_key:
                continue
            values = np.asarray(by_key[key], dtype=float)
            rounds = np.arange(1, values.shape[1] + 1)
            with warnings.catch_warnings():  # a round (or run) without the key: a gap
                warnings.simplefilter("ignore", RuntimeWarning)
                mean, std = np.nanmean(values, 0), np.nanstd(values, 0)
            seen = np.isfinite(mean)
            sparse = seen.sum() < 0.5 * len(seen)
            ax.plot(
                rounds[seen],
                mean[seen],
                label=f"{strategy} ({values.shape[0]})",
                color=colours[strategy],
                marker="o" if sparse else None,
                markersize=4,
            )
            ax.fill_between(
                rounds[seen],
                (mean - std)[seen],
                (mean + std)[seen],
                alpha=0.15,
                color=colours[strategy],
                linewidth=0,
            )
    for ax, (_, label, share) in zip(axes, panels, strict=False):
        ax.set_title(label, fontsize=10)
        _integer_rounds(ax)
        if share:
            from matplotlib.ticker import PercentFormatter

            ax.yaxis.set_major_formatter(PercentFormatter(1.0))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, title="strategy (seeds); band: ± std", title_fontsize=8)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_load_heatmaps(
    title: str, loads: Mapping[str, tuple[str, Sequence[Sequence[int]]]], path: Path
) -> Path:
    """Plot one expert-load heatmap per panel on ONE colour scale, with one colour bar.

    ``loads[name] = (caption, loads per round)``. The scale runs from 0 to the largest
    load of any panel, so a balanced and a skewed assignment compare at a glance.
    """
    plt = _pyplot()
    vmax = max(
        (float(np.max(per_round)) for _, per_round in loads.values() if len(per_round)), default=1.0
    )
    fig, axes = plt.subplots(
        1,
        len(loads),
        figsize=(3.6 * len(loads) + 1.2, 3.6),
        squeeze=False,
        constrained_layout=True,
    )
    image = None
    for ax, (caption, per_round) in zip(axes[0], loads.values(), strict=True):
        image = draw_load_heatmap(ax, per_round, vmin=0.0, vmax=vmax, colorbar=False)
        ax.set_title(caption, fontsize=9)
    if image is not None:
        fig.colorbar(image, ax=list(axes[0]), label="clients holding the expert", shrink=0.9)
    fig.suptitle(f"Expert load per round — {title}", fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_comparisons(
    differences: Mapping[str, Sequence[Any]],
    metric_names: Mapping[str, str],
    path: Path,
    unscaled: Sequence[str] = (),
) -> Path:
    """Plot reference − other with its confidence interval, one row per (setup, other).

    ``differences[setup]`` holds objects with ``other``, ``metric``, ``mean``, ``low``
    and ``high``; one panel per metric. Accuracy shares are drawn in points, metrics
    in ``unscaled`` (a load CV) as they are.
    """
    plt = _pyplot()
    metrics = list(dict.fromkeys(d.metric for diffs in differences.values() for d in diffs))
    rows = list(
        dict.fromkeys((setup, d.other) for setup, diffs in differences.items() for d in diffs)
    )
    fig, axes = plt.subplots(
        1,
        len(metrics),
        figsize=(3 + 4 * len(metrics), 1.4 + 0.3 * len(rows)),
        squeeze=False,
        sharey=True,
    )
    colours = strategy_colours(list(dict.fromkeys(other for _, other in rows)))
    for ax, metric in zip(axes[0], metrics, strict=True):
        scale = 1.0 if metric in unscaled else 100.0
        for y, (setup, other) in enumerate(rows):
            match = [d for d in differences[setup] if d.other == other and d.metric == metric]
            if not match or not np.isfinite(match[0].mean):
                continue
            d = match[0]
            low, high = (d.low, d.high) if np.isfinite(d.low) else (d.mean, d.mean)
            ax.errorbar(
                scale * d.mean,
                y,
                xerr=[[scale * (d.mean - low)], [scale * (high - d.mean)]],
                fmt="o",
                color=colours[other],
                capsize=3,
            )
        ax.axvline(0, color="black", linewidth=0.8)
        unit = "" if metric in unscaled else " (points)"
        ax.set_xlabel(f"FLEX-MoE − other\n{metric_names.get(metric, metric)}{unit}", fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    # one setup: the strategies name the rows; several: "dataset · partition | strategy"
    several = len(differences) > 1
    axes[0][0].set_yticks(range(len(rows)))
    axes[0][0].set_yticklabels(
        [
            f"{' · '.join(setup.split(' · ')[:2])} | {other}" if several else other
            for setup, other in rows
        ],
        fontsize=8,
    )
    axes[0][0].invert_yaxis()
    title = "Paired per-seed differences, 95 % Student-t confidence intervals"
    if not several:
        title += "\n" + next(iter(differences))
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
