"""Settings the comparison adds: the deficit-rule ablation, lr decay, the presets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from flexmoe_core.allocation import FlexAllocator, load_bounds, make_allocator, update_deficit
from flexmoe_core.config import conf_dir, load_config
from flexmoe_core.config_schema import ConfigError
from flexmoe_core.settings import StrategySettings
from flexmoe_core.training import round_lr


def test_without_the_deficit_rule_the_remainder_is_free() -> None:
    deficit = np.array([0.0, 3.0, -1.0, 2.0])
    caps = np.array([2, 2, 2])  # 6 slots over 4 experts
    ruled = load_bounds(caps, 4, 0.0, deficit, rng := np.random.default_rng(0))
    after_ruled = rng.random()
    free = load_bounds(caps, 4, 0.0, deficit, rng := np.random.default_rng(0), deficit_rule=False)
    np.testing.assert_array_equal(ruled.lower, ruled.upper)
    np.testing.assert_array_equal(free.lower, [1, 1, 1, 1])
    np.testing.assert_array_equal(free.upper, [2, 2, 2, 2])
    assert rng.random() == after_ruled  # same draws: the rest of the seed's stream agrees
    # an integral mean load pins the loads either way
    pinned = load_bounds(np.array([2, 2, 4]), 4, 0.0, deficit, np.random.default_rng(0), False)
    np.testing.assert_array_equal(pinned.upper, [2, 2, 2, 2])


def test_without_the_deficit_rule_fitness_places_the_remainder() -> None:
    # Experts 0 and 1 are better for everybody: without the rule they take the two
    # extra slots every round, so cumulative loads drift apart; with it they do not.
    fitness = np.tile(np.array([0.9, 0.8, 0.1, 0.1]), (3, 1))
    caps = np.array([2, 2, 2])
    for rule, spread in ((True, 0), (False, 6)):
        allocator = make_allocator(StrategySettings(name="flexmoe", deficit_rule=rule))
        assert isinstance(allocator, FlexAllocator) and allocator.deficit_rule is rule
        rng, deficit, cumulative = np.random.default_rng(0), np.zeros(4), np.zeros(4)
        for _ in range(6):
            x = allocator(fitness, caps, deficit, rng).assignment
            np.testing.assert_array_equal(x.sum(1), caps)
            assert set(x.sum(0)) <= {1, 2}
            deficit, cumulative = update_deficit(deficit, x), cumulative + x.sum(0)
            assert not rule or cumulative.max() - cumulative.min() <= 1
        # 6 rounds of 6 slots: 9 each with the rule; 12, 12, 6, 6 without
        assert cumulative.max() - cumulative.min() == spread


def test_round_lr_decays_per_round() -> None:
    assert round_lr(0.05, 1.0, 7) == 0.05
    assert round_lr(0.05, 0.95, 1) == 0.05
    assert round_lr(0.05, 0.95, 3) == pytest.approx(0.05 * 0.9025)


@pytest.mark.parametrize("decay", ["0", "1.5"])
def test_lr_decay_out_of_range_is_refused(decay: str) -> None:
    with pytest.raises(ConfigError, match=r"train\.lr_decay"):
        load_config(f"train.lr_decay={decay}")


def presets(group: str) -> list[str]:
    return sorted(p.stem for p in (conf_dir() / group).glob("*.yaml"))


@pytest.mark.parametrize("name", [p for p in presets("experiment") if p.startswith("cmp_")])
def test_comparison_presets_are_the_heterogeneous_edge(name: str) -> None:
    cfg = load_config(f"experiment={name}")
    assert (cfg.num_clients, cfg.model.num_experts) == (20, 8)
    assert (cfg.capacity.profile, cfg.capacity.low, cfg.capacity.high) == ("uniform", 1, 4)


@pytest.mark.parametrize("name", presets("ablation"))
def test_each_ablation_changes_one_method_setting(name: str) -> None:
    base = load_config("experiment=cmp_cifar10_dirichlet")
    ablated = load_config(f"experiment=cmp_cifar10_dirichlet ablation={name}")
    changed = [
        f"{group}.{key}"
        for group in ("fitness", "strategy", "model", "train", "partition", "capacity")
        for key in base[group]
        if base[group][key] != ablated[group][key]
    ]
    assert len(changed) == 1, changed


def test_single_expert_baseline_keeps_the_trunk() -> None:
    cfg = load_config("experiment=cmp_cifar10_dirichlet baseline=fedavg_e1")
    base = load_config("experiment=cmp_cifar10_dirichlet")
    assert (cfg.model.num_experts, cfg.model.top_k) == (1, 1)
    assert cfg.capacity.profile == "constant" and cfg.capacity.value == 1
    for key in ("backbone", "width", "feature_dim", "moe_from", "pool"):
        assert cfg.model[key] == base.model[key]
    assert Path(conf_dir() / "baseline" / "fedavg_e1.yaml").is_file()
