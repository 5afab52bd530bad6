"""Nodes that join, leave, restart, change capacity or claim another's key during a run."""

from __future__ import annotations

from typing import Any

import pytest
from flwr.app import Message, MessageType
from run_helpers import fast_config, fitness_by_key, make_grid, node_configs, run_strategy

import client_app.app as client_module
from flexmoe_core import protocol as proto

pytestmark = pytest.mark.usefixtures("one_thread")


def round_of(message: Message) -> int:
    config = message.content.get(proto.CONFIG)
    return int(config[proto.ROUND]) if config is not None and proto.ROUND in config else 0


def is_train(message: Message) -> bool:
    return message.metadata.message_type == MessageType.TRAIN


def trained_by(grid: Any, server_round: int) -> dict[int, int]:
    """Return node id -> number of train messages it was sent in ``server_round``."""
    counts: dict[int, int] = {}
    for m in grid.sent:
        if is_train(m) and round_of(m) == server_round:
            counts[m.metadata.dst_node_id] = counts.get(m.metadata.dst_node_id, 0) + 1
    return counts


def test_a_node_that_connects_later_is_asked_and_joins_from_the_next_round(caplog) -> None:
    configs = node_configs(4)
    grid = make_grid(3, configs=configs[:3])

    def fail(node: int, message: Message) -> None:
        if is_train(message) and round_of(message) == 1 and node == 1000:
            grid.add_node(configs[3])  # connects while round 1 runs

    grid.fail = fail
    caplog.set_level("INFO")
    strategy = run_strategy(fast_config(num_rounds=3), grid)
    assert [r.participation.participants for r in strategy.history] == [3, 4, 4]
    assert sorted(strategy.history[1].allocation.assignment) == ["0", "1", "2", "3"]
    assert "Client 3 joined on node 1003" in caplog.text
    assert strategy.final_summary()["clients"] == 4


def test_a_restarted_node_takes_back_its_key_fitness_row_and_gate(tmp_path, monkeypatch) -> None:
    configs = node_configs(3)
    grid = make_grid(3, configs=configs)
    dead: set[int] = set()

    def fail(node: int, message: Message) -> str | None:
        if node in dead:
            return "drop"  # a killed node answers nothing
        if node == 1001 and is_train(message) and round_of(message) == 2:
            dead.add(node)
            # The SuperLink delists it once its heartbeats have stopped (here: before
            # round 3); it restarts with the same node config: node 1003.
            grid.offline.add(node)
            grid.add_node(configs[1])
            return "drop"
        return None

    grid.fail = fail
    loaded: list[tuple[int, int, bool]] = []
    original = client_module.load_gate_version

    def spy(cfg, context, latest_round):
        gate = original(cfg, context, latest_round)
        loaded.append((context.node_id, latest_round, gate is not None))
        return gate

    monkeypatch.setattr(client_module, "load_gate_version", spy)
    cfg = fast_config(f"run_name=r checkpoint.client_dir={tmp_path / 'gates'}", num_rounds=4)
    strategy = run_strategy(cfg, grid)
    history = strategy.history
    assert list(history[1].participation.failures) == ["1"]  # the node that was sent the message
    assert "no reply" in history[1].participation.failures["1"]
    # Round 3: client 1 trains again, on the restarted node; the old id gets nothing.
    assert all(r.participation.failures == {} for r in history[2:])
    assert trained_by(grid, 3) == {1000: 1, 1002: 1, 1003: 1}
    assert sorted(history[2].allocation.assignment) == ["0", "1", "2"]
    # One fitness row per client key: the restarted node continued client 1's row.
    assert sorted(fitness_by_key(strategy)) == [0, 1, 2]
    # Its first training started from client 1's gate of round 1, read from disk
    # (state-dir / checkpoint.client_dir): the fresh node had none in its context.
    assert (1003, 2, True) in loaded


def test_failures_are_named_by_the_message_sent_not_by_the_reply_sender() -> None:
    # The SuperLink answers for a node whose heartbeats stopped, from its own node id.
    def fail(node: int, message: Message) -> str | None:
        lost = node == 1001 and is_train(message) and round_of(message) == 2
        return "unavailable" if lost else None

    strategy = run_strategy(fast_config(num_rounds=3), make_grid(3, fail=fail))
    assert strategy.history[1].participation.failures == {"1": "node unavailable: Node Unavailable"}
    assert strategy.history[1].participation.accepted == 2
    # It answered the capacity query of round 3: it was only away, and trains again.
    assert (
        strategy.history[2].participation.accepted == 3
        and strategy.history[2].participation.failures == {}
    )


def test_a_capacity_reported_with_a_reply_is_used_by_the_next_allocation() -> None:
    grid = make_grid(3, configs=node_configs(3, capacity=3))

    def fail(node: int, message: Message) -> None:
        if node == 1000 and is_train(message) and round_of(message) == 2:
            grid.contexts[node].node_config["capacity"] = 1  # e.g. low battery

    grid.fail = fail
    strategy = run_strategy(fast_config(num_rounds=3), grid)
    assert [len(r.allocation.assignment["0"]) for r in strategy.history] == [3, 3, 1]
    assert strategy.final_summary()["capacities"] == {"0": 1, "1": 3, "2": 3}


def test_a_second_claimant_is_refused_while_the_holder_is_connected(caplog) -> None:
    configs = node_configs(3)
    grid = make_grid(3, configs=configs)

    def fail(node: int, message: Message) -> None:
        if node == 1000 and is_train(message) and round_of(message) == 1:
            grid.add_node(configs[1])  # node 1003 claims client 1 too
        if node == 1000 and is_train(message) and round_of(message) == 3:
            grid.offline.add(1001)  # the holder leaves: the key is free again

    grid.fail = fail
    caplog.set_level("WARNING")
    strategy = run_strategy(fast_config(num_rounds=4), grid)
    assert (
        "Node 1003 refused for now: client key 1 is bound to node 1001, which is still "
        "connected; node 1003 claims it too" in caplog.text
    )
    assert caplog.text.count("Node 1003 refused for now") == 1  # asked again, said once
    # While 1001 is connected it keeps client 1; once it has left, 1003 takes over.
    assert [1001 in trained_by(grid, r) for r in (1, 2, 3, 4)] == [True, True, True, False]
    assert [1003 in trained_by(grid, r) for r in (1, 2, 3, 4)] == [False, False, False, True]
    assert all(r.participation.failures == {} for r in strategy.history)


def test_a_late_reply_keeps_the_key_and_an_impostor_is_refused(caplog) -> None:
    # The honest holder of client 1 misses round 2's deadline while connected; a second
    # node then claims client 1. The key stays with the honest node, which trains again.
    configs = node_configs(3)
    grid = make_grid(3, configs=configs)

    def fail(node: int, message: Message) -> str | None:
        if node == 1001 and is_train(message) and round_of(message) == 2:
            grid.add_node(configs[1])  # node 1003 claims client 1
            return "drop"  # answers too late: no reply within the round
        return None

    grid.fail = fail
    caplog.set_level("WARNING")
    strategy = run_strategy(fast_config(num_rounds=4), grid)
    assert "Node 1003 refused for now: client key 1 is bound to node 1001" in caplog.text
    assert "Client 1 rejoined" not in caplog.text
    assert strategy.roster.holder_of(1) == 1001
    assert not any(1003 in trained_by(grid, r) for r in (1, 2, 3, 4))
    # The honest node answered the next query and trains from round 3 on.
    assert [1001 in trained_by(grid, r) for r in (1, 2, 3, 4)] == [True, True, True, True]
    assert list(strategy.history[1].participation.failures) == ["1"]
    assert "node 1001 (client 1) left out of this round" in caplog.text
