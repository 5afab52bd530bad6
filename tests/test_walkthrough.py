"""docs/deployment.md's device walk-through, command by command, on loopback.

The commands are read from the document (the ``<!-- walkthrough: NAME -->`` blocks)
and run as written, with the operator's address and port mapped to loopback and a free
port, in a temporary home folder. Between the blocks the test does what the text asks
a person to do (copy a file from one machine to the other) and waits for what a
person would wait for (the SuperLink to answer, the device to be online).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from flower_processes import stop_flower
from test_deployment import write_digits_folder

from flexmoe_core.results import read_metrics
from flexmoe_launch import local_federation as fed

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "deployment.md"
BIN = Path(sys.executable).parent
BLOCK = re.compile(r"<!-- walkthrough: ([\w-]+) -->\n```bash\n(.*?)```", re.S)
# The newest run's id, for the document's `<run-id>` placeholders.
NEWEST_RUN = (
    "$(flwr ls my-fed --format json | python3 -c 'import json, sys; "
    'runs = json.load(sys.stdin)["runs"]; '
    'print(max(runs, key=lambda r: int(r["run-id"]))["run-id"])\')'
)


def walkthrough_blocks() -> dict[str, str]:
    return dict(BLOCK.findall(DOC.read_text()))


def test_the_walkthrough_is_all_there() -> None:
    assert list(walkthrough_blocks()) == [
        "device-install",
        "operator-superlink",
        "device-credentials",
        "operator-register",
        "device-supernode",
        "operator-run",
        "device-lower-capacity",
        "operator-second-run",
        "operator-stop-run",
        "device-export",
        "device-stop",
        "operator-stop",
    ]
    # No command in the documentation stops processes by name.
    for doc in (DOC, ROOT / "README.md"):
        code = "".join(re.findall(r"```[a-z]*\n(.*?)```", doc.read_text(), re.S))
        assert "pkill" not in code and "killall" not in code, doc


ENTRY_POINTS = {
    "flexmoe-federation": "flexmoe_launch.local_federation:main",
    "flexmoe-export": "flexmoe_core.export:export_main",
    "flexmoe-predict": "flexmoe_core.export:predict_main",
}


def commands(home: Path) -> Path:
    """Return a folder with the project's commands that this environment lacks.

    An environment installed before a command was added to pyproject.toml does not
    have it yet; the same entry point, run by this interpreter, stands in for it.
    """
    folder = home.parent / "commands"
    folder.mkdir(exist_ok=True)
    for name, target in ENTRY_POINTS.items():
        if (BIN / name).exists():
            continue
        module, function = target.split(":")
        script = folder / name
        script.write_text(
            f"#!{sys.executable}\nimport sys\nfrom {module} import {function}\n"
            f"sys.exit({function}())\n"
        )
        script.chmod(0o755)
    return folder


class Walkthrough:
    """Runs the document's blocks in one home folder, as the device or the operator."""

    def __init__(self, home: Path, device_bin: Path) -> None:
        self.home, self.blocks = home, walkthrough_blocks()
        self.port, self.node_port = fed.free_port(), fed.free_port()
        self.env = {
            **os.environ,
            "HOME": str(home),
            "FLWR_HOME": str(home / ".flwr"),
            "XDG_CACHE_HOME": str(home / ".cache"),
            "FLEXMOE_CACHE_DIR": str(home / ".cache" / "flexmoe"),
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            # This checkout's code, also where the package was installed from another.
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
            "PATH": os.pathsep.join([str(commands(home)), str(BIN), os.environ.get("PATH", "")]),
        }
        # The device: the client-profile venv alone, nothing of this checkout's.
        self.device_env = {**self.env, "PYTHONPATH": ""}
        self.device_env["PATH"] = os.pathsep.join([str(device_bin), os.environ.get("PATH", "")])

    def command(self, name: str) -> str:
        text = self.blocks[name]
        text = text.replace("192.168.1.10", fed.LOOPBACK).replace("0.0.0.0", fed.LOOPBACK)
        text = text.replace(":8000", f":{self.port}").replace("--port 8000", f"--port {self.port}")
        # Its own ClientApp API port: other SuperNodes may run on this machine.
        text = text.replace("flower-supernode ", f"flower-supernode --port {self.node_port} ")
        return text.replace("<run-id>", NEWEST_RUN)

    def run(self, name: str, timeout: float = 300) -> str:
        device = name.startswith("device-")
        done = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", self.command(name)],
            cwd=self.home,
            env=self.device_env if device else self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        output = done.stdout + done.stderr
        assert done.returncode == 0, f"{name} failed:\n{output}\n{self.logs()}"
        return output

    def pid(self, name: str) -> int:
        return int((self.home / name).read_text())

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
            for p in (self.home / "superlink.log", self.home / "supernode.log")
            if p.is_file()
        )


def _wait(condition, timeout: float, what: str, walk: Walkthrough) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"waited {timeout:.0f} s for {what}\n{walk.logs()}"
        time.sleep(0.5)


# Slow: installing the client profile into a fresh venv, then two real runs through a
# SuperLink and a SuperNode, take minutes (about seven on two cores).
@pytest.mark.e2e
@pytest.mark.slow
def test_device_walkthrough(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "flexmoe").symlink_to(ROOT)  # the project, as cloned on both machines
    write_digits_folder(home / "flexmoe-data", per_class=15)  # the device's images
    walk = Walkthrough(home, home / "flexmoe-venv" / "bin")
    try:
        _run_walkthrough(walk)
    finally:
        stop_flower(walk.env["FLWR_HOME"])  # whatever a failed step left running


def _run_walkthrough(walk: Walkthrough) -> None:
    home = walk.home
    walk.run("device-install", timeout=1800)
    walk.run("operator-superlink")
    superlink = walk.pid("superlink.pid")
    record = {"pid": superlink, "start_time": fed.start_time(superlink)}
    record["log"] = str(home / "superlink.log")
    certs = home / "flexmoe-certs"
    fed.wait_for_superlink(walk.port, str(certs / "ca.pem"), 120, record)
    assert "[superlink.my-fed]" in (home / ".flwr" / "config.toml").read_text()

    walk.run("device-credentials")
    shutil.copy(certs / "ca.pem", home / ".flexmoe" / "ca.pem")  # operator -> device
    shutil.copy(home / ".flexmoe" / "device-key.pub", home / "device-key.pub")  # and back
    walk.run("operator-register")

    walk.run("device-supernode")
    state = {"name": "my-fed", "cli_home": str(home / ".flwr")}
    _wait(lambda: fed.online(state), 120, "the device to be online", walk)

    output = walk.run("operator-run", timeout=600)
    assert "Capacities from memory (capacity=auto), MiB by client: {7: 256.0}" in output
    run_dir = home / "flexmoe-runs" / "device-trial"
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"
    records = read_metrics(run_dir)
    assert [r["round"] for r in records] == [1, 2, 3]
    assert all(len(r["assignment"]["7"]) == 8 for r in records)  # 256 MiB: every expert

    walk.run("device-lower-capacity")
    walk.run("operator-second-run")
    second = home / "flexmoe-runs" / "device-trial-2" / "metrics.jsonl"
    _wait(second.is_file, 300, "round 1 of the second run", walk)
    assert len(read_metrics(second.parent)[0]["assignment"]["7"]) == 1  # the file's 1
    stopped = walk.run("operator-stop-run")
    assert "stopped" in stopped.lower() or "finished" in stopped.lower(), stopped

    shutil.copytree(run_dir, home / "device-trial")  # operator -> device
    output = walk.run("device-export")
    assert "against the dense model's" in output
    predictions = [line for line in output.splitlines() if "\t" in line]
    assert len(predictions) == len(list((home / "flexmoe-data" / "3").glob("*.png")))

    supernode = walk.pid("supernode.pid")
    walk.run("device-stop")
    walk.run("operator-stop")
    for pid in (supernode, superlink):
        _wait(lambda p=pid: not fed.alive(p), 60, f"pid {pid} to end", walk)
