"""The assignment as a pseudo-flow on the compressed residual graph of E + 1 nodes.

The repair (successive shortest paths) and the certificate (no negative cycle) steps of
:func:`flexmoe_core.allocation.flow.solve_flow` work here: nodes are the experts plus
one slack node, arcs the cheapest swap of one client between two experts.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from itertools import pairwise

import numpy as np
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import dijkstra

from .problem import LoadBounds, infeasible_assignment_error

# Dijkstra's predecessor of a source node (scipy.sparse.csgraph convention).
_NO_PRED = -9999


class ResidualFlow:
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
