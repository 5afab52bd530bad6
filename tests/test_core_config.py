"""The Hydra tree: composition, presets, validation, the override string."""

from __future__ import annotations

from pathlib import Path

import pytest
import tomllib

from flexmoe_core.config import conf_dir, load_config, split_overrides

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml"))


def test_default_run_matches_the_issue() -> None:
    cfg = load_config()
    assert (cfg.dataset.name, cfg.partition.type, cfg.partition.alpha) == (
        "digits",
        "dirichlet",
        0.8,
    )
    assert (cfg.num_clients, cfg.model.num_experts, cfg.num_rounds) == (10, 8, 20)
    assert (cfg.capacity.low, cfg.capacity.high) == (2, 4)


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_composes(preset: str) -> None:
    cfg = load_config(f"experiment={preset} strategy=greedy")
    scale = preset.split("_")[0]
    assert cfg.model.backbone == {"cpu": "cnn", "paper": "resnet18"}[scale]
    assert cfg.strategy.name == "greedy" and cfg.model.num_experts == 8
    assert cfg.dataset.name == preset.split("_")[1]


def test_presets_cover_the_paper_grid() -> None:
    for scale in ("cpu", "paper"):
        for dataset in ("cifar10", "emnist", "gtsrb"):
            for partition in ("iid", "dirichlet", "kclass"):
                assert f"{scale}_{dataset}_{partition}" in PRESETS


def test_pyproject_declares_no_parameter_twice() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["tool"]["flwr"]["app"]["config"] == {"overrides": ""}
    assert conf_dir() == ROOT / "conf"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("num_rounds=0", "num_rounds=0"),
        ("fitness.beta=0", "fitness.beta"),
        ("fitness.signal=foo", "fitness.signal"),
        ("model.backbone=vgg", "model.backbone"),
        ("capacity.profile=weird", "capacity.profile"),
        ("strategy.epsilon=-1", "strategy.epsilon"),
        ("aggregation.expert_weighting=x", "expert_weighting"),
    ],
)
def test_invalid_values_are_named(override: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_config(override)


def test_override_string_keeps_hydra_quotes() -> None:
    assert split_overrides("a=1  b='x=y,z' c=[1,2]") == ["a=1", "b='x=y,z'", "c=[1,2]"]
    assert load_config("run_name='a=b,c'").run_name == "a=b,c"
