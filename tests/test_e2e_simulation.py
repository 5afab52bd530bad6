"""One real Flower simulation, end to end: `flwr run . --stream`, on Flower's default federation."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from flower_processes import flwr_run, stop_flower

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def flwr_home(tmp_path: Path):
    home = tmp_path / "flwr-home"
    home.mkdir()
    yield str(home)
    stop_flower(str(home))  # the local SuperLink outlives `flwr run`


@pytest.mark.e2e
def test_flwr_run_simulation_end_to_end(tmp_path: Path, flwr_home: str) -> None:
    out = tmp_path / "out"
    # No --federation-config: Flower (>= 1.32) starts 2 SuperNodes, and the run
    # trains them although num_clients says 10 (it warns).
    overrides = (
        f"num_rounds=3 train.local_epochs=1 evaluate.global_every=3 "
        f"strategy=flexmoe run_name=e2e output_root={out}"
    )
    env = {
        **os.environ,
        "FLWR_HOME": flwr_home,
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        # flwr starts `flower-superlink` from PATH: use the one beside this interpreter
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    log = flwr_run(overrides, env, timeout=400)
    assert "[round 3/3]" in log and "expert load" in log, log[-4000:]
    run_dir = out / "e2e"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [1, 2, 3]
    assert all(r["accepted"] == 2 for r in records)
    assert "num_clients=10, but the SuperNodes declare num-partitions=2" in log
    assert "global_acc" in records[-1]
    assert (run_dir / "final_model.npz").stat().st_size > 0
    assert json.loads((run_dir / "summary.json").read_text())["rounds"] == 3
