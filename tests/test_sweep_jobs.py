"""Sweeps that search, resume and scale out: Optuna, killed-and-re-run sweeps, launchers.

Most tests point ``sweep.flwr`` at ``tests/fake_flwr.py`` (a second instead of a
Flower run) and ``sweep.federation`` at a dummy name (no SuperLink): they test the
sweep machinery. The joblib test starts two real ``flwr run`` side by side.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml
from fake_flwr import accuracy
from flower_processes import pids_with_env, stop_processes
from omegaconf import OmegaConf

from flexmoe_core.data.cache import digest
from flexmoe_core.report import COMPLETED, FAILED, JobStatus, build_report, find_sweep_jobs
from flexmoe_launch.sweep import SweepSettings, reproduce_commands, run_overrides, sweep_size

ROOT = Path(__file__).resolve().parents[1]
FAKE = [f"sweep.flwr='{sys.executable} {ROOT / 'tests' / 'fake_flwr.py'}'", "sweep.federation=fake"]


def sweep(args: list[str], env: dict[str, str] | None = None, timeout: float = 300):
    """Run ``flexmoe-sweep`` (as ``python -m flexmoe_launch.sweep``) and return the result."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return subprocess.run(
        [sys.executable, "-m", "flexmoe_launch.sweep", *args],
        cwd=ROOT,
        env={**os.environ, "PATH": path, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def jobs_of(sweep_dir: Path) -> list[JobStatus]:
    return find_sweep_jobs([sweep_dir])[sweep_dir]


# ------------------------------------------------------------------ settings, commands
def test_sweep_settings_name_the_bad_key() -> None:
    cfg = OmegaConf.create({"objective": "accuracy", "direction": "up", "federation_config": ""})
    with pytest.raises(ValueError) as err:
        SweepSettings.from_config(cfg)
    assert "sweep.objective='accuracy'" in str(err.value) and "final_local_acc" in str(err.value)
    assert "sweep.direction='up'" in str(err.value)
    bad = OmegaConf.create({"federation_config": "num-supernodes=3"})
    with pytest.raises(ValueError, match="leave num-supernodes out"):
        SweepSettings.from_config(bad)


def test_sweep_settings_refuse_ray_init_counts_on_a_ray_cluster(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    counts = OmegaConf.create({"federation_config": "init-args-num-cpus=4"})
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    SweepSettings.from_config(counts)  # a Ray instance of the job's own: allowed
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    with pytest.raises(ValueError, match=r"RAY_ADDRESS=10\.0\.0\.1:6379 attaches"):
        SweepSettings.from_config(counts)
    sized = OmegaConf.create({"federation_config": "client-resources-num-cpus=1"})
    assert SweepSettings.from_config(sized).federation_config == "client-resources-num-cpus=1"


def test_run_overrides_leave_out_sweep_settings_and_the_search_preset() -> None:
    task = ["seed=1", "sweep.objective=wall_s", "search=cpu_flexmoe", "+sweep.x=1", "lr=2"]
    assert run_overrides(task) == ["seed=1", "lr=2"]


def test_sweep_size_counts_jobs_and_parallel_ones() -> None:
    grid = OmegaConf.create(
        {
            "hydra": {
                "sweeper": {"max_batch_size": None, "params": {"seed": "0,1,2"}},
                "overrides": {"task": ["strategy=flexmoe,greedy"]},
                "launcher": {"n_jobs": -1},
            }
        }
    )
    jobs, parallel = sweep_size(grid)
    assert jobs == 6 and parallel == min(6, os.cpu_count() or 1)
    search = OmegaConf.create(
        {"hydra": {"sweeper": {"n_trials": 9, "n_jobs": 3}, "launcher": {"n_jobs": 2}}}
    )
    assert sweep_size(search) == (9, 2)


def test_reproduce_commands_are_shell_ready(tmp_path: Path) -> None:
    job = JobStatus(0, ["seed=1", "dataset.path='/data/my set'"], COMPLETED, path=tmp_path)
    settings = SweepSettings.from_config(OmegaConf.create({}))
    again, flwr = reproduce_commands(job, settings)
    assert shlex.split(again) == ["flexmoe-sweep", "seed=1", "dataset.path='/data/my set'"]
    words = shlex.split(flwr)
    assert words[words.index("--federation-config") + 1] == "num-supernodes=10"
    assert words[-1] == "overrides=\"seed=1 dataset.path='/data/my set'\""


# ------------------------------------------------------------------ search
def test_optuna_search_gets_objectives_and_goes_on_after_failed_trials(tmp_path: Path) -> None:
    out = tmp_path / "search"
    proc = sweep(
        [
            "search=cpu_flexmoe",
            "hydra.sweeper.n_trials=4",
            "num_rounds=2",
            "fitness.beta=choice(0.5,7.0)",  # 7.0 is invalid: those trials fail
            *FAKE,
            f"hydra.sweep.dir={out}",
        ]
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    jobs = jobs_of(out)
    assert [j.job for j in jobs] == [0, 1, 2, 3]
    for job in jobs:
        params = job.params()
        if params["fitness.beta"] == "7.0":
            assert job.status == FAILED and job.value is None
        else:  # the value the sweeper got is the run's best_local_acc
            assert job.status == COMPLETED and job.objective == "best_local_acc"
            assert job.value == pytest.approx(accuracy(params, 2, 2))
    assert {j.status for j in jobs} == {COMPLETED, FAILED}
    results = yaml.safe_load((out / "optimization_results.yaml").read_text())
    assert results["best_value"] == pytest.approx(max(j.value for j in jobs if j.value))
    assert "Best value" in log and "[sweep] best (maximize best_local_acc)" in log
    assert re.search(r"flwr run \S+ fake --stream --run-config 'overrides=\"train\.lr=", log)

    build_report([out], tmp_path / "report")
    trials = (tmp_path / "report" / "trials.md").read_text()
    assert f"search {out}" in trials and "4 jobs: 2 completed, 2 failed" in trials
    assert trials.count("| failed |") == 2 and "(best)" in trials
    results_md = (tmp_path / "report" / "results.md").read_text()
    assert "### Not counted (2)" in results_md


# ------------------------------------------------------------------ resume
def test_a_killed_sweep_run_again_skips_finished_jobs_and_resumes(tmp_path: Path) -> None:
    out, calls = tmp_path / "grid", tmp_path / "calls.jsonl"
    args = ["-m", "seed=0,1,2,3", "num_rounds=3", *FAKE, f"hydra.sweep.dir={out}"]
    env = {"FAKE_FLWR_LOG": str(calls)}
    killed = sweep(args, {**env, "FAKE_FLWR_KILL": "seed=2:2"})  # dies in job 3, round 2
    assert killed.returncode == -9, killed.stdout[-2000:]
    assert [j.job for j in jobs_of(out)] == [0, 1]  # job 2 never got to write its status

    again = sweep(args, env)
    log = again.stdout + again.stderr
    assert again.returncode == 0, log[-3000:]
    assert log.count("completed in an earlier run of this sweep, skipped") == 2
    assert "round 3/3" in log and "| 2 skipped (done before)" in log
    assert "resuming from its checkpoint" in log
    assert "2 ran and completed, 2 skipped (completed in an earlier run), 0 failed" in log
    runs = [json.loads(line) for line in calls.read_text().splitlines()]
    assert [(r["run"][:1], r["resumed_at"]) for r in runs] == [
        ("0", 0),
        ("1", 0),
        ("2", 0),
        ("2", 2),  # picked up after round 2, from its checkpoint
        ("3", 0),
    ]
    jobs = jobs_of(out)
    assert [j.status for j in jobs] == [COMPLETED] * 4 and jobs[2].resumed
    metrics = (next(out.glob("2_*")) / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["round"] for line in metrics] == [1, 2, 3]


def test_a_job_folder_of_other_overrides_is_not_taken_for_finished(tmp_path: Path) -> None:
    out = tmp_path / "grid"
    assert sweep(["-m", "seed=0", "num_rounds=2", *FAKE, f"hydra.sweep.dir={out}"]).returncode == 0
    other = sweep(
        ["-m", "seed=0", "num_rounds=2", "dataset.path=/elsewhere", *FAKE, f"hydra.sweep.dir={out}"]
    )
    assert "holds a completed run of other overrides" in other.stdout
    assert "hydra.sweep.dir=<new folder>" in other.stdout


# ------------------------------------------------------------------ launchers
def test_submitit_local_runs_a_two_job_sweep(tmp_path: Path) -> None:
    out = tmp_path / "submitit"
    proc = sweep(
        [
            "-m",
            "seed=0,1",
            "num_rounds=2",
            *FAKE,
            "hydra/launcher=submitit_local",
            "hydra.launcher.timeout_min=5",
            f"hydra.sweep.dir={out}",
        ]
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "2 jobs, 2 at a time" in proc.stdout
    jobs = jobs_of(out)
    assert [(j.job, j.status) for j in jobs] == [(0, COMPLETED), (1, COMPLETED)]
    assert len([p for p in (out / ".submitit").iterdir() if p.name.isdigit()]) == 2


def _flower_pids_below(folder: Path) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        try:
            env = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(e.startswith(f"FLWR_HOME={folder}".encode()) for e in env):
            found.append(int(proc.name))
    return found


@pytest.mark.e2e
def test_joblib_runs_two_flower_jobs_side_by_side_each_with_its_own_superlink(
    tmp_path: Path,
) -> None:
    out, tmp, home = tmp_path / "parallel", tmp_path / "tmp", tmp_path / "shared-home"
    tmp.mkdir()
    env = {"TMPDIR": str(tmp), "FLWR_HOME": str(home)}  # private homes go below TMPDIR
    try:
        proc = sweep(
            [
                "-m",
                "seed=0,1",
                "num_clients=2",
                "num_rounds=1",
                "train.local_epochs=1",
                "evaluate.global_every=0",
                "sweep.federation_config='client-resources-num-cpus=1'",  # reaches Flower
                "hydra/launcher=joblib",
                "hydra.launcher.n_jobs=2",
                f"hydra.sweep.dir={out}",
            ],
            env,
            timeout=400,
        )
        leftovers = _flower_pids_below(tmp) + pids_with_env("FLWR_HOME", str(home))
    finally:
        stop_processes(_flower_pids_below(tmp) + pids_with_env("FLWR_HOME", str(home)))
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    jobs = jobs_of(out)
    assert [j.status for j in jobs] == [COMPLETED, COMPLETED], log[-3000:]
    # side by side: each started before the other finished
    (a, b) = [(j.finished_at - j.seconds, j.finished_at) for j in jobs]  # type: ignore[operator]
    assert a[0] < b[1] and b[0] < a[1], (a, b)
    # each on a SuperLink of its own, none on flwr's shared default port
    ports = set()
    for job in jobs:
        assert job.path is not None
        flwr_log = (job.path / "flwr.log").read_text()
        ports |= set(re.findall(r"Using SuperLink: local \(127\.0\.0\.1:(\d+)\)", flwr_log))
        assert (job.path / "summary.json").is_file() and (job.path / "metrics.jsonl").is_file()
    assert len(ports) == 2 and "39091" not in ports
    assert not (home / "local-superlink").exists()  # nobody used the shared Flower home
    # ...and each stopped what it started, and removed its Flower home
    assert leftovers == [] and not list(tmp.glob("flexmoe-flwr-home-*"))


# ------------------------------------------------------------------ the data cache
_BUILDER = textwrap.dedent(
    """
    import json, os, sys, time
    import numpy as np
    from pathlib import Path
    from flexmoe_core.data.cache import load_or_build

    cache, log, start = Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3])

    def build():
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\\n")
        time.sleep(1.0)
        return {"x": np.arange(1000) * 3}, {"note": "built"}

    time.sleep(max(0.0, start - time.time()))  # both processes start together
    arrays, meta = load_or_build(cache, "d", {"k": 1}, build)
    print(json.dumps({"sum": int(arrays["x"].sum()), "note": meta["note"]}))
    """
)


def test_two_processes_building_the_same_cache_entry_decode_it_once(tmp_path: Path) -> None:
    cache, builds = tmp_path / "cache", tmp_path / "builds.txt"
    cache.mkdir()
    stale = cache / f".d-{digest({'k': 1})}.killed.tmp"  # a builder killed mid-write
    stale.mkdir()
    (stale / "x.npy").write_bytes(b"partial")
    start = str(time.time() + 2.0)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _BUILDER, str(cache), str(builds), start],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=60) for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    assert len(builds.read_text().split()) == 1  # one decoded, the other waited and read
    results = [json.loads(out) for out, _ in outputs]
    assert results == [{"sum": 3 * 999 * 1000 // 2, "note": "built"}] * 2
    assert not stale.exists() and not list(cache.glob(".*.tmp"))
    assert len(list(cache.glob("d-*"))) == 1


# ------------------------------------------------------------------ the watchdog
_JOB = textwrap.dedent(
    """
    import os, subprocess, sys, time
    from pathlib import Path
    from flexmoe_launch.local_superlink import _start_watchdog

    home = Path(sys.argv[1])
    _start_watchdog(home)
    run = subprocess.Popen(["sleep", "60"], env={**os.environ, "FLWR_HOME": str(home)})
    print(run.pid, flush=True)
    time.sleep(60)
    """
)


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="the watchdog finds processes in /proc")
def test_a_killed_job_leaves_no_flower_process_behind(tmp_path: Path) -> None:
    home = tmp_path / "flexmoe-flwr-home-x"
    home.mkdir()
    job = subprocess.Popen(
        [sys.executable, "-c", _JOB, str(home)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        assert job.stdout is not None
        run = int(job.stdout.readline())
        assert pids_with_env("FLWR_HOME", str(home)) == [run]
        job.kill()  # as SIGKILL or the OOM killer would
        job.wait()
        deadline = time.time() + 20
        while (pids_with_env("FLWR_HOME", str(home)) or home.exists()) and time.time() < deadline:
            time.sleep(0.2)
        assert pids_with_env("FLWR_HOME", str(home)) == [] and not home.exists()
    finally:
        job.kill()
        stop_processes(pids_with_env("FLWR_HOME", str(home)))


def test_inprocess_sweep_runs_real_jobs_in_the_sweep_process(tmp_path: Path) -> None:
    """sweep.federation=inprocess: the same ServerApp and ClientApp, no SuperLink, no Ray."""
    sweep_dir = tmp_path / "inproc"
    args = [
        "-m",
        "sweep.federation=inprocess",
        "strategy=flexmoe,greedy",
        "num_rounds=2",
        "num_clients=3",
        "model.width=8",
        "model.feature_dim=16",
        "train.local_epochs=1",
        "partition=iid",
        "evaluate.global_every=0",
        "timeouts.wait_for_clients_s=0",
        f"hydra.sweep.dir={sweep_dir}",
    ]
    home = tmp_path / "flwr-home"
    result = sweep(args, env={"FLWR_HOME": str(home)})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    jobs = jobs_of(sweep_dir)
    assert [j.status for j in jobs] == [COMPLETED, COMPLETED]
    assert all(job.value is not None and 0.0 <= job.value <= 1.0 for job in jobs)
    lines = [
        json.loads(line)
        for path in sweep_dir.glob("*/metrics.jsonl")
        for line in path.read_text().splitlines()
    ]
    assert sorted({r["strategy"] for r in lines}) == ["flexmoe", "greedy"] and len(lines) == 4
    assert not pids_with_env("FLWR_HOME", str(home))  # no SuperLink was started
    again = sweep(args, env={"FLWR_HOME": str(home)})
    assert again.returncode == 0 and "0 ran and completed, 2 skipped" in again.stdout
