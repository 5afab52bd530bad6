"""A simulation on a Ray cluster of two nodes: `flwr run` attaches to it and uses both.

The cluster is a head and a worker started with `ray start` on loopback, each with one
CPU and a custom resource naming it (``flexmoe_head``, ``flexmoe_worker``). The run is
an ordinary `flwr run` whose SuperLink finds the cluster through ``RAY_ADDRESS``; with
one CPU per ClientApp, Flower's actor pool takes one actor per node. Ray's own record
(the GCS's actor table and task events, read without the dashboard) then says on which
node every ClientApp call ran. Everything started here is stopped by pid, found by the
private ``RAY_TMPDIR`` and ``FLWR_HOME`` it was started with (``ray stop`` would end
every Ray process of the user on this machine).

    pytest tests/test_ray_cluster.py --run-slow
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from flower_processes import flwr_run, pids_with_env, stop_processes

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# Runs inside the cluster as a Ray driver: which node holds which custom resource, and
# how many ClientAppActor.run calls each node executed (from the GCS's task events).
WHERE_CLIENTAPPS_RAN = """
import collections, json, os, ray
from ray._private.state import state
from ray.core.generated import gcs_pb2
ray.init(address=os.environ["RAY_ADDRESS"], logging_level="ERROR", log_to_driver=False)
names = {n["NodeID"]: sorted(r for r in n["Resources"] if r.startswith("flexmoe_"))
         for n in ray.nodes() if n["Alive"]}
actors = {a: v["Address"]["NodeID"] for a, v in state.actor_table(None).items()
          if v["ActorClassName"] == "ClientAppActor"}
calls, seen = collections.Counter(), set()
for raw in state._connect_and_get_accessor().get_task_events():
    event = gcs_pb2.TaskEvents.FromString(raw)
    task = event.task_id.hex()
    if event.task_info.name.endswith("ClientAppActor.run") and task not in seen:
        seen.add(task)
        calls[actors.get(event.task_info.actor_id.hex(), "unknown")] += 1
print(json.dumps({"nodes": names, "actors": sorted(actors.values()),
                  "calls": {names.get(n, [n])[0]: c for n, c in calls.items()}}))
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def ray_start(env: dict[str, str], *args: str) -> None:
    """``ray start`` with every port picked free: two nodes share this machine."""
    ports = [
        f"--{name}={free_port()}"
        for name in (
            "node-manager-port",
            "object-manager-port",
            "dashboard-agent-listen-port",
            "dashboard-agent-grpc-port",
            "metrics-export-port",
            "runtime-env-agent-port",
        )
    ]
    command = [
        str(BIN / "ray"),
        "start",
        "--node-ip-address=127.0.0.1",
        "--num-cpus=1",
        "--num-gpus=0",
        "--object-store-memory=200000000",
        "--disable-usage-stats",
        *ports,
        *args,
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]


@pytest.fixture
def ray_cluster(tmp_path: Path) -> Iterator[dict[str, str]]:
    """Start a two-node loopback Ray cluster; yield the environment that reaches it."""
    # Ray's socket paths must stay short (about 100 characters): not under tmp_path.
    ray_tmp = tempfile.mkdtemp(prefix="fxray-", dir="/tmp")
    gcs = free_port()
    env = {
        **os.environ,
        "RAY_TMPDIR": ray_tmp,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    try:
        ray_start(
            env,
            "--head",
            f"--port={gcs}",
            f"--ray-client-server-port={free_port()}",
            "--include-dashboard=false",
            '--resources={"flexmoe_head": 1}',
        )
        ray_start(env, f"--address=127.0.0.1:{gcs}", '--resources={"flexmoe_worker": 1}')
        yield {**env, "RAY_ADDRESS": f"127.0.0.1:{gcs}"}
    finally:
        for _attempt in range(3):  # a raylet may start a worker while we stop it
            if not (pids := pids_with_env("RAY_TMPDIR", ray_tmp)):
                break
            stop_processes(pids)
        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.e2e
def test_flwr_run_uses_every_node_of_an_existing_ray_cluster(
    tmp_path: Path, ray_cluster: dict[str, str]
) -> None:
    home = tmp_path / "flwr-home"
    home.mkdir()
    out = tmp_path / "out"
    env = {
        **ray_cluster,
        "FLWR_HOME": str(home),
        # A local SuperLink of its own: the default port may be another run's.
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    }
    overrides = (
        f"num_clients=4 num_rounds=2 train.local_epochs=1 evaluate.global_every=2 "
        f"run_name=cluster output_root={out}"
    )
    try:
        log = flwr_run(overrides, env, "num-supernodes=4 client-resources-num-cpus=1")
        assert "[round 2/2]" in log, log[-4000:]
        # Attached, not started: a second Ray instance would have said so.
        assert "Started a local Ray instance" not in log, log[-4000:]
        where = subprocess.run(
            [sys.executable, "-c", WHERE_CLIENTAPPS_RAN],
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert where.returncode == 0, where.stderr[-3000:]
        found = json.loads(where.stdout.strip().splitlines()[-1])
    finally:
        stop_processes(pids_with_env("FLWR_HOME", str(home)))
    assert sorted(found["nodes"].values()) == [["flexmoe_head"], ["flexmoe_worker"]], found
    assert len(set(found["actors"])) == 2, found  # one ClientApp actor on each node
    # 4 clients x 2 rounds of training plus the final evaluation, split over both nodes.
    assert found["calls"].get("flexmoe_head", 0) > 0, found
    assert found["calls"].get("flexmoe_worker", 0) > 0, found
    assert sum(found["calls"].values()) >= 4 * 2, found
    summary = json.loads((out / "cluster" / "summary.json").read_text())
    assert summary["status"] == "completed", summary
