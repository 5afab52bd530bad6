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


class FitnessTable:
    """Q in R^{clients x E}: an EMA of a per-(client, expert) fitness signal.

    Rows are created on first sight of a client id, filled with ``q0``.

    Parameters
    ----------
    num_experts : int
        E.
    q0 : float
        Initial value of every entry.
    beta : float
        EMA weight of the newest signal: ``Q <- (1 - beta) Q + beta s``.
    signal : {"loss", "accuracy"}
        ``s = exp(-alpha * loss)`` or ``s = accuracy``.
    alpha : float
        Temperature of the loss signal.
    """

    def __init__(
        self,
        num_experts: int,
        q0: float = 1.0,
        beta: float = 0.5,
        signal: str = "loss",
        alpha: float = 1.0,
    ) -> None:
        if signal not in ("loss", "accuracy"):
            raise ValueError(f"signal={signal!r}: choose 'loss' or 'accuracy'")
        if not 0.0 < beta <= 1.0:
            raise ValueError(f"beta={beta}: must be in (0, 1]")
        self.num_experts = num_experts
        self.q0, self.beta, self.signal, self.alpha = q0, beta, signal, alpha
        self._row_of: dict[int, int] = {}
        self._values = np.empty((0, num_experts))

    def _row(self, client_id: int) -> int:
        if client_id not in self._row_of:
            self._row_of[client_id] = len(self._row_of)
            if len(self._row_of) > len(self._values):
                grown = np.full((max(8, 2 * len(self._values)), self.num_experts), self.q0)
                grown[: len(self._values)] = self._values
                self._values = grown
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

    def update(self, client_id: int, feedback: Mapping[int, ExpertFeedback]) -> None:
        """EMA-update the client's entries of the experts it used (usage > 0)."""
        index = self._row(int(client_id))  # may grow the table: look the row up after
        row = self._values[index]
        for expert, fb in feedback.items():
            if not 0 <= expert < self.num_experts:
                raise ValueError(f"Feedback for unknown expert {expert}")
            if fb.usage > 0:
                row[expert] = (1.0 - self.beta) * row[expert] + self.beta * self.score(fb)

    def state(self) -> dict[str, object]:
        """Return the table as plain data (for checkpoints and results)."""
        ids = sorted(self._row_of, key=self._row_of.__getitem__)
        return {"client_ids": ids, "values": self._values[: len(ids)].tolist()}

    def load_state(self, state: Mapping[str, object]) -> None:
        """Restore a table written by :meth:`state`."""
        ids = [int(c) for c in state["client_ids"]]  # type: ignore[union-attr]
        values = np.asarray(state["values"], dtype=float).reshape(len(ids), self.num_experts)
        self._row_of = {c: i for i, c in enumerate(ids)}
        self._values = values.copy()
