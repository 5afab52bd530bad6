"""The process helpers the launch tools share: liveness by start time, stop with a grace."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from flexmoe_launch.processes import alive, free_port, start_time, stop, wait_for_health

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")

IGNORES_SIGTERM = (
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    "print('ready', flush=True); time.sleep(60)"
)


def test_stop_kills_what_outlives_its_grace_and_spares_a_recycled_pid() -> None:
    child = subprocess.Popen([sys.executable, "-c", IGNORES_SIGTERM], stdout=subprocess.PIPE)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == b"ready"
        started = start_time(child.pid)
        assert started is not None and alive(child.pid) and alive(child.pid, started)
        stop([(child.pid, started + 1)], grace_s=0.2)  # another process's start time
        assert child.poll() is None
        stop([(child.pid, started)], grace_s=0.5)
        assert child.wait(timeout=30) == -signal.SIGKILL
        assert not alive(child.pid, started)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def test_waiting_for_health_ends_when_the_process_is_gone() -> None:
    assert wait_for_health(free_port(), 30.0, lambda: False) is False
