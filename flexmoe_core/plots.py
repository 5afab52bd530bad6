"""Every figure FLEX-MoE draws: run results and how labels are spread over clients.

Run results: curves per strategy, expert-load heatmaps, paired differences. Data:
per-client label counts (stacked bars and a share heatmap). Plain data in, image
files out; nothing here reads result folders (that is :mod:`flexmoe_core.report`), so
the report, a run's W&B logging (:mod:`flexmoe_core.results`) and the data
preparation can use these helpers without importing each other.
"""

from __future__ import annotations

import os
import re
import tempfile
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .records import RoundRecord


@dataclass(frozen=True)
class CurvePanel:
    """One panel of the curves figure: a figure of the round records, per round."""

    name: str  # the key of its series in plot_strategy_curves' ``curves``
    title: str
    share: bool  # y is a share in [0, 1]
    figure: Callable[[RoundRecord], float | None]


CURVE_PANELS: list[CurvePanel] = [
    CurvePanel(
        "local_acc", "personalised accuracy, local split", True, lambda r: r.evaluation.local_acc
    ),
    CurvePanel(
        "global_acc", "personalised accuracy, global test", True, lambda r: r.evaluation.global_acc
    ),
    CurvePanel(
        "load_clients_cv",
        "expert load CV per round (clients holding)",
        False,
        lambda r: r.loads.clients_cv,
    ),
    CurvePanel(
        "cum_load_clients_cv",
        "cumulative expert load CV",
        False,
        lambda r: r.loads.cumulative_clients_cv,
    ),
]
# Panels drawn only when some run measured them (purity: federations with known groups).
OPTIONAL_CURVE_PANELS: list[CurvePanel] = [
    CurvePanel(
        "trained_local_acc",
        "accuracy of the just-trained models, local split",
        True,
        lambda r: r.training.trained.local_acc,
    ),
    CurvePanel("purity", "assignment purity (known groups)", False, lambda r: r.allocation.purity),
    CurvePanel("churn", "share of clients changing experts", False, lambda r: r.allocation.churn),
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
    panels = CURVE_PANELS + [p for p in OPTIONAL_CURVE_PANELS if p.name in measured]
    columns = min(len(panels), 4)
    rows = -(-len(panels) // columns)
    fig, grid = plt.subplots(rows, columns, figsize=(5 * columns, 4.4 * rows), squeeze=False)
    axes = list(grid.flat)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    for strategy, by_key in curves.items():
        for ax, panel in zip(axes, panels, strict=False):
            if panel.name not in by_key:
                continue
            values = np.asarray(by_key[panel.name], dtype=float)
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
    for ax, panel in zip(axes, panels, strict=False):
        ax.set_title(panel.title, fontsize=10)
        _integer_rounds(ax)
        if panel.share:
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


# ------------------------------------------------------------------ label spread
# A legend beyond this many classes hides the bars; the heatmap carries them instead.
_MAX_LEGEND = 20


def _ensure_mpl_config_dir() -> None:
    """Give Matplotlib a writable config dir before it is imported.

    Matplotlib writes a font cache under ``$MPLCONFIGDIR`` (default ``~/.config``);
    on read-only homes and in sandboxed client processes it would warn on every
    import, so point it at a temporary folder when the default is not writable.
    """
    if os.environ.get("MPLCONFIGDIR"):
        return
    default = Path.home() / ".config" / "matplotlib"
    try:
        default.mkdir(parents=True, exist_ok=True)
        if os.access(default, os.W_OK):
            return
    except OSError:
        pass
    os.environ["MPLCONFIGDIR"] = tempfile.mkdtemp(prefix="flexmoe-mpl-")


def plot_label_distribution(counts: np.ndarray, path: Path, title: str) -> None:
    """Save a figure of per-client label counts: stacked bars and a share heatmap.

    Parameters
    ----------
    counts : np.ndarray
        Clients x classes sample counts (e.g. from ``label_counts``).
    path : Path
        Output image file; its suffix picks the format (``.png``, ``.pdf``, ...).
        Parent folders are created.
    title : str
        Figure title.

    Raises
    ------
    ValueError
        If ``counts`` is not a non-empty 2-D array of non-negative numbers.
    """
    counts = np.asarray(counts)
    if counts.ndim != 2 or counts.size == 0 or (counts < 0).any():
        raise ValueError(
            f"counts must be a non-empty clients x classes array of counts, got shape "
            f"{counts.shape}"
        )
    _ensure_mpl_config_dir()
    # The object API with an explicit Agg canvas: no pyplot global state and no
    # display needed, and the caller's backend choice is left untouched.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    num_clients, num_classes = counts.shape
    figure = Figure(figsize=(12, max(3.0, 0.3 * num_clients + 1.5)), layout="constrained")
    FigureCanvasAgg(figure)
    bars, heat = figure.subplots(1, 2, width_ratios=[1.2, 1])
    cmap = _class_colours(num_classes)
    left = np.zeros(num_clients)
    clients = np.arange(num_clients)
    for k in range(num_classes):
        bars.barh(clients, counts[:, k], left=left, color=cmap[k], label=str(k), height=0.8)
        left += counts[:, k]
    bars.set_yticks(clients)
    bars.set_ylabel("client (partition id)")
    bars.set_xlabel("samples")
    bars.invert_yaxis()
    bars.set_title("samples per client, stacked by class")
    if num_classes <= _MAX_LEGEND:
        bars.legend(title="class", loc="lower right", fontsize="small", ncols=2)
    totals = counts.sum(axis=1, keepdims=True)
    shares = np.divide(counts, totals, out=np.zeros(counts.shape), where=totals > 0)
    image = heat.imshow(shares, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0)
    heat.set_xlabel("class")
    heat.set_ylabel("client (partition id)")
    heat.set_title("share of each class in the client's data")
    figure.colorbar(image, ax=heat, label="share")
    figure.suptitle(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)


def _class_colours(num_classes: int) -> list[tuple[float, float, float, float]]:
    from matplotlib import colormaps

    name = "tab10" if num_classes <= 10 else "tab20" if num_classes <= 20 else "turbo"
    cmap = colormaps[name]
    if name == "turbo":
        return [cmap(i / max(num_classes - 1, 1)) for i in range(num_classes)]
    return [cmap(i) for i in range(num_classes)]
