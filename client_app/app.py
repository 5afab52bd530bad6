"""The ClientApp: train the assigned experts, keep the gate at home, report feedback."""

from __future__ import annotations

import json
from functools import lru_cache

import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from omegaconf import DictConfig, OmegaConf

from flexmoe_core import protocol as proto
from flexmoe_core.capacity import parse_capacity, simulated_capacity
from flexmoe_core.data import ClientData, load_client_data
from flexmoe_core.model import (
    MoEClassifier,
    build_model,
    gate_state,
    load_arrays,
    shared_state,
)
from flexmoe_core.training import evaluate, resolve_device, train_local

app = ClientApp()


@lru_cache(maxsize=4)
def _parse_config(text: str) -> DictConfig:
    return OmegaConf.create(json.loads(text))


def run_config(msg: Message) -> DictConfig:
    """Return the run configuration the server sent with the message."""
    return _parse_config(str(msg.content[proto.CONFIG][proto.RUN_CONFIG]))


def partition(context: Context) -> tuple[int, int]:
    """Return (partition id, number of partitions) from the node config."""
    node = context.node_config
    if "partition-id" not in node or "num-partitions" not in node:
        raise ValueError(
            "node config lacks partition-id/num-partitions: start the SuperNode with "
            "--node-config 'partition-id=0 num-partitions=N capacity=K'"
        )
    return int(node["partition-id"]), int(node["num-partitions"])


def capacity(cfg: DictConfig, context: Context) -> int:
    """Return k_c: the node config's ``capacity`` if set, else the simulation profile."""
    num_experts = int(cfg.model.num_experts)
    if "capacity" in context.node_config:
        return parse_capacity(context.node_config["capacity"], num_experts)
    return simulated_capacity(cfg.capacity, partition(context)[0], num_experts, int(cfg.seed))


def client_data(cfg: DictConfig, context: Context) -> ClientData:
    """Return this node's partition of the configured dataset."""
    partition_id, num_partitions = partition(context)
    return load_client_data(cfg.dataset, cfg.partition, partition_id, num_partitions, int(cfg.seed))


def personal_model(
    cfg: DictConfig, msg: Message, context: Context, data: ClientData
) -> MoEClassifier:
    """Build the model of the assigned experts, with the server's arrays and our own gate."""
    experts = [int(e) for e in msg.content[proto.CONFIG][proto.EXPERTS]]
    torch.manual_seed(int(cfg.seed) * 7_919 + partition(context)[0])  # the gate's first init
    model = build_model(cfg.model, data.input_shape, data.num_classes, experts)
    load_arrays(model, proto.arrays_to_numpy(msg.content[proto.ARRAYS]))
    if proto.GATE in context.state:
        load_arrays(model, proto.arrays_to_numpy(context.state[proto.GATE]))
    return model


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Answer the server's capacity query before round 1."""
    cfg = run_config(msg)
    info = ConfigRecord(
        {proto.CAPACITY: capacity(cfg, context), proto.CLIENT_KEY: partition(context)[0]}
    )
    return Message(RecordDict({proto.INFO: info}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train backbone, assigned experts and gate; send back all but the gate."""
    cfg = run_config(msg)
    data = client_data(cfg, context)
    model = personal_model(cfg, msg, context, data)
    result = train_local(
        model,
        torch.from_numpy(data.train.x),
        torch.from_numpy(data.train.y),
        epochs=int(cfg.train.local_epochs),
        batch_size=int(cfg.train.batch_size),
        lr=float(cfg.train.lr),
        momentum=float(cfg.train.momentum),
        weight_decay=float(cfg.train.weight_decay),
        aux_loss_coef=float(cfg.train.aux_loss_coef),
        device=resolve_device(str(cfg.train.device)),
        seed=int(msg.content[proto.CONFIG][proto.SEED]) + partition(context)[0],
    )
    context.state[proto.GATE] = ArrayRecord(
        array_dict={k: Array(v) for k, v in gate_state(model).items()}
    )
    metrics = MetricRecord(
        {
            proto.NUM_EXAMPLES: result.num_examples,
            "train-loss": result.loss,
            "train-acc": result.accuracy,
        }
    )
    content = RecordDict(
        {
            proto.ARRAYS: ArrayRecord(
                array_dict={k: Array(v) for k, v in shared_state(model).items()}
            ),
            proto.METRICS: metrics,
            proto.FEEDBACK: MetricRecord(proto.encode_feedback(result.feedback)),
        }
    )
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate_personalised(msg: Message, context: Context) -> Message:
    """Evaluate own gate + assigned experts on the local split (and the global test)."""
    cfg = run_config(msg)
    data = client_data(cfg, context)
    model = personal_model(cfg, msg, context, data)
    device = resolve_device(str(cfg.train.device))
    splits = {"local": data.local_test}
    if bool(msg.content[proto.CONFIG].get(proto.GLOBAL_TEST, False)):
        limit = int(cfg.evaluate.global_max_samples)
        test = data.global_test
        splits["global"] = (
            test if limit <= 0 or len(test) <= limit else test.subset(slice(0, limit))
        )
    metrics: dict[str, float | int] = {}
    for name, split in splits.items():
        res = evaluate(model, torch.from_numpy(split.x), torch.from_numpy(split.y), device=device)
        metrics.update(
            {
                f"{name}-num": res.num_examples,
                f"{name}-loss": res.loss,
                f"{name}-acc": res.accuracy,
            }
        )
    return Message(RecordDict({proto.METRICS: MetricRecord(metrics)}), reply_to=msg)
