"""Backoff: a client that keeps failing is left out of the sampling for a while.

A device that runs out of memory, loses its network or crashes in every round would
otherwise be sampled again each round, cost the round its share of the experts and
hold up the round until its timeout. Rule (``faults.backoff_*``):

* a client that failed ``backoff_after`` (R) rounds in a row in which it was sampled
  is left out of the next ``backoff_rounds`` rounds;
* each further time it is left out without an accepted update in between, the pause
  doubles, up to ``backoff_max_rounds``;
* one accepted update clears its record.

Who is left out is computed from the round records alone (their ``assignment`` and
``failures``), not from state of its own: a resumed run leaves out the same clients as
an uninterrupted one. A round's record lists the clients left out of it under
``benched`` (client key -> last round of the pause).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from .records import RoundRecord
from .settings import FaultSettings


@dataclass(frozen=True)
class BackoffPolicy:
    """The backoff rule's settings (``faults.backoff_*``); ``after=0`` turns it off."""

    after: int = 3
    rounds: int = 1
    max_rounds: int = 16

    @classmethod
    def from_settings(cls, faults: FaultSettings) -> BackoffPolicy:
        """Read ``faults.backoff_after``, ``backoff_rounds`` and ``backoff_max_rounds``."""
        return cls(faults.backoff_after, faults.backoff_rounds, faults.backoff_max_rounds)


def benched(
    records: Iterable[RoundRecord], server_round: int, policy: BackoffPolicy
) -> dict[int, int]:
    """Return the clients left out of ``server_round``: client key -> last round left out.

    ``records`` are the run's round records before ``server_round`` (any order).
    """
    if policy.after <= 0:
        return {}
    streak: dict[int, int] = {}  # consecutive failed rounds
    pauses: dict[int, int] = {}  # pauses since the last accepted update
    until: dict[int, int] = {}
    for record in sorted(records, key=lambda r: r.round):
        r, assignment = record.round, record.allocation.assignment
        if r >= server_round or assignment is None:
            continue
        failures = record.participation.failures or {}
        for key in map(int, assignment):
            if str(key) not in failures:
                streak[key] = pauses[key] = 0
                continue
            streak[key] = streak.get(key, 0) + 1
            if streak[key] >= policy.after:
                pauses[key] = pauses.get(key, 0) + 1
                length = min(policy.rounds * 2 ** (pauses[key] - 1), policy.max_rounds)
                until[key] = r + length
                streak[key] = 0
    return {k: u for k, u in sorted(until.items()) if u >= server_round}


def leave_out(
    capacities: Mapping[int, int], bench: Mapping[int, int], minimum: int
) -> tuple[dict[int, int], dict[int, int]]:
    """Return (the capacities of the clients to sample from, the clients left out).

    If leaving every benched client out would leave fewer than ``minimum`` clients,
    those whose pause ends soonest are let back in first (a round needs its minimum).
    """
    out = {k: u for k, u in bench.items() if k in capacities}
    for key in sorted(out, key=lambda k: (out[k], k)):
        if len(capacities) - len(out) >= minimum:
            break
        del out[key]
    return {k: c for k, c in capacities.items() if k not in out}, out
