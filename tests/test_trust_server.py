"""The trust boundary through the server: lying clients, malformed replies, runs that
cannot progress, and differential privacy, on the in-process grid (no Ray)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ConfigRecord, Context, Message, MessageType, RecordDict
from run_helpers import (
    FAST,
    assert_same_arrays,
    fast_config,
    initial_arrays,
    make_grid,
    run_strategy,
)

from flexmoe_core import protocol as proto
from flexmoe_core.checkpoint import checkpoint_path, load_checkpoint
from flexmoe_core.model import split_expert_key
from flexmoe_core.report import FAILED, run_state
from flexmoe_core.results import SUMMARY_FILE, read_metrics
from flexmoe_core.round_state import RunFailedError
from flexmoe_core.update_bounds import BACKBONE, group_of
from server_app.app import main as server_main

pytestmark = pytest.mark.usefixtures("one_thread")

VICTIM = 1001  # node id of client 1 in the in-process grid
VICTIM_KEY = 1


def is_train(message: Message) -> bool:
    return message.metadata.message_type == MessageType.TRAIN


def tamper_victim(change: Callable[[Message], None], train: bool = True) -> Callable:
    """Return a grid ``tamper`` that applies ``change`` to the victim's train (or
    evaluate) replies."""

    def tamper(node: int, reply: Message) -> Message:
        kind = MessageType.TRAIN if train else MessageType.EVALUATE
        if node == VICTIM and reply.metadata.message_type == kind and not reply.has_error():
            change(reply)
        return reply

    return tamper


def rms_changes(new: dict, old: dict) -> dict:
    """Return the RMS change per element of the backbone and of each expert (the
    groups the aggregation clips)."""
    squares: dict = {}
    for name, value in new.items():
        if value.dtype.kind == "f":
            group = group_of(name)
            total, size = squares.get(group, (0.0, 0))
            delta = (value.astype(np.float64) - old[name]).ravel()
            squares[group] = (total + float(delta @ delta), size + delta.size)
    return {g: math.sqrt(total / size) for g, (total, size) in squares.items()}


def serve(tmp_path: Path, overrides: str, grid) -> Path:
    """Run the ServerApp's main on ``grid``; return the run folder."""
    context = Context(
        run_id=1,
        node_id=0,
        node_config={},
        state=RecordDict(),
        run_config={"overrides": f"{FAST} {overrides} run_name=r output_root={tmp_path}"},
    )
    server_main(grid, context)
    return tmp_path / "r"


# ----------------------------------------------------------------- honest runs
def test_bounds_that_do_not_bind_change_no_number() -> None:
    bounded = run_strategy(fast_config(), make_grid(3))
    off = "aggregation.max_examples_ratio=null aggregation.max_update_rms=null"
    unbounded = run_strategy(fast_config(off), make_grid(3))
    assert_same_arrays(bounded.global_arrays, unbounded.global_arrays)
    assert not any(r.trust.bounded is not None for r in bounded.history)
    # The clients declared their training examples at the query, as they train on.
    declared = {k: m.num_examples for k, m in bounded.roster.members.items()}
    counts = [r.training.examples for r in bounded.history]
    assert all(n and n > 0 for n in declared.values())
    assert counts[0] == sum(declared.values())


# ----------------------------------------------------------------- attackers
def _usage_1e9_weights_7(reply: Message) -> None:
    arrays = reply.content[proto.ARRAYS]
    for name in list(arrays):
        value = arrays[name].numpy()
        if value.dtype.kind == "f":
            arrays[name] = Array(np.full_like(value, 7.0))
    metrics = reply.content[proto.METRICS]
    metrics[proto.TRAIN_LOSS], metrics[proto.TRAIN_ACC] = 0.0, 1.0
    feedback = reply.content[proto.FEEDBACK]
    feedback["usage"] = [1e9] * len(list(feedback["usage"]))


def test_usage_1e9_and_weights_7_move_the_model_by_a_bounded_step(caplog) -> None:
    cfg = fast_config(num_rounds=1)
    before = initial_arrays(cfg)
    caplog.set_level("WARNING")
    strategy = run_strategy(cfg, make_grid(3, tamper=tamper_victim(_usage_1e9_weights_7)))
    assert strategy.outcome is not None and strategy.outcome.accepted == [0, 1, 2]
    note = strategy.outcome.bounded[VICTIM_KEY]
    assert "usage of expert" in note and "1e+09 ->" in note
    # Weights set to 7.0 move them hundreds of times more than the honest clients did:
    # left out (not merely clipped), the backbone likewise.
    assert "the rejection bound: left out" in note
    assert f"node {VICTIM} (client {VICTIM_KEY})'s influence bounded: usage" in caplog.text
    # A warning for the cut claims; an honest client that was only clipped is routine.
    assert strategy.outcome.warned == {VICTIM_KEY}
    held = strategy.history[-1].allocation.assignment[str(VICTIM_KEY)]
    moved = rms_changes(strategy.global_arrays, before)
    # Each delta is clipped to RMS 1 per element (aggregation.max_update_rms): the
    # aggregate of the backbone and of each expert moves no further, while the
    # attacker's copy sits ~7 away. Without the bounds its usage would make each
    # expert it held its copy (all values 7.0).
    for group in [BACKBONE, *held]:
        assert moved[group] <= 1.0 + 1e-5, group
    for name, value in strategy.global_arrays.items():
        if value.dtype.kind == "f" and group_of(name) in [BACKBONE, *held]:
            assert float(np.abs(value - 7.0).min()) > 3.0, name


def _examples_1e15_constant_backbone(reply: Message) -> None:
    arrays = reply.content[proto.ARRAYS]
    for name in list(arrays):
        value = arrays[name].numpy()
        if split_expert_key(name) is None and value.dtype.kind == "f":
            arrays[name] = Array(np.full_like(value, 0.5))
    reply.content[proto.METRICS][proto.NUM_EXAMPLES] = 1e15


def test_num_examples_1e15_with_a_constant_backbone_does_not_take_it_over() -> None:
    cfg = fast_config(num_rounds=2)
    before = initial_arrays(cfg)
    grid = make_grid(3, tamper=tamper_victim(_examples_1e15_constant_backbone))
    strategy = run_strategy(cfg, grid)
    declared = strategy.roster.members[VICTIM_KEY].num_examples
    first, second = strategy.history
    assert first.trust.bounded[str(VICTIM_KEY)].startswith(f"examples 1e+15 counted as {declared}")
    # Every honest client trains and is accepted in the next round too (before the
    # bounds it failed with "training loss became nan").
    assert (
        first.participation.accepted == second.participation.accepted == 3
        and second.participation.failures == {}
    )
    assert 0.0 <= second.training.acc <= 1.0 and math.isfinite(second.training.loss)
    # Two rounds, each step clipped to RMS 1 per element: the backbone is not the
    # attacker's constant, it stays near the backbone of the same run without it
    # (element by element, BatchNorm statistics may be near 0.5 honestly).
    assert rms_changes(strategy.global_arrays, before)[BACKBONE] <= 2.0 + 1e-5
    honest = run_strategy(cfg, make_grid(3)).global_arrays
    names = [
        n
        for n, v in honest.items()
        if split_expert_key(n) is None and v.dtype.kind == "f" and v.size > 1
    ]
    attacked = np.concatenate([strategy.global_arrays[n].ravel() for n in names])
    reference = np.concatenate([honest[n].ravel() for n in names])
    to_honest = float(np.sqrt(np.mean((attacked - reference) ** 2)))
    to_constant = float(np.sqrt(np.mean((attacked - 0.5) ** 2)))
    assert to_honest < to_constant / 2, (to_honest, to_constant)


# ------------------------------------------------------------ malformed replies
def _metric(key: str, value: float) -> Callable[[Message], None]:
    return lambda reply: reply.content[proto.METRICS].__setitem__(key, value)


def _evaluation(change: Callable[[dict], None] | None) -> Callable[[Message], None]:
    def apply(reply: Message) -> None:
        if change is None:
            del reply.content[proto.EVALUATION]
        else:
            change(reply.content[proto.EVALUATION])

    return apply


MALFORMED: dict[str, tuple[Callable[[Message], None], str]] = {
    "num-examples inf": (_metric(proto.NUM_EXAMPLES, math.inf), "num-examples=inf is not"),
    "num-examples 2.5": (_metric(proto.NUM_EXAMPLES, 2.5), "not a whole number"),
    "train-acc 50": (_metric(proto.TRAIN_ACC, 50.0), "train-acc=50.0 is not an accuracy"),
    "train-loss NaN": (_metric(proto.TRAIN_LOSS, math.nan), "not a finite loss"),
    "no metrics record": (
        lambda r: r.content.__delitem__(proto.METRICS),
        "no 'metrics' in the reply",
    ),
    "metrics of the wrong kind": (
        lambda r: r.content.__setitem__(proto.METRICS, ConfigRecord({"num-examples": "x"})),
        "num-examples='x' is not a number",
    ),
    "arrays of the wrong kind": (
        lambda r: r.content.__setitem__(proto.ARRAYS, ConfigRecord({"a": "b"})),
        "['a'] are not arrays",
    ),
    "no evaluation record": (_evaluation(None), "no 'evaluation' in the reply"),
    "evaluation accuracy 50": (
        _evaluation(lambda e: e.__setitem__("local-acc", 50.0)),
        "local-acc=50.0 is not an accuracy",
    ),
    "evaluation accuracy NaN": (
        _evaluation(lambda e: e.__setitem__("local-acc", math.nan)),
        "local-acc=nan is not an accuracy",
    ),
}


@pytest.mark.parametrize("kind", sorted(MALFORMED))
def test_a_malformed_train_reply_is_a_named_failure_of_its_node(kind: str, caplog) -> None:
    change, expected = MALFORMED[kind]

    replies = []

    def in_round_2(reply: Message) -> None:  # round 2's replies carry an evaluation
        replies.append(reply)
        if len(replies) == 2:
            change(reply)

    caplog.set_level("WARNING")
    strategy = run_strategy(
        fast_config(num_rounds=2), make_grid(3, tamper=tamper_victim(in_round_2))
    )
    why = strategy.history[-1].participation.failures[str(VICTIM_KEY)]
    assert why.startswith("rejected: malformed reply: ") and expected in why, why
    assert strategy.history[-1].participation.accepted == 2
    assert f"node {VICTIM} (client {VICTIM_KEY}) left out of this round" in caplog.text
    # Round 1's evaluation (made in round 2) counts the two good clients only.
    assert strategy.history[0].evaluation.clients == 2
    assert 0.0 <= strategy.history[0].evaluation.local_acc <= 1.0


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (_evaluation(None), "no 'evaluation' in the reply"),
        (_evaluation(lambda e: e.__setitem__("local-acc", 50.0)), "is not an accuracy"),
        (_evaluation(lambda e: e.__setitem__("local-loss", math.nan)), "not a finite loss"),
    ],
)
def test_a_malformed_final_evaluation_is_refused_not_summarised(change, expected, caplog) -> None:
    caplog.set_level("WARNING")
    grid = make_grid(3, tamper=tamper_victim(change, train=False))
    strategy = run_strategy(fast_config(num_rounds=1), grid)
    last = strategy.history[-1]
    assert last.evaluation.clients == 2 and 0.0 <= last.evaluation.local_acc <= 1.0
    assert f"node {VICTIM} (client {VICTIM_KEY})" in caplog.text and expected in caplog.text


# --------------------------------------------------------------- fatal is fatal
def test_rounds_without_an_accepted_update_stop_the_run_as_failed(tmp_path: Path) -> None:
    grid = make_grid(3, fail=lambda node, m: "raise" if is_train(m) else None)
    with pytest.raises(RunFailedError, match="2 consecutive rounds") as err:
        serve(tmp_path, "num_clients=3 num_rounds=5 faults.max_failed_rounds=2", grid)
    assert "injected failure on node 1000" in str(err.value)
    run_dir = tmp_path / "r"
    summary = json.loads((run_dir / SUMMARY_FILE).read_text())
    assert summary["status"] == "failed" and "injected failure on node" in summary["error"]
    assert summary["error"].startswith("RunFailedError: no client update was accepted")
    assert run_state(run_dir) == FAILED  # what the sweep and the report read
    checkpoint = load_checkpoint(checkpoint_path(run_dir))
    assert checkpoint.round == 1 and checkpoint.pending is not None  # round 2 left no trace
    assert checkpoint.pending.participation.accepted == 0


def test_a_missing_dataset_is_caught_before_round_1(tmp_path: Path) -> None:
    grid = make_grid(3)
    missing = tmp_path / "nowhere" / "cifar10.tar.gz"
    with pytest.raises(RuntimeError, match="3 nodes were left out") as err:
        serve(tmp_path, f"num_clients=3 dataset=cifar10 dataset.path={missing}", grid)
    assert "dataset.path" in str(err.value) and "nowhere" in str(err.value)
    assert not any(is_train(m) for m in grid.sent)  # no round started
    summary = json.loads((tmp_path / "r" / SUMMARY_FILE).read_text())
    assert summary["status"] == "failed" and "dataset.path" in summary["error"]


# ------------------------------------------------------------------ privacy
def test_private_run_reports_epsilon_in_records_and_summary(tmp_path: Path) -> None:
    run_dir = serve(
        tmp_path,
        "num_clients=3 num_rounds=2 privacy.enabled=true privacy.noise_multiplier=0.5",
        make_grid(3),
    )
    records = read_metrics(run_dir)
    summary = json.loads((run_dir / SUMMARY_FILE).read_text())
    assert summary["status"] == "completed"
    assert records[0]["dp_epsilon"] < records[1]["dp_epsilon"] == summary["dp_epsilon"]
    assert 10 < summary["dp_epsilon"] < 20  # sigma 0.5, q = 1, 2 rounds, delta 1e-5
    assert records[1]["dp_noise_std"]["backbone"] == pytest.approx(0.5 / 3)
