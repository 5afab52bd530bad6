"""Checkpoints and resume: a run killed at any point ends like one never interrupted."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Message, MessageType
from run_helpers import (
    assert_same_arrays,
    fast_config,
    make_grid,
    node_configs,
    read_npz,
    run_strategy,
    without_timing,
)

from client_app.app import app as client_app
from flexmoe_core.checkpoint import (
    CheckpointError,
    ServerCheckpoint,
    checkpoint_path,
    config_differences,
    load_checkpoint,
    save_checkpoint,
)
from flexmoe_core.config import to_container
from flexmoe_core.gate_store import load_gate, pick_gate_version, save_gate
from flexmoe_core.records import RoundRecord
from flexmoe_core.results import METRICS_FILE, MODEL_FILE, SUMMARY_FILE, RunRecorder, read_metrics
from server_app.app import run
from server_app.inprocess import InProcessGrid

pytestmark = pytest.mark.usefixtures("one_thread")

ROUNDS = 3
CLIENTS = 3


class Killed(BaseException):
    """Stands for SIGKILL: not an Exception, so no handler in the app catches it."""


def kill_at(message_type: str, server_round: int, nth: int) -> Callable[[int, Message], None]:
    """Return a grid ``fail`` hook that kills the run at the nth such message of a round."""
    seen = {"count": 0}

    def fail(node: int, message: Message) -> None:
        config = message.content.get("config")
        this_round = int(config["server-round"]) if config and "server-round" in config else 0
        if message.metadata.message_type == message_type and this_round == server_round:
            seen["count"] += 1
            if seen["count"] == nth:
                raise Killed(f"killed at {message_type} #{nth} of round {server_round}")

    return fail


def config(tmp: Path, extra: str = "") -> Any:
    return fast_config(
        f"output_root={tmp} run_name=run evaluate.global_every=2 {extra}",
        num_clients=CLIENTS,
        num_rounds=ROUNDS,
    )


def final_state(run_dir: Path) -> dict[str, Any]:
    summary = json.loads((run_dir / SUMMARY_FILE).read_text())
    return {
        "model": read_npz(run_dir / MODEL_FILE),
        "history": without_timing(read_metrics(run_dir)),
        "fitness": dict(
            zip(summary["fitness"]["client_ids"], summary["fitness"]["values"], strict=True)
        ),
        "loads": summary["cumulative_loads"],
        "checkpoint_round": load_checkpoint(checkpoint_path(run_dir)).round,
    }


def assert_same_run(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert_same_arrays(a["model"], b["model"])
    assert [r["round"] for r in b["history"]] == list(range(1, ROUNDS + 1))
    assert a["history"] == b["history"]
    assert a["fitness"] == b["fitness"]
    assert a["loads"] == b["loads"]
    assert a["checkpoint_round"] == b["checkpoint_round"] == ROUNDS


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("uninterrupted")
    return final_state(run(make_grid(CLIENTS), config(tmp)))


# --------------------------------------------------------------- equality
@pytest.mark.parametrize(
    ("message_type", "server_round", "nth", "saved_round", "lines"),
    [
        # Two clients trained round 2 already (their gates ran ahead). Round 1's line
        # waits for its evaluation, which comes with round 2: no line yet.
        (MessageType.TRAIN, 2, 3, 1, 0),
        # All rounds trained, killed in the evaluation after the last round.
        (MessageType.EVALUATE, 3, 1, 3, 2),
        (MessageType.TRAIN, 1, 2, None, 0),  # before the first checkpoint
    ],
)
def test_killed_and_resumed_in_the_same_federation_matches(
    tmp_path: Path,
    uninterrupted: dict[str, Any],
    message_type: str,
    server_round: int,
    nth: int,
    saved_round: int | None,
    lines: int,
) -> None:
    grid = make_grid(CLIENTS, fail=kill_at(message_type, server_round, nth))
    with pytest.raises(Killed):
        run(grid, config(tmp_path))
    run_dir = tmp_path / "run"
    if saved_round is None:
        assert not checkpoint_path(run_dir).exists()
    else:
        assert load_checkpoint(checkpoint_path(run_dir)).round == saved_round
    assert len(read_metrics(run_dir) if (run_dir / METRICS_FILE).exists() else []) == lines
    grid.fail = None  # the same nodes, contexts kept: gates in context.state
    resumed = run(grid, config(tmp_path, "checkpoint.resume=true"))
    assert resumed == run_dir
    assert_same_run(uninterrupted, final_state(run_dir))


def test_resumed_in_a_new_federation_with_gates_on_disk_matches(
    tmp_path: Path, uninterrupted: dict[str, Any]
) -> None:
    gates = tmp_path / "gates"
    extra = f"checkpoint.client_dir={gates}"
    with pytest.raises(Killed):
        run(make_grid(CLIENTS, fail=kill_at(MessageType.TRAIN, 3, 2)), config(tmp_path, extra))
    run_dir = tmp_path / "run"
    # A new federation: fresh contexts, so the gates can only come from disk.
    fresh = make_grid(CLIENTS)
    assert all(len(ctx.state) == 0 for ctx in fresh.contexts.values())
    run(fresh, config(tmp_path, f"{extra} checkpoint.resume={run_dir}"))
    assert_same_run(uninterrupted, final_state(run_dir))
    # Each client keeps at most three gate versions of the run.
    for key in range(CLIENTS):
        versions = sorted(p.name for p in (gates / "run" / f"client-{key}").iterdir())
        assert versions == ["gate-r1.npz", "gate-r2.npz", "gate-r3.npz"]


def test_resumed_in_a_new_federation_without_gates_restarts_them(
    tmp_path: Path, uninterrupted: dict[str, Any]
) -> None:
    with pytest.raises(Killed):
        run(make_grid(CLIENTS, fail=kill_at(MessageType.TRAIN, 3, 1)), config(tmp_path))
    run_dir = tmp_path / "run"
    run(make_grid(CLIENTS), config(tmp_path, f"checkpoint.resume={run_dir}"))
    state = final_state(run_dir)
    # The server state carried over (rounds 1-2 trained identically), but round 3
    # started from re-initialised gates, as documented: the run completes, with other
    # numbers, among them round 2's evaluation, which is made at the start of round 3.
    assert state["history"][:1] == uninterrupted["history"][:1]

    def training(record: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in record.items() if not k.startswith(("local_", "global_"))}

    assert training(state["history"][1]) == training(uninterrupted["history"][1])
    assert state["history"][1]["local_loss"] != uninterrupted["history"][1]["local_loss"]
    assert [r["round"] for r in state["history"]] == [1, 2, 3]
    assert any(
        not np.array_equal(state["model"][k], uninterrupted["model"][k]) for k in state["model"]
    )


def test_kill_between_checkpoint_and_metrics_line(
    tmp_path: Path, uninterrupted: dict[str, Any], monkeypatch
) -> None:
    original = RunRecorder.log_round

    def log_round(self: RunRecorder, record: RoundRecord) -> None:
        if record.round == 2:
            raise Killed("killed after the checkpoint of round 2, before its metrics line")
        original(self, record)

    monkeypatch.setattr(RunRecorder, "log_round", log_round)
    grid = make_grid(CLIENTS)
    with pytest.raises(Killed):
        run(grid, config(tmp_path))
    run_dir = tmp_path / "run"
    # Round 2's line is written after round 3 (its evaluation comes with round 3).
    checkpoint = load_checkpoint(checkpoint_path(run_dir))
    assert checkpoint.round == 3 and checkpoint.pending is not None
    assert len(read_metrics(run_dir)) == 1
    monkeypatch.setattr(RunRecorder, "log_round", original)
    run(grid, config(tmp_path, "checkpoint.resume=true"))
    assert_same_run(uninterrupted, final_state(run_dir))
    assert len((run_dir / METRICS_FILE).read_text().splitlines()) == ROUNDS


class ReversedGrid(InProcessGrid):
    """Delivers replies in the reverse order (as a real network may)."""

    def send_and_receive(self, messages, *, timeout=None):
        return list(reversed(super().send_and_receive(messages, timeout=timeout)))


def test_reply_order_does_not_change_the_result(tmp_path: Path) -> None:
    cfg = fast_config("evaluate.global_every=1", num_clients=4, num_rounds=2)
    in_order = run_strategy(cfg, make_grid(4))
    reversed_ = run_strategy(cfg, ReversedGrid(client_app, node_configs(4)))
    assert_same_arrays(in_order.global_arrays, reversed_.global_arrays)
    assert without_timing(in_order.history) == without_timing(reversed_.history)


# ------------------------------------------------------- refusals
def test_resume_with_other_settings_is_refused(tmp_path: Path) -> None:
    with pytest.raises(Killed):
        run(make_grid(CLIENTS, fail=kill_at(MessageType.TRAIN, 2, 1)), config(tmp_path))
    with pytest.raises(CheckpointError) as info:
        run(make_grid(CLIENTS), config(tmp_path, "checkpoint.resume=true seed=1 train.lr=0.1"))
    message = str(info.value)
    assert "seed: 0 -> 1" in message and "train.lr: 0.05 -> 0.1" in message


def test_checkpoints_of_an_earlier_format_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "run" / "checkpoint.npz"
    save_checkpoint(path, _checkpoint())
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files}
    meta = json.loads(bytes(arrays["meta"]).decode())
    meta["format_version"] = 1
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    np.savez(path, **arrays)
    with pytest.raises(CheckpointError) as info:
        run(make_grid(CLIENTS), config(tmp_path, f"checkpoint.resume={path.parent}"))
    message = str(info.value)
    assert "checkpoint of format 1" in message and "earlier version" in message
    assert "Start a new run" in message and "release that wrote it" in message


def test_checkpoints_of_another_model_form_are_refused(tmp_path: Path) -> None:
    # A checkpoint whose arrays are not those of the model the configuration builds
    # (here: one made for other shapes) is refused before any node is asked.
    path = tmp_path / "run" / "checkpoint.npz"
    cfg = config(tmp_path)
    from run_helpers import initial_arrays

    arrays = initial_arrays(cfg)
    name = sorted(arrays)[0]
    arrays[name] = np.zeros((*arrays[name].shape, 2), dtype=arrays[name].dtype)
    arrays["experts.0.old_head.weight"] = np.zeros(3, dtype=np.float32)
    state = _checkpoint()
    state.global_arrays, state.config = arrays, dict(to_container(cfg))
    save_checkpoint(path, state)
    grid = make_grid(CLIENTS)
    with pytest.raises(CheckpointError) as info:
        run(grid, config(tmp_path, f"checkpoint.resume={path.parent}"))
    message = str(info.value)
    assert "does not match the one this configuration builds" in message
    assert f"{name} is float32" in message and "unexpected experts.0.old_head.weight" in message
    assert "earlier model form" in message and "Start a new run" in message
    assert grid.sent == []


def test_resume_needs_a_run_to_resume(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="needs a fixed run_name"):
        run(make_grid(CLIENTS), fast_config("checkpoint.resume=true"))
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        run(make_grid(CLIENTS), fast_config(f"checkpoint.resume={tmp_path / 'nothing'}"))


# ------------------------------------------------------ plain library
def _checkpoint(round_: int = 4) -> ServerCheckpoint:
    rng = np.random.default_rng(0)
    return ServerCheckpoint(
        round=round_,
        global_arrays={
            "backbone.w": rng.normal(size=(3, 2)).astype(np.float32),
            "backbone.bn.num_batches_tracked": np.array(7, dtype=np.int64),
            "experts.1.0.weight": rng.normal(size=(2, 2)).astype(np.float32),
        },
        fitness={3: rng.random(4), 0: rng.random(4)},
        deficit=np.array([0.25, -0.25, 1 / 3, -1 / 3]),
        loads={"holders": [1.0, 2.0, 3.0, 4.0], "samples": [5.0, 6.0, 7.0, 8.0]},
        history=[
            RoundRecord.from_json({"round": 1, "local_acc": 0.1 + 0.2, "assignment": {"3": [0, 1]}})
        ],
        capacities={3: 2, 0: 1},
        config={"seed": 0, "train": {"lr": 0.05}},
    )


def test_checkpoint_round_trip_is_exact(tmp_path: Path) -> None:
    original = _checkpoint()
    path = tmp_path / "deep" / "checkpoint.npz"
    save_checkpoint(path, original)
    loaded = load_checkpoint(path)
    assert loaded.round == 4
    assert_same_arrays(loaded.global_arrays, original.global_arrays)
    assert sorted(loaded.fitness) == [0, 3]
    for key in original.fitness:
        np.testing.assert_array_equal(loaded.fitness[key], original.fitness[key])
    np.testing.assert_array_equal(loaded.deficit, original.deficit)
    assert loaded.history == original.history  # floats survive JSON exactly
    assert (loaded.loads, loaded.capacities, loaded.config) == (
        original.loads,
        original.capacities,
        original.config,
    )
    # Overwriting is atomic: no temporary file is left behind.
    save_checkpoint(path, _checkpoint(5))
    assert load_checkpoint(path).round == 5
    assert sorted(p.name for p in path.parent.iterdir()) == ["checkpoint.npz"]


def test_unreadable_checkpoint_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.npz"
    path.write_bytes(b"not a zip file")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(path)


def test_config_differences_ignore_only_the_resumable_keys() -> None:
    saved = {"seed": 0, "num_rounds": 5, "timeouts": {"round_s": 600}, "train": {"lr": 0.1}}
    current = {"seed": 0, "num_rounds": 9, "timeouts": {"round_s": 60}, "train": {"lr": 0.2}}
    assert config_differences(saved, current) == ["train.lr: 0.1 -> 0.2"]
    assert config_differences(saved, {**saved, "faults": {"crash_prob": 0.1}}) == [
        "faults.crash_prob: '<unset>' -> 0.1"
    ]


def test_gate_versions_pick_the_newest_allowed_and_keep_three(tmp_path: Path) -> None:
    assert pick_gate_version([1, 3, 4], 3) == 3
    assert pick_gate_version([1, 3, 4], 2) == 1
    assert pick_gate_version([4], 3) is None
    for r in (1, 2, 4, 5):
        save_gate(tmp_path, r, {"gate.w": np.full(2, float(r), dtype=np.float32)})
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "gate-r2.npz",
        "gate-r4.npz",
        "gate-r5.npz",
    ]
    found = load_gate(tmp_path, 4)
    assert found is not None and found[0] == 4
    np.testing.assert_array_equal(found[1]["gate.w"], np.full(2, 4.0, dtype=np.float32))
    assert load_gate(tmp_path, 1) is None
    assert load_gate(tmp_path / "missing", 9) is None
