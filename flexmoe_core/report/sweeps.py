"""Sweep jobs: the status each job leaves (``status.json``) and the trials table."""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ..results import COMPLETED, FAILED
from .runs import visible_files

JOB_STATUS_FILE = "status.json"
SEARCH_RESULTS_FILE = "optimization_results.yaml"  # written by Hydra's Optuna sweeper


# ------------------------------------------------------------------ sweep jobs
@dataclass
class JobStatus:
    """How one sweep job went: ``<job dir>/status.json``, written by ``flexmoe-sweep``."""

    job: int  # Hydra's job number: the trial number of a search
    overrides: list[str]  # the overrides that define the run
    status: str  # COMPLETED or FAILED
    objective: str | None = None
    direction: str | None = None
    value: float | None = None  # the objective; None when failed or not measured
    exit_code: int | None = None
    seconds: float | None = None
    finished_at: float | None = None  # epoch seconds
    skipped_at: float | None = None  # when a later run of the sweep last skipped it
    resumed: bool = False  # picked up from a checkpoint of an interrupted attempt
    error: str | None = None
    path: Path | None = field(default=None, compare=False)  # the job dir (not stored)

    def write(self, job_dir: Path) -> None:
        """Write ``status.json`` into ``job_dir``."""
        data = {k: v for k, v in asdict(self).items() if k != "path"}
        if data["value"] is not None and not math.isfinite(data["value"]):
            data["value"] = None  # JSON has no NaN
        (job_dir / JOB_STATUS_FILE).write_text(json.dumps(data, indent=2), encoding="utf-8")

    @classmethod
    def read(cls, job_dir: Path) -> JobStatus | None:
        """Read ``status.json`` from ``job_dir`` (None if absent or unreadable)."""
        try:
            data = json.loads((job_dir / JOB_STATUS_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if "status" not in data and "ok" in data:  # written by an older flexmoe-sweep
            data["status"] = COMPLETED if data["ok"] else FAILED
        known = {f.name for f in fields(cls)} - {"path"}
        try:
            return cls(**{k: v for k, v in data.items() if k in known}, path=job_dir)
        except TypeError:
            return None

    def params(self) -> dict[str, str]:
        """Return the overrides as ``{key: value}``."""
        return dict(o.split("=", 1) for o in self.overrides if "=" in o)


def find_sweep_jobs(folders: Sequence[str | Path]) -> dict[Path, list[JobStatus]]:
    """Return ``{sweep dir: jobs in job order}`` for every sweep job below ``folders``."""
    sweeps: dict[Path, list[JobStatus]] = defaultdict(list)
    for folder in folders:
        for path in visible_files(Path(folder), JOB_STATUS_FILE):
            status = JobStatus.read(path.parent)
            if status is not None:
                sweeps[path.parent.parent].append(status)
    return {sweep: sorted(jobs, key=lambda j: j.job) for sweep, jobs in sorted(sweeps.items())}


def best_job(jobs: Sequence[JobStatus], direction: str | None = None) -> JobStatus | None:
    """Return the completed job with the best objective (None if none has one)."""
    scored = [j for j in jobs if j.status == COMPLETED and j.value is not None]
    if not scored:
        return None
    sign = -1.0 if (direction or scored[0].direction) == "minimize" else 1.0
    return max(scored, key=lambda j: sign * float(j.value))  # type: ignore[arg-type]


def varying_params(jobs: Sequence[JobStatus]) -> list[str]:
    """Return the override keys whose value differs between jobs (all keys for one job)."""
    params = [j.params() for j in jobs]
    keys = sorted({k for p in params for k in p})
    if len(jobs) < 2:
        return keys
    return [k for k in keys if len({p.get(k) for p in params}) > 1]


def _short(value: str) -> str:
    """Shorten a float as Optuna writes it (0.09276005809908329 -> 0.09276)."""
    try:
        number = float(value)
    except ValueError:
        return value
    return value if len(value) <= 8 or number.is_integer() else f"{number:.4g}"


def write_trials(sweeps: dict[Path, list[JobStatus]], out: Path) -> None:
    """Write ``trials.md`` and ``trials.csv``: one row per sweep job (trial).

    The Markdown table shows numbers to 4 significant digits; the CSV has the
    overrides exactly as the jobs ran them.
    """
    lines = [
        "One row per sweep job; for a search, the job number is the trial number. "
        "`failed` jobs are not results.",
    ]
    rows: list[list[Any]] = []
    for sweep_dir, jobs in sweeps.items():
        keys = varying_params(jobs)
        best = best_job(jobs)
        objective = next((j.objective for j in jobs if j.objective), None) or "objective"
        direction = next((j.direction for j in jobs if j.direction), None)
        kind = "search" if (sweep_dir / SEARCH_RESULTS_FILE).is_file() else "sweep"
        counts = {s: sum(j.status == s for j in jobs) for s in (COMPLETED, FAILED)}
        lines += [
            "",
            f"### {kind} {sweep_dir}",
            "",
            f"{len(jobs)} jobs: {counts[COMPLETED]} completed, {counts[FAILED]} failed; "
            f"objective `{objective}` ({direction or 'maximize'})"
            + (f"; best: job {best.job}" if best else ""),
            "",
            "| job | status | " + objective + " | " + " | ".join(keys) + " |",
            "|---" * (len(keys) + 3) + "|",
        ]
        for job in jobs:
            params = job.params()
            value = "–" if job.value is None else f"{job.value:.4f}"
            mark = " (best)" if job is best else ""
            lines.append(
                f"| {job.job}{mark} | {job.status} | {value} | "
                + " | ".join(_short(params.get(k, "")) for k in keys)
                + " |"
            )
            rows.append(
                [
                    str(sweep_dir),
                    job.job,
                    job.status,
                    job.objective,
                    job.value,
                    " ".join(job.overrides),
                    job.seconds,
                ]
            )
    (out / "trials.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with open(out / "trials.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["sweep", "job", "status", "objective", "value", "overrides", "seconds"])
        writer.writerows(rows)
