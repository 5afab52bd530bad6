"""How far one update may move each part of the model: norms, clipping, rejection.

A model splits into *groups*: the backbone and each expert. Per group and round the
server measures every holder's change ``update - global`` (its L2 norm over the
floating-point elements), derives bounds from what the round's holders did
(:func:`round_bounds`), clips each change to its bound (:func:`clip_update`) and leaves
out a change far beyond it. :mod:`flexmoe_core.aggregation` applies them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from .model import split_expert_key
from .robust import MIN_TRIMMED, low_median

BACKBONE = "backbone"
# BatchNorm running variances: a negative one (finite, so past the NaN check) makes
# every client's evaluation NaN; updates with one are refused.
VARIANCE_SUFFIX = "running_var"


class HasArrays(Protocol):
    """An update: its arrays by name (:class:`flexmoe_core.aggregation.ClientUpdate`)."""

    arrays: dict[str, np.ndarray]


def group_of(name: str) -> str | int:
    """Return the clipping group of an array: ``"backbone"`` or the expert id."""
    key = split_expert_key(name)
    return BACKBONE if key is None else key[0]


def _is_float(array: np.ndarray) -> bool:
    return np.issubdtype(array.dtype, np.floating)


def group_sizes(global_arrays: Mapping[str, np.ndarray]) -> dict[str | int, int]:
    """Return the number of floating-point elements of the backbone and of each expert."""
    sizes: dict[str | int, int] = {}
    for name, value in global_arrays.items():
        if _is_float(value):
            sizes[group_of(name)] = sizes.get(group_of(name), 0) + int(value.size)
    return sizes


def delta_norms(
    update: HasArrays, global_arrays: Mapping[str, np.ndarray]
) -> dict[str | int, float]:
    """Return the L2 norm of ``update - global`` per group (float arrays only)."""
    squares: dict[str | int, float] = {}
    for name, value in update.arrays.items():
        if _is_float(value):
            delta = (value.astype(np.float64) - global_arrays[name]).ravel()
            squares[group_of(name)] = squares.get(group_of(name), 0.0) + float(delta @ delta)
    return {group: math.sqrt(total) for group, total in squares.items()}


def clip_update(
    update: HasArrays,
    global_arrays: Mapping[str, np.ndarray],
    bounds: Mapping[str | int, float],
    norms: Mapping[str | int, float] | None = None,
) -> tuple[dict[str, np.ndarray], dict[str | int, float]]:
    """Return the update's arrays with each group's delta clipped to ``bounds[group]``.

    Arrays of unclipped groups and integer arrays are returned as they are (the same
    objects), so a round without clipping aggregates bit for bit as before.

    ``norms`` are the update's :func:`delta_norms`, if already computed.

    Returns
    -------
    arrays : dict
    scales : dict
        ``group -> bound / norm`` for each clipped group.
    """
    norms = delta_norms(update, global_arrays) if norms is None else norms
    scales = {
        group: bounds[group] / norm
        for group, norm in norms.items()
        if group in bounds and norm > bounds[group]
    }
    if not scales:
        return update.arrays, scales
    arrays = {}
    for name, value in update.arrays.items():
        scale = scales.get(group_of(name))
        if scale is None or not _is_float(value):
            arrays[name] = value
        else:
            ref = global_arrays[name].astype(np.float64)
            arrays[name] = (ref + scale * (value.astype(np.float64) - ref)).astype(value.dtype)
    return arrays, scales


@dataclass(frozen=True)
class GroupBounds:
    """Bounds of one group's delta in one round (L2 norms; ``inf``: none)."""

    clip: float  # clipped down to this
    reject: float  # above this the holder's copy of the group is left out


def round_bounds(
    norms: Sequence[Mapping[str | int, float]],
    sizes: Mapping[str | int, int],
    max_update_rms: float | None,
    clip_multiple: float | None,
    reject_multiple: float | None,
    *,
    expert_clip_multiple: float | None,
) -> dict[str | int, GroupBounds]:
    """Return each group's bounds this round (adaptive, under the absolute ceiling).

    ``norms`` holds each update's :func:`delta_norms`, ``sizes`` each group's
    floating-point elements. The *reference* of the backbone, and of an expert with at
    least 3 holders, is the low median RMS change over its holders: a delta is clipped
    to ``min(max_update_rms, multiple * reference)`` per element (``clip_multiple``
    for the backbone, ``expert_clip_multiple`` for an expert) and left out above
    ``reject_multiple * reference``. Experts get a wider clip than the backbone: the
    samples routed to an expert differ between its holders, so honest changes of one
    expert differ more (up to ~45x their low median, against ~11x for the backbone, on
    the digits default run); every participant trains the backbone on all its data.
    An expert with fewer holders has no majority to measure it by: it is clipped to the
    ceiling only and left out above ``reject_multiple`` times the low median over every
    expert delta of the round (honest experts move by up to ~35x that median, as the
    samples routed to them differ; the attacks it stops move them by hundreds). Zero
    changes are left out of the medians. A low median is robust: a minority of holders
    cannot raise it.
    """
    rms_by_group: dict[str | int, list[float]] = {}
    for update_norms in norms:
        for group, norm in update_norms.items():
            if sizes.get(group) and norm > 0:
                rms_by_group.setdefault(group, []).append(norm / math.sqrt(sizes[group]))
    pooled = [r for g, rows in rms_by_group.items() if g != BACKBONE for r in rows]
    ceiling = math.inf if max_update_rms is None else max_update_rms
    clip_multiple = math.inf if clip_multiple is None else clip_multiple
    expert_clip_multiple = math.inf if expert_clip_multiple is None else expert_clip_multiple
    reject_multiple = math.inf if reject_multiple is None else reject_multiple
    bounds: dict[str | int, GroupBounds] = {}
    for group, size in sizes.items():
        rows = rms_by_group.get(group, [])
        clip, reject = ceiling, math.inf
        if rows and (group == BACKBONE or len(rows) >= MIN_TRIMMED):
            reference = low_median(rows)
            multiple = clip_multiple if group == BACKBONE else expert_clip_multiple
            clip = min(ceiling, multiple * reference)
            reject = reject_multiple * reference
        elif pooled:
            reject = reject_multiple * low_median(pooled)
        bounds[group] = GroupBounds(clip * math.sqrt(size), reject * math.sqrt(size))
    return bounds
