"""Per-expert aggregation with bounded influence (backbone over all, experts over holders).

Threat model
------------
The server is trusted; a minority of participants may be malicious or broken. They
control everything they send: arrays (any finite values; NaN/Inf, wrong shapes and
unassigned experts are refused by :func:`check_update`), the example count and the
per-expert feedback (usage, accuracy, loss). Without bounds, the weighted average hands
such a client the model: ``usage = 1e9`` makes its copy of every expert it holds the
new expert, and ``num_examples = 1e15`` its backbone the new backbone.

What a client can move is bounded by what an honest client can truthfully report:

- **Examples** count at most what the client declared before the round (the server's
  ``declared_examples``, e.g. from the capacity query) and at most
  ``max_examples_ratio`` times the round's *low median* of reported examples (the
  lower middle value: with two clients it is the smaller one, so one client cannot
  raise the cap by itself). A capped client's usage is scaled down with it.
- **Usage** of one expert is at most the client's examples (a sample is routed to an
  expert at most once per epoch, and usage counts one epoch), and its usage summed
  over its experts at most ``examples * min(top_k, experts held)`` (each sample goes
  to ``top_k`` experts).
- **Update size**: ``delta = update - global`` is clipped, per backbone and per
  expert, to L2 norm ``max_update_rms * sqrt(n)`` (n: floating-point elements of that
  backbone or expert), i.e. a root-mean-square change per element of at most
  ``max_update_rms``. The default (1.0) is over 30 times the largest honest change
  measured at the default learning rate (digits default run: 0.025 backbone, 0.031
  expert; CPU CIFAR-10 preset: 0.023, 0.026; a paper-scale ResNet-18 client's first
  round: 0.021, 0.010 — benchmarks/bench_update_norms.py). Per element, so one bound
  fits models of any size; it only acts on updates SGD at sane settings does not make.
- Optionally **robust aggregation** (``method=median`` or ``trimmed_mean``): the
  coordinate-wise median or trimmed mean of the (clipped) updates, unweighted, ignores
  a minority of outliers whatever their weights.

Hence one client moves an expert (or the backbone) by at most its bounded weight share
times ``max_update_rms * sqrt(n)`` per round under ``mean``. Not covered: many
colluding clients (a majority of an expert's holders owns it; the median needs a
majority of honest holders), slow poisoning within the bounds over many rounds, the
fitness feedback's effect on the allocation (it is range-checked only), integer
buffers (BatchNorm ``num_batches_tracked``: averaged, never clipped; they do not feed
back into training), and a malicious server (see :mod:`flexmoe_core.privacy`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from .fitness import ExpertFeedback
from .model import split_expert_key
from .settings import AggregationSettings

METHODS = ("mean", "median", "trimmed_mean")
WEIGHTINGS = ("usage", "num_examples")
BACKBONE = "backbone"
# BatchNorm running variances: a negative one (finite, so past the NaN check) makes
# every client's evaluation NaN; updates with one are refused.
VARIANCE_SUFFIX = "running_var"


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
    method : {"mean", "median", "trimmed_mean"}
        ``mean`` is weighted; ``median`` and ``trimmed_mean`` are coordinate-wise and
        unweighted.
    trim_fraction : float
        Share of the values dropped at each end by ``trimmed_mean`` (rounded down, so
        with fewer than ``1 / trim_fraction`` holders nothing is dropped).
    max_examples_ratio : float or None
        Cap on a client's examples in units of the round's low median; None: no cap.
    max_update_rms : float or None
        Clip of ``update - global`` per backbone and per expert, as a root-mean-square
        change per element; None: no clip.
    top_k : int or None
        Experts per sample (``model.top_k``): bounds a client's total usage. None:
        only the per-expert bound (usage <= examples) applies.
    """

    expert_weighting: str = "usage"
    method: str = "mean"
    trim_fraction: float = 0.2
    max_examples_ratio: float | None = 10.0
    max_update_rms: float | None = 1.0
    top_k: int | None = None

    @classmethod
    def from_settings(cls, aggregation: AggregationSettings, top_k: int) -> AggregationPolicy:
        """Build from ``aggregation.*`` and ``model.top_k`` (checked by the schema)."""
        return cls(
            expert_weighting=aggregation.expert_weighting,
            method=aggregation.method,
            trim_fraction=aggregation.trim_fraction,
            max_examples_ratio=aggregation.max_examples_ratio,
            max_update_rms=aggregation.max_update_rms,
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
    """

    examples: dict[int, tuple[float, float]] = field(default_factory=dict)
    usage: dict[int, dict[int, tuple[float, float]]] = field(default_factory=dict)
    clipped: dict[int, dict[str | int, float]] = field(default_factory=dict)

    def clients(self) -> list[int]:
        """Return the clients whose influence was bounded, sorted."""
        return sorted(set(self.examples) | set(self.usage) | set(self.clipped))

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
        for group, scale in sorted(self.clipped.get(client, {}).items(), key=lambda g: str(g[0])):
            name = "backbone" if group == BACKBONE else f"expert {group}"
            parts.append(f"{name} delta clipped x{scale:.3g}")
        return "; ".join(parts)


# ------------------------------------------------------------------ weights
def low_median(values: Sequence[float]) -> float:
    """Return the lower middle value (the smaller of the two middles for even counts)."""
    ordered = sorted(values)
    return float(ordered[(len(ordered) - 1) // 2])


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
        cap = policy.max_examples_ratio * low_median(examples)
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


# ------------------------------------------------------------------ clipping
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
    update: ClientUpdate, global_arrays: Mapping[str, np.ndarray]
) -> dict[str | int, float]:
    """Return the L2 norm of ``update - global`` per group (float arrays only)."""
    squares: dict[str | int, float] = {}
    for name, value in update.arrays.items():
        if _is_float(value):
            delta = (value.astype(np.float64) - global_arrays[name]).ravel()
            squares[group_of(name)] = squares.get(group_of(name), 0.0) + float(delta @ delta)
    return {group: math.sqrt(total) for group, total in squares.items()}


def clip_update(
    update: ClientUpdate,
    global_arrays: Mapping[str, np.ndarray],
    bounds: Mapping[str | int, float],
) -> tuple[dict[str, np.ndarray], dict[str | int, float]]:
    """Return the update's arrays with each group's delta clipped to ``bounds[group]``.

    Arrays of unclipped groups and integer arrays are returned as they are (the same
    objects), so a round without clipping aggregates bit for bit as before.

    Returns
    -------
    arrays : dict
    scales : dict
        ``group -> bound / norm`` for each clipped group.
    """
    scales = {
        group: bounds[group] / norm
        for group, norm in delta_norms(update, global_arrays).items()
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


# ------------------------------------------------------------------ combining
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
        Accepted updates (passed :func:`check_update`), in a fixed order (the float
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
    bounds = (
        {}
        if policy.max_update_rms is None
        else {
            g: policy.max_update_rms * math.sqrt(n) for g, n in group_sizes(global_arrays).items()
        }
    )
    clipped = []
    for u in updates:
        arrays, scales = clip_update(u, global_arrays, bounds)
        if scales:
            report.clipped[u.client_id] = scales
        clipped.append(arrays)
    for name in global_arrays:
        holders = [i for i, arrays in enumerate(clipped) if name in arrays]
        if not holders:
            continue
        stack = [clipped[i][name] for i in holders]
        if policy.method != "mean":
            result[name] = robust_mean(stack, policy.method, policy.trim_fraction)
            continue
        group = group_of(name)
        if group == BACKBONE or policy.expert_weighting == "num_examples":
            weights = np.array([examples[i] for i in holders], dtype=float)
        else:
            weights = np.array([usages[i].get(int(group), 0.0) for i in holders], dtype=float)
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


def check_update(
    update: ClientUpdate,
    global_arrays: Mapping[str, np.ndarray],
    assigned: Sequence[int],
) -> list[str]:
    """Return what is wrong with a client's update (empty if it can be aggregated).

    Checks that it carries exactly the backbone and its assigned experts, with the
    global shapes and dtypes, finite values, no negative BatchNorm variance, a
    positive example count, and feedback for every assigned expert.
    """
    problems: list[str] = []
    assigned_set = {int(e) for e in assigned}
    expected = {
        name
        for name in global_arrays
        if (key := split_expert_key(name)) is None or key[0] in assigned_set
    }
    if extra := sorted(set(update.arrays) - expected):
        experts = sorted({k[0] for n in extra if (k := split_expert_key(n))})
        problems.append(
            f"unexpected arrays {extra[:3]}"
            + (f" (experts {experts} were not assigned)" if experts else "")
        )
    if missing := sorted(expected - set(update.arrays)):
        problems.append(f"missing arrays {missing[:3]}")
    for name in sorted(expected & set(update.arrays)):
        got, ref = update.arrays[name], global_arrays[name]
        if got.shape != ref.shape or got.dtype != ref.dtype:
            problems.append(
                f"{name}: got {got.dtype}{list(got.shape)}, expected {ref.dtype}{list(ref.shape)}"
            )
        elif np.issubdtype(got.dtype, np.floating) and not np.isfinite(got).all():
            problems.append(f"{name}: contains NaN or Inf")
        elif name.endswith(VARIANCE_SUFFIX) and (got < 0).any():
            problems.append(f"{name}: a negative variance")
    if update.num_examples <= 0:
        problems.append(f"num_examples={update.num_examples} must be positive")
    if missing_fb := sorted(assigned_set - set(update.feedback)):
        problems.append(f"no feedback for experts {missing_fb}")
    if extra_fb := sorted(set(update.feedback) - assigned_set):
        problems.append(f"feedback for unassigned experts {extra_fb}")
    return problems
