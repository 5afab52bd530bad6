"""Typed run settings: the validated configuration as frozen dataclasses.

:func:`flexmoe_core.config.settings_from_config` builds a :class:`Settings` once per
run, right after :mod:`flexmoe_core.config_schema` has validated the composed
configuration. The core then reads attributes with their real Python types
(``settings.train.lr`` is a float) instead of casting string paths of the composed
OmegaConf tree at every use, and it trusts them: every setting is validated in exactly
one place, the schema. The classes are grouped as ``conf/config.yaml`` and its groups
are: the run sections in :mod:`.sections`, ``dataset`` and ``partition`` in
:mod:`.data`.

This package imports nothing from the rest of the project (no import circles) and
nothing outside the standard library (the client builds settings too).

The conversions (:mod:`.convert`) only give values their declared type (an ``int`` written for a
float becomes that float, a list a tuple); they check nothing beyond what a type
conversion refuses, so a key that is missing or of a wrong kind still fails loudly.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .convert import str_or_none
from .data import (
    AugmentSettings,
    DatasetSettings,
    GroupSettings,
    HubSettings,
    PartitionSettings,
    PreprocessSettings,
    SplitNames,
)
from .sections import (
    AggregationSettings,
    CapacitySettings,
    CheckpointSettings,
    EvaluateSettings,
    FaultSettings,
    FitnessSettings,
    ModelSettings,
    PrivacySettings,
    StrategySettings,
    TimeoutSettings,
    TrainSettings,
    WandbSettings,
)

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
    "settings_from_plain",
]


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
            run_name=str_or_none(data["run_name"]),
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


def settings_from_plain(data: Mapping[str, Any]) -> Settings:
    """Type a configuration received as plain containers (the clients' run config).

    The server validated it (:mod:`flexmoe_core.config_schema`); this does not check it
    again, but a missing key or a value of the wrong kind is refused, not accepted.
    It needs neither Hydra nor the schema, which a client install does not have.

    Raises
    ------
    ValueError
        If the configuration cannot be typed.
    """
    try:
        return Settings.from_dict(data)
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"Invalid configuration: cannot type it ({err!r})") from None
