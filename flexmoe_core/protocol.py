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
METRICS = "metrics"  # MetricRecord: num-examples, training loss and accuracy
FEEDBACK = "feedback"  # MetricRecord: per-expert usage / accuracy / loss
EVALUATION = "evaluation"  # MetricRecord: <split>-num/-loss/-acc of the received model
INFO = "info"  # ConfigRecord: capacity, client key (and partitions); query and train replies
GATE = "gate"  # ArrayRecord kept in the client's context.state, never sent

# ConfigRecord keys
ROUND = "server-round"
EXPERTS = "experts"
RUN_CONFIG = "run-config"
SEED = "seed"
EVALUATE = "evaluate"  # evaluate the received model (before training, in a train message)
GLOBAL_TEST = "global-test"  # ... also on the dataset's global test split
CAPACITY = "capacity"
CLIENT_KEY = "client-key"
NUM_PARTITIONS = "num-partitions"  # the partition count of a simulated node's node config
NUM_EXAMPLES = "num-examples"

SPLITS = ("local", "global")


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


def encode_evaluation(results: Mapping[str, tuple[int, float, float]]) -> dict[str, float | int]:
    """Return ``{split: (examples, loss, accuracy)}`` as flat MetricRecord values."""
    out: dict[str, float | int] = {}
    for split, (num, loss, accuracy) in results.items():
        out.update({f"{split}-num": int(num), f"{split}-loss": loss, f"{split}-acc": accuracy})
    return out


def decode_evaluation(record: Mapping[str, Any]) -> dict[str, tuple[int, float, float]]:
    """Parse what :func:`encode_evaluation` wrote.

    Raises
    ------
    ValueError
        If a split lacks a value, or a value is not finite or out of range.
    """
    out = {}
    for split in SPLITS:
        if f"{split}-num" not in record:
            continue
        try:
            num = int(record[f"{split}-num"])
            loss, accuracy = float(record[f"{split}-loss"]), float(record[f"{split}-acc"])
        except KeyError as err:
            raise ValueError(f"evaluation lacks {err}") from None
        if num < 0 or not (math.isfinite(loss) and 0.0 <= accuracy <= 1.0):
            raise ValueError(f"evaluation of the {split} split is out of range")
        out[split] = (num, loss, accuracy)
    return out
