"""The Hydra sweep entry point (one Flower run per job) and the report command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flower_processes import stop_flower
from omegaconf import OmegaConf

from flexmoe_core.config import load_config
from flexmoe_core.report import build_report, find_runs
from server_app.sweep import count_jobs


def fake_run(root: Path, strategy: str, seed: int, acc: list[float], cv: list[float]) -> None:
    run = root / f"{strategy}-{seed}"
    run.mkdir(parents=True)
    cfg = load_config(f"strategy={strategy} seed={seed} num_rounds={len(acc)}")
    (run / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    lines = [
        {
            "round": r + 1,
            "local_acc": a,
            "load_clients_cv": c,
            "load_clients_var": c,
            "cum_load_clients_cv": c / 2,
            "load_samples_cv": 0.5,
            "cum_load_samples_cv": 0.4,
            "bytes_sent": 1e6,
            "bytes_received": 1e6,
            "round_time_s": 2.0,
            "load_clients": [1, 2, 3],
        }
        for r, (a, c) in enumerate(zip(acc, cv, strict=True))
    ]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")


def test_report_means_and_stds_over_seeds(tmp_path: Path) -> None:
    fake_run(tmp_path / "runs", "flexmoe", 0, [0.5, 0.7], [0.0, 0.0])
    fake_run(tmp_path / "runs", "flexmoe", 1, [0.6, 0.9], [0.0, 0.2])
    fake_run(tmp_path / "runs", "greedy", 0, [0.4, 0.5], [0.3, 0.5])
    table = build_report([tmp_path / "runs"], tmp_path / "report")
    (setup,) = table
    flex = table[setup]["flexmoe"]
    assert flex["seeds"] == [0, 1]
    np.testing.assert_allclose(flex["final_local_acc"], (0.8, 0.1))
    np.testing.assert_allclose(flex["best_local_acc"], (0.8, 0.1))
    np.testing.assert_allclose(flex["load_cv"], (0.05, 0.05))
    np.testing.assert_allclose(table[setup]["greedy"]["mb_per_round"], (2.0, 0.0))
    markdown = (tmp_path / "report" / "results.md").read_text()
    assert "| flexmoe | 2 | 80.0 ± 10.0 |" in markdown
    assert (tmp_path / "report" / "results.csv").read_text().count("\n") == 3
    assert len(list((tmp_path / "report").glob("*.png"))) == 2


def test_report_refuses_an_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="No runs"):
        build_report([tmp_path], tmp_path / "out")


def test_count_jobs() -> None:
    assert count_jobs(["strategy=flexmoe,greedy", "seed=0,1,2", "num_rounds=3"]) == 6
    assert count_jobs(["num_rounds=3"]) == 1


@pytest.mark.e2e
def test_sweep_runs_one_flower_run_per_job_and_survives_a_failing_job(tmp_path: Path) -> None:
    home = tmp_path / "flwr-home"
    env = {
        **os.environ,
        "FLWR_HOME": str(home),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    command = [
        sys.executable,
        "-m",
        "server_app.sweep",
        "-m",
        "fitness.beta=0.5,7.0",  # 7.0 is invalid: that job fails, the other must not
        "num_clients=3",
        "num_rounds=2",
        "train.local_epochs=1",
        "evaluate.global_every=2",
        f"hydra.sweep.dir={tmp_path / 'multirun'}",
    ]
    try:
        proc = subprocess.run(
            command,
            cwd=Path(__file__).resolve().parents[1],
            env=env,
            capture_output=True,
            text=True,
            timeout=400,
        )
    finally:
        stop_flower(str(home))
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    assert "job 1/2" in log and "job 2/2" in log and "round 2/2" in log
    assert "FAILED" in log and "fitness.beta=7.0: must be in (0, 1]" in log
    statuses = {
        json.loads(p.read_text())["overrides"][0]: json.loads(p.read_text())["ok"]
        for p in (tmp_path / "multirun").rglob("status.json")
    }
    assert statuses == {"fitness.beta=0.5": True, "fitness.beta=7.0": False}
    (run,) = find_runs([tmp_path / "multirun"])
    assert len(run.records) == 2 and run.strategy == "flexmoe"
