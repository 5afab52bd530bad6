"""The MoE model: what a client of k experts stores and sends, and sparse vs dense dispatch.

    python benchmarks/bench_model.py                   # parts 1 and 3
    python benchmarks/bench_model.py --run RUN_DIR     # also part 2, from a finished run

Part 1 (no training): parameters and bytes of a client holding k = 1, 2, 4, 8 of
E = 8 experts, as a fraction of the dense model (all E experts), for the default CNN
(8x8 digits), the CPU-preset CNN (32x32 CIFAR-10), and the ResNet-18 paper model with
its two MoE cuts (``model.moe_from=layer4`` and ``layer3``). Parameters count what the
client allocates (trunk + k experts + its private gate); bytes are its per-message
payload (trunk + k experts, BatchNorm statistics included; the gate is never sent).
Goals at k = 2: <= 0.40 of dense for the CNNs, <= 0.35 for ResNet-18.

Part 2 (``--run``): the bytes Flower actually sent and received per client and round,
read from a run's ``metrics.jsonl`` (``bytes_sent_per_client``,
``bytes_received_per_client``, ``assignment`` for each client's k), against the dense
model's payload built from the run's ``config.yaml``.

Part 3: one training step (``training.train_step``: forward, backward, SGD step, as
local training runs it) with top-2 routing over k = 4 assigned experts, sparse dispatch
(each expert on its routed samples) against dense dispatch (every expert on every
sample, then masked), on the same batch (of the preset's ``train.batch_size``: 32 for
the CNNs, 64 for the paper presets), same weights.
Routing is balanced (each expert gets half of the batch, which the balance loss pushes
a trained gate towards). The two are timed alternately, after warm-up steps; the ratio
is the median over repeats of sparse / dense. Goal: <= 0.65. Alongside, where the time
goes: one expert's forward and backward on the whole batch and on half of it, and the
floor a dispatch that cost nothing would reach with those kernels, (dense - 4 full + 4
half) / dense, which separates what the dispatch costs from what the kernels allow.
Second goal: sparse / dense within 0.05 of that floor (the dispatch's own cost at most
5 % of the dense step).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flexmoe_core.config import load_settings, settings_from_config  # noqa: E402
from flexmoe_core.metrics import nbytes  # noqa: E402
from flexmoe_core.model import (  # noqa: E402
    build_model,
    count_parameters,
    shared_state,
)
from flexmoe_core.training import make_optimizer, train_step  # noqa: E402

# The sparse step's second goal: its ratio to dense at most the floor plus this.
FLOOR_SLACK = 0.05
# (label, Hydra overrides, input shape, goal for k = 2 as a share of dense)
MODELS = (
    ("cnn (digits 8x8, default)", "model=cnn", (1, 8, 8), 0.40),
    ("cnn (cpu presets, 32x32)", "experiment=cpu_cifar10_dirichlet", (3, 32, 32), 0.40),
    (
        "resnet18 moe_from=layer4",
        "experiment=paper_cifar10_dirichlet model.moe_from=layer4",
        (3, 32, 32),
        0.35,
    ),
    (
        "resnet18 moe_from=layer3",
        "experiment=paper_cifar10_dirichlet",
        (3, 32, 32),
        0.35,
    ),
)
NUM_CLASSES = 10


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def model_sizes() -> None:
    print("## Part 1: a client holding k of E = 8 experts, against the dense model (all 8)")
    for label, overrides, shape, goal in MODELS:
        cfg = load_settings(overrides)
        dense = build_model(cfg.model, shape, NUM_CLASSES)
        parts = {
            "trunk": count_parameters(dense.backbone),
            "one expert": count_parameters(dense.experts["0"]),
            "gate": count_parameters(dense.gate),
        }
        dense_params, dense_bytes = count_parameters(dense), nbytes(shared_state(dense))
        print(f"\n### {label}: " + ", ".join(f"{k} {v:,}" for k, v in parts.items()))
        print(f"{'k':>2} {'params':>12} {'of dense':>9} {'MB/message':>11} {'of dense':>9}")
        for k in (1, 2, 4, 8):
            client = build_model(cfg.model, shape, NUM_CLASSES, list(range(k)))
            params, sent = count_parameters(client), nbytes(shared_state(client))
            assert params == parts["trunk"] + k * parts["one expert"] + parts["gate"]
            print(
                f"{k:>2} {params:>12,} {params / dense_params:>9.3f} {sent / 1e6:>11.3f} "
                f"{sent / dense_bytes:>9.3f}"
            )
            if k == 2:
                share = max(params / dense_params, sent / dense_bytes)
                goal_line = f"goal k=2 <= {goal:.2f} of dense: {share:.3f} {verdict(share <= goal)}"
        print(goal_line)


def bytes_from_run(run_dir: Path) -> None:
    print(f"\n## Part 2: bytes per client and round, from {run_dir / 'metrics.jsonl'}")
    cfg = settings_from_config(OmegaConf.load(run_dir / "config.yaml"))
    shape, classes = tuple(cfg.dataset.input_shape), int(cfg.dataset.num_classes)
    dense_bytes = nbytes(shared_state(build_model(cfg.model, shape, classes)))
    sent, received = defaultdict(list), defaultdict(list)
    rounds = 0
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        rounds += 1
        for client, experts in record["assignment"].items():
            k = len(experts)
            if client in record["bytes_sent_per_client"]:
                sent[k].append(record["bytes_sent_per_client"][client])
            if client in record["bytes_received_per_client"]:
                received[k].append(record["bytes_received_per_client"][client])
    print(f"{rounds} rounds; dense model payload {dense_bytes / 1e6:.3f} MB")
    print(
        f"{'k':>2} {'client-rounds':>13} {'sent MB':>8} {'of dense':>9} {'received MB':>12} "
        f"{'of dense':>9} {'sent/received':>14}"
    )
    for k in sorted(sent):
        down, up = statistics.mean(sent[k]), statistics.mean(received[k] or [float("nan")])
        print(
            f"{k:>2} {len(sent[k]):>13} {down / 1e6:>8.3f} {down / dense_bytes:>9.3f} "
            f"{up / 1e6:>12.3f} {up / dense_bytes:>9.3f} {down / up:>14.2f}"
        )


def step_times(
    overrides: str, shape: tuple[int, ...], batch: int | None, warmup: int, repeats: int
) -> tuple[int, list[tuple[float, float, float, float]]]:
    """Return the batch size and per-repeat seconds of (dense step, sparse step, one expert's
    forward and backward on the whole batch, the same on half of it)."""
    cfg = load_settings(f"{overrides} model.top_k=2")
    batch = batch or int(cfg.train.batch_size)
    torch.manual_seed(0)
    model = build_model(cfg.model, shape, NUM_CLASSES, [0, 1, 2, 3]).train()
    optimizer = make_optimizer(model, lr=1e-3, momentum=0.9)
    x, y = torch.randn(batch, *shape), torch.randint(0, NUM_CLASSES, (batch,))
    # Balanced routing, which the balance loss pushes a trained gate towards: sample b goes to
    # experts b mod 4 and (b + 1) mod 4, so each expert gets half of the batch. (A fresh
    # gate sends almost every sample to the same two experts, which would flatter sparse
    # dispatch.) The offset is added to the gate's logits, so the gate still trains.
    offset = torch.zeros(batch, cfg.model.num_experts)
    rows = torch.arange(batch)
    offset[rows, rows % 4] = offset[rows, (rows + 1) % 4] = 100.0
    model.gate.register_forward_hook(lambda module, inputs, logits: logits + offset)
    assert (model(x).routed.sum(0) == batch // 2).all()
    features = model.backbone(x).detach()  # (batch, channels, H, W): what the experts read

    def step(dispatch: str) -> float:
        model.dispatch = dispatch
        began = time.perf_counter()
        train_step(model, optimizer, x, y, aux_loss_coef=0.01)  # the step local training runs
        return time.perf_counter() - began

    def expert_pass(samples: int) -> float:
        chunk = features[:samples].clone().requires_grad_()  # the trunk wants its gradient
        began = time.perf_counter()
        model.experts["0"](chunk).sum().backward()
        return time.perf_counter() - began

    def repeat() -> tuple[float, float, float, float]:
        return step("dense"), step("sparse"), expert_pass(batch), expert_pass(batch // 2)

    for _ in range(warmup):
        repeat()
    return batch, [repeat() for _ in range(repeats)]


def dispatch_speed(
    batch: int | None, warmup: int, repeats: int, only: str | None, extra: str
) -> None:
    print(
        f"\n## Part 3: training step, top-2 over k = 4 experts, sparse vs dense dispatch "
        f"({torch.get_num_threads()} threads; median of {repeats} alternated repeats "
        f"after {warmup} warm-up steps)" + (f"; models with {extra!r}" if extra else "")
    )
    print(
        "Where the time goes: 'expert' is one expert's forward and backward on the whole\n"
        "batch (ms) and its cost on half the batch as a share of that ('half/full': 0.50 if\n"
        "the kernels scaled with the samples). 'floor' is the ratio a dispatch with no cost\n"
        "of its own would reach with these kernels: (dense - 4 full + 4 half) / dense;\n"
        "'dispatch ms' is what sparse takes beyond that floor (gather, split, scatter-add,\n"
        "and the error of timing an expert on its own: negative is within the noise).\n"
    )
    print(
        f"{'model':>28} {'batch':>5} {'dense ms':>9} {'sparse ms':>10} {'sparse/dense':>13} "
        f"{'expert ms':>10} {'half/full':>10} {'floor':>6} {'dispatch ms':>12}"
    )
    for label, overrides, shape, _ in MODELS:
        if only and only not in label:
            continue
        size, times = step_times(f"{overrides} {extra}", shape, batch, warmup, repeats)
        dense, sparse, full, half = (statistics.median(t[i] for t in times) for i in range(4))
        ratio = statistics.median(t[1] / t[0] for t in times)
        floor = dense - 4 * full + 4 * half
        print(
            f"{label:>28} {size:>5} {1e3 * dense:>9.1f} {1e3 * sparse:>10.1f} {ratio:>13.3f} "
            f"{1e3 * full:>10.2f} {half / full:>10.2f} {floor / dense:>6.2f} "
            f"{1e3 * (sparse - floor):>12.2f}  goal <= 0.65: {verdict(ratio <= 0.65)}; "
            f"goal <= floor + {FLOOR_SLACK}: {verdict(ratio <= floor / dense + FLOOR_SLACK)}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, help="a finished run's folder (metrics.jsonl)")
    parser.add_argument(
        "--batch", type=int, help="batch size in part 3 (default: each preset's train.batch_size)"
    )
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--skip-speed", action="store_true", help="parts 1 and 2 only")
    parser.add_argument("--only", help="part 3 only for models whose label contains this")
    parser.add_argument(
        "--overrides", default="", help="Hydra overrides for the models of part 3 (model.width=32)"
    )
    args = parser.parse_args()
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads")
    model_sizes()
    if args.run is not None:
        bytes_from_run(args.run)
    if not args.skip_speed:
        dispatch_speed(args.batch, args.warmup, args.repeats, args.only, args.overrides)


if __name__ == "__main__":
    main()
