"""Capacity from memory (capacity=auto), the capacity file, and the backoff of failing clients."""

from __future__ import annotations

import math

import pytest
import torch
from flwr.app import Message, MessageType
from run_helpers import as_settings, fast_config, make_grid, node_configs, run_strategy

from flexmoe_core import protocol as proto
from flexmoe_core.backoff import BackoffPolicy, benched, leave_out
from flexmoe_core.footprint import MIB, Footprint, measure_footprint, memory_budget_bytes
from flexmoe_core.model import build_model
from flexmoe_core.node import NodeSettings
from flexmoe_core.records import AllocationRecord, Participation, RoundRecord, headline
from flexmoe_core.roster import Roster

pytestmark = pytest.mark.usefixtures("one_thread")


def settings(config: dict, node_id: int = 5) -> NodeSettings:
    return NodeSettings(node_id, config)


# ----------------------------------------------------------------- footprint
def test_footprint_counts_parameters_gradients_momentum_and_activations() -> None:
    cfg = as_settings(fast_config())
    shape, classes = list(cfg.dataset.input_shape), int(cfg.dataset.num_classes)
    small = measure_footprint(cfg.model, shape, classes, 8)
    large = measure_footprint(cfg.model, shape, classes, 64)
    model = build_model(cfg.model, shape, classes, [0])
    expert_params = sum(p.numel() * p.element_size() for p in model.experts.parameters())
    # Weights, gradients and SGD momentum: three copies of the expert's parameters at
    # least; activations on top, growing with the batch.
    assert small.expert_bytes >= 3 * expert_params
    assert large.expert_bytes > small.expert_bytes
    assert large.trunk_bytes > small.trunk_bytes > 0


def test_a_one_expert_model_is_measured_too() -> None:
    cfg = as_settings(
        fast_config("model.num_experts=1 model.top_k=1 capacity.profile=constant capacity.value=1")
    )
    fp = measure_footprint(cfg.model, list(cfg.dataset.input_shape), 10, 8)
    assert fp.expert_bytes > 0 and fp.capacity(fp.trunk_bytes + fp.expert_bytes, 1) == 1


def test_capacity_is_the_experts_that_fit_next_to_the_trunk() -> None:
    fp = Footprint(trunk_bytes=100, expert_bytes=30, batch_size=1)
    assert fp.capacity(100 + 3 * 30, 8) == 3
    assert fp.capacity(100 + 3 * 30 - 1, 8) == 2
    assert fp.capacity(100 + 29, 8) == 0
    assert fp.capacity(10**9, 8) == 8


@pytest.mark.parametrize("value", [0, -5, "lots", math.inf, math.nan, True])
def test_memory_budget_must_be_a_positive_number(value: object) -> None:
    with pytest.raises(ValueError, match="memory-mb"):
        memory_budget_bytes(value)


def test_auto_capacity_follows_the_memory_budget() -> None:
    cfg = as_settings(fast_config())
    fp = measure_footprint(
        cfg.model,
        list(cfg.dataset.input_shape),
        int(cfg.dataset.num_classes),
        int(cfg.train.batch_size),
    )
    # A budget for the trunk and exactly two experts, in MiB.
    budget_mb = (fp.trunk_bytes + 2.5 * fp.expert_bytes) / MIB
    report = settings(
        {"capacity": "auto", "memory-mb": budget_mb, "data-path": "/x"}
    ).capacity_report(cfg)
    assert report.capacity == 2 and report.memory_mb == pytest.approx(budget_mb)
    big = settings({"capacity": "auto", "memory-mb": 10**6, "data-path": "/x"})
    assert big.capacity(cfg) == int(cfg.model.num_experts)
    tiny = settings({"capacity": "auto", "memory-mb": fp.trunk_bytes / MIB, "data-path": "/x"})
    with pytest.raises(ValueError, match="not one expert"):
        tiny.capacity(cfg)


def test_auto_capacity_without_a_budget_takes_a_share_of_the_free_ram() -> None:
    report = settings({"capacity": "auto", "data-path": "/x"}).capacity_report(
        as_settings(fast_config())
    )
    assert report.capacity >= 1 and report.memory_mb is not None and report.memory_mb > 0


def test_auto_capacity_leaves_the_random_state_alone() -> None:
    torch.manual_seed(3)
    expected = torch.rand(1)
    torch.manual_seed(3)
    cfg = as_settings(fast_config("train.batch_size=17"))  # a batch size nothing measured yet
    settings({"capacity": "auto", "memory-mb": 512, "data-path": "/x"}).capacity(cfg)
    assert torch.equal(torch.rand(1), expected)


# -------------------------------------------------------------- capacity file
def test_capacity_file_lowers_the_capacity_without_a_restart(tmp_path) -> None:
    cfg = as_settings(fast_config())
    path = tmp_path / "capacity"
    node = settings({"capacity": 4, "capacity-file": str(path), "data-path": "/x"})
    assert node.capacity(cfg) == 4  # no file yet: the node config's
    path.write_text("2\n")
    assert node.capacity(cfg) == 2
    path.write_text("6")  # the file cannot raise it above the node config's
    assert node.capacity(cfg) == 4
    path.write_text("0")
    with pytest.raises(ValueError, match=f"capacity-file {path}"):
        node.capacity(cfg)
    path.write_text("auto")  # memory decides, within the node config's 4
    assert 1 <= node.capacity(cfg) <= 4


# ---------------------------------------------------------- server's checks
def test_memory_budget_in_a_reply_is_checked() -> None:
    base = {proto.CLIENT_KEY: 3, proto.CAPACITY: 2}
    assert proto.decode_info({**base, proto.MEMORY_MB: 256.0}).memory_mb == 256.0
    assert proto.decode_info(base).memory_mb is None
    for bad in (math.nan, math.inf, -1.0, 0.0, "256", True, [256], 2.0**31):
        with pytest.raises(ValueError, match=proto.MEMORY_MB):
            proto.decode_info({**base, proto.MEMORY_MB: bad})


def test_roster_keeps_the_budget_behind_a_capacity() -> None:
    roster = Roster(8)
    assert roster.claim(1001, 1, 3, {1001}, memory_mb=256.0).admitted
    assert roster.claim(1002, 2, 2, {1001, 1002}).admitted
    assert roster.memory_budgets() == {1: 256.0}
    assert roster.report_capacity(1, 2, 128.0) is None
    assert roster.capacities() == {1: 2, 2: 2} and roster.memory_budgets() == {1: 128.0}


def test_auto_nodes_report_k_and_budget_to_the_server(tmp_path) -> None:
    configs = node_configs(3)
    configs[1] = {**configs[1], "capacity": "auto", "memory-mb": 64}
    configs[2] = {**configs[2], "capacity": 3, "capacity-file": str(tmp_path / "cap")}
    (tmp_path / "cap").write_text("1")
    strategy = run_strategy(fast_config(num_rounds=1), make_grid(3, configs=configs))
    assert strategy.roster.memory_budgets() == {1: 64.0}
    capacities = strategy.roster.capacities()
    assert capacities[1] == 8 and capacities[2] == 1  # a tiny CNN: all experts fit
    assert {k: len(v) for k, v in strategy.history[0].allocation.assignment.items()}["2"] == 1


# ------------------------------------------------------------------ backoff
def _record(server_round: int, assignment: dict, failed: set) -> RoundRecord:
    return RoundRecord(
        server_round,
        participation=Participation(failures={str(k): "client error" for k in failed}),
        allocation=AllocationRecord(assignment={str(k): [0] for k in assignment}),
    )


def test_backoff_pauses_grow_and_an_accepted_update_clears_them() -> None:
    policy = BackoffPolicy(after=2, rounds=1, max_rounds=3)
    records = [_record(1, {1, 2}, {1}), _record(2, {1, 2}, {1})]
    assert benched(records, 3, policy) == {1: 3}
    records += [_record(3, {2}, set()), _record(4, {1, 2}, {1}), _record(5, {1, 2}, {1})]
    assert benched(records, 4, policy) == {}
    assert benched(records, 6, policy) == {1: 7}  # second pause: two rounds
    records += [_record(r, {2}, set()) for r in (6, 7)]
    records += [_record(8, {1, 2}, {1}), _record(9, {1, 2}, {1})]
    assert benched(records, 10, policy) == {1: 12}  # 4 rounds, capped at 3
    records += [_record(r, {2}, set()) for r in (10, 11, 12)]
    records += [_record(13, {1, 2}, set()), _record(14, {1, 2}, {1}), _record(15, {1}, {1})]
    assert benched(records, 16, policy) == {1: 16}  # cleared by round 13: one round again
    assert benched(records, 16, BackoffPolicy(after=0)) == {}


def test_backoff_never_leaves_a_round_short_of_its_minimum() -> None:
    capacities = {1: 2, 2: 2, 3: 2}
    assert leave_out(capacities, {1: 5, 2: 4}, 1) == ({3: 2}, {1: 5, 2: 4})
    # Two needed: the client whose pause ends first comes back.
    assert leave_out(capacities, {1: 5, 2: 4}, 2) == ({2: 2, 3: 2}, {1: 5})
    assert leave_out(capacities, {9: 5}, 2) == (capacities, {})  # not online anyway


def test_a_failing_client_is_left_out_for_growing_pauses(caplog) -> None:
    def fail(node: int, message: Message) -> str | None:
        train = message.metadata.message_type == MessageType.TRAIN
        return "raise" if node == 1001 and train else None

    caplog.set_level("INFO")
    cfg = fast_config(
        "faults.backoff_after=2 faults.backoff_rounds=1 faults.max_failed_rounds=0",
        num_clients=3,
        num_rounds=7,
    )
    strategy = run_strategy(cfg, make_grid(3, fail=fail))
    records = {r.round: r for r in strategy.history}
    assert [r for r in records if "1" in records[r].allocation.assignment] == [1, 2, 4, 5]
    assert {
        r: records[r].participation.benched
        for r in records
        if records[r].participation.benched is not None
    } == {
        3: {"1": 3},
        6: {"1": 7},
        7: {"1": 7},
    }
    assert "left out: client 1" in headline(records[6], 7)
    assert "left out until round 7 (backoff after failed rounds)" in caplog.text
