"""Small in-process runs for the fault-tolerance and resume tests (no Ray, no network)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Message
from omegaconf import DictConfig

from client_app.app import app as client_app
from flexmoe_core.config import load_config, settings_from_config
from flexmoe_core.model import build_model, shared_state
from flexmoe_core.records import RoundRecord
from flexmoe_core.settings import Settings
from server_app.inprocess import InProcessGrid
from server_app.strategy import TIMING_KEYS, FlexMoEStrategy, to_array_record

# A model and a schedule small enough for a round to take about a second on one core.
FAST = (
    "model.width=8 model.feature_dim=16 train.local_epochs=1 "
    "train.batch_size=64 partition=iid evaluate.global_every=0 "
    "timeouts.wait_for_clients_s=0"
)


def fast_config(overrides: str = "", num_clients: int = 3, num_rounds: int = 2) -> DictConfig:
    """Return the test configuration: FAST settings plus ``overrides`` (which win)."""
    return load_config(f"{FAST} num_clients={num_clients} num_rounds={num_rounds} {overrides}")


def node_configs(num_clients: int, **extra: Any) -> list[dict[str, Any]]:
    """Return simulation-like node configs (one partition each)."""
    return [{"partition-id": i, "num-partitions": num_clients, **extra} for i in range(num_clients)]


def make_grid(
    num_clients: int,
    fail: Callable[[int, Message], str | None] | None = None,
    tamper: Callable[[int, Message], Message] | None = None,
    configs: list[dict[str, Any]] | None = None,
) -> InProcessGrid:
    """Return an in-process grid of ``num_clients`` nodes (ids 1000, 1001, ...)."""
    return InProcessGrid(client_app, configs or node_configs(num_clients), fail=fail, tamper=tamper)


def as_settings(cfg: DictConfig | Settings) -> Settings:
    """Return the typed settings of a configuration ``load_config`` returned."""
    return cfg if isinstance(cfg, Settings) else settings_from_config(cfg)


def initial_arrays(cfg: DictConfig | Settings) -> dict[str, np.ndarray]:
    """Return the server's initial model exactly as the ServerApp builds it."""
    import torch

    settings = as_settings(cfg)
    torch.manual_seed(settings.seed)
    model = build_model(settings.model, settings.dataset.input_shape, settings.dataset.num_classes)
    return shared_state(model)


def run_strategy(
    cfg: DictConfig, grid: InProcessGrid, strategy_cls: type[FlexMoEStrategy] = FlexMoEStrategy
) -> FlexMoEStrategy:
    """Run the strategy on ``grid`` for ``cfg.num_rounds`` rounds; return it."""
    strategy = strategy_cls(as_settings(cfg))
    strategy.start(
        grid, to_array_record(initial_arrays(cfg)), num_rounds=int(cfg.num_rounds), timeout=60
    )
    return strategy


def without_timing(history: list[RoundRecord] | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Return round records (or metrics.jsonl lines) as stored, without the wall-clock
    measurements."""
    lines = [r.to_json() if isinstance(r, RoundRecord) else r for r in history]
    return [{k: v for k, v in line.items() if k not in TIMING_KEYS} for line in lines]


def assert_same_arrays(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    """Assert two sets of named arrays are identical (names, dtypes, values)."""
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def fitness_by_key(strategy: FlexMoEStrategy) -> dict[int, list[float]]:
    """Return the fitness table by client key (the server keys it so: comparable across
    federations)."""
    assert strategy.state is not None
    table = strategy.state.fitness.state()
    return {
        int(key): list(row)
        for key, row in zip(table["client_ids"], table["values"], strict=True)  # type: ignore[call-overload]
    }


def read_npz(path: Path) -> dict[str, np.ndarray]:
    """Return the arrays of an ``.npz`` file."""
    with np.load(path) as data:
        return {k: np.asarray(data[k]) for k in data.files}
