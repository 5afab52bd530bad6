"""Deployment: SuperNodes with their own capacity and data, TLS, authentication."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from run_helpers import FAST, as_settings, fast_config, make_grid, node_configs, run_strategy

from flexmoe_core.checkpoint import checkpoint_path, load_checkpoint
from flexmoe_core.data.errors import DatasetError
from flexmoe_core.data.local_node import load_node_data
from flexmoe_core.node import NodeSettings
from flexmoe_core.results import read_metrics

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def node(node_config: dict[str, Any], node_id: int = 77) -> NodeSettings:
    return NodeSettings(node_id, node_config)


# ----------------------------------------------------------- node identity
def test_client_key_prefers_client_id_then_partition_then_node_id() -> None:
    assert node({"client-id": 5, "partition-id": 2}).client_key() == 5
    assert node({"partition-id": 2, "num-partitions": 3}).client_key() == 2
    assert node({"data-path": "/data"}, node_id=991).client_key() == 991
    assert "partition-id=2" in node({"partition-id": 2}).describe()


@pytest.mark.parametrize("value", [0, 9, 2.5, "abc"])
def test_invalid_capacity_names_the_node_and_the_setting(value: object) -> None:
    cfg = fast_config()
    with pytest.raises(ValueError) as info:
        node({"partition-id": 4, "num-partitions": 5, "capacity": value}).capacity(as_settings(cfg))
    message = str(info.value)
    assert "SuperNode 77 (partition-id=4)" in message
    assert "--node-config 'capacity=K" in message and "1 <= K <= 8" in message


def test_nodes_with_bad_settings_are_left_out_and_the_run_goes_on(caplog, tmp_path) -> None:
    configs = [
        {"partition-id": 0, "num-partitions": 5, "capacity": 2},
        {"partition-id": 1, "num-partitions": 5, "capacity": 0},  # invalid capacity
        {"partition-id": 2, "num-partitions": 5, "capacity": 3},
        {"partition-id": 2, "num-partitions": 5, "capacity": 3},  # same client key as above
        {"capacity": 2, "data-path": str(tmp_path / "missing")},  # data that is not there
    ]
    caplog.set_level("WARNING")
    strategy = run_strategy(fast_config(num_clients=5, num_rounds=1), make_grid(5, configs=configs))
    assert strategy.roster.capacities() == {0: 2, 2: 3}
    assert sorted(strategy.history[0].allocation.assignment) == ["0", "2"]
    warnings = [r.getMessage() for r in caplog.records if "left out of this run" in r.getMessage()]
    assert len(warnings) == 2
    assert any("Node 1001" in w and "capacity=K" in w and "partition-id=1" in w for w in warnings)
    assert any("Node 1004" in w and "data-path" in w and "missing" in w for w in warnings)
    # The second claimant of a key is refused while the key's holder is connected,
    # with a message naming both.
    assert (
        "Node 1003 refused for now: client key 2 is bound to node 1002, which is still "
        "connected; node 1003 claims it too" in caplog.text
    )


# ----------------------------------------------------------- node's own data
def write_digits_folder(root: Path, classes: range = range(10), per_class: int = 30) -> Path:
    """Write scikit-learn digits as an image folder ``<class>/<n>.png`` (pixels 0..16)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    for label in classes:
        folder = root / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        for n, image in enumerate(digits.images[digits.target == label][:per_class]):
            Image.fromarray(image.astype(np.uint8), mode="L").save(folder / f"{n}.png")
    return root


def test_node_data_is_the_whole_folder_with_a_seeded_local_split(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("FLEXMOE_CACHE_DIR", str(tmp_path / "cache"))
    folder = write_digits_folder(tmp_path / "node0", classes=range(10), per_class=12)
    cfg = fast_config()
    data = load_node_data(
        as_settings(cfg).dataset,
        as_settings(cfg).partition,
        str(folder),
        0,
        3,
        data_format="imagefolder",
    )
    assert len(data.train) + len(data.local_test) == 120
    assert len(data.local_test) == round(120 * float(cfg.partition.local_test_fraction))
    per_class = np.bincount(data.local_test.y, minlength=10)
    assert per_class.max() - per_class.min() <= 1  # stratified over the node's classes
    assert len(data.global_test) == 0 and data.input_shape == (1, 8, 8)
    again = load_node_data(
        as_settings(cfg).dataset, as_settings(cfg).partition, str(folder), 0, 3, "imagefolder"
    )
    np.testing.assert_array_equal(again.local_test.x, data.local_test.x)
    other_key = load_node_data(
        as_settings(cfg).dataset, as_settings(cfg).partition, str(folder), 0, 4, "imagefolder"
    )
    assert not np.array_equal(other_key.local_test.x, data.local_test.x)
    with pytest.raises(DatasetError, match="data-format=<imagefolder"):
        load_node_data(
            as_settings(cfg).dataset, as_settings(cfg).partition, str(folder), 0, 3
        )  # digits is not a file source


def test_nodes_with_own_data_join_partition_nodes(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("FLEXMOE_CACHE_DIR", str(tmp_path / "cache"))
    own = {"data-format": "imagefolder", "capacity": 3}
    configs = [
        {
            "client-id": 10,
            "data-path": str(write_digits_folder(tmp_path / "a", range(0, 6))),
            **own,
        },
        {
            "client-id": 11,
            "data-path": str(write_digits_folder(tmp_path / "b", range(4, 10))),
            **own,
        },
        {**node_configs(3)[2], "capacity": 2},
    ]
    strategy = run_strategy(
        fast_config("evaluate.global_every=1", num_clients=3, num_rounds=1),
        make_grid(3, configs=configs),
    )
    record = strategy.history[0]
    assert record.participation.accepted == 3 and record.participation.failures == {}
    assert {k: len(v) for k, v in record.allocation.assignment.items()} == {
        "2": 2,
        "10": 3,
        "11": 3,
    }
    # Only the partition node has a global test split.
    assert record.evaluation.global_acc is not None and record.evaluation.local_acc is not None


# ------------------------------------------------------------ real federations
def federation_env(tmp: Path) -> dict[str, str]:
    """Environment of everything a test starts: Flower home and caches in ``tmp``."""
    env = dict(os.environ)
    env.update(
        FLWR_HOME=str(tmp / "flwr-cli"),
        HOME=str(tmp / "home"),
        XDG_CACHE_HOME=str(tmp / "cache"),
        FLEXMOE_CACHE_DIR=str(tmp / "cache" / "flexmoe"),
        MPLCONFIGDIR=str(tmp / "cache" / "mpl"),
        RAY_TMPDIR=str(tmp / "ray"),
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    )
    (tmp / "home").mkdir(parents=True, exist_ok=True)
    return env


def script(env: dict[str, str], *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "flexmoe_launch.local_federation", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _alive(record: dict[str, Any]) -> bool:
    try:
        stat = Path(f"/proc/{record['pid']}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return stat[0] != "Z" and int(stat[19]) == record["start_time"]


@pytest.fixture
def federation(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """A work dir for ``flexmoe-federation``; whatever it started is stopped afterwards."""
    env = federation_env(tmp_path)
    workdir = tmp_path / "fed"
    yield {"env": env, "workdir": workdir, "tmp": tmp_path}
    state_file = workdir / "federation.json"
    if state_file.is_file():
        stopped = script(env, "stop", str(workdir), timeout=120)
        state = json.loads(state_file.read_text())
        left = [p for p in state["processes"] if _alive(p)]
        for record in left:  # last resort: only the processes this test started
            os.kill(record["pid"], 9)
        assert not left, f"stop left processes running: {left}\n{stopped.stdout}{stopped.stderr}"


def _logs(workdir: Path) -> str:
    return "\n".join(
        f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
        for p in sorted((workdir / "logs").glob("*.log"))
    )


@pytest.mark.e2e
def test_tls_federation_refuses_an_unregistered_supernode(federation: dict[str, Any]) -> None:
    env, workdir, tmp = federation["env"], federation["workdir"], federation["tmp"]
    started = script(env, "start", str(workdir), "--nodes", "1", "--auth", "--name", "secure")
    assert started.returncode == 0, started.stdout + started.stderr + _logs(workdir)
    assert "TLS + SuperNode authentication" in started.stdout
    config_toml = (tmp / "flwr-cli" / "config.toml").read_text()
    assert "[superlink.secure]" in config_toml and "root-certificates" in config_toml
    assert "insecure" not in config_toml.split("[superlink.secure]")[1]

    intruder = script(env, "add-node", str(workdir), "--unregistered", "--partition-id", "1")
    assert intruder.returncode == 1
    assert "exited" in intruder.stdout
    log = next((workdir / "logs").glob("*-unregistered.log")).read_text(errors="replace")
    assert "Failed to activate SuperNode" in log

    listed = subprocess.run(
        [str(BIN / "flwr"), "supernode", "list", "secure", "--format", "json"],
        env=env,
        cwd=tmp,
        capture_output=True,
        text=True,
        timeout=120,
    )
    nodes = json.loads(listed.stdout)["nodes"]
    assert [n["status"] for n in nodes] == ["online"]  # only the registered one, over TLS


@pytest.mark.e2e
def test_supernodes_get_their_capacity_and_a_killed_one_comes_back(
    federation: dict[str, Any],
) -> None:
    env, workdir, tmp = federation["env"], federation["workdir"], federation["tmp"]
    started = script(
        env,
        "start",
        str(workdir),
        "--nodes",
        "3",
        "--capacities",
        "1,2,4",
        "--state-dir",
        str(tmp / "node-state"),
    )
    assert started.returncode == 0, started.stdout + started.stderr + _logs(workdir)
    assert "flwr run . flexmoe-local --stream" in started.stdout
    config_toml = (tmp / "flwr-cli" / "config.toml").read_text()
    assert "[superlink.flexmoe-local]" in config_toml and "insecure = true" in config_toml

    run_dir = tmp / "out" / "deployed"
    # The round after the kill waits for the dead node until the SuperLink reports it
    # unavailable (30-60 s after its last heartbeat) or timeouts.round_s passes.
    fast = FAST.replace("timeouts.wait_for_clients_s=0", "timeouts.wait_for_clients_s=60")
    overrides = f"{fast} num_clients=3 num_rounds=4 output_root={tmp / 'out'} run_name=deployed "
    overrides += "timeouts.round_s=60"
    command = [str(BIN / "flwr"), "run", ".", "flexmoe-local", "--stream"]
    log_path = tmp / "flwr-run.log"
    with open(log_path, "w") as log:
        flwr = subprocess.Popen(
            [*command, "--run-config", f'overrides="{overrides}"'],
            env=env,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            deadline = time.monotonic() + 420  # a loaded machine is slower
            while time.monotonic() < deadline and flwr.poll() is None:
                path = checkpoint_path(run_dir)
                if path.is_file() and load_checkpoint(path).round >= 1:
                    break  # round 2 has begun
                time.sleep(0.5)
            # kill -9 node-1 (client 1) and its ClientApp, then start it again with
            # the same node config: a new Flower node id.
            killed = script(env, "kill-node", str(workdir), "node-1")
            assert killed.returncode == 0, killed.stdout + killed.stderr
            restarted = script(env, "restart-node", str(workdir), "node-1")
            assert restarted.returncode == 0, restarted.stdout + restarted.stderr + _logs(workdir)
            flwr.wait(timeout=480)
        finally:
            if flwr.poll() is None:
                flwr.kill()
    output = log_path.read_text(errors="replace")
    assert (run_dir / "summary.json").is_file(), output[-4000:] + _logs(workdir)
    records = read_metrics(run_dir)
    assert [r["round"] for r in records] == [1, 2, 3, 4]
    for record in records:
        # Client keys are the partition ids; the script gave them capacities 1, 2, 4.
        sizes = {k: len(v) for k, v in record["assignment"].items()}
        assert sizes == {k: v for k, v in {"0": 1, "1": 2, "2": 4}.items() if k in sizes}
    # The failure is that of the node that was sent the message: client 1.
    failed = [r["round"] for r in records if r["failures"]]
    assert failed and all(set(r["failures"]) <= {"1"} for r in records), records
    first = failed[0]
    reason = records[first - 1]["failures"]["1"]
    assert "node unavailable" in reason or "no reply" in reason, reason
    # The restarted SuperNode is asked while the failed round waits and claims client 1
    # once its old node is delisted (30-60 s after its last heartbeat): it trains again
    # in the next round, or the one after when the delisting comes after that round.
    back = [
        r["round"]
        for r in records
        if r["round"] > first and "1" in r["assignment"] and "1" not in r["failures"]
    ]
    assert back and back[0] <= first + 2, records
    assert "Client 1 rejoined on node" in output
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["capacities"] == {"0": 1, "1": 2, "2": 4}
    assert summary["final_local_acc"] is not None
    for name in ("final_model.npz", "checkpoint.npz", "config.yaml"):
        assert (run_dir / name).is_file()
