"""FLEX allocation at scale: the min-cost-flow path against the cvxpy reference.

For every clients x experts size, one seeded instance (uniform Q by default, capacities
drawn from 2-4, a random historical deficit) is solved by the three allocators, each measured in
this run: ``FlexAllocator(solver="auto")`` (the flow path), ``FlexAllocator(solver=
"cvxpy")`` (the LP reference, HiGHS) and ``GreedyAllocator`` (top-k per client, no
balance). Times are wall-clock medians over ``--repeats`` calls, after one warm-up call
per allocator. The objective gap is |obj_flow - obj_cvxpy| / |obj_cvxpy| on the same
tie-broken Q: 0 up to solver tolerance when both are optimal.

    python benchmarks/bench_allocation.py
    python benchmarks/bench_allocation.py --clients 100 1000 10000 100000 --experts 8 64 \\
        --repeats 3 --max-cvxpy-clients 10000

The goal checked at the end: 10,000 clients x 64 experts in at most 0.5 s, and at least
25x faster than cvxpy on the same instance in the same run. ``--fitness clustered``
measures the flow path's hard case (clients in a few look-alike groups) instead.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flexmoe_core.allocation import (  # noqa: E402
    Allocation,
    FlexAllocator,
    GreedyAllocator,
)

GOAL_SIZE = (10_000, 64)
GOAL_SECONDS = 0.5
GOAL_SPEEDUP = 25.0


def instance(
    clients: int, experts: int, seed: int, kind: str = "uniform"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return (Q, capacities in 2..4 (at most E), deficit).

    ``uniform``: Q uniform in [0, 1). ``clustered``: 4 groups of clients sharing a
    peaked preference over experts, plus 0.01 noise (non-IID clients that look alike:
    the hardest case for the flow path's warm start).
    """
    rng = np.random.default_rng([seed, clients, experts])
    if kind == "clustered":
        groups = rng.random((4, experts)) ** 4
        fitness = groups[rng.integers(0, 4, clients)] + 0.01 * rng.random((clients, experts))
    else:
        fitness = rng.random((clients, experts))
    caps = np.minimum(rng.integers(2, 5, clients), experts)
    return fitness, caps, rng.normal(size=experts)


def measure(
    allocator: Callable[..., Allocation],
    problem: tuple[np.ndarray, np.ndarray, np.ndarray],
    repeats: int,
    seed: int,
) -> tuple[float, Allocation]:
    """Return the median wall time of ``repeats`` calls and the last result.

    Every call gets a generator with the same seed, so every call (and every
    allocator) sees the same load bounds and tie-breaking noise.
    """
    times, result = [], None
    for _ in range(repeats):
        rng = np.random.default_rng(seed)
        start = time.perf_counter()
        result = allocator(*problem, rng)
        times.append(time.perf_counter() - start)
    assert result is not None
    return statistics.median(times), result


def fmt_time(seconds: float | None) -> str:
    if seconds is None:
        return "skipped"
    return f"{seconds * 1e3:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[100, 1000, 10_000, 100_000])
    parser.add_argument("--experts", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per allocator")
    parser.add_argument(
        "--max-cvxpy-clients",
        type=int,
        default=10_000,
        help="skip the cvxpy reference above this many clients (it takes minutes)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--fitness",
        choices=["uniform", "clustered"],
        default="uniform",
        help="how Q is drawn (the goal is stated for uniform)",
    )
    args = parser.parse_args()

    import cvxpy
    import scipy

    flow = FlexAllocator(solver="auto")
    reference = FlexAllocator(solver="cvxpy")
    greedy = GreedyAllocator()
    # Warm-up: imports, cvxpy's first canonicalisation, NumPy's first calls.
    warm = instance(50, 8, args.seed)
    for allocator in (flow, reference, greedy):
        allocator(*warm, np.random.default_rng(args.seed))

    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"python {platform.python_version()}, numpy {np.__version__}, "
        f"scipy {scipy.__version__}, cvxpy {cvxpy.__version__} (HiGHS); "
        f"median of {args.repeats} wall-clock calls; {args.fitness} Q, capacities 2-4, "
        f"seed {args.seed}"
    )
    header = (
        f"{'clients':>8} {'E':>4} {'flow':>10} {'cvxpy':>10} {'greedy':>10} "
        f"{'cvxpy/flow':>11} {'flow/greedy':>12} {'obj gap':>9} {'flow method':>13}"
    )
    print(header)
    print("-" * len(header))
    goal: dict[str, float | None] = {"flow": None, "cvxpy": None}
    for experts in args.experts:
        for clients in args.clients:
            problem = instance(clients, experts, args.seed, args.fitness)
            t_flow, r_flow = measure(flow, problem, args.repeats, args.seed)
            t_greedy, _ = measure(greedy, problem, args.repeats, args.seed)
            t_ref = gap = None
            if clients <= args.max_cvxpy_clients:
                t_ref, r_ref = measure(reference, problem, args.repeats, args.seed)
                gap = abs(r_flow.objective - r_ref.objective) / abs(r_ref.objective)
            if (clients, experts) == GOAL_SIZE:
                goal = {"flow": t_flow, "cvxpy": t_ref}
            print(
                f"{clients:>8} {experts:>4} {fmt_time(t_flow):>10} {fmt_time(t_ref):>10} "
                f"{fmt_time(t_greedy):>10} "
                f"{'-' if t_ref is None else f'{t_ref / t_flow:.1f}x':>11} "
                f"{f'{t_flow / t_greedy:.1f}x':>12} "
                f"{'-' if gap is None else f'{gap:.1e}':>9} {r_flow.method:>13}"
            )
    skipped = [c for c in args.clients if c > args.max_cvxpy_clients]
    if skipped:
        print(
            f"# cvxpy skipped for {skipped} clients (> --max-cvxpy-clients "
            f"{args.max_cvxpy_clients}); it scales like the LP it builds, n*E variables"
        )

    size = f"{GOAL_SIZE[0]:,} x {GOAL_SIZE[1]}"
    if args.fitness != "uniform":
        print(f"goal {size}: stated for uniform Q; not checked for {args.fitness} Q")
        return
    if goal["flow"] is None:
        print(f"goal {size}: not measured (add it to --clients / --experts)")
        return
    ok = goal["flow"] <= GOAL_SECONDS
    print(
        f"goal {size}: flow {fmt_time(goal['flow'])} <= {GOAL_SECONDS} s: "
        f"{'PASS' if ok else 'FAIL'}"
    )
    if goal["cvxpy"] is None:
        print(f"goal {size}: speedup not measured (cvxpy skipped)")
        return
    speedup = goal["cvxpy"] / goal["flow"]
    print(
        f"goal {size}: flow {speedup:.1f}x faster than cvxpy (>= {GOAL_SPEEDUP:.0f}x): "
        f"{'PASS' if speedup >= GOAL_SPEEDUP else 'FAIL'}"
    )


if __name__ == "__main__":
    main()
