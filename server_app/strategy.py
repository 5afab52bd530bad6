"""FLEX-MoE strategy: per-node expert subsets, per-expert aggregation, fitness, allocation."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy
from flwr.supercore import log
from omegaconf import DictConfig

from flexmoe_core import protocol as proto
from flexmoe_core.aggregation import ClientUpdate, aggregate, check_update
from flexmoe_core.allocation import Allocation, make_allocator, update_deficit
from flexmoe_core.capacity import parse_capacity
from flexmoe_core.checkpoint import (
    ServerCheckpoint,
    rewrite_metrics,
    save_checkpoint,
)
from flexmoe_core.config import to_container
from flexmoe_core.fitness import FitnessTable
from flexmoe_core.metrics import LoadTracker, nbytes
from flexmoe_core.model import split_expert_key
from flexmoe_core.results import RunRecorder


def to_array_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    """Wrap NumPy arrays into an ArrayRecord, keeping their names."""
    return ArrayRecord(array_dict={name: Array(value) for name, value in arrays.items()})


# Flower wraps a ClientApp's exception as "<class 'X'>:<'message'>"; in simulation
# the message carries Ray's traceback and ends with "... Message: <the error>".
_WRAPPED_REASON = re.compile(r"^<class '([^']*)'>:<'(.*)'>$", re.DOTALL)
_CLIENTAPP_MESSAGE = "ClientAppException occurred. Message: "
_ANSI_CODES = re.compile(r"\x1b\[[0-9;]*m")


def error_reason(reason: str) -> str:
    """Return a client error's reason on one line, without Flower's and Ray's wrapping."""
    text = _ANSI_CODES.sub("", reason).strip()
    if match := _WRAPPED_REASON.match(text):
        kind, message = match.groups()
        if _CLIENTAPP_MESSAGE in message:
            text = message.rsplit(_CLIENTAPP_MESSAGE, 1)[1]
        else:
            text = f"{kind.rsplit('.', 1)[-1]}: {message}"
    return " ".join(text.split())


# Round-record keys that measure time: they differ between two runs of the same
# computation, so equality checks (e.g. of a resumed run) leave them out.
TIMING_KEYS = ("allocation_time_s", "server_time_s", "round_time_s")


@dataclass
class RoundState:
    """What the server remembers within one round."""

    participants: list[int] = field(default_factory=list)
    assignment: dict[int, list[int]] = field(default_factory=dict)
    allocation: Allocation | None = None
    bytes_sent: dict[int, int] = field(default_factory=dict)
    bytes_received: dict[int, int] = field(default_factory=dict)
    accepted: list[int] = field(default_factory=list)
    failures: dict[int, str] = field(default_factory=dict)
    routed_samples: np.ndarray | None = None
    server_time_s: float = 0.0
    metrics: dict[str, Any] = field(default_factory=dict)


class FlexMoEStrategy(Strategy):
    """Assigns each node a subset of experts every round and aggregates per expert.

    Before round 1 the strategy asks every node for its capacity (a ``query``
    message). Each round it samples participants, solves the allocation over their
    fitness rows, sends each node the backbone and only its experts, aggregates the
    backbone over all replies and each expert over its holders, and updates the
    fitness table from the per-expert feedback. The gate never leaves the clients.

    Parameters
    ----------
    cfg : DictConfig
        The resolved run configuration (``conf/``).
    recorder : RunRecorder, optional
        Where per-round metrics, the final model and the summary are written.
    checkpoint_path : Path, optional
        Where the server state is written (atomically) after every round.
    resume : ServerCheckpoint, optional
        State of an interrupted run: :meth:`start` restores it after discovering the
        clients and continues with the next round.
    """

    def __init__(
        self,
        cfg: DictConfig,
        recorder: RunRecorder | None = None,
        checkpoint_path: Path | None = None,
        resume: ServerCheckpoint | None = None,
    ) -> None:
        self.cfg = cfg
        self.recorder = recorder
        self.checkpoint_path = checkpoint_path
        self.resume = resume
        self.num_experts = int(cfg.model.num_experts)
        self.allocator = make_allocator(cfg.strategy)
        self.fitness = FitnessTable(
            self.num_experts,
            q0=cfg.fitness.q0,
            beta=cfg.fitness.beta,
            signal=cfg.fitness.signal,
            alpha=cfg.fitness.alpha,
        )
        self.deficit = np.zeros(self.num_experts)
        self.loads = LoadTracker(self.num_experts)
        self.capacities: dict[int, int] = {}
        self.client_keys: dict[int, int] = {}
        self.global_arrays: dict[str, np.ndarray] = {}
        self.history: list[dict[str, Any]] = []
        self.round = RoundState()
        # Fitness rows of clients known to a checkpoint but absent from this run:
        # carried into later checkpoints so that they are not lost.
        self._dormant_fitness: dict[int, np.ndarray] = {}
        self._run_config = json.dumps(to_container(cfg))

    # ------------------------------------------------------------------ helpers
    def summary(self) -> None:
        """Log the strategy's configuration."""
        log(
            INFO,
            "FlexMoEStrategy: allocator=%s, E=%d experts, top-k=%d, fitness=%s "
            "(beta=%.2f, q0=%.2f), expert weighting=%s",
            self.allocator.name,
            self.num_experts,
            self.cfg.model.top_k,
            self.cfg.fitness.signal,
            self.cfg.fitness.beta,
            self.cfg.fitness.q0,
            self.cfg.aggregation.expert_weighting,
        )

    def round_rng(self, server_round: int) -> np.random.Generator:
        """Return the round's generator: sampling and tie-breaking depend on (seed, round)."""
        return np.random.default_rng([int(self.cfg.seed), server_round])

    def who(self, node: int) -> str:
        """Name a node for the log: its Flower id and, once known, its client key."""
        key = self.client_keys.get(node)
        return f"node {node}" if key is None else f"node {node} (client {key})"

    def _config(self, server_round: int, node_id: int, **extra: Any) -> ConfigRecord:
        return ConfigRecord(
            {
                proto.ROUND: server_round,
                proto.EXPERTS: [int(e) for e in self.round.assignment.get(node_id, [])],
                proto.RUN_CONFIG: self._run_config,
                proto.SEED: int(self.cfg.seed) * 100_003 + server_round,
                **extra,
            }
        )

    def _node_arrays(self, node_id: int) -> dict[str, np.ndarray]:
        experts = set(self.round.assignment[node_id])
        return {
            name: value
            for name, value in self.global_arrays.items()
            if (key := split_expert_key(name)) is None or key[0] in experts
        }

    # --------------------------------------------------------------- discovery
    def discover_clients(self, grid: Grid) -> None:
        """Wait for ``num_clients`` nodes, then ask each for its expert capacity.

        Raises
        ------
        RuntimeError
            If fewer nodes connect within ``timeouts.wait_for_clients_s`` or fewer than
            ``min_clients_per_round`` report a valid capacity.
        """
        wanted, timeout = (
            int(self.cfg.num_clients),
            float(self.cfg.timeouts.wait_for_clients_s),
        )
        deadline = time.monotonic() + timeout
        while len(nodes := sorted(grid.get_node_ids())) < wanted:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"Only {len(nodes)} of num_clients={wanted} nodes connected within "
                    f"{timeout:.0f} s. In simulation start as many SuperNodes "
                    f"(--federation-config 'num-supernodes={wanted}'), or set "
                    f"num_clients={len(nodes)} in the overrides; in deployment start "
                    "more SuperNodes or raise timeouts.wait_for_clients_s."
                )
            log(
                INFO,
                "Waiting for nodes: %d of num_clients=%d connected (giving up after "
                "timeouts.wait_for_clients_s=%.0f s)",
                len(nodes),
                wanted,
                timeout,
            )
            time.sleep(1.0)
        content = RecordDict({proto.CONFIG: ConfigRecord({proto.RUN_CONFIG: self._run_config})})
        messages = [
            Message(content=content, message_type=MessageType.QUERY, dst_node_id=n) for n in nodes
        ]
        replied = set()
        for reply in grid.send_and_receive(messages, timeout=self.cfg.timeouts.round_s):
            node = reply.metadata.src_node_id
            replied.add(node)
            if reply.has_error():
                self._refuse(node, error_reason(reply.error.reason))
                continue
            try:
                info = reply.content[proto.INFO]
                key = int(info[proto.CLIENT_KEY])
                capacity = parse_capacity(
                    info[proto.CAPACITY], self.num_experts, source=f"node {node} (client {key})"
                )
            except (KeyError, TypeError, ValueError) as err:
                self._refuse(node, str(err))
                continue
            if (other := self._node_of_key(key)) is not None:
                self._refuse(
                    node,
                    f"client key {key} is already used by node {other}; give every SuperNode "
                    "its own partition-id or client-id in its node config",
                )
                continue
            self.capacities[node], self.client_keys[node] = capacity, key
        for node in sorted(set(nodes) - replied):
            self._refuse(
                node,
                "no answer to the capacity query within "
                f"timeouts.round_s={float(self.cfg.timeouts.round_s):.0f} s",
            )
        if len(self.capacities) < self.cfg.min_clients_per_round:
            raise RuntimeError(
                f"Only {len(self.capacities)} nodes reported a valid capacity; "
                f"min_clients_per_round={self.cfg.min_clients_per_round}. See the warnings "
                "above for the nodes left out."
            )
        caps = [self.capacities[n] for n in self.ordered_nodes()]
        log(INFO, "Clients: %d, capacities %s (E=%d)", len(caps), caps, self.num_experts)

    def _refuse(self, node: int, why: str) -> None:
        log(
            WARNING,
            "Node %d left out of this run (the run continues with the other nodes): %s",
            node,
            why,
        )

    def _node_of_key(self, key: int) -> int | None:
        return next((n for n, k in self.client_keys.items() if k == key), None)

    def await_participants(self, grid: Grid, server_round: int) -> list[int]:
        """Return the known nodes online now, waiting for ``min_clients_per_round`` of them.

        Raises
        ------
        RuntimeError
            If fewer than ``min_clients_per_round`` known nodes are online within
            ``timeouts.wait_for_clients_s`` (the last checkpoint allows a resume).
        """
        wanted = int(self.cfg.min_clients_per_round)
        timeout = float(self.cfg.timeouts.wait_for_clients_s)
        deadline = time.monotonic() + timeout
        while True:
            connected = set(grid.get_node_ids())
            online = [n for n in self.ordered_nodes() if n in connected]
            if len(online) >= wanted:
                return online
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"Round {server_round}: only {len(online)} of the {len(self.capacities)} "
                    f"clients of this run are online, fewer than min_clients_per_round="
                    f"{wanted}, after waiting {timeout:.0f} s (timeouts.wait_for_clients_s). "
                    "Restart the missing SuperNodes and resume the run with "
                    "checkpoint.resume=<run dir>, or lower min_clients_per_round."
                )
            log(
                INFO,
                "Round %d: waiting for clients, %d of at least %d online",
                server_round,
                len(online),
                wanted,
            )
            time.sleep(1.0)

    def sort_key(self, node: int) -> tuple[int, int]:
        """Return a node's place in the run-independent order (client key, then node id)."""
        return (self.client_keys.get(node, node), node)

    def ordered_nodes(self) -> list[int]:
        """Known nodes in a run-independent order (by client key, e.g. partition id)."""
        return sorted(self.capacities, key=self.sort_key)

    def sample(self, server_round: int, available: Iterable[int] | None = None) -> list[int]:
        """Return this round's participants: ``fraction_train`` of the known nodes."""
        nodes = self.ordered_nodes()
        if available is not None:
            online = set(available)
            nodes = [n for n in nodes if n in online]
        size = max(
            int(self.cfg.min_clients_per_round),
            round(self.cfg.fraction_train * len(nodes)),
        )
        size = min(size, len(nodes))
        picked = self.round_rng(server_round).choice(len(nodes), size=size, replace=False)
        return [nodes[i] for i in sorted(picked)]

    # ---------------------------------------------------------------- training
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Allocate experts to this round's participants and build one message each."""
        start = time.perf_counter()
        if not self.global_arrays:
            self.global_arrays = proto.arrays_to_numpy(arrays)
        participants = self.sample(server_round, self.await_participants(grid, server_round))
        self.round = RoundState(participants=participants)
        capacities = np.array([self.capacities[n] for n in participants])
        allocation = self.allocator(
            self.fitness.rows(participants),
            capacities,
            self.deficit,
            self.round_rng(server_round),
        )
        self.deficit = update_deficit(self.deficit, allocation.assignment)
        self.round.allocation = allocation
        self.round.assignment = {
            n: np.flatnonzero(row).tolist()
            for n, row in zip(participants, allocation.assignment, strict=True)
        }
        messages = []
        for node in participants:
            payload = self._node_arrays(node)
            self.round.bytes_sent[node] = nbytes(payload)
            content = RecordDict(
                {
                    proto.ARRAYS: to_array_record(payload),
                    proto.CONFIG: self._config(server_round, node),
                }
            )
            messages.append(
                Message(content=content, message_type=MessageType.TRAIN, dst_node_id=node)
            )
        self.round.server_time_s += time.perf_counter() - start
        return messages

    def parse_reply(self, reply: Message) -> ClientUpdate:
        """Turn a training reply into a checked update.

        Raises
        ------
        ValueError
            If the reply is malformed or fails :func:`check_update`.
        """
        node = reply.metadata.src_node_id
        if node not in self.round.assignment:
            raise ValueError("the node was not asked to train this round")
        try:
            arrays = proto.arrays_to_numpy(reply.content[proto.ARRAYS])
            metrics = reply.content[proto.METRICS]
            feedback = proto.decode_feedback(reply.content[proto.FEEDBACK])
            num_examples = int(metrics[proto.NUM_EXAMPLES])
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"malformed reply: {err}") from None
        update = ClientUpdate(node, arrays, num_examples, feedback)
        if problems := check_update(update, self.global_arrays, self.round.assignment[node]):
            raise ValueError("; ".join(problems))
        return update

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate accepted updates per expert and update the fitness table.

        A node that failed, timed out or sent a bad update is left out: its experts
        keep their previous values (unless another holder returned them) and its
        fitness row is untouched.
        """
        start = time.perf_counter()
        updates, losses, accuracies = [], [], []
        replied = set()
        for reply in replies:
            node = reply.metadata.src_node_id
            replied.add(node)
            if reply.has_error():
                reason = error_reason(reply.error.reason)
                self.round.failures[node] = f"client error: {reason}"
                log(
                    WARNING,
                    "Round %d: %s failed, left out of this round: %s",
                    server_round,
                    self.who(node),
                    reason,
                )
                continue
            try:
                update = self.parse_reply(reply)
            except ValueError as err:
                self.round.failures[node] = f"rejected: {err}"
                log(
                    WARNING,
                    "Round %d: update of %s rejected, left out of this round: %s",
                    server_round,
                    self.who(node),
                    err,
                )
                continue
            updates.append(update)
            self.round.bytes_received[node] = nbytes(update.arrays)
            metrics = reply.content[proto.METRICS]
            losses.append(float(metrics.get("train-loss", np.nan)))
            accuracies.append(float(metrics.get("train-acc", np.nan)))
        for node in sorted(set(self.round.participants) - replied):
            self.round.failures[node] = "no reply within the round timeout"
            log(
                WARNING,
                "Round %d: %s did not reply within the round timeout, left out of this round",
                server_round,
                self.who(node),
            )
        # Replies arrive in any order, and floating-point sums depend on the order:
        # aggregating in client-key order makes a run repeatable (and resumable) bit
        # for bit.
        order = sorted(range(len(updates)), key=lambda i: self.sort_key(updates[i].client_id))
        updates = [updates[i] for i in order]
        losses = [losses[i] for i in order]
        accuracies = [accuracies[i] for i in order]
        self.global_arrays = aggregate(
            self.global_arrays, updates, self.cfg.aggregation.expert_weighting
        )
        routed = np.zeros(self.num_experts)
        for update in updates:
            self.fitness.update(update.client_id, update.feedback)
            for expert, fb in update.feedback.items():
                routed[expert] += fb.usage
        self.round.routed_samples = routed
        self.round.accepted = [u.client_id for u in updates]
        self.round.server_time_s += time.perf_counter() - start
        if not updates:
            log(
                WARNING,
                "Round %d: no update accepted; the model is unchanged",
                server_round,
            )
            return None, None
        weights = np.array([u.num_examples for u in updates], dtype=float)
        train = {
            "train_loss": float(np.average(losses, weights=weights)),
            "train_acc": float(np.average(accuracies, weights=weights)),
            "train_examples": int(weights.sum()),
        }
        self.round.metrics.update(train)
        return to_array_record(self.global_arrays), MetricRecord(train)

    # -------------------------------------------------------------- evaluation
    def evaluates_in(self, server_round: int, every: int) -> bool:
        """Whether a schedule of ``every`` rounds fires in ``server_round`` (last always)."""
        return every > 0 and (server_round % every == 0 or server_round == self.cfg.num_rounds)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send each node that trained the new backbone and its experts to evaluate."""
        if not self.evaluates_in(server_round, int(self.cfg.evaluate.every)):
            return []
        with_global = self.evaluates_in(server_round, int(self.cfg.evaluate.global_every))
        messages = []
        for node in self.round.accepted:
            payload = self._node_arrays(node)
            self.round.bytes_sent[node] = self.round.bytes_sent.get(node, 0) + nbytes(payload)
            config_record = self._config(server_round, node, **{proto.GLOBAL_TEST: with_global})
            content = RecordDict(
                {proto.ARRAYS: to_array_record(payload), proto.CONFIG: config_record}
            )
            messages.append(
                Message(content=content, message_type=MessageType.EVALUATE, dst_node_id=node)
            )
        return messages

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Average the personalised accuracies, weighted by each split's size."""
        keyed = []
        for reply in replies:
            if reply.has_error():
                node = reply.metadata.src_node_id
                log(
                    WARNING,
                    "Round %d: evaluation on %s failed: %s",
                    server_round,
                    self.who(node),
                    error_reason(reply.error.reason),
                )
                continue
            keyed.append((self.sort_key(reply.metadata.src_node_id), reply.content[proto.METRICS]))
        # In client-key order, like the training aggregation: sums do not depend on
        # the order in which replies arrived.
        rows = [metrics for _, metrics in sorted(keyed, key=lambda item: item[0])]
        if not rows:
            return None
        out: dict[str, float] = {}
        for split in ("local", "global"):
            sized = [r for r in rows if f"{split}-num" in r and r[f"{split}-num"] > 0]
            if not sized:
                continue
            weights = np.array([r[f"{split}-num"] for r in sized], dtype=float)
            out[f"{split}_acc"] = float(
                np.average([r[f"{split}-acc"] for r in sized], weights=weights)
            )
            out[f"{split}_loss"] = float(
                np.average([r[f"{split}-loss"] for r in sized], weights=weights)
            )
            per_client = [r[f"{split}-acc"] for r in sized]
            out[f"{split}_acc_min"] = float(np.min(per_client))
            out[f"{split}_acc_std"] = float(np.std(per_client))
        self.round.metrics.update(out)
        return MetricRecord(out)

    # -------------------------------------------------------------- the run
    def round_record(self, server_round: int, wall_time_s: float) -> dict[str, Any]:
        """Return everything measured in the round as one JSON-ready record."""
        allocation = self.round.allocation
        assert allocation is not None and self.round.routed_samples is not None
        keys = self.client_keys
        record: dict[str, Any] = {
            "round": server_round,
            "strategy": self.allocator.name,
            "participants": len(self.round.participants),
            "accepted": len(self.round.accepted),
            "failures": {str(keys.get(n, n)): why for n, why in self.round.failures.items()},
            **self.round.metrics,
            **self.loads.record(allocation.assignment.sum(axis=0), self.round.routed_samples),
            "assignment": {
                str(keys.get(n, n)): experts for n, experts in self.round.assignment.items()
            },
            "allocation_objective": allocation.objective,
            "allocation_method": allocation.method,
            "allocation_time_s": allocation.solve_time_s,
            "deficit": self.deficit.tolist(),
            "bytes_sent": sum(self.round.bytes_sent.values()),
            "bytes_received": sum(self.round.bytes_received.values()),
            "bytes_sent_per_client": {
                str(keys.get(n, n)): b for n, b in self.round.bytes_sent.items()
            },
            "bytes_received_per_client": {
                str(keys.get(n, n)): b for n, b in self.round.bytes_received.items()
            },
            "server_time_s": self.round.server_time_s,
            "round_time_s": wall_time_s,
        }
        return record

    def log_round(self, record: dict[str, Any]) -> None:
        """Print the round's headline figures."""
        acc = record.get("local_acc")
        log(
            INFO,
            "[round %d/%d] local acc %s | global acc %s | train loss %.3f | "
            "expert load %s (CV %.3f, cumulative CV %.3f) | samples CV %.3f | "
            "alloc %.1f ms | %.1f s",
            record["round"],
            self.cfg.num_rounds,
            "n/a" if acc is None else f"{acc:.4f}",
            f"{record['global_acc']:.4f}" if "global_acc" in record else "n/a",
            record.get("train_loss", float("nan")),
            record["load_clients"],
            record["load_clients_cv"],
            record["cum_load_clients_cv"],
            record["load_samples_cv"],
            1000 * record["allocation_time_s"],
            record["round_time_s"],
        )
        if record["failures"]:
            log(WARNING, "[round %d] left out: %s", record["round"], record["failures"])

    # -------------------------------------------------------------- checkpoint
    def checkpoint_state(self, server_round: int) -> ServerCheckpoint:
        """Return the state after ``server_round``, keyed by client key (not node id)."""
        table = self.fitness.state()
        fitness = dict(self._dormant_fitness)
        for node, row in zip(table["client_ids"], table["values"], strict=True):  # type: ignore[call-overload]
            fitness[self.client_keys.get(node, node)] = np.asarray(row, dtype=float)
        return ServerCheckpoint(
            round=server_round,
            global_arrays=dict(self.global_arrays),
            fitness=fitness,
            deficit=self.deficit.copy(),
            loads=self.loads.state(),
            history=list(self.history),
            capacities={self.client_keys[n]: c for n, c in self.capacities.items()},
            config=to_container(self.cfg),
        )

    def restore(self, checkpoint: ServerCheckpoint) -> int:
        """Take over an interrupted run's state; return the last round it completed.

        Call after :meth:`discover_clients`: fitness rows are matched to this run's
        nodes by client key. Rows of clients that did not come back are kept aside
        (and written to later checkpoints); a client whose capacity changed is
        warned about, since the run then no longer repeats the interrupted one.
        """
        self.global_arrays = {k: v.copy() for k, v in checkpoint.global_arrays.items()}
        self.deficit = np.asarray(checkpoint.deficit, dtype=float).copy()
        self.loads.load_state(checkpoint.loads)
        self.history = [dict(r) for r in checkpoint.history]
        node_of = {key: node for node, key in self.client_keys.items()}
        ids, rows = [], []
        self._dormant_fitness = {}
        for key, row in checkpoint.fitness.items():
            if key in node_of:
                ids.append(node_of[key])
                rows.append(np.asarray(row, dtype=float))
            else:
                self._dormant_fitness[key] = np.asarray(row, dtype=float)
        self.fitness.load_state(
            {"client_ids": ids, "values": np.reshape(rows, (len(ids), self.num_experts))}
        )
        for key, old in sorted(checkpoint.capacities.items()):
            if key not in node_of:
                log(WARNING, "Resume: client %d of the interrupted run did not come back", key)
            elif (new := self.capacities[node_of[key]]) != old:
                log(
                    WARNING,
                    "Resume: client %d now has capacity %d (was %d); the resumed run "
                    "will differ from an uninterrupted one",
                    key,
                    new,
                    old,
                )
        if self.recorder is not None:
            rewrite_metrics(self.recorder.run_dir, self.history)
        log(
            INFO,
            "Resumed after round %d of %d (%d of %d clients matched by client key)",
            checkpoint.round,
            self.cfg.num_rounds,
            len(ids),
            len(checkpoint.fitness),
        )
        return int(checkpoint.round)

    def _result_from_history(self, arrays: ArrayRecord) -> Result:
        """Rebuild the per-round metrics of :class:`Result` from the metric history."""
        result = Result(arrays=arrays)
        for record in self.history:
            server_round = int(record["round"])
            train = {
                k: record[k] for k in ("train_loss", "train_acc", "train_examples") if k in record
            }
            if train:
                result.train_metrics_clientapp[server_round] = MetricRecord(train)
            evaluated = {
                k: v
                for k, v in record.items()
                if k.startswith(("local_", "global_")) and isinstance(v, (int, float))
            }
            if evaluated:
                result.evaluate_metrics_clientapp[server_round] = MetricRecord(evaluated)
        return result

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
        """Discover capacities, then run ``num_rounds`` of assign/train/aggregate/evaluate.

        With a checkpoint to resume from, the clients are discovered as usual, the
        interrupted run's state is restored, and the loop continues after its last
        completed round. With a checkpoint path, the state is saved after every round.

        Returns
        -------
        Result
            Final arrays and per-round train and evaluation metrics.
        """
        self.summary()
        self.global_arrays = proto.arrays_to_numpy(initial_arrays)
        self.discover_clients(grid)
        first_round = 1
        result = Result(arrays=initial_arrays)
        if self.resume is not None:
            first_round = self.restore(self.resume) + 1
            result = self._result_from_history(to_array_record(self.global_arrays))
        for server_round in range(first_round, num_rounds + 1):
            began = time.perf_counter()
            replies = grid.send_and_receive(
                self.configure_train(server_round, ArrayRecord(), ConfigRecord(), grid),
                timeout=timeout,
            )
            arrays, train_metrics = self.aggregate_train(server_round, replies)
            if arrays is not None:
                result.arrays = arrays
            if train_metrics is not None:
                result.train_metrics_clientapp[server_round] = train_metrics
            eval_messages = list(
                self.configure_evaluate(server_round, ArrayRecord(), ConfigRecord(), grid)
            )
            if eval_messages:
                eval_replies = grid.send_and_receive(eval_messages, timeout=timeout)
                if (
                    eval_metrics := self.aggregate_evaluate(server_round, eval_replies)
                ) is not None:
                    result.evaluate_metrics_clientapp[server_round] = eval_metrics
            record = self.round_record(server_round, time.perf_counter() - began)
            self.history.append(record)
            self.log_round(record)
            # The checkpoint is written before the metrics line: a run killed in
            # between is resumed from this round, and the resume rewrites
            # metrics.jsonl from the checkpoint's history, so no line is lost or doubled.
            if self.checkpoint_path is not None:
                save_checkpoint(self.checkpoint_path, self.checkpoint_state(server_round))
            if self.recorder is not None:
                self.recorder.log_round(record)
        return result

    def final_summary(self) -> dict[str, Any]:
        """Return the run's closing figures, fitness table and cumulative loads."""
        last = self.history[-1] if self.history else {}
        evaluated = [r for r in self.history if "local_acc" in r]
        return {
            "strategy": self.allocator.name,
            "rounds": len(self.history),
            "final_local_acc": evaluated[-1]["local_acc"] if evaluated else None,
            "best_local_acc": max((r["local_acc"] for r in evaluated), default=None),
            "final_global_acc": next(
                (r["global_acc"] for r in reversed(self.history) if "global_acc" in r),
                None,
            ),
            "mean_load_clients_cv": float(np.mean([r["load_clients_cv"] for r in self.history]))
            if self.history
            else None,
            "cum_load_clients_cv": last.get("cum_load_clients_cv"),
            "cum_load_samples_cv": last.get("cum_load_samples_cv"),
            "capacities": {str(self.client_keys.get(n, n)): c for n, c in self.capacities.items()},
            "fitness": self.fitness.state(),
            "cumulative_loads": self.loads.state(),
        }
