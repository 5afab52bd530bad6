"""The process handling every launch tool shares: ports, liveness, stopping, readiness.

On Linux, whether a pid still runs and when it started are read from ``/proc``: a pid
recorded earlier may since belong to someone else's process, and its start time tells
the two apart. Without ``/proc``, a pid counts as running while signal 0 reaches it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

LOOPBACK = "127.0.0.1"
HEALTH_POLL_S = 0.25
STOP_POLL_S = 0.1

# A process to stop: its pid and, if known, its start time (clock ticks since boot).
Target = tuple[int, int | None]


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def start_time(pid: int) -> int | None:
    """Return the start time of ``pid`` in clock ticks since boot (None if gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 22; the command name (field 2) may hold spaces, so split after its ")".
    return int(stat.rsplit(")", 1)[1].split()[19])


def alive(pid: int, started: int | None = None) -> bool:
    """Whether ``pid`` runs (a zombie does not) and, if given, started at ``started``."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return started is None and _reached_by_signal(pid)
    return fields[0] != "Z" and (started is None or int(fields[19]) == started)


def _reached_by_signal(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _children(pid: int) -> list[int]:
    kids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            kids.append(int(entry.name))
    return kids


def descendants(pid: int) -> list[int]:
    """Return every live descendant of ``pid`` (children first found, depth first)."""
    found, stack = [], [pid]
    while stack:
        for child in _children(stack.pop()):
            found.append(child)
            stack.append(child)
    return found


def _signal(targets: Sequence[Target], signum: signal.Signals) -> None:
    for pid, started in targets:
        if alive(pid, started):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signum)


def stop(targets: Sequence[Target], grace_s: float) -> None:
    """SIGTERM the targets still running, then SIGKILL those alive after ``grace_s``.

    A target is signalled only while it is still the process that was recorded (same
    start time, when one is given), so a recycled pid is left alone.
    """
    _signal(targets, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(alive(p, s) for p, s in targets):
        time.sleep(STOP_POLL_S)
    _signal(targets, signal.SIGKILL)


def kill(targets: Sequence[Target]) -> None:
    """SIGKILL the targets still running at once: no chance to say goodbye."""
    _signal(targets, signal.SIGKILL)


def stop_child(process: subprocess.Popen[Any], grace_s: float) -> None:
    """SIGTERM a child process, then SIGKILL it if it is still alive after ``grace_s``."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def answers_health(port: int, ca: str | None = None) -> bool:
    """Whether a Flower SuperLink answers ``/health`` on the loopback port.

    With ``ca`` (a CA certificate file) it is asked over TLS.
    """
    scheme = "https" if ca else "http"
    context = ssl.create_default_context(cafile=ca) if ca else None
    try:
        with urllib.request.urlopen(
            f"{scheme}://{LOOPBACK}:{port}/health", timeout=1.0, context=context
        ) as reply:
            return 200 <= reply.status < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


def wait_for_health(
    port: int, timeout_s: float, running: Callable[[], bool], ca: str | None = None
) -> bool:
    """Wait until :func:`answers_health`; False once ``running()`` is false or time is up."""
    deadline = time.monotonic() + timeout_s
    while running() and time.monotonic() < deadline:
        if answers_health(port, ca):
            return True
        time.sleep(HEALTH_POLL_S)
    return False
