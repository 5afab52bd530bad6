"""The keys the files under ``conf/`` declare, and the check of overrides against them.

Run before Hydra composes the configuration, so that an unknown key is refused with
the closest known one (``num_round`` -> ``num_rounds``) rather than Hydra's advice to
add it with ``+``. The rules of each key's value are in
:mod:`flexmoe_core.config_schema`, which re-exports what is public here.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

# Subtrees whose keys are not checked here (the sweep entry point reads them).
LENIENT_PREFIXES = ("sweep",)


class ConfigError(ValueError):
    """A configuration that cannot run; the message names every bad key and its fix."""


# ---------------------------------------------------------- keys declared in conf/
@dataclass(frozen=True)
class DeclaredKeys:
    """Every key the files under ``conf/`` declare, with where and a default value."""

    leaves: Mapping[str, Any]  # dotted key -> first value seen (a default for messages)
    owners: Mapping[str, tuple[str, ...]]  # dotted key -> group options declaring it
    groups: Mapping[str, tuple[str, ...]]  # group -> its options

    def known(self, key: str) -> bool:
        """Whether ``key`` is a declared key or an ancestor of one."""
        return key in self.leaves or any(k.startswith(key + ".") for k in self.leaves)

    def covers(self, key: str) -> bool:
        """Whether ``key`` or an ancestor of it is a declared key (or lenient)."""
        parts = key.split(".")
        return lenient(key) or any(
            ".".join(parts[:i]) in self.leaves for i in range(1, len(parts) + 1)
        )

    def closest(self, key: str) -> str | None:
        """Return the declared key or group most like ``key``."""
        names = set(self.leaves) | set(self.groups)
        names |= {k.rsplit(".", 1)[0] for k in self.leaves if "." in k}
        match = difflib.get_close_matches(key, sorted(names), n=1, cutoff=0.6)
        return match[0] if match else None


def lenient(key: str) -> bool:
    """Whether ``key`` lies in a subtree this schema does not check."""
    return any(key == p or key.startswith(p + ".") for p in LENIENT_PREFIXES)


def flatten_keys(node: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Yield (dotted key, value) of every leaf of a nested mapping."""
    if isinstance(node, Mapping) and node:
        for name, value in node.items():
            yield from flatten_keys(value, f"{prefix}.{name}" if prefix else str(name))
    elif prefix:
        yield prefix, node


def _package(path: Path, default: str) -> str | None:
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            if match := re.match(r"#\s*@package\s+(\S+)", line):
                return "" if match[1] == "_global_" else match[1]
            if line.strip() and not line.startswith("#"):
                break
    return default


@lru_cache(maxsize=4)
def declared_keys(conf: Path) -> DeclaredKeys:
    """Read every YAML file of the Hydra tree ``conf`` (Hydra's own group excluded)."""
    leaves: dict[str, Any] = {}
    owners: dict[str, list[str]] = {}
    groups: dict[str, list[str]] = {}
    files = [(conf / "config.yaml", "", "")]
    for group_dir in sorted(p for p in conf.iterdir() if p.is_dir() and p.name != "hydra"):
        groups[group_dir.name] = []
        for path in sorted(group_dir.glob("*.yaml")):
            groups[group_dir.name].append(path.stem)
            files.append((path, group_dir.name, f"{group_dir.name}={path.stem}"))
    for path, group, owner in files:
        package = _package(path, group)
        data = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
        if not isinstance(data, dict):
            continue  # an empty file declares nothing
        data.pop("defaults", None)
        data.pop("hydra", None)
        for key, value in flatten_keys(data, package or ""):
            leaves.setdefault(key, value)
            if owner and package == group:
                owners.setdefault(key, []).append(owner)
    return DeclaredKeys(
        leaves,
        {k: tuple(v) for k, v in owners.items()},
        {k: tuple(v) for k, v in groups.items()},
    )


# ----------------------------------------------------------- checking the overrides
def check_overrides(overrides: Sequence[str], conf: Path) -> None:
    """Refuse overrides of keys nothing declares, before Hydra composes them.

    Raises
    ------
    ConfigError
        For an unknown key or group option (with the closest known one), and for an
        addition (``+key``) outside ``sweep.``.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    declared = declared_keys(conf)
    errors = []
    for override in OverridesParser.create().parse_overrides(list(overrides)):
        key = override.key_or_group
        text = override.input_line
        hydras = key == "hydra" or key.startswith(("hydra.", "hydra/"))
        if hydras or lenient(key) or override.is_delete():
            continue
        if key in declared.groups:
            errors += _group_option_problems(override, declared)
            continue
        if override.is_add() or override.is_force_add():
            errors.append(_addition_problem(text, key, declared))
        elif not declared.known(key):
            errors.append(f"{text}: {unknown_key_problem(key, declared)}")
    if errors:
        raise ConfigError("Invalid overrides:\n  - " + "\n  - ".join(errors))


def unknown_key_problem(key: str, declared: DeclaredKeys) -> str:
    """Say that ``key`` is not a setting, with the closest declared key."""
    suggestion = declared.closest(key)
    hint = f"did you mean {suggestion}?" if suggestion else "see conf/config.yaml for the keys"
    return f"{key} is not a setting; {hint}"


def _addition_problem(text: str, key: str, declared: DeclaredKeys) -> str:
    bare = text.lstrip("+")
    if key in declared.owners:
        where = " or ".join(declared.owners[key])
        return (
            f"{text}: '+' adds a key the selected option lacks, and nothing would read "
            f"it; {key} belongs to {where}: select that, then set {bare}"
        )
    if declared.known(key):
        return f"{text}: {key} is already a setting; write {bare} without '+'"
    return (
        f"{text}: {unknown_key_problem(key, declared)} ('+' adds keys; only sweep.* may be added)"
    )


def _group_option_problems(override: Any, declared: DeclaredKeys) -> list[str]:
    group, value = override.key_or_group, override.value()
    options = declared.groups[override.key_or_group]
    if override.is_sweep_override() or value is None or not isinstance(value, str):
        return []  # Hydra reports these itself
    if value in options:
        return []
    match = difflib.get_close_matches(value, options, n=1, cutoff=0.5)
    hint = f"did you mean {group}={match[0]}? " if match else ""
    choices = ", ".join(options)
    return [f"{override.input_line}: no option {value!r} in {group}; {hint}choose {choices}"]
