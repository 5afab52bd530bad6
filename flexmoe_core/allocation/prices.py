"""Expert prices for the flow solver: the dual warm start and Newton steps.

Under prices p every client holds its top-k_c experts by Q - p; the solver of
:mod:`flexmoe_core.allocation.flow` looks for prices under which those loads meet the
bounds. Coordinate descent on the LP dual (:func:`warm_prices`) and Newton steps on the
load equations (:func:`newton_prices`) find them; any prices give a correct result,
good ones leave less work to the repair of :mod:`flexmoe_core.allocation.residual`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Share of the clients, those of smallest margin, whose price gaps estimate how load
# moves with prices.
NEWTON_WINDOW_SHARE = 0.1
# Lengths of the Newton step tried at each iteration (the best is kept).
NEWTON_LENGTHS = (1.0,)


@dataclass
class Boundary:
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
        """Return each client's gap between its k-th and (k+1)-th best reduced values."""
        return self.kth - self.after


def top_k_boundary(q: np.ndarray, caps: np.ndarray, prices: np.ndarray) -> Boundary:
    """Return each client's top-k under ``prices`` with its margin and the loads."""
    reduced = q - prices
    kth, after = kth_largest(reduced, caps)
    held = reduced >= kth[:, None]
    # Ties at the k-th value (margin 0) are left to the flow: top_k breaks them.
    if (held.sum(axis=1) != caps).any():
        held = top_k(reduced, caps)
    return Boundary(prices, reduced, held, held.sum(axis=0), kth, after)


def _load_error(load: np.ndarray, lower: np.ndarray, upper: np.ndarray) -> np.ndarray:
    return load - np.clip(load, lower, upper)


def _newton_step(
    boundary: Boundary, error: np.ndarray, num_experts: int, window_share: float
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


def newton_prices(
    q: np.ndarray,
    caps: np.ndarray,
    lower: np.ndarray,
    upper: np.ndarray,
    start: np.ndarray,
    steps: int,
) -> tuple[Boundary, int]:
    """Return the best boundary Newton steps reach from ``start``, and its load error.

    Each step tries the Newton step at the lengths :data:`NEWTON_LENGTHS` and keeps the
    best (the window's density estimate is biased, so the full step is not always
    right); the steps stop when none reduces the load error.
    """
    num_experts = q.shape[1]
    best = top_k_boundary(q, caps, start)
    error = _load_error(best.load, lower, upper)
    best_error = float(np.abs(error).sum())
    for _ in range(steps):
        if best_error == 0:
            break
        step = _newton_step(best, error.astype(float), num_experts, NEWTON_WINDOW_SHARE)
        improved = False
        for length in NEWTON_LENGTHS:
            trial = top_k_boundary(q, caps, best.prices + length * step)
            trial_error = _load_error(trial.load, lower, upper)
            if (size := float(np.abs(trial_error).sum())) < best_error:
                best, error, best_error, improved = trial, trial_error, size, True
        if not improved:
            break
    return best, round(best_error)


def kth_largest(values: np.ndarray, caps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return per row the k_c-th and (k_c+1)-th largest values (-inf if k_c = E)."""
    n, num_experts = values.shape
    # A full row sort is SIMD-vectorised in NumPy and beats a row-wise partition.
    ordered = np.sort(values, axis=1)
    rows, position = np.arange(n), num_experts - caps
    kth = ordered[rows, position]
    after = np.where(caps < num_experts, ordered[rows, np.maximum(position - 1, 0)], -np.inf)
    return kth, after


def top_k(values: np.ndarray, caps: np.ndarray) -> np.ndarray:
    """Return the bool assignment holding each row's k_c largest values."""
    kth, _ = kth_largest(values, caps)
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


def warm_prices(
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
    kth, after = kth_largest(q - prices, caps)

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
                kth[touched], after[touched] = kth_largest(q[touched] - prices, caps[touched])
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
