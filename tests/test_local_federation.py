"""The local federation command's own parts: config.toml edits, stopping a local SuperLink."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from flexmoe_launch import local_federation as fed

USER_CONFIG = """\
# my federations
[superlink]
default = "local"

[superlink.local]
address = ":local:"  # Flower's simulation

[superlink.lab]
address = "10.0.0.5:9093"
root-certificates = "/etc/lab/ca.pem"  # the lab's CA
"""


def test_connection_entry_is_added_and_removed_keeping_the_rest(tmp_path) -> None:
    (tmp_path / "config.toml").write_text(USER_CONFIG)
    entry = {"address": "127.0.0.1:5000", "insecure": True}
    path = fed.write_connection(tmp_path, "flexmoe-local", entry)
    text = path.read_text()
    assert text.startswith(USER_CONFIG)  # comments, order and layout untouched
    assert '[superlink.flexmoe-local]\naddress = "127.0.0.1:5000"\ninsecure = true' in text
    fed.write_connection(tmp_path, "flexmoe-local", None)
    assert path.read_text().rstrip() == USER_CONFIG.rstrip()


def test_a_missing_config_gets_flowers_default_entry(tmp_path) -> None:
    path = fed.write_connection(tmp_path, "x", {"address": "127.0.0.1:1", "insecure": True})
    import tomllib

    config = tomllib.loads(path.read_text())
    assert config["superlink"]["local"] == {"address": ":local:"}
    assert config["superlink"]["default"] == "local"
    assert config["superlink"]["x"]["insecure"] is True


def _fake_superlink(bin_dir: Path, home: Path) -> subprocess.Popen:
    """A process that looks like `flwr run`'s local SuperLink of ``home``."""
    program = bin_dir / "flower-superlink"
    if not program.exists():
        bin_dir.mkdir(parents=True, exist_ok=True)
        program.write_text(f"#!{sys.executable}\nimport time\ntime.sleep(600)\n")
        program.chmod(0o755)
    log = home / "local-superlink" / "superlink.log"
    return subprocess.Popen([str(program), "--insecure", "--log-file", str(log)])


def test_stop_local_stops_only_the_superlink_of_this_flower_home(tmp_path, monkeypatch) -> None:
    mine = _fake_superlink(tmp_path / "bin", tmp_path / "mine")
    other = _fake_superlink(tmp_path / "bin", tmp_path / "other")
    try:
        deadline = time.monotonic() + 30
        while not fed.local_superlinks(tmp_path / "mine") and time.monotonic() < deadline:
            time.sleep(0.1)  # until the process has exec'd
        assert fed.local_superlinks(tmp_path / "mine") == [mine.pid]
        monkeypatch.setenv("FLWR_HOME", str(tmp_path / "mine"))
        assert fed.main(["stop-local"]) == 0
        assert mine.wait(timeout=30) is not None
        assert other.poll() is None  # another Flower home's SuperLink runs on
        assert fed.main(["stop-local"]) == 0  # nothing left: says so
    finally:
        for process in (mine, other):
            if process.poll() is None:
                os.kill(process.pid, 9)
                process.wait()


def test_federation_command_is_installed_and_runs_from_a_checkout() -> None:
    import tomllib

    root = Path(__file__).resolve().parents[1]
    scripts = tomllib.loads((root / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["flexmoe-federation"] == "flexmoe_launch.local_federation:main"
    done = subprocess.run(
        [sys.executable, "-m", "flexmoe_launch.local_federation", "--help"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0 and "stop-local" in done.stdout
