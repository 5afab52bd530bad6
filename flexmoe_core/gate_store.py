"""A client's gate versions: where they are kept, which one a round starts from.

The gate (the router) is private to its client: it never leaves the node. A client
keeps each gate it trains as a *version* tagged with the round it was trained in.
Training in round t starts from the newest version older than t, and so does the
evaluation that precedes it in the same message (it measures round t-1's model); the
evaluation after the last round T uses the newest version up to T. A client that
already trained round t before the server was killed therefore starts the resumed
round t from the same gate as an uninterrupted run would.

Versions live in the node's memory (the ClientApp keeps them in its Flower context)
and, when a directory is configured, on disk, which survives a restart of the
federation. Each version also stores the experts the client held when the gate
trained (:data:`HELD_EXPERTS`): a newly held expert's gate row is set from them, see
:func:`flexmoe_core.model.inherit_gate_rows`.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Iterable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .checkpoint import CheckpointError
from .results import atomic_write_bytes
from .settings import Settings

# Stored with each gate version beside its arrays: the experts the client held when the
# gate trained.
HELD_EXPERTS = "held-experts"
# Gate versions a client keeps: the server is at most one round behind a client, so
# two would do; one more leaves room for a round whose reply was lost.
KEEP_GATE_VERSIONS = 3

_GATE_FILE = re.compile(r"^gate-r(\d+)\.npz$")


def pick_gate_version(rounds: Iterable[int], latest_round: int) -> int | None:
    """Return the newest version trained in a round ``<= latest_round`` (None if none)."""
    eligible = [r for r in rounds if r <= latest_round]
    return max(eligible) if eligible else None


def stale_gate_versions(rounds: Iterable[int], keep: int = KEEP_GATE_VERSIONS) -> list[int]:
    """Return the versions to drop so that only the ``keep`` newest remain."""
    ordered = sorted(rounds, reverse=True)
    return ordered[keep:]


def gate_dir(root: str | os.PathLike[str], run_name: str, client_key: int) -> Path:
    """Return the folder holding one client's gate versions of one run."""
    if not run_name:
        raise CheckpointError("gate versions need a run name (the server sends it)")
    return Path(root).expanduser() / str(run_name) / f"client-{int(client_key)}"


def save_gate(
    directory: str | os.PathLike[str],
    server_round: int,
    arrays: Mapping[str, np.ndarray],
    keep: int = KEEP_GATE_VERSIONS,
) -> Path:
    """Write the gate trained in ``server_round`` atomically and drop versions beyond ``keep``."""
    directory = Path(directory)
    buffer = io.BytesIO()
    np.savez(buffer, **dict(arrays))
    path = directory / f"gate-r{int(server_round)}.npz"
    atomic_write_bytes(path, buffer.getvalue())
    versions = _gate_versions(directory)
    for old in stale_gate_versions(versions, keep):
        versions[old].unlink(missing_ok=True)
    return path


def load_gate(
    directory: str | os.PathLike[str], latest_round: int
) -> tuple[int, dict[str, np.ndarray]] | None:
    """Return (round, arrays) of the newest gate trained in a round ``<= latest_round``."""
    versions = _gate_versions(Path(directory))
    chosen = pick_gate_version(versions, latest_round)
    if chosen is None:
        return None
    with np.load(versions[chosen], allow_pickle=False) as data:
        return chosen, {k: np.asarray(data[k]) for k in data.files}


def _gate_versions(directory: Path) -> dict[int, Path]:
    if not directory.is_dir():
        return {}
    return {int(m.group(1)): p for p in directory.iterdir() if (m := _GATE_FILE.match(p.name))}


@dataclass(frozen=True)
class StoredGate:
    """A gate version: its arrays and the experts held when it trained (None if unknown)."""

    arrays: dict[str, np.ndarray]
    held_experts: np.ndarray | None


class GateStore:
    """One client's gate versions of one run: in the node's memory and, if set, on disk.

    Parameters
    ----------
    memory : MutableMapping[int, Mapping[str, ndarray]]
        The versions kept in the node's process, by round. The ClientApp passes a view
        of its Flower context (this package does not import Flower).
    directory : Path, optional
        The node-local folder of the versions on disk (see :meth:`directory_for`).
    keep : int
        Versions kept in each place.
    """

    def __init__(
        self,
        memory: MutableMapping[int, Mapping[str, np.ndarray]],
        directory: Path | None = None,
        keep: int = KEEP_GATE_VERSIONS,
    ) -> None:
        self.memory, self.directory, self.keep = memory, directory, keep

    @staticmethod
    def directory_for(
        node_config: Mapping[str, Any], settings: Settings, client_key: int
    ) -> Path | None:
        """Return the folder of this run's gate versions on the node, if one is configured.

        The node config's ``state-dir`` wins over the run's ``checkpoint.client_dir``;
        without either, or without a run name, versions stay in memory only.
        """
        root = node_config.get("state-dir") or settings.checkpoint.client_dir
        if not root or not settings.run_name:
            return None
        return gate_dir(str(root), settings.run_name, client_key)

    def load(self, latest_round: int) -> StoredGate | None:
        """Return the newest gate trained in a round ``<= latest_round``, or None.

        Of a version in memory and one on disk, the newer is taken (memory on a tie).
        """
        chosen = pick_gate_version(self.memory, latest_round)
        on_disk = load_gate(self.directory, latest_round) if self.directory is not None else None
        if on_disk is not None and (chosen is None or on_disk[0] > chosen):
            arrays = on_disk[1]
        elif chosen is None:
            return None
        else:
            arrays = dict(self.memory[chosen])
        held = arrays.pop(HELD_EXPERTS, None)
        return StoredGate(arrays, held)

    def save(
        self, server_round: int, arrays: Mapping[str, np.ndarray], held_experts: Sequence[int]
    ) -> None:
        """Keep the gate trained in ``server_round`` with the experts it trained with."""
        gate = {**arrays, HELD_EXPERTS: np.array(held_experts, dtype=np.int64)}
        self.memory[server_round] = gate
        for old in stale_gate_versions(self.memory, self.keep):
            del self.memory[old]
        if self.directory is not None:
            save_gate(self.directory, server_round, gate, self.keep)
