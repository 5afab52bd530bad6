"""The benchmarks still run and print their figures (smallest settings; no timing is judged)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_benchmark(script: str, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=ROOT,
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
