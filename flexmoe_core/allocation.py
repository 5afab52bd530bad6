"""Expert allocation: the FLEX-MoE LP and the baselines it is judged against.

Every allocator maps (fitness Q of the round's participants, capacities k_c, the
experts' historical load deficit H) to a 0/1 assignment X of shape (clients, E).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from .allocation_fast import solve_flow
from .allocation_problem import (
    InfeasibleAllocationError,
    LoadBounds,
    check_feasible,
    check_inputs,
    infeasible_assignment_error,
    load_bounds,
    validate_capacities,
    verify_assignment,
)

__all__ = [
    "Allocation",
    "Allocator",
    "DenseAllocator",
    "ExpertChoiceAllocator",
    "FlexAllocator",
    "GreedyAllocator",
    "InfeasibleAllocationError",
    "LoadBounds",
    "OracleAllocator",
    "RandomAllocator",
    "check_feasible",
    "load_bounds",
    "make_allocator",
    "oracle_fitness",
    "update_deficit",
    "validate_capacities",
    "verify_assignment",
]


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


def _tie_break(fitness: np.ndarray, noise: float, rng: np.random.Generator) -> np.ndarray:
    return fitness + noise * rng.random(fitness.shape) if noise > 0 else fitness


class FlexAllocator:
    """The FLEX-MoE assignment: the load-balanced LP, solved exactly.

    maximise sum Q x  s.t.  sum_e x_ce = k_c,  L_e <= sum_c x_ce <= U_e,  0 <= x <= 1.

    Two solvers give the same optimum on the same tie-broken Q:

    * the **flow** path (:func:`flexmoe_core.allocation_fast.solve_flow`), a min-cost
      flow on the E experts: a fraction of a second for 1e5 clients x 64 experts,
      except when clients form tight look-alike groups (README "Allocation at scale");
    * the **cvxpy** reference, the readable formulation to extend (extra constraints,
      other objectives). The constraint matrix is that of a bipartite b-matching
      (totally unimodular), so a vertex optimum is 0/1; the solution is checked and,
      if an interior-point solver stopped inside an optimal face, re-solved with
      boolean variables.

    Parameters
    ----------
    epsilon : float
        Width of the load band around L-bar.
    solver : str
        ``auto`` or ``flow``: the flow path (it covers every instance of this LP).
        ``cvxpy``: the reference with HiGHS when installed, else cvxpy's default.
        Any other value is a cvxpy solver name (``HIGHS``, ``CLARABEL``, ...).
    tie_noise : float
        Scale of the seeded uniform noise added to Q to break ties.
    deficit_rule : bool
        With ``epsilon == 0``: give the remainder slots to the experts of largest
        historical deficit (True) or let the LP place them (False: an ablation).
    """

    name = "flexmoe"

    def __init__(
        self,
        epsilon: float = 0.0,
        solver: str = "auto",
        tie_noise: float = 1e-6,
        deficit_rule: bool = True,
    ):
        if epsilon < 0:
            raise ValueError(f"epsilon={epsilon}: must be >= 0")
        self.epsilon, self.solver, self.tie_noise = epsilon, solver, tie_noise
        self.deficit_rule = deficit_rule
        self.uses_flow = solver.lower() in ("auto", "flow")

    def _solver_name(self) -> str | None:
        import cvxpy as cp

        if self.solver.lower() == "cvxpy":
            return "HIGHS" if "HIGHS" in cp.installed_solvers() else None
        return self.solver.upper()

    def __call__(
        self,
        fitness: np.ndarray,
        capacities: np.ndarray,
        deficit: np.ndarray,
        rng: np.random.Generator,
    ) -> Allocation:
        """Solve the LP for this round's participants.

        The bounds and the tie-breaking noise are drawn from ``rng`` in the same order
        on both paths, so a seed gives both solvers the same problem.
        """
        caps = check_inputs(fitness, capacities)
        start = time.perf_counter()
        num_experts = fitness.shape[1]
        bounds = load_bounds(caps, num_experts, self.epsilon, deficit, rng, self.deficit_rule)
        check_feasible(caps, num_experts, bounds)
        noisy = _tie_break(fitness, self.tie_noise, rng)
        if self.uses_flow:
            assignment, method = solve_flow(noisy, caps, bounds).assignment, "flow"
        else:
            assignment, method = self._solve_cvxpy(noisy, caps, bounds)
        verify_assignment(assignment, caps, bounds)
        return Allocation(
            assignment,
            assignment_objective(fitness, assignment),
            time.perf_counter() - start,
            f"{self.name}-{method}",
            bounds,
        )

    def _solve_cvxpy(
        self, noisy: np.ndarray, caps: np.ndarray, bounds: LoadBounds
    ) -> tuple[np.ndarray, str]:
        """Solve with cvxpy; return the 0/1 assignment and ``lp`` or ``milp``."""
        import cvxpy as cp

        def solve(boolean: bool) -> np.ndarray | None:
            x = cp.Variable(noisy.shape, boolean=boolean)
            load = cp.sum(x, axis=0)
            constraints = [cp.sum(x, axis=1) == caps, load >= bounds.lower, load <= bounds.upper]
            if not boolean:
                constraints += [x >= 0, x <= 1]
            problem = cp.Problem(cp.Maximize(cp.sum(cp.multiply(noisy, x))), constraints)
            problem.solve(solver=self._solver_name())
            if problem.status in (cp.INFEASIBLE, cp.INFEASIBLE_INACCURATE):
                raise infeasible_assignment_error(caps, bounds)
            return None if x.value is None else np.asarray(x.value)

        method = "lp"
        relaxed = solve(boolean=False)
        if relaxed is None or np.abs(relaxed - np.round(relaxed)).max() > 1e-6:
            method = "milp"
            relaxed = solve(boolean=True)
            if relaxed is None:
                raise RuntimeError("cvxpy returned no solution; try strategy.solver=HIGHS")
        return np.round(relaxed).astype(bool), method


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
        order = np.argsort(-_tie_break(fitness, self.tie_noise, rng), axis=1)
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
        noisy = _tie_break(fitness, self.tie_noise, rng)
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


def make_allocator(strategy_cfg) -> Allocator:
    """Return the allocator named by ``strategy_cfg.name``."""
    name = strategy_cfg.name
    noise = float(strategy_cfg.get("tie_noise", 1e-6))
    if name == "flexmoe":
        return FlexAllocator(
            float(strategy_cfg.get("epsilon", 0.0)),
            str(strategy_cfg.get("solver", "auto")),
            noise,
            bool(strategy_cfg.get("deficit_rule", True)),
        )
    if name == "greedy":
        return GreedyAllocator(noise)
    if name == "random":
        return RandomAllocator()
    if name == "dense":
        return DenseAllocator()
    if name == "expert_choice":
        return ExpertChoiceAllocator(noise)
    if name == "oracle":
        return OracleAllocator(noise)
    raise ValueError(
        f"Unknown strategy {name!r}: choose flexmoe, greedy, random, dense, expert_choice or oracle"
    )
