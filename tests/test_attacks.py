"""One attacking client among 8: the model, the reported figures and identities hold.

The attacker is the product's ClientApp with its replies altered (``attackers.py``,
selected by the node config key ``attack``). Each attack runs on a small federation
and is compared with the same run without an attacker (same seed): the honest
clients' true final accuracy may move by at most 3 points, and the reported local
accuracy may differ from the honest clients' truth by the attacker's capped share only.
``benchmarks/bench_attacks.py`` prints the same comparison at the default settings.
"""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path
from typing import Any

import attackers
import numpy as np
import pytest
from flwr.app import Array
from run_helpers import FAST, initial_arrays

from flexmoe_core import protocol as proto
from flexmoe_core.config import load_config
from flexmoe_core.reply_gate import EvaluationCaps, ReplyRejectedError, expected_arrays, judge_reply
from flexmoe_core.round_state import RoundState
from server_app.app import run
from server_app.codec import to_numpy
from server_app.inprocess import InProcessGrid

pytestmark = pytest.mark.usefixtures("one_thread")

CLIENTS, ROUNDS = 8, 6
ATTACKER = 1001  # node id of client 1
# Small, but trained far enough that the clients' accuracies agree to a few points
# (3 local epochs of batch 32 a round): the goals compare accuracies, not noise.
SETTINGS = (
    f"{FAST} model.width=16 model.feature_dim=32 train.local_epochs=3 train.batch_size=32 "
    "evaluate.global_every=3"
)


def plan_for(cfg: Any, arrays: dict[str, np.ndarray]) -> Any:
    state = RoundState(cfg, arrays)
    return state.plan(1, {0: 2, 1: 2})


def federation(tmp: Path, attack: str | None, name: str) -> dict[str, Any]:
    attackers.TRUE_EVALUATIONS.clear()
    nodes: list[dict[str, Any]] = [
        {"partition-id": i, "num-partitions": CLIENTS} for i in range(CLIENTS)
    ]
    if attack:
        nodes[ATTACKER - 1000]["attack"] = attack
    cfg = load_config(
        f"{SETTINGS} num_clients={CLIENTS} num_rounds={ROUNDS} output_root={tmp} run_name={name}"
    )
    run_dir = run(InProcessGrid(attackers.app, nodes), cfg)
    summary = json.loads((run_dir / "summary.json").read_text())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {
        "summary": summary,
        "records": records,
        # The same clients in every run: all but client 1 (the attacker when there is one).
        "truth": attackers.honest_final(ATTACKER),
        "everyone": attackers.honest_final(None),
    }


@pytest.fixture(scope="module")
def honest(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return federation(tmp_path_factory.mktemp("honest"), None, "honest")


@pytest.mark.parametrize("attack", sorted(attackers.ATTACKS))
def test_one_attacker_moves_accuracy_and_reports_by_little(
    attack: str, honest: dict[str, Any], tmp_path: Path
) -> None:
    attacked = federation(tmp_path, attack, attack)
    for split in ("local", "global"):
        moved = abs(attacked["truth"][split] - honest["truth"][split])
        assert moved <= 0.03, (split, attacked["truth"], honest["truth"])
    # Without an attacker the reported figure is the clients' true weighted mean.
    assert honest["summary"]["final_local_acc"] == pytest.approx(honest["everyone"]["local"])
    # A liar's count is capped at what it holds: its claim moves the figure by its share
    # (~1/8) times its distance from the truth, here at most 1/8 of (1 - accuracy).
    error = abs(attacked["summary"]["final_local_acc"] - attacked["truth"]["local"])
    assert error <= (1.0 - attacked["truth"]["local"]) / 8 + 0.01, error
    # What was cut is on record under the attacker's key (as counted, claim beside).
    key = str(ATTACKER - 1000)
    noted = [
        r for r in attacked["records"] if key in r.get("bounded", {}) or key in r.get("claims", {})
    ]
    assert noted, attacked["records"][-1]
    for record in attacked["records"]:
        assert record.get("train_examples", 0) < 10**6  # stored as counted


def test_an_oversized_reply_is_refused_by_name(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(attackers, "BIG_ARRAY_MB", 40)
    attacked = federation(tmp_path, "extra_array_400mb", "big")
    # Refused every round it was sent a message (then left out by the backoff).
    failures = [r["failures"]["1"] for r in attacked["records"] if "1" in r["failures"]]
    assert failures and all("extra.weight: 40 MiB refused unread" in f for f in failures)


def test_the_gate_reads_no_byte_of_an_oversized_array() -> None:
    cfg = load_config(f"{SETTINGS} num_clients=2 num_rounds=1")
    arrays = initial_arrays(cfg)
    plan = plan_for(cfg, arrays)
    experts = plan.experts[0]
    sent = {n: Array(v) for n, v in expected_arrays(arrays, experts).items()}
    sent["extra.weight"] = Array(np.ones(25 * 2**20, dtype=np.float32))  # 100 MiB
    content = {proto.ARRAYS: sent}
    tracemalloc.start()
    with pytest.raises(ReplyRejectedError, match=r"extra.weight: 100 MiB refused unread"):
        judge_reply(content, 0, plan, arrays, EvaluationCaps(), to_numpy)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 2**20, peak  # nothing decoded or copied
