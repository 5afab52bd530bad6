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

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .prices import newton_prices, top_k, top_k_boundary, warm_prices
from .problem import (
    InfeasibleAllocationError,
    LoadBounds,
    check_feasible,
    check_inputs,
    verify_assignment,
)
from .residual import ResidualFlow


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
        Per-expert load bounds, e.g. from :func:`~flexmoe_core.allocation.problem.load_bounds`.
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
        :func:`~flexmoe_core.allocation.problem.check_feasible` refuses, or bounds no
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
    prices = warm_prices(q, caps, lower, upper, price_sweeps, start)
    flow = ResidualFlow(q, caps, bounds, top_k(q - prices, caps), prices, tol)
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
# Sweeps of coordinate descent on the sample when Newton alone does not get close.
SAMPLE_DESCENT_SWEEPS = 12
# Above this excess (a share of all slots) the prices are too far off for restricting.
RESTRICT_MAX_EXCESS = 0.02
# Tries of the restricted solve, each with a wider band of candidate clients.
RESTRICT_TRIES = 3


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
    start, sample_error = newton_prices(*sample_problem, np.zeros(num_experts), NEWTON_SAMPLE_STEPS)
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
        descent = warm_prices(
            q[sample],
            caps[sample],
            sample_bounds.lower,
            sample_bounds.upper,
            SAMPLE_DESCENT_SWEEPS,
            start.prices,
        )
        start, sample_error = newton_prices(*sample_problem, descent, NEWTON_SAMPLE_STEPS)
        if sample_error > RESTRICT_MAX_EXCESS * caps[sample].sum():
            # Still far (tight look-alike groups): the sample's exact optimum, a small
            # problem of the same kind, prices the whole one up to sampling noise.
            try:
                exact = solve_flow(q[sample], caps[sample], sample_bounds, restrict=False)
            except InfeasibleAllocationError:  # the scaled bounds fit no 0/1 matrix
                return None, start.prices
            start, sample_error = newton_prices(*sample_problem, exact.prices, 0)
    boundary, error = newton_prices(q, caps, lower, upper, start.prices, NEWTON_FULL_STEPS)
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
            boundary = top_k_boundary(q, caps, sub.prices)
        else:
            delta *= 4
    return None, boundary.prices
