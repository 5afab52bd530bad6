"""The content of the messages between server and clients, as plain data.

Flower records are mappings; these helpers read and write their values without
importing Flower, so the format is defined (and tested) in one place.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np

from .fitness import ExpertFeedback

# RecordDict keys
ARRAYS = "arrays"  # ArrayRecord: backbone + the node's experts
CONFIG = "config"  # ConfigRecord: round, expert ids, run configuration
METRICS = "metrics"  # MetricRecord: num-examples, training loss and accuracy
FEEDBACK = "feedback"  # MetricRecord: per-expert usage / accuracy / loss
EVALUATION = "evaluation"  # MetricRecord: <split>-num/-loss/-acc of the received model
# MetricRecord: per-expert accuracy / loss of the received experts on the local held-out
# split (fitness.source=heldout), as FEEDBACK is encoded
HELDOUT_FEEDBACK = "heldout-feedback"
# MetricRecord: local-num/-loss/-acc of the model the client has just trained
TRAINED_EVALUATION = "trained-evaluation"
INFO = "info"  # ConfigRecord: capacity, client key (and partitions); query and train replies
TIMINGS = "timings"  # MetricRecord: seconds the ClientApp spent per phase (train replies)
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
MEMORY_MB = "memory-mb"  # the memory budget (MiB) a capacity=auto node derived K from

SPLITS = ("local", "global")
# Phases of a train call the ClientApp times, in seconds: its data, building the model,
# reading the received arrays into it, evaluating it, inside train_step, the rest of
# local training (batching, augmentation, feedback statistics), packing the reply, and
# the whole handler. Diagnostics only: the server sums them per round, never trusts them.
CLIENT_PHASES = (
    "data",
    "model",
    "decode",
    "evaluate",
    "train_step",
    "train_other",
    "encode",
    "total",
)
TRAIN_LOSS = "train-loss"
TRAIN_ACC = "train-acc"

# Largest example count taken from a reply: counts above it lose integer precision
# as floats (an honest client holds far fewer).
MAX_EXAMPLES = 2**53
# Largest memory budget taken from a reply, in MiB (1 PiB): far above any device.
MAX_MEMORY_MB = 2.0**30
# Errors a malformed reply field can raise while it is read (a missing key, a value
# of the wrong type, a string, an infinite float turned into an int, a record of the
# wrong kind): each is turned into a named failure of the node, never a crash.
DECODE_ERRORS = (KeyError, TypeError, ValueError, OverflowError, AttributeError)


# ------------------------------------------------------------- single values
def number(value: Any, name: str) -> float:
    """Return ``value`` as a float if it is a real number (not a bool, string or list).

    Raises
    ------
    ValueError
        If it is not a real number.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name}={value!r} is not a number")
    try:
        return float(value)
    except OverflowError:
        raise ValueError(f"{name}={value!r} is out of range") from None


def count(value: Any, name: str, low: int = 0, high: int = MAX_EXAMPLES) -> int:
    """Return ``value`` as an int if it is a whole number in ``[low, high]``.

    Raises
    ------
    ValueError
        If it is not a number, not finite, not whole, or out of range.
    """
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        whole = int(value)
    else:
        x = number(value, name)
        if not math.isfinite(x) or not x.is_integer():
            raise ValueError(f"{name}={value!r} is not a whole number")
        whole = int(x)
    if not low <= whole <= high:
        raise ValueError(f"{name}={value!r} is not in [{low}, {high}]")
    return whole


def score(value: Any, name: str, accuracy: bool) -> float:
    """Return a loss (finite, >= 0) or an accuracy (in [0, 1]).

    Raises
    ------
    ValueError
        If the value is not a number or out of its range (NaN included).
    """
    x = number(value, name)
    if accuracy and not 0.0 <= x <= 1.0:
        raise ValueError(f"{name}={value!r} is not an accuracy in [0, 1]")
    if not accuracy and not (math.isfinite(x) and x >= 0.0):
        raise ValueError(f"{name}={value!r} is not a finite loss >= 0")
    return x


# --------------------------------------------------------------- node info
class NodeInfo(NamedTuple):
    """What a node says about itself (query reply; capacity also in train replies)."""

    key: int  # the client key it claims
    capacity: object  # as sent: checked by the roster against E
    num_partitions: int | None  # simulation: the partition count of its node config
    num_examples: int | None  # its training examples (query reply), if declared
    memory_mb: float | None = None  # capacity=auto: the budget K was derived from


def memory_budget(value: Any) -> float:
    """Return a reported memory budget (MiB): a finite number in (0, MAX_MEMORY_MB].

    Raises
    ------
    ValueError
        If it is not a number, not finite, or out of range.
    """
    x = number(value, MEMORY_MB)
    if not (math.isfinite(x) and 0.0 < x <= MAX_MEMORY_MB):
        raise ValueError(f"{MEMORY_MB}={value!r} is not a budget in (0, {MAX_MEMORY_MB:.0f}] MiB")
    return x


def decode_info(record: Mapping[str, Any]) -> NodeInfo:
    """Parse an ``info`` record.

    Raises
    ------
    ValueError
        If the client key is missing or not a whole number >= 0, a partition count
        or example count is present but not a whole number >= 1, or a memory budget is
        present but not a finite number of MiB in (0, 2^30].
    """
    try:
        key = count(record[CLIENT_KEY], CLIENT_KEY, high=2**64)
        capacity = record[CAPACITY]
    except KeyError as err:
        raise ValueError(f"info lacks {err}") from None
    partitions, examples = record.get(NUM_PARTITIONS), record.get(NUM_EXAMPLES)
    memory = record.get(MEMORY_MB)
    return NodeInfo(
        key,
        capacity,
        None if partitions is None else count(partitions, NUM_PARTITIONS, low=1),
        None if examples is None else count(examples, NUM_EXAMPLES, low=1),
        None if memory is None else memory_budget(memory),
    )


def decode_train_metrics(record: Mapping[str, Any]) -> tuple[int, float, float]:
    """Return (examples, training loss, training accuracy) of a train reply's metrics.

    Raises
    ------
    ValueError
        If a value is missing, not a number, or out of range: examples must be a whole
        number in [1, 2^53] (how much the count may weigh is the aggregation's bound,
        :func:`flexmoe_core.aggregation.bounded_counts`).
    """
    try:
        return (
            count(record[NUM_EXAMPLES], NUM_EXAMPLES, low=1),
            score(record[TRAIN_LOSS], TRAIN_LOSS, accuracy=False),
            score(record[TRAIN_ACC], TRAIN_ACC, accuracy=True),
        )
    except KeyError as err:
        raise ValueError(f"metrics lack {err}") from None


def decode_timings(record: Mapping[str, Any] | None) -> dict[str, float]:
    """Return the phases of :data:`CLIENT_PHASES` a reply timed, in seconds.

    A missing record, an unknown phase or a value that is not a finite number >= 0 is
    left out, never an error: timings describe the run, they do not steer it.
    """
    if record is None:
        return {}
    timings = {}
    for phase in CLIENT_PHASES:
        value = record.get(phase)
        is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if is_number and math.isfinite(value) and value >= 0:
            timings[phase] = float(value)
    return timings


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


def decode_feedback(
    record: Mapping[str, Any], limit: int | None = None
) -> dict[int, ExpertFeedback]:
    """Parse feedback written by :func:`encode_feedback` (at most ``limit`` experts).

    Raises
    ------
    ValueError
        If a list is missing, longer than ``limit``, the lists differ in length, or a
        value is not finite or out of range.
    """
    try:
        values = [record[key] for key in ("experts", "usage", "accuracy", "loss")]
        if limit is not None and any(len(v) > limit for v in values):
            raise ValueError(f"feedback for more than the {limit} experts held")
        columns = [list(v) for v in values]
    except KeyError as err:
        raise ValueError(f"feedback lacks {err}") from None
    except TypeError:
        raise ValueError("feedback values are not lists") from None
    if len({len(c) for c in columns}) != 1:
        raise ValueError("feedback lists differ in length")
    experts, usage, accuracy, loss = columns
    if len(set(experts)) != len(experts):
        raise ValueError(f"feedback repeats experts {experts}")
    out = {}
    for e, u, a, ell in zip(experts, usage, accuracy, loss, strict=True):
        values = [number(v, f"feedback of expert {e}") for v in (u, a, ell)]
        if not all(math.isfinite(v) for v in values):
            raise ValueError(f"feedback for expert {e} is not finite")
        if values[0] < 0 or not 0.0 <= values[1] <= 1.0 or values[2] < 0:
            raise ValueError(
                f"feedback for expert {e} is out of range (usage {u} >= 0, accuracy {a} "
                f"in [0, 1], loss {ell} >= 0)"
            )
        out[count(e, "feedback expert", high=2**31)] = ExpertFeedback(*values)
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
        If a split lacks a value, or a value is not a number or out of range (examples
        a whole number >= 0, loss finite >= 0, accuracy in [0, 1]; NaN is refused).
    """
    out = {}
    for split in SPLITS:
        if f"{split}-num" not in record:
            continue
        try:
            out[split] = (
                count(record[f"{split}-num"], f"{split}-num"),
                score(record[f"{split}-loss"], f"{split}-loss", accuracy=False),
                score(record[f"{split}-acc"], f"{split}-acc", accuracy=True),
            )
        except KeyError as err:
            raise ValueError(f"evaluation lacks {err}") from None
    return out
