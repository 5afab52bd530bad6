"""The one place a client's reply is judged: every field once, before anything uses it.

A client is untrusted. What it sends reaches the round state only through
:func:`judge_reply`, which reads the reply's records (Flower records are mappings of
plain values and arrays; nothing here imports Flower) in this order:

1. **Size, before decoding.** The arrays must be exactly the ones the client was sent
   (the backbone and its experts), each with the global dtype and shape, and no more
   bytes than those need (:func:`array_problems`). An extra 400 MB array is refused
   by its name and size, without being copied out of the message.
2. **Values.** Finite floats, no negative BatchNorm variance (:func:`value_problems`).
3. **Fields.** Example count, loss, accuracy, per-expert feedback, evaluations, in range
   (:mod:`flexmoe_core.protocol`); the feedback (and held-out feedback) covers exactly
   the experts the client holds.
4. **Counts it cannot have.** An evaluation over more samples than the client can hold
   is counted as that many (:class:`EvaluationCaps`); the claim is kept beside it.

A reply that fails 1-3 is rejected with every reason found; the round goes on without
it, and the strategy names the node in the log.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import protocol as proto
from .aggregation import ClientUpdate
from .data.partition import largest_local_test
from .model import split_expert_key
from .round_io import ClientReply, RoundPlan
from .update_bounds import VARIANCE_SUFFIX

# The .npy header of one array: Flower serialises each array with np.save (a 128-byte
# header for any shape this project uses; 64 KiB is the format's own limit).
NPY_HEADER_BYTES = 65_536


class ReplyRejectedError(ValueError):
    """A reply that cannot be used; the message says every reason found."""


@dataclass(frozen=True)
class EvaluationCaps:
    """The most samples a client can have evaluated, per split (None: no cap).

    ``local``: its local test split, from the training examples it declared
    (:func:`flexmoe_core.data.partition.largest_local_test`); ``global``: the global
    test subset every client evaluates (``evaluate.global_max_samples``).
    """

    local: int | None = None
    global_: int | None = None

    @classmethod
    def for_client(
        cls, declared_examples: int | None, local_test_fraction: float, global_max_samples: int
    ) -> EvaluationCaps:
        """Return the caps of a client that declared ``declared_examples`` training examples."""
        return cls(
            None
            if declared_examples is None
            else largest_local_test(declared_examples, local_test_fraction),
            global_max_samples if global_max_samples > 0 else None,
        )

    def of(self, split: str) -> int | None:
        """Return the cap of ``split``."""
        return self.global_ if split == "global" else self.local


# ------------------------------------------------------------------ arrays
def expected_arrays(
    global_arrays: Mapping[str, np.ndarray], experts: Sequence[int]
) -> dict[str, np.ndarray]:
    """Return the global arrays a holder of ``experts`` sends back (backbone + its experts)."""
    held = {int(e) for e in experts}
    return {
        name: value
        for name, value in global_arrays.items()
        if (key := split_expert_key(name)) is None or key[0] in held
    }


def array_problems(record: Mapping[str, Any], expected: Mapping[str, np.ndarray]) -> list[str]:
    """Say what is wrong with a reply's arrays from their names, dtypes, shapes and sizes.

    Reads only each array's metadata (``dtype``, ``shape``, ``len(data)``; an ndarray's
    ``nbytes``), never its values: an oversized or unexpected array costs nothing more
    than the message did.
    """
    problems: list[str] = []
    if extra := sorted(set(record) - set(expected)):
        experts = sorted({k[0] for n in extra if (k := split_expert_key(n))})
        problems.append(
            f"unexpected arrays {extra[:3]}"
            + (f" (experts {experts} were not assigned)" if experts else "")
        )
    if missing := sorted(set(expected) - set(record)):
        problems.append(f"missing arrays {missing[:3]}")
    for name in sorted(set(expected) & set(record)):
        array, ref = record[name], expected[name]
        try:
            dtype, shape = np.dtype(array.dtype), tuple(int(d) for d in array.shape)
            size = array.nbytes if isinstance(array, np.ndarray) else len(array.data)
        except (AttributeError, TypeError, ValueError):
            problems.append(f"{name}: not an array")
            continue
        if dtype != ref.dtype or shape != ref.shape:
            problems.append(
                f"{name}: got {dtype}{list(shape)}, expected {ref.dtype}{list(ref.shape)}"
            )
        elif size > ref.nbytes + NPY_HEADER_BYTES:
            problems.append(f"{name}: {size} bytes, more than its shape needs ({ref.nbytes})")
    for name in extra:
        data = getattr(record[name], "data", b"")
        if isinstance(data, bytes | bytearray) and len(data) > NPY_HEADER_BYTES:
            problems.append(f"{name}: {len(data) / 2**20:.0f} MiB refused unread")
    return problems


def _is_array(value: Any) -> bool:
    """Whether ``value`` looks like an array (an ndarray or a message's Array)."""
    return all(hasattr(value, attribute) for attribute in ("dtype", "shape"))


def value_problems(arrays: Mapping[str, np.ndarray]) -> list[str]:
    """Say which decoded arrays hold NaN/Inf or a negative BatchNorm variance."""
    problems = []
    for name, value in sorted(arrays.items()):
        if np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all():
            problems.append(f"{name}: contains NaN or Inf")
        elif name.endswith(VARIANCE_SUFFIX) and (value < 0).any():
            problems.append(f"{name}: a negative variance")
    return problems


def check_update(
    update: ClientUpdate, global_arrays: Mapping[str, np.ndarray], assigned: Sequence[int]
) -> list[str]:
    """Return what is wrong with a decoded update (empty if it can be aggregated).

    The checks of :func:`judge_reply` on an update already in NumPy form: the arrays
    of the backbone and exactly the assigned experts, with the global shapes and
    dtypes, finite, no negative variance, and feedback for exactly those experts.
    """
    expected = expected_arrays(global_arrays, assigned)
    problems = array_problems(update.arrays, expected)
    if not problems:
        problems = value_problems(update.arrays)
    problems += expert_problems("feedback", update.feedback, assigned)
    return problems


# ------------------------------------------------------------------ fields
def expert_problems(what: str, feedback: Mapping[int, Any], assigned: Sequence[int]) -> list[str]:
    """Say whether per-expert ``feedback`` covers exactly the ``assigned`` experts."""
    held, measured = {int(e) for e in assigned}, set(feedback)
    problems = []
    if missing := sorted(held - measured):
        problems.append(f"no {what} for experts {missing}")
    if extra := sorted(measured - held):
        problems.append(f"{what} for unassigned experts {extra}")
    return problems


def capped_evaluation(
    evaluation: dict[str, tuple[int, float, float]], caps: EvaluationCaps, prefix: str
) -> tuple[dict[str, tuple[int, float, float]], dict[str, int]]:
    """Return the evaluation with each count lowered to its cap, and the claims cut."""
    counted, claims = {}, {}
    for split, (num, loss, acc) in evaluation.items():
        cap = caps.of(split)
        if cap is not None and num > cap:
            claims[f"{prefix}{split}_num"] = num
            num = cap
        counted[split] = (num, loss, acc)
    return counted, claims


def judge_reply(
    content: Mapping[str, Any],
    key: int,
    plan: RoundPlan,
    global_arrays: Mapping[str, np.ndarray],
    caps: EvaluationCaps,
    decode: Callable[[Any], np.ndarray],
) -> ClientReply:
    """Return a train (or evaluation-only) reply to ``plan``'s message, judged.

    Every record the message asked for must be there: ``arrays``, ``metrics`` and
    ``feedback`` after training, ``evaluation`` with the local split when an
    evaluation was asked, the held-out feedback when the fitness is measured there;
    the evaluation of the trained model is optional. ``decode`` turns one message
    array into NumPy (called only once the sizes are right).

    Raises
    ------
    ReplyRejectedError
        With every reason found.
    """
    trained, evaluated = plan.trains, plan.evaluates is not None
    try:
        evaluation, claims = None, {}
        if evaluated:
            evaluation = proto.decode_evaluation(content[proto.EVALUATION])
            if "local" not in evaluation:
                raise ReplyRejectedError("the evaluation lacks the local split")
            evaluation, claims = capped_evaluation(evaluation, caps, "")
        if not trained:
            return ClientReply(key, evaluation=evaluation, claims=claims)
        experts = plan.experts[key]
        expected = expected_arrays(global_arrays, experts)
        record = content[proto.ARRAYS]
        if not_arrays := sorted(n for n, a in record.items() if not _is_array(a)):
            raise ReplyRejectedError(f"malformed reply: {not_arrays[:3]} are not arrays")
        if problems := array_problems(record, expected):
            raise ReplyRejectedError("; ".join(problems))
        arrays = {name: decode(array) for name, array in record.items()}
        problems = value_problems(arrays)
        num_examples, loss, accuracy = proto.decode_train_metrics(content[proto.METRICS])
        feedback = proto.decode_feedback(content[proto.FEEDBACK], limit=len(experts))
        problems += expert_problems("feedback", feedback, experts)
        heldout = None
        if plan.heldout_feedback:
            heldout = proto.decode_feedback(content[proto.HELDOUT_FEEDBACK], limit=len(experts))
            problems += expert_problems("held-out feedback", heldout, experts)
        if problems:
            raise ReplyRejectedError("; ".join(problems))
        trained_evaluation = None
        if proto.TRAINED_EVALUATION in content:
            trained_evaluation, cut = capped_evaluation(
                proto.decode_evaluation(content[proto.TRAINED_EVALUATION]), caps, "trained_"
            )
            claims.update(cut)
        return ClientReply(
            key,
            ClientUpdate(key, arrays, num_examples, feedback),
            loss,
            accuracy,
            evaluation,
            heldout=heldout,
            trained_evaluation=trained_evaluation,
            timings=proto.decode_timings(content.get(proto.TIMINGS)),
            claims=claims,
        )
    except ReplyRejectedError:
        raise
    except proto.DECODE_ERRORS as err:
        problem = f"no {err} in the reply" if isinstance(err, KeyError) else str(err)
        raise ReplyRejectedError(f"malformed reply: {problem}") from None
