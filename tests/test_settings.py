"""Typed settings: built once from the validated configuration, frozen, checked in one place."""

from __future__ import annotations

import ast
import dataclasses
import json
import re
from pathlib import Path

import pytest

from flexmoe_core.aggregation import AggregationPolicy
from flexmoe_core.config import (
    ConfigError,
    load_config,
    load_settings,
    settings_from_config,
    to_container,
)
from flexmoe_core.fitness import FitnessTable
from flexmoe_core.privacy import PrivacyPolicy
from flexmoe_core.settings import AugmentSettings, Settings, settings_from_plain

CORE = Path(__file__).resolve().parent.parent / "flexmoe_core"


def test_default_settings_equal_the_yaml_values() -> None:
    settings = load_settings()
    assert (settings.seed, settings.num_rounds, settings.num_clients) == (0, 20, 10)
    assert settings.fraction_train == 1.0 and settings.run_name is None
    assert settings.capacity.profile == "uniform" and settings.capacity.values == (2, 3, 4)
    assert (settings.capacity.low, settings.capacity.high) == (2, 4)
    assert settings.train.lr == 0.05 and settings.train.momentum == 0.9
    assert settings.train.new_expert_gate == "inherit" and settings.train.device == "auto"
    assert settings.evaluate.global_every == 5
    assert (settings.fitness.source, settings.fitness.signal) == ("heldout", "accuracy")
    assert settings.fitness.beta == 1.0 and settings.fitness.relative is True
    assert settings.aggregation.max_examples_ratio == 10.0
    assert settings.aggregation.max_update_rms == 1.0
    assert settings.privacy.delta == 1e-5 and settings.privacy.enabled is False
    assert settings.faults.max_failed_rounds == 3 and settings.faults.backoff_max_rounds == 16
    assert settings.checkpoint.enabled is True and settings.checkpoint.resume is None
    assert (settings.strategy.name, settings.strategy.switching_cost) == ("flexmoe", 0.1)
    assert (settings.model.backbone, settings.model.num_experts, settings.model.top_k) == (
        "cnn",
        8,
        2,
    )
    assert settings.dataset.name == "digits" and settings.dataset.input_shape == (1, 8, 8)
    assert settings.dataset.preprocess.scale == 16.0 and settings.dataset.preprocess.augment is None
    assert settings.partition.type == "dirichlet" and settings.partition.alpha == 0.8
    assert settings.partition.groups.enabled is False


def test_values_have_the_types_the_schema_declares() -> None:
    # YAML writes `round_s: 600` and `scale: 255.0`; a float setting is a float.
    settings = load_settings("dataset=cifar10 timeouts.round_s=600 train.lr=1")
    assert type(settings.timeouts.round_s) is float and settings.timeouts.round_s == 600.0
    assert type(settings.train.lr) is float
    assert type(settings.train.batch_size) is int
    assert settings.dataset.preprocess.augment == AugmentSettings(4, True)
    assert settings.dataset.hf is not None and settings.dataset.hf.image_key == "img"
    assert settings.dataset.classes is not None and len(settings.dataset.classes) == 10
    hash(settings.dataset)  # hashable: it keys the in-memory data caches
    hash(settings.partition)


def test_settings_are_frozen() -> None:
    settings = load_settings()
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.num_rounds = 3  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.train.lr = 1.0  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.dataset.preprocess.scale = 1.0  # type: ignore[misc]
    settings.to_dict()["num_rounds"] = 3  # a copy: the settings stay as they were
    assert settings.num_rounds == 20


def test_the_plain_form_is_the_validated_configuration() -> None:
    cfg = load_config("strategy=greedy num_rounds=5")
    settings = settings_from_config(cfg)
    assert settings.to_dict() == to_container(cfg)
    assert settings.plain_json == json.dumps(to_container(cfg))  # what clients receive
    assert settings_from_config(settings.to_dict()) == settings  # the client's side
    named = settings.with_run_name("r1")
    assert named.run_name == "r1" and named.to_dict()["run_name"] == "r1"
    assert dataclasses.replace(named, run_name=None, plain_json="") == dataclasses.replace(
        settings, plain_json=""
    )


def test_a_received_configuration_that_is_not_one_is_refused() -> None:
    with pytest.raises(ConfigError, match="cannot type"):
        settings_from_config({"seed": 0})
    bad = to_container(load_config())
    bad["train"]["lr"] = "fast"
    with pytest.raises(ConfigError, match="cannot type"):
        settings_from_config(bad)
    with pytest.raises(ValueError, match="cannot type"):  # the client's path, without Hydra
        settings_from_plain(bad)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("fitness.beta=0", "fitness.beta"),
        ("fitness.signal=loud", "fitness.signal"),
        ("fitness.decay=2", "fitness.decay"),
        ("aggregation.trim_fraction=0.5", "aggregation.trim_fraction"),
        ("aggregation.max_update_rms=0", "aggregation.max_update_rms"),
        ("privacy.enabled=true privacy.backbone_share=1", "privacy.backbone_share"),
        ("capacity.low=4 capacity.high=3", "capacity.high"),
        ("capacity.profile=list capacity.values=[]", "capacity.values"),
        ("model.moe_from=block1", "model.moe_from"),
        ("dataset=cifar10 dataset.preprocess.augment=yes", "dataset.preprocess.augment"),
    ],
)
def test_each_setting_is_validated_once_by_the_schema(override: str, key: str) -> None:
    """The schema refuses the value naming the key; the typed settings and the classes
    built from them do not check it again (they would refuse it a second way)."""
    with pytest.raises(ConfigError, match=re.escape(key) + "="):
        load_config(override)
    # The same value typed without validation is accepted as it is: typing is not a
    # second validator, and neither are the policies built from the settings.
    plain = to_container(load_config())
    section, name = key.split(".", 1)
    value = {
        "fitness.beta": 0.0,
        "fitness.signal": "loud",
        "fitness.decay": 2.0,
        "aggregation.trim_fraction": 0.5,
        "aggregation.max_update_rms": 0.0,
        "privacy.backbone_share": 1.0,
        "capacity.high": 3,
        "capacity.values": [],
        "model.moe_from": "block1",
        "dataset.preprocess.augment": {"crop_padding": -1},
    }[key]
    target = plain[section]
    *parents, leaf = name.split(".")
    for parent in parents:
        target = target[parent]
    target[leaf] = value
    settings = Settings.from_dict(plain)
    fitness = settings.fitness
    FitnessTable(2, fitness.q0, fitness.beta, fitness.signal, fitness.alpha, decay=fitness.decay)
    AggregationPolicy.from_settings(settings.aggregation, settings.model.top_k)
    PrivacyPolicy.from_settings(dataclasses.replace(settings.privacy, enabled=True))


def test_only_the_schema_and_its_loader_read_the_configuration_tree() -> None:
    offenders = []
    for path in sorted(CORE.rglob("*.py")):
        if path.name in ("config_schema.py", "config.py") and path.parent == CORE:
            continue
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if "cfg." in line or "DictConfig" in line:
                offenders.append(f"{path.relative_to(CORE)}:{number}: {line.strip()}")
    assert offenders == []


def test_settings_package_imports_nothing_from_the_rest_of_the_project() -> None:
    for path in sorted((CORE / "settings").glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                # Only its own modules (from .x import ...), never ..anything.
                assert node.level in (0, 1), f"{path.name}: from {'.' * node.level}{node.module}"
                assert not (node.module or "").startswith("flexmoe"), path.name
            elif isinstance(node, ast.Import):
                assert not any(a.name.startswith("flexmoe") for a in node.names), path.name
