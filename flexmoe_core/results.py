"""Where a run leaves its results: config, one JSON line per round, final model."""

from __future__ import annotations

import datetime as dt
import fcntl
import itertools
import json
import os
import socket
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import OmegaConf

from .records import RoundRecord, plain
from .settings import Settings

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.yaml"
MODEL_FILE = "final_model.npz"
SUMMARY_FILE = "summary.json"


# summary.json's ``status``: how a script tells a failed run (``flwr run`` exits 0 either way).
COMPLETED = "completed"
FAILED = "failed"


def run_status(error: str | None) -> dict[str, str]:
    """Return the status entries of ``summary.json``: completed, or failed with the error."""
    return {"status": COMPLETED} if error is None else {"status": FAILED, "error": error}


class RunDirError(ValueError):
    """The run's output folder cannot be made or is in use by another run."""


# Each run holds an exclusive lock on this file in its folder while it runs (the
# operating system drops it when the process ends): two runs started at once with the
# same run_name cannot both claim a folder, and a folder left by a killed run is free.
CLAIM_FILE = ".run.lock"
_claims: dict[Path, int] = {}  # run folder -> the open, locked claim file


def _output_root(root: str | os.PathLike[str]) -> Path:
    base = Path(root).expanduser().resolve()
    try:
        base.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as err:
        raise RunDirError(
            f"output_root={str(root)!r}: {err.filename or base} is a file, not a folder; "
            "set output_root to a folder (it is created if missing)"
        ) from None
    except OSError as err:
        raise RunDirError(
            f"output_root={str(root)!r}: cannot create {base} ({err.strerror}); set "
            "output_root to a folder you can write to"
        ) from None
    return base


def claim_run_dir(run_dir: Path) -> bool:
    """Lock ``run_dir`` for this run; return False if another live run holds it.

    Atomic: of two runs claiming one folder at once, exactly one gets it. The claim is
    released by :func:`release_run_dir` or when the process ends.
    """
    if run_dir in _claims:
        return False  # claimed by an earlier run in this process
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(run_dir / CLAIM_FILE, os.O_CREAT | os.O_RDWR, 0o644)
    except (FileExistsError, NotADirectoryError):
        return False  # a file of that name is in the way
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return False
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}@{socket.gethostname()}\n".encode())
    _claims[run_dir] = fd
    return True


def release_run_dir(run_dir: Path) -> None:
    """Release this process's claim of ``run_dir`` (the file stays, unlocked)."""
    if (fd := _claims.pop(run_dir, None)) is not None:
        os.close(fd)


def make_run_dir(settings: Settings, root: str | os.PathLike[str] | None = None) -> Path:
    """Create, claim and return the run's absolute output directory.

    ``<output_root>/<run_name>``; a relative root is resolved against the current
    working directory (for ``flwr run`` that is where the SuperLink was started). A
    folder that holds another run's results, or that a running run has claimed, is
    not reused: the name gets a suffix (``-2``, ``-3``, ...).

    Raises
    ------
    RunDirError
        If ``output_root`` is a file or cannot be created.
    """
    base = _output_root(root if root is not None else settings.output_root)
    name = settings.run_name or (
        f"{dt.datetime.now():%Y%m%d-%H%M%S}_{settings.strategy.name}_{settings.dataset.name}"
    )
    for suffix in itertools.count(1):
        run_dir = base / (str(name) if suffix == 1 else f"{name}-{suffix}")
        if (run_dir / METRICS_FILE).exists():  # never mix two runs' results
            continue
        if claim_run_dir(run_dir):
            return run_dir
    raise AssertionError("unreachable")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers never see a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class RunRecorder:
    """Writes a run's results under ``run_dir``; optionally mirrors metrics to W&B.

    It is the only writer of ``metrics.jsonl``: :meth:`log_round` appends a finished
    round, :meth:`restart_metrics` replaces the file by the records of a checkpoint.
    """

    def __init__(self, run_dir: Path, settings: Settings) -> None:
        self.run_dir = run_dir
        self.settings = settings
        yaml = OmegaConf.to_yaml(OmegaConf.create(settings.to_dict()))
        atomic_write_bytes(run_dir / CONFIG_FILE, yaml.encode())
        self._load_history: list[list[int]] = []
        self._wandb = self._start_wandb(settings) if settings.wandb.enabled else None

    def _start_wandb(self, settings: Settings) -> Any:
        os.environ.setdefault("WANDB_DIR", str(self.run_dir))
        import wandb

        return wandb.init(
            project=settings.wandb.project,
            entity=settings.wandb.entity,
            group=settings.wandb.group,
            mode=settings.wandb.mode,
            dir=str(self.run_dir),
            name=self.run_dir.name,
            config=settings.to_dict(),
        )

    def restart_metrics(self, records: Iterable[RoundRecord]) -> None:
        """Replace ``metrics.jsonl`` by ``records`` (those of the checkpoint resumed from).

        A run killed after its checkpoint but before the round's line, or after lines
        that the checkpoint does not hold yet, then has exactly one line per finished
        round, as an uninterrupted run.
        """
        lines = "".join(json.dumps(r.to_json(), sort_keys=True) + "\n" for r in records)
        atomic_write_bytes(self.run_dir / METRICS_FILE, lines.encode())

    def log_round(self, record: RoundRecord) -> None:
        """Append one finished round as a JSON line (and log its scalars to W&B)."""
        flat = record.to_json()
        line = json.dumps(flat, sort_keys=True)
        with open(self.run_dir / METRICS_FILE, "a", encoding="utf-8") as f:
            f.write(line + "\n")
        if self._wandb is not None:
            # W&B charts are named as the stored figures.
            scalars = {k: v for k, v in flat.items() if isinstance(v, (int, float))}
            loads = record.loads
            for name, per_expert in (
                ("load_clients", loads.clients),
                ("load_samples", loads.samples),
            ):
                for expert, load in enumerate(per_expert or []):  # one chart line per expert
                    scalars[f"{name}/expert_{expert}"] = load
            for phase, seconds in (record.timing.client_phases_s or {}).items():  # one per phase
                scalars[f"client_time_s/{phase}"] = seconds
            self._wandb.log(scalars, step=record.round)
            self._load_history.append(loads.clients or [])

    def save_model(self, arrays: Mapping[str, np.ndarray]) -> Path:
        """Save the final global backbone and experts as ``final_model.npz``."""
        import io

        buffer = io.BytesIO()
        np.savez(buffer, **dict(arrays))
        path = self.run_dir / MODEL_FILE
        atomic_write_bytes(path, buffer.getvalue())
        return path

    def save_summary(self, summary: Mapping[str, Any]) -> None:
        """Write the run's summary (final figures, fitness table, cumulative loads)."""
        atomic_write_bytes(
            self.run_dir / SUMMARY_FILE,
            json.dumps(plain(summary), indent=2).encode(),
        )

    def close(self) -> None:
        """Log the expert-load heatmap to W&B and finish the run, if one was started."""
        if self._wandb is None:
            return
        if self._load_history:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
            import wandb

            from .plots import draw_load_heatmap

            fig, ax = plt.subplots(figsize=(6, 3.5))
            draw_load_heatmap(ax, self._load_history)
            ax.set_title("expert load (clients holding) per round")
            self._wandb.log({"expert_load_heatmap": wandb.Image(fig)})
            plt.close(fig)
        self._wandb.finish()
        self._wandb = None


def read_metrics(run_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Return the per-round lines of a run directory's ``metrics.jsonl``, as stored."""
    path = Path(run_dir) / METRICS_FILE
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def read_records(run_dir: str | os.PathLike[str]) -> list[RoundRecord]:
    """Return the per-round records of a run directory."""
    return [RoundRecord.from_json(line) for line in read_metrics(run_dir)]
