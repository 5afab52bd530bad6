"""The benchmarks still run and print their figures (smallest settings; no timing is judged)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from flower_processes import stop_flower

ROOT = Path(__file__).resolve().parents[1]


def run_benchmark(script: str, *args: str, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=ROOT,
        env=None if env is None else {**os.environ, **env},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_bench_model_prints_storage_shares_and_the_dispatch_ratio() -> None:
    out = run_benchmark("bench_model.py", "--only", "digits", "--repeats", "1", "--warmup", "0")
    # Part 1: the k = 2 storage verdict of all four models.
    assert len(re.findall(r"goal k=2 <= 0\.\d+ of dense: 0\.\d+ PASS", out)) == 4
    # Part 3: the digits row, with its ratio, floor and verdict.
    row = next(line for line in out.splitlines() if line.strip().startswith("cnn (digits"))
    assert re.search(r"\d+\.\d{3}\s+\d+\.\d+\s+\d\.\d\d\s+\d\.\d\d\s+-?\d+\.\d+\s+goal", row), row
    assert re.search(r"goal <= floor \+ 0\.05: (PASS|FAIL)", row), row


def test_bench_allocation_prints_every_family_with_its_ratios_and_goals() -> None:
    out = run_benchmark(
        "bench_allocation.py", "--clients", "100", "--experts", "8", "--repeats", "1"
    )
    assert re.search(
        r"^family\s+clients\s+E\s+flow\s+cvxpy\s+greedy\s+cvxpy/flow\s+flow/greedy",
        out,
        flags=re.MULTILINE,
    ), out[-2000:]
    for family in ("uniform", "clustered", "clustered-exact", "tied", "low-rank", "heavy-tailed"):
        # A row with both ratios and an objective gap of zero up to solver tolerance.
        assert re.search(
            rf"^{family}\s+100\s+8\s+.*\d+\.\dx\s+\d+\.\dx\s+\d\.\de-?[+-]?\d+$",
            out,
            flags=re.MULTILINE,
        ), (family, out[-3000:])
        assert f"goal {family} 10,000 x 64: not measured" in out


def test_bench_round_time_decomposition_adds_up_to_the_cores_time() -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_round_time import decompose

    record = {
        "round_time_s": 10.0,
        "server_time_s": 0.5,
        "train_examples": 400,
        "client_time_s": {
            "train_step": 12.0,
            "data": 0.5,
            "model": 0.25,
            "decode": 0.25,
            "encode": 0.5,
            "evaluate": 1.0,
            "train_other": 1.5,
            "total": 16.0,
        },
    }
    row = decompose(record, actors=2)
    parts = ("train_step", "data", "model", "codec", "eval", "loop", "server", "flower/ray")
    assert sum(row[p] for p in parts) == 20.0  # wall time x actors
    assert row["codec"] == 0.75 and row["server"] == 1.0 and row["flower/ray"] == 3.0
    assert row["efficiency"] == 0.6


@pytest.mark.e2e
def test_bench_round_time_prints_a_row_per_round_and_the_verdict() -> None:
    # Digits (no --data-dir): a real `flwr run` of 2 clients for 2 rounds.
    out = run_benchmark("bench_round_time.py", "--clients", "2", "--rounds", "2", "--data-dir", "")
    assert re.search(r"^round\s+samples\s+wall s\s+train_step\s+data\s+model\s+codec", out, re.M)
    rows = re.findall(r"^\s+([12])\s+\d+\s+\d+\.\d\d(\s+-?\d+\.\d\d){9}$", out, flags=re.M)
    assert [r[0] for r in rows] == ["1", "2"], out
    assert re.search(
        r"goal efficiency >= 0\.8 \(rounds after the first\): \d\.\d\d (PASS|FAIL)", out
    )


def test_bench_device_prints_footprints_capacities_and_export_sizes() -> None:
    out = run_benchmark("bench_device.py", "--only", "digits")
    row = next(line for line in out.splitlines() if line.startswith("cnn (digits, E=8)"))
    assert re.search(r"32\s+\d+\.\d\d\s+\d+\.\d\d\s+[1-8]\s+[1-8]$", row), row
    sizes = [line for line in out.splitlines() if line.startswith("cnn (digits")][1]
    assert re.search(r"0\.\d\d, 0\.\d\d$", sizes), sizes


TINY_RUN = (
    "num_clients=3 num_rounds=2 model.width=8 model.feature_dim=16 train.local_epochs=1 "
    "partition=iid evaluate.global_every=0 timeouts.wait_for_clients_s=0"
)


def test_bench_update_norms_prints_the_honest_update_sizes() -> None:
    out = run_benchmark("bench_update_norms.py", "--overrides", TINY_RUN)
    for group in ("backbone", "expert"):
        line = next(x for x in out.splitlines() if x.startswith(group))
        assert re.search(r"update RMS: max \d+\.\d{4}, p99 \d+\.\d{4}", line), line


@pytest.mark.skipif(
    not os.environ.get("FLEXMOE_TEST_DATA"), reason="needs FLEXMOE_TEST_DATA (mnist_test/)"
)
def test_bench_round_cost_prints_the_server_share_and_its_verdict() -> None:
    out = run_benchmark("bench_round_cost.py", "--clients", "40", "--rounds", "2")
    assert re.search(
        r"^## 40 registered clients, 5% sampled per round \(2 participants\)", out, re.M
    )
    assert re.search(r"server overhead <= 5% of round time .*: \d+\.\d\d% (PASS|FAIL)$", out, re.M)
    assert "peak of one server-only round" in out


@pytest.mark.slow
@pytest.mark.skipif(
    not os.environ.get("FLEXMOE_TEST_DATA"), reason="needs FLEXMOE_TEST_DATA (cifar10_jpg/)"
)
def test_bench_data_cache_prints_cold_warm_and_their_ratio() -> None:
    out = run_benchmark("bench_data_cache.py", "--repeats", "1", "--clients", "2")
    assert re.search(r"ratio cold / warm:\s+\d+ x", out), out[-2000:]


@pytest.mark.slow
@pytest.mark.e2e
def test_bench_privacy_prints_epsilon_and_accuracy_per_setting(tmp_path: Path) -> None:
    home = tmp_path / "flwr-home"
    home.mkdir()
    try:
        out = run_benchmark(
            "bench_privacy.py",
            "--out",
            str(tmp_path / "runs"),
            "--clients",
            "2",
            "--overrides",
            TINY_RUN.replace("num_clients=3 ", ""),
            env={"FLWR_HOME": str(home)},
        )
    finally:
        stop_flower(str(home))
    assert re.search(r"^\| DP, sigma = 0\.3 \| \d", out, re.M), out[-2000:]


def test_bench_attacks_prints_a_row_per_attack_with_its_verdict() -> None:
    fast = "model.width=8 model.feature_dim=16 train.local_epochs=1 partition=iid"
    out = run_benchmark(
        "bench_attacks.py",
        *("--clients", "4", "--rounds", "2", "--seeds", "0", "1"),
        *("--only", "scaled_1e6", "evaluation_2p53"),
        *("--overrides", f"{fast} evaluate.global_every=1 timeouts.wait_for_clients_s=0"),
    )
    for seed in (0, 1):
        assert f"seed {seed}, honest run: clients but 1 local 0." in out
    spread = r"[+-]\d+\.\d \[[+-]\d+\.\d, [+-]\d+\.\d\]"
    for attack in ("scaled_1e6", "evaluation_2p53"):
        row = next(line for line in out.splitlines() if line.startswith(attack))
        assert len(re.findall(spread, row)) == 4, row
        assert re.search(r"(PASS|FAIL \((model|report)(, report)?\))$", row.rstrip()), row
    reference = next(line for line in out.splitlines() if line.startswith("(left out)"))
    assert reference.rstrip().endswith("reference"), reference
    assert re.search(r"of 2 PASS", out)
