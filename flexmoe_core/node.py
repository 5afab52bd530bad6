"""What a node's config says about it: identity, data location and expert capacity.

A simulated node gets ``partition-id``/``num-partitions`` from Flower; a deployed
SuperNode declares ``capacity``, and ``data-path`` (its own files) or a partition of a
named dataset for trials, plus optionally ``client-id``, ``data-format`` and
``state-dir``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig

from .capacity import parse_capacity, simulated_capacity
from .data import DatasetError
from .data.files import resolve_paths


@dataclass(frozen=True)
class NodeSettings:
    """A node's id and its node config, with the decisions that depend on them."""

    node_id: int
    config: Mapping[str, Any]

    def describe(self) -> str:
        """Name the node in messages meant for the person who started it."""
        keys = ("client-id", "partition-id", "data-path")
        shown = [f"{k}={self.config[k]}" for k in keys if k in self.config]
        return f"SuperNode {self.node_id} ({', '.join(shown) or 'no client-id'})"

    def partition(self) -> tuple[int, int]:
        """Return (partition id, number of partitions).

        Raises
        ------
        ValueError
            If the node config sets no partition, saying how to start the SuperNode.
        """
        if "partition-id" not in self.config or "num-partitions" not in self.config:
            raise ValueError(
                f"{self.describe()}: the node config sets neither data-path nor "
                "partition-id/num-partitions; start the SuperNode with --node-config "
                "'capacity=K data-path=\"/path/to/data\"' or "
                "'capacity=K partition-id=0 num-partitions=N'"
            )
        return int(self.config["partition-id"]), int(self.config["num-partitions"])

    def client_key(self) -> int:
        """Return the stable key: ``client-id``, else ``partition-id``, else the node id.

        The server orders clients, seeds their randomness and keys its checkpoint by
        this key, so it must survive a restart of the SuperNode; Flower node ids do not.
        """
        for name in ("client-id", "partition-id"):
            if name in self.config:
                return int(self.config[name])
        # Node ids are unsigned 64-bit; record values are signed 64-bit integers.
        return int(self.node_id) % 2**63

    def seed_offset(self) -> int:
        """Return the client's share of the seeds: its key, folded into torch's range."""
        return self.client_key() % 2**31

    def capacity(self, cfg: DictConfig) -> int:
        """Return k_c: the node config's ``capacity`` if set, else the simulation profile.

        Raises
        ------
        ValueError
            If the capacity is not an integer in [1, E], or a ``data-path`` node
            declares none; the message names the node and the setting to fix.
        """
        num_experts = int(cfg.model.num_experts)
        if "capacity" in self.config:
            try:
                return parse_capacity(
                    self.config["capacity"],
                    num_experts,
                    source=f"the node config of {self.describe()}",
                )
            except ValueError as err:
                raise ValueError(
                    f"{err} (restart the SuperNode with --node-config 'capacity=K ...', "
                    f"1 <= K <= {num_experts})"
                ) from None
        if "data-path" in self.config:
            raise ValueError(
                f"{self.describe()} sets data-path but no capacity; add capacity=K "
                f"(1 <= K <= {num_experts}) to its --node-config"
            )
        return simulated_capacity(cfg.capacity, self.partition()[0], num_experts, int(cfg.seed))

    def check_data_location(self) -> None:
        """Fail early (at the capacity query) if the node config locates no data.

        Raises
        ------
        ValueError
            If ``data-path`` names nothing, or neither it nor a partition is set.
        """
        if "data-path" in self.config:
            try:
                resolve_paths(str(self.config["data-path"]), setting="data-path")
            except DatasetError as err:
                raise ValueError(f"{self.describe()}: {err}") from None
        else:
            self.partition()
