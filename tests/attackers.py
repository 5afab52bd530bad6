"""An attacking ClientApp: the product's ClientApp, with the replies of one node altered.

The node config key ``attack`` selects what the node does (:data:`ATTACKS`); a node
without it is honest. Every node runs the real ClientApp first, so an attacker trains
like an honest client and then lies about the result; what each node truly measured
before any change is kept in :data:`TRUE_EVALUATIONS`, so a test can compare what the
server reports with the truth.

Used by the tests (``tests/test_attacks.py``) and by ``benchmarks/bench_attacks.py``
(which puts this folder on its path).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Array, Context, Message
from flwr.clientapp import ClientApp

from client_app import app as honest
from flexmoe_core import protocol as proto
from flexmoe_core.model import split_expert_key

HUGE = 2**53  # the largest count a reply may carry at all
BIG_ARRAY_MB = 400


@dataclass(frozen=True)
class Attack:
    """What an attacking node changes in its replies (each a function of the reply)."""

    name: str
    what: str
    on_query: Callable[[Message], None] | None = None
    on_train: Callable[[Message], None] | None = None
    on_evaluate: Callable[[Message], None] | None = None


def _float_arrays(reply: Message, experts_only: bool = False, backbone_only: bool = False):
    arrays = reply.content[proto.ARRAYS]
    for name in list(arrays):
        value = arrays[name].numpy()
        is_expert = split_expert_key(name) is not None
        if value.dtype.kind != "f" or (experts_only and not is_expert):
            continue
        if backbone_only and is_expert:
            continue
        yield arrays, name, value


def _usage_1e9_experts_7(reply: Message) -> None:
    for arrays, name, value in _float_arrays(reply, experts_only=True):
        arrays[name] = Array(np.full_like(value, 7.0))
    feedback = reply.content[proto.FEEDBACK]
    feedback["usage"] = [1e9] * len(list(feedback["usage"]))


def _scaled_1e6(reply: Message) -> None:
    # Scale every float array but the BatchNorm variances (a negative or huge one is
    # refused by name; this attack stays inside what the checks accept).
    for arrays, name, value in _float_arrays(reply):
        if not name.endswith("running_var"):
            arrays[name] = Array((value.astype(np.float64) * 1e6).astype(value.dtype))


def _examples_1e15_constant_backbone(reply: Message) -> None:
    for arrays, name, value in _float_arrays(reply, backbone_only=True):
        if not name.endswith("running_var"):
            arrays[name] = Array(np.full_like(value, 0.5))
    reply.content[proto.METRICS][proto.NUM_EXAMPLES] = 10**15


def _declare_huge(reply: Message) -> None:
    reply.content[proto.INFO][proto.NUM_EXAMPLES] = HUGE


def _evaluation_huge_perfect(reply: Message) -> None:
    for record in (proto.EVALUATION, proto.TRAINED_EVALUATION):
        if record in reply.content:
            evaluation = reply.content[record]
            for split in proto.SPLITS:
                if f"{split}-num" in evaluation:
                    evaluation[f"{split}-num"] = HUGE
                    evaluation[f"{split}-acc"] = 1.0
                    evaluation[f"{split}-loss"] = 0.0


def _train_loss_0_huge(reply: Message) -> None:
    metrics = reply.content[proto.METRICS]
    metrics[proto.NUM_EXAMPLES], metrics[proto.TRAIN_LOSS] = HUGE, 0.0
    metrics[proto.TRAIN_ACC] = 1.0


def _big_extra_array(reply: Message) -> None:
    count = BIG_ARRAY_MB * 2**20 // 4  # read at call time: tests make it smaller
    reply.content[proto.ARRAYS]["extra.weight"] = Array(np.ones(count, dtype=np.float32))


ATTACKS: dict[str, Attack] = {
    a.name: a
    for a in (
        Attack(
            "usage_1e9_experts_7",
            "usage 1e9 for its experts, their weights set to 7.0",
            on_train=_usage_1e9_experts_7,
        ),
        Attack(
            "scaled_1e6", "update scaled 1e6x (BatchNorm variances valid)", on_train=_scaled_1e6
        ),
        Attack(
            "examples_1e15",
            "num-examples 1e15, backbone set to 0.5",
            on_train=_examples_1e15_constant_backbone,
        ),
        Attack(
            "declared_2p53",
            "declares 2^53 examples at the query, then num-examples 1e15, backbone 0.5",
            on_query=_declare_huge,
            on_train=_examples_1e15_constant_backbone,
        ),
        Attack(
            "evaluation_2p53",
            "evaluations over 2^53 samples with accuracy 1.0, loss 0",
            on_train=_evaluation_huge_perfect,
            on_evaluate=_evaluation_huge_perfect,
        ),
        Attack(
            "train_loss_0",
            "train-loss 0, train-acc 1 over 2^53 examples",
            on_train=_train_loss_0_huge,
        ),
    )
}
# Refused by size before it is read; too big for the accuracy table.
SIZE_ATTACKS = {
    "extra_array_400mb": Attack(
        "extra_array_400mb", f"an extra {BIG_ARRAY_MB} MB array", on_train=_big_extra_array
    )
}


@dataclass
class TrueEvaluation:
    """What one node measured, before any attack changed its reply."""

    node: int
    kind: str  # "train" (the received model, before training) or "final"
    round: int
    splits: dict[str, tuple[int, float, float]] = field(default_factory=dict)


TRUE_EVALUATIONS: list[TrueEvaluation] = []


def _attack(context: Context) -> Attack | None:
    name = context.node_config.get("attack")
    if not name:
        return None
    return {**ATTACKS, **SIZE_ATTACKS}[str(name)]


def _keep_truth(reply: Message, context: Context, kind: str, msg: Message) -> None:
    if reply.has_error() or proto.EVALUATION not in reply.content:
        return
    server_round = int(msg.content[proto.CONFIG][proto.ROUND])
    splits = proto.decode_evaluation(reply.content[proto.EVALUATION])
    TRUE_EVALUATIONS.append(TrueEvaluation(int(context.node_id), kind, server_round, splits))


app = ClientApp()


@app.query()
def query(msg: Message, context: Context) -> Message:
    reply = honest.query(msg, context)
    if (attack := _attack(context)) and attack.on_query:
        attack.on_query(reply)
    return reply


@app.train()
def train(msg: Message, context: Context) -> Message:
    reply = honest.train(msg, context)
    _keep_truth(reply, context, "train", msg)
    if (attack := _attack(context)) and attack.on_train:
        attack.on_train(reply)
    return reply


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    reply = honest.evaluate_final(msg, context)
    _keep_truth(reply, context, "final", msg)
    if (attack := _attack(context)) and attack.on_evaluate:
        attack.on_evaluate(reply)
    return reply


def honest_final(excluded: int | None) -> dict[str, float]:
    """Return the nodes' true final accuracy per split (example-weighted), one node left out.

    ``excluded`` is the attacking node's id; compare runs with and without the attack
    over the same nodes (None: every node).
    """
    rows = [t for t in TRUE_EVALUATIONS if t.kind == "final" and t.node != excluded]
    out = {}
    for split in proto.SPLITS:
        pairs = [t.splits[split] for t in rows if split in t.splits and t.splits[split][0] > 0]
        if pairs:
            weights = np.array([n for n, _, _ in pairs], dtype=float)
            out[split] = float(np.average([a for _, _, a in pairs], weights=weights))
    return out
