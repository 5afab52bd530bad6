"""Turn result folders into comparison tables, paired confidence intervals and plots.

    flexmoe-report multirun/cifar10_dirichlet multirun/search --out docs/results

Every folder below the given ones that holds ``config.yaml`` is one run. A run counts
as a result only when it *completed*: ``summary.json`` exists and, if it has a
``status``, that status is ``"completed"``. Failed and unfinished runs are listed as
such and left out of the figures.

Completed runs are grouped by **setup** (dataset, partition, model, experts, clients,
capacities, rounds) and, within a setup, by **strategy**: the strategy's name, plus
any method setting that differs from ``conf/``'s default (``flexmoe β=0.2``), so an
ablation sits beside the default as a strategy of its own. Per setup the report gives

- mean ± std over seeds of every column of :data:`COLUMNS`;
- FLEX-MoE (the default ``flexmoe``) against every other strategy: the **paired**
  per-seed difference (strategies of one seed share its data partition and its
  initial model) with a 95 % Student-t confidence interval on the paired differences,
  and a verdict (better / no detectable difference / worse);
- plots: accuracy and expert-load CV per round (mean ± std band over seeds) and the
  expert-load heatmaps on one colour scale; across setups, the differences with their
  intervals in one figure.

``runs.csv`` has one row per run. A folder holding sweep jobs (``status.json``, written
by ``flexmoe-sweep``) also gets a trials table. This module also defines what a run's
objective is (:data:`OBJECTIVES`) and how a job's status is recorded
(:class:`JobStatus`).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import warnings
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf
from scipy import stats

from .allocation.registry import ALL_EXPERTS_STRATEGY_NAMES, STRATEGY_NAMES
from .config import conf_dir
from .plots import (
    CURVE_PANELS,
    OPTIONAL_CURVE_PANELS,
    plot_comparisons,
    plot_load_heatmaps,
    plot_strategy_curves,
    slug,
)
from .results import (
    COMPLETED,
    CONFIG_FILE,
    FAILED,
    METRICS_FILE,
    SUMMARY_FILE,
    read_metrics,
)

REFERENCE = "flexmoe"  # the strategy every other one is compared with
STRATEGY_ORDER = [*STRATEGY_NAMES, "fedavg_e1"]
# The single-expert baseline (model.num_experts = 1): compared with every setup that
# trains on the same data, whatever that setup's E and capacities.
SINGLE_EXPERT = "fedavg_e1"
# Strategies whose clients do not hold k_c of E experts: left out of the load heatmaps,
# whose colour scale they would set (dense: every client holds all E; the single-expert
# baseline: every client holds the one expert).
UNBOUNDED_STRATEGIES = (*ALL_EXPERTS_STRATEGY_NAMES, SINGLE_EXPERT)

# (column, what it means); every column is also a valid sweep objective
COLUMNS: list[tuple[str, str]] = [
    ("final_local_acc", "final personalised accuracy, local split"),
    ("best_local_acc", "best personalised accuracy, local split"),
    ("final_global_acc", "final personalised accuracy, global test"),
    ("best_global_acc", "best personalised accuracy, global test"),
    ("load_cv", "expert load CV per round (clients holding), mean over rounds"),
    ("load_var", "expert load variance per round (clients holding), mean over rounds"),
    ("cum_load_cv", "cumulative expert load CV (clients holding), last round"),
    ("samples_cv", "routed-samples CV per round, mean over rounds"),
    ("cum_samples_cv", "cumulative routed-samples CV, last round"),
    ("mb_per_round", "MB sent + received per round"),
    ("wall_s", "run wall time (sum of round times), s"),
    ("best_trained_acc", "best accuracy of the model each client has just trained, local split"),
    ("purity10", "assignment purity at round 10 (known groups)"),
    ("final_purity", "assignment purity, last round (known groups)"),
    ("final_nmi", "normalised mutual information of expert and group, last round"),
    ("churn_late", "share of clients changing experts per round, mean over the last half"),
]
OBJECTIVES = [column for column, _ in COLUMNS]

# (column, what it is) compared between FLEX-MoE and each other strategy, paired by seed
COMPARED: list[tuple[str, str]] = [
    ("final_local_acc", "final local accuracy"),
    ("final_global_acc", "final global accuracy"),
    ("load_cv", "expert load CV per round"),
]
# Compared columns where lower is better (the verdict flips); shown as raw differences,
# the accuracies in points. Not compared with strategies whose load is not k_c of E.
LOWER_IS_BETTER = ("load_cv", "cum_load_cv")
CONFIDENCE = 0.95
BETTER, NO_DIFFERENCE, WORSE, TOO_FEW = (
    "better",
    "no detectable difference",
    "worse",
    "too few seeds",
)

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
]

# What a run folder says about its run.
# COMPLETED: summary.json, with no status or status "completed"; FAILED: summary.json
# with another status, or a sweep job that failed.
INCOMPLETE = "incomplete"  # no summary.json: still running, or killed

JOB_STATUS_FILE = "status.json"
SEARCH_RESULTS_FILE = "optimization_results.yaml"  # written by Hydra's Optuna sweeper


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
    records: list[dict[str, Any]] = field(default_factory=list)
    state: str = COMPLETED
    data: str = ""  # the setup without the experts and capacities (:func:`describe_data`)
    settings: dict[str, str] = field(default_factory=dict)  # flattened config, for checks
    variants: list[str] = field(default_factory=list)  # the label's method settings

    def series(self, key: str) -> np.ndarray:
        """Return ``key`` per round (NaN where a round did not measure it)."""
        return np.array([float(r.get(key, np.nan)) for r in self.records])

    def summary(self) -> dict[str, float]:
        """Reduce the run to the report's columns (NaN where not measured)."""
        if not self.records:
            return dict.fromkeys(OBJECTIVES, np.nan)

        def last(key: str) -> float:
            values = self.series(key)
            values = values[~np.isnan(values)]
            return float(values[-1]) if values.size else np.nan

        def best(key: str) -> float:
            values = self.series(key)
            return float(np.nanmax(values)) if np.isfinite(values).any() else np.nan

        def mean(key: str) -> float:
            values = self.series(key)
            return float(np.nanmean(values)) if np.isfinite(values).any() else np.nan

        def at_round(key: str, server_round: int) -> float:
            values = self.series(key)[:server_round]
            values = values[~np.isnan(values)]
            return float(values[-1]) if values.size else np.nan

        traffic = self.series("bytes_sent") + self.series("bytes_received")
        late = self.series("churn")[len(self.records) // 2 :]
        return {
            "final_local_acc": last("local_acc"),
            "best_local_acc": best("local_acc"),
            "final_global_acc": last("global_acc"),
            "best_global_acc": best("global_acc"),
            "load_cv": mean("load_clients_cv"),
            "load_var": mean("load_clients_var"),
            "cum_load_cv": last("cum_load_clients_cv"),
            "samples_cv": mean("load_samples_cv"),
            "cum_samples_cv": last("cum_load_samples_cv"),
            "mb_per_round": float(np.nanmean(traffic)) / 1e6
            if np.isfinite(traffic).any()
            else np.nan,
            "wall_s": float(np.nansum(self.series("round_time_s"))),
            "best_trained_acc": best("trained_local_acc"),
            "purity10": at_round("purity", 10),
            "final_purity": last("purity"),
            "final_nmi": last("nmi"),
            "churn_late": float(np.nanmean(late)) if np.isfinite(late).any() else np.nan,
        }


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


def describe_data(cfg: Any) -> str:
    """Return the data, backbone, clients and rounds a run trained with (no experts)."""
    return (
        f"{cfg.dataset.name} · {describe_partition(cfg.partition)} · "
        f"{cfg.model.backbone} · {cfg.num_clients} clients · {cfg.num_rounds} rounds"
    )


def describe_setup(cfg: Any) -> str:
    """Return a short, stable description of what a run trained on.

    Method settings (the strategy, top-k, fitness, load band) are not part of it: runs
    that differ only in those are strategies of one setup.
    """
    cap = cfg.capacity
    capacity = {
        "constant": f"k={cap.value}",
        "list": f"k∈{list(cap['values'])}",
        "uniform": f"k~U[{cap.low},{cap.high}]",
    }[cap.profile]
    return (
        f"{cfg.dataset.name} · {describe_partition(cfg.partition)} · "
        f"{cfg.model.backbone} E={cfg.model.num_experts} · "
        f"{cfg.num_clients} clients · {capacity} · {cfg.num_rounds} rounds"
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


def strategy_label(cfg: Any) -> str:
    """Return the strategy's name plus its method settings that differ from conf/'s.

    ``flexmoe`` for the default, ``flexmoe β=0.2`` or ``flexmoe deficit rule off`` for
    an ablation, ``fedavg_e1`` for a single-expert model (whatever its allocator: with
    one expert every client holds it); only keys the run's configuration has are
    compared.
    """
    if int(cfg.model.num_experts) == 1:  # FedAvg of the trunk with one expert
        return SINGLE_EXPERT
    return " ".join([str(cfg.strategy.name), *variant_settings(cfg)])


def variant_settings(cfg: Any) -> list[str]:
    """Return the method settings of a run that differ from conf/'s, as label texts."""
    if int(cfg.model.num_experts) == 1:
        return []
    defaults = _default_method_settings(str(cfg.model.backbone))
    changed = []
    for key, name in VARIANT_KEYS:
        value = OmegaConf.select(cfg, key, default=None)
        default = defaults[key]
        if value is None or default is None or value == default:
            continue
        changed.append(_setting_text(name, value))
    return changed


def _visible_files(folder: Path, name: str) -> Iterator[Path]:
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
    cfg = OmegaConf.load(run_dir / CONFIG_FILE)
    assert isinstance(cfg, DictConfig)
    records = read_metrics(run_dir) if (run_dir / METRICS_FILE).is_file() else []
    extra = "".join(f" · {key}={OmegaConf.select(cfg, key, default=None)}" for key in setup_keys)
    return Run(
        run_dir,
        describe_setup(cfg) + extra,
        strategy_label(cfg),
        int(cfg.seed),
        records,
        run_state(run_dir),
        describe_data(cfg) + extra,
        _flatten(OmegaConf.to_container(cfg, resolve=False)),
        variant_settings(cfg),
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
        for config in _visible_files(Path(folder), CONFIG_FILE)
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


# ------------------------------------------------------------------ sweep jobs
@dataclass
class JobStatus:
    """How one sweep job went: ``<job dir>/status.json``, written by ``flexmoe-sweep``."""

    job: int  # Hydra's job number: the trial number of a search
    overrides: list[str]  # the overrides that define the run
    status: str  # COMPLETED or FAILED
    objective: str | None = None
    direction: str | None = None
    value: float | None = None  # the objective; None when failed or not measured
    exit_code: int | None = None
    seconds: float | None = None
    finished_at: float | None = None  # epoch seconds
    skipped_at: float | None = None  # when a later run of the sweep last skipped it
    resumed: bool = False  # picked up from a checkpoint of an interrupted attempt
    error: str | None = None
    path: Path | None = field(default=None, compare=False)  # the job dir (not stored)

    def write(self, job_dir: Path) -> None:
        """Write ``status.json`` into ``job_dir``."""
        data = {k: v for k, v in asdict(self).items() if k != "path"}
        if data["value"] is not None and not math.isfinite(data["value"]):
            data["value"] = None  # JSON has no NaN
        (job_dir / JOB_STATUS_FILE).write_text(json.dumps(data, indent=2), encoding="utf-8")

    @classmethod
    def read(cls, job_dir: Path) -> JobStatus | None:
        """Read ``status.json`` from ``job_dir`` (None if absent or unreadable)."""
        try:
            data = json.loads((job_dir / JOB_STATUS_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if "status" not in data and "ok" in data:  # written by an older flexmoe-sweep
            data["status"] = COMPLETED if data["ok"] else FAILED
        known = {f.name for f in fields(cls)} - {"path"}
        try:
            return cls(**{k: v for k, v in data.items() if k in known}, path=job_dir)
        except TypeError:
            return None

    def params(self) -> dict[str, str]:
        """Return the overrides as ``{key: value}``."""
        return dict(o.split("=", 1) for o in self.overrides if "=" in o)


def find_sweep_jobs(folders: Sequence[str | Path]) -> dict[Path, list[JobStatus]]:
    """Return ``{sweep dir: jobs in job order}`` for every sweep job below ``folders``."""
    sweeps: dict[Path, list[JobStatus]] = defaultdict(list)
    for folder in folders:
        for path in _visible_files(Path(folder), JOB_STATUS_FILE):
            status = JobStatus.read(path.parent)
            if status is not None:
                sweeps[path.parent.parent].append(status)
    return {sweep: sorted(jobs, key=lambda j: j.job) for sweep, jobs in sorted(sweeps.items())}


def best_job(jobs: Sequence[JobStatus], direction: str | None = None) -> JobStatus | None:
    """Return the completed job with the best objective (None if none has one)."""
    scored = [j for j in jobs if j.status == COMPLETED and j.value is not None]
    if not scored:
        return None
    sign = -1.0 if (direction or scored[0].direction) == "minimize" else 1.0
    return max(scored, key=lambda j: sign * float(j.value))  # type: ignore[arg-type]


def varying_params(jobs: Sequence[JobStatus]) -> list[str]:
    """Return the override keys whose value differs between jobs (all keys for one job)."""
    params = [j.params() for j in jobs]
    keys = sorted({k for p in params for k in p})
    if len(jobs) < 2:
        return keys
    return [k for k in keys if len({p.get(k) for p in params}) > 1]


def _short(value: str) -> str:
    """Shorten a float as Optuna writes it (0.09276005809908329 -> 0.09276)."""
    try:
        number = float(value)
    except ValueError:
        return value
    return value if len(value) <= 8 or number.is_integer() else f"{number:.4g}"


def write_trials(sweeps: dict[Path, list[JobStatus]], out: Path) -> None:
    """Write ``trials.md`` and ``trials.csv``: one row per sweep job (trial).

    The Markdown table shows numbers to 4 significant digits; the CSV has the
    overrides exactly as the jobs ran them.
    """
    lines = [
        "One row per sweep job; for a search, the job number is the trial number. "
        "`failed` jobs are not results.",
    ]
    rows: list[list[Any]] = []
    for sweep_dir, jobs in sweeps.items():
        keys = varying_params(jobs)
        best = best_job(jobs)
        objective = next((j.objective for j in jobs if j.objective), None) or "objective"
        direction = next((j.direction for j in jobs if j.direction), None)
        kind = "search" if (sweep_dir / SEARCH_RESULTS_FILE).is_file() else "sweep"
        counts = {s: sum(j.status == s for j in jobs) for s in (COMPLETED, FAILED)}
        lines += [
            "",
            f"### {kind} {sweep_dir}",
            "",
            f"{len(jobs)} jobs: {counts[COMPLETED]} completed, {counts[FAILED]} failed; "
            f"objective `{objective}` ({direction or 'maximize'})"
            + (f"; best: job {best.job}" if best else ""),
            "",
            "| job | status | " + objective + " | " + " | ".join(keys) + " |",
            "|---" * (len(keys) + 3) + "|",
        ]
        for job in jobs:
            params = job.params()
            value = "–" if job.value is None else f"{job.value:.4f}"
            mark = " (best)" if job is best else ""
            lines.append(
                f"| {job.job}{mark} | {job.status} | {value} | "
                + " | ".join(_short(params.get(k, "")) for k in keys)
                + " |"
            )
            rows.append(
                [
                    str(sweep_dir),
                    job.job,
                    job.status,
                    job.objective,
                    job.value,
                    " ".join(job.overrides),
                    job.seconds,
                ]
            )
    (out / "trials.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with open(out / "trials.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["sweep", "job", "status", "objective", "value", "overrides", "seconds"])
        writer.writerows(rows)


# ------------------------------------------------------------------ the comparison
def base_strategy(label: str) -> str:
    """Return the strategy a label names (``flexmoe β=0.2`` -> ``flexmoe``)."""
    return label.split(" ", 1)[0]


def _order(strategy: str) -> tuple[int, str]:
    name = base_strategy(strategy)
    return (STRATEGY_ORDER.index(name) if name in STRATEGY_ORDER else 99, strategy)


def _is_single_expert(run: Run) -> bool:
    return base_strategy(run.strategy) == SINGLE_EXPERT


def group_runs(runs: Sequence[Run]) -> dict[str, dict[str, list[Run]]]:
    """Return ``{setup: {strategy: runs sorted by seed}}``, setups and strategies ordered.

    Single-expert runs (:data:`SINGLE_EXPERT`) join every setup of the same data
    (:attr:`Run.data`) as a strategy of its own; with no such setup they form their own.
    """
    groups: dict[str, dict[str, list[Run]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        if not _is_single_expert(run):
            groups[run.setup][run.strategy].append(run)
    data_of = {run.setup: run.data for run in runs if not _is_single_expert(run)}
    for run in filter(_is_single_expert, runs):
        homes = [setup for setup, data in data_of.items() if data and data == run.data]
        for setup in homes or [run.setup]:
            groups[setup][run.strategy].append(run)
    return {
        setup: {
            strategy: sorted(by_strategy[strategy], key=lambda r: r.seed)
            for strategy in sorted(by_strategy, key=_order)
        }
        for setup, by_strategy in sorted(groups.items())
    }


def aggregate_runs(runs: Sequence[Run]) -> dict[str, dict[str, dict[str, Any]]]:
    """Return ``{setup: {strategy: {column: (mean, std), 'seeds': [...]}}}``.

    The std is the sample standard deviation over seeds (``ddof=1``; 0 for one seed).
    """
    table: dict[str, dict[str, dict[str, Any]]] = {}
    for setup, by_strategy in group_runs(runs).items():
        table[setup] = {}
        for strategy, members in by_strategy.items():
            rows = [r.summary() for r in members]
            stats_: dict[str, Any] = {"seeds": [r.seed for r in members]}
            for column, _ in COLUMNS:
                values = np.array([row[column] for row in rows], dtype=float)
                finite = values[np.isfinite(values)]
                stats_[column] = (
                    (float(finite.mean()), float(finite.std(ddof=1)) if finite.size > 1 else 0.0)
                    if finite.size
                    else (np.nan, np.nan)
                )
            table[setup][strategy] = stats_
    return table


def paired_t_interval(
    differences: Sequence[float], confidence: float = CONFIDENCE
) -> tuple[float, float, float]:
    """Return (mean, low, high): the Student-t confidence interval of a mean difference.

    ``differences`` are per-seed differences of paired runs; the interval is
    mean ± t_{(1+confidence)/2, n-1} · s / sqrt(n) with s the sample standard
    deviation. With fewer than two differences the bounds are NaN.
    """
    d = np.asarray(differences, dtype=float)
    if d.size == 0:
        return (np.nan, np.nan, np.nan)
    mean = float(d.mean())
    if d.size < 2:
        return (mean, np.nan, np.nan)
    half = float(stats.t.ppf((1 + confidence) / 2, d.size - 1) * d.std(ddof=1) / math.sqrt(d.size))
    return (mean, mean - half, mean + half)


def verdict(low: float, high: float, higher_is_better: bool = True) -> str:
    """Say what an interval of (reference − other) shows: better, worse, or neither.

    An interval that touches 0 detects no difference; ``higher_is_better=False`` (a
    load CV) flips the reading.
    """
    if math.isnan(low) or math.isnan(high):
        return TOO_FEW
    above, below = low > 0, high < 0
    if not higher_is_better:
        above, below = below, above
    if above:
        return BETTER
    if below:
        return WORSE
    return NO_DIFFERENCE


@dataclass(frozen=True)
class PairedDifference:
    """FLEX-MoE minus another strategy on one metric, over the seeds both completed."""

    setup: str
    other: str
    metric: str
    seeds: list[int]
    mean: float
    low: float
    high: float
    verdict: str


def compare_to_reference(
    by_strategy: Mapping[str, Sequence[Run]],
    setup: str = "",
    reference: str = REFERENCE,
    metrics: Sequence[str] = tuple(c for c, _ in COMPARED),
) -> list[PairedDifference]:
    """Return ``reference`` − every other strategy per metric, paired by seed.

    Only seeds both strategies completed (and measured the metric) are paired; the
    interval is :func:`paired_t_interval`'s. Load metrics (:data:`LOWER_IS_BETTER`)
    are not compared with strategies whose clients hold all experts
    (:data:`UNBOUNDED_STRATEGIES`). Empty if ``reference`` has no run.
    """
    if reference not in by_strategy:
        return []
    ours = {r.seed: r.summary() for r in by_strategy[reference]}
    out = []
    for other, runs in by_strategy.items():
        if other == reference:
            continue
        theirs = {r.seed: r.summary() for r in runs}
        unbounded = base_strategy(other) in UNBOUNDED_STRATEGIES
        for metric in metrics:
            if unbounded and metric in LOWER_IS_BETTER:
                continue
            seeds = sorted(
                s
                for s in set(ours) & set(theirs)
                if np.isfinite(ours[s][metric]) and np.isfinite(theirs[s][metric])
            )
            diffs = [ours[s][metric] - theirs[s][metric] for s in seeds]
            mean, low, high = paired_t_interval(diffs)
            judged = verdict(low, high, metric not in LOWER_IS_BETTER)
            out.append(PairedDifference(setup, other, metric, seeds, mean, low, high, judged))
    return out


def pairing_problems(runs: Sequence[Run]) -> list[str]:
    """Check that the runs of one (setup, seed) trained on the same data, once each.

    The partition and the initial model are functions of the setup and the seed, so
    every strategy of a seed must report the same number of training examples in
    round 1 (when every client took part). And a (setup, strategy, seed) must have one
    run: two are runs of settings the setup and label do not show (they would count
    as two seeds, and only one would be paired). Each problem is returned as a message.
    """
    problems = []
    for setup, by_strategy in group_runs(runs).items():
        seen: dict[int, dict[float, list[str]]] = defaultdict(lambda: defaultdict(list))
        for strategy, members in by_strategy.items():
            for run in members:
                if run.records and "train_examples" in run.records[0]:
                    seen[run.seed][float(run.records[0]["train_examples"])].append(strategy)
            problems += _duplicates(setup, strategy, members)
        problems += [
            f"{setup}, seed {seed}: training examples in round 1 differ: "
            + "; ".join(f"{int(n)} ({', '.join(sorted(s))})" for n, s in sorted(counts.items()))
            for seed, counts in sorted(seen.items())
            if len(counts) > 1
        ]
    return problems


def _duplicates(setup: str, strategy: str, members: Sequence[Run]) -> list[str]:
    """Return a message per seed with more than one run of ``strategy``."""
    by_seed: dict[int, list[Run]] = defaultdict(list)
    for run in members:
        by_seed[run.seed].append(run)
    messages = []
    for seed, same in sorted(by_seed.items()):
        if len(same) < 2:
            continue
        keys = sorted(
            key
            for key in set().union(*(r.settings for r in same))
            if not key.startswith(PLACE_KEYS) and len({r.settings.get(key) for r in same}) > 1
        )
        hint = (
            f"they differ in {', '.join(keys)} (tell them apart: --setup-keys {' '.join(keys)})"
            if keys
            else "same settings (a repeated run?)"
        )
        messages.append(
            f"{setup}, {strategy}, seed {seed}: {len(same)} runs "
            f"({', '.join(r.path.name for r in same)}); {hint}"
        )
    return messages


COMPARISON_COLUMNS = [
    "setup",
    "reference",
    "other",
    "metric",
    "seeds",
    "mean",
    "ci_low",
    "ci_high",
    "verdict",
]


def _fmt(mean: float, std: float, column: str) -> str:
    if np.isnan(mean):
        return "–"
    if column.endswith("acc"):
        return f"{100 * mean:.1f} ± {100 * std:.1f}"
    if column == "wall_s":
        return f"{mean:.0f} ± {std:.0f}"
    if column == "mb_per_round":
        return f"{mean:.2f}"
    return f"{mean:.3f} ± {std:.3f}"


def _fmt_difference(diff: PairedDifference) -> str:
    """Accuracies in points (one decimal), load CVs as they are (three decimals)."""
    if not diff.seeds:
        return "–"
    scale, form = (1, "{:+.3f}") if diff.metric in LOWER_IS_BETTER else (100, "{:+.1f}")
    text = form.format(scale * diff.mean)
    if math.isnan(diff.low):
        return text
    return f"{text} [{form.format(scale * diff.low)}, {form.format(scale * diff.high)}]"


def comparison_table(differences: Sequence[PairedDifference]) -> list[str]:
    """Return the Markdown table of one setup's paired differences.

    Accuracies in points; load CVs as they are (lower is better, so a negative
    difference is ``better``).
    """
    metrics = list(dict.fromkeys(d.metric for d in differences))
    names = dict(COMPARED)
    head = "| FLEX-MoE − | seeds | " + " | ".join(
        f"{names.get(m, m)}: Δ{'' if m in LOWER_IS_BETTER else ' points'} [95 % CI] | verdict"
        for m in metrics
    )
    lines = [head + " |", "|---" * (2 + 2 * len(metrics)) + "|"]
    by_other: dict[str, dict[str, PairedDifference]] = defaultdict(dict)
    for diff in differences:
        by_other[diff.other][diff.metric] = diff
    for other, by_metric in by_other.items():
        seeds = max((len(d.seeds) for d in by_metric.values()), default=0)
        cells = []
        for metric in metrics:
            diff = by_metric.get(metric)
            cells += ["–", "–"] if diff is None else [_fmt_difference(diff), diff.verdict]
        lines.append(f"| {other} | {seeds} | " + " | ".join(cells) + " |")
    return lines


def write_tables(
    table: dict[str, dict[str, dict[str, Any]]],
    out: Path,
    not_counted: Sequence[tuple[str, Path]] = (),
    differences: Mapping[str, Sequence[PairedDifference]] | None = None,
    pairing: Sequence[str] = (),
) -> None:
    """Write ``results.md``, ``results.csv`` and ``comparisons.csv`` under ``out``.

    ``not_counted`` lists ``(state, path)`` of runs left out (failed, incomplete);
    ``differences`` the paired comparisons per setup; ``pairing`` the problems
    :func:`pairing_problems` found.
    """
    differences = differences or {}
    lines = [
        "Accuracies in %, mean ± std (sample standard deviation) over seeds of completed "
        "runs. Columns:",
        "",
    ]
    lines += [f"- `{column}`: {meaning}" for column, meaning in COLUMNS]
    lines += [
        "",
        f"FLEX-MoE against each other strategy: `{REFERENCE}` − other, per seed, over the "
        "seeds both completed (strategies of one seed share its data partition and initial "
        f"model), in accuracy points; {100 * CONFIDENCE:.0f} % Student-t confidence "
        "interval on the paired differences. Verdict: `better` (the interval is above 0), "
        "`worse` (below 0), `no detectable difference` (it contains 0); for the load CV "
        "lower is better, so the reading flips (a negative difference is `better`).",
    ]
    if not table:
        lines += ["", "No completed run."]
    for setup, by_strategy in table.items():
        lines += ["", f"### {setup}", ""]
        lines.append("| strategy | seeds | " + " | ".join(c for c, _ in COLUMNS) + " |")
        lines.append("|---" * (len(COLUMNS) + 2) + "|")
        for strategy, stats_ in by_strategy.items():
            cells = [_fmt(*stats_[c], c) for c, _ in COLUMNS]
            lines.append(f"| {strategy} | {len(stats_['seeds'])} | " + " | ".join(cells) + " |")
        if differences.get(setup):
            lines += ["", *comparison_table(differences[setup])]
    lines += ["", "### Pairing check", ""]
    lines += (
        [f"- {problem}" for problem in pairing]
        if pairing
        else [
            "Every strategy of a (setup, seed) trained on the same number of examples, "
            "and each (setup, strategy, seed) has one run."
        ]
    )
    if not_counted:
        lines += ["", f"### Not counted ({len(not_counted)})", ""]
        lines += [f"- {state}: `{path}`" for state, path in not_counted]
    (out / "results.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with open(out / "results.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(
            ["setup", "strategy", "seeds"]
            + [f"{c}_{s}" for c, _ in COLUMNS for s in ("mean", "std")]
        )
        for setup, by_strategy in table.items():
            for strategy, stats_ in by_strategy.items():
                writer.writerow(
                    [setup, strategy, " ".join(map(str, stats_["seeds"]))]
                    + [v for c, _ in COLUMNS for v in stats_[c]]
                )
    with open(out / "comparisons.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(COMPARISON_COLUMNS)
        for diffs in differences.values():
            for d in diffs:
                seeds = " ".join(map(str, d.seeds))
                writer.writerow(
                    [d.setup, REFERENCE, d.other, d.metric, seeds, d.mean, d.low, d.high, d.verdict]
                )


RUN_COLUMNS = [
    "setup",
    "strategy",
    "seed",
    "state",
    "rounds",
    "final_local_acc",
    "best_local_acc",
    "final_global_acc",
    "best_global_acc",
    "load_cv",
    "cum_load_cv",
    "samples_cv",
    "cum_samples_cv",
    "bytes_total",
    "mb_per_round",
    "wall_s",
    "load_cv_per_round",
    "cum_load_cv_per_round",
    "local_acc_per_round",
    "run",
]


def _series_text(values: np.ndarray, digits: int) -> str:
    return " ".join("" if np.isnan(v) else f"{v:.{digits}f}" for v in values)


def write_run_rows(runs: Sequence[Run], out: Path) -> Path:
    """Write ``runs.csv``: one row per run (any state), per-round series space-separated."""
    path = out / "runs.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=RUN_COLUMNS)
        writer.writeheader()
        for run in sorted(runs, key=lambda r: (r.setup, _order(r.strategy), r.seed)):
            summary = run.summary()
            traffic = run.series("bytes_sent") + run.series("bytes_received")
            writer.writerow(
                {
                    "setup": run.setup,
                    "strategy": run.strategy,
                    "seed": run.seed,
                    "state": run.state,
                    "rounds": len(run.records),
                    **{c: summary[c] for c in RUN_COLUMNS if c in summary},
                    "bytes_total": int(np.nansum(traffic)) if run.records else 0,
                    "load_cv_per_round": _series_text(run.series("load_clients_cv"), 4),
                    "cum_load_cv_per_round": _series_text(run.series("cum_load_clients_cv"), 4),
                    "local_acc_per_round": _series_text(run.series("local_acc"), 4),
                    "run": run.path.name,
                }
            )
    return path


CURVE_KEYS = tuple(key for key, _, _ in CURVE_PANELS + OPTIONAL_CURVE_PANELS)


def plot_setup(setup: str, runs: Sequence[Run], out: Path) -> list[Path]:
    """Plot curves per round by strategy, and the load heatmaps on one colour scale."""
    by_strategy = group_runs(runs).get(setup, {})
    curves = {
        strategy: {key: _stack([r.series(key) for r in members]) for key in CURVE_KEYS}
        for strategy, members in by_strategy.items()
    }
    heatmaps = {}
    for strategy, members in by_strategy.items():
        if base_strategy(strategy) in UNBOUNDED_STRATEGIES:
            continue
        run = members[0]  # the lowest seed
        heatmaps[strategy] = (
            f"{strategy} (seed {run.seed})",
            [r["load_clients"] for r in run.records],
        )
    left_out = [s for s in by_strategy if s not in heatmaps]
    note = (
        f" ({', '.join(left_out)}: every client holds every expert, not shown)" if left_out else ""
    )
    paths = [plot_strategy_curves(setup, curves, out / f"curves_{slug(setup)}.png")]
    if heatmaps:
        paths.append(
            plot_load_heatmaps(setup + note, heatmaps, out / f"load_heatmap_{slug(setup)}.png")
        )
    return paths


def _stack(series: Sequence[np.ndarray]) -> np.ndarray:
    """Stack per-seed series into (seeds, rounds), padding shorter ones with NaN."""
    rounds = max(len(s) for s in series)
    padded = np.full((len(series), rounds), np.nan)
    for row, values in zip(padded, series, strict=True):
        row[: len(values)] = values
    return padded


def build_report(
    folders: Sequence[str | Path],
    out: str | Path,
    strategies: Sequence[str] | None = None,
    setup_keys: Sequence[str] = (),
) -> dict[str, Any]:
    """Write tables, comparisons, trials and plots for the runs below ``folders``.

    ``strategies`` keeps only runs of those strategy names (``flexmoe`` keeps the
    default and its ablations); ``setup_keys`` are settings added to every setup
    (:func:`load_run`). Returns the table of :func:`aggregate_runs`.

    Raises
    ------
    FileNotFoundError
        If there is neither a run nor a sweep job below ``folders``.
    """
    runs = find_runs(folders, setup_keys)
    if strategies:
        runs = [r for r in runs if base_strategy(r.strategy) in set(strategies)]
    sweeps = find_sweep_jobs(folders)
    if not runs and not sweeps:
        raise FileNotFoundError(
            f"No runs (folders with {CONFIG_FILE}) or sweep jobs ({JOB_STATUS_FILE}) "
            f"below {list(folders)}"
        )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    completed = [r for r in runs if r.state == COMPLETED and r.records]
    not_counted = {r.path: r.state for r in runs if r not in completed}
    for jobs in sweeps.values():  # jobs that failed before their run wrote anything
        for job in jobs:
            if job.status != COMPLETED and job.path is not None:
                not_counted.setdefault(job.path, FAILED)
    table = aggregate_runs(completed)
    groups = group_runs(completed)
    differences = {
        setup: compare_to_reference(by_strategy, setup) for setup, by_strategy in groups.items()
    }
    pairing = pairing_problems(completed)
    for problem in pairing:
        warnings.warn(f"pairing check: {problem}", stacklevel=2)
    write_tables(
        table,
        out,
        sorted((state, path) for path, state in not_counted.items()),
        differences,
        pairing,
    )
    write_run_rows(runs, out)
    if sweeps:
        write_trials(sweeps, out)
    for setup in table:
        plot_setup(setup, completed, out)
    if any(differences.values()):
        plot_comparisons(
            {setup: diffs for setup, diffs in differences.items() if diffs},
            dict(COMPARED),
            out / "comparisons.png",
            LOWER_IS_BETTER,
        )
    (out / "runs.json").write_text(
        json.dumps(
            [
                {
                    "path": str(r.path),
                    "setup": r.setup,
                    "strategy": r.strategy,
                    "seed": r.seed,
                    "state": r.state,
                    **r.summary(),
                }
                for r in runs
            ],
            indent=2,
        ),
        encoding="utf-8",
    )
    return table


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: ``flexmoe-report FOLDER [FOLDER ...] --out DIR [--strategies ...]``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folders", nargs="+", help="result folders (searched recursively)")
    parser.add_argument("--out", default="report", help="where to write tables and plots")
    parser.add_argument(
        "--strategies",
        nargs="+",
        default=None,
        help="keep only these strategy names (e.g. flexmoe: the default and its ablations)",
    )
    parser.add_argument(
        "--setup-keys",
        nargs="+",
        default=(),
        help="settings that make a setup of their own, as key=value (e.g. train.lr)",
    )
    args = parser.parse_args(argv)
    build_report(args.folders, args.out, args.strategies, args.setup_keys)
    out = Path(args.out)
    print((out / "results.md").read_text(encoding="utf-8"))
    if (out / "trials.md").is_file():
        print((out / "trials.md").read_text(encoding="utf-8"))
    print(f"Tables and plots written to {out.resolve()}")


if __name__ == "__main__":
    main()
