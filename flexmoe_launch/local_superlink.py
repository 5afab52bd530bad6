"""A private local SuperLink for one sweep job: its own Flower home, its own port.

``flwr run`` on a local simulation connection uses one SuperLink per machine: it asks
``127.0.0.1:$FLWR_LOCAL_SUPERLINK_HTTP_API_PORT`` (39091 unless set) for ``/health``
and, if nothing answers, starts ``flower-superlink`` there, detached, with the Flower
home, environment and working directory of whoever came first. Two sweep jobs at
once would therefore share one SuperLink (the second job's environment and home are
silently ignored) or race for the port. Instead, each job

1. makes a fresh Flower home (``FLWR_HOME``) in the temporary folder,
2. starts ``flower-superlink`` itself, as ``flwr`` would, on a free port — choosing
   the port and binding it under a per-user lock, so parallel jobs never pick the
   same one — and waits for its ``/health``,
3. points ``flwr run`` at it with the two variables ``flwr`` reads, so ``flwr`` finds
   it running and uses it,
4. when the run ends, stops it by pid, then every process still running with that
   Flower home (SuperExec, ServerApp, simulation, Ray), and deletes the home.

A job killed before step 4 (SIGKILL, OOM killer) would leave its run going on in the
background — and a re-run of the sweep would race it for the same run folder. So a
small watchdog process (``python -m flexmoe_launch.local_superlink --watch``) does step 4
the moment the job process is gone (Linux: it finds the processes in ``/proc``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from .processes import free_port, stop, stop_child, wait_for_health

PORT_ENV = "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"  # read by `flwr run` (flwr.cli.constant)
HOME_ENV = "FLWR_HOME"
STARTUP_TIMEOUT_S = 120.0  # a loaded 2-core machine needs far more than flwr's 15 s
STOP_GRACE_S = 10.0
WATCH_INTERVAL_S = 0.5
LOG_NAME = "superlink.log"


class SuperLinkError(RuntimeError):
    """The private SuperLink did not start."""


def _executable(name: str) -> str:
    beside = Path(sys.executable).with_name(name)
    return str(beside) if beside.exists() else name


@contextlib.contextmanager
def _port_lock() -> Iterator[None]:
    """Hold a per-user lock while a job picks a port and its SuperLink binds it."""
    try:
        import fcntl
    except ImportError:  # Windows: no flock; a lost race shows as a failed start
        yield
        return
    path = Path(tempfile.gettempdir()) / f"flexmoe-superlink-ports-{os.getuid()}.lock"
    with open(path, "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def superlink_command(home: Path, port: int) -> list[str]:
    """Return the ``flower-superlink`` command ``flwr`` itself uses for local simulation."""
    runtime = home / "local-superlink"
    runtime.mkdir(parents=True, exist_ok=True)
    return [
        _executable("flower-superlink"),
        "--insecure",
        "--simulation",
        "--isolation",
        "subprocess",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--database",
        str(runtime / "state.db"),
        "--log-file",
        str(runtime / LOG_NAME),
    ]


def _start(home: Path, env: Mapping[str, str], cwd: Path) -> tuple[subprocess.Popen[bytes], int]:
    process: subprocess.Popen[bytes] | None = None
    for _attempt in range(3):
        with _port_lock():
            port = free_port()
            process = subprocess.Popen(
                superlink_command(home, port),
                cwd=cwd,
                env={**env, HOME_ENV: str(home), "FLWR_DISABLE_UPDATE_CHECK": "1"},
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            if wait_for_health(port, STARTUP_TIMEOUT_S, lambda p=process: p.poll() is None):
                return process, port
        if process.poll() is None:  # neither healthy nor exited in time: give up
            stop_child(process, STOP_GRACE_S)
            break
        # It exited: most likely another program took the port; try another one.
    log = home / "local-superlink" / LOG_NAME
    tail = log.read_text(errors="replace").splitlines()[-10:] if log.is_file() else []
    raise SuperLinkError(
        "could not start a local SuperLink (flower-superlink"
        + (f", exit code {process.returncode}" if process and process.returncode else "")
        + ")"
        + ("; its log ends with:\n" + "\n".join(tail) if tail else "")
    )


def pids_using_home(home: Path) -> list[int]:
    """Return pids of this user's processes started with ``FLWR_HOME=home`` (Linux)."""
    needle = f"{HOME_ENV}={home}".encode()
    found: list[int] = []
    proc = Path("/proc")
    if not proc.is_dir():
        return found
    for entry in proc.iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:  # gone, or not ours
            continue
    return found


def clean_up(home: Path, grace_s: float = 5.0) -> None:
    """Stop every process started with this Flower home, then delete the home."""
    for _sweep in range(5):  # again, in case one started another while we looked
        pids = pids_using_home(home)
        if not pids:
            break
        stop([(pid, None) for pid in pids], grace_s)
    shutil.rmtree(home, ignore_errors=True)


def _start_watchdog(home: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if k != HOME_ENV}  # never in its own list
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "flexmoe_launch.local_superlink",
            "--watch",
            str(os.getpid()),
            str(home),
        ],
        env={**env, "PYTHONPATH": os.pathsep.join(sys.path)},
        stdin=subprocess.DEVNULL,
        start_new_session=True,  # a Ctrl-C meant for the sweep must not stop it first
    )


def watch(parent: int, home: Path) -> None:
    """Wait until ``parent`` is gone (or ``home`` deleted); then clean up after it."""
    while home.exists():
        if os.getppid() != parent:  # the job died: we were handed to another parent
            clean_up(home, grace_s=2.0)
            return
        time.sleep(WATCH_INTERVAL_S)


@dataclass(frozen=True)
class LocalSuperLink:
    """A running private SuperLink: its Flower home, port and pid."""

    home: Path
    port: int
    pid: int

    @property
    def log(self) -> Path:
        """The SuperLink's own log (start-up errors land here, not in ``flwr run``)."""
        return self.home / "local-superlink" / LOG_NAME

    def env(self) -> dict[str, str]:
        """Return the variables that make ``flwr run`` use this SuperLink."""
        return {HOME_ENV: str(self.home), PORT_ENV: str(self.port)}


@contextlib.contextmanager
def private_superlink(env: Mapping[str, str], cwd: Path) -> Iterator[LocalSuperLink]:
    """Run a private local SuperLink for the duration of the block.

    Parameters
    ----------
    env : mapping
        Environment of the SuperLink (PATH must reach the Flower executables).
    cwd : Path
        Its working directory (the app folder, like a hand-typed ``flwr run .``).

    Raises
    ------
    SuperLinkError
        If it does not answer ``/health`` within :data:`STARTUP_TIMEOUT_S`.
    """
    home = Path(tempfile.mkdtemp(prefix="flexmoe-flwr-home-"))
    watchdog = _start_watchdog(home)
    process = None
    try:
        process, port = _start(home, env, cwd)
        yield LocalSuperLink(home, port, process.pid)
    finally:
        if process is not None:
            stop_child(process, STOP_GRACE_S)
        clean_up(home)  # SuperExec, ServerApp, Ray left behind; then the home
        stop_child(watchdog, grace_s=2.0)  # it also ends by itself once home is gone


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m flexmoe_launch.local_superlink --watch PARENT_PID HOME`` (the watchdog)."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--watch", nargs=2, metavar=("PARENT_PID", "HOME"), required=True)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    watch(int(args.watch[0]), Path(args.watch[1]))


if __name__ == "__main__":
    main()
