"""The accuracy cost of differential privacy, through ``flwr run`` (README "Threat model
and privacy").

Runs the README's default federation (digits, 10 simulated clients, 20 rounds) once per
setting: no DP (bounded mean), DP with sigma = 0 (clipping only) and two noise levels;
prints (epsilon, delta) and the final local and global accuracy as a Markdown table.
Each run uses a Flower home of its own, and its SuperLink is stopped when it ends.

    python benchmarks/bench_privacy.py --out /tmp/dp_runs
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the helper that stops a run's Flower processes

from flower_processes import stop_flower  # noqa: E402

SETTINGS = {
    "no DP (bounded mean)": "",
    "DP, sigma = 0 (clip only)": "privacy.enabled=true privacy.noise_multiplier=0",
    "DP, sigma = 0.1": "privacy.enabled=true privacy.noise_multiplier=0.1",
    "DP, sigma = 0.3": "privacy.enabled=true privacy.noise_multiplier=0.3",
}


def run(name: str, overrides: str, out: Path, clients: int, extra: str) -> dict:
    """Run one setting with ``flwr run``; return its summary.json."""
    run_name = "dp_" + "".join(c if c.isalnum() else "_" for c in name).strip("_")
    home = tempfile.mkdtemp(prefix="flwr_home_")
    env = {**os.environ, "FLWR_HOME": home, "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    config = f"output_root={out} run_name={run_name} {overrides} {extra}".strip()
    command = [
        "flwr",
        "run",
        ".",
        "--stream",
        "--federation-config",
        f"num-supernodes={clients}",
        "--run-config",
        f'overrides="{config}"',
    ]
    print("$", " ".join(command[:6]), f"'overrides=\"{config}\"'", flush=True)
    start = time.monotonic()
    try:
        subprocess.run(command, cwd=ROOT, env=env, check=False, timeout=1800)
    finally:
        stop_flower(home)
    summary = json.loads((out / run_name / "summary.json").read_text())
    summary["wall_s"] = time.monotonic() - start
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="absolute folder for the runs")
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--overrides", default="", help="added to every run's overrides")
    args = parser.parse_args()
    out = args.out.expanduser().resolve()
    rows = []
    for name, overrides in SETTINGS.items():
        summary = run(name, overrides, out, args.clients, args.overrides)
        if summary.get("status") != "completed":
            raise SystemExit(f"{name}: the run failed: {summary.get('error')}")
        rows.append((name, summary))
    print("\n| setting | epsilon (delta = 1e-5) | final local acc | final global acc | wall s |")
    print("| --- | --- | --- | --- | --- |")
    for name, s in rows:
        eps = s.get("dp_epsilon")
        eps_text = "-" if eps is None else ("inf" if eps == float("inf") else f"{eps:.4g}")
        print(
            f"| {name} | {eps_text} | {s['final_local_acc']:.3f} | "
            f"{s['final_global_acc']:.3f} | {s['wall_s']:.0f} |"
        )


if __name__ == "__main__":
    main()
