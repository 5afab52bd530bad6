"""The server's side of a FLEX-MoE run, without Flower: plan a round, close it, remember.

:class:`RoundState` holds what the server knows between rounds (the global backbone
and experts, the fitness table, the load deficit, the cumulative loads and the
per-round records) and speaks client keys only; turning them into messages is the
adapter's job (``server_app/strategy.py``).

Round t:

1. :meth:`RoundState.plan` samples the participants among the available keys (seeded
   by the seed and t), allocates experts over their fitness rows and capacities, and
   gives each participant its payload: the backbone and its experts. If round t-1's
   record waits for its evaluation, the plan asks every participant to first evaluate
   what it receives (the aggregated model of round t-1 with its own gate), so each
   participant downloads the model once per round.
2. :meth:`RoundState.close` checks each reply, aggregates the accepted updates in
   client-key order (float sums depend on order: a run repeats bit for bit), updates
   the fitness table, completes round t-1's record with the evaluations and makes the
   record of round t. A record is *finished* (ready for ``metrics.jsonl``) once its
   evaluation is in; the last round's comes from :meth:`final_evaluation`.

Aggregation bounds every client's influence (:func:`~flexmoe_core.aggregation.aggregate_bounded`,
``aggregation.*``), or, with ``privacy.enabled``, clips and noises the updates
(:func:`~flexmoe_core.privacy.private_aggregate`, noise seeded by the seed and the
round: a resumed run draws the same noise). A run in which no update is accepted for
``faults.max_failed_rounds`` consecutive rounds stops with :class:`RunFailedError`,
quoting the clients' reasons, before that round changes any state.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from .aggregation import AggregationPolicy, ClientUpdate, aggregate_bounded, bounded_counts
from .allocation import make_allocator, oracle_fitness, update_deficit
from .backoff import BackoffPolicy, benched, leave_out
from .checkpoint import ServerCheckpoint
from .data.groups import ClientGroups, groups_of
from .fitness import FitnessTable, relative_signals
from .metrics import LoadTracker, assignment_nmi, assignment_purity, churn
from .model import split_expert_key
from .privacy import PrivacyPolicy, epsilon, private_aggregate
from .records import (
    AllocationRecord,
    RoundRecord,
    RunSummary,
    Trust,
)
from .reply_gate import EvaluationCaps
from .results import run_status
from .round_io import (
    NO_REPLY,
    ClientReply,
    RoundOutcome,
    RoundPlan,
    RoundResults,
    RunFailedError,
    add_evaluation_traffic,
    claims_of,
    complete_record,
    evaluates_in,
    round_record,
    stalled_message,
)
from .settings import Settings

__all__ = [
    "NO_REPLY",
    "ClientReply",
    "RoundOutcome",
    "RoundPlan",
    "RoundResults",
    "RoundState",
    "RunFailedError",
    "evaluates_in",
]

# Third word of the DP noise's seed ([seed, round, DP_STREAM]): a stream of its own,
# apart from the sampling's ([seed, round]).
DP_STREAM = 0xD1FF


class RoundState:
    """Everything the server knows between rounds, and the rules of a round.

    Parameters
    ----------
    settings : Settings
        The run's typed settings.
    initial_arrays : dict of str to ndarray
        The global backbone and all experts of round 0.
    """

    def __init__(self, settings: Settings, initial_arrays: Mapping[str, np.ndarray]) -> None:
        self.settings = settings
        self.num_experts = settings.model.num_experts
        self.allocator = make_allocator(settings.strategy)
        fitness = settings.fitness
        self.fitness = FitnessTable(
            self.num_experts,
            q0=fitness.q0,
            beta=fitness.beta,
            signal=fitness.signal,
            alpha=fitness.alpha,
            cold_start=fitness.cold_start,
            decay=fitness.decay,
        )
        self.heldout_fitness = fitness.source == "heldout"
        self.relative_fitness = fitness.relative
        self.switching_cost = settings.strategy.switching_cost
        # Each client's experts when it last trained: the switching cost's "holds now",
        # and what churn is measured against.
        self.holding: dict[int, list[int]] = {}
        self.groups: ClientGroups | None = None  # see set_federation_size
        self.backoff = BackoffPolicy.from_settings(settings.faults)
        self.global_arrays = dict(initial_arrays)
        self.policy = AggregationPolicy.from_settings(settings.aggregation, settings.model.top_k)
        self.privacy = PrivacyPolicy.from_settings(settings.privacy)
        self.deficit = np.zeros(self.num_experts)
        self.loads = LoadTracker(self.num_experts)
        self.history: list[RoundRecord] = []  # finished records
        self.pending: RoundRecord | None = None  # the last record, awaiting evaluation
        self.completed_round = 0
        self.expert_bytes = [
            sum(
                v.nbytes
                for n, v in initial_arrays.items()
                if (key := split_expert_key(n)) is not None and key[0] == e
            )
            for e in range(self.num_experts)
        ]

    def set_federation_size(self, num_partitions: int | None) -> None:
        """Take the simulated federation's size: with ``partition.groups``, the groups.

        Raises
        ------
        ValueError
            If ``strategy=oracle`` and the federation has no groups to be right about.
        """
        if num_partitions is not None:
            self.groups = ClientGroups.from_settings(self.settings.partition.groups, num_partitions)
        if self.allocator.name == "oracle" and self.groups is None:
            raise ValueError(
                "strategy=oracle needs a simulated federation with known groups: set "
                "partition.groups.count=G (or partition.groups.sizes=[...])"
            )

    # --------------------------------------------------------------- planning
    def sample(self, server_round: int, available: Iterable[int]) -> list[int]:
        """Return the round's participants: ``fraction_train`` of the available keys."""
        keys = sorted(available)
        size = max(
            self.settings.min_clients_per_round, round(self.settings.fraction_train * len(keys))
        )
        size = min(size, len(keys))
        picked = self._rng(server_round).choice(len(keys), size=size, replace=False)
        return [keys[i] for i in sorted(picked)]

    def _rng(self, server_round: int) -> np.random.Generator:
        return np.random.default_rng([self.settings.seed, server_round])

    def payload(self, experts: Iterable[int]) -> dict[str, np.ndarray]:
        """Return the backbone and the given experts of the global arrays."""
        held = set(experts)
        return {
            name: value
            for name, value in self.global_arrays.items()
            if (key := split_expert_key(name)) is None or key[0] in held
        }

    def plan(self, server_round: int, capacities: Mapping[int, int]) -> RoundPlan:
        """Sample among ``capacities``' keys (the available clients) and allocate experts.

        Clients the backoff rule benches (failed rounds in a row) are not sampled.
        """
        start = time.perf_counter()
        bench = benched(self.records(), server_round, self.backoff)
        capacities, left_out = leave_out(capacities, bench, self.settings.min_clients_per_round)
        participants = self.sample(server_round, capacities)
        caps = np.array([capacities[k] for k in participants])
        if self.allocator.name == "oracle":
            fitness = oracle_fitness(groups_of(self.groups, participants), caps, self.num_experts)
        else:
            fitness = self.fitness.rows(participants)
            for row, key in zip(fitness, participants, strict=True):
                row[self.holding.get(key, [])] += self.switching_cost
        allocation = self.allocator(fitness, caps, self.deficit, self._rng(server_round))
        experts = {
            key: np.flatnonzero(row).tolist()
            for key, row in zip(participants, allocation.assignment, strict=True)
        }
        evaluates = None if self.pending is None else self.pending.round
        return RoundPlan(
            round=server_round,
            experts=experts,
            arrays={key: self.payload(e) for key, e in experts.items()},
            seed=self.settings.seed * 100_003 + server_round,
            evaluates=evaluates,
            global_test=evaluates is not None and self._global_test(evaluates),
            allocation=allocation,
            available=len(capacities),
            server_time_s=time.perf_counter() - start,
            benched=left_out,
            heldout_feedback=self.heldout_fitness,
        )

    def _global_test(self, server_round: int) -> bool:
        every = self.settings.evaluate.global_every
        return evaluates_in(server_round, every, self.settings.num_rounds)

    def final_evaluation(self) -> RoundPlan | None:
        """Return the evaluation of the last round's model, if its record waits for one.

        It goes to the clients accepted in that round, with the experts they held.
        """
        if self.pending is None:
            return None
        record = self.pending
        failures = record.participation.failures or {}
        experts = {
            int(k): list(v)
            for k, v in (record.allocation.assignment or {}).items()
            if k not in failures
        }
        experts = dict(sorted(experts.items()))
        return RoundPlan(
            round=record.round,
            experts=experts,
            arrays={key: self.payload(e) for key, e in experts.items()},
            seed=self.settings.seed * 100_003 + record.round,
            evaluates=record.round,
            global_test=self._global_test(record.round),
            allocation=None,
            available=len(experts),
        )

    # ---------------------------------------------------------------- closing
    def close(self, plan: RoundPlan, results: RoundResults) -> RoundOutcome:
        """Aggregate the round, update fitness and loads, and make its record.

        A participant that failed, did not reply or sent a reply that
        :func:`~flexmoe_core.reply_gate.judge_reply` rejected is left out: its experts
        keep their values unless another holder returned them, its fitness row is
        untouched, and its evaluation is not counted.

        Raises
        ------
        RunFailedError
            If no update is accepted in this round and the ``faults.max_failed_rounds
            - 1`` before it; the state is left as it was after the previous round.
        """
        if not plan.trains:
            return RoundOutcome([], dict(results.failures), self._close_evaluation(results))
        start = time.perf_counter()
        failures = {k: why for k, why in results.failures.items() if k in plan.experts}
        # The replies were judged by flexmoe_core.reply_gate: what reaches here is whole.
        accepted = [
            r
            for r in sorted(results.replies, key=lambda r: r.key)
            if r.key in plan.experts and r.key not in failures and r.update is not None
        ]
        done = set(failures) | {r.key for r in accepted}
        failures.update({k: NO_REPLY for k in plan.experts if k not in done})
        if not accepted:
            self._stop_if_stalled(plan.round, failures)
        updates = [r.update for r in accepted if r.update is not None]
        trust, warned = self._aggregate(plan.round, updates, results.declared_examples)
        self._update_fitness(accepted)
        # What the clients' counts may weigh (claims beyond it are cut): the record
        # stores the counted figures, and the claims beside them where they were cut.
        counted, usages = bounded_counts(updates, self.policy, results.declared_examples)
        routed = np.zeros(self.num_experts)
        for usage in usages:
            for expert, value in usage.items():
                routed[expert] += value
        trust.claims = claims_of(accepted, counted) or None
        assert plan.allocation is not None
        self.deficit = update_deficit(self.deficit, plan.allocation.assignment)
        finished = []
        if self.pending is not None:
            evaluations = [r.evaluation for r in accepted if r.evaluation]
            finished.append(complete_record(self.pending, evaluations))
            self.pending = None
        record = self._record(plan, results, failures, accepted, routed, counted)
        record.trust = trust
        self.holding.update({r.key: plan.experts[r.key] for r in accepted})
        record.timing.server_s = (record.timing.server_s or 0.0) + time.perf_counter() - start
        every = self.settings.evaluate.every
        if evaluates_in(plan.round, every, self.settings.num_rounds):
            self.pending = record
        else:
            finished.append(record)
        self.history.extend(finished)
        self.completed_round = plan.round
        if self.privacy is not None:
            record.trust.dp_epsilon = self.dp_epsilon(self.records())
        bounded = {int(k): why for k, why in (trust.bounded or {}).items()}
        return RoundOutcome(
            [r.key for r in accepted], dict(sorted(failures.items())), finished, bounded, warned
        )

    def evaluation_caps(self, declared_examples: int | None) -> EvaluationCaps:
        """Return the most samples a client that declared ``declared_examples`` can evaluate."""
        return EvaluationCaps.for_client(
            declared_examples,
            self.settings.partition.local_test_fraction,
            self.settings.evaluate.global_max_samples,
        )

    def _update_fitness(self, accepted: list[ClientReply]) -> None:
        """Feed the round's signals into the fitness table (see ``fitness.*``)."""
        signals = {}
        for reply in accepted:
            assert reply.update is not None
            feedback = reply.heldout if self.heldout_fitness else reply.update.feedback
            assert feedback is not None
            signals[reply.key] = self.fitness.signals(feedback)
        if self.relative_fitness:
            signals = relative_signals(signals)
        for key, row in signals.items():
            self.fitness.update_signals(key, row)
            self.fitness.decay(key, measured=row.keys())

    def _aggregate(
        self, server_round: int, updates: list[ClientUpdate], declared: Mapping[int, int]
    ) -> tuple[Trust, set[int]]:
        """Replace the global arrays by the round's aggregate; say what limited the clients.

        ``bounded``: what the bounds cut, per client key (only when they cut); with
        privacy, ``dp_noise_std``: the noise std on each released group's average. The
        set: the clients whose claims were cut or whose update was left out.
        """
        if self.privacy is not None:
            rng = np.random.default_rng([self.settings.seed, server_round, DP_STREAM])
            private = private_aggregate(self.global_arrays, updates, self.privacy, rng)
            self.global_arrays = private.arrays
            return Trust(dp_noise_std={str(g): s for g, s in private.noise_std.items()}), set()
        result = aggregate_bounded(self.global_arrays, updates, self.policy, declared)
        self.global_arrays = result.arrays
        report = result.report
        if not (clients := report.clients()):
            return Trust(), set()
        warned = {c for c in clients if not report.routine(c)}
        return Trust(bounded={str(c): report.describe(c) for c in clients}), warned

    def _stop_if_stalled(self, server_round: int, failures: Mapping[int, str]) -> None:
        """Stop the run if this round ends ``max_failed_rounds`` without an accepted update.

        ``faults.max_failed_rounds=0``: never.
        """
        limit = self.settings.faults.max_failed_rounds
        streak: list[Mapping[Any, str]] = [failures]
        for record in reversed(self.records()):
            accepted = record.participation.accepted
            if len(streak) >= limit or accepted is None or accepted > 0:
                break
            streak.append(record.participation.failures or {})
        if limit <= 0 or len(streak) < limit:
            return
        raise RunFailedError(stalled_message(server_round, streak))

    def dp_epsilon(self, records: Sequence[RoundRecord]) -> float:
        """Return epsilon after the training rounds of ``records`` (privacy enabled).

        The sampling rate q is the largest share of available clients any of those
        rounds sampled (the accountant takes one q; a larger one is conservative).
        """
        assert self.privacy is not None
        rates = [
            (r.participation.participants or 0) / max(r.participation.clients_available or 0, 1)
            for r in records
        ]
        rate = min(max(rates, default=1.0), 1.0)
        return epsilon(self.privacy.noise_multiplier, rate, len(records), self.privacy.delta)

    def _close_evaluation(self, results: RoundResults) -> list[RoundRecord]:
        if self.pending is None:
            return []
        record = self.pending
        add_evaluation_traffic(record, results)
        evaluations = [
            r.evaluation
            for r in sorted(results.replies, key=lambda r: r.key)
            if r.evaluation and r.key not in results.failures
        ]
        self.pending = None
        finished = [complete_record(record, evaluations)]
        self.history.extend(finished)
        return finished

    def _record(
        self,
        plan: RoundPlan,
        results: RoundResults,
        failures: Mapping[int, str],
        accepted: list[ClientReply],
        routed: np.ndarray,
        counted: list[float],
    ) -> RoundRecord:
        """Make the round's record: the state's figures here, the replies' in round_io."""
        allocation = plan.allocation
        assert allocation is not None
        purity = nmi = None
        if self.groups is not None:
            groups = groups_of(self.groups, list(plan.experts))
            purity = assignment_purity(allocation.assignment, groups)
            nmi = assignment_nmi(allocation.assignment, groups)
        return round_record(
            plan,
            results,
            failures,
            accepted,
            counted,
            strategy=self.allocator.name,
            allocation=AllocationRecord(
                assignment={str(k): e for k, e in plan.experts.items()},
                objective=allocation.objective,
                method=allocation.method,
                deficit=self.deficit.tolist(),
                purity=purity,
                nmi=nmi,
                **churn(plan.experts, self.holding, self.expert_bytes),
            ),
            loads=self.loads.record(allocation.assignment.sum(axis=0), routed),
        )

    # ------------------------------------------------------------- checkpoint
    def checkpoint(self, capacities: Mapping[int, int]) -> ServerCheckpoint:
        """Return the state after the last closed round (``capacities``: the roster's)."""
        table = self.fitness.state()
        ids, values = table["client_ids"], table["values"]
        return ServerCheckpoint(
            round=self.completed_round,
            global_arrays=dict(self.global_arrays),
            fitness={int(k): np.asarray(v, dtype=float) for k, v in zip(ids, values, strict=True)},  # type: ignore[call-overload]
            deficit=self.deficit.copy(),
            loads=self.loads.state(),
            history=list(self.history),
            pending=copy.deepcopy(self.pending),
            capacities=dict(capacities),
            config=self.settings.to_dict(),
            memory={
                "holding": {str(k): v for k, v in sorted(self.holding.items())},
                "fitness_start": dict(zip(map(str, ids), table["start"], strict=True)),  # type: ignore[call-overload]
                "fitness_measured": dict(zip(map(str, ids), table["measured"], strict=True)),  # type: ignore[call-overload]
            },
        )

    def restore(self, checkpoint: ServerCheckpoint) -> None:
        """Take over an interrupted run's state (fitness rows stay keyed by client key)."""
        self.global_arrays = {k: v.copy() for k, v in checkpoint.global_arrays.items()}
        self.deficit = np.asarray(checkpoint.deficit, dtype=float).copy()
        self.loads.load_state(checkpoint.loads)
        self.history = list(checkpoint.history)
        self.pending = copy.deepcopy(checkpoint.pending)
        keys = sorted(checkpoint.fitness)
        memory = checkpoint.memory
        self.fitness.load_state(
            {
                "client_ids": keys,
                "values": np.reshape(
                    [checkpoint.fitness[k] for k in keys], (len(keys), self.num_experts)
                ),
                "start": _rows_by_key(memory.get("fitness_start"), keys),
                "measured": _rows_by_key(memory.get("fitness_measured"), keys),
            }
        )
        self.holding = {int(k): list(v) for k, v in memory.get("holding", {}).items()}
        self.completed_round = int(checkpoint.round)

    # ---------------------------------------------------------------- summary
    def records(self) -> list[RoundRecord]:
        """Return every record so far, the one awaiting its evaluation last."""
        return self.history + ([self.pending] if self.pending is not None else [])

    def summary(self, capacities: Mapping[int, int], error: str | None = None) -> dict[str, Any]:
        """Return the run's closing figures, fitness table and cumulative loads.

        ``status`` is ``completed``, or ``failed`` with ``error`` when one is given: a
        script reads it to tell a failed run (``flwr run`` exits 0 either way).
        """
        records = self.records()
        privacy = {}
        if self.privacy is not None:
            privacy = {
                "dp_epsilon": self.dp_epsilon(records),
                "dp_delta": self.privacy.delta,
                "dp_noise_multiplier": self.privacy.noise_multiplier,
                "dp_clip_norm": self.privacy.clip_norm,
            }
        return {
            **run_status(error),
            **privacy,
            "strategy": self.allocator.name,
            "rounds": len(records),
            "clients": len(capacities),
            **RunSummary.from_records(records).to_json(),
            "capacities": {str(k): c for k, c in sorted(capacities.items())},
            "fitness": self.fitness.state(),
            "cumulative_loads": self.loads.state(),
        }


def _rows_by_key(rows: Mapping[str, Any] | None, keys: Sequence[int]) -> list[Any] | None:
    """Return ``rows`` (by client key as text) in the order of ``keys``; None if absent."""
    if rows is None or any(str(k) not in rows for k in keys):
        return None
    return [rows[str(k)] for k in keys]
