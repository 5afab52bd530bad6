"""Crashes, stragglers, lost nodes and bad updates: the round goes on without them."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import pytest
from flwr.app import Array, Message, MessageType
from run_helpers import (
    as_settings,
    assert_same_arrays,
    fast_config,
    fitness_by_key,
    initial_arrays,
    make_grid,
    node_configs,
    run_strategy,
    without_timing,
)

import client_app.app as client_module
from flexmoe_core import protocol as proto
from flexmoe_core.faults import NO_FAULT, Fault, draw_fault, validate_faults
from flexmoe_core.model import expert_key, split_expert_key
from flexmoe_core.settings import FaultSettings
from server_app.inprocess import InProcessGrid
from server_app.strategy import FlexMoEStrategy, error_reason, to_array_record

pytestmark = pytest.mark.usefixtures("one_thread")

VICTIM = 1001  # node id of client 1 in the in-process grid
VICTIM_KEY = 1


# ------------------------------------------------------------ fault draws
def test_fault_draws_are_seeded_per_round_and_client() -> None:
    faults = FaultSettings(crash_prob=0.3, straggle_prob=0.2, straggle_s=4.0)
    draws = [draw_fault(faults, 7, r, c) for r in range(1, 201) for c in range(10)]
    again = [draw_fault(faults, 7, r, c) for r in range(1, 201) for c in range(10)]
    assert draws == again
    other_seed = [draw_fault(faults, 8, r, c) for r in range(1, 201) for c in range(10)]
    assert draws != other_seed
    crashes = np.mean([d.crash for d in draws])
    late = [d for d in draws if d.delay_s > 0]
    assert abs(crashes - 0.3) < 0.04
    # A straggler is a client that did not crash and drew below straggle_prob.
    assert abs(len(late) / len(draws) - 0.7 * 0.2) < 0.03
    assert all(d == Fault(delay_s=4.0) for d in late)
    assert not any(d.crash and d.delay_s for d in draws)


def test_no_faults_by_default() -> None:
    assert draw_fault(FaultSettings(), 0, 1, 0) is NO_FAULT
    assert draw_fault(as_settings(fast_config()).faults, 0, 1, 0) is NO_FAULT
    crash = FaultSettings(crash_prob=1.0)
    assert all(draw_fault(crash, 0, r, c).crash for r in range(5) for c in range(5))


def test_fault_settings_are_validated() -> None:
    assert validate_faults({"crash_prob": 0.5, "straggle_prob": 1.0, "straggle_s": 0}) == []
    errors = validate_faults({"crash_prob": 1.5, "straggle_prob": -0.1, "straggle_s": -1})
    assert len(errors) == 3
    assert "faults.crash_prob=1.5" in errors[0]
    with pytest.raises(ValueError, match=r"faults\.crash_prob"):
        fast_config("faults.crash_prob=2")


def test_error_reason_unwraps_flower_wrappers() -> None:
    wrapped = (
        "<class 'flwr.clientapp.client_app.ClientAppException'>:<'\n"
        "Exception ClientAppException occurred. Message: boom'>"
    )
    assert error_reason(wrapped) == "boom"
    ray = (  # what the Ray simulation backend sends: a traceback, with colour codes
        "<class 'ray.exceptions.RayTaskError(ClientAppException)'>:<'\x1b[36mray::"
        'ClientAppActor.run()\x1b[39m (pid=1)\n  File "app.py", line 9, in train\n'
        "flexmoe_core.faults.InjectedCrashError: injected crash\n"
        "flwr.clientapp.client_app.ClientAppException: \n"
        "Exception ClientAppException occurred. Message: injected crash of client 0'>"
    )
    assert error_reason(ray) == "injected crash of client 0"
    assert error_reason("<class 'ValueError'>:<'bad\nvalue'>") == "ValueError: bad value"
    assert error_reason("plain reason") == "plain reason"


# ----------------------------------------------------------- crash path
class RecordingStrategy(FlexMoEStrategy):
    """Keeps the state before and after every aggregation."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.rounds: list[dict] = []

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        before = {
            "arrays": {k: v.copy() for k, v in self.global_arrays.items()},
            "fitness": fitness_by_key(self),
        }
        out = super().aggregate_train(server_round, list(replies))
        assert self.plan is not None and self.outcome is not None
        self.rounds.append(
            {
                "before": before,
                "arrays": {k: v.copy() for k, v in self.global_arrays.items()},
                "fitness": fitness_by_key(self),
                "assignment": dict(self.plan.experts),
                "participants": list(self.plan.experts),
                "accepted": self.outcome.accepted,
                "failures": self.outcome.failures,
            }
        )
        return out


def _crash_seed(num_clients: int, prob: float) -> int:
    """A seed whose first round crashes some but not all clients (rounds 1 and 2 differ)."""
    for seed in range(100):
        first = {
            c
            for c in range(num_clients)
            if draw_fault(FaultSettings(crash_prob=prob), seed, 1, c).crash
        }
        second = {
            c
            for c in range(num_clients)
            if draw_fault(FaultSettings(crash_prob=prob), seed, 2, c).crash
        }
        if 0 < len(first) < num_clients - 1 and first - second:
            return seed
    raise AssertionError("no suitable seed")


def test_injected_crashes_leave_the_round_to_the_others() -> None:
    prob = 0.4
    seed = _crash_seed(4, prob)
    cfg = fast_config(f"seed={seed} faults.crash_prob={prob}", num_clients=4, num_rounds=2)
    strategy = run_strategy(cfg, make_grid(4), RecordingStrategy)
    assert len(strategy.history) == 2
    for server_round, info in enumerate(strategy.rounds, start=1):
        crashed = {
            c for c in range(4) if draw_fault(as_settings(cfg).faults, seed, server_round, c).crash
        }
        assert set(info["failures"]) == crashed
        assert all("injected crash" in why for why in info["failures"].values())
        assert set(info["accepted"]) == set(info["participants"]) - crashed
        # A crashed client's fitness row is untouched; the others learned something.
        for client in crashed:
            assert info["fitness"].get(client) == info["before"]["fitness"].get(client)
        for client in info["accepted"]:
            assert info["fitness"][client] != info["before"]["fitness"].get(client)
        # Experts that only crashed clients held keep their previous values.
        trained = {e for c in info["accepted"] for e in info["assignment"][c]}
        for name, value in info["arrays"].items():
            key = split_expert_key(name)
            if key is not None and key[0] not in trained:
                np.testing.assert_array_equal(value, info["before"]["arrays"][name])
            elif key is None and value.dtype.kind == "f":  # the backbone learned
                assert not np.array_equal(value, info["before"]["arrays"][name]), name
    # Round 1's crashed clients are still online, so round 2 allocates over them too,
    # each to its full capacity.
    second = strategy.rounds[1]
    assert sorted(second["participants"]) == [0, 1, 2, 3]
    for key, cap in strategy.roster.capacities().items():
        assert len(second["assignment"][key]) == cap


def _equivalent_state(a: FlexMoEStrategy, b: FlexMoEStrategy) -> None:
    assert_same_arrays(a.global_arrays, b.global_arrays)
    assert fitness_by_key(a) == fitness_by_key(b)
    # A rejected update was received all the same: its bytes count as traffic.
    strip = ("failures", "bytes_received", "bytes_received_per_client")
    assert [{k: v for k, v in r.items() if k not in strip} for r in without_timing(a.history)] == [
        {k: v for k, v in r.items() if k not in strip} for r in without_timing(b.history)
    ]


@pytest.fixture(scope="module")
def dropped_victim() -> FlexMoEStrategy:
    """One round in which client 1's training reply never arrives (a timeout)."""

    def fail(node: int, message: Message) -> str | None:
        train = message.metadata.message_type == MessageType.TRAIN
        return "drop" if node == VICTIM and train else None

    return run_strategy(fast_config(num_rounds=1), make_grid(3, fail=fail))


def test_client_error_equals_a_missing_reply(dropped_victim: FlexMoEStrategy) -> None:
    def fail(node: int, message: Message) -> str | None:
        train = message.metadata.message_type == MessageType.TRAIN
        return "raise" if node == VICTIM and train else None

    crashed = run_strategy(fast_config(num_rounds=1), make_grid(3, fail=fail))
    assert "client error" in crashed.outcome.failures[VICTIM_KEY]
    assert "no reply" in dropped_victim.outcome.failures[VICTIM_KEY]
    _equivalent_state(crashed, dropped_victim)


# ------------------------------------------------------------ stragglers
class VirtualClockGrid(InProcessGrid):
    """Honours the round timeout against the time clients *would* have slept.

    ``client_app``'s ``time.sleep`` is replaced by a virtual clock, so a straggler
    costs no real time; a reply whose client slept longer than ``timeout`` is lost, as
    a reply is that arrives after the round stopped waiting.
    """

    def __init__(self, *args, timeout: float, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.slept, self.timeout = 0.0, timeout

    def sleep(self, seconds: float) -> None:
        self.slept += seconds

    def push_messages(self, messages):
        ids = []
        for message in messages:
            self.slept = 0.0
            ids += super().push_messages([message])
            if self.slept > self.timeout:
                self._replies.pop(ids[-1], None)  # it comes after the round has closed
        return ids


@pytest.mark.parametrize("straggle_s", [5.0, 50.0])
def test_stragglers_past_the_timeout_are_left_out(monkeypatch, straggle_s: float) -> None:
    probe = FaultSettings(straggle_prob=0.5, straggle_s=straggle_s)
    seed = next(
        s
        for s in range(100)
        if 0 < sum(draw_fault(probe, s, 1, c).delay_s > 0 for c in range(3)) < 3
    )
    cfg = fast_config(
        f"seed={seed} faults.straggle_prob=0.5 faults.straggle_s={straggle_s} timeouts.round_s=10",
        num_rounds=1,
    )
    grid = VirtualClockGrid(client_module.app, node_configs(3), timeout=10)
    monkeypatch.setattr(client_module.time, "sleep", grid.sleep)
    strategy = FlexMoEStrategy(as_settings(cfg))
    strategy.start(grid, to_array_record(initial_arrays(cfg)), num_rounds=1, timeout=10)
    late = {c for c in range(3) if draw_fault(as_settings(cfg).faults, seed, 1, c).delay_s > 0}
    if straggle_s > 10:
        assert set(strategy.outcome.failures) == late
        assert all("no reply" in w for w in strategy.outcome.failures.values())
        assert set(strategy.outcome.accepted) == {0, 1, 2} - late
    else:  # late, but within the timeout: accepted
        assert strategy.outcome.failures == {}
        assert len(strategy.outcome.accepted) == 3


# ------------------------------------------------------- nodes going away
def _offline_after_round_1(nodes: set[int]) -> tuple[InProcessGrid, Callable]:
    def fail(node: int, message: Message) -> None:
        # Round 1's last training message is delivered; then the nodes are gone.
        config = message.content.get(proto.CONFIG)
        first = config is not None and config.get(proto.ROUND) == 1
        if message.metadata.message_type == MessageType.TRAIN and first and node == 1002:
            grid.offline = set(nodes)

    grid = InProcessGrid(client_module.app, node_configs(3), fail=fail)
    return grid, fail


def test_next_round_allocates_over_the_nodes_still_online() -> None:
    grid, _ = _offline_after_round_1({1002})
    strategy = run_strategy(fast_config(num_rounds=2), grid)
    first, second = strategy.history
    assert sorted(first.allocation.assignment) == ["0", "1", "2"]
    assert sorted(second.allocation.assignment) == ["0", "1"]
    assert second.participation.participants == second.participation.accepted == 2
    for key in (0, 1):
        assert len(second.allocation.assignment[str(key)]) == strategy.roster.capacities()[key]
    assert not {m.metadata.dst_node_id for m in grid.sent[-4:]} & {1002}


def test_too_few_nodes_online_stops_with_a_clear_message() -> None:
    grid, _ = _offline_after_round_1({1001, 1002})
    with pytest.raises(RuntimeError) as info:
        run_strategy(fast_config("min_clients_per_round=2", num_rounds=2), grid)
    message = str(info.value)
    assert "Round 2" in message and "min_clients_per_round=2" in message
    assert "timeouts.wait_for_clients_s" in message and "checkpoint.resume" in message


def test_missing_nodes_start_late_or_stop_the_run_with_advice(caplog) -> None:
    # Two of a simulation's three SuperNodes: the run starts with them ...
    caplog.set_level("WARNING")
    strategy = run_strategy(fast_config(num_rounds=1), make_grid(2, configs=node_configs(3)[:2]))
    assert strategy.history[0].participation.participants == 2
    assert "Starting with 2 of the 3 expected clients" in caplog.text
    # ... unless fewer than min_clients_per_round answered.
    with pytest.raises(RuntimeError) as info:
        run_strategy(
            fast_config("min_clients_per_round=3", num_rounds=1),
            make_grid(2, configs=node_configs(3)[:2]),
        )
    message = str(info.value)
    assert "Only 2 of the 3 expected clients" in message and "min_clients_per_round=3" in message
    assert "num-supernodes=3" in message and "timeouts.wait_for_clients_s" in message


# ----------------------------------------------------------- bad updates
def _assigned(reply: Message) -> list[int]:
    return sorted(
        {k[0] for name in reply.content[proto.ARRAYS] if (k := split_expert_key(name)) is not None}
    )


def _rename_expert(reply: Message) -> None:
    """Add a copy of an assigned expert under the id of one that was not assigned."""
    arrays = reply.content[proto.ARRAYS]
    assigned = _assigned(reply)
    spare = next(e for e in range(8) if e not in assigned)
    for name in list(arrays):
        key = split_expert_key(name)
        if key is not None and key[0] == assigned[0]:
            arrays[expert_key(spare, key[1])] = arrays[name]


def _change_first(reply: Message, change: Callable[[np.ndarray], np.ndarray], expert: bool) -> None:
    """Replace the first float array of an expert (or of the backbone) by ``change(it)``."""
    arrays = reply.content[proto.ARRAYS]
    name = next(
        n
        for n in sorted(arrays)
        if (split_expert_key(n) is not None) == expert and arrays[n].numpy().dtype.kind == "f"
    )
    arrays[name] = Array(change(arrays[name].numpy()))


def _feedback(reply: Message, column: str, change: Callable[[list], list]) -> None:
    record = reply.content[proto.FEEDBACK]
    record[column] = change(list(record[column]))


def _with_nan(x: np.ndarray) -> np.ndarray:
    x = x.copy()
    x.flat[0] = np.nan
    return x


def _with_inf(x: np.ndarray) -> np.ndarray:
    x = x.copy()
    x.flat[-1] = np.inf
    return x


BAD_UPDATES: dict[str, tuple[Callable[[Message], None], str]] = {
    "unassigned expert": (_rename_expert, "were not assigned"),
    "wrong shape": (
        lambda r: _change_first(r, lambda x: np.zeros((*x.shape, 2), x.dtype), expert=False),
        "expected float32",
    ),
    "wrong dtype": (
        lambda r: _change_first(r, lambda x: x.astype(np.float64), expert=True),
        "got float64",
    ),
    "NaN in an expert": (lambda r: _change_first(r, _with_nan, expert=True), "NaN or Inf"),
    "Inf in the backbone": (lambda r: _change_first(r, _with_inf, expert=False), "NaN or Inf"),
    "missing feedback": (
        lambda r: [
            _feedback(r, c, lambda v: v[1:]) for c in ("experts", "usage", "accuracy", "loss")
        ],
        "no feedback for experts",
    ),
    "feedback for another expert": (
        lambda r: [
            _feedback(r, "experts", lambda v: [*v[:-1], next(e for e in range(8) if e not in v)])
        ],
        "feedback for unassigned experts",
    ),
    "NaN feedback": (
        lambda r: _feedback(r, "loss", lambda v: [float("nan"), *v[1:]]),
        "not finite",
    ),
    "ragged feedback": (lambda r: _feedback(r, "usage", lambda v: v[1:]), "differ in length"),
    "no examples": (
        lambda r: r.content[proto.METRICS].__setitem__(proto.NUM_EXAMPLES, 0),
        "num-examples=0 is not in [1, ",
    ),
    "no arrays at all": (lambda r: r.content.__delitem__(proto.ARRAYS), "malformed reply"),
}


@pytest.mark.parametrize("kind", sorted(BAD_UPDATES))
def test_bad_update_is_rejected_and_nothing_else_changes(
    kind: str, dropped_victim: FlexMoEStrategy, caplog
) -> None:
    change, expected = BAD_UPDATES[kind]

    def tamper(node: int, reply: Message) -> Message:
        train = reply.metadata.message_type == MessageType.TRAIN
        if node == VICTIM and train and not reply.has_error():
            change(reply)
        return reply

    caplog.set_level("WARNING")
    strategy = run_strategy(fast_config(num_rounds=1), make_grid(3, tamper=tamper))
    why = strategy.outcome.failures[VICTIM_KEY]
    assert why.startswith("rejected") and expected in why, why
    assert strategy.outcome.accepted == [0, 2]
    # The node is named (Flower id and client key) in the log.
    assert any(
        "node 1001 (client 1) left out of this round: rejected" in r.getMessage()
        and expected in r.getMessage()
        for r in caplog.records
    )
    _equivalent_state(strategy, dropped_victim)
