"""Plot how labels are spread over clients (stacked bars and a share heatmap)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

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
