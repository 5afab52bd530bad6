"""Find and stop the background Flower processes a test started (by their FLWR_HOME)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def pids_with_env(name: str, value: str) -> list[int]:
    """Return the pids of processes whose environment has ``name=value``."""
    needle = f"{name}={value}".encode()
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if needle in (proc / "environ").read_bytes().split(b"\0"):
                found.append(int(proc.name))
        except OSError:  # gone, or not ours to read
            continue
    return found


def stop_processes(pids: list[int], grace_s: float = 5.0) -> None:
    """SIGTERM, then SIGKILL what is still alive after ``grace_s``."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        time.sleep(0.2)
        alive = [p for p in alive if Path(f"/proc/{p}").exists() and not _zombie(p)]
    for pid in alive:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _zombie(pid: int) -> bool:
    try:
        return " Z " in Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True


def stop_flower(flwr_home: str) -> None:
    """Stop every process started with ``FLWR_HOME=flwr_home`` (SuperLink, Ray, apps)."""
    stop_processes(pids_with_env("FLWR_HOME", flwr_home))


def flwr_run(
    overrides: str, env: dict[str, str], federation_config: str | None = None, timeout: float = 600
) -> str:
    """Run ``flwr run . --stream`` in the project with Hydra ``overrides``; return its log.

    Asserts that it exited 0 (which ``flwr run`` does even when the ServerApp fails:
    callers check the log or the run folder too).
    """
    flwr = str(Path(sys.executable).parent / "flwr")
    command = [flwr, "run", ".", "--stream"]
    if federation_config is not None:
        command += ["--federation-config", federation_config]
    command += ["--run-config", f'overrides="{overrides}"']
    proc = subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    return log
