"""Plots of run results: curves per strategy and the expert-load heatmap.

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

# (per-round key, panel title) of the curves figure
CURVE_PANELS: list[tuple[str, str]] = [
    ("local_acc", "personalised accuracy (local split)"),
    ("load_clients_cv", "expert load CV (clients holding)"),
    ("load_samples_cv", "routed-samples CV"),
]


def slug(text: str) -> str:
    """Return a file-name-safe version of ``text``."""
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()[:80]


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


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
        not measure ``key``; keys are those of :data:`CURVE_PANELS`.
    path : Path
        Where to write the PNG.
    """
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(CURVE_PANELS), figsize=(16, 4.2))
    for strategy, by_key in curves.items():
        for ax, (key, label) in zip(axes, CURVE_PANELS, strict=True):
            values = np.asarray(by_key[key], dtype=float)
            rounds = np.arange(1, values.shape[1] + 1)
            with warnings.catch_warnings():  # a round (or run) without the key: a gap
                warnings.simplefilter("ignore", RuntimeWarning)
                mean, std = np.nanmean(values, 0), np.nanstd(values, 0)
            ax.plot(rounds, mean, label=strategy)
            ax.fill_between(rounds, mean - std, mean + std, alpha=0.2)
            ax.set_title(label)
            ax.set_xlabel("round")
    axes[0].legend()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_load_heatmaps(
    title: str, loads: Mapping[str, tuple[str, Sequence[Sequence[int]]]], path: Path
) -> Path:
    """Plot one expert-load heatmap per panel: ``loads[name] = (caption, loads per round)``."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(loads), figsize=(4 * len(loads), 3.4), squeeze=False)
    for ax, (caption, per_round) in zip(axes[0], loads.values(), strict=True):
        draw_load_heatmap(ax, per_round)
        ax.set_title(caption)
    fig.suptitle(f"Expert load over rounds — {title}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
