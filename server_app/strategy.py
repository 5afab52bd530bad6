"""FLEX-MoE strategy: per-node expert subsets, per-expert aggregation, fitness, allocation."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from logging import INFO, WARNING
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
from flexmoe_core.config import to_container
from flexmoe_core.fitness import FitnessTable
from flexmoe_core.metrics import LoadTracker, nbytes
from flexmoe_core.model import split_expert_key
from flexmoe_core.results import RunRecorder


def to_array_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    """Wrap NumPy arrays into an ArrayRecord, keeping their names."""
    return ArrayRecord(array_dict={name: Array(value) for name, value in arrays.items()})


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
    """

    def __init__(self, cfg: DictConfig, recorder: RunRecorder | None = None) -> None:
        self.cfg = cfg
        self.recorder = recorder
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
            log(INFO, "Waiting for nodes: %d of %d connected", len(nodes), wanted)
            time.sleep(1.0)
        content = RecordDict({proto.CONFIG: ConfigRecord({proto.RUN_CONFIG: self._run_config})})
        messages = [
            Message(content=content, message_type=MessageType.QUERY, dst_node_id=n) for n in nodes
        ]
        for reply in grid.send_and_receive(messages, timeout=self.cfg.timeouts.round_s):
            node = reply.metadata.src_node_id
            if reply.has_error():
                log(WARNING, "Node %d left out: %s", node, reply.error.reason)
                continue
            info = reply.content[proto.INFO]
            try:
                self.capacities[node] = parse_capacity(
                    info[proto.CAPACITY], self.num_experts, source=f"node {node}"
                )
            except ValueError as err:
                log(WARNING, "Node %d left out: %s", node, err)
                continue
            self.client_keys[node] = int(info[proto.CLIENT_KEY])
        if len(self.capacities) < self.cfg.min_clients_per_round:
            raise RuntimeError(
                f"Only {len(self.capacities)} nodes reported a valid capacity; "
                f"min_clients_per_round={self.cfg.min_clients_per_round}. See the warnings "
                "above for the nodes left out."
            )
        caps = [self.capacities[n] for n in self.ordered_nodes()]
        log(INFO, "Clients: %d, capacities %s (E=%d)", len(caps), caps, self.num_experts)

    def ordered_nodes(self) -> list[int]:
        """Known nodes in a run-independent order (by client key, e.g. partition id)."""
        return sorted(self.capacities, key=lambda n: (self.client_keys.get(n, n), n))

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
        participants = self.sample(server_round, grid.get_node_ids())
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
                self.round.failures[node] = f"client error: {reply.error.reason}"
                log(
                    WARNING,
                    "Round %d: node %d failed: %s",
                    server_round,
                    node,
                    reply.error.reason,
                )
                continue
            try:
                update = self.parse_reply(reply)
            except ValueError as err:
                self.round.failures[node] = f"rejected: {err}"
                log(
                    WARNING,
                    "Round %d: update of node %d rejected: %s",
                    server_round,
                    node,
                    err,
                )
                continue
            updates.append(update)
            self.round.bytes_received[node] = nbytes(update.arrays)
            metrics = reply.content[proto.METRICS]
            losses.append(float(metrics.get("train-loss", np.nan)))
            accuracies.append(float(metrics.get("train-acc", np.nan)))
        for node in set(self.round.participants) - replied:
            self.round.failures[node] = "no reply within the round timeout"
            log(WARNING, "Round %d: node %d did not reply in time", server_round, node)

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
        rows = []
        for reply in replies:
            if reply.has_error():
                node = reply.metadata.src_node_id
                log(
                    WARNING,
                    "Round %d: evaluation on node %d failed: %s",
                    server_round,
                    node,
                    reply.error.reason,
                )
                continue
            rows.append(reply.content[proto.METRICS])
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

        Returns
        -------
        Result
            Final arrays and per-round train and evaluation metrics.
        """
        self.summary()
        self.global_arrays = proto.arrays_to_numpy(initial_arrays)
        self.discover_clients(grid)
        result = Result(arrays=initial_arrays)
        for server_round in range(1, num_rounds + 1):
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
