"""Cost of the server at scale: its memory and its share of a round's time.

    python benchmarks/bench_round_cost.py --data-dir /path/to/datasets \
        [--workload mnist|cifar10] [--clients 1000] [--fraction 0.05] [--rounds 4]

A FLEX-MoE run with --clients registered clients, --fraction of them sampled per
round, through an in-process grid: the ClientApps run in this process one after the
other, as a one-worker simulation runs them. Workloads (``--data-dir`` laid out like
the project's test data):

* ``mnist``: MNIST's test split (<data-dir>/mnist_test), 8 training images per client
  at 1,000 clients, the default CNN: the clients' work per round is as small as it
  gets, and the server's share as large;
* ``cifar10``: the ``cpu_cifar10_iid`` preset on CIFAR-10 (<data-dir>/cifar10_jpg),
  40 training images per client at 1,000 clients.

Printed per round, measured in the same run:

* the round's wall time, the time spent inside ClientApps, the in-process grid's own
  time (copying messages, as a wire would), and what is left: the server's overhead
  (sampling, allocation, message building, reply checks, per-expert aggregation,
  fitness, records, the checkpoint, membership). Goal: overhead <= 5 % of the round.
* the server's memory: the size of what it keeps (model, fitness table, records,
  checkpoint) and the peak of one server-only round (plan, build every message, read
  synthetic replies, aggregate), as ratios of the model's size.

Bytes and memory of a client holding k of E experts: ``benchmarks/bench_model.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from flexmoe_core.aggregation import ClientUpdate  # noqa: E402
from flexmoe_core.checkpoint import save_checkpoint  # noqa: E402
from flexmoe_core.config import load_settings  # noqa: E402
from flexmoe_core.fitness import ExpertFeedback  # noqa: E402
from flexmoe_core.model import build_model, shared_state  # noqa: E402
from flexmoe_core.round_state import ClientReply, RoundResults  # noqa: E402


def timed_grid(clients: int):
    """Return an in-process grid that adds up the time spent inside ClientApps."""
    from client_app.app import app as client_app
    from server_app.inprocess import InProcessGrid

    class TimedGrid(InProcessGrid):
        client_s = 0.0
        grid_s = 0.0

        def push_messages(self, messages):
            start, before = time.perf_counter(), self.client_s
            ids = super().push_messages(messages)
            self.grid_s += time.perf_counter() - start - (self.client_s - before)
            return ids

    grid = TimedGrid(
        client_app, [{"partition-id": i, "num-partitions": clients} for i in range(clients)]
    )

    def app(message, context):
        start = time.perf_counter()
        try:
            return client_app(message, context)
        finally:
            grid.client_s += time.perf_counter() - start

    grid.client_app = app
    return grid


def run(args: argparse.Namespace, out: Path) -> None:
    from server_app.strategy import FlexMoEStrategy, to_array_record

    data = Path(args.data_dir) / ("mnist_test" if args.workload == "mnist" else "cifar10_jpg")
    if not data.is_dir():
        raise SystemExit(f"{data} not found: give --data-dir (or $FLEXMOE_TEST_DATA)")
    workload = {
        "mnist": f"dataset=mnist dataset.path={data} dataset.test_fraction=0.2 partition=iid "
        "partition.min_partition_size=4",
        "cifar10": f"experiment=cpu_cifar10_iid dataset.path='{data}/*.tar.gz'",
    }[args.workload]
    cfg = load_settings(
        f"{workload} num_clients={args.clients} fraction_train={args.fraction} "
        f"num_rounds={args.rounds} evaluate.global_every=0 "
        f"output_root={out} timeouts.wait_for_clients_s=0"
    )
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.dataset.input_shape, int(cfg.dataset.num_classes))
    initial = shared_state(model)
    model_bytes = sum(a.nbytes for a in initial.values())
    grid = timed_grid(args.clients)
    rows: list[dict[str, float]] = []

    class Measured(FlexMoEStrategy):
        def configure_train(self, server_round, arrays, config, grid_):
            self._t0, self._c0, self._g0 = time.perf_counter(), grid.client_s, grid.grid_s
            return super().configure_train(server_round, arrays, config, grid_)

        def aggregate_train(self, server_round, replies):
            out_ = super().aggregate_train(server_round, replies)
            wall = time.perf_counter() - self._t0
            client, grid_s = grid.client_s - self._c0, grid.grid_s - self._g0
            rows.append({"round": server_round, "wall": wall, "client": client, "grid": grid_s})
            return out_

    strategy = Measured(cfg, checkpoint_path=out / "checkpoint.npz")
    began = time.perf_counter()
    strategy.start(grid, to_array_record(initial), num_rounds=args.rounds, timeout=600)
    total = time.perf_counter() - began
    rounds_s = sum(row["wall"] for row in rows)
    participants = len(strategy.history[0].allocation.assignment or {})
    print(
        f"## {args.clients} registered clients, {args.fraction:.0%} sampled per round "
        f"({participants} participants), {args.rounds} rounds, "
        f"workload {args.workload}, model {model_bytes / 1e6:.2f} MB"
    )
    print(
        f"whole run {total:.1f} s: rounds {rounds_s:.1f} s; the rest is asking all "
        f"{args.clients} nodes their capacity before round 1 and the final evaluation"
    )
    print(
        f"{'round':>5} {'round s':>8} {'clients s':>10} {'grid s':>7} {'server s':>9} {'share':>7}"
    )
    shares = []
    for row in rows:
        server = row["wall"] - row["client"] - row["grid"]
        shares.append(server / row["wall"])
        print(
            f"{row['round']:>5} {row['wall']:>8.2f} {row['client']:>10.2f} {row['grid']:>7.2f} "
            f"{server:>9.3f} {100 * shares[-1]:>6.2f}%"
        )
    # Round 1 also pays the first data load of the process; the steady state is what scales.
    steady = float(np.median(shares[1:] if len(shares) > 1 else shares))
    print(
        f"goal: server overhead <= 5% of round time (median, rounds >= 2): {100 * steady:.2f}% "
        + ("PASS" if steady <= 0.05 else "FAIL")
    )
    memory(strategy, model_bytes, out)


def memory(strategy, model_bytes: int, out: Path) -> None:
    """Print what the server keeps and the peak of one server-only round."""
    from server_app.codec import Encoder

    state, roster = strategy.state, strategy.roster
    fitness = state.fitness.state()
    kept = {
        "model (backbone + all experts)": model_bytes,
        f"fitness table ({len(fitness['client_ids'])} clients)": 8
        * len(fitness["client_ids"])
        * state.num_experts,
        f"records ({len(state.records())} rounds, JSON)": len(
            json.dumps([r.to_json() for r in state.records()])
        ),
        "checkpoint file": (out / "checkpoint.npz").stat().st_size,
    }
    print("\n## server memory")
    for name, size in kept.items():
        print(f"{name:>40}: {size / 1e6:8.3f} MB  ({size / model_bytes:6.2f} x model)")
    capacities = roster.capacities(roster.available(strategy.membership.connected))
    tracemalloc.start()
    plan = state.plan(state.completed_round + 1, capacities)
    encoder = Encoder(plan, strategy.run_config)
    messages = [encoder.message(key, 0)[0] for key in plan.experts]
    replies = []
    for key, message in zip(plan.experts, messages, strict=True):
        arrays = {n: np.asarray(a.numpy()) for n, a in message.content["arrays"].items()}
        feedback = {e: ExpertFeedback(5.0, 0.5, 1.0) for e in plan.experts[key]}
        # Whole replies, as the reply gate passes them (held-out feedback included).
        update = ClientUpdate(key, arrays, 8, feedback)
        replies.append(ClientReply(key, update, 1.0, 0.5, heldout=feedback))
    state.close(plan, RoundResults(replies=replies))
    save_checkpoint(out / "checkpoint.npz", state.checkpoint(roster.state()))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    replies_bytes = sum(a.nbytes for r in replies if r.update for a in r.update.arrays.values())
    name = "peak of one server-only round"
    print(
        f"{name:>40}: {peak / 1e6:8.3f} MB  ({peak / model_bytes:6.2f} x model; "
        f"{peak / replies_bytes:.2f} x the {len(replies)} replies' arrays, "
        f"{replies_bytes / 1e6:.1f} MB, which Flower hands over at once)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default=os.environ.get("FLEXMOE_TEST_DATA", ""))
    parser.add_argument("--workload", choices=("mnist", "cifar10"), default="mnist")
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--fraction", type=float, default=0.05)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(1)  # one ClientApp at a time, as a one-worker simulation
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} thread, {os.cpu_count()} cores")
    with tempfile.TemporaryDirectory(prefix="flexmoe-bench-") as tmp:
        os.environ.setdefault("FLEXMOE_CACHE_DIR", str(Path(tmp) / "cache"))
        run(args, Path(tmp))


if __name__ == "__main__":
    main()
