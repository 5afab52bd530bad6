"""Expert-load statistics and communication accounting."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from .records import Loads, Scores
from .robust import REPORT_RATIO, example_cap, low_median, summarise_clients


def load_stats(loads: np.ndarray) -> dict[str, float]:
    """Return mean, variance and coefficient of variation (std / mean) of expert loads."""
    loads = np.asarray(loads, dtype=float)
    mean = float(loads.mean()) if loads.size else 0.0
    var = float(loads.var()) if loads.size else 0.0
    return {
        "mean": mean,
        "var": var,
        "cv": float(np.sqrt(var) / mean) if mean > 0 else 0.0,
    }


def assignment_purity(assignment: np.ndarray, groups: np.ndarray) -> float:
    """Return the mean over held experts of the share of holders from the majority group.

    ``assignment`` is (clients, E) 0/1, ``groups`` the group of each client. 1 means
    every expert is held by one group only; a random assignment of G equal groups
    scores about 1/G plus chance clumping.
    """
    shares = []
    for holders in np.asarray(assignment, dtype=bool).T:
        if holders.any():
            shares.append(np.bincount(groups[holders]).max() / holders.sum())
    return float(np.mean(shares)) if shares else 0.0


def assignment_nmi(assignment: np.ndarray, groups: np.ndarray) -> float:
    """Return the normalised mutual information between expert held and group.

    Computed over the (client, expert) pairs of the assignment, normalised by the
    arithmetic mean of the two entropies (1: the expert tells the group and back; 0:
    independent). 1 when both are constant.
    """
    clients, experts = np.nonzero(np.asarray(assignment, dtype=bool))
    group_ids = np.unique(groups, return_inverse=True)[1][clients]
    joint = np.zeros((group_ids.max(initial=0) + 1, assignment.shape[1]))
    np.add.at(joint, (group_ids, experts), 1.0)
    joint /= max(joint.sum(), 1.0)
    p_group, p_expert = joint.sum(axis=1), joint.sum(axis=0)

    def entropy(p: np.ndarray) -> float:
        p = p[p > 0]
        return float(-(p * np.log(p)).sum())

    nonzero = joint > 0
    mutual = float(
        (joint[nonzero] * np.log(joint[nonzero] / np.outer(p_group, p_expert)[nonzero])).sum()
    )
    mean_entropy = (entropy(p_group) + entropy(p_expert)) / 2
    return 1.0 if mean_entropy <= 0 else float(np.clip(mutual / mean_entropy, 0.0, 1.0))


def churn(
    experts: Mapping[int, Sequence[int]],
    holding: Mapping[int, Sequence[int]],
    expert_bytes: Sequence[int],
) -> dict[str, float | int]:
    """Return how many participants changed experts since they last trained, and the cost.

    Only participants that trained before count (a first round has no churn).
    ``churn`` is their share whose expert set changed, ``churn_clients`` how many, and
    ``churn_bytes`` the bytes of experts each received that it did not hold before:
    what a client caching its last experts would have to download because of the move.
    """
    returning = [k for k in experts if k in holding]
    moved = [k for k in returning if set(experts[k]) != set(holding[k])]
    new_bytes = sum(int(expert_bytes[e]) for k in moved for e in set(experts[k]) - set(holding[k]))
    return {
        "churn": len(moved) / len(returning) if returning else 0.0,
        "churn_clients": len(moved),
        "churn_bytes": new_bytes,
    }


def nbytes(arrays: Mapping[str, np.ndarray]) -> int:
    """Return the payload size of a set of arrays in bytes."""
    return int(sum(a.nbytes for a in arrays.values()))


def summarise_evaluations(
    evaluations: Sequence[Mapping[str, tuple[int, float, float]]],
) -> Scores:
    """Average personalised evaluations over clients, each client's say bounded.

    Each evaluation maps a split (``local``, ``global``) to (examples, loss, accuracy),
    its counts already capped by what the client can hold
    (:mod:`flexmoe_core.reply_gate`). Counts are also capped by the round's: the
    federation's fence for the local splits (:func:`~flexmoe_core.robust.example_cap`),
    the low median for the global split (every client evaluates the same subset), so
    one client claiming a perfect score over 2^53 samples moves the figure by no more
    than its capped share (:func:`~flexmoe_core.robust.summarise_clients`); honest
    counts are not cut, and the figure is their weighted mean.
    Returns ``<split>_acc``, ``<split>_loss``, and the spread over clients
    ``<split>_acc_min`` and ``<split>_acc_std``, for every split some client measured.
    """
    out: dict[str, float] = {}
    for split in ("local", "global"):
        rows = [e[split] for e in evaluations if split in e and e[split][0] > 0]
        if not rows:
            continue
        counts = [float(num) for num, _, _ in rows]
        cap = low_median(counts) if split == "global" else example_cap(counts, REPORT_RATIO)
        summary = summarise_clients(rows, [cap] * len(rows))
        out[f"{split}_acc"] = summary["acc"]
        out[f"{split}_loss"] = summary["loss"]
        out[f"{split}_acc_min"] = summary["acc_min"]
        out[f"{split}_acc_std"] = summary["acc_std"]
    return Scores(**out)


class LoadTracker:
    """Expert load per round and cumulative: clients holding each expert and samples routed."""

    def __init__(self, num_experts: int) -> None:
        self.num_experts = num_experts
        self.cumulative_holders = np.zeros(num_experts)
        self.cumulative_samples = np.zeros(num_experts)

    def record(self, holders: np.ndarray, samples: np.ndarray) -> Loads:
        """Add one round's loads and return the round's and the cumulative statistics."""
        holders, samples = np.asarray(holders, float), np.asarray(samples, float)
        self.cumulative_holders += holders
        self.cumulative_samples += samples
        stats = {
            name: load_stats(loads)
            for name, loads in (
                ("clients", holders),
                ("samples", samples),
                ("cumulative_clients", self.cumulative_holders),
                ("cumulative_samples", self.cumulative_samples),
            )
        }
        return Loads(
            clients=holders.astype(int).tolist(),
            samples=samples.astype(int).tolist(),
            cumulative_clients=self.cumulative_holders.astype(int).tolist(),
            cumulative_samples=self.cumulative_samples.astype(int).tolist(),
            **{f"{name}_var": s["var"] for name, s in stats.items()},
            **{f"{name}_cv": s["cv"] for name, s in stats.items()},
        )

    def state(self) -> dict[str, list[float]]:
        """Return the cumulative loads as plain data."""
        return {
            "holders": self.cumulative_holders.tolist(),
            "samples": self.cumulative_samples.tolist(),
        }

    def load_state(self, state: Mapping[str, list[float]]) -> None:
        """Restore cumulative loads written by :meth:`state`."""
        self.cumulative_holders = np.asarray(state["holders"], dtype=float)
        self.cumulative_samples = np.asarray(state["samples"], dtype=float)
