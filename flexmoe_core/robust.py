"""Robust statistics over clients: what one client's claim can move, and by how much.

Every average the server takes over clients — an expert's weights over its holders,
the backbone over the participants, the local accuracy and training loss it reports —
goes through these helpers, so "one client cannot own it" is argued once:

* :func:`trim_count` says how many values to drop at each end of a coordinate: the
  share ``trim_fraction``, but at least one as soon as there are ``min_values`` (3)
  values, so a single outlier never survives an average over three or more clients;
* :func:`trimmed_weighted_mean` drops those values per coordinate and averages the
  rest with their weights (the honest clients keep their relative weights);
* :func:`summarise_clients` (reported figures: accuracy, loss) weighs each client by
  its capped count;
* :func:`example_cap` bounds a client's count by the federation's distribution of
  declared counts: ``ratio`` times its low median, and the upper Tukey fence
  ``Q3 + 3 IQR`` (at least twice the median) once enough clients have declared one.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# Values at and above which a coordinate always drops one value at each end.
MIN_TRIMMED = 3
# Declared counts needed before the fence (quartiles) is trusted over the median rule.
MIN_FOR_FENCE = 4
FENCE_IQRS = 3.0  # "far out" in Tukey's terms
FENCE_FLOOR_MEDIANS = 2.0
# Reported averages over clients (accuracy, loss): a client's count is capped at this
# many round medians (and the fence of the round's counts).
REPORT_RATIO = 10.0


def low_median(values: Sequence[float]) -> float:
    """Return the lower middle value (the smaller of the two middles for even counts).

    With two values it is the smaller one, so one client cannot raise it alone.
    """
    ordered = sorted(values)
    return float(ordered[(len(ordered) - 1) // 2])


def trim_count(count: int, trim_fraction: float, min_values: int = MIN_TRIMMED) -> int:
    """Return how many values to drop at each end of ``count`` values.

    ``floor(trim_fraction * count)``, at least 1 once ``count >= min_values`` (and
    ``trim_fraction > 0``), and always leaving at least one value.
    """
    if count <= 0 or trim_fraction <= 0:
        return 0
    cut = int(trim_fraction * count)
    if count >= min_values:
        cut = max(cut, 1)
    return min(cut, (count - 1) // 2)


def trimmed_weighted_mean(
    stack: Sequence[np.ndarray], weights: Sequence[float], cut: int
) -> np.ndarray:
    """Return the weighted mean per coordinate after dropping ``cut`` values at each end.

    ``stack`` holds one array per client (same shape), ``weights`` one weight per
    client. Per coordinate the ``cut`` smallest and ``cut`` largest values are dropped
    and the rest averaged with their clients' weights (equal weights where the kept
    weights sum to zero). ``cut = 0`` is the weighted mean. Float64 result.
    """
    values = np.stack(stack).astype(np.float64, copy=False)
    w = np.asarray(weights, dtype=np.float64)
    if cut <= 0:
        total = w.sum()
        w = w / total if total > 0 else np.full(len(w), 1.0 / len(w))
        return np.tensordot(w, values, axes=1)
    order = np.argsort(values, axis=0, kind="stable")
    kept = order[cut : len(stack) - cut]  # (kept clients, *shape) indices
    kept_values = np.take_along_axis(values, kept, axis=0)
    kept_weights = w[kept]
    total = kept_weights.sum(axis=0)
    equal = kept_values.mean(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        weighted = (kept_weights * kept_values).sum(axis=0) / total
    return np.where(total > 0, weighted, equal)


def example_cap(declared: Sequence[float], ratio: float) -> float:
    """Return the most examples one client may count, from the federation's declared counts.

    ``ratio * low_median(declared)``, lowered to the upper fence ``Q3 + 3 IQR`` of the
    declared counts once at least :data:`MIN_FOR_FENCE` clients declared one (a
    minority's huge claims move neither the median nor the quartiles). Infinite when
    nothing was declared.
    """
    counts = [float(c) for c in declared if c is not None and c > 0]
    if not counts:
        return float("inf")
    median = low_median(counts)
    cap = ratio * median
    if len(counts) >= MIN_FOR_FENCE:
        q1, q3 = np.percentile(counts, [25, 75], method="lower")
        # Never below twice the median: equal honest partitions (IQR 0) keep their
        # small differences.
        fence = max(float(q3 + FENCE_IQRS * (q3 - q1)), FENCE_FLOOR_MEDIANS * median)
        cap = min(cap, fence)
    return max(cap, 1.0)


def summarise_clients(
    rows: Sequence[tuple[float, float, float]], caps: Sequence[float]
) -> dict[str, float]:
    """Average (count, loss, accuracy) claims over clients, each client's share bounded.

    Each count is lowered to its cap (what the client can truthfully have measured),
    then accuracy and loss are averaged with those counts. A client's value cannot be
    checked, but its weight can: one client claiming accuracy 1.0 over 2^53 samples
    moves the average by its capped share times its distance from the others.
    Returns ``acc``, ``loss``, ``acc_min``, ``acc_std``.
    """
    if not rows:
        raise ValueError("no client to summarise")
    counts = np.minimum([float(n) for n, _, _ in rows], np.asarray(caps, dtype=float))
    accuracies = np.array([acc for _, _, acc in rows], dtype=float)
    return {
        "acc": float(np.average(accuracies, weights=counts)),
        "loss": float(np.average([loss for _, loss, _ in rows], weights=counts)),
        "acc_min": float(accuracies.min()),
        "acc_std": float(accuracies.std()),
    }
