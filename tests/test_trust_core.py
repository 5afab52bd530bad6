"""The trust boundary without Flower: reply fields, bounds and privacy in the round
state, runs that cannot progress, run folders and checkpoints."""

from __future__ import annotations

import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from test_round_state import config, initial_arrays, reply_to

from flexmoe_core import protocol as proto
from flexmoe_core.aggregation import ClientUpdate
from flexmoe_core.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from flexmoe_core.fitness import ExpertFeedback
from flexmoe_core.privacy import PrivacyPolicy, epsilon, private_aggregate
from flexmoe_core.reply_gate import check_update
from flexmoe_core.results import CLAIM_FILE, METRICS_FILE, RunDirError, make_run_dir
from flexmoe_core.round_state import ClientReply, RoundResults, RoundState, RunFailedError

CAPACITIES = {0: 2, 1: 2, 2: 2}


# ------------------------------------------------------------- reply fields
@pytest.mark.parametrize(
    ("value", "message"),
    [
        (math.inf, "not a whole number"),
        (math.nan, "not a whole number"),
        (2.5, "not a whole number"),
        (0, r"not in \[1, "),
        (2**60, r"not in \[1, "),
        ("100", "not a number"),
        (True, "not a number"),
        ([3], "not a number"),
    ],
)
def test_num_examples_must_be_a_whole_number_in_range(value: object, message: str) -> None:
    metrics = {proto.NUM_EXAMPLES: value, proto.TRAIN_LOSS: 0.5, proto.TRAIN_ACC: 0.5}
    with pytest.raises(ValueError, match=message):
        proto.decode_train_metrics(metrics)


def test_train_metrics_in_range_are_read_and_out_of_range_refused() -> None:
    good = {proto.NUM_EXAMPLES: 1e15, proto.TRAIN_LOSS: 0.0, proto.TRAIN_ACC: 1.0}
    assert proto.decode_train_metrics(good) == (10**15, 0.0, 1.0)  # the bounds cap it
    for key, value in [(proto.TRAIN_ACC, 50.0), (proto.TRAIN_ACC, math.nan)]:
        with pytest.raises(ValueError, match="not an accuracy"):
            proto.decode_train_metrics({**good, key: value})
    for value in (-1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="not a finite loss"):
            proto.decode_train_metrics({**good, proto.TRAIN_LOSS: value})
    with pytest.raises(ValueError, match="metrics lack 'train-acc'"):
        proto.decode_train_metrics({proto.NUM_EXAMPLES: 3, proto.TRAIN_LOSS: 0.1})


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"local-acc": 50.0}, "local-acc=50.0 is not an accuracy"),
        ({"local-acc": math.nan}, "local-acc=nan is not an accuracy"),
        ({"local-loss": -0.1}, "not a finite loss"),
        ({"local-loss": math.nan}, "not a finite loss"),
        ({"local-num": 2.5}, "not a whole number"),
        ({"local-num": math.inf}, "not a whole number"),
        ({"local-num": -1}, "not in"),
    ],
)
def test_evaluation_out_of_range_is_refused(change: dict, message: str) -> None:
    record = {"local-num": 10, "local-loss": 0.3, "local-acc": 0.9, **change}
    with pytest.raises(ValueError, match=message):
        proto.decode_evaluation(record)


def test_info_and_feedback_fields_are_checked() -> None:
    info = proto.decode_info({proto.CLIENT_KEY: 3, proto.CAPACITY: 2, proto.NUM_EXAMPLES: 90})
    assert info == proto.NodeInfo(3, 2, None, 90)
    for bad in ({proto.CLIENT_KEY: 1.5, proto.CAPACITY: 2}, {proto.CAPACITY: 2}):
        with pytest.raises(ValueError):
            proto.decode_info(bad)
    feedback = {"experts": [0], "usage": [5.0], "accuracy": [0.5], "loss": [0.1]}
    assert proto.decode_feedback(feedback)[0] == ExpertFeedback(5.0, 0.5, 0.1)
    for column, value in [("usage", -1.0), ("accuracy", 50.0), ("loss", -2.0)]:
        with pytest.raises(ValueError, match="out of range"):
            proto.decode_feedback({**feedback, column: [value]})
    with pytest.raises(ValueError, match="not a number"):
        proto.decode_feedback({**feedback, "usage": ["many"]})


# --------------------------------------------------- bounds in the round state
def _round(state: RoundState, server_round: int, change=None, declared=None):
    plan = state.plan(server_round, CAPACITIES)
    replies = [reply_to(state, plan, k, scale=0.01) for k in plan.experts]
    if change is not None:
        change(replies[0])
    results = RoundResults(replies=replies, declared_examples=declared or {})
    return plan, state.close(plan, results)


def test_an_attackers_influence_is_bounded_and_reported() -> None:
    """usage = 1e9 and weights 7.0: each expert it holds moves by a bounded share."""
    state = RoundState(config(), initial_arrays())
    before = {k: v.copy() for k, v in state.global_arrays.items()}

    def attack(reply: ClientReply) -> None:
        assert reply.update is not None
        reply.update.arrays = {k: np.full_like(v, 7) for k, v in reply.update.arrays.items()}
        reply.update.feedback = {e: ExpertFeedback(1e9, 1.0, 0.0) for e in reply.update.feedback}

    _, outcome = _round(state, 1, attack, declared={0: 20, 1: 21, 2: 22})
    assert outcome.accepted == [0, 1, 2]
    note = outcome.bounded[0]
    assert "usage of expert" in note and "1e+09 -> 20" in note
    # Its deltas are hundreds of times the honest ones: left out, not merely clipped.
    assert "backbone delta" in note and "the rejection bound: left out" in note
    assert state.records()[-1].trust.bounded == {"0": note}
    for name, value in state.global_arrays.items():
        if value.dtype.kind != "f":
            continue
        rms = float(np.sqrt(np.mean((value.astype(float) - before[name]) ** 2)))
        # Every delta is clipped to RMS 1 (max_update_rms): the mean moves no further,
        # while the attacker's values are 7 away from the start on average.
        assert rms <= 1.0 + 1e-6, name
        assert float(np.abs(value - 7.0).min()) > 3.0, name


def test_honest_rounds_report_no_bounds() -> None:
    state = RoundState(config(), initial_arrays())
    for server_round in (1, 2):
        _, outcome = _round(state, server_round, declared={0: 20, 1: 21, 2: 22})
        assert outcome.bounded == {}
    assert not any(r.trust.bounded is not None for r in state.records())


def test_stalled_run_stops_quoting_reasons_and_keeps_the_last_good_state() -> None:
    state = RoundState(config("num_rounds=9 faults.max_failed_rounds=2"), initial_arrays())
    _round(state, 1)
    saved = state.checkpoint(CAPACITIES)
    lost = RoundResults(failures={0: "client error: FileNotFoundError: no data", 1: "x"})
    state.close(state.plan(2, CAPACITIES), lost)
    assert state.completed_round == 2  # one failed round is survived
    with pytest.raises(RunFailedError) as err:
        state.close(state.plan(3, CAPACITIES), lost)
    message = str(err.value)
    assert "2 consecutive rounds (2 to 3" in message
    assert "'client error: FileNotFoundError: no data' (2 replies; clients 0)" in message
    assert "'no reply within the round timeout' (2 replies; clients 2)" in message
    assert state.completed_round == 2 and len(state.records()) == 2  # round 3 left no trace
    assert state.summary(CAPACITIES, str(err.value))["status"] == "failed"
    assert state.summary(CAPACITIES)["status"] == "completed"
    # A resumed run counts the failed rounds of its checkpoint.
    resumed = RoundState(config("num_rounds=9 faults.max_failed_rounds=2"), initial_arrays())
    resumed.restore(state.checkpoint(CAPACITIES))
    with pytest.raises(RunFailedError):
        resumed.close(resumed.plan(3, CAPACITIES), lost)
    assert saved.round == 1


def test_no_stop_when_disabled() -> None:
    state = RoundState(config("faults.max_failed_rounds=0"), initial_arrays())
    for server_round in (1, 2, 3):
        state.close(state.plan(server_round, CAPACITIES), RoundResults())
    assert state.completed_round == 3


def test_private_rounds_report_epsilon_and_repeat_after_a_restore() -> None:
    overrides = "privacy.enabled=true privacy.noise_multiplier=0.5"
    state = RoundState(config(overrides), initial_arrays())
    _round(state, 1)
    checkpoint = state.checkpoint(CAPACITIES)
    _round(state, 2)
    record = state.records()[-1]
    assert record.trust.dp_epsilon == pytest.approx(epsilon(0.5, 1.0, 2, 1e-5))
    assert set(record.trust.dp_noise_std) >= {"backbone"}
    assert record.trust.dp_noise_std["backbone"] == pytest.approx(0.5 * 1.0 / 3)
    summary = state.summary(CAPACITIES)
    assert summary["dp_epsilon"] == record.trust.dp_epsilon and summary["dp_delta"] == 1e-5
    again = RoundState(config(overrides), initial_arrays())
    again.restore(checkpoint)
    _round(again, 2)
    for name, value in state.global_arrays.items():
        np.testing.assert_array_equal(value, again.global_arrays[name], err_msg=name)
    # The noise is real: another seed gives another model.
    other = RoundState(config(overrides + " seed=1"), initial_arrays())
    other.restore(checkpoint)
    _round(other, 2)
    assert not np.array_equal(other.global_arrays["backbone.w"], state.global_arrays["backbone.w"])


def test_declared_examples_cap_the_count() -> None:
    state = RoundState(config(), initial_arrays())

    def inflate(reply: ClientReply) -> None:
        assert reply.update is not None
        reply.update.num_examples = 1000

    _, outcome = _round(state, 1, inflate, declared={0: 20})
    assert outcome.bounded[0].startswith("examples 1000 counted as 20")


# ------------------------------------------------------- folders, checkpoints
def test_output_root_that_is_a_file_is_refused_clearly(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    for root in (blocker, blocker / "below"):
        with pytest.raises(RunDirError, match="is a file, not a folder; set output_root"):
            make_run_dir(config(f"run_name=r output_root={root}"))


def test_run_folders_are_claimed_atomically(tmp_path: Path) -> None:
    cfg = config(f"run_name=same output_root={tmp_path}")
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "from flexmoe_core.results import claim_run_dir\n"
            "from pathlib import Path\n"
            f"assert claim_run_dir(Path({str(tmp_path / 'same')!r}))\n"
            "print('claimed', flush=True)\n"
            "time.sleep(60)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "claimed"
        # Another process runs "same" now: this run gets a folder of its own.
        assert make_run_dir(cfg) == tmp_path / "same-2"
        assert make_run_dir(cfg) == tmp_path / "same-3"  # and again (same process)
    finally:
        holder.kill()
        holder.wait()
    time.sleep(0.1)
    # A folder whose run ended (no results yet) is free again; one with results is not.
    assert (tmp_path / "same" / CLAIM_FILE).is_file()
    assert make_run_dir(cfg) == tmp_path / "same"
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / METRICS_FILE).write_text("{}\n")
    assert make_run_dir(config(f"run_name=other output_root={tmp_path}")).name == "other-2"


def test_truncated_checkpoint_is_reported_not_raised_raw(tmp_path: Path) -> None:
    state = RoundState(config(), initial_arrays())
    _round(state, 1)
    path = tmp_path / "checkpoint.npz"
    save_checkpoint(path, state.checkpoint(CAPACITIES))
    data = path.read_bytes()
    for size in (len(data) // 2, 10, 0):
        path.write_bytes(data[:size])
        with pytest.raises(CheckpointError, match="truncated or corrupted"):
            load_checkpoint(path)


def test_negative_batchnorm_variances_are_refused_and_never_released() -> None:
    """A finite negative variance passes the NaN check but makes every output NaN."""
    reference = {
        "backbone.bn.running_var": np.ones(4, np.float32),
        "experts.0.w": np.zeros(3, np.float32),
    }
    arrays = {**reference, "backbone.bn.running_var": np.array([1, -2, 1, 1], np.float32)}
    update = ClientUpdate(0, arrays, 10, {0: ExpertFeedback(5.0, 0.5, 0.1)})
    assert check_update(update, reference, [0]) == ["backbone.bn.running_var: a negative variance"]
    policy = PrivacyPolicy(clip_norm=1.0, noise_multiplier=50.0)
    honest = ClientUpdate(0, dict(reference), 10, {0: ExpertFeedback(5.0, 0.5, 0.1)})
    released = private_aggregate(reference, [honest], policy, np.random.default_rng(0))
    assert (released.arrays["backbone.bn.running_var"] >= 0).all()
    assert (released.arrays["experts.0.w"] < 0).any()  # other arrays are not clamped
