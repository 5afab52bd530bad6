"""Hydra entry point: one Flower run per job, results in the job's output directory.

    flexmoe-sweep -m strategy=flexmoe,greedy seed=0,1,2 experiment=cpu_cifar10_dirichlet

Each job composes the same ``conf/`` tree, then launches ``flwr run <app> --stream``
with the job's overrides, so a sweep job and a hand-typed ``flwr run`` are the same
run. A failing job is recorded (``status.json`` and ``flwr.log`` in its directory)
and the sweep goes on with the next one.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig

from flexmoe_core.config import conf_dir

ROUND_LINE = re.compile(r"\[round (\d+)/(\d+)\]")
STATUS_FILE = "status.json"
_SWEEP_START = time.monotonic()
_FINISHED_JOB_SECONDS: list[float] = []


def count_jobs(argv: list[str]) -> int:
    """Return how many jobs a multirun command line expands to (1 without sweeps)."""
    overrides = [a for a in argv if "=" in a and not a.startswith("-")]
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception:  # an unparsable line fails in Hydra itself, with its own message
        return 1
    sizes = [len(list(o.sweep_string_iterator())) for o in parsed if o.is_sweep_override()]
    return max(1, math.prod(sizes)) if sizes else 1


def hydra_quote(value: str) -> str:
    """Quote a value for a Hydra override (job folder names hold '=' and ',')."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def flwr_command(cfg: DictConfig, app_dir: Path, overrides: list[str]) -> list[str]:
    """Return the ``flwr run`` command of one job."""
    flwr = Path(sys.executable).with_name("flwr")
    command = [str(flwr) if flwr.exists() else "flwr", "run", str(app_dir)]
    if cfg.sweep.federation:
        command.append(str(cfg.sweep.federation))
    else:
        command += ["--federation-config", f"num-supernodes={int(cfg.num_clients)}"]
    joined = " ".join(overrides)
    if '"' in joined:  # Flower's run-config string cannot hold a double quote
        raise ValueError(f"Use single quotes in overrides, not double quotes: {joined}")
    return [*command, "--stream", "--run-config", f'overrides="{joined}"']


def default_app_dir() -> Path:
    """Return the project folder holding ``pyproject.toml`` (a source checkout)."""
    root = Path(__file__).resolve().parents[1]
    if not (root / "pyproject.toml").is_file():
        raise FileNotFoundError(
            f"No pyproject.toml beside {root}; set sweep.app_dir to the FLEX-MoE app folder"
        )
    return root


def progress(job: int, jobs: int, label: str, line: str, job_started: float) -> str | None:
    """Return a progress line for a ``[round r/R]`` log line (else ``None``)."""
    match = ROUND_LINE.search(line)
    if match is None:
        return None
    done, total = int(match.group(1)), int(match.group(2))
    elapsed_job = time.monotonic() - job_started
    this_job = elapsed_job * total / max(done, 1)  # extrapolated from its own rounds
    per_job = (
        sum(_FINISHED_JOB_SECONDS) / len(_FINISHED_JOB_SECONDS)
        if _FINISHED_JOB_SECONDS
        else this_job
    )
    left = max(this_job - elapsed_job, 0.0) + per_job * (jobs - job - 1)
    return (
        f"[sweep] job {job + 1}/{jobs} ({label}): round {done}/{total} | "
        f"elapsed {time.monotonic() - _SWEEP_START:.0f} s | about {left:.0f} s left"
    )


@hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="config")
def main(cfg: DictConfig) -> None:
    """Run one Flower simulation for this Hydra job and record how it went."""
    hydra_cfg = HydraConfig.get()
    job_dir = Path(hydra_cfg.runtime.output_dir)
    job = int(hydra_cfg.job.get("num", 0) or 0)
    jobs = count_jobs(sys.argv[1:])
    task = [o for o in hydra_cfg.overrides.task if not o.startswith("sweep.")]
    label = " ".join(task) or "defaults"
    overrides = [
        *task,
        f"output_root={hydra_quote(str(job_dir.parent))}",
        f"run_name={hydra_quote(job_dir.name)}",
    ]
    app_dir = Path(cfg.sweep.app_dir) if cfg.sweep.app_dir else default_app_dir()
    command = flwr_command(cfg, app_dir, overrides)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"

    print(f"[sweep] job {job + 1}/{jobs} ({label}) -> {job_dir}", flush=True)
    started = time.monotonic()
    with open(job_dir / "flwr.log", "w", encoding="utf-8") as log_file:
        proc = subprocess.Popen(
            command,
            cwd=app_dir,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            log_file.write(line)
            if cfg.sweep.stream_log:
                print(line, end="", flush=True)
            elif (message := progress(job, jobs, label, line, started)) is not None:
                print(message, flush=True)
        code = proc.wait()
    seconds = time.monotonic() - started
    _FINISHED_JOB_SECONDS.append(seconds)
    ok = code == 0 and (job_dir / "summary.json").is_file()
    status = {"job": job, "overrides": task, "ok": ok, "exit_code": code, "seconds": seconds}
    (job_dir / STATUS_FILE).write_text(json.dumps(status, indent=2))
    if ok:
        print(f"[sweep] job {job + 1}/{jobs} done in {seconds:.0f} s", flush=True)
    else:
        tail = "".join((job_dir / "flwr.log").read_text().splitlines(keepends=True)[-15:])
        print(
            f"[sweep] job {job + 1}/{jobs} FAILED (exit {code}) after {seconds:.0f} s; "
            f"log: {job_dir / 'flwr.log'}\n{tail}",
            flush=True,
        )


if __name__ == "__main__":
    main()
