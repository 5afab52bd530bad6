"""The allocators FLEX-MoE is judged against, and the known-right oracle.

The baselines ignore the load deficit: greedy top-k, random, dense (no capacity) and
expert-choice (experts pick clients up to an equal quota). The oracle solves FLEX-MoE's
LP over the fitness a federation's known groups imply (:func:`oracle_fitness`).
"""

from __future__ import annotations

import math
import time

import numpy as np

from .flex import FlexAllocator
from .problem import Allocation, assignment_objective, check_inputs, tie_break


class OracleAllocator(FlexAllocator):
    """The known-right allocation of a federation with groups, balanced as FLEX-MoE is.

    It solves FLEX-MoE's LP (epsilon 0, deficit rule) over :func:`oracle_fitness`
    instead of the learned table: each group on the experts apportioned to it.
    """

    name = "oracle"
    needs_groups = True

    def __init__(self, tie_noise: float = 1e-6) -> None:
        super().__init__(0.0, "auto", tie_noise, True)


def oracle_fitness(groups: np.ndarray, capacities: np.ndarray, num_experts: int) -> np.ndarray:
    """Return Q = 1 on the experts of each client's group, 0 elsewhere.

    Experts are apportioned to the groups in proportion to the groups' total capacity
    (largest remainder; consecutive expert ids per group), so that under balanced
    loads as many holders as possible share their expert's group. A group whose share
    rounds to no expert has Q = 0 everywhere: its clients fill the slots left over.

    Parameters
    ----------
    groups : ndarray of int
        The group of each participant.
    capacities : ndarray of int
        k_c of each participant.
    num_experts : int
        E.
    """
    ids = np.unique(groups)
    demand = np.array([capacities[groups == g].sum() for g in ids], dtype=float)
    quota = num_experts * demand / demand.sum()
    shares = np.floor(quota).astype(int)
    for i in np.argsort(-(quota - shares), kind="stable")[: num_experts - shares.sum()]:
        shares[i] += 1
    first = np.concatenate([[0], np.cumsum(shares)])
    fitness = np.zeros((len(groups), num_experts))
    for i, g in enumerate(ids):
        fitness[np.ix_(groups == g, np.arange(first[i], first[i + 1]))] = 1.0
    return fitness


class _BaselineAllocator:
    """Shared frame of the baselines: check the inputs, time :meth:`assign`, report."""

    name = "baseline"

    def assign(self, fitness: np.ndarray, caps: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Return the (clients, E) boolean assignment."""
        raise NotImplementedError

    def __call__(
        self,
        fitness: np.ndarray,
        capacities: np.ndarray,
        deficit: np.ndarray,
        rng: np.random.Generator,
    ) -> Allocation:
        """Return this round's assignment (the deficit is not used by baselines)."""
        caps = check_inputs(fitness, capacities)
        start = time.perf_counter()
        assignment = self.assign(fitness, caps, rng)
        return Allocation(
            assignment,
            assignment_objective(fitness, assignment),
            time.perf_counter() - start,
            self.name,
        )


class GreedyAllocator(_BaselineAllocator):
    """Each client takes its top-k_c experts by fitness; no balance constraint."""

    name = "greedy"

    def __init__(self, tie_noise: float = 1e-6) -> None:
        self.tie_noise = tie_noise

    def assign(self, fitness, caps, rng) -> np.ndarray:  # noqa: D102
        order = np.argsort(-tie_break(fitness, self.tie_noise, rng), axis=1)
        top = np.arange(fitness.shape[1])[None, :] < caps[:, None]
        return np.take_along_axis(top, np.argsort(order, axis=1), axis=1)


class RandomAllocator(_BaselineAllocator):
    """A uniformly random k_c-subset for every client, every round."""

    name = "random"

    def assign(self, fitness, caps, rng) -> np.ndarray:  # noqa: D102
        return np.argsort(rng.random(fitness.shape), axis=1) < caps[:, None]


class DenseAllocator:
    """Every client holds every expert (capacity ignored): the no-constraint bound."""

    name = "dense"

    def __call__(self, fitness, capacities, deficit, rng) -> Allocation:  # noqa: D102
        check_inputs(fitness, np.minimum(np.asarray(capacities), fitness.shape[1]))
        assignment = np.ones(fitness.shape, dtype=bool)
        return Allocation(assignment, assignment_objective(fitness, assignment), 0.0, self.name)


class ExpertChoiceAllocator(_BaselineAllocator):
    """Experts pick their top clients by fitness up to an equal quota ceil(sum k / E).

    Pairs are visited in decreasing fitness; a pair is taken while the expert is under
    quota and the client under capacity. Clients still short of k_c afterwards take
    the least-loaded experts they do not hold, so every client gets exactly k_c.
    """

    name = "expert_choice"

    def __init__(self, tie_noise: float = 1e-6) -> None:
        self.tie_noise = tie_noise

    def assign(self, fitness, caps, rng) -> np.ndarray:  # noqa: D102
        clients, num_experts = fitness.shape
        quota = math.ceil(caps.sum() / num_experts)
        noisy = tie_break(fitness, self.tie_noise, rng)
        assignment = np.zeros(fitness.shape, dtype=bool)
        held, load = np.zeros(clients, dtype=int), np.zeros(num_experts, dtype=int)
        for flat in np.argsort(-noisy, axis=None):
            client, expert = divmod(int(flat), num_experts)
            if load[expert] < quota and held[client] < caps[client]:
                assignment[client, expert] = True
                held[client] += 1
                load[expert] += 1
        for client in np.flatnonzero(held < caps):
            free = np.flatnonzero(~assignment[client])
            take = free[np.argsort(load[free], kind="stable")[: caps[client] - held[client]]]
            assignment[client, take] = True
            load[take] += 1
        return assignment
