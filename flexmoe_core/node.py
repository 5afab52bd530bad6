"""What a node's config says about it: identity, data location and expert capacity.

A simulated node gets ``partition-id``/``num-partitions`` from Flower; a deployed
SuperNode declares ``capacity``, and ``data-path`` (its own files) or a partition of a
named dataset for trials, plus optionally ``client-id``, ``data-format`` and
``state-dir``.

Capacity settings of a deployed node:

* ``capacity=K``: it holds K experts;
* ``capacity=auto``: K is what its memory budget allows (:mod:`flexmoe_core.footprint`):
  ``memory-mb`` if set, else a share of the RAM available when it is asked;
* ``capacity-file=<path>``: a file holding a number (or ``auto``), read anew before
  every reply: the node's capacity is the lower of the file's and the node config's,
  so a device lowers its capacity (low battery, another app needs the memory) by
  writing the file, without restarting the SuperNode. A missing file leaves the node
  config's capacity.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .capacity import AUTO, CapacityReport, parse_capacity, simulated_capacity
from .data import DatasetError
from .data.files import resolve_paths
from .settings import Settings


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

    def capacity(self, settings: Settings) -> int:
        """Return k_c (see :meth:`capacity_report`)."""
        return self.capacity_report(settings).capacity

    def capacity_report(self, settings: Settings) -> CapacityReport:
        """Return k_c, and the memory budget it was derived from with ``capacity=auto``.

        The node config's ``capacity`` (K or ``auto``) if set, lowered by the
        ``capacity-file``'s value if that file exists; else the simulation profile.

        Raises
        ------
        ValueError
            If a capacity is not an integer in [1, E] or ``auto``, the memory budget
            holds no expert, the capacity file is unreadable, or a ``data-path`` node
            declares no capacity; the message names the node and the setting to fix.
        """
        num_experts = settings.model.num_experts
        if "capacity" not in self.config:
            if "data-path" in self.config:
                raise ValueError(
                    f"{self.describe()} sets data-path but no capacity; add capacity=K "
                    f'(1 <= K <= {num_experts}) or capacity="auto" to its --node-config'
                )
            k = simulated_capacity(settings.capacity, self.partition()[0], settings.seed)
            return self._lowered_by_file(settings, CapacityReport(k))
        return self._lowered_by_file(
            settings, self._declared(settings, self.config["capacity"], "the node config")
        )

    def _declared(self, settings: Settings, value: object, where: str) -> CapacityReport:
        num_experts = settings.model.num_experts
        if str(value).strip().lower() == AUTO:
            return self._from_memory(settings)
        try:
            return CapacityReport(
                parse_capacity(value, num_experts, source=f"{where} of {self.describe()}")
            )
        except ValueError as err:
            raise ValueError(
                f"{err} (restart the SuperNode with --node-config 'capacity=K ...', "
                f'1 <= K <= {num_experts}, or capacity="auto")'
            ) from None

    def _from_memory(self, settings: Settings) -> CapacityReport:
        # Imported here: torch's autograd machinery is only needed by capacity=auto.
        from .footprint import MIB, measure_footprint, memory_budget_bytes

        try:
            budget, origin = memory_budget_bytes(self.config.get("memory-mb"))
        except ValueError as err:
            raise ValueError(f"{self.describe()}: {err}") from None
        footprint = measure_footprint(
            settings.model,
            list(settings.dataset.input_shape),
            settings.dataset.num_classes,
            settings.train.batch_size,
        )
        k = footprint.capacity(budget, settings.model.num_experts)
        if k < 1:
            raise ValueError(
                f"{self.describe()}: capacity=auto: the memory budget ({origin}, "
                f"{budget / MIB:.1f} MiB) holds the trunk ({footprint.trunk_bytes / MIB:.1f} "
                f"MiB) but not one expert ({footprint.expert_bytes / MIB:.1f} MiB at batch "
                f"size {footprint.batch_size}); raise memory-mb or lower train.batch_size"
            )
        return CapacityReport(k, memory_mb=budget / MIB)

    def _lowered_by_file(self, settings: Settings, declared: CapacityReport) -> CapacityReport:
        if "capacity-file" not in self.config:
            return declared
        path = Path(str(self.config["capacity-file"])).expanduser()
        try:
            text = path.read_text().strip()
        except FileNotFoundError:
            return declared  # no file: the node config's capacity stands
        except OSError as err:
            raise ValueError(
                f"{self.describe()}: capacity-file {path} cannot be read ({err.strerror})"
            ) from None
        from_file = self._declared(settings, text, f"capacity-file {path}")
        if from_file.capacity < declared.capacity:
            return from_file
        return declared

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
