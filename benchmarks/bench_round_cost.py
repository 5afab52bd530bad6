"""Cost of a round: bytes and client memory with k of E experts, and server overhead.

    python benchmarks/bench_round_cost.py [--clients 100] [--rounds 3]

Part 1 (no training): for the default small CNN (8x8 digits) and the ResNet-18-style
backbone (32x32x3), the bytes a client downloads and uploads per round and the
parameters it stores when it holds k of E = 8 experts, as ratios against holding all E.

Part 2: a FLEX-MoE run of --clients simulated clients through an in-process grid (the
ClientApps run in this process, one after the other, as a one-worker simulation runs
them). The server's per-round overhead — allocation, message building, reply checks,
per-expert aggregation and fitness update (the strategy's ``server_time_s``), plus the
checkpoint write — is printed as a share of the round's wall time. Goal: <= 5 %.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from flexmoe_core.checkpoint import save_checkpoint  # noqa: E402
from flexmoe_core.config import load_config  # noqa: E402
from flexmoe_core.metrics import nbytes  # noqa: E402
from flexmoe_core.model import build_model, count_parameters, shared_state  # noqa: E402


def model_costs() -> None:
    print("## Part 1: per-client bytes and memory, k of E = 8 experts (vs holding all 8)")
    print(
        f"{'backbone':>9} {'k':>2} {'params':>11} {'all-E params':>13} {'memory ratio':>13} "
        f"{'MB/round (down+up)':>19} {'all-E MB':>9} {'bytes ratio':>12}"
    )
    for backbone, shape in (("cnn", (1, 8, 8)), ("resnet18", (3, 32, 32))):
        cfg = load_config(f"model={backbone}")
        full = build_model(cfg.model, shape, 10)
        full_params = count_parameters(full)
        full_bytes = 2 * nbytes(shared_state(full))  # download + upload
        for k in (1, 2, 4, 8):
            client = build_model(cfg.model, shape, 10, list(range(k)))
            params = count_parameters(client)  # includes the private gate (never sent)
            sent = 2 * nbytes(shared_state(client))
            print(
                f"{backbone:>9} {k:>2} {params:>11,} {full_params:>13,} "
                f"{params / full_params:>13.3f} {sent / 1e6:>19.3f} {full_bytes / 1e6:>9.3f} "
                f"{sent / full_bytes:>12.3f}"
            )


def server_overhead(clients: int, rounds: int) -> None:
    from inprocess_grid import InProcessGrid

    from client_app.app import app as client_app
    from server_app.strategy import FlexMoEStrategy, to_array_record

    print(f"\n## Part 2: server overhead, {clients} simulated clients, {rounds} rounds")
    out = tempfile.mkdtemp(prefix="flexmoe-bench-")
    cfg = load_config(
        f"num_clients={clients} num_rounds={rounds} partition=iid partition.min_partition_size=4 "
        f"train.local_epochs=1 evaluate.global_every=0 output_root={out}"
    )
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.dataset.input_shape, cfg.dataset.num_classes)
    grid = InProcessGrid(
        client_app, [{"partition-id": i, "num-partitions": clients} for i in range(clients)]
    )
    strategy = FlexMoEStrategy(cfg)
    strategy.start(grid, to_array_record(shared_state(model)), num_rounds=rounds)
    checkpoint_s = []
    for _ in range(3):
        began = time.perf_counter()
        save_checkpoint(Path(out) / "checkpoint.npz", strategy.checkpoint_state(rounds))
        checkpoint_s.append(time.perf_counter() - began)
    ckpt = float(np.median(checkpoint_s))
    print(
        f"{'round':>5} {'round s':>8} {'alloc ms':>9} {'server ms':>10} {'checkpoint ms':>14} "
        f"{'overhead share':>15}"
    )
    shares = []
    for record in strategy.history:
        overhead = record["server_time_s"] + ckpt
        share = overhead / (record["round_time_s"] + ckpt)
        shares.append(share)
        print(
            f"{record['round']:>5} {record['round_time_s']:>8.2f} "
            f"{1e3 * record['allocation_time_s']:>9.1f} {1e3 * record['server_time_s']:>10.1f} "
            f"{1e3 * ckpt:>14.1f} {100 * share:>14.2f}%"
        )
    # Round 1 also pays the clients' first data load; the steady state is what scales.
    steady = float(np.median(shares[1:] if len(shares) > 1 else shares))
    verdict = "PASS" if steady <= 0.05 else "FAIL"
    print(
        f"goal: server overhead <= 5% of round time (median, rounds >= 2): "
        f"{100 * steady:.2f}% {verdict}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads")
    model_costs()
    server_overhead(args.clients, args.rounds)


if __name__ == "__main__":
    main()
