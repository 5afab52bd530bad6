"""Fast exact solver for the FLEX-MoE allocation: a min-cost flow over the experts.

The allocation problem of :class:`~flexmoe_core.allocation.FlexAllocator`,

    maximise  sum_ce Q_ce x_ce
    s.t.      sum_e x_ce = k_c,   L_e <= sum_c x_ce <= U_e,   x in {0, 1},

is a min-cost flow: source -> client c (k_c units) -> expert e (capacity 1, cost
-Q_ce) -> sink (between L_e and U_e units). There can be 1e5 clients but only a few
dozen experts, so this module never builds the n*E-arc network. It works on the
*compressed residual graph* whose nodes are the E experts plus one slack node t:

* arc a -> b is "one client that holds a and not b swaps a for b"; its cost is that of
  the cheapest such swap, min_c (Q_ca - Q_cb), and the client achieving it is kept;
* arcs e -> t and t -> e move load inside the band [L_e, U_e], at cost 0.

A path or cycle of the full residual network is one of the compressed graph with the
same cost, and back: a client used by two arcs of one simple path or cycle holds both
tails and neither head, so both swaps apply. Shortest paths and negative cycles are
therefore found on E + 1 nodes.

The solve has four steps.

1. Prices (dual warm start). A few sweeps of coordinate descent on the LP dual:
   expert by expert, the price p_e moves to its best response, the price at which its
   load lies in its band given the other prices. Any prices give a correct result;
   good ones leave less work for step 3.
2. Start. Each client takes its top-k_c experts by Q_ce - p_e. That assignment is
   optimal for the loads it produces: with potentials -p every swap arc has a
   non-negative reduced cost. Its loads may break the bounds.
3. Repair by successive shortest paths. Nodes with too much load push units along
   shortest paths (Dijkstra on reduced costs; potentials updated each round) to nodes
   with too little. Each round augments the shortest-path tree's paths, each as often
   as clients that have not moved this round offer its arcs at zero reduced cost (so a
   tied Q is fixed in a few rounds). All reduced costs stay non-negative, so the
   assignment stays optimal for its loads, and it is optimal once they are feasible.
   When no path reaches a node with too little load, the problem is infeasible.
4. Certificate. Bellman-Ford on the final residual graph must find no negative cycle,
   which is the optimality condition of min-cost flow. A cycle left by float drift is
   cancelled and the check repeats. The final shortest-path distances are the dual
   prices returned with the solution.

On large instances (:data:`RESTRICT_MIN_CLIENTS` clients and more) a restricted solve
comes first (:func:`_solve_restricted`). Newton steps on the load equations, fitted on
an evenly spaced sample of the clients and then on all of them, give prices under
which the clients' top-k loads nearly meet the bounds; clients whose top-k is firm
(its k-th and (k+1)-th reduced values at least delta apart) keep it, and the steps
above solve the small problem of the others. The result is kept only when the small
problem's prices still leave every firm client its top-k and price no expert off its
bound (the same certificate, which the margins give for every client at once);
otherwise delta widens, and
after a few tries the whole problem is solved as above. Either way the answer is the
optimum.

Cost, with K = sum_c k_c: a price sweep O(nE + KE log E), the start O(nE log E)
(row sorts), the graph O(KE), a repair round O(E^2) plus O(K) per expert row it
changes, the certificate O(E^3); a Newton step O(nE log E + E^3). The restricted solve
makes about four passes over Q and leaves the flow a few thousand clients: about
0.3 s for 10^5 clients x 64 experts with uniform, tied, low-rank or heavy-tailed Q
(README "Allocation at scale"). Clients in tight look-alike groups defeat Newton's
linear model and coordinate descent alike; on 4 x the sample size and more the
sample's exact optimum then prices the whole problem, whose repair still moves
hundreds of units one round each (seconds at 10^4 and 10^5 clients).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise

import numpy as np
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import dijkstra

from .allocation_problem import (
    InfeasibleAllocationError,
    LoadBounds,
    check_feasible,
    check_inputs,
    infeasible_assignment_error,
    verify_assignment,
)

# Dijkstra's predecessor of a source node (scipy.sparse.csgraph convention).
_NO_PRED = -9999


@dataclass(frozen=True)
class FlowSolution:
    """An optimal assignment with the dual prices that certify it.

    Attributes
    ----------
    assignment : np.ndarray
        (clients, E) bool, exactly ``k_c`` experts per client, loads within bounds.
    prices : np.ndarray
        (E,) float: each client holds its top-``k_c`` experts by ``Q - prices`` (up
        to float tolerance). ``prices[e] > 0`` only if expert e is at its upper bound
        and ``< 0`` only if it is at its lower bound; with zero-width bands they are
        defined up to a common shift.
    rounds : int
        Dijkstra rounds of the repair step.
    augmentations : int
        Units of load moved by the repair step.
    cancelled_cycles : int
        Negative cycles the certificate step had to cancel (0 unless float drift).
    flow_clients : int
        Clients the flow steps worked on: all of them, or those near their top-k
        boundary when the restricted solve certified its result (0: not recorded).
    """

    assignment: np.ndarray
    prices: np.ndarray
    rounds: int
    augmentations: int
    cancelled_cycles: int
    flow_clients: int = 0


def solve_flow(
    fitness: np.ndarray,
    capacities: Sequence[int] | np.ndarray,
    bounds: LoadBounds,
    *,
    price_sweeps: int = 12,
    initial_prices: np.ndarray | None = None,
    restrict: bool = True,
) -> FlowSolution:
    """Solve the FLEX-MoE allocation exactly as a min-cost flow.

    Parameters
    ----------
    fitness : np.ndarray
        (clients, E) float Q, tie-breaking noise already added.
    capacities : sequence of int
        k_c in [1, E] per client.
    bounds : LoadBounds
        Per-expert load bounds, e.g. from :func:`~flexmoe_core.allocation_problem.load_bounds`.
    price_sweeps : int
        Most sweeps of the dual warm start; 0 starts from the greedy assignment. It
        changes the speed, never the optimum.
    initial_prices : np.ndarray, optional
        (E,) prices the warm start begins from (default 0).
    restrict : bool
        On large instances, first try the restricted solve (:func:`_solve_restricted`):
        Newton prices, then the flow on the clients near their top-k boundary only,
        kept only when its certificate covers every client. Speed only, never the optimum.

    Returns
    -------
    FlowSolution
        The optimal assignment and its dual prices.

    Raises
    ------
    InfeasibleAllocationError
        With the same messages as the cvxpy reference: bad capacities, bounds that
        :func:`~flexmoe_core.allocation_problem.check_feasible` refuses, or bounds no
        assignment can meet.
    """
    q = np.asarray(fitness, dtype=float)
    caps = check_inputs(q, np.asarray(capacities))
    num_experts = q.shape[1]
    lower = np.asarray(bounds.lower, dtype=np.int64)
    upper = np.asarray(bounds.upper, dtype=np.int64)
    if lower.shape != (num_experts,) or upper.shape != (num_experts,):
        raise ValueError(
            f"bounds have shapes {lower.shape}, {upper.shape}; expected ({num_experts},)"
        )
    check_feasible(caps, num_experts, bounds)
    # Costs are compared to this tolerance: float error of sums of O(E) terms of |Q|.
    tol = 1e-12 * max(1.0, float(np.abs(q).max(initial=0.0)))

    start = np.zeros(num_experts) if initial_prices is None else np.asarray(initial_prices)
    if restrict:
        restricted, prices_found = _solve_restricted(q, caps, bounds, tol)
        if restricted is not None:
            return restricted
        if prices_found is not None:  # the whole problem starts where the attempt got
            start = prices_found
    prices = _warm_prices(q, caps, lower, upper, price_sweeps, start)
    flow = _Flow(q, caps, bounds, _top_k(q - prices, caps), prices, tol)
    flow.repair()
    cancelled, potentials = flow.certify()
    verify_assignment(flow.x, caps, bounds)
    return FlowSolution(
        flow.x,
        # Node t's potential is the common level; experts' prices are relative to it.
        potentials[num_experts] - potentials[:num_experts],
        flow.rounds,
        flow.augmentations,
        cancelled,
        len(q),
    )


# The restricted solve pays for itself from about this many clients.
RESTRICT_MIN_CLIENTS = 4096
# Newton prices are first fitted on an evenly spaced sample of this many clients.
NEWTON_SAMPLE = 8192
# Newton iterations on the sample and on all clients.
NEWTON_SAMPLE_STEPS, NEWTON_FULL_STEPS = 8, 2
# Share of the clients, those of smallest margin, whose price gaps estimate how load
# moves with prices.
NEWTON_WINDOW_SHARE = 0.1
# Lengths of the Newton step tried at each iteration (the best is kept).
NEWTON_LENGTHS = (1.0,)
# Sweeps of coordinate descent on the sample when Newton alone does not get close.
SAMPLE_DESCENT_SWEEPS = 12
# Above this excess (a share of all slots) the prices are too far off for restricting.
RESTRICT_MAX_EXCESS = 0.02
# Tries of the restricted solve, each with a wider band of candidate clients.
RESTRICT_TRIES = 3


@dataclass
class _Boundary:
    """Each client's top-k under some prices, and how firmly it holds it.

    ``margin`` is the gap between the k-th and (k+1)-th best reduced values (inf for
    k = E); ``kth`` and ``after`` are those values.
    """

    prices: np.ndarray
    reduced: np.ndarray  # Q - prices
    held: np.ndarray
    load: np.ndarray
    kth: np.ndarray
    after: np.ndarray

    @property
    def margin(self) -> np.ndarray:
        return self.kth - self.after


def _boundary(q: np.ndarray, caps: np.ndarray, prices: np.ndarray) -> _Boundary:
    reduced = q - prices
    kth, after = _kth_largest(reduced, caps)
    held = reduced >= kth[:, None]
    # Ties at the k-th value (margin 0) are left to the flow: _top_k breaks them.
    if (held.sum(axis=1) != caps).any():
        held = _top_k(reduced, caps)
    return _Boundary(prices, reduced, held, held.sum(axis=0), kth, after)


def _load_error(load: np.ndarray, lower: np.ndarray, upper: np.ndarray) -> np.ndarray:
    return load - np.clip(load, lower, upper)


def _newton_step(
    boundary: _Boundary, error: np.ndarray, num_experts: int, window_share: float
) -> np.ndarray:
    """Return the price change that would cancel ``error`` if loads were linear in prices.

    Client c leaves the expert of its k-th best value for the one of its (k+1)-th once
    their price gap moves by its margin, so the clients with margins below a window w
    estimate how fast load flows between each pair of experts per unit of price: a
    graph Laplacian whose solve is the step (semi-discrete optimal transport's Newton
    method).
    """
    margin = boundary.margin
    finite = np.flatnonzero(np.isfinite(margin))
    if finite.size == 0:
        return np.zeros(num_experts)
    count = max(1, int(window_share * finite.size))
    near = finite[np.argpartition(margin[finite], count - 1)[:count]]
    window = float(margin[near].max())
    if window <= 0:
        return np.zeros(num_experts)
    rows = boundary.reduced[near]
    inside = np.argmax(rows == boundary.kth[near, None], axis=1)
    outside = np.argmax(rows == boundary.after[near, None], axis=1)
    pairs = inside * num_experts + outside
    flow = np.bincount(pairs, minlength=num_experts**2).reshape(num_experts, num_experts)
    # A client inside a and outside b moves when p_a rises past p_b, not when it falls:
    # the pair's rate averages the two directions, (count_ab + count_ba) / 2w.
    flow = (flow + flow.T) / (2 * window)
    laplacian = np.diag(flow.sum(axis=1)) - flow
    # A small ridge keeps experts no near client links solvable; they move little.
    ridge = 1e-6 * max(float(laplacian.diagonal().max()), 1.0)
    step = np.linalg.solve(laplacian + ridge * np.eye(num_experts), error)
    return step - step.mean()


def _newton_prices(
    q: np.ndarray,
    caps: np.ndarray,
    lower: np.ndarray,
    upper: np.ndarray,
    start: np.ndarray,
    steps: int,
) -> tuple[_Boundary, int]:
    """Return the best boundary Newton steps reach from ``start``, and its load error.

    Each step tries the Newton step at the lengths :data:`NEWTON_LENGTHS` and keeps the
    best (the window's density estimate is biased, so the full step is not always
    right); the steps stop when none reduces the load error.
    """
    num_experts = q.shape[1]
    best = _boundary(q, caps, start)
    error = _load_error(best.load, lower, upper)
    best_error = float(np.abs(error).sum())
    for _ in range(steps):
        if best_error == 0:
            break
        step = _newton_step(best, error.astype(float), num_experts, NEWTON_WINDOW_SHARE)
        improved = False
        for length in NEWTON_LENGTHS:
            trial = _boundary(q, caps, best.prices + length * step)
            trial_error = _load_error(trial.load, lower, upper)
            if (size := float(np.abs(trial_error).sum())) < best_error:
                best, error, best_error, improved = trial, trial_error, size, True
        if not improved:
            break
    return best, round(best_error)


def _solve_restricted(
    q: np.ndarray, caps: np.ndarray, bounds: LoadBounds, tol: float
) -> tuple[FlowSolution | None, np.ndarray | None]:
    """Solve exactly by moving only the clients near their top-k boundary, or give up.

    Newton prices p (fitted on a sample, then on all clients) give every client a top-k
    and a margin. Clients with a margin of at least delta are fixed to that top-k; the
    others, with the bounds less the fixed clients' loads, are a small allocation
    problem that :func:`solve_flow` solves exactly, with prices p'. The combined
    assignment is optimal when p' certifies it for every client: a fixed client still
    holds its top-k under p' as long as p' - p moves no price gap by more than its
    margin (range(p' - p) < delta), and an expert p' prices below the level must sit at
    its lower bound. Otherwise delta widens to the move seen and the solve repeats from
    p'. Returns (solution, None), or (None, the best prices found) when the prices are
    too far off or the tries run out: the caller then solves the whole problem, from
    those prices.
    """
    n, num_experts = q.shape
    if n < RESTRICT_MIN_CLIENTS:
        return None, None
    lower = np.asarray(bounds.lower, dtype=np.int64)
    upper = np.asarray(bounds.upper, dtype=np.int64)
    slots = int(caps.sum())
    sample = np.linspace(0, n - 1, min(n, NEWTON_SAMPLE)).astype(np.intp)
    # The sample's bounds: the whole problem's, scaled by its share of the slots.
    share = caps[sample].sum() / slots
    sample_problem = (q[sample], caps[sample], lower * share, upper * share)
    start, sample_error = _newton_prices(
        *sample_problem, np.zeros(num_experts), NEWTON_SAMPLE_STEPS
    )
    if sample_error > RESTRICT_MAX_EXCESS * caps[sample].sum():
        if n < 4 * len(sample):  # the sample is most of the problem: solve the whole
            return None, None
        # Far from the optimum (clients alike, Q of low rank) Newton steps do not help;
        # coordinate descent on the sample gets close enough for them to take over.
        sample_bounds = LoadBounds(
            np.floor(lower * share).astype(np.int64),
            np.ceil(upper * share).astype(np.int64),
            bounds.mean_load,
        )
        descent = _warm_prices(
            q[sample],
            caps[sample],
            sample_bounds.lower,
            sample_bounds.upper,
            SAMPLE_DESCENT_SWEEPS,
            start.prices,
        )
        start, sample_error = _newton_prices(*sample_problem, descent, NEWTON_SAMPLE_STEPS)
        if sample_error > RESTRICT_MAX_EXCESS * caps[sample].sum():
            # Still far (tight look-alike groups): the sample's exact optimum, a small
            # problem of the same kind, prices the whole one up to sampling noise.
            try:
                exact = solve_flow(q[sample], caps[sample], sample_bounds, restrict=False)
            except InfeasibleAllocationError:  # the scaled bounds fit no 0/1 matrix
                return None, start.prices
            start, sample_error = _newton_prices(*sample_problem, exact.prices, 0)
    boundary, error = _newton_prices(q, caps, lower, upper, start.prices, NEWTON_FULL_STEPS)
    if error > RESTRICT_MAX_EXCESS * slots:
        return None, boundary.prices
    # Enough candidates to absorb the excess several times over.
    delta = float(np.quantile(boundary.margin, min(1.0, max(0.02, 16 * error / n))))
    for _ in range(RESTRICT_TRIES):
        candidate = boundary.margin <= delta
        fixed_load = boundary.held[~candidate].sum(axis=0)
        sub_bounds = LoadBounds(
            np.maximum(lower - fixed_load, 0), upper - fixed_load, bounds.mean_load
        )
        chosen = np.flatnonzero(candidate)
        try:
            sub = solve_flow(
                q[chosen],
                caps[chosen],
                sub_bounds,
                price_sweeps=2,
                initial_prices=boundary.prices,
                restrict=False,
            )
        except InfeasibleAllocationError:
            sub = None
        if sub is not None:
            x = boundary.held.copy()
            x[chosen] = sub.assignment
            load = x.sum(axis=0)
            move = sub.prices - boundary.prices
            firm = float(boundary.margin[~candidate].min(initial=np.inf))
            below, above = sub.prices < -tol, sub.prices > tol
            if (
                float(move.max() - move.min()) < firm - tol
                and (load[below] == lower[below]).all()
                and (load[above] == upper[above]).all()
                and (lower <= load).all()
                and (load <= upper).all()
            ):
                solution = FlowSolution(
                    x, sub.prices, sub.rounds, sub.augmentations, sub.cancelled_cycles, len(chosen)
                )
                return solution, None
            delta = max(2 * delta, 2 * float(move.max() - move.min()))
            boundary = _boundary(q, caps, sub.prices)
        else:
            delta *= 4
    return None, boundary.prices


def _kth_largest(values: np.ndarray, caps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return per row the k_c-th and (k_c+1)-th largest values (-inf if k_c = E)."""
    n, num_experts = values.shape
    # A full row sort is SIMD-vectorised in NumPy and beats a row-wise partition.
    ordered = np.sort(values, axis=1)
    rows, position = np.arange(n), num_experts - caps
    kth = ordered[rows, position]
    after = np.where(caps < num_experts, ordered[rows, np.maximum(position - 1, 0)], -np.inf)
    return kth, after


def _top_k(values: np.ndarray, caps: np.ndarray) -> np.ndarray:
    """Return the bool assignment holding each row's k_c largest values."""
    kth, _ = _kth_largest(values, caps)
    x = values >= kth[:, None]
    # Rows with ties at their k-th value hold too many; redo those with a sort that
    # breaks ties by a per-client rotation of the experts, so that a tied Q (say the
    # constant q0 of round one) starts with spread loads, not all on expert 0.
    tied = np.flatnonzero(x.sum(axis=1) > caps)
    num_experts = values.shape[1]
    for k in np.unique(caps[tied]):
        rows = tied[caps[tied] == k]
        rotation = (np.arange(num_experts) - rows[:, None]) % num_experts
        top = np.lexsort((rotation, -values[rows]), axis=-1)[:, :k]
        x[rows] = False
        x[rows[:, None], top] = True
    return x


def _warm_prices(
    q: np.ndarray,
    caps: np.ndarray,
    lower: np.ndarray,
    upper: np.ndarray,
    sweeps: int,
    start: np.ndarray | None = None,
) -> np.ndarray:
    """Return expert prices under which the clients' top-k loads nearly meet the bounds.

    This is coordinate descent on the LP dual. At the optimum the experts strictly
    inside their band share one price level lambda, those at U_e are priced above it
    and those at L_e below (complementary slackness). Client c holds e iff
    ``Q_ce - p_e >= theta_ce``, the k_c-th best reduced value among the other experts,
    i.e. iff ``p_e <= tau_ce = Q_ce - theta_ce``. With the other prices fixed, expert
    e's load is a step function of p_e, so its best response is exact: lambda if its
    load there lies in [L_e, U_e], else the price between the t-th and (t+1)-th largest
    tau_e, which leaves it exactly t = U_e (or L_e) clients. The level's own best
    response is the price at which the bands of the experts above it absorb the
    K - sum(L) slots beyond the lower bounds.

    Experts respond one after the other (Gauss-Seidel), each seeing the moves before it:
    simultaneous (Jacobi) moves overshoot when clients are alike, e.g. clusters of
    non-IID clients that all leave one expert for the same next one. A price change
    only touches the clients whose top-(k_c+1) it enters or leaves, so the per-client
    k-th values are updated for those alone. Coordinate descent can stall short of the
    optimum on this piecewise-linear dual; the repair step finishes. Sweeps stop once
    they no longer pay for themselves.
    """
    num_experts = q.shape[1]
    # Expert-major: every step below reads one expert's column for all clients.
    q_t = np.ascontiguousarray(q.T)
    prices = np.zeros(num_experts) if start is None else np.array(start, dtype=float)
    reduced_t = q_t - prices[:, None]  # Q - p
    fixed = caps == num_experts  # such clients hold every expert at any price
    any_fixed = bool(fixed.any())
    band, flexible = upper - lower, int(caps.sum() - lower.sum())
    kth, after = _kth_largest(q - prices, caps)

    def holds(e: int) -> np.ndarray:
        held = reduced_t[e] >= kth
        return held | fixed if any_fixed else held

    def gap() -> int:
        held_t = reduced_t >= kth
        load = (held_t | fixed if any_fixed else held_t).sum(axis=1)
        return _gap(prices, load, lower, upper, band, flexible)

    best_gap, best = gap(), prices
    for _ in range(sweeps):
        if best_gap == 0:
            break
        prices = prices.copy()
        for e in range(num_experts):
            held = holds(e)
            load = int(np.count_nonzero(held))
            if band[e] > 0:
                level = _level(prices, band, flexible)
                # tau is +inf for clients with k_c = E (after = -inf): they always hold e.
                tau = q_t[e] - np.where(held, after, kth)
                at_level = int(np.count_nonzero(tau >= level))
                goal = min(max(at_level, int(lower[e])), int(upper[e]))
                price = level if goal == at_level else _between(q_t[e], held, kth, after, goal)
            elif load == lower[e]:
                continue  # on target: the current price is a best response
            else:
                price = _between(q_t[e], held, kth, after, int(lower[e]))
            # No finite price gives exactly the goal (ties at +inf): keep the old one.
            if not np.isfinite(price) or price == prices[e]:
                continue
            column = q_t[e] - price
            # Only clients whose top-(k_c+1) e enters or leaves change their k-th values;
            # their rows of Q - p are rebuilt from Q (cheaper than keeping a copy).
            touched = (reduced_t[e] >= after) | (column >= after)
            touched = np.flatnonzero(touched & ~fixed if any_fixed else touched)
            reduced_t[e], prices[e] = column, price
            if touched.size:
                kth[touched], after[touched] = _kth_largest(q[touched] - prices, caps[touched])
        current = gap()
        if current >= best_gap:
            break
        # Stop once a sweep removes less than a quarter of what is left.
        done = current > 0.75 * best_gap
        best_gap, best = current, prices
        if done:
            break
    return best


def _level(prices: np.ndarray, band: np.ndarray, flexible: int) -> float:
    """Return the level lambda whose higher-priced experts' bands take the flexible slots."""
    order = np.argsort(-prices, kind="stable")
    filled = int(np.searchsorted(np.cumsum(band[order]), flexible))
    return float(prices[order[min(filled, len(prices) - 1)]])


def _gap(
    prices: np.ndarray,
    load: np.ndarray,
    lower: np.ndarray,
    upper: np.ndarray,
    band: np.ndarray,
    flexible: int,
) -> int:
    """Return the excess the repair step would face: loads' distance from their targets.

    A priced-up expert must sit at U_e, a priced-down one at L_e, one at the level
    anywhere in its band.
    """
    level = _level(prices, band, flexible)
    target = np.where(
        prices > level, upper, np.where(prices < level, lower, load.clip(lower, upper))
    )
    return int(np.abs(load - target).sum())


def _between(
    q_row: np.ndarray, held: np.ndarray, kth: np.ndarray, after: np.ndarray, t: int
) -> float:
    """Return the midpoint of the t-th and (t+1)-th largest tau (nan if one is missing).

    ``tau = Q_e - theta`` with theta the clients' (k_c+1)-th best reduced value where
    they hold e and their k_c-th elsewhere. Holders' tau are >= the current price >
    non-holders' tau, so both order statistics lie in one of the two groups (or
    straddle them): only that group's tau is built and partitioned.
    """
    load = int(np.count_nonzero(held))

    def group(holding: bool) -> np.ndarray:
        mask = held if holding else ~held
        return q_row[mask] - (after if holding else kth)[mask]

    if t == load:
        if load == 0 or load == held.size:
            return np.nan
        return 0.5 * (group(True).min() + group(False).max())
    pool, m = (group(True), t) if t < load else (group(False), t - load)
    size = pool.size
    if m < 1 or m + 1 > size:
        return np.nan
    # Ascending partition: the m-th largest sits at index size - m.
    part = np.partition(pool, [size - m - 1, size - m])
    return 0.5 * (part[size - m] + part[size - m - 1])


class _Flow:
    """The assignment as a pseudo-flow on the compressed residual graph.

    ``slack_flow[e]`` in [0, U_e - L_e] is the flow on arc e -> t beyond L_e; node e's
    excess is ``load_e - L_e - slack_flow[e]`` and t's is ``sum(slack_flow) -
    (K - sum(L))``; a feasible assignment has zero excess everywhere.
    """

    def __init__(
        self,
        q: np.ndarray,
        caps: np.ndarray,
        bounds: LoadBounds,
        x: np.ndarray,
        prices: np.ndarray,
        tol: float,
    ) -> None:
        self.q, self.caps, self.bounds, self.x, self.tol = q, caps, bounds, x, tol
        # Expert-major copy of x, kept in sync: finding an expert's holders scans one
        # contiguous row instead of a strided column.
        self.x_t = np.ascontiguousarray(x.T)
        self.num_experts = num_experts = q.shape[1]
        self.lower = np.asarray(bounds.lower, dtype=np.int64)
        self.band = np.asarray(bounds.upper, dtype=np.int64) - self.lower
        self.flexible = int(caps.sum() - self.lower.sum())
        self.load = x.sum(axis=0).astype(np.int64)
        self.swap_cost = np.full((num_experts, num_experts), np.inf)
        self.swap_via = np.full((num_experts, num_experts), -1, dtype=np.intp)
        self._recompute({a: set(range(num_experts)) for a in range(num_experts)})
        self.potential, self.slack_flow = self._initial_potentials(prices)
        self.rounds = self.augmentations = 0

    def _initial_potentials(self, prices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Return potentials -p (and -p_t for t) and slack flows they are valid for.

        Arc e -> t (exists while slack_flow < band) needs p_e <= p_t, arc t -> e (while
        slack_flow > 0) needs p_e >= p_t. So experts priced above p_t start with a
        full band, those below with an empty one; p_t is picked among the prices to
        leave the least excess to repair.
        """
        best_excess, best = None, (0.0, np.zeros_like(self.band))
        for level in np.unique(np.append(prices, 0.0)):
            flow = np.where(
                prices > level,
                self.band,
                np.where(prices < level, 0, np.clip(self.load - self.lower, 0, self.band)),
            )
            excess = np.maximum(self.load - self.lower - flow, 0).sum()
            excess += max(int(flow.sum()) - self.flexible, 0)
            if best_excess is None or excess < best_excess:
                best_excess, best = excess, (level, flow)
        level, flow = best
        return np.append(-prices, -level), flow.astype(np.int64)

    def _recompute(self, stale: dict[int, set[int]]) -> None:
        """Recompute the given swap arcs {tail: heads} over all holders of the tail.

        O(holders x heads) per tail, i.e. O(K) for a whole row.
        """
        q, x = self.q, self.x
        for a, heads in stale.items():
            cols = np.fromiter(sorted(heads), dtype=np.intp, count=len(heads))
            holders = self.x_t[a].nonzero()[0]
            if holders.size == 0:
                self.swap_cost[a, cols], self.swap_via[a, cols] = np.inf, -1
                continue
            if cols.size == self.num_experts:  # whole row: plain row gathers
                swap, held = q[holders], x[holders]
            else:
                swap, held = q[holders[:, None], cols], x[holders[:, None], cols]
            np.subtract(q[holders, a][:, None], swap, out=swap)
            swap[held] = np.inf  # a client cannot take an expert it holds
            best = swap.argmin(axis=0)
            cost = swap[best, np.arange(cols.size)]
            self.swap_cost[a, cols] = cost
            self.swap_via[a, cols] = np.where(np.isfinite(cost), holders[best], -1)

    def _swap(self, client: int, u: int, v: int, stale: dict[int, set[int]]) -> None:
        """Make ``client`` drop expert u for v, keeping the swap arcs up to date.

        Only arcs the client offers change: out of u (it left), out of v (it joined),
        and, out of the experts it still holds, into u (now offered) and into v (no
        longer). Cheaper offers are applied at once; arcs whose cheapest client it
        was are marked stale for :meth:`_recompute`.
        """
        q, x, cost, via = self.q, self.x, self.swap_cost, self.swap_via
        if not x[client, u] or x[client, v]:
            raise RuntimeError(f"stale swap arc {u}->{v} via client {client}")
        x[client, u], x[client, v] = False, True
        self.x_t[u, client], self.x_t[v, client] = False, True
        self.load[u] -= 1
        self.load[v] += 1
        for r in x[client].nonzero()[0].tolist():
            if r == v:
                continue
            offer = q[client, r] - q[client, u]
            if offer < cost[r, u]:
                cost[r, u], via[r, u] = offer, client
            if via[r, v] == client:
                stale[r].add(v)
        stale[u].update((via[u] == client).nonzero()[0].tolist())
        offers = q[client, v] - q[client]
        better = ~x[client] & (offers < cost[v])
        cost[v, better], via[v, better] = offers[better], client

    def _excess(self) -> np.ndarray:
        excess = np.empty(self.num_experts + 1, dtype=np.int64)
        excess[:-1] = self.load - self.lower - self.slack_flow
        excess[-1] = self.slack_flow.sum() - self.flexible
        return excess

    def _residual(self) -> np.ndarray:
        """Return the (E+1, E+1) arc costs, inf where there is no residual arc."""
        e = self.num_experts
        cost = np.full((e + 1, e + 1), np.inf)
        cost[:e, :e] = self.swap_cost
        cost[:e, e] = np.where(self.slack_flow < self.band, 0.0, np.inf)
        cost[e, :e] = np.where(self.slack_flow > 0, 0.0, np.inf)
        return cost

    def _push(
        self, path: Sequence[int], clients: Sequence[int], stale: dict[int, set[int]]
    ) -> None:
        """Move one unit of load along ``path`` (E standing for t).

        ``clients`` holds one client per expert-to-expert arc, in path order.
        """
        e = self.num_experts
        swaps = [(u, v) for u, v in pairwise(path) if u != e and v != e]
        for u, v in pairwise(path):
            if u == e:
                self.slack_flow[v] -= 1
            elif v == e:
                self.slack_flow[u] += 1
        for client, (u, v) in zip(clients, swaps, strict=True):
            self._swap(client, u, v, stale)

    def _path_clients(
        self, path: Sequence[int], used: np.ndarray, spare: dict[tuple[int, int], list[int]]
    ) -> list[int] | None:
        """Return a client for each swap arc of ``path`` that no swap this round moved.

        An arc's cheapest client may have moved already; with ties (a constant Q, few
        distinct values) other unmoved holders often swap at the same zero reduced
        cost. Without them a round would move one unit per arc, which on a tied Q is
        thousands of rounds. ``spare`` caches, per arc and round, those alternatives
        (an empty list: none), so an arc's holders are scanned at most once a round.
        """
        e, q, pi = self.num_experts, self.q, self.potential
        clients = []
        for u, v in pairwise(path):
            if u == e or v == e:
                continue
            client = int(self.swap_via[u, v])
            if client < 0 or used[client]:
                if (u, v) not in spare:
                    holders = self.x_t[u].nonzero()[0]
                    tight = (
                        ~self.x_t[v, holders]
                        & ~used[holders]
                        & (q[holders, u] - q[holders, v] + pi[u] - pi[v] <= self.tol)
                    )
                    spare[u, v] = holders[tight].tolist()[::-1]
                candidates = spare[u, v]
                while candidates and used[candidates[-1]]:
                    candidates.pop()
                if not candidates:
                    return None
                client = candidates[-1]
            clients.append(client)
        return clients

    def repair(self) -> None:
        """Successive shortest paths until every node's excess is zero."""
        used = np.zeros(len(self.q), dtype=bool)  # clients moved in this round
        while True:
            excess = self._excess()
            sources = np.flatnonzero(excess > 0)
            if sources.size == 0:
                return
            reduced = self._residual() + self.potential[:, None] - self.potential
            # Reduced costs are >= 0 in exact arithmetic; clamp the float drift.
            np.maximum(reduced, 0.0, out=reduced)
            dist, pred = _shortest_paths(reduced, sources)
            reached = np.isfinite(dist)
            sinks = np.flatnonzero(reached & (excess < 0))
            if sinks.size == 0:
                # No augmenting path: by max-flow/min-cut no feasible flow exists.
                raise infeasible_assignment_error(self.caps, self.bounds)
            # Unreached nodes rise by the largest distance, which keeps their arcs
            # into reached nodes non-negative; tree arcs get reduced cost 0.
            self.potential += np.where(reached, dist, dist[reached].max())
            self.rounds += 1
            moved: list[int] = []
            spare: dict[tuple[int, int], list[int]] = {}
            stale: dict[int, set[int]] = defaultdict(set)
            for sink in sinks[np.argsort(dist[sinks], kind="stable")]:
                path = [int(sink)]
                while pred[path[-1]] != _NO_PRED:
                    path.append(int(pred[path[-1]]))
                path.reverse()
                # Every tree path is a shortest path. Augmenting one keeps the others
                # shortest as long as their clients have not moved, so push along
                # each, as often as unmoved clients allow.
                while excess[path[0]] > 0 and excess[sink] < 0 and self._slack_arcs_open(path):
                    clients = self._path_clients(path, used, spare)
                    if clients is None:
                        break
                    used[clients] = True
                    moved += clients
                    self._push(path, clients, stale)
                    excess[path[0]] -= 1
                    excess[sink] += 1
                    self.augmentations += 1
            used[moved] = False
            self._recompute(stale)

    def _slack_arcs_open(self, path: Sequence[int]) -> bool:
        e = self.num_experts
        for u, v in pairwise(path):
            if (u == e and self.slack_flow[v] <= 0) or (
                v == e and self.slack_flow[u] >= self.band[u]
            ):
                return False
        return True

    def certify(self) -> tuple[int, np.ndarray]:
        """Cancel negative cycles until none is left; return (cancelled, potentials)."""
        e, cancelled = self.num_experts, 0
        while True:
            cost = self._residual()
            dist, cycle = _bellman_ford(cost, self.tol)
            if cycle is None:
                return cancelled, dist
            closed = [*cycle, cycle[0]]
            weight = sum(cost[u, v] for u, v in pairwise(closed))
            if not weight < -self.tol:
                return cancelled, dist
            stale: dict[int, set[int]] = defaultdict(set)
            clients = [int(self.swap_via[u, v]) for u, v in pairwise(closed) if max(u, v) < e]
            self._push(closed, clients, stale)
            self._recompute(stale)
            cancelled += 1


def _shortest_paths(reduced: np.ndarray, sources: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return distances from the nearest source and the shortest-path tree's parents.

    ``reduced`` is dense with inf for missing arcs. The CSR matrix is built by hand:
    zero-cost arcs are common and must stay arcs (``csgraph_from_dense`` would do that
    too, at several times the cost through masked arrays).
    """
    present = np.isfinite(reduced)
    rows, cols = present.nonzero()
    indptr = np.zeros(len(reduced) + 1, dtype=np.int32)
    np.cumsum(present.sum(axis=1), out=indptr[1:])
    graph = csr_matrix((reduced[rows, cols], cols.astype(np.int32), indptr), shape=reduced.shape)
    dist, pred = dijkstra(graph, indices=sources, min_only=True, return_predecessors=True)[:2]
    return dist, pred


def _bellman_ford(cost: np.ndarray, tol: float) -> tuple[np.ndarray, list[int] | None]:
    """Return distances from a virtual root joined to every node, or a negative cycle.

    Relaxations count only when they gain more than ``tol``, so float noise neither
    loops nor reports a cycle. A cycle in the predecessor graph is negative.
    """
    size = len(cost)
    dist, pred = np.zeros(size), np.full(size, -1)
    cols = np.arange(size)
    for sweep in range(4 * size):
        candidate = dist[:, None] + cost
        via = candidate.argmin(axis=0)
        best = candidate[via, cols]
        better = best < dist - tol
        if not better.any():
            return dist, None
        dist = np.where(better, best, dist)
        pred = np.where(better, via, pred)
        if sweep >= size - 1 and (cycle := _pred_cycle(pred)) is not None:
            return dist, cycle
    return dist, _pred_cycle(pred)


def _pred_cycle(pred: np.ndarray) -> list[int] | None:
    """Return a cycle of the predecessor graph in arc order, or None."""
    mark = np.full(len(pred), -1)
    for start in range(len(pred)):
        node = start
        while node != -1 and mark[node] == -1:
            mark[node] = start
            node = int(pred[node])
        if node != -1 and mark[node] == start:
            cycle = [node]
            back = int(pred[node])
            while back != node:
                cycle.append(back)
                back = int(pred[back])
            return cycle[::-1]
    return None
