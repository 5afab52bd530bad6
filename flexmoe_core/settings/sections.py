"""The run sections of the settings: capacity, training, fitness, aggregation, ..."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .convert import float_or_none, frozen, int_or_none, str_or_none


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
            value=int_or_none(data.get("value")),
            values=None if values is None else tuple(int(v) for v in values),
            low=int_or_none(data.get("low")),
            high=int_or_none(data.get("high")),
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
    method: str = "auto"
    trim_fraction: float = 0.2
    trim_min_holders: int = 6
    max_examples_ratio: float | None = 10.0
    max_update_rms: float | None = 1.0
    clip_multiple: float | None = 2.0
    expert_clip_multiple: float | None = 4.0
    reject_multiple: float | None = 50.0

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> AggregationSettings:
        """Type the validated section ``data`` (a mapping)."""
        defaults = cls()
        return cls(
            expert_weighting=str(data["expert_weighting"]),
            method=str(data["method"]),
            trim_fraction=float(data["trim_fraction"]),
            trim_min_holders=int(data.get("trim_min_holders", defaults.trim_min_holders)),
            max_examples_ratio=float_or_none(data["max_examples_ratio"]),
            max_update_rms=float_or_none(data["max_update_rms"]),
            clip_multiple=float_or_none(data.get("clip_multiple", defaults.clip_multiple)),
            expert_clip_multiple=float_or_none(
                data.get("expert_clip_multiple", defaults.expert_clip_multiple)
            ),
            reject_multiple=float_or_none(data.get("reject_multiple", defaults.reject_multiple)),
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
            entity=str_or_none(data["entity"]),
            mode=str(data["mode"]),
            group=str_or_none(data["group"]),
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
            client_dir=str_or_none(data["client_dir"]),
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
            width=int_or_none(data.get("width")),
            feature_dim=int(data.get("feature_dim", 64)),
            pool=bool(data.get("pool", False)),
            extra=tuple((k, frozen(v)) for k, v in data.items() if k not in _MODEL_KEYS),
        )
