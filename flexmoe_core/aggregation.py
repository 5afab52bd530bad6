"""Per-expert aggregation: backbone over all clients, each expert over its holders."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from .fitness import ExpertFeedback
from .model import split_expert_key


@dataclass
class ClientUpdate:
    """One client's reply to a training round."""

    client_id: int
    arrays: dict[str, np.ndarray]  # backbone tensors + tensors of its assigned experts
    num_examples: int
    feedback: dict[int, ExpertFeedback] = field(default_factory=dict)


def weighted_mean(stack: Sequence[np.ndarray], weights: np.ndarray) -> np.ndarray:
    """Return sum_i w_i a_i / sum_i w_i, in the arrays' dtype (integers rounded)."""
    dtype = stack[0].dtype
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum() if w.sum() > 0 else np.full(len(stack), 1.0 / len(stack))
    mean = np.tensordot(w, np.stack(stack).astype(np.float64, copy=False), axes=1)
    out = np.rint(mean) if np.issubdtype(dtype, np.integer) else mean
    return np.asarray(out, dtype=dtype)


def aggregate(
    global_arrays: Mapping[str, np.ndarray],
    updates: Sequence[ClientUpdate],
    expert_weighting: str = "usage",
) -> dict[str, np.ndarray]:
    """Return the new global arrays.

    The backbone is averaged over all updates weighted by ``num_examples``. Expert e is
    averaged over the clients that returned it, weighted by their usage of e (or by
    ``num_examples``); if no holder routed any sample to e, its holders count equally.
    An expert nobody returned keeps its value.
    """
    if expert_weighting not in ("usage", "num_examples"):
        raise ValueError(f"expert_weighting={expert_weighting!r}: usage|num_examples")
    result = dict(global_arrays)
    if not updates:
        return result
    for name in global_arrays:
        holders = [u for u in updates if name in u.arrays]
        if not holders:
            continue
        expert = split_expert_key(name)
        if expert is None or expert_weighting == "num_examples":
            weights = np.array([u.num_examples for u in holders], dtype=float)
        else:
            weights = np.array(
                [u.feedback[expert[0]].usage if expert[0] in u.feedback else 0.0 for u in holders]
            )
        result[name] = weighted_mean([u.arrays[name] for u in holders], weights)
    return result


def check_update(
    update: ClientUpdate,
    global_arrays: Mapping[str, np.ndarray],
    assigned: Sequence[int],
) -> list[str]:
    """Return what is wrong with a client's update (empty if it can be aggregated).

    Checks that it carries exactly the backbone and its assigned experts, with the
    global shapes and dtypes, finite values, a positive example count, and feedback
    for every assigned expert.
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
    if update.num_examples <= 0:
        problems.append(f"num_examples={update.num_examples} must be positive")
    if missing_fb := sorted(assigned_set - set(update.feedback)):
        problems.append(f"no feedback for experts {missing_fb}")
    if extra_fb := sorted(set(update.feedback) - assigned_set):
        problems.append(f"feedback for unassigned experts {extra_fb}")
    return problems
