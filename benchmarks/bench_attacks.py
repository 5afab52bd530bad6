"""One attacker among the clients: how far it moves the model and the reported figures.

For every attack of ``tests/attackers.py`` this runs the default configuration on 8
simulated clients in this process (node 1 attacks, the others are honest) and the
same run with no attacker, with the same seed, and prints one row per attack: the
honest clients' true final local and global accuracy against the same clients' in
the honest run, the reported final local accuracy against the honest clients' truth,
what the server cut, and a verdict against the goals:

* the honest clients' final local and global accuracy within 3 points of the honest run;
* the reported final local accuracy within 1 point of the honest clients' true one.

    python benchmarks/bench_attacks.py                     # the full table (~5 min)
    python benchmarks/bench_attacks.py --rounds 5 --only scaled_1e6
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

from flexmoe_core.config import load_config  # noqa: E402
from server_app.app import run  # noqa: E402
from server_app.inprocess import InProcessGrid  # noqa: E402

ATTACKER_NODE = 1001  # the second node: client key 1
ACCURACY_POINTS = 3.0
REPORTED_POINTS = 1.0


def run_federation(attack: str | None, args: argparse.Namespace, out: Path) -> dict:
    """Run one federation; return its summary, records and the honest clients' truth."""
    attackers.TRUE_EVALUATIONS.clear()
    nodes = [{"partition-id": i, "num-partitions": args.clients} for i in range(args.clients)]
    if attack is not None:
        nodes[ATTACKER_NODE - 1000]["attack"] = attack
    name = attack or "honest"
    cfg = load_config(
        f"num_clients={args.clients} num_rounds={args.rounds} seed={args.seed} "
        f"output_root={out} run_name={name} {args.overrides}"
    )
    run_dir = run(InProcessGrid(attackers.app, nodes), cfg)
    summary = json.loads((run_dir / "summary.json").read_text())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # The same clients in every run: all but the attacking node (honest in the reference).
    truth = attackers.honest_final(ATTACKER_NODE)
    return {"summary": summary, "records": records, "truth": truth}


def cut_note(records: list[dict]) -> str:
    """Say what the server cut of the attacker's replies (first note seen)."""
    key = str(ATTACKER_NODE - 1000)
    for record in records:
        if key in record.get("bounded", {}):
            return record["bounded"][key][:60]
        if key in record.get("failures", {}):
            return record["failures"][key][:60]
    return "nothing"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", nargs="*", default=None, help="attack names")
    parser.add_argument("--overrides", default="", help="Hydra overrides for every run")
    args = parser.parse_args()
    names = args.only or list(attackers.ATTACKS)
    with tempfile.TemporaryDirectory(prefix="bench-attacks-") as tmp:
        out = Path(tmp)
        honest = run_federation(None, args, out)
        base_local, base_global = honest["truth"]["local"], honest["truth"].get("global", nan)
        print(
            f"{args.clients} clients, {args.rounds} rounds, seed {args.seed}; node "
            f"{ATTACKER_NODE} (client {ATTACKER_NODE - 1000}) attacks. Honest run, clients "
            f"but {ATTACKER_NODE - 1000}: local {base_local:.4f}, global {base_global:.4f}; "
            f"reported local {honest['summary']['final_local_acc']:.4f}"
        )
        header = (
            f"{'attack':<20} {'local':>7} {'Δ pts':>6} {'global':>7} {'Δ pts':>6} "
            f"{'reported':>8} {'Δ pts':>6}  {'cut':<60} verdict"
        )
        print(header)
        print("-" * len(header))
        failed = 0
        for name in names:
            result = run_federation(name, args, out)
            local, glob = result["truth"]["local"], result["truth"].get("global", nan)
            reported = result["summary"]["final_local_acc"]
            d_local = 100 * (local - base_local)
            d_global = 0.0 if isnan(glob) or isnan(base_global) else 100 * (glob - base_global)
            d_reported = 100 * (reported - local)
            ok = (
                abs(d_local) <= ACCURACY_POINTS
                and abs(d_global) <= ACCURACY_POINTS
                and abs(d_reported) <= REPORTED_POINTS
            )
            failed += not ok
            print(
                f"{name:<20} {local:7.4f} {d_local:+6.1f} "
                f"{glob:7.4f} {d_global:+6.1f} "
                f"{reported:8.4f} {d_reported:+6.1f}  {cut_note(result['records']):<60} "
                f"{'PASS' if ok else 'FAIL'}"
            )
        print(
            f"goals: |Δ local|, |Δ global| <= {ACCURACY_POINTS} points vs the honest run; "
            f"|reported - true| <= {REPORTED_POINTS} point. {len(names) - failed} of "
            f"{len(names)} PASS"
        )


if __name__ == "__main__":
    os.environ.setdefault("MPLCONFIGDIR", tempfile.mkdtemp(prefix="mpl-"))
    main()
