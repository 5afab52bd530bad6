"""A round's record and a run's summary: what a run measured, and how it is stored.

:class:`RoundRecord` is one round, its figures grouped by what they describe (who took
part, the allocation, the expert loads, the evaluation, the training, the traffic,
the timing, what bounded the clients' influence). On disk a record is one flat JSON
object per round (``metrics.jsonl``): :meth:`RoundRecord.to_json` writes it and
:meth:`RoundRecord.from_json` reads it back. Every figure is optional: a figure a
round did not measure (no evaluation that round, no known groups, no privacy) is
absent from the file and ``None`` in the record.

:class:`RunSummary` reduces a run's records to its closing figures; it is the one
definition behind ``summary.json`` and the report's columns.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from typing import Any

import numpy as np


@dataclass
class Participation:
    """Who could take part, who did, and why some were left out."""

    clients_available: int | None = None
    participants: int | None = None
    accepted: int | None = None  # clients whose update was aggregated
    failures: dict[str, str] | None = None  # client key -> why it was left out
    benched: dict[str, int] | None = None  # backoff: client key -> last round out


@dataclass
class AllocationRecord:
    """Which client held which experts, how they were chosen, how much that moved."""

    assignment: dict[str, list[int]] | None = None  # client key -> experts
    objective: float | None = field(default=None, metadata={"stored": "allocation_objective"})
    method: str | None = field(default=None, metadata={"stored": "allocation_method"})
    deficit: list[float] | None = None  # the load deficit after the round
    # Known client groups only: how well the experts follow the groups.
    purity: float | None = None
    nmi: float | None = None
    # Returning participants whose experts changed: share, count, bytes to download.
    churn: float | None = None
    churn_clients: int | None = None
    churn_bytes: int | None = None


@dataclass
class Loads:
    """Expert loads: clients holding each expert and samples routed to it.

    ``*_var`` and ``*_cv`` are the variance and the coefficient of variation over
    experts; ``cumulative_*`` sum every round so far.
    """

    clients: list[int] | None = field(default=None, metadata={"stored": "load_clients"})
    samples: list[int] | None = field(default=None, metadata={"stored": "load_samples"})
    cumulative_clients: list[int] | None = field(
        default=None, metadata={"stored": "cum_load_clients"}
    )
    cumulative_samples: list[int] | None = field(
        default=None, metadata={"stored": "cum_load_samples"}
    )
    clients_var: float | None = field(default=None, metadata={"stored": "load_clients_var"})
    clients_cv: float | None = field(default=None, metadata={"stored": "load_clients_cv"})
    samples_var: float | None = field(default=None, metadata={"stored": "load_samples_var"})
    samples_cv: float | None = field(default=None, metadata={"stored": "load_samples_cv"})
    cumulative_clients_var: float | None = field(
        default=None, metadata={"stored": "cum_load_clients_var"}
    )
    cumulative_clients_cv: float | None = field(
        default=None, metadata={"stored": "cum_load_clients_cv"}
    )
    cumulative_samples_var: float | None = field(
        default=None, metadata={"stored": "cum_load_samples_var"}
    )
    cumulative_samples_cv: float | None = field(
        default=None, metadata={"stored": "cum_load_samples_cv"}
    )


@dataclass
class Scores:
    """Personalised accuracy and loss, averaged over clients by split size.

    ``local``: each client's own test split; ``global``: the dataset's test set.
    ``*_acc_min`` and ``*_acc_std`` are the spread over clients.
    """

    local_acc: float | None = None
    local_loss: float | None = None
    local_acc_min: float | None = None
    local_acc_std: float | None = None
    global_acc: float | None = None
    global_loss: float | None = None
    global_acc_min: float | None = None
    global_acc_std: float | None = None


@dataclass
class Evaluation(Scores):
    """The evaluation of the round's aggregated model (made in the next round)."""

    clients: int | None = field(default=None, metadata={"stored": "evaluated_clients"})

    def scores(self) -> Scores:
        """Return the accuracies and losses alone."""
        return Scores(**{f.name: getattr(self, f.name) for f in fields(Scores)})


@dataclass
class Training:
    """The accepted clients' training, weighted by their examples."""

    loss: float | None = field(default=None, metadata={"stored": "train_loss"})
    acc: float | None = field(default=None, metadata={"stored": "train_acc"})
    examples: int | None = field(default=None, metadata={"stored": "train_examples"})
    # The model each client has just trained, on its local split.
    trained: Scores = field(default_factory=Scores, metadata={"prefix": "trained_"})


@dataclass
class Traffic:
    """Bytes of arrays sent to and received from the clients (with the evaluation's)."""

    sent: int | None = field(default=None, metadata={"stored": "bytes_sent"})
    received: int | None = field(default=None, metadata={"stored": "bytes_received"})
    sent_per_client: dict[str, int] | None = field(
        default=None, metadata={"stored": "bytes_sent_per_client"}
    )
    received_per_client: dict[str, int] | None = field(
        default=None, metadata={"stored": "bytes_received_per_client"}
    )


@dataclass
class Timing:
    """Where the round's time went, in seconds (differs between two equal runs)."""

    allocation_s: float | None = field(default=None, metadata={"stored": "allocation_time_s"})
    server_s: float | None = field(default=None, metadata={"stored": "server_time_s"})
    round_s: float | None = field(default=None, metadata={"stored": "round_time_s"})
    client_phases_s: dict[str, float] | None = field(
        default=None, metadata={"stored": "client_time_s"}
    )  # summed over clients


@dataclass
class Trust:
    """What limited the clients' influence: the aggregation's bounds, or privacy."""

    bounded: dict[str, str] | None = None  # client key -> what the bounds cut
    # client key -> {figure: what it claimed}, only where the claim was cut: the
    # record's figures (train_examples, load_samples, evaluations) are as counted.
    claims: dict[str, dict[str, float]] | None = None
    dp_noise_std: dict[str, float] | None = None  # released group -> noise std
    dp_epsilon: float | None = None  # after this round


@dataclass
class RoundRecord:
    """Everything the server recorded about one round (one line of ``metrics.jsonl``)."""

    round: int
    strategy: str | None = None
    participation: Participation = field(default_factory=Participation)
    allocation: AllocationRecord = field(default_factory=AllocationRecord)
    loads: Loads = field(default_factory=Loads)
    evaluation: Evaluation = field(default_factory=Evaluation)
    training: Training = field(default_factory=Training)
    traffic: Traffic = field(default_factory=Traffic)
    timing: Timing = field(default_factory=Timing)
    trust: Trust = field(default_factory=Trust)
    # Entries this version does not know (a newer writer's): kept, so a file round-trips.
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """Return the record as one flat JSON object (figures not measured left out)."""
        flat: dict[str, Any] = {"round": self.round}
        if self.strategy is not None:
            flat["strategy"] = self.strategy
        for group in _GROUPS:
            flat.update(_flatten(getattr(self, group)))
        flat.update(self.extra)
        return {key: plain(flat[key]) for key in sorted(flat)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RoundRecord:
        """Read a record written by :meth:`to_json` (or by an earlier version)."""
        used = {"round", "strategy"}
        groups = {name: _unflatten(_GROUP_TYPES[name], data, "", used) for name in _GROUPS}
        extra = {k: v for k, v in data.items() if k not in used}
        return cls(int(data["round"]), data.get("strategy"), **groups, extra=extra)

    def train_scores(self) -> dict[str, float]:
        """Return the training figures under their stored names (those measured)."""
        flat = _flatten(self.training, nested=False)
        return {k: v for k, v in flat.items() if isinstance(v, (int, float))}

    def evaluation_scores(self) -> dict[str, float]:
        """Return the evaluation's accuracies and losses under their stored names."""
        return _flatten(self.evaluation.scores())


_GROUPS = (
    "participation",
    "allocation",
    "loads",
    "evaluation",
    "training",
    "traffic",
    "timing",
    "trust",
)
_GROUP_TYPES: dict[str, type] = {
    "participation": Participation,
    "allocation": AllocationRecord,
    "loads": Loads,
    "evaluation": Evaluation,
    "training": Training,
    "traffic": Traffic,
    "timing": Timing,
    "trust": Trust,
}


def _key(f: Any, prefix: str) -> str:
    """Return the name a figure is stored under: ``stored`` if given, else its own."""
    return prefix + f.metadata.get("stored", f.name)


def _flatten(group: Any, prefix: str = "", nested: bool = True) -> dict[str, Any]:
    """Return a group's measured figures under their stored names (``prefix`` first)."""
    flat: dict[str, Any] = {}
    for f in fields(group):
        value = getattr(group, f.name)
        if is_dataclass(value):
            if nested:
                flat.update(_flatten(value, prefix + f.metadata["prefix"]))
        elif value is not None:
            flat[_key(f, prefix)] = value
    return flat


def _unflatten(cls: type, data: Mapping[str, Any], prefix: str, used: set[str]) -> Any:
    """Build a group from the stored figures it owns; add their names to ``used``."""
    values: dict[str, Any] = {}
    for f in fields(cls):
        if "prefix" in f.metadata:
            nested = f.default_factory  # type: ignore[misc]
            values[f.name] = _unflatten(nested, data, prefix + f.metadata["prefix"], used)
        elif (key := _key(f, prefix)) in data:
            values[f.name] = data[key]
            used.add(key)
    return cls(**values)


# Stored names of the figures that measure time: they differ between two runs of the
# same computation, so equality checks (e.g. of a resumed run) leave them out.
TIMING_KEYS = tuple(_flatten(Timing(0.0, 0.0, 0.0, {})))


def plain(value: Any) -> Any:
    """Return ``value`` as JSON's types: NumPy arrays and scalars become lists and numbers.

    The one conversion behind every record and summary written to disk.
    """
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


# --------------------------------------------------------------------- the run
Figure = Callable[[RoundRecord], Any]


def series(records: Sequence[RoundRecord], figure: Figure) -> np.ndarray:
    """Return ``figure`` per round (NaN where a round did not measure it)."""
    return np.array(
        [np.nan if (value := figure(r)) is None else float(value) for r in records], dtype=float
    )


def _column(meaning: str) -> Any:
    return field(default=math.nan, metadata={"meaning": meaning})


@dataclass
class RunSummary:
    """A run's closing figures (NaN: not measured); the report's columns.

    Every column is also a valid sweep objective.
    """

    final_local_acc: float = _column("final personalised accuracy, local split")
    best_local_acc: float = _column("best personalised accuracy, local split")
    final_global_acc: float = _column("final personalised accuracy, global test")
    best_global_acc: float = _column("best personalised accuracy, global test")
    load_cv: float = _column("expert load CV per round (clients holding), mean over rounds")
    load_var: float = _column("expert load variance per round (clients holding), mean over rounds")
    cum_load_cv: float = _column("cumulative expert load CV (clients holding), last round")
    samples_cv: float = _column("routed-samples CV per round, mean over rounds")
    cum_samples_cv: float = _column("cumulative routed-samples CV, last round")
    mb_per_round: float = _column("MB sent + received per round")
    wall_s: float = _column("run wall time (sum of round times), s")
    best_trained_acc: float = _column(
        "best accuracy of the model each client has just trained, local split"
    )
    purity10: float = _column("assignment purity at round 10 (known groups)")
    final_purity: float = _column("assignment purity, last round (known groups)")
    final_nmi: float = _column("normalised mutual information of expert and group, last round")
    churn_late: float = _column(
        "share of clients changing experts per round, mean over the last half"
    )

    @classmethod
    def from_records(cls, records: Sequence[RoundRecord]) -> RunSummary:
        """Reduce a run's round records (in round order) to its closing figures."""
        if not records:
            return cls()

        def last(figure: Figure) -> float:
            values = series(records, figure)
            values = values[~np.isnan(values)]
            return float(values[-1]) if values.size else np.nan

        def best(figure: Figure) -> float:
            values = series(records, figure)
            return float(np.nanmax(values)) if np.isfinite(values).any() else np.nan

        def mean(values: np.ndarray) -> float:
            return float(np.nanmean(values)) if np.isfinite(values).any() else np.nan

        def at_round(figure: Figure, server_round: int) -> float:
            values = series(records, figure)[:server_round]
            values = values[~np.isnan(values)]
            return float(values[-1]) if values.size else np.nan

        traffic = series(records, lambda r: r.traffic.sent) + series(
            records, lambda r: r.traffic.received
        )
        late = series(records, lambda r: r.allocation.churn)[len(records) // 2 :]
        return cls(
            final_local_acc=last(lambda r: r.evaluation.local_acc),
            best_local_acc=best(lambda r: r.evaluation.local_acc),
            final_global_acc=last(lambda r: r.evaluation.global_acc),
            best_global_acc=best(lambda r: r.evaluation.global_acc),
            load_cv=mean(series(records, lambda r: r.loads.clients_cv)),
            load_var=mean(series(records, lambda r: r.loads.clients_var)),
            cum_load_cv=last(lambda r: r.loads.cumulative_clients_cv),
            samples_cv=mean(series(records, lambda r: r.loads.samples_cv)),
            cum_samples_cv=last(lambda r: r.loads.cumulative_samples_cv),
            mb_per_round=mean(traffic) / 1e6,
            wall_s=float(np.nansum(series(records, lambda r: r.timing.round_s))),
            best_trained_acc=best(lambda r: r.training.trained.local_acc),
            purity10=at_round(lambda r: r.allocation.purity, 10),
            final_purity=last(lambda r: r.allocation.purity),
            final_nmi=last(lambda r: r.allocation.nmi),
            churn_late=mean(late),
        )

    def columns(self) -> dict[str, float]:
        """Return the figures by column name (NaN: not measured)."""
        return asdict(self)

    def to_json(self) -> dict[str, float | None]:
        """Return the figures for ``summary.json`` (null: not measured; JSON has no NaN)."""
        return {k: None if math.isnan(v) else v for k, v in self.columns().items()}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RunSummary:
        """Read the figures of a ``summary.json`` (other entries are ignored).

        A summary written before the figures had one name each has three under
        other names (:data:`EARLIER_NAMES`); they are read as their columns.
        """
        named = {EARLIER_NAMES.get(k, k): v for k, v in data.items()}
        return cls(
            **{
                f.name: math.nan if named.get(f.name) is None else float(named[f.name])
                for f in fields(cls)
                if f.name in named
            }
        )


# summary.json's earlier names of three columns.
EARLIER_NAMES = {
    "mean_load_clients_cv": "load_cv",
    "cum_load_clients_cv": "cum_load_cv",
    "cum_load_samples_cv": "cum_samples_cv",
}


# (column, what it means) of the report's table, in order
COLUMNS: list[tuple[str, str]] = [(f.name, f.metadata["meaning"]) for f in fields(RunSummary)]


def headline(record: RoundRecord, num_rounds: int) -> str:
    """Return the one-line summary of a finished round record, for the server log."""

    def accuracy(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.4f}"

    evaluation, loads, allocation = record.evaluation, record.loads, record.allocation
    purity = allocation.purity
    structure = f" | purity {purity:.2f}" if purity is not None else ""
    # Clients left out by the backoff rule (flexmoe_core.backoff), if any.
    benched = record.participation.benched or {}
    left_out = f" | left out: {', '.join(f'client {k}' for k in benched)}" if benched else ""
    train_loss = record.training.loss
    return (
        f"[round {record.round}/{num_rounds}] local acc {accuracy(evaluation.local_acc)} "
        f"(trained {accuracy(record.training.trained.local_acc)}) | global acc "
        f"{accuracy(evaluation.global_acc)} | "
        f"train loss {float('nan') if train_loss is None else train_loss:.3f} | expert load "
        f"{loads.clients} (CV {loads.clients_cv:.3f}, cumulative CV "
        f"{loads.cumulative_clients_cv:.3f}) | samples CV {loads.samples_cv:.3f} | "
        f"churn {allocation.churn or 0.0:.2f}{structure} | "
        f"alloc {1000 * record.timing.allocation_s:.1f} ms | {record.timing.round_s:.1f} s"
        f"{left_out}"
    )
