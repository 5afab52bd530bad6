"""The FLEX-MoE allocator: the load-balanced LP, solved exactly by flow or by cvxpy."""

from __future__ import annotations

import time

import numpy as np

from .flow import solve_flow
from .lp import solve_lp
from .problem import (
    Allocation,
    assignment_objective,
    check_feasible,
    check_inputs,
    load_bounds,
    tie_break,
    verify_assignment,
)


class FlexAllocator:
    """The FLEX-MoE assignment: the load-balanced LP, solved exactly.

    maximise sum Q x  s.t.  sum_e x_ce = k_c,  L_e <= sum_c x_ce <= U_e,  0 <= x <= 1.

    Two solvers give the same optimum on the same tie-broken Q:

    * the **flow** path (:func:`flexmoe_core.allocation.flow.solve_flow`), a min-cost
      flow on the E experts: a fraction of a second for 1e5 clients x 64 experts,
      except when clients form tight look-alike groups (README "Allocation at scale");
    * the **cvxpy** reference (:func:`flexmoe_core.allocation.lp.solve_lp`), the
      readable formulation to extend (extra constraints, other objectives).

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
        noisy = tie_break(fitness, self.tie_noise, rng)
        if self.uses_flow:
            assignment, method = solve_flow(noisy, caps, bounds).assignment, "flow"
        else:
            assignment, method = solve_lp(noisy, caps, bounds, self.solver)
        verify_assignment(assignment, caps, bounds)
        return Allocation(
            assignment,
            assignment_objective(fitness, assignment),
            time.perf_counter() - start,
            f"{self.name}-{method}",
            bounds,
        )
