"""The flow solver on every fitness family of the benchmark, judged by an independent solver.

Small instances are compared with scipy's HiGHS LP (``scipy.optimize.linprog``, no
cvxpy and no code shared with the flow path): the constraint matrix of the allocation
is totally unimodular, so the LP optimum is the 0/1 optimum. Large instances are judged
by the optimality certificate the solver returns (its dual prices), checked here from
scratch.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import sparse
from scipy.optimize import linprog

from flexmoe_core.allocation import LoadBounds, flow, load_bounds, verify_assignment
from flexmoe_core.allocation.flow import RESTRICT_MIN_CLIENTS, FlowSolution, solve_flow

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_allocation import FAMILIES, instance


def lp_optimum(fitness: np.ndarray, caps: np.ndarray, bounds: LoadBounds) -> float:
    """Return max sum Q x over the LP relaxation, solved by HiGHS through scipy."""
    clients, experts = fitness.shape
    # x is flattened client-major: x[c * E + e].
    per_client = sparse.kron(sparse.eye(clients), np.ones((1, experts)))
    per_expert = sparse.kron(np.ones((1, clients)), sparse.eye(experts))
    result = linprog(
        -fitness.ravel(),
        A_ub=sparse.vstack([per_expert, -per_expert]),
        b_ub=np.concatenate([bounds.upper, -bounds.lower]),
        A_eq=per_client,
        b_eq=caps,
        bounds=(0, 1),
        method="highs",
        # The tie-breaking noise is 1e-6: HiGHS's default 1e-7 tolerances would blur it.
        options={"primal_feasibility_tolerance": 1e-10, "dual_feasibility_tolerance": 1e-10},
    )
    assert result.status == 0, result.message
    return -result.fun


def tie_broken(family: str, clients: int, experts: int, seed: int, epsilon: float):
    """Return (Q with the allocator's tie-breaking noise, capacities, bounds)."""
    fitness, caps, deficit = instance(clients, experts, seed, family)
    rng = np.random.default_rng(seed)
    bounds = load_bounds(caps, experts, epsilon, deficit, rng)
    return fitness + 1e-6 * rng.random(fitness.shape), caps, bounds


def assert_certified(fitness: np.ndarray, solution: FlowSolution, bounds: LoadBounds) -> None:
    """Complementary slackness of the returned prices, checked over every client."""
    x, prices = solution.assignment, solution.prices
    tol = 1e-9 * max(1.0, float(np.abs(fitness).max()))
    reduced = np.where(x, fitness - prices, np.inf).min(axis=1)
    best_left_out = np.where(x, -np.inf, fitness - prices).max(axis=1)
    assert (reduced >= best_left_out - tol).all(), "a client holds a worse expert than one it lacks"
    loads = x.sum(axis=0)
    assert (loads[prices > tol] == bounds.upper[prices > tol]).all()
    assert (loads[prices < -tol] == bounds.lower[prices < -tol]).all()


@pytest.mark.parametrize("epsilon", [0.0, 0.3])
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(("clients", "experts", "seed"), [(40, 8, 0), (90, 12, 1), (150, 16, 2)])
def test_flow_reaches_the_lp_optimum_of_an_independent_solver(
    family: str, clients: int, experts: int, seed: int, epsilon: float
) -> None:
    fitness, caps, bounds = tie_broken(family, clients, experts, seed, epsilon)
    solution = solve_flow(fitness, caps, bounds)
    verify_assignment(solution.assignment, caps, bounds)
    value = float((fitness * solution.assignment).sum())
    assert value == pytest.approx(lp_optimum(fitness, caps, bounds), rel=1e-9, abs=1e-9)


# Large enough for the restricted solve (RESTRICT_MIN_CLIENTS), small enough for tests.
LARGE = max(6000, RESTRICT_MIN_CLIENTS)
# Families (and sizes) whose Newton prices are close enough for the restricted solve
# to certify; low-rank Q needs the coordinate descent on a sample a quarter of the size.
RESTRICTABLE = (
    ("uniform", LARGE),
    ("tied", LARGE),
    ("heavy-tailed", LARGE),
    ("low-rank", 4 * flow.NEWTON_SAMPLE),
)


@pytest.mark.parametrize("epsilon", [0.0, 0.1])
@pytest.mark.parametrize("family", FAMILIES)
def test_large_instances_carry_an_optimality_certificate(family: str, epsilon: float) -> None:
    fitness, caps, bounds = tie_broken(family, LARGE, 64, 3, epsilon)
    solution = solve_flow(fitness, caps, bounds)
    verify_assignment(solution.assignment, caps, bounds)
    assert_certified(fitness, solution, bounds)


@pytest.mark.parametrize(("family", "clients"), RESTRICTABLE)
def test_the_restricted_solve_moves_few_clients_and_finds_the_same_optimum(
    family: str, clients: int
) -> None:
    fitness, caps, bounds = tie_broken(family, clients, 64, 5, 0.0)
    restricted = solve_flow(fitness, caps, bounds)
    whole = solve_flow(fitness, caps, bounds, restrict=False)
    assert whole.flow_clients == clients
    assert restricted.flow_clients < clients // 2, "the restricted solve was not kept"
    # A generic Q (tie-breaking noise) has one optimum: both paths must return it.
    np.testing.assert_array_equal(restricted.assignment, whole.assignment)
    assert_certified(fitness, restricted, bounds)


def test_a_restricted_solve_that_gives_up_leaves_the_whole_problem_to_the_flow(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(flow, "RESTRICT_TRIES", 0)
    fitness, caps, bounds = tie_broken("uniform", LARGE, 16, 6, 0.0)
    solution = solve_flow(fitness, caps, bounds)
    assert solution.flow_clients == LARGE
    assert_certified(fitness, solution, bounds)
