"""The cvxpy reference of the FLEX-MoE LP: the readable formulation to extend.

The constraint matrix is that of a bipartite b-matching (totally unimodular), so a
vertex optimum is 0/1; the solution is checked and, if an interior-point solver stopped
inside an optimal face, re-solved with boolean variables. cvxpy is imported only when
this path runs: the flow path (:mod:`.flow`) needs no LP solver.
"""

from __future__ import annotations

import numpy as np

from .problem import LoadBounds, infeasible_assignment_error


def cvxpy_solver_name(solver: str) -> str | None:
    """Return the cvxpy solver for ``strategy.solver``: HiGHS for ``cvxpy`` when installed."""
    import cvxpy as cp

    if solver.lower() == "cvxpy":
        return "HIGHS" if "HIGHS" in cp.installed_solvers() else None
    return solver.upper()


def solve_lp(
    noisy: np.ndarray, caps: np.ndarray, bounds: LoadBounds, solver: str
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
        problem.solve(solver=cvxpy_solver_name(solver))
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
