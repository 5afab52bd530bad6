"""Typed run settings: the validated configuration as frozen dataclasses.

:func:`flexmoe_core.config.settings_from_config` builds a :class:`Settings` once per
run, right after :mod:`flexmoe_core.config_schema` has validated the composed
configuration. The core then reads attributes with their real Python types
(``settings.train.lr`` is a float) instead of casting string paths of the composed OmegaConf tree
at every use, and it trusts them: every setting is validated in exactly one place, the
schema. The classes are grouped as ``conf/config.yaml`` and its groups are.

This module imports nothing from the project (no import circles) and nothing outside
the standard library (the client builds settings too).

The conversions below only give values their declared type (an ``int`` written for a
float becomes that float, a list a tuple); they check nothing beyond what a type
conversion refuses, so a key that is missing or of a wrong kind still fails loudly.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

__all__ = [
    "AggregationSettings",
    "AugmentSettings",
    "CapacitySettings",
    "CheckpointSettings",
    "DatasetSettings",
    "EvaluateSettings",
    "FaultSettings",
    "FitnessSettings",
    "GroupSettings",
    "HubSettings",
    "ModelSettings",
    "PartitionSettings",
    "PreprocessSettings",
    "PrivacySettings",
    "Settings",
    "SplitNames",
    "StrategySettings",
    "TimeoutSettings",
    "TrainSettings",
    "WandbSettings",
]


def _float_or_none(value: Any) -> float | None:
    return None if value is None else float(value)


def _int_or_none(value: Any) -> int | None:
    return None if value is None else int(value)


def _str_or_none(value: Any) -> str | None:
    return None if value is None else str(value)


def _frozen(value: Any) -> Any:
    """Return ``value`` with lists as tuples and mappings as sorted pairs (hashable)."""
    if isinstance(value, Mapping):
        return tuple((str(k), _frozen(v)) for k, v in value.items())
    if isinstance(value, list | tuple):
        return tuple(_frozen(v) for v in value)
    return value


def _section(data: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    """Return the mapping under ``key`` (a missing or null section reads as empty)."""
    value = data.get(key)
    return value if isinstance(value, Mapping) else {}


# ------------------------------------------------------------------ run sections
@dataclass(frozen=True)
class CapacitySettings:
    """``capacity.*``: the simulated expert capacity k_c of a client."""

    profile: str
    value: int | None = None
    values: tuple[int, ...] | None = None
    low: int | None = None
    high: int | None = None

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> CapacitySettings:
        """Type the validated section ``data`` (a mapping)."""
        values = data.get("values")
        return cls(
            profile=str(data["profile"]),
            value=_int_or_none(data.get("value")),
            values=None if values is None else tuple(int(v) for v in values),
            low=_int_or_none(data.get("low")),
            high=_int_or_none(data.get("high")),
        )


@dataclass(frozen=True)
class TrainSettings:
    """``train.*``: local training of a client."""

    local_epochs: int
    batch_size: int
    lr: float
    lr_decay: float
    momentum: float
    weight_decay: float
    aux_loss_coef: float
    new_expert_gate: str
    device: str

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> TrainSettings:
        """Type the validated section ``data`` (a mapping)."""
        return cls(
            local_epochs=int(data["local_epochs"]),
            batch_size=int(data["batch_size"]),
            lr=float(data["lr"]),
            lr_decay=float(data["lr_decay"]),
            momentum=float(data["momentum"]),
            weight_decay=float(data["weight_decay"]),
            aux_loss_coef=float(data["aux_loss_coef"]),
            new_expert_gate=str(data["new_expert_gate"]),
            device=str(data["device"]),
        )


@dataclass(frozen=True)
class EvaluateSettings:
    """``evaluate.*``: how often and on how much clients evaluate."""

    every: int
    global_every: int
    global_max_samples: int

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> EvaluateSettings:
        """Type the validated section ``data`` (a mapping)."""
        return cls(int(data["every"]), int(data["global_every"]), int(data["global_max_samples"]))


@dataclass(frozen=True)
class FitnessSettings:
    """``fitness.*``: the fitness table's signal and update rule."""

    source: str
    signal: str
    relative: bool
    alpha: float
    beta: float
    q0: float
    cold_start: str
    decay: float

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> FitnessSettings:
        """Type the validated section ``data`` (a mapping)."""
        return cls(
            source=str(data["source"]),
            signal=str(data["signal"]),
            relative=bool(data["relative"]),
            alpha=float(data["alpha"]),
            beta=float(data["beta"]),
            q0=float(data["q0"]),
            cold_start=str(data["cold_start"]),
            decay=float(data["decay"]),
        )


@dataclass(frozen=True)
class AggregationSettings:
    """``aggregation.*``: how updates combine and how much one client can weigh."""

    expert_weighting: str = "usage"
    method: str = "mean"
    trim_fraction: float = 0.2
    max_examples_ratio: float | None = 10.0
    max_update_rms: float | None = 1.0
    clip_multiple: float | None = 4.0
    reject_multiple: float | None = 50.0

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> AggregationSettings:
        """Type the validated section ``data`` (a mapping)."""
        defaults = cls()
        return cls(
            expert_weighting=str(data["expert_weighting"]),
            method=str(data["method"]),
            trim_fraction=float(data["trim_fraction"]),
            max_examples_ratio=_float_or_none(data["max_examples_ratio"]),
            max_update_rms=_float_or_none(data["max_update_rms"]),
            clip_multiple=_float_or_none(data.get("clip_multiple", defaults.clip_multiple)),
            reject_multiple=_float_or_none(data.get("reject_multiple", defaults.reject_multiple)),
        )


@dataclass(frozen=True)
class PrivacySettings:
    """``privacy.*``: client-level differential privacy."""

    enabled: bool = False
    clip_norm: float = 1.0
    noise_multiplier: float = 1.0
    delta: float = 1e-5
    backbone_share: float = 0.5

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> PrivacySettings:
        """Type the validated section ``data`` (a mapping)."""
        return cls(
            enabled=bool(data["enabled"]),
            clip_norm=float(data["clip_norm"]),
            noise_multiplier=float(data["noise_multiplier"]),
            delta=float(data["delta"]),
            backbone_share=float(data["backbone_share"]),
        )


@dataclass(frozen=True)
class TimeoutSettings:
    """``timeouts.*``: how long the server waits, in seconds."""

    wait_for_clients_s: float
    round_s: float
    rebind_grace_s: float = 10.0

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> TimeoutSettings:
        """Type the validated section ``data`` (a mapping)."""
        return cls(
            wait_for_clients_s=float(data["wait_for_clients_s"]),
            round_s=float(data["round_s"]),
            rebind_grace_s=float(data.get("rebind_grace_s", 10.0)),
        )


@dataclass(frozen=True)
class WandbSettings:
    """``wandb.*``: Weights & Biases logging."""

    enabled: bool
    project: str
    entity: str | None
    mode: str
    group: str | None

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> WandbSettings:
        """Type the validated section ``data`` (a mapping)."""
        return cls(
            enabled=bool(data["enabled"]),
            project=str(data["project"]),
            entity=_str_or_none(data["entity"]),
            mode=str(data["mode"]),
            group=_str_or_none(data["group"]),
        )


@dataclass(frozen=True)
class FaultSettings:
    """``faults.*``: injected failures, and how the server treats failing clients."""

    crash_prob: float = 0.0
    straggle_prob: float = 0.0
    straggle_s: float = 0.0
    max_failed_rounds: int = 3
    backoff_after: int = 3
    backoff_rounds: int = 1
    backoff_max_rounds: int = 16

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> FaultSettings:
        """Type the validated section ``data`` (a mapping)."""
        return cls(
            crash_prob=float(data["crash_prob"]),
            straggle_prob=float(data["straggle_prob"]),
            straggle_s=float(data["straggle_s"]),
            max_failed_rounds=int(data["max_failed_rounds"]),
            backoff_after=int(data["backoff_after"]),
            backoff_rounds=int(data["backoff_rounds"]),
            backoff_max_rounds=int(data["backoff_max_rounds"]),
        )


@dataclass(frozen=True)
class CheckpointSettings:
    """``checkpoint.*``: server checkpoints, resuming, where simulated gates live."""

    enabled: bool
    resume: bool | str | None
    client_dir: str | None

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> CheckpointSettings:
        """Type the validated section ``data`` (a mapping)."""
        resume = data["resume"]
        return cls(
            enabled=bool(data["enabled"]),
            resume=resume if resume is None or isinstance(resume, bool) else str(resume),
            client_dir=_str_or_none(data["client_dir"]),
        )


@dataclass(frozen=True)
class StrategySettings:
    """``strategy.*``: the allocation strategy.

    Options only some strategies declare default to what the allocators assume
    without them.
    """

    name: str
    epsilon: float = 0.0
    solver: str = "auto"
    deficit_rule: bool = True
    switching_cost: float = 0.0
    tie_noise: float = 1e-6

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> StrategySettings:
        """Type the validated section ``data`` (a mapping)."""
        defaults = cls(name="")
        return cls(
            name=str(data["name"]),
            epsilon=float(data.get("epsilon", defaults.epsilon)),
            solver=str(data.get("solver", defaults.solver)),
            deficit_rule=bool(data.get("deficit_rule", defaults.deficit_rule)),
            switching_cost=float(data.get("switching_cost") or defaults.switching_cost),
            tie_noise=float(data.get("tie_noise", defaults.tie_noise)),
        )


_MODEL_KEYS = ("backbone", "num_experts", "top_k", "moe_from", "dispatch", "width")
_MODEL_KEYS += ("feature_dim", "pool")


@dataclass(frozen=True)
class ModelSettings:
    """``model.*``: backbone, MoE cut and experts.

    ``width``, ``feature_dim`` and ``pool`` are declared by some backbones only; keys
    the schema has no row for are kept, unchecked and read-only, in ``extra``.
    """

    backbone: str
    num_experts: int
    top_k: int
    moe_from: str
    dispatch: str = "sparse"
    width: int | None = None
    feature_dim: int = 64
    pool: bool = False
    extra: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> ModelSettings:
        """Type the validated section ``data`` (a mapping)."""
        return cls(
            backbone=str(data["backbone"]),
            num_experts=int(data["num_experts"]),
            top_k=int(data["top_k"]),
            moe_from=str(data["moe_from"]),
            dispatch=str(data.get("dispatch", "sparse")),
            width=_int_or_none(data.get("width")),
            feature_dim=int(data.get("feature_dim", 64)),
            pool=bool(data.get("pool", False)),
            extra=tuple((k, _frozen(v)) for k, v in data.items() if k not in _MODEL_KEYS),
        )


# ------------------------------------------------------------------------ dataset
@dataclass(frozen=True)
class HubSettings:
    """``dataset.hf.*``: the Hugging Face Hub copy of a dataset."""

    id: str | None = None
    subset: str | None = None
    revision: str | None = None
    image_key: str = "image"
    label_key: str = "label"

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> HubSettings:
        """Type the validated section ``data`` (a mapping)."""
        defaults = cls()
        return cls(
            id=_str_or_none(data.get("id")),
            subset=_str_or_none(data.get("subset")),
            revision=_str_or_none(data.get("revision")),
            image_key=str(data.get("image_key", defaults.image_key)),
            label_key=str(data.get("label_key", defaults.label_key)),
        )

    def as_dict(self) -> dict[str, Any]:
        """Return the fields as a plain dict (the form the readers and cache keys use)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class SplitNames:
    """``dataset.split_names``: folder names (imagefolder) or Hub splits."""

    train: str = "train"
    test: str = "test"

    def as_dict(self) -> dict[str, str]:
        """Return the fields as a plain dict (the form the readers and cache keys use)."""
        return {"train": self.train, "test": self.test}


@dataclass(frozen=True)
class AugmentSettings:
    """``dataset.preprocess.augment``: random crop and flip of training images."""

    crop_padding: int = 0
    horizontal_flip: bool = False

    @classmethod
    def from_value(cls, value: Any) -> AugmentSettings | None:
        """``false``/``null``: none; ``true``: padding 4 with flips; or the mapping."""
        if value is None or value is False:
            return None
        if value is True:
            return cls(4, True)
        if isinstance(value, Mapping):
            return cls(
                int(value.get("crop_padding", 0) or 0), bool(value.get("horizontal_flip", False))
            )
        raise TypeError(f"dataset.preprocess.augment={value!r}: true, false or a mapping")


@dataclass(frozen=True)
class PreprocessSettings:
    """``dataset.preprocess.*``: normalisation and training augmentation."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    scale: float
    augment: AugmentSettings | None = None

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> PreprocessSettings:
        """Type the validated section ``data`` (a mapping)."""
        return cls(
            mean=tuple(float(v) for v in data["mean"]),
            std=tuple(float(v) for v in data["std"]),
            scale=float(data["scale"]),
            augment=AugmentSettings.from_value(data.get("augment")),
        )


@dataclass(frozen=True)
class DatasetSettings:
    """``dataset.*``: where the data is, its format, classes, shape and preprocessing.

    Frozen and hashable, so that a dataset's settings can key the in-memory caches.
    """

    name: str
    source: str
    path: str | tuple[str, ...] | None
    num_classes: int
    input_shape: tuple[int, ...]
    preprocess: PreprocessSettings
    variant: str | None = None
    idx_prefix: str | None = None
    hf: HubSettings | None = None
    split_names: SplitNames | None = None
    classes: tuple[str, ...] | None = None
    test_fraction: float | None = None
    label_offset: int = 0
    cache_dir: str | None = None

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> DatasetSettings:
        """Type the validated section ``data`` (a mapping)."""
        path, classes = data.get("path"), data.get("classes")
        hub, splits = data.get("hf"), data.get("split_names")
        return cls(
            name=str(data["name"]),
            source=str(data["source"]),
            path=path if path is None or isinstance(path, str) else tuple(str(p) for p in path),
            num_classes=int(data["num_classes"]),
            input_shape=tuple(int(s) for s in data["input_shape"]),
            preprocess=PreprocessSettings.from_mapping(data["preprocess"]),
            variant=_str_or_none(data.get("variant")),
            idx_prefix=_str_or_none(data.get("idx_prefix")),
            hf=None if hub is None else HubSettings.from_mapping(hub),
            split_names=None if splits is None else SplitNames(**dict(splits)),
            classes=None if classes is None else tuple(str(c) for c in classes),
            test_fraction=_float_or_none(data.get("test_fraction")),
            label_offset=int(data.get("label_offset") or 0),
            cache_dir=_str_or_none(data.get("cache_dir")),
        )


# ---------------------------------------------------------------------- partition
@dataclass(frozen=True)
class GroupSettings:
    """``partition.groups.*``: client groups with a data transform of their own."""

    count: int = 0
    sizes: tuple[int, ...] | None = None
    transform: str = "labels"

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> GroupSettings:
        """Type the validated section ``data`` (a mapping)."""
        sizes = data.get("sizes")
        return cls(
            count=int(data.get("count", 0) or 0),
            sizes=tuple(int(s) for s in sizes) if sizes else None,
            transform=str(data.get("transform", "labels")),
        )

    @property
    def enabled(self) -> bool:
        """Whether any groups are asked for (``count: 0`` and no sizes: none)."""
        return bool(self.count or self.sizes)


@dataclass(frozen=True)
class PartitionSettings:
    """``partition.*``: how the training data is split over the clients."""

    type: str
    local_test_fraction: float
    min_partition_size: int = 0
    max_client_samples: int | None = None
    alpha: float | None = None
    self_balancing: bool = False
    classes_per_client: int | None = None
    class_assignment: str = "first-deterministic"
    groups: GroupSettings = GroupSettings()

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> PartitionSettings:
        """Type the validated section ``data`` (a mapping)."""
        return cls(
            type=str(data["type"]),
            local_test_fraction=float(data["local_test_fraction"]),
            min_partition_size=int(data.get("min_partition_size", 0) or 0),
            max_client_samples=_int_or_none(data.get("max_client_samples")),
            alpha=_float_or_none(data.get("alpha")),
            self_balancing=bool(data.get("self_balancing", False)),
            classes_per_client=_int_or_none(data.get("classes_per_client")),
            class_assignment=str(data.get("class_assignment", "first-deterministic")),
            groups=GroupSettings.from_mapping(_section(data, "groups")),
        )


# ---------------------------------------------------------------------------- run
@dataclass(frozen=True)
class Settings:
    """The whole run configuration, typed (see the module docstring).

    ``plain_json`` is the validated configuration as JSON, for what needs the plain
    form: the run configuration sent to clients, ``config.yaml`` of the run folder, the
    W&B config and the checkpoint's record of the run.
    """

    seed: int
    num_rounds: int
    num_clients: int
    fraction_train: float
    min_clients_per_round: int
    output_root: str
    run_name: str | None
    capacity: CapacitySettings
    train: TrainSettings
    evaluate: EvaluateSettings
    fitness: FitnessSettings
    aggregation: AggregationSettings
    privacy: PrivacySettings
    timeouts: TimeoutSettings
    wandb: WandbSettings
    faults: FaultSettings
    checkpoint: CheckpointSettings
    strategy: StrategySettings
    model: ModelSettings
    dataset: DatasetSettings
    partition: PartitionSettings
    plain_json: str = "{}"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Settings:
        """Type a validated configuration given as plain containers.

        Raises
        ------
        KeyError, TypeError, ValueError
            If a section or key is missing, or a value cannot take its type.
        """
        return cls(
            seed=int(data["seed"]),
            num_rounds=int(data["num_rounds"]),
            num_clients=int(data["num_clients"]),
            fraction_train=float(data["fraction_train"]),
            min_clients_per_round=int(data["min_clients_per_round"]),
            output_root=str(data["output_root"]),
            run_name=_str_or_none(data["run_name"]),
            capacity=CapacitySettings.from_mapping(data["capacity"]),
            train=TrainSettings.from_mapping(data["train"]),
            evaluate=EvaluateSettings.from_mapping(data["evaluate"]),
            fitness=FitnessSettings.from_mapping(data["fitness"]),
            aggregation=AggregationSettings.from_mapping(data["aggregation"]),
            privacy=PrivacySettings.from_mapping(data["privacy"]),
            timeouts=TimeoutSettings.from_mapping(data["timeouts"]),
            wandb=WandbSettings.from_mapping(data["wandb"]),
            faults=FaultSettings.from_mapping(data["faults"]),
            checkpoint=CheckpointSettings.from_mapping(data["checkpoint"]),
            strategy=StrategySettings.from_mapping(data["strategy"]),
            model=ModelSettings.from_mapping(data["model"]),
            dataset=DatasetSettings.from_mapping(data["dataset"]),
            partition=PartitionSettings.from_mapping(data["partition"]),
            plain_json=json.dumps(data),
        )

    def to_dict(self) -> dict[str, Any]:
        """Return a fresh copy of the configuration as plain containers."""
        return json.loads(self.plain_json)

    def with_run_name(self, run_name: str) -> Settings:
        """Return these settings for the run folder ``run_name`` (clients key gates by it)."""
        data = self.to_dict()
        data["run_name"] = run_name
        return Settings.from_dict(data)
