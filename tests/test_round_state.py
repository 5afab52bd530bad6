"""The round state and the roster without Flower: synthetic updates, client keys only."""

from __future__ import annotations

import numpy as np
import pytest

from flexmoe_core.aggregation import ClientUpdate
from flexmoe_core.checkpoint import load_checkpoint, save_checkpoint
from flexmoe_core.config import load_settings
from flexmoe_core.fitness import ExpertFeedback
from flexmoe_core.reply_gate import check_update
from flexmoe_core.roster import Roster
from flexmoe_core.round_state import NO_REPLY, ClientReply, RoundResults, RoundState
from flexmoe_core.settings import Settings

E = 4


# ------------------------------------------------------------------ roster
def test_a_key_goes_to_its_first_claimant_and_is_refused_to_a_second_while_held() -> None:
    roster = Roster(E)
    assert roster.claim("a", 7, 2, connected={"a"}).status == "joined"
    assert roster.claim("a", 7, 3, connected={"a"}).status == "kept"
    assert roster.capacities() == {7: 3}
    refusal = roster.claim("b", 7, 2, connected={"a", "b"})
    assert not refusal.admitted and refusal.retry
    assert "client key 7 is bound to node a" in refusal.message
    assert "node b claims it too" in refusal.message
    assert roster.holder_of(7) == "a" and roster.key_of("b") is None


def test_a_key_comes_back_to_a_restarted_node() -> None:
    roster = Roster(E, rebind_grace_s=0.0)
    roster.claim("old", 3, 2, connected={"old"})
    # The old node id missed its last message: not sampled, but it keeps its key (a
    # late reply says nothing about who holds it).
    roster.missed(3)
    assert roster.available({"old"}) == []
    assert roster.claim("new", 3, 2, connected={"old", "new"}).status == "refused"
    # The SuperLink reports it unavailable (killed), the grace has passed: a restarted
    # node with the same client key takes the key back while the old id is listed.
    roster.unavailable(3)
    assert roster.claim("new", 3, 2, connected={"old", "new"}).status == "rejoined"
    assert roster.holder_of(3) == "new" and roster.key_of("old") is None
    assert roster.available({"old", "new"}) == [3]
    # ... and when the old node id is gone, so is nothing else.
    assert roster.leave({"new"}) == []
    # A node that leaves releases its key; whoever claims it next rejoins.
    assert roster.leave(set()) == [3]
    assert roster.holder_of(3) is None and roster.available({"new"}) == []
    assert roster.claim("newer", 3, 4, connected={"newer"}).status == "rejoined"
    assert roster.capacities() == {3: 4}


def test_keys_known_from_a_checkpoint_rejoin_and_stay_in_the_state() -> None:
    roster = Roster(E, known={1: 2, 5: 3})
    assert roster.claim("x", 1, 2, connected={"x"}).status == "rejoined"
    assert roster.claim("y", 9, 1, connected={"x", "y"}).status == "joined"
    assert roster.state() == {1: 2, 5: 3, 9: 1}  # 5 did not come back: kept


def test_bad_claims_are_refused_for_good() -> None:
    roster = Roster(E)
    bad = roster.claim("a", 1, 0, connected={"a"})
    assert not bad.admitted and not bad.retry and "[1, 4]" in bad.message
    roster.claim("a", 1, 2, connected={"a"})
    other = roster.claim("a", 2, 2, connected={"a"})
    assert not other.admitted and not other.retry and "already holds client key 1" in other.message


def test_reported_capacities_are_checked_and_used() -> None:
    roster = Roster(E)
    roster.claim("a", 0, 2, connected={"a"})
    assert roster.report_capacity(0, 3) is None
    assert roster.capacities() == {0: 3}
    assert "[1, 4]" in (roster.report_capacity(0, 9) or "")
    assert roster.capacities() == {0: 3}


# ------------------------------------------------------------- round state
def config(extra: str = "") -> Settings:
    return load_settings(
        f"model.num_experts={E} num_rounds=3 min_clients_per_round=2 fitness.q0=1.0 "
        f"evaluate.every=1 evaluate.global_every=2 {extra}"
    )


def initial_arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    arrays = {"backbone.w": rng.normal(size=(3, 2)).astype(np.float32)}
    arrays["backbone.bn.num_batches_tracked"] = np.array(0, dtype=np.int64)
    for e in range(E):
        arrays[f"experts.{e}.w"] = rng.normal(size=(2, 2)).astype(np.float32)
    return arrays


def reply_to(state: RoundState, plan, key: int, scale: float = 1.0) -> ClientReply:
    """A synthetic, well-formed reply: every array shifted by ``scale * (key + 1)``."""
    arrays = {
        name: (value + np.asarray(scale * (key + 1), dtype=value.dtype)).astype(value.dtype)
        for name, value in plan.arrays[key].items()
    }
    feedback = {e: ExpertFeedback(10.0 + e, 0.5, 0.1 * (key + 1)) for e in plan.experts[key]}
    evaluation = {"local": (10 + key, 0.5, 0.1 * key)} if plan.evaluates is not None else None
    update = ClientUpdate(key, arrays, 20 + key, feedback)
    heldout = {e: ExpertFeedback(8.0, 0.5, 0.2 * (key + 1)) for e in plan.experts[key]}
    return ClientReply(key, update, 1.0, 0.5, evaluation, heldout)


def run_round(state: RoundState, server_round: int, capacities: dict[int, int], **kw) -> object:
    plan = state.plan(server_round, capacities)
    replies = [reply_to(state, plan, k) for k in plan.experts if k not in kw.get("lost", ())]
    results = RoundResults(replies=replies, bytes_sent={k: 100 for k in plan.experts})
    return plan, state.close(plan, results)


def test_plan_samples_allocates_and_sends_each_participant_its_experts_only() -> None:
    state = RoundState(config("fraction_train=0.25"), initial_arrays())
    capacities = {k: 1 + k % E for k in range(20)}
    plan = state.plan(1, capacities)
    assert len(plan.experts) == 5 and list(plan.experts) == sorted(plan.experts)
    assert plan.evaluates is None and plan.available == 20
    for key, experts in plan.experts.items():
        assert len(experts) == capacities[key]
        assert set(plan.arrays[key]) == {"backbone.w", "backbone.bn.num_batches_tracked"} | {
            f"experts.{e}.w" for e in experts
        }
    assert state.plan(1, capacities).experts == plan.experts  # seeded by (seed, round)
    assert state.plan(2, capacities).experts != plan.experts


def test_close_aggregates_in_key_order_whatever_the_reply_order() -> None:
    results = []
    for order in (1, -1):
        state = RoundState(config(), initial_arrays())
        plan = state.plan(1, {0: 2, 1: 2, 2: 3})
        replies = [reply_to(state, plan, k) for k in plan.experts][::order]
        state.close(plan, RoundResults(replies=replies))
        results.append(state.global_arrays)
    for name in results[0]:
        np.testing.assert_array_equal(results[0][name], results[1][name])
    assert results[0]["backbone.bn.num_batches_tracked"].dtype == np.int64


def test_bad_and_missing_replies_are_left_out_and_named() -> None:
    state = RoundState(config(), initial_arrays())
    plan = state.plan(1, {0: 2, 1: 2, 2: 2})
    good = reply_to(state, plan, 0)
    nan = reply_to(state, plan, 1)
    assert nan.update is not None
    nan.update.arrays["backbone.w"] = np.full((3, 2), np.nan, dtype=np.float32)
    # The reply gate judges every reply before the round state sees it.
    problems = check_update(nan.update, state.global_arrays, plan.experts[1])
    assert problems == ["backbone.w: contains NaN or Inf"]
    rejected = {1: "rejected: " + "; ".join(problems)}
    outcome = state.close(plan, RoundResults(replies=[good], failures=rejected))
    assert outcome.accepted == [0]
    assert "NaN or Inf" in outcome.failures[1] and outcome.failures[2] == NO_REPLY
    # Only client 0's experts moved; its fitness row learned, the others' did not.
    for e in range(E):
        moved = not np.array_equal(
            state.global_arrays[f"experts.{e}.w"], initial_arrays()[f"experts.{e}.w"]
        )
        assert moved == (e in plan.experts[0])
    table = state.fitness.state()
    rows = dict(zip(table["client_ids"], table["values"], strict=True))
    assert rows[1] == rows[2] == [1.0] * E and rows[0] != [1.0] * E


def test_a_round_record_is_finished_by_the_next_round_and_the_last_by_the_final_evaluation() -> (
    None
):
    state = RoundState(config(), initial_arrays())
    capacities = {0: 2, 1: 2, 2: 2}
    _, first = run_round(state, 1, capacities)
    assert first.finished == [] and state.pending is not None  # waits for its evaluation
    plan2, second = run_round(state, 2, capacities)
    assert plan2.evaluates == 1 and not plan2.global_test  # global test every 2 rounds
    assert [r.round for r in second.finished] == [1]
    record = second.finished[0]
    # Clients 0, 1, 2 evaluated round 1's model: (10, 0.0), (11, 0.1), (12, 0.2).
    assert record.evaluation.local_acc == pytest.approx((11 * 0.1 + 12 * 0.2) / 33)
    assert record.evaluation.clients == 3 and record.traffic.sent == 300
    _, third = run_round(state, 3, capacities)
    assert [r.round for r in third.finished] == [2]
    final = state.final_evaluation()
    assert final is not None and not final.trains and final.evaluates == 3 and final.global_test
    assert state.pending is not None
    assert final.experts == {int(k): e for k, e in state.pending.allocation.assignment.items()}
    replies = [
        ClientReply(k, evaluation={"local": (5, 0.3, 0.8), "global": (9, 0.4, 0.6)})
        for k in final.experts
    ]
    outcome = state.close(final, RoundResults(replies=replies, bytes_sent={0: 50}))
    (last,) = outcome.finished
    assert (
        last.round == 3 and last.evaluation.local_acc == 0.8 and last.evaluation.global_acc == 0.6
    )
    assert last.traffic.sent_per_client["0"] == 150  # the train message + the final one
    assert [r.round for r in state.history] == [1, 2, 3] and state.pending is None
    assert state.final_evaluation() is None
    summary = state.summary(capacities)
    assert summary["rounds"] == 3 and summary["final_local_acc"] == 0.8 and summary["clients"] == 3


def test_rounds_off_the_evaluation_schedule_are_finished_at_once() -> None:
    state = RoundState(config("evaluate.every=2 num_rounds=3"), initial_arrays())
    _, first = run_round(state, 1, {0: 1, 1: 1})
    assert [r.round for r in first.finished] == [1] and first.finished[
        0
    ].evaluation.local_acc is None
    plan2, second = run_round(state, 2, {0: 1, 1: 1})
    assert plan2.evaluates is None and second.finished == []
    plan3, third = run_round(state, 3, {0: 1, 1: 1})
    assert plan3.evaluates == 2 and [r.round for r in third.finished] == [2]


def test_checkpoint_and_restore_continue_exactly(tmp_path) -> None:
    capacities = {0: 2, 1: 3, 2: 1, 3: 2}
    straight = RoundState(config(), initial_arrays())
    for r in (1, 2, 3):
        run_round(straight, r, capacities, lost=(2,) if r == 2 else ())
    interrupted = RoundState(config(), initial_arrays())
    for r in (1, 2):
        run_round(interrupted, r, capacities, lost=(2,) if r == 2 else ())
    path = tmp_path / "checkpoint.npz"
    save_checkpoint(path, interrupted.checkpoint(capacities))
    resumed = RoundState(config(), initial_arrays())
    resumed.restore(load_checkpoint(path))
    assert resumed.completed_round == 2 and resumed.pending is not None
    run_round(resumed, 3, capacities)
    for name, value in straight.global_arrays.items():
        np.testing.assert_array_equal(resumed.global_arrays[name], value)

    def rows(state: RoundState) -> dict:
        table = state.fitness.state()  # every row, with its start and measured entries
        columns = [table[k] for k in ("values", "start", "measured")]
        return dict(zip(table["client_ids"], zip(*columns, strict=True), strict=True))

    assert rows(resumed) == rows(straight)
    strip = ("server_time_s", "round_time_s", "allocation_time_s")
    assert [
        {k: v for k, v in r.to_json().items() if k not in strip} for r in resumed.records()
    ] == [{k: v for k, v in r.to_json().items() if k not in strip} for r in straight.records()]
