"""Compose the run configuration from the Hydra tree under ``conf/`` and validate it.

The rules every setting follows live in :mod:`flexmoe_core.config_schema`.
"""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .config_schema import (
    ConfigError,
    check_overrides,
    config_problems,
    declared_keys,
    lenient,
)
from .settings import Settings, settings_from_plain

__all__ = [
    "ConfigError",
    "conf_dir",
    "load_config",
    "load_settings",
    "settings_from_config",
    "split_overrides",
    "to_container",
    "validate_config",
]

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

    Raises
    ------
    ConfigError
        (a ``ValueError``) naming every unknown key, bad value and its fix.
    """
    override_list = split_overrides(overrides)
    conf = conf_dir()
    try:
        check_overrides(override_list, conf)
    except HydraException as err:  # an override Hydra cannot parse
        raise ConfigError(f"Invalid overrides: {err}") from None
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
            cfg = compose(config_name="config", overrides=override_list)
        OmegaConf.resolve(cfg)
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(_composition_message(err, conf)) from None
    validate_config(cfg)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def _composition_message(err: Exception, conf: Path) -> str:
    """Rewrite Hydra's "use +key" advice: adding a key another option declares is wrong."""
    text = str(err).split("\nConfig search path")[0].strip()
    if match := re.match(r"Could not override '([^']+)'", text):
        key = match[1]
        if lenient(key):
            problem = f"{key} is not in conf/; add it with +{key}=..."
        elif owners := declared_keys(conf).owners.get(key):
            problem = (
                f"the selected {key.split('.')[0]} option has no {key}; it belongs to "
                f"{' or '.join(owners)}: select that option"
            )
        else:
            problem = f"{key} is not a setting of this configuration"
        return f"Invalid overrides:\n  - {key}: {problem}"
    return f"Invalid configuration: {text}"


def to_container(cfg: DictConfig) -> dict[str, Any]:
    """Return the configuration as plain Python containers."""
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def validate_config(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` listing every key that breaks its rule in ``config_schema``."""
    if problems := config_problems(cfg, conf_dir()):
        raise ConfigError("Invalid configuration:\n  - " + "\n  - ".join(problems))


def settings_from_config(cfg: DictConfig | dict[str, Any]) -> Settings:
    """Return the typed :class:`Settings` of a configuration ``load_config`` validated.

    Validation stays in the schema (:func:`validate_config`), the one place each setting
    is checked; this only types the values. A configuration that did not come from
    :func:`load_config` (the run configuration a client receives) is typed as well, and
    a missing key or a value of the wrong kind raises :class:`ConfigError`, so garbage
    is never silently accepted.
    """
    plain = to_container(cfg) if isinstance(cfg, DictConfig) else cfg
    try:
        return settings_from_plain(plain)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def load_settings(overrides: str | Sequence[str] | None = None) -> Settings:
    """Compose, validate and type the configuration (``load_config`` then the settings)."""
    return settings_from_config(load_config(overrides))
