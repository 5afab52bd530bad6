"""Checkpoints: the server's state after a round.

The server writes one file, ``<run_dir>/checkpoint.npz``, atomically after every round:
the global arrays, the fitness table, the deficits, the cumulative loads, the finished
round records, the last round's record while it waits for its evaluation (made in the
next round, see :mod:`flexmoe_core.round_state`), the capacities and the
configuration. Everything that is per client is keyed by the client's stable key
(partition id or ``client-id``), never by Flower node id: node ids change when a
federation restarts, client keys do not.

A client's gate versions are kept by :mod:`flexmoe_core.gate_store`.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .records import RoundRecord
from .results import atomic_write_bytes

CHECKPOINT_FILE = "checkpoint.npz"
# 2: pending record (evaluation folded into the next round's message); experts as
# sub-networks. Older formats are refused (see load_checkpoint).
FORMAT_VERSION = 2
# Configuration keys that may differ between a run and its resumption: they change
# where and how long the run waits, logs or caches, not what it computes.
RESUMABLE_CHANGES = (
    "checkpoint",
    "dataset.cache_dir",
    "timeouts",
    "sweep",
    "wandb",
    "output_root",
    "run_name",
    "num_rounds",
    "train.device",
    "faults.max_failed_rounds",
)

_MODEL_PREFIX = "model:"


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, or does not fit the current run."""


@dataclass
class ServerCheckpoint:
    """The server's state after round ``round``.

    Attributes
    ----------
    round : int
        The last completed round; a resumed run continues with ``round + 1``.
    global_arrays : dict of str to ndarray
        Backbone and all experts.
    fitness : dict of int to ndarray
        Fitness row (length E) per client key.
    deficit : ndarray
        Historical load deficit H per expert.
    loads : dict
        Cumulative loads (:meth:`flexmoe_core.metrics.LoadTracker.state`).
    history : list of RoundRecord
        The finished per-round records (those in ``metrics.jsonl``).
    pending : RoundRecord or None
        The last round's record while it waits for its evaluation.
    capacities : dict of int to int
        Capacity per client key, as last reported.
    config : dict
        The run configuration, to check that a resumption computes the same thing.
    memory : dict
        The round state's other plain data (each client's experts when it last
        trained, the fitness table's start values and measured entries).
    """

    round: int
    global_arrays: dict[str, np.ndarray]
    fitness: dict[int, np.ndarray]
    deficit: np.ndarray
    loads: dict[str, list[float]]
    history: list[RoundRecord] = field(default_factory=list)
    pending: RoundRecord | None = None
    capacities: dict[int, int] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    memory: dict[str, Any] = field(default_factory=dict)


def checkpoint_path(run_dir: str | os.PathLike[str]) -> Path:
    """Return where the checkpoint of ``run_dir`` lives."""
    return Path(run_dir) / CHECKPOINT_FILE


def save_checkpoint(path: str | os.PathLike[str], checkpoint: ServerCheckpoint) -> None:
    """Write ``checkpoint`` to ``path`` atomically (a reader sees the old or the new one).

    Arrays are stored as they are (dtype and shape preserved, no pickling); the rest
    goes into a JSON document stored beside them in the same ``.npz`` file.
    """
    keys = sorted(checkpoint.fitness)
    num_experts = len(checkpoint.deficit)
    fitness = (
        np.stack([np.asarray(checkpoint.fitness[k], dtype=np.float64) for k in keys])
        if keys
        else np.zeros((0, num_experts))
    )
    meta = {
        "format_version": FORMAT_VERSION,
        "round": int(checkpoint.round),
        "fitness_keys": [int(k) for k in keys],
        "loads": checkpoint.loads,
        # Stored as in metrics.jsonl.
        "history": [record.to_json() for record in checkpoint.history],
        "pending": None if checkpoint.pending is None else checkpoint.pending.to_json(),
        "capacities": {str(k): int(v) for k, v in checkpoint.capacities.items()},
        "config": checkpoint.config,
        "memory": checkpoint.memory,
    }
    arrays = {f"{_MODEL_PREFIX}{k}": v for k, v in checkpoint.global_arrays.items()}
    arrays["fitness"] = fitness
    arrays["deficit"] = np.asarray(checkpoint.deficit, dtype=np.float64)
    arrays["meta"] = np.frombuffer(json.dumps(meta, default=_json_default).encode(), dtype=np.uint8)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    atomic_write_bytes(Path(path), buffer.getvalue())


def _json_default(value: Any) -> Any:
    # The loads and memory may hold NumPy scalars or arrays.
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"cannot store {type(value).__name__} in a checkpoint")


def load_checkpoint(path: str | os.PathLike[str]) -> ServerCheckpoint:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Raises
    ------
    CheckpointError
        If the file is missing or is not a checkpoint of this format.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"no checkpoint at {path}: checkpoint.resume must name the run directory "
            "of an earlier run with checkpoint.enabled=true"
        )
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(bytes(data["meta"]).decode())
            fitness = np.asarray(data["fitness"])
            deficit = np.asarray(data["deficit"])
            global_arrays = {
                k[len(_MODEL_PREFIX) :]: np.asarray(data[k])
                for k in data.files
                if k.startswith(_MODEL_PREFIX)
            }
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        # A truncated or corrupted file (e.g. copied while being written elsewhere):
        # the writer replaces it atomically, so it was not written by this run.
        raise CheckpointError(
            f"{path} is not a readable checkpoint ({type(err).__name__}: {err}); it is "
            "truncated or corrupted. Restore a good copy, or start a new run (drop "
            "checkpoint.resume or give another run_name)"
        ) from None
    if (version := meta.get("format_version")) != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} is a checkpoint of format {version!r}, written by an earlier version "
            "of FLEX-MoE on Flower (an earlier model form and round protocol); this version "
            f"reads format {FORMAT_VERSION} only. Start a new run (drop checkpoint.resume "
            "or give another run_name), or finish this run with the release that wrote it."
        )
    keys = [int(k) for k in meta["fitness_keys"]]
    return ServerCheckpoint(
        round=int(meta["round"]),
        global_arrays=global_arrays,
        fitness={k: fitness[i].copy() for i, k in enumerate(keys)},
        deficit=deficit,
        loads=meta["loads"],
        history=[RoundRecord.from_json(record) for record in meta["history"]],
        pending=None if meta.get("pending") is None else RoundRecord.from_json(meta["pending"]),
        capacities={int(k): int(v) for k, v in meta["capacities"].items()},
        config=meta["config"],
        memory=meta.get("memory", {}),
    )


def _flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def config_differences(
    saved: Mapping[str, Any],
    current: Mapping[str, Any],
    may_change: Iterable[str] = RESUMABLE_CHANGES,
) -> list[str]:
    """Return ``key: saved -> current`` for every setting that changes the computation.

    Keys under any of ``may_change`` (a key or a section) are not compared.
    """
    allowed = tuple(may_change)

    def compared(key: str) -> bool:
        return not any(key == a or key.startswith(f"{a}.") for a in allowed)

    old, new = _flatten(saved), _flatten(current)
    return [
        f"{key}: {old.get(key, '<unset>')!r} -> {new.get(key, '<unset>')!r}"
        for key in sorted(set(old) | set(new))
        if compared(key) and old.get(key, "<unset>") != new.get(key, "<unset>")
    ]


def check_model_arrays(
    checkpoint: ServerCheckpoint, model_arrays: Mapping[str, np.ndarray], source: str
) -> None:
    """Refuse a checkpoint whose arrays do not fit the model this configuration builds.

    Raises
    ------
    CheckpointError
        Naming the first differences (missing, unexpected, other shape or dtype) and
        the fix.
    """
    saved = checkpoint.global_arrays
    problems = [f"missing {name}" for name in sorted(set(model_arrays) - set(saved))]
    problems += [f"unexpected {name}" for name in sorted(set(saved) - set(model_arrays))]
    for name in sorted(set(saved) & set(model_arrays)):
        got, want = saved[name], model_arrays[name]
        if got.shape != want.shape or got.dtype != want.dtype:
            problems.append(
                f"{name} is {got.dtype}{list(got.shape)}, the model has "
                f"{want.dtype}{list(want.shape)}"
            )
    if problems:
        shown = "; ".join(problems[:4]) + (
            f"; and {len(problems) - 4} more" if len(problems) > 4 else ""
        )
        raise CheckpointError(
            f"{source} holds a model that does not match the one this configuration builds "
            f"({shown}). It comes from an earlier model form (or other model.* settings). "
            "Start a new run (drop checkpoint.resume or give another run_name), or finish "
            "this run with the release that wrote it."
        )
