"""Install profiles: the device's ClientApp path needs no server-only package."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement
from run_helpers import fast_config
from test_deployment import write_digits_folder

from flexmoe_core.config import to_container

ROOT = Path(__file__).resolve().parents[1]
CHECK = ROOT / "tests" / "client_profile_check.py"
CLIENT_PYPROJECT = ROOT / "packaging" / "client" / "pyproject.toml"


@pytest.fixture(scope="module")
def client_inputs(tmp_path_factory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("client-profile")
    run_config = tmp / "run-config.json"
    run_config.write_text(json.dumps(to_container(fast_config("run_name=profile"))))
    return run_config, write_digits_folder(tmp / "digits", per_class=6)


def run_check(python: str, inputs: tuple[Path, Path], *flags: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [python, str(CHECK), str(inputs[0]), str(inputs[1]), *flags],
        env=env,
        cwd=inputs[0].parent,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_client_app_trains_with_server_only_packages_blocked(client_inputs) -> None:
    done = run_check(sys.executable, client_inputs, "--block")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "client profile ok" in done.stdout


def test_the_blocker_catches_a_server_only_import() -> None:
    # What makes the test above able to fail: with the blocker, a client-path module
    # that imported scipy (as the server's allocation does) would fail to import.
    probe = (
        "import sys; sys.path.insert(0, 'tests'); import client_profile_check as c; "
        "sys.meta_path.insert(0, c.Blocker()); import flexmoe_core.allocation.flow"
    )
    blocked = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert blocked.returncode != 0
    assert "server-only package 'scipy'" in blocked.stderr


def _requirements(deps: list[str]) -> dict[str, Requirement]:
    return {(r := Requirement(d)).name: r for d in deps}


def test_client_profile_pins_its_packages_as_the_full_install() -> None:
    full = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    client = tomllib.loads(CLIENT_PYPROJECT.read_text())["project"]
    base = _requirements(full["dependencies"])
    for name, req in _requirements(client["dependencies"]).items():
        assert name in base, f"{name} is in the client profile but not in the full install"
        assert req.specifier == base[name].specifier, name
    assert not Requirement(next(d for d in client["dependencies"] if "flwr" in d)).extras
    assert client["scripts"] == {k: v for k, v in full["scripts"].items() if k in client["scripts"]}
    export = _requirements(full["optional-dependencies"]["export"])
    assert _requirements(client["optional-dependencies"]["export"]) == export


@pytest.mark.slow
def test_fresh_venv_with_the_client_profile_only(client_inputs, tmp_path) -> None:
    """Install the client profile alone into a new venv and run the check there."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = str(venv / "bin" / "python")
    install = subprocess.run(
        [python, "-m", "pip", "install", "-q", "torch==2.13.0", str(CLIENT_PYPROJECT.parent)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    listed = subprocess.run(
        [python, "-m", "pip", "list", "--format", "json"], capture_output=True, text=True
    )
    names = {p["name"].lower() for p in json.loads(listed.stdout)}
    assert not names & {"ray", "cvxpy", "scikit-learn", "matplotlib", "wandb", "opacus", "scipy"}
    done = run_check(python, client_inputs)
    assert done.returncode == 0, done.stdout + done.stderr
