"""Client expert capacity k_c: from a simulation profile or a SuperNode's node config."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .settings import CapacitySettings

# The node config's ``capacity`` value that derives K from a memory budget.
AUTO = "auto"


@dataclass(frozen=True)
class CapacityReport:
    """What a node reports about its capacity: K, and the memory budget behind it.

    ``memory_mb`` is the budget (MiB) K was derived from with ``capacity=auto``; None
    when K was declared.
    """

    capacity: int
    memory_mb: float | None = None


def simulated_capacity(capacity: CapacitySettings, partition_id: int, seed: int) -> int:
    """Return k_c of simulated client ``partition_id`` under the configured profile.

    ``constant`` gives ``value``; ``list`` cycles ``values`` over partition ids;
    ``uniform`` draws an integer in ``[low, high]`` seeded by (seed, partition id).
    The schema has checked the profile and that every k_c lies in [1, E].
    """
    if capacity.profile == "constant":
        return int(capacity.value)  # type: ignore[arg-type]
    if capacity.profile == "list":
        values = capacity.values or ()
        return values[partition_id % len(values)]
    low, high = int(capacity.low), int(capacity.high)  # type: ignore[arg-type]
    return int(np.random.default_rng([seed, partition_id]).integers(low, high + 1))


def parse_capacity(value: object, num_experts: int, source: str = "node config") -> int:
    """Return ``value`` as a capacity in [1, E], or raise a ``ValueError`` saying why."""
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(
            f"capacity {value!r} from {source} is not a number; set an integer in "
            f"[1, {num_experts}]"
        ) from None
    if not number.is_integer() or not 1 <= number <= num_experts:
        raise ValueError(
            f"capacity {value!r} from {source} is invalid: a client holds between 1 and "
            f"E={num_experts} experts; set an integer in [1, {num_experts}]"
        )
    return int(number)
