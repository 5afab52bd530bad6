"""Find and stop the background Flower processes a test started (by their FLWR_HOME)."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path


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
