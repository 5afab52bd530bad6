"""Compose the run configuration from the Hydra tree under ``conf/``."""

from __future__ import annotations

import os
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf

from .faults import validate_faults

CONF_DIR_ENV = "FLEXMOE_CONF_DIR"


def conf_dir() -> Path:
    """Return the directory holding ``config.yaml``.

    Looks at ``$FLEXMOE_CONF_DIR``, then ``conf/`` beside the package (a source tree or
    a Flower app bundle), then the copy bundled inside an installed wheel.
    """
    candidates = []
    if env := os.environ.get(CONF_DIR_ENV):
        candidates.append(Path(env))
    here = Path(__file__).resolve().parent
    candidates += [here.parent / "conf", here / "conf"]
    for candidate in candidates:
        if (candidate / "config.yaml").is_file():
            return candidate
    raise FileNotFoundError(
        "No Hydra config tree found (looked in "
        + ", ".join(str(c) for c in candidates)
        + f"). Set {CONF_DIR_ENV} to the folder that holds config.yaml."
    )


def split_overrides(overrides: str | Sequence[str] | None) -> list[str]:
    """Turn a whitespace-separated override string (or a list) into Hydra overrides.

    Quotes are kept for Hydra (``output_root='/a b/c=d'``), as on Hydra's command line.
    """
    if overrides is None:
        return []
    if isinstance(overrides, str):
        return shlex.split(overrides, posix=False)
    return [str(o) for o in overrides]


def load_config(overrides: str | Sequence[str] | None = None) -> DictConfig:
    """Compose ``conf/config.yaml`` with Hydra overrides and validate it.

    Parameters
    ----------
    overrides : str or sequence of str, optional
        Hydra overrides such as ``"strategy=greedy num_rounds=5"``.

    Returns
    -------
    DictConfig
        The resolved, read-only configuration.
    """
    override_list = split_overrides(overrides)
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose(config_name="config", overrides=override_list)
    OmegaConf.resolve(cfg)
    validate_config(cfg)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def to_container(cfg: DictConfig) -> dict[str, Any]:
    """Return the configuration as plain Python containers."""
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def validate_config(cfg: DictConfig) -> None:
    """Raise ``ValueError`` naming the key when a value is out of range."""
    errors: list[str] = []

    def need(condition: bool, message: str) -> None:
        if not condition:
            errors.append(message)

    need(cfg.num_rounds >= 1, f"num_rounds={cfg.num_rounds}: must be at least 1")
    need(cfg.num_clients >= 1, f"num_clients={cfg.num_clients}: must be at least 1")
    need(
        0.0 < cfg.fraction_train <= 1.0,
        f"fraction_train={cfg.fraction_train}: must be in (0, 1]",
    )
    model = cfg.model
    need(model.num_experts >= 1, f"model.num_experts={model.num_experts}: must be >= 1")
    need(model.top_k >= 1, f"model.top_k={model.top_k}: must be >= 1")
    need(
        model.backbone in ("cnn", "resnet18"),
        f"model.backbone={model.backbone!r}: choose cnn or resnet18",
    )
    fit = cfg.fitness
    need(
        fit.signal in ("loss", "accuracy"),
        f"fitness.signal={fit.signal!r}: loss|accuracy",
    )
    need(0.0 < fit.beta <= 1.0, f"fitness.beta={fit.beta}: must be in (0, 1]")
    need(fit.alpha > 0.0, f"fitness.alpha={fit.alpha}: must be > 0")
    need(
        cfg.aggregation.expert_weighting in ("usage", "num_examples"),
        f"aggregation.expert_weighting={cfg.aggregation.expert_weighting!r}: usage|num_examples",
    )
    need(cfg.train.local_epochs >= 1, "train.local_epochs must be at least 1")
    need(cfg.train.batch_size >= 1, "train.batch_size must be at least 1")
    need(cfg.train.lr > 0, "train.lr must be > 0")
    cap = cfg.capacity
    need(
        cap.profile in ("constant", "list", "uniform"),
        f"capacity.profile={cap.profile!r}: choose constant, list or uniform",
    )
    if cfg.strategy.name == "flexmoe":
        need(cfg.strategy.epsilon >= 0, f"strategy.epsilon={cfg.strategy.epsilon}: >= 0")
    if "faults" in cfg:
        errors.extend(validate_faults(cfg.faults))
    if errors:
        raise ValueError("Invalid configuration:\n  - " + "\n  - ".join(errors))
