"""The allocation strategies by name: one table for the schema, the factory and the report.

Importing this module loads no solver (each builder imports its allocator when it is
called): the config schema reads the names on the client's path too, and the client
install has no scipy.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..settings import StrategySettings
    from .problem import Allocator


@dataclass(frozen=True)
class Strategy:
    """One allocation strategy: its ``strategy.name`` and what builds its allocator.

    ``build`` takes the ``strategy`` settings and its tie-breaking noise scale.
    ``holds_all_experts`` marks a strategy whose clients hold every expert rather than
    k_c of E (its loads would set the scale of the load heatmaps).
    """

    name: str
    build: Callable[[StrategySettings, float], Allocator]
    holds_all_experts: bool = False


def _flexmoe(strategy: StrategySettings, tie_noise: float) -> Allocator:
    from .flex import FlexAllocator

    return FlexAllocator(
        strategy.epsilon,
        strategy.solver,
        tie_noise,
        strategy.deficit_rule,
    )


def _oracle(strategy: StrategySettings, tie_noise: float) -> Allocator:
    from .baselines import OracleAllocator

    return OracleAllocator(tie_noise)


def _greedy(strategy: StrategySettings, tie_noise: float) -> Allocator:
    from .baselines import GreedyAllocator

    return GreedyAllocator(tie_noise)


def _random(strategy: StrategySettings, tie_noise: float) -> Allocator:
    from .baselines import RandomAllocator

    return RandomAllocator()


def _expert_choice(strategy: StrategySettings, tie_noise: float) -> Allocator:
    from .baselines import ExpertChoiceAllocator

    return ExpertChoiceAllocator(tie_noise)


def _dense(strategy: StrategySettings, tie_noise: float) -> Allocator:
    from .baselines import DenseAllocator

    return DenseAllocator()


# In reading order: the method, its known-right reference, the baselines, the
# no-constraint bound. Reports list strategies in this order.
STRATEGIES: dict[str, Strategy] = {
    s.name: s
    for s in (
        Strategy("flexmoe", _flexmoe),
        Strategy("oracle", _oracle),
        Strategy("greedy", _greedy),
        Strategy("random", _random),
        Strategy("expert_choice", _expert_choice),
        Strategy("dense", _dense, holds_all_experts=True),
    )
}
STRATEGY_NAMES: tuple[str, ...] = tuple(STRATEGIES)
ALL_EXPERTS_STRATEGY_NAMES: tuple[str, ...] = tuple(
    s.name for s in STRATEGIES.values() if s.holds_all_experts
)


def make_allocator(strategy: StrategySettings) -> Allocator:
    """Return the allocator named by ``strategy.name`` (the schema checked the name)."""
    return STRATEGIES[strategy.name].build(strategy, strategy.tie_noise)
