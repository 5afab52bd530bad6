"""FLEX-MoE as a Flower strategy: the round loop around the core's round state.

The decisions (sampling, allocation, checks, aggregation, fitness, records) are in
:class:`flexmoe_core.round_state.RoundState`; who holds which client key is in
:mod:`server_app.membership`; messages are built and read in :mod:`server_app.codec`.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy
from flwr.supercore import log
from threadpoolctl import threadpool_limits

from flexmoe_core import protocol as proto
from flexmoe_core.checkpoint import ServerCheckpoint, save_checkpoint
from flexmoe_core.records import TIMING_KEYS, RoundRecord, headline
from flexmoe_core.results import RunRecorder, run_status
from flexmoe_core.roster import Roster
from flexmoe_core.round_state import RoundOutcome, RoundPlan, RoundResults, RoundState
from flexmoe_core.settings import Settings

from .codec import (
    NODE_UNAVAILABLE,
    Encoder,
    decode_reply,
    error_reason,
    record_bytes,
    result_from_records,
    to_array_record,
)
from .membership import Membership

__all__ = ["TIMING_KEYS", "FlexMoEStrategy", "error_reason", "to_array_record"]


class FlexMoEStrategy(Strategy):
    """Assigns each client a subset of experts every round and aggregates per expert.

    Before round 1 the strategy asks every node for its capacity and client key (a
    ``query`` message); nodes that connect later are asked when they appear and join
    the sampling from the next round. Each round it samples participants among the
    clients available, allocates experts over their fitness rows, and sends each one
    message: the backbone and its experts. The client evaluates what it received (the
    previous round's aggregated model) and then trains; the strategy aggregates the
    backbone over all replies and each expert over its holders, and updates the
    fitness table. After the last round the participants evaluate the final model.

    Parameters
    ----------
    settings : Settings
        The run's typed settings (``conf/``).
    recorder : RunRecorder, optional
        Where finished round records, the final model and the summary are written.
    checkpoint_path : Path, optional
        Where the server state is written (atomically) after every round.
    resume : ServerCheckpoint, optional
        State of an interrupted run: :meth:`start` restores it after discovering the
        clients and continues with the next round.
    """

    def __init__(
        self,
        settings: Settings,
        recorder: RunRecorder | None = None,
        checkpoint_path: Path | None = None,
        resume: ServerCheckpoint | None = None,
    ) -> None:
        self.settings, self.recorder = settings, recorder
        self.checkpoint_path, self.resume = checkpoint_path, resume
        self.roster = Roster(
            settings.model.num_experts,
            known=None if resume is None else resume.capacities,
            rebind_grace_s=settings.timeouts.rebind_grace_s,
        )
        self.run_config = settings.plain_json
        self.membership = Membership(settings, self.roster, self.run_config)
        self.state: RoundState | None = None
        self.plan: RoundPlan | None = None
        self.outcome: RoundOutcome | None = None  # the last training round's
        self._outbox: list[Message] = []  # this round's messages, in plan.experts order
        self._results = RoundResults()
        self._grid: Grid | None = None
        self._began = 0.0

    def summary(self) -> None:
        """Log the strategy's configuration."""
        settings, fit = self.settings, self.settings.fitness
        fitness = f"{fit.source} {fit.signal}{', relative' if fit.relative else ''}"
        log(
            INFO,
            f"FlexMoEStrategy: strategy={settings.strategy.name}, "
            f"E={settings.model.num_experts}, top-k={settings.model.top_k}, fitness {fitness} "
            f"(beta={fit.beta}, q0={fit.q0}), switching cost {settings.strategy.switching_cost}",
        )

    @property
    def global_arrays(self) -> dict[str, Any]:
        """The current global backbone and experts."""
        assert self.state is not None
        return self.state.global_arrays

    @property
    def history(self) -> list[RoundRecord]:
        """Every round record so far (the last may still wait for its evaluation)."""
        return [] if self.state is None else self.state.records()

    # ------------------------------------------------------------- messages
    def _messages(self, plan: RoundPlan, grid: Grid) -> list[Message]:
        start = time.perf_counter()
        self.plan, self._outbox, self._grid = plan, [], grid
        self._results = RoundResults(declared_examples=self.roster.declared_examples(plan.experts))
        encoder = Encoder(plan, self.run_config)
        for key in plan.experts:
            message, size = encoder.message(key, int(self.roster.holder_of(key)))  # type: ignore[arg-type]
            self._results.bytes_sent[key] = size
            self._outbox.append(message)
        self._results.server_time_s += time.perf_counter() - start
        return self._outbox

    def _read(self, replies: Iterable[Message]) -> None:
        """Sort replies by the client key of the message they answer, into the results."""
        assert self.plan is not None
        start, plan, results = time.perf_counter(), self.plan, self._results
        # Replies map to requests by message id: an error reply the SuperLink makes
        # itself ("Node Unavailable") carries the SuperLink's node id, not the lost node's.
        sent = {m.metadata.message_id: k for m, k in zip(self._outbox, plan.experts, strict=True)}
        for reply in replies:
            key = sent.get(reply.metadata.reply_to_message_id)
            key = self.roster.key_of(reply.metadata.src_node_id) if key is None else key
            if key is None or key not in plan.experts or key in results.failures:
                continue
            if reply.has_error():
                reason = error_reason(reply.error.reason)
                unavailable = reply.error.code == NODE_UNAVAILABLE
                (self.roster.unavailable if unavailable else self.roster.answered)(key)
                why = "node unavailable" if unavailable else "client error"
                results.failures[key] = f"{why}: {reason}"
                continue
            self.roster.answered(key)
            if proto.ARRAYS in reply.content:
                results.bytes_received[key] = record_bytes(reply.content[proto.ARRAYS])
            if proto.INFO in reply.content:  # a client may report a new capacity
                self.membership.report_capacity(key, reply)
            caps = self.state.evaluation_caps(results.declared_examples.get(key))  # type: ignore[union-attr]
            try:
                results.replies.append(decode_reply(reply, key, plan, self.global_arrays, caps))
            except ValueError as err:
                results.failures[key] = f"rejected: {err}"
        answered = {r.key for r in results.replies} | set(results.failures)
        for key in set(plan.experts) - answered:
            self.roster.missed(key)  # not sampled again until it answers a query
        results.wall_time_s = time.perf_counter() - self._began
        results.server_time_s += time.perf_counter() - start
        if self._grid is not None:
            self.membership.collect(self._grid)  # answers to this round's capacity queries

    # ------------------------------------------------------- Flower's interface
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample among the clients available now, allocate, build one message each."""
        assert self.state is not None
        self._began = time.perf_counter()
        capacities = self.membership.await_available(grid, server_round)
        return self._messages(self.state.plan(server_round, capacities), grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Close the round (see :meth:`RoundState.close`), checkpoint, write records.

        Returns no ArrayRecord: the global arrays stay in the round state (serialising
        them every round would cost the server time for nothing); :meth:`start`'s
        Result carries the final ones.
        """
        assert self.state is not None and self.plan is not None
        self._read(replies)
        self.outcome = outcome = self.state.close(self.plan, self._results)
        self._log(server_round, outcome)
        self._save(outcome.finished)
        record = self.state.pending or self.state.history[-1]
        train = record.train_scores()
        return None, MetricRecord(train) if train else None

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """After the last round: send the final model to that round's accepted clients."""
        assert self.state is not None
        self._began = time.perf_counter()
        plan = self.state.final_evaluation()
        return [] if plan is None else self._messages(plan, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Complete the last round's record with the final evaluation."""
        assert self.state is not None and self.plan is not None
        self._read(replies)
        outcome = self.state.close(self.plan, self._results)
        self._log(server_round, outcome)
        self._save(outcome.finished)
        scores = self.state.history[-1].evaluation_scores() if self.state.history else {}
        return MetricRecord(scores) if scores else None

    def _log(self, server_round: int, outcome: RoundOutcome) -> None:
        assert self.plan is not None
        notes = [
            *(
                (INFO, k, f" left out until round {u} (backoff after failed rounds)")
                for k, u in self.plan.benched.items()
            ),
            *(
                (WARNING, k, f" left out of this round: {why}")
                for k, why in outcome.failures.items()
            ),
            *(
                # A cut claim or a left-out update is a warning; a clip alone is routine.
                (WARNING if k in outcome.warned else INFO, k, f"'s influence bounded: {what}")
                for k, what in outcome.bounded.items()
            ),
        ]
        # Named by the node the message went to (the key may have moved on since).
        nodes = {k: m.metadata.dst_node_id for m, k in zip(self._outbox, self.plan.experts)}  # noqa: B905
        for level, key, text in notes:
            name = (
                f"node {nodes[key]} (client {key})" if key in nodes else self.membership.name(key)
            )
            log(level, "Round %d: %s%s", server_round, name, text)

    def _save(self, finished: list[RoundRecord]) -> None:
        # Checkpoint before records: a run killed in between resumes from this round and
        # rewrites metrics.jsonl from the checkpoint's records (no line lost or doubled).
        assert self.state is not None
        if self.checkpoint_path is not None:
            save_checkpoint(self.checkpoint_path, self.state.checkpoint(self.roster.state()))
        for record in finished:
            log(INFO, "%s", headline(record, self.settings.num_rounds))
            if self.recorder is not None:
                self.recorder.log_round(record)

    # ------------------------------------------------------------- the run
    def _restore(self, checkpoint: ServerCheckpoint) -> None:
        assert self.state is not None
        self.state.restore(checkpoint)
        if self.recorder is not None:
            self.recorder.restart_metrics(self.state.history)
        for note in self.roster.differences(checkpoint.capacities):
            log(WARNING, "Resume: %s", note)
        log(INFO, "Resumed after round %d of %d", checkpoint.round, self.settings.num_rounds)

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Any = None,
    ) -> Result:
        """Discover the clients, then run the rounds and the final evaluation.

        A checkpoint to resume from restores the interrupted run, which continues after
        its last completed round; a checkpoint path saves the state after every round.
        Flower's train_config, evaluate_config and evaluate_fn are refused, not ignored.
        """
        if any(v is not None for v in (train_config, evaluate_config, evaluate_fn)):
            hint = "the settings train.* and evaluate.* say how clients train and evaluate"
            raise TypeError(f"start() takes no train_config, evaluate_config, evaluate_fn: {hint}")
        self.summary()
        self.state = RoundState(self.settings, proto.arrays_to_numpy(initial_arrays))
        # One BLAS thread: memory-bound sums, cores shared with clients (bench_round_cost.py).
        with threadpool_limits(limits=1, user_api="blas"):
            self.membership.discover(grid)
            self.state.set_federation_size(self.roster.federation_size())
            if self.resume is not None:
                self._restore(self.resume)
            for server_round in range(self.state.completed_round + 1, num_rounds + 1):
                messages = self.configure_train(server_round, ArrayRecord(), ConfigRecord(), grid)
                replies = self.membership.exchange(grid, list(messages), timeout)
                self.aggregate_train(server_round, replies)
            last = self.state.completed_round
            if messages := list(self.configure_evaluate(last, ArrayRecord(), ConfigRecord(), grid)):
                self.aggregate_evaluate(last, self.membership.exchange(grid, messages, timeout))
        return result_from_records(to_array_record(self.global_arrays), self.history)

    def final_summary(self, error: str | None = None) -> dict[str, Any]:
        """Return the run's closing figures (``status`` failed with ``error`` if given)."""
        if self.state is None:
            return run_status(error)
        return self.state.summary(self.roster.capacities(), error)
