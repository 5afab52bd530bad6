"""The min-cost-flow allocation solver against the cvxpy reference and brute force."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flexmoe_core import allocation
from flexmoe_core.allocation import (
    FlexAllocator,
    InfeasibleAllocationError,
    LoadBounds,
    flex,
    load_bounds,
    verify_assignment,
)
from flexmoe_core.allocation.flow import FlowSolution, solve_flow
from flexmoe_core.allocation.residual import ResidualFlow


def examples(count: int) -> settings:
    """Hypothesis settings: ``count`` examples, no deadline (cvxpy's first call is slow),
    no example database (nothing written into the repository)."""
    return settings(
        max_examples=count,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow],
    )


def objective(fitness: np.ndarray, assignment: np.ndarray) -> float:
    return float((fitness * assignment).sum())


def brute_force(fitness: np.ndarray, caps: np.ndarray, bounds: LoadBounds) -> float | None:
    """Best objective over every assignment meeting capacities and bounds (None: none)."""
    clients, experts = fitness.shape
    choices = [list(itertools.combinations(range(experts), int(k))) for k in caps]
    best = None
    for pick in itertools.product(*choices):
        x = np.zeros((clients, experts), dtype=bool)
        for c, subset in enumerate(pick):
            x[c, list(subset)] = True
        loads = x.sum(0)
        if (loads >= bounds.lower).all() and (loads <= bounds.upper).all():
            value = objective(fitness, x)
            best = value if best is None else max(best, value)
    return best


@st.composite
def instances(draw: st.DrawFn, max_clients: int, max_experts: int) -> dict:
    """A fitness table, capacities, an allocator config and a seed for load_bounds."""
    clients = draw(st.integers(1, max_clients))
    experts = draw(st.integers(1, max_experts))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    kind = draw(st.sampled_from(["uniform", "few-values", "constant", "clustered"]))
    if kind == "uniform":
        fitness = rng.random((clients, experts))
    elif kind == "few-values":  # heavy ties: two or three distinct values
        fitness = rng.integers(0, draw(st.integers(2, 3)), (clients, experts)) / 2.0
    elif kind == "constant":
        fitness = np.full((clients, experts), 0.7)
    else:  # clients in a few groups with near-identical preferences
        groups = rng.random((3, experts))
        fitness = groups[rng.integers(0, 3, clients)] + 1e-3 * rng.random((clients, experts))
    low = draw(st.integers(1, experts))
    caps = rng.integers(low, draw(st.integers(low, experts)) + 1, clients)
    return {
        "fitness": fitness,
        "caps": caps,
        "deficit": rng.normal(size=experts),  # decides who gets the remainder slots
        "epsilon": draw(st.sampled_from([0.0, 0.0, 0.1, 0.3, 1.0])),
        "noise": draw(st.sampled_from([0.0, 1e-6])),
        "seed": seed,
    }


def solve_both(case: dict) -> tuple[allocation.Allocation, allocation.Allocation]:
    results = []
    for solver in ("auto", "cvxpy"):
        allocator = FlexAllocator(case["epsilon"], solver, case["noise"])
        rng = np.random.default_rng(case["seed"])
        results.append(allocator(case["fitness"], case["caps"], case["deficit"], rng))
    return results[0], results[1]


def check_allocation(result: allocation.Allocation, caps: np.ndarray) -> None:
    x = result.assignment
    assert x.dtype == bool
    assert result.bounds is not None
    verify_assignment(x, caps, result.bounds)


@examples(200)
@given(instances(max_clients=12, max_experts=8))
def test_flow_matches_the_cvxpy_reference_on_small_instances(case: dict) -> None:
    fast, reference = solve_both(case)
    assert fast.method == "flexmoe-flow"
    assert reference.method in ("flexmoe-lp", "flexmoe-milp")
    check_allocation(fast, case["caps"])
    check_allocation(reference, case["caps"])
    np.testing.assert_array_equal(fast.bounds.lower, reference.bounds.lower)
    np.testing.assert_array_equal(fast.bounds.upper, reference.bounds.upper)
    assert fast.objective == pytest.approx(reference.objective, rel=1e-6, abs=1e-9)


@examples(40)
@given(instances(max_clients=120, max_experts=16))
def test_flow_matches_the_cvxpy_reference_on_medium_instances(case: dict) -> None:
    fast, reference = solve_both(case)
    check_allocation(fast, case["caps"])
    assert fast.objective == pytest.approx(reference.objective, rel=1e-6, abs=1e-9)


@examples(150)
@given(instances(max_clients=60, max_experts=12))
def test_repair_alone_reaches_a_certified_optimum(case: dict) -> None:
    # The certificate step cancels any negative cycle left over, which would hide a
    # repair bug from the objective checks: the repair must leave none.
    rng = np.random.default_rng(case["seed"])
    fitness, caps = case["fitness"], case["caps"]
    bounds = load_bounds(caps, fitness.shape[1], case["epsilon"], case["deficit"], rng)
    for sweeps in (0, 12):
        solution = solve_flow(fitness, caps, bounds, price_sweeps=sweeps)
        assert solution.cancelled_cycles == 0
        verify_assignment(solution.assignment, caps, bounds)
        assert_certified(fitness, solution, bounds)


@st.composite
def tiny_problems(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, LoadBounds]:
    """Up to 3 clients x 4 experts with arbitrary bounds, feasible or not."""
    clients, experts = draw(st.integers(1, 3)), draw(st.integers(1, 4))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    values = draw(st.sampled_from([None, 2, 3]))  # None: continuous; else tied values
    fitness = (
        rng.random((clients, experts))
        if values is None
        else rng.integers(0, values, (clients, experts)).astype(float)
    )
    caps = rng.integers(1, experts + 1, clients)
    lower = rng.integers(0, clients + 1, experts)
    upper = lower + rng.integers(0, 2, experts)
    return fitness, caps, LoadBounds(lower, upper, caps.sum() / experts)


@examples(300)
@given(tiny_problems())
def test_flow_is_optimal_by_brute_force_or_refuses(problem: tuple) -> None:
    fitness, caps, bounds = problem
    best = brute_force(fitness, caps, bounds)
    if best is None:
        with pytest.raises(InfeasibleAllocationError):
            solve_flow(fitness, caps, bounds)
        return
    solution = solve_flow(fitness, caps, bounds)
    verify_assignment(solution.assignment, caps, bounds)
    assert objective(fitness, solution.assignment) == pytest.approx(best, abs=1e-9)


def assert_certified(fitness: np.ndarray, solution: FlowSolution, bounds: LoadBounds) -> None:
    """Check the LP optimality certificate the solver returns (complementary slackness)."""
    x, prices, tol = solution.assignment, solution.prices, 1e-9
    reduced = fitness - prices
    for row, held in zip(reduced, x, strict=True):
        if held.any() and (~held).any():
            assert row[held].min() >= row[~held].max() - tol
    loads = x.sum(0)
    assert (loads[prices > tol] == bounds.upper[prices > tol]).all()
    assert (loads[prices < -tol] == bounds.lower[prices < -tol]).all()


@pytest.mark.parametrize("epsilon", [0.0, 0.05, 0.5])
@pytest.mark.parametrize("seed", range(3))
def test_prices_certify_optimality_at_scale(seed: int, epsilon: float) -> None:
    rng = np.random.default_rng(seed)
    fitness = rng.random((3000, 32)) + np.linspace(0, 1, 32)  # popular and unpopular
    caps = rng.integers(1, 6, 3000)
    bounds = load_bounds(caps, 32, epsilon, rng.normal(size=32), rng)
    solution = solve_flow(fitness, caps, bounds)
    verify_assignment(solution.assignment, caps, bounds)
    assert_certified(fitness, solution, bounds)


@pytest.mark.parametrize("epsilon", [0.0, 0.2])
def test_warm_start_changes_speed_not_the_optimum(epsilon: float) -> None:
    rng = np.random.default_rng(11)
    fitness = rng.random((400, 16)) + np.linspace(0, 1, 16)
    caps = rng.integers(1, 6, 400)
    bounds = load_bounds(caps, 16, epsilon, rng.normal(size=16), rng)
    warm = solve_flow(fitness, caps, bounds)
    cold = solve_flow(fitness, caps, bounds, price_sweeps=0)  # greedy start
    assert cold.augmentations > warm.augmentations
    assert objective(fitness, cold.assignment) == pytest.approx(
        objective(fitness, warm.assignment), rel=1e-12
    )
    assert_certified(fitness, cold, bounds)


def test_clustered_clients_match_the_reference() -> None:
    # Groups of near-identical clients: the case the warm start leaves most to repair.
    rng = np.random.default_rng(7)
    groups = rng.random((4, 24)) ** 4
    fitness = groups[rng.integers(0, 4, 600)] + 0.01 * rng.random((600, 24))
    caps = rng.integers(1, 7, 600)
    args = (fitness, caps, rng.normal(size=24))
    fast = FlexAllocator(0.0, "auto", 0.0)(*args, np.random.default_rng(1))
    reference = FlexAllocator(0.0, "cvxpy", 0.0)(*args, np.random.default_rng(1))
    assert fast.objective == pytest.approx(reference.objective, rel=1e-9)


def test_constant_fitness_is_spread_in_few_rounds() -> None:
    # Round one of FLEX-MoE: Q is the constant q0. Ties must not cost a round per unit.
    caps = np.full(2000, 3)
    bounds = load_bounds(caps, 32, 0.0, np.zeros(32), np.random.default_rng(0))
    solution = solve_flow(np.ones((2000, 32)), caps, bounds)
    verify_assignment(solution.assignment, caps, bounds)
    assert solution.rounds <= 60


def test_negative_cycles_are_cancelled_to_the_optimum() -> None:
    # The certificate step, fed a feasible but poor assignment, must reach the optimum.
    rng = np.random.default_rng(3)
    fitness = rng.random((40, 6))
    caps = rng.integers(1, 4, 40)
    bounds = load_bounds(caps, 6, 0.2, np.zeros(6), rng)
    worst = solve_flow(-fitness, caps, bounds).assignment  # feasible, far from optimal
    flow = ResidualFlow(fitness, caps, bounds, worst.copy(), np.zeros(6), tol=1e-12)
    cancelled, _ = flow.certify()
    assert cancelled > 0
    verify_assignment(flow.x, caps, bounds)
    best = solve_flow(fitness, caps, bounds).assignment
    assert objective(fitness, flow.x) == pytest.approx(objective(fitness, best), rel=1e-12)


@pytest.mark.parametrize(
    ("caps", "experts"),
    [([0, 2], 4), ([2, 5], 4), ([1.5, 2], 4), ([], 3)],
)
def test_bad_capacities_are_refused_identically(caps: list, experts: int) -> None:
    fitness = np.ones((len(caps), experts))
    messages = []
    for solver in ("auto", "cvxpy"):
        with pytest.raises(InfeasibleAllocationError) as error:
            FlexAllocator(solver=solver)(
                fitness, np.array(caps), np.zeros(experts), np.random.default_rng(0)
            )
        messages.append(str(error.value))
    assert messages[0] == messages[1]


@pytest.mark.parametrize(
    ("caps", "lower", "upper", "match"),
    [
        ([1, 1], [1, 1, 1, 1], [1, 1, 1, 1], "at least 4 slots"),
        ([2, 2], [0, 0, 0, 0], [1, 1, 0, 0], "at most 2"),
        ([2, 2], [3, 0, 0, 0], [3, 1, 1, 1], "only 2 take part"),
        ([1, 1], [1, 1, 0, 0], [0, 1, 2, 2], "exceeds upper"),
        # Totals and per-expert counts fit, but no 0/1 matrix does: client 1 holds one
        # expert, so experts 0 and 1 cannot both be held twice. Only a solver sees it.
        ([3, 1], [2, 2, 0], [2, 2, 0], "found no assignment"),
    ],
)
def test_unmeetable_bounds_are_refused_identically(
    monkeypatch: pytest.MonkeyPatch, caps: list, lower: list, upper: list, match: str
) -> None:
    caps_arr = np.array(caps)
    bounds = LoadBounds(np.array(lower), np.array(upper), caps_arr.sum() / len(lower))
    monkeypatch.setattr(flex, "load_bounds", lambda *_args: bounds)
    fitness = np.random.default_rng(0).random((len(caps), len(lower)))
    messages = []
    for solver in ("auto", "cvxpy"):
        with pytest.raises(InfeasibleAllocationError, match=match) as error:
            FlexAllocator(solver=solver)(
                fitness, caps_arr, np.zeros(len(lower)), np.random.default_rng(0)
            )
        messages.append(str(error.value))
    assert messages[0] == messages[1]
    with pytest.raises(InfeasibleAllocationError, match=match):
        solve_flow(fitness, caps_arr, bounds, price_sweeps=0)


@pytest.mark.parametrize(
    ("solver", "method"),
    [
        ("auto", "flexmoe-flow"),
        ("Flow", "flexmoe-flow"),
        ("cvxpy", "flexmoe-lp"),
        ("HIGHS", "flexmoe-lp"),
        ("clarabel", "flexmoe-lp"),
    ],
)
def test_solver_option_picks_the_path(solver: str, method: str) -> None:
    rng = np.random.default_rng(0)
    fitness, caps = rng.random((6, 4)), np.array([1, 2, 2, 1, 3, 1])
    result = FlexAllocator(0.0, solver)(fitness, caps, np.zeros(4), np.random.default_rng(0))
    assert result.method == method
    check_allocation(result, caps)


def test_same_seed_same_problem_on_both_paths() -> None:
    # load_bounds and the tie-breaking noise draw from rng in the same order on both
    # paths, so with a generic Q (unique optimum) the assignments coincide.
    rng = np.random.default_rng(5)
    fitness, caps = rng.random((30, 8)), rng.integers(1, 5, 30)
    deficit = rng.normal(size=8)
    fast = FlexAllocator(0.0, "auto")(fitness, caps, deficit, np.random.default_rng(9))
    reference = FlexAllocator(0.0, "cvxpy")(fitness, caps, deficit, np.random.default_rng(9))
    np.testing.assert_array_equal(fast.bounds.lower, reference.bounds.lower)
    np.testing.assert_array_equal(fast.assignment, reference.assignment)


def test_bounds_of_the_wrong_shape_are_refused() -> None:
    bounds = LoadBounds(np.zeros(3, int), np.ones(3, int), 1.0)
    with pytest.raises(ValueError, match="expected \\(4,\\)"):
        solve_flow(np.ones((2, 4)), [1, 1], bounds)
