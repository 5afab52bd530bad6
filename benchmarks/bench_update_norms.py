"""How far honest clients move the model in one round: the basis of the default clip bounds.

Runs the strategy and the real ClientApp in this process (the tests' in-process grid,
no Ray) and records, for every accepted update, the L2 norm of ``update - global`` of
the backbone and of each expert the client held, as a root-mean-square per element
(``norm / sqrt(number of floating-point elements)``, the unit of
``aggregation.max_update_rms``), together with the examples and usage it reported.

Usage (the default digits run, then the CPU CIFAR-10 preset on local files)::

    python benchmarks/bench_update_norms.py
    python benchmarks/bench_update_norms.py --overrides \
        "experiment=cpu_cifar10_dirichlet dataset.path='/data/cifar10/*.tar.gz'"

Prints per-round maxima and the overall maximum and 99th percentile per group, and the
largest reported examples / low median of the round (the ``max_examples_ratio`` unit).

``--one-client`` instead trains one client (partition 0, experts 0..2) for one round
from the initial model, for setups too slow to federate here (the paper's ResNet-18)::

    python benchmarks/bench_update_norms.py --one-client --overrides \
        "experiment=paper_cifar10_dirichlet dataset.path='/data/cifar10/*.tar.gz'"
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--overrides", default="", help="Hydra overrides of the run")
    parser.add_argument("--one-client", action="store_true", help="one client, one round")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="flexmoe-norms-"))
    for var in ("HF_HOME", "MPLCONFIGDIR", "WANDB_DIR"):
        os.environ.setdefault(var, str(scratch / var.lower()))
    os.environ.setdefault("FLEXMOE_CACHE_DIR", str(scratch / "cache"))

    if args.one_client:
        one_client(args.overrides, scratch)
        return
    import run_helpers

    import flexmoe_core.round_state as strategy_module  # where aggregate_bounded() is called
    from flexmoe_core.config import load_settings
    from flexmoe_core.model import split_expert_key

    records: list[dict] = []
    original = strategy_module.aggregate_bounded

    def recording_aggregate(global_arrays, updates, *args, **kwargs):  # type: ignore[no-untyped-def]
        examples = np.array([u.num_examples for u in updates], dtype=float)
        low_median = np.sort(examples)[(len(examples) - 1) // 2] if len(examples) else 1.0
        for update in updates:
            sums: dict[str, list[float]] = {}
            for name, value in update.arrays.items():
                if not np.issubdtype(value.dtype, np.floating):
                    continue
                key = split_expert_key(name)
                group = "backbone" if key is None else "expert"
                group_id = "backbone" if key is None else f"expert{key[0]}"
                delta = value.astype(np.float64) - global_arrays[name]
                entry = sums.setdefault(group_id, [0.0, 0.0, group])
                entry[0] += float((delta**2).sum())
                entry[1] += delta.size
            for group_id, (sq, size, group) in sums.items():
                records.append(
                    {
                        "round": _round[0],
                        "group": group,
                        "l2": np.sqrt(sq),
                        "rms": np.sqrt(sq / size),
                        "ratio": update.num_examples / low_median,
                        "usage_over_examples": max(
                            (fb.usage / update.num_examples for fb in update.feedback.values()),
                            default=0.0,
                        ),
                        "id": group_id,
                    }
                )
        _round[0] += 1
        return original(global_arrays, updates, *args, **kwargs)

    _round = [1]
    strategy_module.aggregate_bounded = recording_aggregate
    overrides = f"{args.overrides} output_root={scratch}/out timeouts.wait_for_clients_s=0"
    cfg = load_settings(overrides)
    grid = run_helpers.make_grid(int(cfg.num_clients))
    start = time.perf_counter()
    strategy = run_helpers.run_strategy(cfg, grid)
    wall = time.perf_counter() - start
    print(
        f"overrides: {args.overrides or '(default run)'}; {cfg.num_rounds} rounds in {wall:.0f} s"
    )
    last = strategy.history[-1].evaluation if strategy.history else None
    local, global_ = (None, None) if last is None else (last.local_acc, last.global_acc)
    print(f"final local acc {local}, global acc {global_}")
    for group in ("backbone", "expert"):
        rows = [r for r in records if r["group"] == group]
        rms = np.array([r["rms"] for r in rows])
        l2 = np.array([r["l2"] for r in rows])
        per_round = [
            max(r["rms"] for r in rows if r["round"] == t)
            for t in sorted({r["round"] for r in rows})
        ]
        print(
            f"{group:8s} update RMS: max {rms.max():.4f}, p99 {np.percentile(rms, 99):.4f}, "
            f"median {np.median(rms):.4f}; L2 max {l2.max():.3f} "
            f"(per-round max: {', '.join(f'{v:.3f}' for v in per_round)})"
        )
    ratios = np.array([r["ratio"] for r in records if r["group"] == "backbone"])
    usage = np.array([r["usage_over_examples"] for r in records if r["group"] == "backbone"])
    print(
        f"examples / round's low median: max {ratios.max():.2f}; "
        f"usage of one expert / examples: max {usage.max():.2f}"
    )


def one_client(overrides: str, scratch: Path) -> None:
    """Train partition 0 for one round from the initial model; print the delta RMS."""
    import torch

    from flexmoe_core.config import load_settings
    from flexmoe_core.data import build_augment, load_client_data
    from flexmoe_core.model import build_model, shared_state, split_expert_key
    from flexmoe_core.training import resolve_device, train_local

    cfg = load_settings(f"{overrides} output_root={scratch}/out")
    data = load_client_data(cfg.dataset, cfg.partition, 0, int(cfg.num_clients), int(cfg.seed))
    torch.manual_seed(int(cfg.seed))
    model = build_model(cfg.model, data.input_shape, data.num_classes, [0, 1, 2])
    before = {name: value.copy() for name, value in shared_state(model).items()}  # views
    start = time.perf_counter()
    train_local(
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
        augment=build_augment(cfg.dataset.preprocess.augment),
    )
    after = shared_state(model)
    sums: dict[str, list[float]] = {}
    for name, value in after.items():
        if np.issubdtype(value.dtype, np.floating):
            key = split_expert_key(name)
            entry = sums.setdefault("backbone" if key is None else f"expert {key[0]}", [0.0, 0])
            entry[0] += float(((value.astype(np.float64) - before[name]) ** 2).sum())
            entry[1] += value.size
    print(
        f"overrides: {overrides}; one client, {len(data.train.y)} samples, "
        f"{cfg.train.local_epochs} epochs in {time.perf_counter() - start:.0f} s"
    )
    for group, (sq, size) in sums.items():
        print(
            f"{group:9s} update RMS {np.sqrt(sq / size):.4f} "
            f"(L2 {np.sqrt(sq):.3f}, {size} elements)"
        )


if __name__ == "__main__":
    main()
