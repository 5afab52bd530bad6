"""The strategy and both apps, wired together through an in-process Grid (no Ray)."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, RecordDict
from run_helpers import as_settings

from client_app.app import app as client_app
from flexmoe_core import protocol
from flexmoe_core.config import load_config
from flexmoe_core.model import build_model, shared_state
from flexmoe_core.results import read_metrics
from server_app.app import main as server_main
from server_app.inprocess import InProcessGrid
from server_app.strategy import FlexMoEStrategy, to_array_record


def nodes(count: int, **extra) -> list[dict]:
    return [{"partition-id": i, "num-partitions": count, **extra} for i in range(count)]


def run(cfg, grid: InProcessGrid) -> FlexMoEStrategy:
    model = build_model(as_settings(cfg).model, cfg.dataset.input_shape, cfg.dataset.num_classes)
    strategy = FlexMoEStrategy(as_settings(cfg))
    strategy.start(grid, to_array_record(shared_state(model)), num_rounds=cfg.num_rounds)
    return strategy


def test_each_node_gets_backbone_and_exactly_its_experts(tiny_overrides: str) -> None:
    cfg = load_config(tiny_overrides)
    grid = InProcessGrid(client_app, nodes(4))
    strategy = run(cfg, grid)
    capacity = {1000 + i: k for i, k in enumerate([1, 2, 3, 4])}
    train = [m for m in grid.sent if m.metadata.message_type == "train"]
    assert len(train) == 4 * 3
    for message in train:
        experts = list(message.content[protocol.CONFIG][protocol.EXPERTS])
        assert len(experts) == capacity[message.metadata.dst_node_id]
        keys = set(message.content[protocol.ARRAYS].keys())
        held = {int(k.split(".")[1]) for k in keys if k.startswith("experts.")}
        assert held == set(experts)
        assert any(k.startswith("backbone.") for k in keys)
        assert not any(k.startswith("gate.") for k in keys)
    # loads: 10 slots over 8 experts -> every expert held by 1 or 2 clients, every round
    for record in strategy.history:
        assert sorted(record.loads.clients) == [1] * 6 + [2] * 2
    assert (
        max(strategy.history[-1].loads.cumulative_clients)
        - min(strategy.history[-1].loads.cumulative_clients)
        <= 1
    )


def test_one_model_message_per_participant_per_round(tiny_overrides: str) -> None:
    cfg = load_config(tiny_overrides + " evaluate.global_every=2")
    grid = InProcessGrid(client_app, nodes(4))
    strategy = run(cfg, grid)
    with_model = [m for m in grid.sent if protocol.ARRAYS in m.content]
    per_round = Counter(
        (
            int(m.content[protocol.CONFIG][protocol.ROUND]),
            m.metadata.message_type,
            m.metadata.dst_node_id,
        )
        for m in with_model
    )
    # Every participant gets one message with the model per round; the only other
    # download is the evaluation of the final model after the last round.
    assert set(per_round.values()) == {1}
    assert sorted((r, t) for r, t, _ in per_round) == sorted(
        [(r, "train") for r in (1, 2, 3) for _ in range(4)] + [(3, "evaluate")] * 4
    )
    # The train message of round t asks for the evaluation of round t-1's model (the
    # global test on its schedule: every 2 rounds); each round's record has it.
    for message in with_model:
        config = message.content[protocol.CONFIG]
        if message.metadata.message_type == "train":
            assert config[protocol.EVALUATE] == (config[protocol.ROUND] > 1)
            assert config[protocol.GLOBAL_TEST] == (config[protocol.ROUND] == 3)
    assert [
        (r.evaluation.local_acc is not None, r.evaluation.global_acc is not None)
        for r in strategy.history
    ] == [
        (True, False),
        (True, True),
        (True, True),
    ]
    # Bytes are those of the serialised arrays, per client and direction: a client
    # uploads what it downloads (backbone + its experts), and gets the final model too.
    for record in strategy.history:
        expected_down = {
            str(m.metadata.dst_node_id - 1000): sum(
                len(a.data) for a in m.content[protocol.ARRAYS].values()
            )
            for m in with_model
            if int(m.content[protocol.CONFIG][protocol.ROUND]) == record.round
            and m.metadata.message_type == "train"
        }
        up = record.traffic.received_per_client
        assert up == expected_down
        down = record.traffic.sent_per_client
        assert down == (expected_down if record.round < 3 else {k: 2 * v for k, v in up.items()})
        assert record.traffic.sent == sum(down.values())


def test_gate_stays_home_and_keeps_learning(tiny_overrides: str) -> None:
    cfg = load_config(tiny_overrides)
    gates = []

    def spy(node: int, reply):
        if reply.metadata.message_type == "train" and not reply.has_error():
            assert not any(k.startswith("gate.") for k in reply.content[protocol.ARRAYS])
            if node == 1003:  # capacity 4: its gate has choices to learn
                gate = grid.contexts[node].state[protocol.GATE]
                gates.append(protocol.arrays_to_numpy(gate)["gate.weight"].copy())
        return reply

    grid = InProcessGrid(client_app, nodes(4), tamper=spy)
    run(cfg, grid)
    assert len(gates) == 3
    assert not np.allclose(gates[0], gates[1]) and not np.allclose(gates[1], gates[2])


def test_results_written_by_the_server_app(tmp_path: Path, tiny_overrides: str) -> None:
    grid = InProcessGrid(client_app, nodes(4))
    context = Context(
        run_id=1,
        node_id=0,
        node_config={},
        state=RecordDict(),
        run_config={"overrides": tiny_overrides + f" run_name=r1 output_root={tmp_path}"},
    )
    server_main(grid, context)
    run_dir = tmp_path / "r1"
    records = read_metrics(run_dir)
    assert [r["round"] for r in records] == [1, 2, 3]
    for key in (
        "local_acc",
        "train_loss",
        "load_clients",
        "load_clients_cv",
        "load_clients_var",
        "load_samples_cv",
        "cum_load_clients_cv",
        "cum_load_samples_var",
        "bytes_sent",
        "bytes_received",
        "bytes_sent_per_client",
        "allocation_time_s",
        "round_time_s",
        "assignment",
    ):
        assert key in records[-1], key
    assert "global_acc" in records[-1] and "global_acc" not in records[0]
    assert records[-1]["bytes_received"] > 0
    assert (run_dir / "config.yaml").read_text().count("strategy:") == 1
    with np.load(run_dir / "final_model.npz") as model:
        assert any(name.startswith("experts.7.") for name in model.files)
        assert not any(name.startswith("gate.") for name in model.files)
    assert (run_dir / "label_distribution.png").stat().st_size > 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds"] == 3 and 0.0 <= summary["final_local_acc"] <= 1.0


def test_unheld_experts_keep_their_value(tiny_overrides: str) -> None:
    cfg = load_config(tiny_overrides + " num_rounds=1 capacity.profile=constant capacity.value=1")
    model = build_model(as_settings(cfg).model, cfg.dataset.input_shape, cfg.dataset.num_classes)
    initial = shared_state(model)
    strategy = FlexMoEStrategy(as_settings(cfg))
    strategy.start(InProcessGrid(client_app, nodes(4)), to_array_record(initial), num_rounds=1)
    held = {e for experts in strategy.history[0].allocation.assignment.values() for e in experts}
    assert len(held) == 4
    for name, value in strategy.global_arrays.items():
        if name.startswith("experts."):
            same = np.array_equal(value, initial[name])
            assert same == (int(name.split(".")[1]) not in held), name


def test_greedy_through_the_same_override(tiny_overrides: str) -> None:
    cfg = load_config(
        tiny_overrides + " strategy=greedy capacity.profile=constant capacity.value=2"
    )
    strategy = run(cfg, InProcessGrid(client_app, nodes(4)))
    assert strategy.state.allocator.name == "greedy"
    # q0 = 1 is optimistic: greedy tries untried experts, and its loads are unbalanced
    assert any(r.loads.clients_cv > 0 for r in strategy.history)


def test_capacity_from_node_config_and_invalid_nodes_left_out(
    tiny_overrides: str, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = load_config(tiny_overrides + " num_clients=3 num_rounds=1")
    configs = nodes(3)
    configs[0]["capacity"] = 3
    configs[2]["capacity"] = 99
    grid = InProcessGrid(client_app, configs)
    with caplog.at_level(logging.WARNING, logger="flwr"):
        strategy = run(cfg, grid)
    assert strategy.roster.capacities() == {0: 3, 1: 2}
    assert "Node 1002 left out" in caplog.text and "[1, 8]" in caplog.text


def test_the_federation_sets_the_number_of_clients(
    tiny_overrides: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Flower gives each simulated SuperNode num-partitions = num-supernodes: a run
    # trains the federation's clients, and says so when num_clients disagrees.
    cfg = load_config(tiny_overrides + " num_clients=6 num_rounds=1 timeouts.wait_for_clients_s=0")
    with caplog.at_level(logging.WARNING, logger="flwr"):
        strategy = run(cfg, InProcessGrid(client_app, nodes(4)))
    assert sorted(strategy.history[0].allocation.assignment) == ["0", "1", "2", "3"]
    assert "num_clients=6, but the SuperNodes declare num-partitions=4" in caplog.text
    assert "num-supernodes=6" in caplog.text
    assert strategy.final_summary()["clients"] == 4


def test_a_crashed_client_does_not_stop_the_round(tiny_overrides: str) -> None:
    cfg = load_config(tiny_overrides)

    def crash(node: int, message) -> str | None:
        round_ = int(message.content[protocol.CONFIG].get(protocol.ROUND, 0))
        return (
            "raise"
            if node == 1001 and round_ == 2 and message.metadata.message_type == "train"
            else None
        )

    grid = InProcessGrid(client_app, nodes(4), fail=crash)
    strategy = run(cfg, grid)
    second = strategy.history[1]
    assert second.participation.accepted == 3 and "1" in second.participation.failures
    assert "injected failure" in second.participation.failures["1"]
    assert strategy.history[2].participation.accepted == 4


def test_wandb_offline_logging(tmp_path: Path, tiny_overrides: str) -> None:
    grid = InProcessGrid(client_app, nodes(4))
    overrides = (
        tiny_overrides + f" num_rounds=2 wandb.enabled=true run_name=w output_root={tmp_path}"
    )
    context = Context(
        run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={"overrides": overrides}
    )
    server_main(grid, context)
    runs = list((tmp_path / "w" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1 and runs[0].stat().st_size > 0


def test_reply_arrays_are_read_exactly_as_flower_writes_them() -> None:
    from flwr.app import Array

    from server_app.codec import to_numpy

    arrays = [
        np.array(7, dtype=np.int64),
        np.random.default_rng(0).random((3, 4)).astype(np.float32),
        np.asfortranarray(np.random.default_rng(1).random((3, 4))),
        np.zeros((0, 3), dtype=np.float32),
        np.arange(6, dtype=">i4").reshape(2, 3),
    ]
    for value in arrays:
        array = Array(value)
        got = to_numpy(array)
        assert got.dtype == value.dtype and got.shape == value.shape
        np.testing.assert_array_equal(got, array.numpy())
        assert got.flags.writeable
    short = Array(np.zeros(4, dtype=np.float32))
    short.data = short.data[:-4]
    with pytest.raises(ValueError, match="its dtype and shape need 16"):
        to_numpy(short)


def test_every_round_says_where_the_clients_time_went(tiny_overrides: str) -> None:
    cfg = load_config(tiny_overrides)
    strategy = run(cfg, InProcessGrid(client_app, nodes(3)))
    for record in strategy.history:
        phases = record.timing.client_phases_s
        assert set(phases) == set(protocol.CLIENT_PHASES)
        assert phases["train_step"] > 0 and phases["model"] > 0
        parts = sum(seconds for phase, seconds in phases.items() if phase != "total")
        # The phases are disjoint parts of the handler: they cannot exceed its total.
        assert parts <= phases["total"] + 1e-6, phases


def test_malformed_timings_are_left_out_not_fatal() -> None:
    sent = {"train_step": 1.5, "data": -1.0, "model": float("nan"), "encode": True, "x": 3.0}
    assert protocol.decode_timings(sent) == {"train_step": 1.5}
    assert protocol.decode_timings(None) == {}


@pytest.mark.parametrize("hook", ["train_config", "evaluate_config", "evaluate_fn"])
def test_flower_hooks_of_start_are_refused_not_ignored(tiny_overrides: str, hook: str) -> None:
    # Even an empty ConfigRecord is refused: the run's settings alone configure the clients.
    value = ConfigRecord() if hook.endswith("_config") else (lambda *_args: None)
    cfg = load_config(tiny_overrides)
    model = build_model(as_settings(cfg).model, cfg.dataset.input_shape, cfg.dataset.num_classes)
    strategy = FlexMoEStrategy(as_settings(cfg))
    grid = InProcessGrid(client_app, nodes(2))
    with pytest.raises(TypeError, match=rf"{hook}.*train\.\* and evaluate\.\*"):
        strategy.start(grid, to_array_record(shared_state(model)), num_rounds=1, **{hook: value})
    assert strategy.history == []
