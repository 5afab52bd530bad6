"""Where a simulated round's time goes: a real `flwr run`, decomposed per round.

Runs a few rounds of a CPU preset (default ``cmp_cifar10_dirichlet``, 20 clients) as an
ordinary simulation — its own local SuperLink, Ray, one ClientApp actor per
``--cpus-per-client`` cores — and reads the run's ``metrics.jsonl``. Every train reply
carries the seconds its ClientApp spent per phase (``client_time_s`` in the record,
summed over the round's clients); the server records its own time and the round's
wall time. Per round it prints, in seconds of worker time (wall time x actors):

* ``train_step``: inside :func:`flexmoe_core.training.train_step` (forward, backward,
  update) — the useful work;
* ``data``: the client's partition (normalised arrays) from the cached dataset;
* ``model``: building the model of the assigned experts;
* ``codec``: reading the received arrays into it and packing the reply (and the gate);
* ``eval``: evaluating the received model before training;
* ``loop``: the rest of local training (batching, augmentation, feedback statistics);
* ``server``: the server's time (allocation, aggregation, encoding), during which the
  actors wait, counted once per actor;
* ``flower/ray``: what is left — messages through the SuperLink, (de)serialisation by
  Flower and Ray, scheduling, idle actors at the round's tail.

``efficiency`` = train_step / (wall time x actors): the share of the cores' time spent
training. Round 1 also starts the actors and loads the dataset; the verdict is on the
mean of the later rounds.

    python benchmarks/bench_round_time.py                      # data: $FLEXMOE_TEST_DATA
    python benchmarks/bench_round_time.py --data-dir /work/shared/datasets --rounds 4

``--data-dir`` (else ``$FLEXMOE_TEST_DATA``) is a folder laid out like the project's
test data (``cifar10_jpg/*.tar.gz``, ``gtsrb32/*.tar.xz``); without one the run uses
scikit-learn's digits (the default dataset) with the same clients and schedule.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flexmoe_launch.local_superlink import private_superlink  # noqa: E402

GOAL_EFFICIENCY = 0.8
# Columns of the table: (header, phases of client_time_s summed into it).
CLIENT_COLUMNS = (
    ("train_step", ("train_step",)),
    ("data", ("data",)),
    ("model", ("model",)),
    ("codec", ("decode", "encode")),
    ("eval", ("evaluate",)),
    ("loop", ("train_other",)),
)
# Where each preset's files lie under --data-dir.
DATA_FILES = {"cifar10": "cifar10_jpg/*.tar.gz", "gtsrb": "gtsrb32/*.tar.xz"}


def data_overrides(experiment: str, data_dir: str | None) -> tuple[list[str], str]:
    """Return the dataset overrides and a label saying which data the run uses."""
    dataset = next((name for name in DATA_FILES if name in experiment), None)
    if data_dir and dataset and (files := list(Path(data_dir).glob(DATA_FILES[dataset]))):
        pattern = str(Path(data_dir).resolve() / DATA_FILES[dataset])
        return [f"experiment={experiment}", f"dataset.path='{pattern}'"], (
            f"{experiment} ({len(files)} files under {data_dir})"
        )
    # The preset's clients, model and schedule on the bundled digits dataset.
    return [f"experiment={experiment}", "dataset=digits", "partition.max_client_samples=null"], (
        f"{experiment} on digits (no {dataset or 'dataset'} files: set --data-dir)"
    )


def run_simulation(args: argparse.Namespace, out: Path) -> tuple[list[dict], float, str]:
    """Run the simulation; return its round records, wall time and data label."""
    overrides, label = data_overrides(args.experiment, args.data_dir)
    overrides += [
        f"num_clients={args.clients}",
        f"num_rounds={args.rounds}",
        f"evaluate.global_every={args.rounds}",
        "checkpoint.enabled=false",
        f"output_root={out}",
        "run_name=bench",
        *shlex.split(args.overrides),
    ]
    federation = f"num-supernodes={args.clients} client-resources-num-cpus={args.cpus_per_client}"
    flwr = Path(sys.executable).with_name("flwr")
    command = [
        str(flwr) if flwr.exists() else "flwr",
        "run",
        str(ROOT),
        "--stream",
        "--federation-config",
        federation,
        "--run-config",
        f'overrides="{" ".join(overrides)}"',
    ]
    env = {
        **os.environ,
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    began = time.perf_counter()
    with private_superlink(env, ROOT) as link:  # stops SuperLink, Ray and apps by pid
        done = subprocess.run(
            command,
            cwd=ROOT,
            env={**env, **link.env()},
            capture_output=True,
            text=True,
            timeout=args.timeout,
        )
    wall = time.perf_counter() - began
    metrics = out / "bench" / "metrics.jsonl"
    if done.returncode != 0 or not metrics.is_file():
        sys.exit(f"flwr run failed ({done.returncode}):\n{(done.stdout + done.stderr)[-3000:]}")
    return [json.loads(line) for line in metrics.read_text().splitlines()], wall, label


def decompose(record: dict, actors: int) -> dict[str, float]:
    """Return one round's worker-seconds per column, with efficiency and samples."""
    phases = record.get("client_time_s", {})
    row = {name: sum(phases.get(p, 0.0) for p in parts) for name, parts in CLIENT_COLUMNS}
    capacity = record["round_time_s"] * actors
    row["server"] = record["server_time_s"] * actors
    row["flower/ray"] = capacity - phases.get("total", 0.0) - row["server"]
    row["wall"] = record["round_time_s"]
    row["samples"] = record.get("train_examples", 0)
    row["efficiency"] = row["train_step"] / capacity if capacity > 0 else 0.0
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiment", default="cmp_cifar10_dirichlet")
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cpus-per-client", type=int, default=1)
    parser.add_argument(
        "--data-dir",
        default=os.environ.get("FLEXMOE_TEST_DATA"),
        help="folder laid out like the project's test data (default $FLEXMOE_TEST_DATA)",
    )
    parser.add_argument("--overrides", default="", help="more Hydra overrides, one string")
    parser.add_argument("--timeout", type=float, default=1800.0)
    args = parser.parse_args()
    if args.rounds < 1 or args.clients < 1:
        parser.error("--rounds and --clients must be at least 1")

    cores = os.cpu_count() or 1
    actors = max(1, min(args.clients, cores // args.cpus_per_client))
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="flexmoe-round-time-") as tmp:
        records, wall, label = run_simulation(args, Path(tmp))
    load_after = os.getloadavg()[0]
    print(
        f"# {label}; {args.clients} clients, {args.rounds} rounds, {cores} cores, "
        f"{actors} ClientApp actors ({args.cpus_per_client} CPU each); flwr run took "
        f"{wall:.0f} s; load average {load_before:.1f} before, {load_after:.1f} after "
        f"(above {cores}: other programs shared the cores)"
    )
    print("# seconds of worker time (wall x actors) per round; efficiency = train_step / that")
    columns = [name for name, _ in CLIENT_COLUMNS] + ["server", "flower/ray"]
    header = f"{'round':>5} {'samples':>7} {'wall s':>7} " + " ".join(f"{c:>10}" for c in columns)
    header += f" {'efficiency':>10}"
    print(header)
    print("-" * len(header))
    rows = []
    for record in records:
        row = decompose(record, actors)
        rows.append(row)
        print(
            f"{record['round']:>5} {row['samples']:>7} {row['wall']:>7.2f} "
            + " ".join(f"{row[c]:>10.2f}" for c in columns)
            + f" {row['efficiency']:>10.2f}"
        )
    steady = rows[1:] or rows
    efficiency = sum(r["train_step"] for r in steady) / sum(r["wall"] * actors for r in steady)
    shares = {
        c: sum(r[c] for r in steady) / sum(r["wall"] * actors for r in steady) for c in columns
    }
    print(
        "shares of worker time (rounds after the first): "
        + ", ".join(f"{c} {shares[c]:.2f}" for c in columns)
    )
    verdict = "PASS" if efficiency >= GOAL_EFFICIENCY else "FAIL"
    print(
        f"goal efficiency >= {GOAL_EFFICIENCY} (rounds after the first): {efficiency:.2f} {verdict}"
    )


if __name__ == "__main__":
    main()
