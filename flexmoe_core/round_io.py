"""What a round sends and receives, as plain types, and the error that stops a run.

:class:`RoundPlan` is what the server sends (per participant: its experts and their
arrays), :class:`ClientReply` one client's decoded answer, :class:`RoundResults`
everything that came back, :class:`RoundOutcome` the closed round. The adapter
(``server_app``) turns these into Flower messages and back; the rules of a round are in
:mod:`flexmoe_core.round_state`.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .aggregation import ClientUpdate
from .allocation import Allocation
from .fitness import ExpertFeedback
from .metrics import summarise_evaluations
from .protocol import CLIENT_PHASES
from .records import (
    AllocationRecord,
    Evaluation,
    Loads,
    Participation,
    RoundRecord,
    Timing,
    Traffic,
    Training,
)

NO_REPLY = "no reply within the round timeout"
# Distinct failure reasons quoted when a run stops for lack of accepted updates.
QUOTED_REASONS = 5


class RunFailedError(RuntimeError):
    """The run cannot make progress (e.g. no client's update accepted for N rounds)."""


def evaluates_in(server_round: int, every: int, num_rounds: int) -> bool:
    """Whether a schedule of ``every`` rounds covers ``server_round`` (the last always)."""
    return every > 0 and (server_round % every == 0 or server_round == num_rounds)


@dataclass
class RoundPlan:
    """What the server sends in one round (or in the evaluation after the last one).

    Attributes
    ----------
    round : int
        The round the messages belong to.
    experts : dict of int to list of int
        Each participant's experts, by client key, in key order.
    arrays : dict of int to dict
        Each participant's payload: the backbone and its experts (views of the
        global arrays; not to be modified).
    seed : int
        The round's training seed (each client adds its own offset).
    evaluates : int or None
        The round whose aggregated model the participants evaluate (before training,
        or alone after the last round); None: no evaluation.
    global_test : bool
        Whether that evaluation includes the dataset's global test split.
    allocation : Allocation or None
        The round's allocation; None for the evaluation after the last round.
    available : int
        How many clients could be sampled.
    server_time_s : float
        Time spent planning.
    """

    round: int
    experts: dict[int, list[int]]
    arrays: dict[int, dict[str, np.ndarray]]
    seed: int
    evaluates: int | None
    global_test: bool
    allocation: Allocation | None
    available: int
    server_time_s: float = 0.0
    # Clients left out by the backoff rule (flexmoe_core.backoff): key -> last round out.
    benched: dict[int, int] = field(default_factory=dict)
    # Whether replies must carry the received experts' held-out feedback (fitness.source).
    heldout_feedback: bool = False

    @property
    def trains(self) -> bool:
        """Whether the participants train (False: evaluation only)."""
        return self.allocation is not None


@dataclass
class ClientReply:
    """One client's answer, decoded by the adapter.

    ``evaluation`` maps a split (``local``, ``global``) to (examples, loss, accuracy)
    of the model the client received, measured before it trained;
    ``trained_evaluation`` the same of the model it has just trained (local split).
    ``heldout`` is the per-expert feedback of the received experts on the local
    held-out split (``fitness.source=heldout``).
    """

    key: int
    update: ClientUpdate | None = None
    train_loss: float = math.nan
    train_acc: float = math.nan
    evaluation: dict[str, tuple[int, float, float]] | None = None
    heldout: dict[int, ExpertFeedback] | None = None
    trained_evaluation: dict[str, tuple[int, float, float]] | None = None
    timings: dict[str, float] = field(default_factory=dict)  # protocol.CLIENT_PHASES, s
    claims: dict[str, float] = field(default_factory=dict)  # evaluation counts cut: claimed


@dataclass
class RoundResults:
    """What came back in one round, by client key."""

    replies: list[ClientReply] = field(default_factory=list)
    failures: dict[int, str] = field(default_factory=dict)
    bytes_sent: dict[int, int] = field(default_factory=dict)
    bytes_received: dict[int, int] = field(default_factory=dict)
    wall_time_s: float = 0.0
    server_time_s: float = 0.0  # the adapter's own share (encoding, decoding)
    # Training examples the participants declared when they joined (the roster's):
    # the most their example counts may weigh in the aggregation.
    declared_examples: dict[int, int] = field(default_factory=dict)


@dataclass
class RoundOutcome:
    """The closed round: who was accepted, who failed and why, finished records.

    ``bounded`` says, per accepted client, what the aggregation's bounds cut;
    ``warned`` holds those of them whose claims were cut or whose update was (partly)
    left out, the others were only clipped.
    """

    accepted: list[int]
    failures: dict[int, str]
    finished: list[RoundRecord]
    bounded: dict[int, str] = field(default_factory=dict)
    warned: set[int] = field(default_factory=set)


def claims_of(accepted: list[ClientReply], counted: list[float]) -> dict[str, dict[str, float]]:
    """Return, per client key, the claims that were cut: examples, evaluation counts."""
    claims: dict[str, dict[str, float]] = {}
    for reply, count in zip(accepted, counted, strict=True):
        cut = dict(reply.claims)
        if reply.update is not None and count < reply.update.num_examples:
            cut["train_examples"] = reply.update.num_examples
        if cut:
            claims[str(reply.key)] = cut
    return claims


def round_record(
    plan: RoundPlan,
    results: RoundResults,
    failures: Mapping[int, str],
    accepted: list[ClientReply],
    counted: list[float],
    *,
    strategy: str,
    allocation: AllocationRecord,
    loads: Loads,
) -> RoundRecord:
    """Return a closed round's record (its evaluation comes later: :func:`complete_record`).

    ``accepted`` are the replies whose updates were aggregated, in client-key order,
    ``counted`` their examples as the aggregation counted them; the training figures
    are their averages weighted by those counts.
    """
    updates = [r.update for r in accepted if r.update is not None]
    training = Training(
        trained=summarise_evaluations(
            [r.trained_evaluation for r in accepted if r.trained_evaluation]
        )
    )
    if updates:
        training.loss = float(np.average([r.train_loss for r in accepted], weights=counted))
        training.acc = float(np.average([r.train_acc for r in accepted], weights=counted))
        training.examples = round(sum(counted))
    return RoundRecord(
        round=plan.round,
        strategy=strategy,
        participation=Participation(
            clients_available=plan.available,
            participants=len(plan.experts),
            accepted=len(updates),
            failures={str(k): why for k, why in sorted(failures.items())},
            benched={str(k): u for k, u in sorted(plan.benched.items())} if plan.benched else None,
        ),
        allocation=allocation,
        loads=loads,
        training=training,
        traffic=Traffic(
            sent=sum(results.bytes_sent.values()),
            received=sum(results.bytes_received.values()),
            sent_per_client={str(k): b for k, b in sorted(results.bytes_sent.items())},
            received_per_client={str(k): b for k, b in sorted(results.bytes_received.items())},
        ),
        timing=Timing(
            allocation_s=plan.allocation.solve_time_s if plan.allocation is not None else None,
            server_s=plan.server_time_s + results.server_time_s,
            round_s=results.wall_time_s,
            # Summed over the accepted clients: where their time went, per phase.
            client_phases_s={
                phase: sum(r.timings.get(phase, 0.0) for r in accepted) for phase in CLIENT_PHASES
            },
        ),
    )


def complete_record(
    record: RoundRecord, evaluations: list[dict[str, tuple[int, float, float]]]
) -> RoundRecord:
    """Add the evaluation of the record's aggregated model (by the clients that sent one)."""
    scores = summarise_evaluations(evaluations)
    record.evaluation = Evaluation(**vars(scores), clients=len(evaluations))
    return record


def add_evaluation_traffic(record: RoundRecord, results: RoundResults) -> None:
    """Count an evaluation-only exchange's bytes towards the round whose model it evaluates."""
    traffic = record.traffic
    traffic.sent_per_client = _add_counts(traffic.sent_per_client, results.bytes_sent)
    traffic.sent = sum(traffic.sent_per_client.values())
    traffic.received_per_client = _add_counts(traffic.received_per_client, results.bytes_received)
    traffic.received = sum(traffic.received_per_client.values())


def _add_counts(table: Mapping[str, int] | None, counts: Mapping[int, int]) -> dict[str, int]:
    """Return ``table`` (by client key as text) with ``counts`` added."""
    total = dict(table or {})
    for key, count in counts.items():
        total[str(key)] = total.get(str(key), 0) + count
    return total


def stalled_message(server_round: int, streak: Sequence[Mapping[Any, str]]) -> str:
    """Say that no update was accepted in the rounds of ``streak`` (newest first), and why.

    The distinct reasons are quoted most frequent first, with the clients that gave them.
    """
    reasons: Counter[str] = Counter()
    clients: dict[str, set[int]] = {}
    for failures in streak:
        for key, why in failures.items():
            reasons[why] += 1
            clients.setdefault(why, set()).add(int(key))
    quoted = []
    for why, times in reasons.most_common(QUOTED_REASONS):
        keys = sorted(clients[why])
        shown = ", ".join(map(str, keys[:5])) + (", ..." if len(keys) > 5 else "")
        quoted.append(f"{why!r} ({times} replies; clients {shown})")
    if len(reasons) > QUOTED_REASONS:
        quoted.append(f"and {len(reasons) - QUOTED_REASONS} other reasons")
    first = server_round - len(streak) + 1
    return (
        f"no client update was accepted in {len(streak)} consecutive rounds ({first} to "
        f"{server_round}; faults.max_failed_rounds={len(streak)}): the run stops. The "
        "clients' reasons: " + "; ".join(quoted) + f". Fix the cause and start again (the "
        f"checkpoint, if enabled, holds the state after round {server_round - 1})."
    )
