"""The allocation problem: its inputs, load bounds, checks, errors and result.

Every allocator maps (fitness Q of the round's participants, capacities k_c, the
experts' historical load deficit H) to a 0/1 assignment X of shape (clients, E). What
they all share lives here, so that the allocators (:mod:`.flex`, :mod:`.baselines`)
and the solvers (:mod:`.flow`, :mod:`.lp`) build on it without importing each other.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np


class InfeasibleAllocationError(ValueError):
    """The allocation constraints cannot be met; the message says which and why."""


@dataclass(frozen=True)
class LoadBounds:
    """Per-expert bounds on how many clients hold each expert this round."""

    lower: np.ndarray  # (E,) int
    upper: np.ndarray  # (E,) int
    mean_load: float  # L-bar = sum_c k_c / E


def validate_capacities(capacities: Sequence[int] | np.ndarray, num_experts: int) -> np.ndarray:
    """Return capacities as an int array, refusing k_c < 1 or k_c > E with a clear error."""
    caps = np.asarray(capacities)
    if caps.ndim != 1 or caps.size == 0:
        raise InfeasibleAllocationError("capacities must be a non-empty 1-D list")
    if not np.all(np.equal(np.mod(caps, 1), 0)):
        raise InfeasibleAllocationError(f"capacities must be integers, got {caps.tolist()}")
    caps = caps.astype(int)
    if (bad := np.flatnonzero(caps < 1)).size:
        raise InfeasibleAllocationError(
            f"capacity constraint: clients at positions {bad.tolist()} have capacity "
            f"{caps[bad].tolist()} < 1; every client must hold at least one expert "
            "(raise their capacity or leave them out of the round)"
        )
    if (bad := np.flatnonzero(caps > num_experts)).size:
        raise InfeasibleAllocationError(
            f"capacity constraint: clients at positions {bad.tolist()} have capacity "
            f"{caps[bad].tolist()} > E={num_experts} experts; a client cannot hold an "
            f"expert twice (lower their capacity to at most {num_experts} or add experts)"
        )
    return caps


def load_bounds(
    capacities: np.ndarray,
    num_experts: int,
    epsilon: float,
    deficit: np.ndarray,
    rng: np.random.Generator,
    deficit_rule: bool = True,
) -> LoadBounds:
    """Return the load bounds floor((1-eps) L-bar) .. ceil((1+eps) L-bar).

    With ``epsilon == 0`` and a fractional L-bar, every expert gets floor(L-bar) and
    the ``sum k - E floor(L-bar)`` remainder slots go to the experts with the largest
    historical deficit H (ties broken by ``rng``), so cumulative loads stay equal.
    ``deficit_rule=False`` (an ablation) leaves each expert's load free in
    floor(L-bar) .. ceil(L-bar), so the remainder slots go wherever fitness prefers.
    """
    total = int(capacities.sum())
    mean_load = total / num_experts
    if epsilon == 0:
        base, extra = divmod(total, num_experts)
        lower = np.full(num_experts, base, dtype=int)
        if extra:
            # drawn with or without the rule, so the rest of the seed's stream is the same
            order = np.lexsort((rng.random(num_experts), -np.asarray(deficit, dtype=float)))
            if not deficit_rule:
                return LoadBounds(lower, lower + 1, mean_load)
            lower[order[:extra]] += 1
        return LoadBounds(lower, lower.copy(), mean_load)
    low = math.floor((1 - epsilon) * mean_load + 1e-9)
    high = math.ceil((1 + epsilon) * mean_load - 1e-9)
    return LoadBounds(
        np.full(num_experts, max(low, 0), dtype=int),
        np.full(num_experts, high, dtype=int),
        mean_load,
    )


def check_feasible(capacities: np.ndarray, num_experts: int, bounds: LoadBounds) -> None:
    """Refuse load bounds that no assignment can meet, naming the constraint."""
    total, clients = int(capacities.sum()), len(capacities)
    if (bounds.lower > bounds.upper).any():
        raise InfeasibleAllocationError(
            f"load bounds: lower {bounds.lower.tolist()} exceeds upper "
            f"{bounds.upper.tolist()} (use epsilon >= 0)"
        )
    if bounds.lower.sum() > total:
        raise InfeasibleAllocationError(
            f"load-balance constraint: experts need at least {bounds.lower.sum()} slots "
            f"in total but the clients' capacities give only {total} "
            "(raise capacities, add clients, or increase epsilon)"
        )
    if np.minimum(bounds.upper, clients).sum() < total:
        raise InfeasibleAllocationError(
            f"load-balance constraint: capacities give {total} slots but the experts can "
            f"take at most {np.minimum(bounds.upper, clients).sum()} "
            f"({clients} clients, upper bounds {bounds.upper.tolist()}); "
            "increase epsilon or lower capacities"
        )
    if (bounds.lower > clients).any():
        raise InfeasibleAllocationError(
            f"load-balance constraint: an expert must be held by {bounds.lower.max()} "
            f"clients but only {clients} take part (sample more clients per round)"
        )


def check_inputs(fitness: np.ndarray, capacities: np.ndarray) -> np.ndarray:
    """Return the capacities as ints after checking Q's shape, finiteness and the k_c."""
    if fitness.ndim != 2 or fitness.shape[0] != len(capacities):
        raise ValueError(
            f"fitness has shape {fitness.shape} but there are {len(capacities)} capacities"
        )
    if not np.isfinite(fitness).all():
        raise ValueError("fitness contains NaN or Inf")
    return validate_capacities(capacities, fitness.shape[1])


def verify_assignment(assignment: np.ndarray, capacities: np.ndarray, bounds: LoadBounds) -> None:
    """Raise if ``assignment`` breaks a capacity or load bound (a solver bug guard)."""
    rows, loads = assignment.sum(axis=1), assignment.sum(axis=0)
    if not np.array_equal(rows, capacities):
        raise RuntimeError(f"solver broke capacities: {rows.tolist()} != {capacities.tolist()}")
    if (loads < bounds.lower).any() or (loads > bounds.upper).any():
        raise RuntimeError(
            f"solver broke load bounds: {loads.tolist()} not in "
            f"{bounds.lower.tolist()}..{bounds.upper.tolist()}"
        )


def infeasible_assignment_error(
    capacities: np.ndarray, bounds: LoadBounds
) -> InfeasibleAllocationError:
    """Return the error both solvers raise when no assignment meets the bounds."""
    return InfeasibleAllocationError(
        f"the solver found no assignment meeting capacities {capacities.tolist()} "
        f"and load bounds {bounds.lower.tolist()}..{bounds.upper.tolist()}"
    )


@dataclass(frozen=True)
class Allocation:
    """One round's assignment and how it was found."""

    assignment: np.ndarray  # (clients, E) bool
    objective: float  # sum of Q over assigned pairs (without tie-breaking noise)
    solve_time_s: float
    method: str
    bounds: LoadBounds | None = None


class Allocator(Protocol):
    """Interface shared by every assignment strategy."""

    name: str

    def __call__(
        self,
        fitness: np.ndarray,
        capacities: np.ndarray,
        deficit: np.ndarray,
        rng: np.random.Generator,
    ) -> Allocation:
        """Return the assignment of this round."""
        ...


def assignment_objective(fitness: np.ndarray, assignment: np.ndarray) -> float:
    """Return sum of Q over the assigned (client, expert) pairs."""
    return float((fitness * assignment).sum())


def update_deficit(deficit: np.ndarray, assignment: np.ndarray) -> np.ndarray:
    """Return H + (L-bar - load_e): how far each expert's cumulative load lags the mean."""
    loads = assignment.sum(axis=0)
    return deficit + loads.mean() - loads


def tie_break(fitness: np.ndarray, noise: float, rng: np.random.Generator) -> np.ndarray:
    """Return Q plus seeded uniform noise of scale ``noise``, so that ties fall by the seed."""
    return fitness + noise * rng.random(fitness.shape) if noise > 0 else fitness
