"""The server's client x expert fitness table Q, learned from training feedback."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ExpertFeedback:
    """What a client measured for one of its experts over its last local epoch.

    ``usage`` counts the samples routed to the expert (each sample counts once for
    each of its top-k experts); ``accuracy`` and ``loss`` are those of the expert's own
    prediction on exactly those samples.
    """

    usage: float
    accuracy: float
    loss: float

    def __post_init__(self) -> None:
        values = (self.usage, self.accuracy, self.loss)
        if not all(math.isfinite(v) for v in values):
            raise ValueError(f"Feedback must be finite, got {self}")
        if self.usage < 0 or not 0.0 <= self.accuracy <= 1.0 or self.loss < 0:
            raise ValueError(f"Feedback out of range: {self}")


FITNESS_SOURCES = ("heldout", "train")
COLD_STARTS = ("q0", "mean")


class FitnessTable:
    """Q in R^{clients x E}: an EMA of a per-(client, expert) fitness signal.

    A row is created on first sight of a client id: ``q0`` everywhere
    (``cold_start="q0"``), or each expert's mean over the entries measured so far
    (``cold_start="mean"``; ``q0`` for an expert nobody was measured on). That is the
    row's *start*, to which unmeasured entries decay (:meth:`decay`).

    Parameters
    ----------
    num_experts : int
        E.
    q0 : float
        Start value of an entry with nothing to start from.
    beta : float
        EMA weight of the newest signal: ``Q <- (1 - beta) Q + beta s``.
    signal : {"loss", "accuracy"}
        ``s = exp(-alpha * loss)`` or ``s = accuracy``.
    alpha : float
        Temperature of the loss signal.
    cold_start : {"q0", "mean"}
        A new row's start (see above).
    decay : float
        Share of the way back to its start that an entry not measured in a round moves
        (0: an entry keeps its last value until it is measured again).
    """

    def __init__(
        self,
        num_experts: int,
        q0: float = 1.0,
        beta: float = 0.5,
        signal: str = "loss",
        alpha: float = 1.0,
        cold_start: str = "q0",
        decay: float = 0.0,
    ) -> None:
        # The settings are checked once, by the schema (fitness.* rows).
        self.num_experts = num_experts
        self.q0, self.beta, self.signal, self.alpha = q0, beta, signal, alpha
        self.cold_start, self.decay_rate = cold_start, decay
        self._row_of: dict[int, int] = {}
        self._values = np.empty((0, num_experts))
        self._start = np.empty((0, num_experts))
        self._measured = np.zeros((0, num_experts), dtype=bool)

    def _start_row(self) -> np.ndarray:
        used = len(self._row_of) - 1  # the rows before the one being created
        if self.cold_start == "mean" and used > 0:
            measured = self._measured[:used]
            sums = np.where(measured, self._values[:used], 0.0).sum(axis=0)
            counts = measured.sum(axis=0)
            return np.where(counts > 0, sums / np.maximum(counts, 1), self.q0)
        return np.full(self.num_experts, self.q0)

    def _row(self, client_id: int) -> int:
        if client_id not in self._row_of:
            self._row_of[client_id] = index = len(self._row_of)
            if index >= len(self._values):
                size = max(8, 2 * len(self._values))
                self._values = _grown(self._values, size, self.q0)
                self._start = _grown(self._start, size, self.q0)
                self._measured = _grown(self._measured, size, False)
            self._start[index] = self._values[index] = self._start_row()
        return self._row_of[client_id]

    def rows(self, client_ids: Iterable[int]) -> np.ndarray:
        """Return a copy of Q's rows for ``client_ids`` (in that order)."""
        idx = [self._row(int(c)) for c in client_ids]
        return self._values[idx].copy()

    def score(self, feedback: ExpertFeedback) -> float:
        """Return the fitness signal s of one feedback entry."""
        if self.signal == "accuracy":
            return feedback.accuracy
        return math.exp(-self.alpha * feedback.loss)

    def signals(self, feedback: Mapping[int, ExpertFeedback]) -> dict[int, float]:
        """Return the signal s of every expert the feedback measured (usage > 0)."""
        for expert in feedback:
            if not 0 <= expert < self.num_experts:
                raise ValueError(f"Feedback for unknown expert {expert}")
        return {e: self.score(fb) for e, fb in feedback.items() if fb.usage > 0}

    def update(self, client_id: int, feedback: Mapping[int, ExpertFeedback]) -> None:
        """EMA-update the client's entries of the experts it used (usage > 0)."""
        self.update_signals(client_id, self.signals(feedback))

    def update_signals(self, client_id: int, signals: Mapping[int, float]) -> None:
        """EMA-update the client's entries of the experts in ``signals`` with them."""
        index = self._row(int(client_id))  # may grow the table: look the row up after
        row = self._values[index]
        for expert, signal in signals.items():
            row[expert] = (1.0 - self.beta) * row[expert] + self.beta * signal
            self._measured[index, expert] = True

    def decay(self, client_id: int, measured: Iterable[int]) -> None:
        """Move the client's entries not in ``measured`` toward their start value."""
        if self.decay_rate <= 0:
            return
        index = self._row(int(client_id))
        stale = np.ones(self.num_experts, dtype=bool)
        stale[list(measured)] = False
        row, start = self._values[index], self._start[index]
        row[stale] += self.decay_rate * (start[stale] - row[stale])

    def state(self) -> dict[str, object]:
        """Return the table as plain data (for checkpoints and results)."""
        ids = sorted(self._row_of, key=self._row_of.__getitem__)
        n = len(ids)
        return {
            "client_ids": ids,
            "values": self._values[:n].tolist(),
            "start": self._start[:n].tolist(),
            "measured": self._measured[:n].tolist(),
        }

    def load_state(self, state: Mapping[str, object]) -> None:
        """Restore a table written by :meth:`state` (``start``/``measured`` optional)."""
        ids = [int(c) for c in state["client_ids"]]  # type: ignore[union-attr]
        shape = (len(ids), self.num_experts)
        values = np.asarray(state["values"], dtype=float).reshape(shape)
        self._row_of = {c: i for i, c in enumerate(ids)}
        self._values = values.copy()
        start = state.get("start")
        self._start = (
            np.full(shape, self.q0) if start is None else np.asarray(start, float).reshape(shape)
        )
        measured = state.get("measured")
        self._measured = (
            np.zeros(shape, dtype=bool)
            if measured is None
            else np.asarray(measured, dtype=bool).reshape(shape)
        )


def relative_signals(signals: Mapping[int, Mapping[int, float]]) -> dict[int, dict[int, float]]:
    """Return each client's signals minus the mean signal of the expert's holders.

    ``signals`` maps client -> expert -> s, for one round. With balanced loads the
    allocation does not change when a constant is added to an expert's whole column,
    so what it reads of Q is how a client compares with the expert's other clients;
    a raw level (how well the round's experts fit anyone, which grows with training)
    only decides against entries not measured lately. Centred, a client fits an
    expert better than its co-holders do (> 0) or worse (< 0), and an unmeasured entry
    (start 0) sits in between: clients in the minority of an expert move, those in its
    majority stay. An expert with a single holder gives 0.
    """
    totals: dict[int, list[float]] = {}
    for row in signals.values():
        for expert, value in row.items():
            totals.setdefault(expert, []).append(value)
    means = {e: float(np.mean(v)) for e, v in totals.items()}
    return {client: {e: v - means[e] for e, v in row.items()} for client, row in signals.items()}


def _grown(table: np.ndarray, rows: int, fill: object) -> np.ndarray:
    grown = np.full((rows, table.shape[1]), fill, dtype=table.dtype)
    grown[: len(table)] = table
    return grown
