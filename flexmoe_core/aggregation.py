"""Per-expert aggregation with bounded influence (backbone over all, experts over holders).

Threat model
------------
The server is trusted; a minority of participants may be malicious or broken. They
control everything they send: arrays (any finite values; NaN/Inf, wrong shapes and
unassigned experts are refused by :mod:`flexmoe_core.reply_gate`), the example count and the
per-expert feedback (usage, accuracy, loss). Without bounds, the weighted average hands
such a client the model: ``usage = 1e9`` makes its copy of every expert it holds the
new expert, and ``num_examples = 1e15`` its backbone the new backbone.

What a client can move is bounded by what an honest client can truthfully report:

- **Examples** count at most what the client declared before the round (the server's
  ``declared_examples``, from the capacity query) and at most ``max_examples_ratio``
  times the low median of the participants' declared counts, lowered to their upper
  fence Q3 + 3 IQR (:func:`flexmoe_core.robust.example_cap`): a minority's claims move
  neither. A capped client's usage is scaled down with it.
- **Usage** of one expert is at most the client's examples (a sample is routed to an
  expert at most once per epoch, and usage counts one epoch), and its usage summed
  over its experts at most ``examples * min(top_k, experts held)``.
- **Update size** (:mod:`flexmoe_core.update_bounds`): ``delta = update - global`` is
  clipped, per backbone and per expert with 3 or more holders, to ``clip_multiple``
  (backbone) or ``expert_clip_multiple`` (expert) times the round's low median change
  of that group over its holders, and never above
  ``max_update_rms`` per element; a delta beyond ``reject_multiple`` times that
  reference is left out of the group.
- **Robust combination** (``method=auto``, the default): a group with at least
  ``trim_min_holders`` (6) holders — the backbone, in practice, and an expert only in a
  large federation — drops, per coordinate, the extreme values (the ``trim_fraction``
  share, at least one at each end) and averages the rest with their weights, so one
  outlier never survives it; a group with fewer holders takes the weighted mean of the
  bounded updates. Trimming an expert of 3 to 5 holders cost honest non-IID runs 2.8
  local points (its holders' data differ, and the values dropped are honest ones);
  trimming the backbone cost nothing measurable and stops a client that pushes the
  backbone one way every round within the clip.

Not covered: colluding clients that are a majority of an expert's holders, an expert
with fewer than 3 holders (one of two can move it within the rejection bound), an
expert of 3 to ``trim_min_holders - 1`` holders (clipped, not trimmed), slow
poisoning within the bounds, the fitness feedback's effect on the allocation (range
checked only), integer buffers (BatchNorm ``num_batches_tracked``: averaged, never
clipped), and a malicious server (see :mod:`flexmoe_core.privacy`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from .fitness import ExpertFeedback
from .robust import example_cap, trim_count, trimmed_weighted_mean
from .settings import AggregationSettings
from .update_bounds import (
    BACKBONE,
    clip_update,
    delta_norms,
    group_of,
    group_sizes,
    round_bounds,
)

METHODS = ("auto", "mean", "median", "trimmed_mean")
WEIGHTINGS = ("usage", "num_examples")


@dataclass
class ClientUpdate:
    """One client's reply to a training round."""

    client_id: int
    arrays: dict[str, np.ndarray]  # backbone tensors + tensors of its assigned experts
    num_examples: int
    feedback: dict[int, ExpertFeedback] = field(default_factory=dict)


@dataclass(frozen=True)
class AggregationPolicy:
    """How updates are combined, and how much one client can weigh (``aggregation.*``).

    The defaults equal ``conf/config.yaml``'s (a test keeps them equal).

    Attributes
    ----------
    expert_weighting : {"usage", "num_examples"}
        Weights of an expert's mean over its holders (the backbone's are examples).
    method : {"auto", "mean", "median", "trimmed_mean"}
        ``auto``: per backbone and expert with at least ``trim_min_holders`` holders,
        the weighted mean of what is left after dropping, per coordinate,
        ``trim_count(holders, trim_fraction)`` values at each end; the weighted mean
        of the bounded updates below. ``mean``: the weighted mean everywhere.
        ``median`` and ``trimmed_mean`` are coordinate-wise and unweighted.
    trim_fraction : float
        Share of the values dropped at each end by ``auto`` and ``trimmed_mean``
        (rounded down; ``trimmed_mean`` drops nothing with fewer than
        ``1 / trim_fraction`` holders).
    trim_min_holders : int
        Holders a group needs before ``auto`` trims it.
    max_examples_ratio : float or None
        Cap on a client's examples in units of the round's low median; None: no cap.
    max_update_rms : float or None
        Clip of ``update - global`` per backbone and per expert, as a root-mean-square
        change per element; None: no clip. The ceiling of the adaptive clip.
    clip_multiple : float or None
        Adaptive clip: the backbone's delta is clipped to this many times the round's
        reference RMS change of the backbone (:func:`round_bounds`); None: the
        ceiling only.
    expert_clip_multiple : float or None
        The same for an expert with at least 3 holders (its own reference).
    reject_multiple : float or None
        A group's delta whose RMS change is more than this many times the reference
        is left out of that group's aggregate (the holder's other groups still
        count); None: never.
    top_k : int or None
        Experts per sample (``model.top_k``): bounds a client's total usage. None:
        only the per-expert bound (usage <= examples) applies.
    """

    expert_weighting: str = "usage"
    method: str = "auto"
    trim_fraction: float = 0.2
    trim_min_holders: int = 6
    max_examples_ratio: float | None = 10.0
    max_update_rms: float | None = 1.0
    clip_multiple: float | None = 2.0
    expert_clip_multiple: float | None = 4.0
    reject_multiple: float | None = 50.0
    top_k: int | None = None

    @classmethod
    def from_settings(cls, aggregation: AggregationSettings, top_k: int) -> AggregationPolicy:
        """Build from ``aggregation.*`` and ``model.top_k`` (checked by the schema)."""
        return cls(
            expert_weighting=aggregation.expert_weighting,
            method=aggregation.method,
            trim_fraction=aggregation.trim_fraction,
            trim_min_holders=aggregation.trim_min_holders,
            max_examples_ratio=aggregation.max_examples_ratio,
            max_update_rms=aggregation.max_update_rms,
            clip_multiple=aggregation.clip_multiple,
            expert_clip_multiple=aggregation.expert_clip_multiple,
            reject_multiple=aggregation.reject_multiple,
            top_k=top_k,
        )


@dataclass
class InfluenceReport:
    """What the bounds changed in one aggregation, per client id (for logs and metrics).

    Attributes
    ----------
    examples : dict
        ``client -> (reported, counted)`` where the count was lowered.
    usage : dict
        ``client -> {expert: (reported, counted)}`` where usage was lowered.
    clipped : dict
        ``client -> {group: scale}`` for each clipped group (``"backbone"`` or an
        expert id), ``scale = bound / norm`` of its delta.
    rejected : dict
        ``client -> {group: norm / rejection bound}`` for each group left out.
    """

    examples: dict[int, tuple[float, float]] = field(default_factory=dict)
    usage: dict[int, dict[int, tuple[float, float]]] = field(default_factory=dict)
    clipped: dict[int, dict[str | int, float]] = field(default_factory=dict)
    rejected: dict[int, dict[str | int, float]] = field(default_factory=dict)

    def clients(self) -> list[int]:
        """Return the clients whose influence was bounded, sorted."""
        return sorted(set(self.examples) | set(self.usage) | set(self.clipped) | set(self.rejected))

    def routine(self, client: int) -> bool:
        """Whether ``client`` was only clipped (honest updates are, some rounds).

        No claim of it was cut and no part of its update left out.
        """
        return not any(client in cut for cut in (self.examples, self.usage, self.rejected))

    def describe(self, client: int) -> str:
        """Say what was bounded for ``client``, on one line (for the log and the records).

        E.g. ``examples 1e+15 counted as 1000; usage of expert 3 1e+09 -> 100;
        backbone delta clipped x0.003``.
        """
        parts = []
        if client in self.examples:
            reported, counted = self.examples[client]
            parts.append(f"examples {reported:.4g} counted as {counted:.4g}")
        for expert, (reported, counted) in sorted(self.usage.get(client, {}).items()):
            parts.append(f"usage of expert {expert} {reported:.4g} -> {counted:.4g}")
        rejected, clipped = self.rejected.get(client, {}), self.clipped.get(client, {})
        for group in sorted(set(rejected) | set(clipped), key=str):
            name = "backbone" if group == BACKBONE else f"expert {group}"
            if group in rejected:
                parts.append(f"{name} delta {rejected[group]:.3g}x the rejection bound: left out")
            else:
                parts.append(f"{name} delta clipped x{clipped[group]:.3g}")
        return "; ".join(parts)


# ------------------------------------------------------------------ weights
def bounded_counts(
    updates: Sequence[ClientUpdate],
    policy: AggregationPolicy,
    declared_examples: Mapping[int, float] | None = None,
    report: InfluenceReport | None = None,
) -> tuple[list[float], list[dict[int, float]]]:
    """Return each update's examples and per-expert usage as they may count.

    Parameters
    ----------
    updates : sequence of ClientUpdate
        The round's accepted updates.
    policy : AggregationPolicy
        ``max_examples_ratio`` and ``top_k``.
    declared_examples : mapping, optional
        ``client_id -> examples`` the client declared before the round.
    report : InfluenceReport, optional
        Filled with what was lowered.

    Returns
    -------
    examples : list of float
    usage : list of dict
        ``expert -> usage`` per update.
    """
    report = report if report is not None else InfluenceReport()
    declared = declared_examples or {}
    examples = []
    for u in updates:
        count = float(u.num_examples)
        if u.client_id in declared:
            count = min(count, max(float(declared[u.client_id]), 0.0))
        examples.append(count)
    if policy.max_examples_ratio is not None and examples:
        # The distribution of what the participants declared before the round (their
        # reports when none declared): a minority's claims move neither its median
        # nor its quartiles.
        claims = [float(declared[u.client_id]) for u in updates if u.client_id in declared]
        cap = example_cap(claims or examples, policy.max_examples_ratio)
        examples = [min(count, cap) for count in examples]
    usages = []
    for u, count in zip(updates, examples, strict=True):
        reported = float(u.num_examples)
        if count < reported:
            report.examples[u.client_id] = (reported, count)
        shrink = count / reported if reported > 0 else 0.0
        usage = {e: min(fb.usage * shrink, count) for e, fb in u.feedback.items()}
        if policy.top_k is not None and usage:
            budget = count * min(policy.top_k, len(usage))
            total = sum(usage.values())
            if total > budget:
                usage = {e: v * budget / total for e, v in usage.items()}
        # Lowered beyond the examples cap's own scaling (reported in ``examples``).
        lowered = {
            e: (fb.usage, usage[e]) for e, fb in u.feedback.items() if usage[e] < fb.usage * shrink
        }
        if lowered:
            report.usage[u.client_id] = lowered
        usages.append(usage)
    return examples, usages


# ------------------------------------------------------------------ combining
def as_dtype(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Return float64 ``values`` in ``dtype`` (integers rounded)."""
    out = np.rint(values) if np.issubdtype(dtype, np.integer) else values
    return np.asarray(out, dtype=dtype)


def weighted_mean(stack: Sequence[np.ndarray], weights: np.ndarray) -> np.ndarray:
    """Return sum_i w_i a_i / sum_i w_i, in the arrays' dtype (integers rounded)."""
    dtype = stack[0].dtype
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum() if w.sum() > 0 else np.full(len(stack), 1.0 / len(stack))
    mean = np.tensordot(w, np.stack(stack).astype(np.float64, copy=False), axes=1)
    out = np.rint(mean) if np.issubdtype(dtype, np.integer) else mean
    return np.asarray(out, dtype=dtype)


def robust_mean(stack: Sequence[np.ndarray], method: str, trim_fraction: float) -> np.ndarray:
    """Return the coordinate-wise median or trimmed mean, in the arrays' dtype.

    ``trimmed_mean`` drops ``floor(trim_fraction * n)`` values at each end of every
    coordinate before averaging (as ``scipy.stats.trim_mean``).
    """
    dtype = stack[0].dtype
    values = np.stack(stack).astype(np.float64, copy=False)
    if method == "median":
        out = np.median(values, axis=0)
    elif method == "trimmed_mean":
        cut = int(trim_fraction * len(stack))
        out = np.sort(values, axis=0)[cut : len(stack) - cut].mean(axis=0)
    else:
        raise ValueError(f"method={method!r}: median|trimmed_mean")
    out = np.rint(out) if np.issubdtype(dtype, np.integer) else out
    return np.asarray(out, dtype=dtype)


@dataclass
class AggregationResult:
    """The new global arrays and what the bounds changed."""

    arrays: dict[str, np.ndarray]
    report: InfluenceReport


def aggregate_bounded(
    global_arrays: Mapping[str, np.ndarray],
    updates: Sequence[ClientUpdate],
    policy: AggregationPolicy | None = None,
    declared_examples: Mapping[int, float] | None = None,
) -> AggregationResult:
    """Aggregate per expert with every client's influence bounded (see module docstring).

    Parameters
    ----------
    global_arrays : mapping
        The current global backbone and all experts.
    updates : sequence of ClientUpdate
        Accepted updates (judged by :mod:`flexmoe_core.reply_gate`), in a fixed order (the float
        sums depend on it).
    policy : AggregationPolicy, optional
        Default: ``AggregationPolicy()`` (the configuration's defaults).
    declared_examples : mapping, optional
        ``client_id -> examples`` declared before the round; unknown clients are
        bounded by the median rule only.

    Returns
    -------
    AggregationResult
        The backbone is the mean over all updates weighted by (bounded) examples;
        expert e the mean over the updates that hold it, weighted by (bounded) usage of
        e or examples; if no holder routed a sample to e, its holders count equally. An
        expert nobody returned keeps its value. ``median``/``trimmed_mean`` ignore the
        weights.
    """
    policy = policy or AggregationPolicy()
    report = InfluenceReport()
    result = dict(global_arrays)
    if not updates:
        return AggregationResult(result, report)
    examples, usages = bounded_counts(updates, policy, declared_examples, report)
    norms = [delta_norms(u, global_arrays) for u in updates]
    bounds = round_bounds(
        norms,
        group_sizes(global_arrays),
        policy.max_update_rms,
        policy.clip_multiple,
        policy.reject_multiple,
        expert_clip_multiple=policy.expert_clip_multiple,
    )
    clip = {g: b.clip for g, b in bounds.items() if math.isfinite(b.clip)}
    clipped = []
    for u, norm in zip(updates, norms, strict=True):
        arrays, scales = clip_update(u, global_arrays, clip, norm)
        if scales:
            report.clipped[u.client_id] = scales
        if far := {g: n / bounds[g].reject for g, n in norm.items() if n > bounds[g].reject}:
            # Far beyond what the round's holders moved: not this group's data at all.
            report.rejected[u.client_id] = far
            arrays = {k: v for k, v in arrays.items() if group_of(k) not in far}
        clipped.append(arrays)
    for name in global_arrays:
        holders = [i for i, arrays in enumerate(clipped) if name in arrays]
        if not holders:
            continue
        stack = [clipped[i][name] for i in holders]
        if policy.method in ("median", "trimmed_mean"):
            result[name] = robust_mean(stack, policy.method, policy.trim_fraction)
            continue
        group = group_of(name)
        if group == BACKBONE or policy.expert_weighting == "num_examples":
            weights = np.array([examples[i] for i in holders], dtype=float)
        else:
            weights = np.array([usages[i].get(int(group), 0.0) for i in holders], dtype=float)
        if policy.method == "auto":
            # Trimming drops honest values too (the clients whose data differ most):
            # only a group with many holders can afford it (trim_min_holders).
            enough = len(stack) >= policy.trim_min_holders
            cut = trim_count(len(stack), policy.trim_fraction) if enough else 0
            result[name] = as_dtype(trimmed_weighted_mean(stack, weights, cut), stack[0].dtype)
        else:
            result[name] = weighted_mean(stack, weights)
    return AggregationResult(result, report)


def aggregate(
    global_arrays: Mapping[str, np.ndarray],
    updates: Sequence[ClientUpdate],
    expert_weighting: str = "usage",
    policy: AggregationPolicy | None = None,
    declared_examples: Mapping[int, float] | None = None,
) -> dict[str, np.ndarray]:
    """Return the new global arrays (:func:`aggregate_bounded` without its report).

    ``policy`` wins over ``expert_weighting``; without it the default bounds apply
    with ``expert_weighting``.
    """
    policy = policy or AggregationPolicy(expert_weighting=expert_weighting)
    return aggregate_bounded(global_arrays, updates, policy, declared_examples).arrays
