"""Seeded failure injection for simulations: clients that crash or answer late.

A fault is drawn from (seed, round, client key) only, so a run with the same seed
sees the same crashes and stragglers every time, including after a resume, and the
draw of one client does not depend on which other clients were sampled.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .settings import FaultSettings

# Mixed into the seed so fault draws never coincide with other streams seeded by
# (seed, round) such as participant sampling.
_FAULT_STREAM = 0xFA17


class InjectedCrashError(RuntimeError):
    """Raised by a client that ``faults.crash_prob`` chose to crash this round."""


@dataclass(frozen=True)
class Fault:
    """What happens to one client in one round.

    Attributes
    ----------
    crash : bool
        The client raises before training (the server gets an error reply).
    delay_s : float
        Seconds the client sleeps before answering (0: on time).
    """

    crash: bool = False
    delay_s: float = 0.0


NO_FAULT = Fault()


def validate_faults(faults: Mapping[str, Any]) -> list[str]:
    """Return what is wrong with a ``faults:`` config section (empty if valid)."""
    errors = []
    for key in ("crash_prob", "straggle_prob"):
        value = float(faults.get(key, 0.0))
        if not 0.0 <= value <= 1.0:
            errors.append(f"faults.{key}={value}: must be in [0, 1]")
    if float(faults.get("straggle_s", 0.0)) < 0:
        errors.append(f"faults.straggle_s={faults.get('straggle_s')}: must be >= 0")
    return errors


def draw_fault(faults: FaultSettings, seed: int, server_round: int, client_key: int) -> Fault:
    """Return the fault injected into ``client_key``'s training in ``server_round``.

    Parameters
    ----------
    faults : FaultSettings
        The ``faults.*`` settings: ``crash_prob``, ``straggle_prob``, ``straggle_s``.
        All-zero probabilities inject nothing.
    seed : int
        The run's seed.
    server_round : int
        The round (1-based).
    client_key : int
        The client's stable key (partition id or ``client-id``).

    Returns
    -------
    Fault
        A crash wins over a delay: a crashing client does not also straggle.
    """
    crash_p, straggle_p = faults.crash_prob, faults.straggle_prob
    if crash_p <= 0.0 and straggle_p <= 0.0:
        return NO_FAULT
    # Two uniforms drawn together, so changing one probability does not reshuffle
    # which clients the other one hits.
    crash_u, straggle_u = np.random.default_rng(
        [int(seed), int(server_round), int(client_key), _FAULT_STREAM]
    ).random(2)
    if crash_u < crash_p:
        return Fault(crash=True)
    if straggle_u < straggle_p:
        return Fault(delay_s=faults.straggle_s)
    return NO_FAULT
