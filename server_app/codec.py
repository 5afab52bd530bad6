"""Flower messages to and from the round state's plain types (client keys, arrays)."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp.strategy import Result

from flexmoe_core import protocol as proto
from flexmoe_core.records import RoundRecord
from flexmoe_core.reply_gate import EvaluationCaps, judge_reply
from flexmoe_core.round_io import ClientReply, RoundPlan

# Flower's error code of the replies the SuperLink makes for a message whose node
# stopped sending heartbeats (flwr.common.constant.ErrorCode.NODE_UNAVAILABLE).
NODE_UNAVAILABLE = 5

# Flower wraps a ClientApp's exception as "<class 'X'>:<'message'>"; in simulation
# the message carries Ray's traceback and ends with "... Message: <the error>".
_WRAPPED_REASON = re.compile(r"^<class '([^']*)'>:<'(.*)'>$", re.DOTALL)
_CLIENTAPP_MESSAGE = "ClientAppException occurred. Message: "
_ANSI_CODES = re.compile(r"\x1b\[[0-9;]*m")


def error_reason(reason: str) -> str:
    """Return a client error's reason on one line, without Flower's and Ray's wrapping."""
    text = _ANSI_CODES.sub("", reason).strip()
    if match := _WRAPPED_REASON.match(text):
        kind, message = match.groups()
        if _CLIENTAPP_MESSAGE in message:
            text = message.rsplit(_CLIENTAPP_MESSAGE, 1)[1]
        else:
            text = f"{kind.rsplit('.', 1)[-1]}: {message}"
    return " ".join(text.split())


def to_array_record(arrays: Mapping[str, np.ndarray | Array]) -> ArrayRecord:
    """Wrap arrays into an ArrayRecord; Flower Arrays are shared, not copied.

    The messages of a round share the Arrays of the arrays they have in common:
    serialised once, and pushed once by Flower (objects are stored by content id).
    """
    record = ArrayRecord()
    for name, value in arrays.items():
        record[name] = value if isinstance(value, Array) else Array(value)
    return record


def to_numpy(array: Array) -> np.ndarray:
    """Return an Array's values; NumPy arrays are read past their header, not parsed.

    Array.numpy() parses the ``.npy`` header of every array (about 50 us each, most of
    a large federation's reply decoding); the header's dtype and shape are also the
    Array's own fields, so the values are the last ``nbytes`` of the data.

    Raises
    ------
    ValueError
        If the data is shorter than its dtype and shape say.
    """
    if array.stype != "numpy.ndarray":
        return np.asarray(array.numpy())
    data, dtype = array.data, np.dtype(array.dtype)
    size = int(np.prod(array.shape, dtype=np.int64)) * dtype.itemsize
    # .npy: magic, version (2 bytes), header length (2 bytes in v1, 4 after), header.
    major = data[6] if data[:6] == b"\x93NUMPY" and len(data) > 12 else 0
    start = 10 if major == 1 else 12
    length = int.from_bytes(data[8:start], "little") if major else -1
    if start + length + size != len(data):
        raise ValueError(f"array data of {len(data)} bytes; its dtype and shape need {size}")
    header = data[: start + length]
    order = "F" if b"'fortran_order': True" in header else "C"
    values = np.frombuffer(array.data, dtype=dtype, offset=len(header))
    return values.reshape(array.shape, order=order).copy(order="K")  # writable, as numpy()


def record_bytes(record: ArrayRecord) -> int:
    """Return the bytes Flower sends for an ArrayRecord: its serialised arrays."""
    return int(sum(len(array.data) for array in record.values() if isinstance(array, Array)))


class Encoder:
    """Builds one round's messages, serialising each global array once for all nodes."""

    def __init__(self, plan: RoundPlan, run_config: str) -> None:
        self.plan, self.run_config = plan, run_config
        self._arrays: dict[str, Array] = {}

    def _record(self, key: int) -> ArrayRecord:
        for name, value in self.plan.arrays[key].items():
            if name not in self._arrays:
                self._arrays[name] = Array(value)
        return to_array_record({n: self._arrays[n] for n in self.plan.arrays[key]})

    def message(self, key: int, node: int) -> tuple[Message, int]:
        """Return the message for client ``key`` at ``node``, and its array bytes."""
        arrays = self._record(key)
        config = {
            proto.ROUND: self.plan.round,
            proto.EXPERTS: [int(e) for e in self.plan.experts[key]],
            proto.RUN_CONFIG: self.run_config,
            proto.SEED: self.plan.seed,
            proto.EVALUATE: self.plan.evaluates is not None,
            proto.GLOBAL_TEST: self.plan.global_test,
        }
        kind = MessageType.TRAIN if self.plan.trains else MessageType.EVALUATE
        content = RecordDict({proto.ARRAYS: arrays, proto.CONFIG: ConfigRecord(config)})
        return Message(content, dst_node_id=node, message_type=kind), record_bytes(arrays)


def query_message(node: int, run_config: str) -> Message:
    """Return the capacity query for ``node``."""
    content = RecordDict({proto.CONFIG: ConfigRecord({proto.RUN_CONFIG: run_config})})
    return Message(content, dst_node_id=node, message_type=MessageType.QUERY)


def _problem(err: Exception) -> str:
    """Say what a decoding error found: a missing record or field, or a bad value."""
    return f"no {err} in the reply" if isinstance(err, KeyError) else str(err)


def decode_info(reply: Message) -> proto.NodeInfo:
    """Return what a reply's ``info`` record says (client key, capacity, counts).

    Raises
    ------
    ValueError
        If the reply carries no readable info.
    """
    try:
        return proto.decode_info(reply.content[proto.INFO])
    except proto.DECODE_ERRORS as err:
        raise ValueError(f"malformed capacity answer: {_problem(err)}") from None


def decode_reply(
    reply: Message,
    key: int,
    plan: RoundPlan,
    global_arrays: Mapping[str, np.ndarray],
    caps: EvaluationCaps,
) -> ClientReply:
    """Return a train (or evaluation-only) reply as the round state reads it, judged.

    The judging is the core's (:func:`flexmoe_core.reply_gate.judge_reply`): sizes
    before decoding, then values and fields. Raises ``ValueError``
    (:class:`~flexmoe_core.reply_gate.ReplyRejectedError`) with every reason found.
    """
    return judge_reply(reply.content, key, plan, global_arrays, caps, to_numpy)


def result_from_records(arrays: ArrayRecord, records: Iterable[RoundRecord]) -> Result:
    """Return Flower's :class:`Result`: final arrays and per-round metrics of the records."""
    result = Result(arrays=arrays)
    for record in records:
        if train := record.train_scores():
            result.train_metrics_clientapp[record.round] = MetricRecord(train)
        if scores := record.evaluation_scores():
            result.evaluate_metrics_clientapp[record.round] = MetricRecord(scores)
    return result
