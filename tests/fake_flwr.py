"""A stand-in for ``flwr run`` that tests of the sweep machinery point ``sweep.flwr`` at.

    fake_flwr.py run <app> [<federation>] [--federation-config ...] --stream \
        --run-config 'overrides="..."'

It writes what the ServerApp writes (config.yaml, one metrics line and a checkpoint
per round, summary.json) in a second instead of a minute, and exits 0 even when the
"run" fails, like ``flwr run --stream``. Its accuracy is a known function of the
overrides, so a test can check the objective a job returns. Environment:

- ``FAKE_FLWR_LOG``: file that gets one JSON line per call (run name, resumed round).
- ``FAKE_FLWR_KILL``: ``<override>:<round>`` — after that round of the run with that
  override, SIGKILL the parent (the sweep) as a crash would, and stop.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import signal
import sys
from pathlib import Path


def accuracy(params: dict[str, str], round_: int, rounds: int) -> float:
    """Best at lr = 0.03, rising over rounds; seeds shift it a little."""
    lr = float(params.get("train.lr", 0.05))
    seed = int(params.get("seed", 0))
    peak = 0.9 - 0.2 * abs(math.log10(lr / 0.03)) + 0.01 * seed
    return round(peak * round_ / rounds, 6)


def main(argv: list[str]) -> int:
    config_arg = argv[argv.index("--run-config") + 1]
    overrides_text = config_arg.split("=", 1)[1].strip('"')
    overrides = shlex.split(overrides_text, posix=False)
    params = {k: v.strip("'") for k, v in (o.split("=", 1) for o in overrides)}
    run_dir = Path(params["output_root"]) / params["run_name"]
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from omegaconf import OmegaConf

    from flexmoe_core.config import load_config

    try:
        cfg = load_config(overrides)
    except ValueError as err:  # what the real ServerApp does: log it, exit 0
        print(f"ERROR: ServerApp failed: {err}", flush=True)
        return 0
    rounds = int(cfg.num_rounds)
    checkpoint = run_dir / "checkpoint.npz"
    start = 0
    if params.get("checkpoint.resume") == "true" and checkpoint.is_file():
        start = int(checkpoint.read_text())
    if log := os.environ.get("FAKE_FLWR_LOG"):
        with open(log, "a", encoding="utf-8") as f:
            f.write(json.dumps({"run": params["run_name"], "resumed_at": start}) + "\n")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    kill_override, _, kill_round = os.environ.get("FAKE_FLWR_KILL", "::").partition(":")
    metrics = run_dir / "metrics.jsonl"
    kept = metrics.read_text().splitlines()[:start] if metrics.is_file() else []
    metrics.write_text("".join(line + "\n" for line in kept))
    acc = accuracy(params, rounds, rounds)
    for r in range(start + 1, rounds + 1):
        acc = accuracy(params, r, rounds)
        record = {
            "round": r,
            "local_acc": acc,
            "load_clients_cv": 0.1,
            "load_clients": [1, 2],
            "round_time_s": 0.1,
        }
        with open(metrics, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        checkpoint.write_text(str(r))
        print(f"INFO: [round {r}/{rounds}] local acc {acc:.4f}", flush=True)
        if kill_override in overrides and str(r) == kill_round:
            os.kill(os.getppid(), signal.SIGKILL)
            return 1
    summary = {"status": "completed", "rounds": rounds, "final_local_acc": acc}
    (run_dir / "summary.json").write_text(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
