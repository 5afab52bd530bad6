"""The FLEX allocation LP and the baseline allocators."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from flexmoe_core.allocation import (
    DenseAllocator,
    ExpertChoiceAllocator,
    FlexAllocator,
    GreedyAllocator,
    InfeasibleAllocationError,
    LoadBounds,
    RandomAllocator,
    check_feasible,
    load_bounds,
    update_deficit,
)


def brute_force(fitness: np.ndarray, caps: np.ndarray, bounds: LoadBounds) -> float:
    """Best objective over every assignment that meets capacities and load bounds."""
    clients, experts = fitness.shape
    choices = [list(itertools.combinations(range(experts), int(k))) for k in caps]
    best = -np.inf
    for pick in itertools.product(*choices):
        x = np.zeros((clients, experts))
        for c, subset in enumerate(pick):
            x[c, list(subset)] = 1
        loads = x.sum(0)
        if (loads >= bounds.lower).all() and (loads <= bounds.upper).all():
            best = max(best, float((fitness * x).sum()))
    return best


@pytest.mark.parametrize("seed", range(12))
def test_flex_is_optimal_binary_and_feasible(seed: int) -> None:
    rng = np.random.default_rng(seed)
    clients, experts = int(rng.integers(2, 4)), int(rng.integers(3, 5))
    fitness = rng.random((clients, experts))
    caps = rng.integers(1, experts + 1, clients)
    deficit = rng.normal(size=experts)
    epsilon = float(rng.choice([0.0, 0.0, 0.5]))
    allocator = FlexAllocator(epsilon=epsilon, solver="cvxpy", tie_noise=0.0)
    result = allocator(fitness, caps, deficit, np.random.default_rng(seed))
    x = result.assignment
    assert x.dtype == bool
    np.testing.assert_array_equal(x.sum(1), caps)
    assert (x.sum(0) >= result.bounds.lower).all() and (x.sum(0) <= result.bounds.upper).all()
    bounds = load_bounds(caps, experts, epsilon, deficit, np.random.default_rng(seed))
    np.testing.assert_array_equal(bounds.lower, result.bounds.lower)
    assert result.objective == pytest.approx(brute_force(fitness, caps, bounds), abs=1e-7)


def test_flex_balances_where_greedy_does_not() -> None:
    # Every client prefers experts 0 and 1: greedy piles onto them, FLEX spreads load.
    fitness = np.tile(np.array([0.9, 0.8, 0.1, 0.1]), (4, 1))
    caps = np.full(4, 2)
    rng = np.random.default_rng(0)
    flex = FlexAllocator(solver="cvxpy")(fitness, caps, np.zeros(4), rng).assignment
    greedy = GreedyAllocator()(fitness, caps, np.zeros(4), rng).assignment
    np.testing.assert_array_equal(flex.sum(0), [2, 2, 2, 2])
    np.testing.assert_array_equal(greedy.sum(0), [4, 4, 0, 0])


def test_bounds_pin_loads_when_mean_load_is_integral() -> None:
    bounds = load_bounds(np.array([2, 2, 4]), 4, 0.0, np.zeros(4), np.random.default_rng(0))
    np.testing.assert_array_equal(bounds.lower, [2, 2, 2, 2])
    np.testing.assert_array_equal(bounds.upper, [2, 2, 2, 2])


def test_remainder_slots_go_to_largest_deficit() -> None:
    deficit = np.array([0.0, 3.0, -1.0, 2.0])
    bounds = load_bounds(np.array([2, 2, 2]), 4, 0.0, deficit, np.random.default_rng(0))
    # 6 slots over 4 experts: two get 2, and they are the two most behind (1 and 3).
    np.testing.assert_array_equal(bounds.lower, [1, 2, 1, 2])


def test_deficit_spreads_remainder_over_rounds() -> None:
    rng = np.random.default_rng(0)
    experts, caps = 4, np.array([2, 2, 2])  # L-bar = 1.5 every round
    allocator = FlexAllocator(solver="cvxpy")
    deficit, cumulative = np.zeros(experts), np.zeros(experts)
    for _ in range(6):
        fitness = rng.random((3, experts))
        x = allocator(fitness, caps, deficit, rng).assignment
        deficit = update_deficit(deficit, x)
        cumulative += x.sum(0)
        assert cumulative.max() - cumulative.min() <= 1
    np.testing.assert_array_equal(cumulative, [9, 9, 9, 9])


def test_epsilon_band() -> None:
    bounds = load_bounds(np.array([3, 3, 3, 3]), 4, 0.5, np.zeros(4), np.random.default_rng(0))
    np.testing.assert_array_equal(bounds.lower, [1] * 4)
    np.testing.assert_array_equal(bounds.upper, [5] * 4)


@pytest.mark.parametrize(
    ("caps", "match"),
    [([0, 2], "at least one expert"), ([2, 5], r"> E=4"), ([1.5, 2], "integers")],
)
def test_infeasible_capacities_are_refused(caps: list, match: str) -> None:
    for allocator in (FlexAllocator(), GreedyAllocator(), RandomAllocator()):
        with pytest.raises(InfeasibleAllocationError, match=match):
            allocator(np.ones((2, 4)), np.array(caps), np.zeros(4), np.random.default_rng(0))


def test_unmeetable_bounds_are_refused_with_the_constraint_named() -> None:
    caps = np.array([1, 1])
    too_high = LoadBounds(np.full(4, 1), np.full(4, 1), 0.5)
    with pytest.raises(InfeasibleAllocationError, match="at least 4 slots"):
        check_feasible(caps, 4, too_high)
    too_low = LoadBounds(np.zeros(4, int), np.zeros(4, int), 0.5)
    with pytest.raises(InfeasibleAllocationError, match="at most 0"):
        check_feasible(caps, 4, too_low)


def test_nan_fitness_is_refused() -> None:
    fitness = np.ones((2, 4))
    fitness[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        FlexAllocator()(fitness, np.array([1, 1]), np.zeros(4), np.random.default_rng(0))


def test_ties_are_broken_by_the_seed() -> None:
    fitness, caps = np.ones((6, 8)), np.full(6, 2)
    a = FlexAllocator(solver="cvxpy")(fitness, caps, np.zeros(8), np.random.default_rng(1))
    b = FlexAllocator(solver="cvxpy")(fitness, caps, np.zeros(8), np.random.default_rng(1))
    c = FlexAllocator(solver="cvxpy")(fitness, caps, np.zeros(8), np.random.default_rng(2))
    np.testing.assert_array_equal(a.assignment, b.assignment)
    assert not np.array_equal(a.assignment, c.assignment)


def test_greedy_takes_each_clients_top_k() -> None:
    rng = np.random.default_rng(3)
    fitness, caps = rng.random((5, 6)), np.array([1, 2, 3, 4, 6])
    x = GreedyAllocator(tie_noise=0.0)(fitness, caps, np.zeros(6), rng).assignment
    for row, k, q in zip(x, caps, fitness, strict=True):
        assert set(np.flatnonzero(row)) == set(np.argsort(-q)[:k])


def test_random_dense_and_expert_choice_respect_their_rules() -> None:
    rng = np.random.default_rng(4)
    fitness, caps = rng.random((7, 5)), np.array([1, 2, 3, 2, 1, 2, 3])
    x = RandomAllocator()(fitness, caps, np.zeros(5), rng).assignment
    np.testing.assert_array_equal(x.sum(1), caps)
    dense = DenseAllocator()(fitness, caps, np.zeros(5), rng).assignment
    assert dense.all()
    ec = ExpertChoiceAllocator()(fitness, caps, np.zeros(5), rng).assignment
    np.testing.assert_array_equal(ec.sum(1), caps)
    assert ec.sum(0).max() <= int(np.ceil(caps.sum() / 5)) + 1
