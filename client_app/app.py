"""The ClientApp: train the assigned experts, keep the gate at home, report feedback."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator, Mapping, MutableMapping
from functools import lru_cache

import numpy as np
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

from flexmoe_core import protocol as proto
from flexmoe_core.data import (
    ClientData,
    build_augment,
    evaluation_subset,
    load_client_data,
)
from flexmoe_core.data.local_node import load_node_data
from flexmoe_core.faults import InjectedCrashError, draw_fault
from flexmoe_core.gate_store import GateStore, StoredGate
from flexmoe_core.model import (
    MoEClassifier,
    build_model,
    gate_state,
    inherit_gate_rows,
    load_arrays,
    shared_state,
)
from flexmoe_core.node import NodeSettings
from flexmoe_core.settings import Settings, settings_from_plain
from flexmoe_core.training import (
    evaluate,
    heldout_feedback,
    resolve_device,
    round_lr,
    train_local,
)

app = ClientApp()


@lru_cache(maxsize=4)
def _parse_settings(text: str) -> Settings:
    # The server validated this configuration (config_schema); typing it here still
    # refuses a missing key or a value of the wrong kind (ValueError).
    return settings_from_plain(json.loads(text))


def run_settings(msg: Message) -> Settings:
    """Return the typed settings of the run configuration the server sent."""
    return _parse_settings(str(msg.content[proto.CONFIG][proto.RUN_CONFIG]))


def node(context: Context) -> NodeSettings:
    """Return the node's settings (identity, data location, capacity) from its context."""
    return NodeSettings(int(context.node_id), context.node_config)


def client_data(settings: Settings, context: Context) -> ClientData:
    """Return this node's data: its files at ``data-path``, or a partition of the dataset."""
    here = node(context)
    if "data-path" in here.config:
        return load_node_data(
            settings.dataset,
            settings.partition,
            str(here.config["data-path"]),
            settings.seed,
            here.client_key(),
            data_format=str(here.config.get("data-format") or "") or None,
        )
    partition_id, num_partitions = here.partition()
    return load_client_data(
        settings.dataset, settings.partition, partition_id, num_partitions, settings.seed
    )


# --------------------------------------------------------------- private gate
# Each trained gate is kept as a version tagged with its round (see
# flexmoe_core.gate_store): in context.state, and on disk when the node config sets
# ``state-dir`` or the run sets ``checkpoint.client_dir``, so that a resumed run
# starts every round from the same gate as an uninterrupted one.
_GATE_VERSION = f"{proto.GATE}@"


class ContextGates(MutableMapping[int, Mapping[str, np.ndarray]]):
    """The gate versions in the node's Flower context, by round: the store's memory.

    Storing a version also sets ``context.state[proto.GATE]`` to it: the newest gate,
    for inspection; what training and evaluation load are the versions.
    """

    def __init__(self, context: Context) -> None:
        self.state = context.state

    def _keys(self) -> dict[int, str]:
        return {
            int(key[len(_GATE_VERSION) :]): key
            for key in list(self.state.keys())
            if key.startswith(_GATE_VERSION)
        }

    def __getitem__(self, server_round: int) -> dict[str, np.ndarray]:
        return proto.arrays_to_numpy(self.state[self._keys()[server_round]])

    def __setitem__(self, server_round: int, gate: Mapping[str, np.ndarray]) -> None:
        for key in (f"{_GATE_VERSION}{server_round}", proto.GATE):
            # Separate records: Flower serialises each entry of the state on its own.
            self.state[key] = ArrayRecord(array_dict={k: Array(v) for k, v in gate.items()})

    def __delitem__(self, server_round: int) -> None:
        del self.state[self._keys()[server_round]]

    def __iter__(self) -> Iterator[int]:
        return iter(self._keys())

    def __len__(self) -> int:
        return len(self._keys())


def gate_store(settings: Settings, context: Context) -> GateStore:
    """Return this client's gate versions: in its context, and on disk if configured."""
    directory = GateStore.directory_for(context.node_config, settings, node(context).client_key())
    return GateStore(ContextGates(context), directory)


def load_gate_version(settings: Settings, context: Context, latest_round: int) -> StoredGate | None:
    """Return the newest gate trained in a round ``<= latest_round``, or None."""
    return gate_store(settings, context).load(latest_round)


class PhaseClock:
    """Seconds one ClientApp call spends per phase (:data:`protocol.CLIENT_PHASES`).

    Sent with the train reply, so that a run's metrics say where a round's time goes
    on the clients (``benchmarks/bench_round_time.py`` reads them).
    """

    def __init__(self) -> None:
        self.began = time.perf_counter()
        self.seconds = dict.fromkeys(proto.CLIENT_PHASES, 0.0)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Add the time spent in the block to phase ``name``."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - start

    def record(self) -> MetricRecord:
        """Return the phases, with ``total`` the time since the clock started."""
        self.seconds["total"] = time.perf_counter() - self.began
        return MetricRecord(dict(self.seconds))


def personal_model(
    settings: Settings,
    msg: Message,
    context: Context,
    data: ClientData,
    gate_round: int,
    clock: PhaseClock | None = None,
) -> MoEClassifier:
    """Build the model of the assigned experts, with the server's arrays and our own gate.

    ``gate_round`` is the newest round whose gate may be used: the previous round for
    a train message (training, and the evaluation before it, start from the gate of
    round t-1), the round itself for the evaluation after the last round.
    """
    clock = clock or PhaseClock()
    experts = [int(e) for e in msg.content[proto.CONFIG][proto.EXPERTS]]
    with clock.phase("model"):
        torch.manual_seed(settings.seed * 7_919 + node(context).seed_offset())  # gate's init
        model = build_model(settings.model, data.input_shape, data.num_classes, experts)
    with clock.phase("decode"):
        load_arrays(model, proto.arrays_to_numpy(msg.content[proto.ARRAYS]))
        if (gate := load_gate_version(settings, context, gate_round)) is not None:
            load_arrays(model, gate.arrays)
            inherit = settings.train.new_expert_gate == "inherit"
            if gate.held_experts is not None and inherit:
                inherit_gate_rows(model, gate.held_experts.tolist())
    return model


def evaluate_received(
    settings: Settings, msg: Message, model: MoEClassifier, data: ClientData
) -> MetricRecord:
    """Evaluate the model as received (own gate + assigned experts) on the local split.

    The global test split is added when the server asks for it (``evaluate.global_every``).
    """
    device = resolve_device(settings.train.device)
    splits = {"local": data.local_test}
    if bool(msg.content[proto.CONFIG].get(proto.GLOBAL_TEST, False)):
        limit = settings.evaluate.global_max_samples
        splits["global"] = evaluation_subset(data.global_test, limit, settings.seed)
    results = {}
    for name, split in splits.items():
        res = evaluate(model, torch.from_numpy(split.x), torch.from_numpy(split.y), device=device)
        results[name] = (res.num_examples, res.loss, res.accuracy)
    return MetricRecord(proto.encode_evaluation(results))


def node_info(settings: Settings, context: Context) -> ConfigRecord:
    """Return what the server asks of a node: capacity, client key, partition count.

    The capacity is read anew each time (its ``capacity-file`` included): a node may
    report a new one with any reply. With ``capacity=auto`` the memory budget it was
    derived from goes along.
    """
    here = node(context)
    report = here.capacity_report(settings)
    info: dict[str, int | float] = {
        proto.CAPACITY: report.capacity,
        proto.CLIENT_KEY: here.client_key(),
    }
    if report.memory_mb is not None:
        info[proto.MEMORY_MB] = float(report.memory_mb)
    if "num-partitions" in here.config and "data-path" not in here.config:
        info[proto.NUM_PARTITIONS] = int(here.config["num-partitions"])
    return ConfigRecord(info)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Answer the server's capacity query (before round 1, or when the node appears later).

    The answer declares the node's training examples: the most its example count may
    weigh in an aggregation. Loading the data here also makes a missing or unreadable
    dataset a refusal before round 1, with its reason, not a failure in every round.
    """
    settings = run_settings(msg)
    node(context).check_data_location()
    info = node_info(settings, context)
    info[proto.NUM_EXAMPLES] = len(client_data(settings, context).train)
    return Message(RecordDict({proto.INFO: info}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Evaluate the received model if asked, then train it; send back all but the gate.

    The received model is the previous round's aggregate: evaluating it here, before
    training, saves a second download of the same arrays.
    """
    settings = run_settings(msg)
    server_round = int(msg.content[proto.CONFIG][proto.ROUND])
    key = node(context).client_key()
    # Failure injection for simulations (conf `faults:`): decided by (seed, round,
    # client) alone, so every run with the same seed fails the same way.
    fault = draw_fault(settings.faults, settings.seed, server_round, key)
    if fault.crash:
        raise InjectedCrashError(
            f"injected crash of client {key} in round {server_round} "
            f"(faults.crash_prob={settings.faults.crash_prob})"
        )
    if fault.delay_s > 0:
        time.sleep(fault.delay_s)
    clock = PhaseClock()
    with clock.phase("data"):
        data = client_data(settings, context)
    model = personal_model(settings, msg, context, data, server_round - 1, clock)
    train = settings.train
    device = resolve_device(train.device)
    local_x, local_y = torch.from_numpy(data.local_test.x), torch.from_numpy(data.local_test.y)
    evaluation = heldout = None
    with clock.phase("evaluate"):
        if bool(msg.content[proto.CONFIG].get(proto.EVALUATE, False)):
            evaluation = evaluate_received(settings, msg, model, data)
        if settings.fitness.source == "heldout":
            heldout = heldout_feedback(model, local_x, local_y, device=device)
    training_began = time.perf_counter()
    result = train_local(
        model,
        torch.from_numpy(data.train.x),
        torch.from_numpy(data.train.y),
        epochs=train.local_epochs,
        batch_size=train.batch_size,
        lr=round_lr(train.lr, train.lr_decay, server_round),
        momentum=train.momentum,
        weight_decay=train.weight_decay,
        aux_loss_coef=train.aux_loss_coef,
        device=device,
        seed=int(msg.content[proto.CONFIG][proto.SEED]) + node(context).seed_offset(),
        augment=build_augment(settings.dataset.preprocess.augment),
    )
    clock.seconds["train_step"] += result.step_time_s
    clock.seconds["train_other"] += time.perf_counter() - training_began - result.step_time_s
    with clock.phase("evaluate"):
        trained = evaluate(model, local_x, local_y, device=device)
    with clock.phase("encode"):
        gate_store(settings, context).save(server_round, gate_state(model), model.expert_ids)
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
                proto.INFO: node_info(settings, context),
            }
        )
        if evaluation is not None:
            content[proto.EVALUATION] = evaluation
        if heldout is not None:
            content[proto.HELDOUT_FEEDBACK] = MetricRecord(proto.encode_feedback(heldout))
        content[proto.TRAINED_EVALUATION] = MetricRecord(
            proto.encode_evaluation(
                {"local": (trained.num_examples, trained.loss, trained.accuracy)}
            )
        )
    content[proto.TIMINGS] = clock.record()
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate_final(msg: Message, context: Context) -> Message:
    """After the last round: evaluate the final model with the gate trained in it."""
    settings = run_settings(msg)
    data = client_data(settings, context)
    server_round = int(msg.content[proto.CONFIG][proto.ROUND])
    model = personal_model(settings, msg, context, data, gate_round=server_round)
    evaluation = evaluate_received(settings, msg, model, data)
    return Message(RecordDict({proto.EVALUATION: evaluation}), reply_to=msg)
