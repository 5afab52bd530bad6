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
from flexmoe_core.report import (
    COMPLETED,
    FAILED,
    INCOMPLETE,
    JobStatus,
    best_job,
    build_report,
    find_runs,
    run_objective,
    run_state,
)
from flexmoe_launch.sweep import count_jobs


def fake_run(
    root: Path,
    strategy: str,
    seed: int,
    acc: list[float],
    cv: list[float],
    status: str | None = "completed",
) -> Path:
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
    if status is not None:  # None: no summary.json, as a run still going or killed
        (run / "summary.json").write_text(json.dumps({"status": status, "rounds": len(acc)}))
    return run


def test_report_means_and_stds_over_seeds(tmp_path: Path) -> None:
    fake_run(tmp_path / "runs", "flexmoe", 0, [0.5, 0.7], [0.0, 0.0])
    fake_run(tmp_path / "runs", "flexmoe", 1, [0.6, 0.9], [0.0, 0.2])
    fake_run(tmp_path / "runs", "greedy", 0, [0.4, 0.5], [0.3, 0.5])
    table = build_report([tmp_path / "runs"], tmp_path / "report")
    (setup,) = table
    flex = table[setup]["flexmoe"]
    assert flex["seeds"] == [0, 1]
    # sample standard deviation over seeds: sqrt(((0.7-0.8)^2 + (0.9-0.8)^2) / 1)
    np.testing.assert_allclose(flex["final_local_acc"], (0.8, np.sqrt(0.02)))
    np.testing.assert_allclose(flex["best_local_acc"], (0.8, np.sqrt(0.02)))
    np.testing.assert_allclose(flex["load_cv"], (0.05, np.sqrt(0.005)))
    np.testing.assert_allclose(table[setup]["greedy"]["mb_per_round"], (2.0, 0.0))
    markdown = (tmp_path / "report" / "results.md").read_text()
    assert "| flexmoe | 2 | 80.0 ± 14.1 |" in markdown
    assert (tmp_path / "report" / "results.csv").read_text().count("\n") == 3
    # curves and heatmaps of the setup, and the paired differences
    assert len(list((tmp_path / "report").glob("*.png"))) == 3


def test_failed_and_unfinished_runs_are_listed_not_counted(tmp_path: Path) -> None:
    fake_run(tmp_path / "runs", "flexmoe", 0, [0.5, 0.7], [0.0, 0.0])
    failed = fake_run(tmp_path / "runs", "flexmoe", 1, [0.9, 0.99], [0.0, 0.0], status="failed")
    killed = fake_run(tmp_path / "runs", "flexmoe", 2, [0.9], [0.0], status=None)
    legacy = fake_run(tmp_path / "runs", "greedy", 0, [0.4, 0.5], [0.3, 0.5])
    (legacy / "summary.json").write_text(json.dumps({"rounds": 2}))  # no status: completed
    assert [run_state(r) for r in (failed, killed, legacy)] == [FAILED, INCOMPLETE, COMPLETED]
    table = build_report([tmp_path / "runs"], tmp_path / "report")
    (setup,) = table
    assert table[setup]["flexmoe"]["seeds"] == [0]  # 0.99 of the failed run is not a result
    np.testing.assert_allclose(table[setup]["flexmoe"]["best_local_acc"], (0.7, 0.0))
    markdown = (tmp_path / "report" / "results.md").read_text()
    assert "### Not counted (2)" in markdown
    assert f"- failed: `{failed}`" in markdown and f"- incomplete: `{killed}`" in markdown
    states = {
        r["seed"]: r["state"]
        for r in json.loads((tmp_path / "report/runs.json").read_text())
        if r["strategy"] == "flexmoe"
    }
    assert states == {0: COMPLETED, 1: FAILED, 2: INCOMPLETE}


def test_objective_is_a_report_column(tmp_path: Path) -> None:
    run = fake_run(tmp_path, "flexmoe", 0, [0.5, 0.7, 0.6], [0.2, 0.4, 0.0])
    assert run_objective(run, "final_local_acc") == pytest.approx(0.6)
    assert run_objective(run, "best_local_acc") == pytest.approx(0.7)
    assert run_objective(run, "load_cv") == pytest.approx(0.2)
    assert np.isnan(run_objective(run, "final_global_acc"))  # never measured
    with pytest.raises(ValueError, match="unknown objective 'acc'"):
        run_objective(run, "acc")


def test_trials_table_of_a_sweep(tmp_path: Path) -> None:
    sweep = tmp_path / "multirun" / "search"
    for num, (lr, status, value) in enumerate(
        [("0.1", COMPLETED, 0.6), ("0.01", FAILED, None), ("0.03", COMPLETED, 0.8)]
    ):
        job = sweep / f"{num}_train.lr={lr}"
        job.mkdir(parents=True)
        overrides = [f"train.lr={lr}", "num_rounds=5"]
        JobStatus(num, overrides, status, "best_local_acc", "maximize", value).write(job)
    (sweep / "optimization_results.yaml").write_text("best_value: 0.8\n")
    (sweep / ".hydra").mkdir()  # hidden folders are never jobs or runs
    JobStatus(9, ["x=1"], FAILED).write(sweep / ".hydra")
    build_report([tmp_path / "multirun"], tmp_path / "report")
    trials = (tmp_path / "report" / "trials.md").read_text()
    assert f"### search {sweep}" in trials
    assert (
        "3 jobs: 2 completed, 1 failed; objective `best_local_acc` (maximize); best: job 2"
        in trials
    )
    assert "| job | status | best_local_acc | train.lr |" in trials  # only what varies
    assert (
        "| 1 | failed | – | 0.01 |" in trials
        and "| 2 (best) | completed | 0.8000 | 0.03 |" in trials
    )
    assert "No completed run." in (tmp_path / "report" / "results.md").read_text()
    assert (tmp_path / "report" / "trials.csv").read_text().count("\n") == 4


def test_best_job_follows_the_direction() -> None:
    jobs = [
        JobStatus(0, [], COMPLETED, value=0.3),
        JobStatus(1, [], FAILED),
        JobStatus(2, [], COMPLETED, value=0.1),
    ]
    assert best_job(jobs, "maximize").job == 0
    assert best_job(jobs, "minimize").job == 2
    assert best_job(jobs[1:2]) is None


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
        "flexmoe_launch.sweep",
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
        json.loads(p.read_text())["overrides"][0]: json.loads(p.read_text())["status"]
        for p in (tmp_path / "multirun").rglob("status.json")
    }
    assert statuses == {"fitness.beta=0.5": COMPLETED, "fitness.beta=7.0": FAILED}
    (run,) = find_runs([tmp_path / "multirun"])
    assert len(run.records) == 2 and run.strategy == "flexmoe" and run.state == COMPLETED
