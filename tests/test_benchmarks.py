"""The benchmarks still run and print their figures (smallest settings; no timing is judged)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_benchmark(script: str, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        capture_output=True,
        text=True,
        timeout=300,
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
