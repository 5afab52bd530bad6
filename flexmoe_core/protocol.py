"""The content of the messages between server and clients, as plain data.

Flower records are mappings; these helpers read and write their values without
importing Flower, so the format is defined (and tested) in one place.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from .fitness import ExpertFeedback

# RecordDict keys
ARRAYS = "arrays"  # ArrayRecord: backbone + the node's experts
CONFIG = "config"  # ConfigRecord: round, expert ids, run configuration
METRICS = "metrics"  # MetricRecord: num-examples, losses, accuracies
FEEDBACK = "feedback"  # MetricRecord: per-expert usage / accuracy / loss
INFO = "info"  # ConfigRecord: a node's answer to the capacity query
GATE = "gate"  # ArrayRecord kept in the client's context.state, never sent

# ConfigRecord keys
ROUND = "server-round"
EXPERTS = "experts"
RUN_CONFIG = "run-config"
SEED = "seed"
GLOBAL_TEST = "global-test"
CAPACITY = "capacity"
CLIENT_KEY = "client-key"
NUM_EXAMPLES = "num-examples"


def arrays_to_numpy(record: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Return ``{name: ndarray}`` from an ArrayRecord-like mapping of arrays."""
    return {name: np.asarray(array.numpy()) for name, array in record.items()}


def encode_feedback(
    feedback: Mapping[int, ExpertFeedback],
) -> dict[str, list[float] | list[int]]:
    """Return feedback as parallel lists (MetricRecord values)."""
    experts = sorted(feedback)
    return {
        "experts": experts,
        "usage": [float(feedback[e].usage) for e in experts],
        "accuracy": [float(feedback[e].accuracy) for e in experts],
        "loss": [float(feedback[e].loss) for e in experts],
    }


def decode_feedback(record: Mapping[str, Any]) -> dict[int, ExpertFeedback]:
    """Parse feedback written by :func:`encode_feedback`.

    Raises
    ------
    ValueError
        If a list is missing, the lists differ in length, or a value is not finite or
        out of range.
    """
    try:
        columns = [list(record[key]) for key in ("experts", "usage", "accuracy", "loss")]
    except KeyError as err:
        raise ValueError(f"feedback lacks {err}") from None
    if len({len(c) for c in columns}) != 1:
        raise ValueError("feedback lists differ in length")
    experts, usage, accuracy, loss = columns
    if len(set(experts)) != len(experts):
        raise ValueError(f"feedback repeats experts {experts}")
    out = {}
    for e, u, a, ell in zip(experts, usage, accuracy, loss, strict=True):
        if not all(math.isfinite(float(v)) for v in (u, a, ell)):
            raise ValueError(f"feedback for expert {e} is not finite")
        out[int(e)] = ExpertFeedback(float(u), float(a), float(ell))
    return out
