"""Expert allocation: the FLEX-MoE LP and the baselines it is judged against.

Every allocator maps (fitness Q of the round's participants, capacities k_c, the
experts' historical load deficit H) to a 0/1 assignment X of shape (clients, E).

* :mod:`.problem`: the inputs, load bounds, checks, errors and the result;
* :mod:`.flex`: the FLEX-MoE allocator, solved by :mod:`.flow` (exact min-cost flow,
  with :mod:`.prices` and :mod:`.residual`) or :mod:`.lp` (the cvxpy reference);
* :mod:`.baselines`: greedy, random, dense, expert-choice and the oracle;
* :mod:`.registry`: the strategies by name and :func:`make_allocator`.

The names below load on first use: the config schema reads :mod:`.registry` on the
client's path, where scipy (which the flow solver needs) is not installed.
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> submodule that defines it
_EXPORTS = {
    "Allocation": "problem",
    "Allocator": "problem",
    "InfeasibleAllocationError": "problem",
    "LoadBounds": "problem",
    "check_feasible": "problem",
    "load_bounds": "problem",
    "update_deficit": "problem",
    "validate_capacities": "problem",
    "verify_assignment": "problem",
    "FlowSolution": "flow",
    "solve_flow": "flow",
    "FlexAllocator": "flex",
    "DenseAllocator": "baselines",
    "ExpertChoiceAllocator": "baselines",
    "GreedyAllocator": "baselines",
    "OracleAllocator": "baselines",
    "RandomAllocator": "baselines",
    "oracle_fitness": "baselines",
    "STRATEGIES": "registry",
    "STRATEGY_NAMES": "registry",
    "make_allocator": "registry",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """Import the submodule that defines ``name`` on first use, then keep the name here."""
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """List the lazily loaded names too."""
    return sorted({*globals(), *__all__})
