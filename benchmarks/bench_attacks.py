"""One attacker among the clients: how far it moves the model and the reported figures.

For every attack of ``tests/attackers.py`` and every seed this runs the default
configuration on 8 simulated clients in this process (node 1 attacks, the others are
honest) and the same run with no attacker, with the same seed, and prints one row per
attack (mean and range over the seeds): the honest clients' true final local and
global accuracy against the same clients' in the honest run, the reported final local
accuracy against the honest clients' truth (and against every client's truth, the
attacker's true figure included: what the lie itself moved), what the server cut, and
a verdict against the goals:

* the honest clients' final local and global accuracy within 3 points of the honest
  run, on average over the seeds (the range is printed);
* in every seed, the reported final local accuracy within 1 point of what the clients
  truly measured, the attacker's own true figure counted like any client's (the
  difference from the honest clients' figure alone is printed too).

    python benchmarks/bench_attacks.py                     # the full table, 5 seeds (~15 min)
    python benchmarks/bench_attacks.py --rounds 5 --seeds 0 --only scaled_1e6
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from math import isnan, nan
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import attackers  # noqa: E402  (tests/attackers.py)
import numpy as np  # noqa: E402

from flexmoe_core.config import load_config  # noqa: E402
from server_app.app import run  # noqa: E402
from server_app.inprocess import InProcessGrid  # noqa: E402

ATTACKER_NODE = 1001  # the second node: client key 1
# A reference row, not an attack: the node's training replies fail every round, so the
# other clients train without it. What any defence that leaves the attacker out costs
# them (its data no longer reaches the model).
LEFT_OUT = "(left out)"
ACCURACY_POINTS = 3.0
REPORTED_POINTS = 1.0


def run_federation(attack: str | None, seed: int, args: argparse.Namespace, out: Path) -> dict:
    """Run one federation; return its summary, records and the clients' true figures."""
    attackers.TRUE_EVALUATIONS.clear()
    nodes = [{"partition-id": i, "num-partitions": args.clients} for i in range(args.clients)]
    if attack not in (None, LEFT_OUT):
        nodes[ATTACKER_NODE - 1000]["attack"] = attack
    name = f"{'left-out' if attack == LEFT_OUT else attack or 'honest'}-{seed}"
    cfg = load_config(
        f"num_clients={args.clients} num_rounds={args.rounds} seed={seed} "
        f"output_root={out} run_name={name} {args.overrides}"
    )

    def crash_attacker_training(node: int, message: object) -> str | None:
        train = message.metadata.message_type == "train"  # type: ignore[attr-defined]
        return "raise" if node == ATTACKER_NODE and train else None

    fail = crash_attacker_training if attack == LEFT_OUT else None
    run_dir = run(InProcessGrid(attackers.app, nodes, fail=fail), cfg)
    summary = json.loads((run_dir / "summary.json").read_text())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    finals = attackers.TRUE_EVALUATIONS
    attacker = [
        t.splits["local"][2] for t in finals if t.kind == "final" and t.node == ATTACKER_NODE
    ]
    return {
        "summary": summary,
        "records": records,
        # The same clients in every run: all but the attacking node (honest in the reference).
        "truth": attackers.honest_final(ATTACKER_NODE),
        # Every node's true figure, the attacker's included: what an exact report says.
        "every": attackers.honest_final(None),
        "attacker": attacker[-1] if attacker else nan,
    }


def cut_note(records: list[dict]) -> str:
    """Say what the server cut of the attacker's replies (first note seen)."""
    key = str(ATTACKER_NODE - 1000)
    for record in records:
        if key in record.get("bounded", {}):
            return record["bounded"][key][:60]
        if key in record.get("failures", {}):
            return record["failures"][key][:60]
    return "nothing"


def differences(result: dict, honest: dict) -> dict[str, float]:
    """Return one attacked run's differences from the honest run of its seed, in points."""
    glob, base_global = result["truth"].get("global", nan), honest["truth"].get("global", nan)
    reported = result["summary"]["final_local_acc"]
    return {
        "local": 100 * (result["truth"]["local"] - honest["truth"]["local"]),
        "global": 0.0 if isnan(glob) or isnan(base_global) else 100 * (glob - base_global),
        "reported": 100 * (reported - result["truth"]["local"]),
        "reported_all": 100 * (reported - result["every"]["local"]),
        "attacker": 100 * result["attacker"],
    }


def verdict(rows: list[dict[str, float]]) -> tuple[bool, bool]:
    """Return (model goal met, report goal met) over the seeds' rows.

    The model: the mean over seeds of the honest clients' change, local and global,
    within ``ACCURACY_POINTS`` (one seed's change also holds run-to-run noise: leaving
    one client's updates out moves a 20-round run by a few points either way). The
    report: in every seed, the printed accuracy within ``REPORTED_POINTS`` of what the
    clients truly measured (the attacker's own true figure counted as any client's).
    """
    model = all(
        abs(float(np.mean([r[key] for r in rows]))) <= ACCURACY_POINTS
        for key in ("local", "global")
    )
    report = all(abs(r["reported_all"]) <= REPORTED_POINTS for r in rows)
    return model, report


def spread(values: list[float]) -> str:
    """Mean and the range over seeds, in points."""
    return f"{np.mean(values):+.1f} [{min(values):+.1f}, {max(values):+.1f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--only", nargs="*", default=None, help="attack names")
    parser.add_argument("--overrides", default="", help="Hydra overrides for every run")
    args = parser.parse_args()
    names = [*(args.only or attackers.ATTACKS), LEFT_OUT]
    rows: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    notes: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="bench-attacks-") as tmp:
        out = Path(tmp)
        for seed in args.seeds:
            honest = run_federation(None, seed, args, out)
            print(
                f"seed {seed}, honest run: clients but {ATTACKER_NODE - 1000} local "
                f"{honest['truth']['local']:.4f}, global {honest['truth'].get('global', nan):.4f};"
                f" client {ATTACKER_NODE - 1000} local {honest['attacker']:.4f}; reported "
                f"{honest['summary']['final_local_acc']:.4f}",
                flush=True,
            )
            for name in names:
                result = run_federation(name, seed, args, out)
                rows[name].append(differences(result, honest))
                notes.setdefault(name, cut_note(result["records"]))
    print(
        f"\n{args.clients} clients, {args.rounds} rounds, seeds {args.seeds}; node "
        f"{ATTACKER_NODE} (client {ATTACKER_NODE - 1000}) attacks. Differences in points, "
        "mean [min, max] over seeds, against the honest run of the same seed."
    )
    header = (
        f"{'attack':<20} {'Δ local':>19} {'Δ global':>19} {'Δ reported':>19} "
        f"{'Δ rep. vs all':>19} {'attacker':>8}  {'cut (first seed)':<60} verdict"
    )
    print(header)
    print("-" * len(header))
    passed = 0
    for name in names:
        model_ok, report_ok = verdict(rows[name])
        failed = [what for what, ok in (("model", model_ok), ("report", report_ok)) if not ok]
        if name == LEFT_OUT:
            judged = "reference"
        else:
            passed += not failed
            judged = "PASS" if not failed else f"FAIL ({', '.join(failed)})"
        column = {key: [r[key] for r in rows[name]] for key in rows[name][0]}
        print(
            f"{name:<20} {spread(column['local']):>19} {spread(column['global']):>19} "
            f"{spread(column['reported']):>19} {spread(column['reported_all']):>19} "
            f"{np.mean(column['attacker']):8.1f}  {notes[name]:<60} "
            f"{judged}"
        )
    print(
        f"goals: the mean over seeds of Δ local and Δ global (the honest clients' true "
        f"accuracy) within {ACCURACY_POINTS} points; in every seed, the printed local "
        f"accuracy within {REPORTED_POINTS} point of every client's true figure (Δ rep. vs "
        "all: what the lie moved). Δ reported: the printed figure against the honest "
        "clients' alone, which also moves with the attacker's true figure ('attacker', "
        f"its own true local accuracy, %) at its counted share. {LEFT_OUT}: node "
        f"{ATTACKER_NODE}'s training fails every round, no attack: the cost of leaving it "
        f"out. {passed} of {len(names) - 1} PASS"
    )


if __name__ == "__main__":
    os.environ.setdefault("MPLCONFIGDIR", tempfile.mkdtemp(prefix="mpl-"))
    main()
