"""The Hydra tree: composition, presets, validation, the override string."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import tomllib
from omegaconf import OmegaConf

from flexmoe_core.config import ConfigError, conf_dir, load_config, split_overrides, validate_config
from flexmoe_core.config_schema import SETTINGS, declared_keys, unchecked_keys

ROOT = Path(__file__).resolve().parents[1]
# The paper's grid at its scales (<scale>_<dataset>_<partition>); the other presets
# (known-structure federations, the decisive CIFAR-10 setup) have tests of their own.
PRESETS = sorted(
    p.stem
    for p in (ROOT / "conf" / "experiment").glob("*.yaml")
    if p.stem.split("_")[0] in ("cpu", "cmp", "paper")
)


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
    assert cfg.model.backbone == {"cpu": "cnn", "cmp": "cnn", "paper": "resnet18"}[scale]
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


# Each case: the override, then text the message must hold (key, value, rule or fix).
BAD_VALUES = [
    ("num_rounds=abc", ["num_rounds='abc'", "expected an integer", "fix: e.g. num_rounds=20"]),
    ("num_rounds=2.5", ["num_rounds=2.5", "expected an integer"]),
    ("seed=-1", ["seed=-1", "[0, inf)"]),
    ("seed=x", ["seed='x'", "integer"]),
    ("num_clients=0", ["num_clients=0", "[1, inf)"]),
    ("fraction_train=0", ["fraction_train=0", "(0, 1]"]),
    ("fraction_train=1.5", ["fraction_train=1.5", "(0, 1]"]),
    ("min_clients_per_round=0", ["min_clients_per_round=0"]),
    ("min_clients_per_round=11", ["min_clients_per_round=11", "[1, num_clients=10]"]),
    ("evaluate.every=-1", ["evaluate.every=-1", "[0, inf)"]),
    ("evaluate.every=x", ["evaluate.every='x'", "integer"]),
    ("evaluate.global_every=1.5", ["evaluate.global_every=1.5"]),
    ("evaluate.global_max_samples=-2", ["evaluate.global_max_samples=-2"]),
    ("timeouts.round_s=0", ["timeouts.round_s=0", "(0, inf)"]),
    ("timeouts.round_s=abc", ["timeouts.round_s='abc'", "a number"]),
    ("timeouts.wait_for_clients_s=-1", ["timeouts.wait_for_clients_s=-1"]),
    ("model.top_k=9", ["model.top_k=9", "[1, model.num_experts=8]"]),
    ("model.top_k=0", ["model.top_k=0"]),
    ("model.num_experts=0", ["model.num_experts=0"]),
    ("model.width=0", ["model.width=0"]),
    ("model.pool=maybe", ["model.pool='maybe'", "true or false"]),
    ("partition.alpha=0", ["partition.alpha=0", "(0, inf)"]),
    ("partition.alpha=-1", ["partition.alpha=-1"]),
    ("partition=kclass partition.classes_per_client=11", ["[1, dataset.num_classes=10]"]),
    ("partition.local_test_fraction=1", ["partition.local_test_fraction=1", "[0, 1)"]),
    ("partition.max_client_samples=0", ["partition.max_client_samples=0"]),
    ("capacity.profile=constant capacity.value=9", ["capacity.value=9", "model.num_experts=8"]),
    ("capacity.profile=list capacity.values=[1,9]", ["capacity.values=[1, 9]"]),
    ("capacity.profile=list capacity.values=[]", ["capacity.values=[]", "not be empty"]),
    ("capacity.low=0", ["capacity.low=0"]),
    ("capacity.high=9", ["capacity.high=9"]),
    ("capacity.low=4 capacity.high=3", ["capacity.high=3", "[capacity.low=4"]),
    ("train.lr=-0.1", ["train.lr=-0.1", "(0, inf)"]),
    ("train.lr=nan", ["train.lr=nan", "finite"]),
    ("train.batch_size=0", ["train.batch_size=0"]),
    ("train.local_epochs=x", ["train.local_epochs='x'"]),
    ("train.momentum=1", ["train.momentum=1", "[0, 1)"]),
    ("train.device=gpu", ["train.device='gpu'", "cuda:N"]),
    ("fitness.alpha=0", ["fitness.alpha=0"]),
    ("fitness.signal=los", ["did you mean 'loss'"]),
    ("strategy.name=flex", ["strategy.name='flex'", "did you mean 'flexmoe'"]),
    ("strategy=greedy strategy.tie_noise=-1", ["strategy.tie_noise=-1"]),
    ("dataset.num_classes=x", ["dataset.num_classes='x'"]),
    ("dataset.input_shape=[1,8]", ["dataset.input_shape=[1, 8]", "[channels, height, width]"]),
    ("dataset.source=zip", ["dataset.source='zip'", "choose one of"]),
    ("dataset.path=3", ["dataset.path=3", "quote it: dataset.path='3'"]),
    ("dataset.test_fraction=1", ["dataset.test_fraction=1", "(0, 1)"]),
    ("dataset.preprocess.std=[0]", ["dataset.preprocess.std=[0]"]),
    ("dataset=cifar10 dataset.preprocess.mean=[0.5,0.5]", ["2 values for 3 channels"]),
    ("dataset=cifar10 dataset.preprocess.augment=3", ["dataset.preprocess.augment=3"]),
    ("dataset=cifar10 dataset.classes=[a,b]", ["2 names for dataset.num_classes=10"]),
    ("checkpoint.enabled=maybe", ["checkpoint.enabled='maybe'", "true or false"]),
    ("checkpoint.resume=3", ["checkpoint.resume=3", "true"]),
    ("wandb.mode=loud", ["wandb.mode='loud'", "offline"]),
    ("wandb.enabled=1", ["wandb.enabled=1", "true or false"]),
    ("faults.crash_prob=2", ["faults.crash_prob=2.0: must be in [0, 1]"]),
    ("faults.crash_prob=x", ["faults.crash_prob='x'", "a number"]),
    ("faults.straggle_s=-1", ["faults.straggle_s=-1"]),
    ("output_root=''", ["output_root=''", "not be empty"]),
    ("run_name=a/b", ["run_name='a/b'", "plain folder name"]),
    ("run_name=123", ["run_name=123", "quote it: run_name='123'"]),
    ("aggregation.method=medain", ["aggregation.method='medain'", "did you mean 'median'"]),
    ("aggregation.trim_fraction=0.5", ["aggregation.trim_fraction=0.5", "[0, 0.5)"]),
    ("aggregation.max_update_rms=0", ["aggregation.max_update_rms=0"]),
    ("aggregation.max_examples_ratio=0.5", ["aggregation.max_examples_ratio=0.5"]),
    ("privacy.delta=0", ["privacy.delta=0", "(0, 1)"]),
    ("privacy.noise_multiplier=-1", ["privacy.noise_multiplier=-1"]),
    ("privacy.clip_norm=0", ["privacy.clip_norm=0"]),
    ("privacy.enabled=true aggregation.method=median", ["aggregation.method=mean"]),
]


@pytest.mark.parametrize(("override", "expected"), BAD_VALUES)
def test_every_bad_value_names_key_value_and_fix(override: str, expected: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(override)
    message = str(info.value)
    for text in expected:
        assert text in message, message
    assert message.count("\n  - ") == 1, message  # only the bad key is reported


def test_several_bad_values_are_reported_together() -> None:
    with pytest.raises(ConfigError) as info:
        load_config("num_rounds=abc seed=-1 model.top_k=9")
    assert all(key in str(info.value) for key in ("num_rounds=", "seed=", "model.top_k="))


def test_a_typo_is_refused_with_the_closest_key_not_hydras_plus_hint() -> None:
    with pytest.raises(
        ConfigError, match="num_round is not a setting; did you mean num_rounds"
    ) as info:
        load_config("num_round=3")
    assert "+num_round" not in str(info.value)
    with pytest.raises(ConfigError, match=r"did you mean train\.lr"):
        load_config("train.lrr=0.1")
    with pytest.raises(ConfigError, match="did you mean dataset"):
        load_config("datset=cifar10")
    with pytest.raises(ConfigError, match="did you mean dataset=cifar10"):
        load_config("dataset=cifar1")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("+num_round=3", "did you mean num_rounds"),
        ("+fitness.betta=0.3", "did you mean fitness.beta"),
        ("++num_rounds=3", "write num_rounds=3 without '+'"),
        ("partition=iid +partition.alpha=0.3", "belongs to partition=dirichlet"),
    ],
)
def test_additions_are_refused(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("+", r"\+")):
        load_config(override)


def test_a_key_of_another_group_option_names_that_option() -> None:
    with pytest.raises(ConfigError, match="belongs to dataset=emnist"):
        load_config("dataset=digits dataset.variant=letters")
    assert load_config("dataset=emnist dataset.variant=letters").dataset.variant == "letters"


def test_sweep_keys_stay_lenient() -> None:
    assert load_config("+sweep.tag=pilot").sweep.tag == "pilot"


def test_an_undeclared_key_reaching_validation_is_refused() -> None:
    cfg = OmegaConf.create(OmegaConf.to_container(load_config()))
    cfg = OmegaConf.merge(cfg, {"num_round": 3, "train": {"epochs": 2}})
    with pytest.raises(ConfigError) as info:
        validate_config(cfg)
    assert "did you mean num_rounds" in str(info.value)
    assert "train.epochs" in str(info.value)


def test_a_removed_key_is_reported_missing() -> None:
    with pytest.raises(ConfigError, match="num_rounds is missing"):
        load_config("~num_rounds")


def test_every_declared_key_has_a_rule() -> None:
    assert unchecked_keys(conf_dir()) == []
    declared = declared_keys(conf_dir())
    # And every rule names a key some file declares (no stale rows).
    assert [s.key for s in SETTINGS if not declared.known(s.key)] == []


@pytest.mark.parametrize(
    "option",
    [
        f"{group}={path.stem}"
        for group in ("dataset", "partition", "model", "strategy")
        for path in sorted((ROOT / "conf" / group).glob("*.yaml"))
    ],
)
def test_every_group_option_validates(option: str) -> None:
    load_config(option)


def test_new_model_keys_declared_in_conf_are_accepted(tmp_path: Path, monkeypatch) -> None:
    """Another model option's key without a rule is not refused (see config_schema)."""
    tree = tmp_path / "conf"
    shutil.copytree(ROOT / "conf", tree)
    with (tree / "model" / "cnn.yaml").open("a") as handle:
        handle.write("capacity_factor: null\n")
    monkeypatch.setenv("FLEXMOE_CONF_DIR", str(tree))
    assert load_config("model.capacity_factor=1.25").model.capacity_factor == 1.25
    with pytest.raises(ConfigError, match=r"did you mean model\.capacity_factor"):
        load_config("model.capacity_factr=1.25")


def test_override_string_keeps_hydra_quotes() -> None:
    assert split_overrides("a=1  b='x=y,z' c=[1,2]") == ["a=1", "b='x=y,z'", "c=[1,2]"]
    assert load_config("run_name='a=b,c'").run_name == "a=b,c"
