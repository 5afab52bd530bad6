"""Reading result folders: one :class:`Run` per folder, its setup, strategy label and state."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import OmegaConf

from ..allocation.registry import ALL_EXPERTS_STRATEGY_NAMES, STRATEGY_NAMES
from ..config import conf_dir
from ..records import COLUMNS, Figure, RoundRecord, RunSummary, series
from ..results import COMPLETED, CONFIG_FILE, FAILED, METRICS_FILE, SUMMARY_FILE, read_records

REFERENCE = "flexmoe"  # the strategy every other one is compared with
STRATEGY_ORDER = [*STRATEGY_NAMES, "fedavg_e1"]
# The single-expert baseline (model.num_experts = 1): compared with every setup that
# trains on the same data, whatever that setup's E and capacities.
SINGLE_EXPERT = "fedavg_e1"
# Strategies whose clients do not hold k_c of E experts: left out of the load heatmaps,
# whose colour scale they would set (dense: every client holds all E; the single-expert
# baseline: every client holds the one expert).
UNBOUNDED_STRATEGIES = (*ALL_EXPERTS_STRATEGY_NAMES, SINGLE_EXPERT)

# (config key, short name): method settings an ablation varies. A run whose value
# differs from conf/'s default gets it in its strategy label ("flexmoe β=0.2").
VARIANT_KEYS: list[tuple[str, str]] = [
    ("fitness.signal", "signal"),
    ("fitness.beta", "β"),
    ("fitness.alpha", "α"),
    ("fitness.q0", "q0"),
    ("fitness.source", "source"),
    ("fitness.relative", "relative"),
    ("fitness.decay", "decay"),
    ("fitness.cold_start", "cold start"),
    ("strategy.switching_cost", "λ"),
    ("strategy.epsilon", "ε"),
    ("strategy.deficit_rule", "deficit rule"),
    ("model.top_k", "top"),
    ("aggregation.method", "aggregation"),
    ("aggregation.clip_multiple", "clip×"),
    ("aggregation.expert_clip_multiple", "expert clip×"),
    ("aggregation.reject_multiple", "reject×"),
]
# Bounds that a run switches off with null (other keys are null where they do not apply,
# e.g. a baseline strategy's fitness settings).
NULL_MEANS_OFF = {
    "aggregation.clip_multiple",
    "aggregation.expert_clip_multiple",
    "aggregation.reject_multiple",
}

OBJECTIVES = [column for column, _ in COLUMNS]

# What a run folder says about its run.
# COMPLETED: summary.json, with no status or status "completed"; FAILED: summary.json
# with another status, or a sweep job that failed.
INCOMPLETE = "incomplete"  # no summary.json: still running, or killed


def run_state(run_dir: str | Path) -> str:
    """Return :data:`COMPLETED`, :data:`FAILED` or :data:`INCOMPLETE` for a run folder.

    The exit code of ``flwr run`` says nothing (it is 0 when the ServerApp fails);
    only the summary the ServerApp writes at the end counts.
    """
    path = Path(run_dir) / SUMMARY_FILE
    if not path.is_file():
        return INCOMPLETE
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return FAILED
    status = summary.get("status", COMPLETED) if isinstance(summary, dict) else None
    return COMPLETED if status == COMPLETED else FAILED


@dataclass
class Run:
    """One run: its setup, strategy (label), seed, per-round records and state."""

    path: Path
    setup: str
    strategy: str  # the strategy's name plus its non-default method settings
    seed: int
    records: list[RoundRecord] = field(default_factory=list)
    state: str = COMPLETED
    data: str = ""  # the setup without the experts and capacities (:func:`describe_data`)
    settings: dict[str, str] = field(default_factory=dict)  # flattened config, for checks
    variants: list[str] = field(default_factory=list)  # the label's method settings

    def series(self, figure: Figure) -> np.ndarray:
        """Return ``figure`` per round (NaN where a round did not measure it)."""
        return series(self.records, figure)

    def summary(self) -> dict[str, float]:
        """Reduce the run to the report's columns (NaN where not measured)."""
        return RunSummary.from_records(self.records).columns()


def describe_partition(part: Any) -> str:
    """Return the partition of a run's config: type, its parameter, client groups."""
    detail = {
        "dirichlet": f"α={part.get('alpha')}",
        "kclass": f"{part.get('classes_per_client')}-class",
    }.get(part.type, "")
    groups = part.get("groups") or {}
    if groups.get("sizes") or groups.get("count"):
        sizes = groups.get("sizes")
        shown = "/".join(map(str, sizes)) if sizes else f"{groups.get('count')} equal"
        kind = {"labels": "label-permutation"}.get(groups.get("transform"), groups.get("transform"))
        detail = f"{detail + ' ' if detail else ''}{shown} {kind} groups"
    return f"{part.type}{' ' + detail if detail else ''}"


def describe_data(run_config: Any) -> str:
    """Return the data, backbone, clients and rounds a run trained with (no experts)."""
    return (
        f"{run_config.dataset.name} · {describe_partition(run_config.partition)} · "
        f"{run_config.model.backbone} · {run_config.num_clients} clients · "
        f"{run_config.num_rounds} rounds"
    )


def describe_setup(run_config: Any) -> str:
    """Return a short, stable description of what a run trained on.

    Method settings (the strategy, top-k, fitness, load band) are not part of it: runs
    that differ only in those are strategies of one setup.
    """
    cap = run_config.capacity
    capacity = {
        "constant": f"k={cap.value}",
        "list": f"k∈{list(cap['values'])}",
        "uniform": f"k~U[{cap.low},{cap.high}]",
    }[cap.profile]
    return (
        f"{run_config.dataset.name} · {describe_partition(run_config.partition)} · "
        f"{run_config.model.backbone} E={run_config.model.num_experts} · "
        f"{run_config.num_clients} clients · {capacity} · {run_config.num_rounds} rounds"
    )


@lru_cache(maxsize=8)
def _default_method_settings(backbone: str) -> dict[str, Any]:
    """Return conf/'s default value of every :data:`VARIANT_KEYS` key (None: not declared)."""
    root = conf_dir()
    merged = OmegaConf.merge(
        OmegaConf.load(root / "config.yaml"),
        {"strategy": OmegaConf.load(root / "strategy" / f"{REFERENCE}.yaml")},
        {"model": OmegaConf.load(root / "model" / f"{backbone}.yaml")}
        if (root / "model" / f"{backbone}.yaml").is_file()
        else {},
    )
    return {key: OmegaConf.select(merged, key, default=None) for key, _ in VARIANT_KEYS}


def _setting_text(name: str, value: Any) -> str:
    if isinstance(value, bool):
        return f"{name} {'on' if value else 'off'}"
    if name == "top":
        return f"top-{value}"
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return f"{name}={value}"


def strategy_label(run_config: Any) -> str:
    """Return the strategy's name plus its method settings that differ from conf/'s.

    ``flexmoe`` for the default, ``flexmoe β=0.2`` or ``flexmoe deficit rule off`` for
    an ablation, ``fedavg_e1`` for a single-expert model (whatever its allocator: with
    one expert every client holds it); only keys the run's configuration has are
    compared.
    """
    if int(run_config.model.num_experts) == 1:  # FedAvg of the trunk with one expert
        return SINGLE_EXPERT
    return " ".join([str(run_config.strategy.name), *variant_settings(run_config)])


def variant_settings(run_config: Any) -> list[str]:
    """Return the method settings of a run that differ from conf/'s, as label texts."""
    if int(run_config.model.num_experts) == 1:
        return []
    defaults = _default_method_settings(str(run_config.model.backbone))
    changed = []
    for key, name in VARIANT_KEYS:
        value = OmegaConf.select(run_config, key, default=None)
        default = defaults[key]
        if default is None or value == default:
            continue
        if value is None:
            if key in NULL_MEANS_OFF:
                changed.append(f"{name} off")
            continue
        changed.append(_setting_text(name, value))
    return changed


def visible_files(folder: Path, name: str) -> Iterator[Path]:
    """Yield ``folder/**/name``, skipping hidden folders (.hydra, .submitit, ...)."""
    for path in sorted(folder.rglob(name)):
        if not any(part.startswith(".") for part in path.relative_to(folder).parts[:-1]):
            yield path


def load_run(run_dir: str | Path, setup_keys: Sequence[str] = ()) -> Run:
    """Read one run folder (``config.yaml``, and ``metrics.jsonl`` if it got that far).

    ``setup_keys``: settings added to the setup as ``key=value`` (to tell apart runs
    that differ in settings neither the setup nor the strategy label show, e.g.
    ``train.lr``: each value is then a setup with its own comparison).
    """
    run_dir = Path(run_dir)
    run_config = OmegaConf.load(run_dir / CONFIG_FILE)
    assert OmegaConf.is_dict(run_config)
    records = read_records(run_dir) if (run_dir / METRICS_FILE).is_file() else []
    extra = "".join(
        f" · {key}={OmegaConf.select(run_config, key, default=None)}" for key in setup_keys
    )
    return Run(
        run_dir,
        describe_setup(run_config) + extra,
        strategy_label(run_config),
        int(run_config.seed),
        records,
        run_state(run_dir),
        describe_data(run_config) + extra,
        _flatten(OmegaConf.to_container(run_config, resolve=False)),
        variant_settings(run_config),
    )


def _flatten(tree: Any, prefix: str = "") -> dict[str, str]:
    """Return ``{"a.b": "value"}`` for a nested config (lists as their text)."""
    if not isinstance(tree, dict):
        return {prefix: str(tree)}
    flat: dict[str, str] = {}
    for key, value in tree.items():
        flat.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


# Settings that say where a run wrote or read, not what it computed.
PLACE_KEYS = ("output_root", "run_name", "dataset.path", "dataset.cache_dir", "wandb.", "sweep.")


def find_runs(folders: Sequence[str | Path], setup_keys: Sequence[str] = ()) -> list[Run]:
    """Return every run below ``folders`` (any state; see :attr:`Run.state`).

    A method setting that every strategy of a setup shares (e.g. ``top-1`` in a setup
    whose clients all route to one expert) belongs to the setup: it moves from the
    strategy labels to the setup's name, so the strategies compare with each other.
    """
    runs = [
        load_run(config.parent, setup_keys)
        for folder in folders
        for config in visible_files(Path(folder), CONFIG_FILE)
    ]
    for setup in {r.setup for r in runs}:
        members = [r for r in runs if r.setup == setup and r.strategy != SINGLE_EXPERT]
        if not members:
            continue
        shared = [t for t in members[0].variants if all(t in r.variants for r in members)]
        if not shared:
            continue
        for run in (r for r in runs if r.setup == setup):
            if run.strategy != SINGLE_EXPERT:
                kept = [t for t in run.variants if t not in shared]
                run.strategy = " ".join([run.strategy.split(" ", 1)[0], *kept])
            run.setup = f"{setup} · {' '.join(shared)}"
    return runs


def run_objective(run_dir: str | Path, objective: str) -> float:
    """Return one of :data:`OBJECTIVES` for a run folder (NaN if it was not measured)."""
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}: choose one of {OBJECTIVES}")
    return load_run(run_dir).summary()[objective]
