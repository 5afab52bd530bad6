"""A federation whose right allocation is known: groups, the oracle, purity, churn, held-out
fitness, the switching cost and the gate of a newly held expert."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from run_helpers import as_settings, fast_config, make_grid, run_strategy

from flexmoe_core.allocation import FlexAllocator, OracleAllocator, oracle_fitness
from flexmoe_core.config import ConfigError, load_config
from flexmoe_core.data import DatasetError, load_client_data
from flexmoe_core.data.groups import ClientGroups
from flexmoe_core.fitness import FitnessTable, relative_signals
from flexmoe_core.metrics import assignment_nmi, assignment_purity, churn
from flexmoe_core.model import build_model, inherit_gate_rows
from flexmoe_core.settings import GroupSettings
from flexmoe_core.training import heldout_feedback

pytestmark = pytest.mark.usefixtures("one_thread")


def one_hot(experts: list[int], num_experts: int) -> np.ndarray:
    assignment = np.zeros((len(experts), num_experts), dtype=bool)
    assignment[np.arange(len(experts)), experts] = True
    return assignment


# ------------------------------------------------------------------ groups
def test_groups_split_partition_ids_in_order() -> None:
    equal = ClientGroups.from_settings(
        GroupSettings.from_mapping({"count": 4, "transform": "labels"}), 10
    )
    assert equal is not None and equal.sizes == (3, 3, 2, 2)
    assert [equal.group_of(i) for i in range(10)] == [0, 0, 0, 1, 1, 1, 2, 2, 3, 3]
    unequal = ClientGroups.from_settings(
        GroupSettings.from_mapping({"sizes": [10, 5, 3, 2], "transform": "rotation"}), 20
    )
    assert unequal is not None and [unequal.group_of(i) for i in (0, 9, 10, 14, 15, 18, 19)] == [
        0,
        0,
        1,
        1,
        2,
        3,
        3,
    ]
    assert (
        ClientGroups.from_settings(GroupSettings.from_mapping({"count": 0, "sizes": None}), 10)
        is None
    )


@pytest.mark.parametrize(
    ("cfg", "clients", "says"),
    [
        ({"sizes": [10, 5], "transform": "labels"}, 20, "adds up to 15"),
        ({"count": 5, "transform": "rotation"}, 20, "only 4 right-angle rotations"),
        ({"count": 30, "transform": "labels"}, 20, "every group needs a client"),
    ],
)
def test_groups_that_cannot_be_made_are_refused(cfg: dict, clients: int, says: str) -> None:
    with pytest.raises(DatasetError, match=says):
        ClientGroups.from_settings(GroupSettings.from_mapping(cfg), clients)


def test_group_transforms_apply_to_every_split_of_a_client() -> None:
    cfg = load_config("partition=iid partition.groups.count=2")
    plain = load_config("partition=iid")
    base = load_client_data(as_settings(plain).dataset, as_settings(plain).partition, 3, 4, 0)
    group0 = load_client_data(as_settings(cfg).dataset, as_settings(cfg).partition, 0, 4, 0)
    group1 = load_client_data(as_settings(cfg).dataset, as_settings(cfg).partition, 3, 4, 0)
    groups = ClientGroups.from_settings(as_settings(cfg).partition.groups, 4)
    assert groups is not None
    mapping = groups.label_map(1, 10, 0)
    assert sorted(mapping) == list(range(10)) and (mapping != np.arange(10)).sum() >= 5
    np.testing.assert_array_equal(groups.label_map(0, 10, 0), np.arange(10))
    for split in ("train", "local_test", "global_test"):
        ours, theirs = getattr(group1, split), getattr(base, split)
        np.testing.assert_array_equal(ours.y, mapping[theirs.y])
        np.testing.assert_array_equal(ours.x, theirs.x)
    assert group0.global_test.y.tolist() == base.global_test.y.tolist()

    rotated = load_config(
        "partition=iid partition.groups.count=2 partition.groups.transform=rotation"
    )
    turned = load_client_data(as_settings(rotated).dataset, as_settings(rotated).partition, 3, 4, 0)
    for split in ("train", "global_test"):
        np.testing.assert_array_equal(
            getattr(turned, split).x, np.rot90(getattr(base, split).x, 1, axes=(2, 3))
        )
    subset = turned.global_test.subset(np.array([5, 7]))  # the lazy path rotates too
    np.testing.assert_array_equal(subset.x, np.rot90(base.global_test.x[[5, 7]], 1, axes=(2, 3)))


@pytest.mark.parametrize(
    ("preset", "sizes", "transform"),
    [
        ("known_labels", (5, 5, 5, 5), "labels"),
        ("known_labels_unequal", (10, 5, 3, 2), "labels"),
        ("known_rotation", (5, 5, 5, 5), "rotation"),
    ],
)
def test_known_structure_presets(preset: str, sizes: tuple, transform: str) -> None:
    cfg = load_config(f"experiment={preset}")
    groups = ClientGroups.from_settings(as_settings(cfg).partition.groups, int(cfg.num_clients))
    assert groups == ClientGroups(sizes, transform)
    assert (cfg.model.num_experts, cfg.model.top_k, cfg.capacity.value) == (4, 1, 1)
    single = load_config(f"experiment={preset} baseline=fedavg_e1")
    assert single.model.num_experts == 1 and single.partition.groups == cfg.partition.groups


def test_group_settings_are_validated() -> None:
    with pytest.raises(ConfigError, match=r"partition\.groups\.transform"):
        load_config("partition.groups.transform=shear")
    with pytest.raises(ConfigError, match=r"partition\.groups\.sizes"):
        load_config("partition.groups.sizes=[3,0]")


# ------------------------------------------------------- oracle and purity
def test_the_oracle_allocation_has_purity_one_with_equal_groups() -> None:
    groups = np.repeat(np.arange(4), 5)
    caps = np.ones(20, dtype=int)
    rng = np.random.default_rng(0)
    allocation = OracleAllocator()(oracle_fitness(groups, caps, 4), caps, np.zeros(4), rng)
    assert allocation.assignment.sum(axis=0).tolist() == [5, 5, 5, 5]
    assert assignment_purity(allocation.assignment, groups) == 1.0
    assert assignment_nmi(allocation.assignment, groups) == pytest.approx(1.0)


def test_the_oracle_is_as_pure_as_balance_allows_with_unequal_groups() -> None:
    groups = np.repeat(np.arange(4), [10, 5, 3, 2])
    caps = np.ones(20, dtype=int)
    fitness = oracle_fitness(groups, caps, 4)
    # The largest group gets two experts, the smallest none (its share rounds to 0).
    assert fitness[:10].sum(axis=0).tolist() == [10, 10, 0, 0]
    assert fitness[18:].sum() == 0
    allocation = OracleAllocator()(fitness, caps, np.zeros(4), np.random.default_rng(0))
    assert allocation.assignment.sum(axis=0).tolist() == [5, 5, 5, 5]
    # 3 of group 2 and 2 of group 3 share the last expert: (1 + 1 + 1 + 0.6) / 4.
    assert assignment_purity(allocation.assignment, groups) == pytest.approx(0.9)


def test_purity_and_nmi_tell_a_grouped_assignment_from_a_mixed_one() -> None:
    mixed = one_hot([i % 4 for i in range(16)], 4)  # each expert: one client of each group
    assert assignment_purity(mixed, np.repeat(np.arange(4), 4)) == pytest.approx(0.25)
    assert assignment_nmi(mixed, np.repeat(np.arange(4), 4)) == pytest.approx(0.0, abs=1e-12)
    groups = np.repeat(np.arange(4), 5)
    swapped = one_hot([0, 0, 0, 0, 1, 1, 1, 1, 1, 0, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3], 4)
    assert assignment_purity(swapped, groups) == pytest.approx((0.8 + 0.8 + 1 + 1) / 4)
    assert 0.0 < assignment_nmi(swapped, groups) < 1.0


def test_churn_counts_returning_clients_that_changed_and_the_new_expert_bytes() -> None:
    now = {0: [1], 1: [2, 3], 2: [0], 3: [1]}
    before = {0: [1], 1: [2, 0], 2: [1]}  # client 3 is new: it does not count
    out = churn(now, before, expert_bytes=[10, 20, 30, 40])
    assert out == {"churn": pytest.approx(2 / 3), "churn_clients": 2, "churn_bytes": 40 + 10}
    assert churn({0: [1]}, {}, [1, 1])["churn"] == 0.0


# --------------------------------------------------------- switching cost
def test_zero_switching_cost_reproduces_the_allocation_and_a_positive_one_keeps_holders() -> None:
    rng = np.random.default_rng(3)
    fitness = rng.random((12, 4))
    caps = np.ones(12, dtype=int)
    holding = one_hot(list(rng.integers(0, 4, size=12)), 4)
    allocate = FlexAllocator()
    plain = allocate(fitness, caps, np.zeros(4), np.random.default_rng(1)).assignment
    zero = allocate(fitness + 0.0 * holding, caps, np.zeros(4), np.random.default_rng(1))
    np.testing.assert_array_equal(plain, zero.assignment)
    sticky = allocate(fitness + 10.0 * holding, caps, np.zeros(4), np.random.default_rng(1))
    # With a cost larger than any fitness gap, as many clients stay as balance allows.
    stays = (sticky.assignment & holding).sum()
    assert stays == np.minimum(holding.sum(axis=0), 3).sum()
    assert stays > (plain & holding).sum()


@pytest.mark.parametrize("cost", [0.05, 0.3, 2.0])
def test_the_lp_stays_integral_with_a_switching_cost(cost: float) -> None:
    pytest.importorskip("cvxpy")
    rng = np.random.default_rng(int(cost * 100))
    fitness = rng.random((15, 5))
    caps = rng.integers(1, 4, size=15)
    holding = np.argsort(rng.random((15, 5)), axis=1) < caps[:, None]
    shifted = fitness + cost * holding
    flow = FlexAllocator()(shifted, caps, np.zeros(5), np.random.default_rng(0))
    lp = FlexAllocator(solver="cvxpy")(shifted, caps, np.zeros(5), np.random.default_rng(0))
    assert lp.method == "flexmoe-lp"  # the relaxation's optimum was 0/1: no integer re-solve
    assert flow.objective == pytest.approx(lp.objective, abs=1e-6)


def test_round_state_adds_the_switching_cost_to_held_experts_only() -> None:
    from flexmoe_core.round_state import RoundState

    cfg = load_config("model.num_experts=4 strategy.switching_cost=0.25")
    state = RoundState(as_settings(cfg), {"experts.0.w": np.zeros(2, np.float32)})
    state.holding = {0: [1], 1: [2, 3]}
    seen = {}

    def spy(fitness, capacities, deficit, rng):
        seen["fitness"] = fitness.copy()
        return FlexAllocator()(fitness, capacities, deficit, rng)

    state.allocator = spy  # type: ignore[assignment]
    spy.name = "flexmoe"  # type: ignore[attr-defined]
    state.plan(1, {0: 1, 1: 2, 2: 1})
    base = state.fitness.rows([0, 1, 2])
    np.testing.assert_allclose(
        seen["fitness"] - base, [[0, 0.25, 0, 0], [0, 0, 0.25, 0.25], [0] * 4]
    )


# ---------------------------------------------------------------- fitness
def test_cold_start_and_decay() -> None:
    table = FitnessTable(3, q0=0.0, beta=1.0, cold_start="mean", decay=0.5)
    table.update_signals(1, {0: 0.8})
    table.update_signals(2, {0: 0.4, 1: 0.6})
    # A new client starts from each expert's mean over the clients measured on it.
    np.testing.assert_allclose(table.rows([3])[0], [0.6, 0.6, 0.0])
    np.testing.assert_allclose(table.rows([2])[0], [0.4, 0.6, 0.0])  # started at [0.8, 0, 0]
    table.decay(1, measured=[1])  # expert 0 was not measured: half-way back to its start 0
    np.testing.assert_allclose(table.rows([1])[0], [0.4, 0.0, 0.0])
    restored = FitnessTable(3, q0=0.0, beta=1.0, cold_start="mean", decay=0.5)
    restored.load_state(table.state())
    np.testing.assert_array_equal(restored.rows([1, 2, 3]), table.rows([1, 2, 3]))


def test_relative_signals_compare_each_client_with_the_expert_holders() -> None:
    out = relative_signals({1: {0: 0.9, 1: 0.5}, 2: {0: 0.3}, 3: {1: 0.5}})
    assert out[1][0] == pytest.approx(0.3) and out[2][0] == pytest.approx(-0.3)
    assert out[1][1] == pytest.approx(0.0) and out[3][1] == pytest.approx(0.0)


def test_heldout_feedback_is_each_expert_own_prediction_on_every_sample() -> None:
    cfg = load_config("model.num_experts=4")
    torch.manual_seed(0)
    model = build_model(as_settings(cfg).model, (1, 8, 8), 10, [1, 3])
    x, y = torch.randn(40, 1, 8, 8), torch.randint(0, 10, (40,))
    feedback = heldout_feedback(model, x, y, batch_size=16)
    with torch.no_grad():
        features = model.backbone(x)
        for expert in (1, 3):
            logits = model.experts[str(expert)](features)
            loss = torch.nn.functional.cross_entropy(logits, y).item()
            accuracy = (logits.argmax(-1) == y).float().mean().item()
            assert feedback[expert].usage == 40
            assert feedback[expert].loss == pytest.approx(loss, rel=1e-5)
            assert feedback[expert].accuracy == pytest.approx(accuracy)


def test_heldout_feedback_comes_from_the_held_out_split_only(monkeypatch) -> None:
    import client_app.app as client

    seen: list[np.ndarray] = []

    def spy(model, x, y, **kwargs):
        seen.append(x.numpy().copy())
        return heldout_feedback(model, x, y, **kwargs)

    monkeypatch.setattr(client, "heldout_feedback", spy)
    cfg = fast_config(
        "fitness.source=heldout fitness.relative=false partition.groups.count=2", num_clients=2
    )
    strategy = run_strategy(cfg, make_grid(2))
    assert len(seen) == 2 * int(cfg.num_rounds)
    data = [
        load_client_data(as_settings(cfg).dataset, as_settings(cfg).partition, i, 2, 0)
        for i in range(2)
    ]
    held_out = [d.local_test.x for d in data]
    trained = np.concatenate([d.train.x for d in data]).reshape(-1, 64)
    for x in seen:
        assert any(x.shape == h.shape and np.array_equal(x, h) for h in held_out)
        flat = x.reshape(len(x), -1)
        assert not (flat[:, None, :] == trained[None, :, :]).all(-1).any()
    # The fitness table moved away from q0 (the held-out signal reached it).
    assert strategy.state is not None
    assert not np.allclose(strategy.state.fitness.rows([0, 1]), float(cfg.fitness.q0))


def test_a_reply_without_the_heldout_feedback_is_rejected_with_its_reason() -> None:
    from flwr.app import Message

    from flexmoe_core import protocol as proto

    def drop_heldout(node: int, reply: Message) -> Message:
        if node == 1000 and proto.HELDOUT_FEEDBACK in reply.content:
            del reply.content[proto.HELDOUT_FEEDBACK]
        return reply

    cfg = fast_config("fitness.source=heldout", num_clients=2, num_rounds=1)
    strategy = run_strategy(cfg, make_grid(2, tamper=drop_heldout))
    failures = strategy.history[0].participation.failures
    assert list(failures) == ["0"] and "heldout-feedback" in failures["0"]


def test_runs_record_purity_churn_and_the_trained_accuracy() -> None:
    cfg = fast_config(
        "partition.groups.count=2 strategy=oracle model.num_experts=2 model.top_k=1 "
        "capacity.profile=constant capacity.value=1",
        num_clients=4,
        num_rounds=2,
    )
    strategy = run_strategy(cfg, make_grid(4))
    records = strategy.history
    assert [r.allocation.purity for r in records] == [1.0, 1.0]
    assert [r.allocation.churn for r in records] == [0.0, 0.0]
    assert all(0.0 <= r.training.trained.local_acc <= 1.0 for r in records)


def test_the_oracle_needs_groups() -> None:
    cfg = fast_config("strategy=oracle", num_clients=2, num_rounds=1)
    with pytest.raises(ValueError, match=r"partition\.groups\.count"):
        run_strategy(cfg, make_grid(2))


# ------------------------------------------------------------------- gate
def test_a_newly_held_expert_inherits_the_gate_row_of_the_expert_let_go() -> None:
    cfg = OmegaConf.merge(load_config("model.num_experts=4"), {})
    torch.manual_seed(0)
    model = build_model(as_settings(cfg).model, (1, 8, 8), 10, [0, 2])
    before = model.gate.weight.detach().clone()
    sources = inherit_gate_rows(model, previous=[0, 1])  # held 0 and 1; now 0 and 2
    assert sources == {2: 1}
    np.testing.assert_array_equal(model.gate.weight[2].detach(), before[1])
    np.testing.assert_array_equal(model.gate.weight[0].detach(), before[0])
    grown = build_model(as_settings(cfg).model, (1, 8, 8), 10, [0, 1, 3])
    grown_before = grown.gate.weight.detach().clone()
    assert inherit_gate_rows(grown, previous=[0, 1]) == {3: None}  # capacity grew
    np.testing.assert_allclose(grown.gate.weight[3].detach(), grown_before[[0, 1]].mean(0))


def test_the_report_tells_group_setups_apart() -> None:
    from flexmoe_core.report import describe_data, describe_setup

    equal = load_config("experiment=known_labels")
    unequal = load_config("experiment=known_labels_unequal")
    rotated = load_config("experiment=known_rotation")
    setups = {describe_setup(c) for c in (equal, unequal, rotated)}
    assert len(setups) == 3
    assert "10/5/3/2 label-permutation groups" in describe_setup(unequal)
    assert "4 equal rotation groups" in describe_data(rotated)
    assert "groups" not in describe_setup(load_config(""))
