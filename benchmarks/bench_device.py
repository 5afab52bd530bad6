"""What a device needs: training memory per expert (capacity=auto) and the export's size.

Part 1, for each model: the measured training footprint of the trunk (with the gate)
and of one expert at the configured batch size (:mod:`flexmoe_core.footprint`: the
bytes of parameters, gradients, SGD momentum and the activations autograd saves,
counted tensor by tensor in one real training step), and the capacity K that
``capacity=auto`` derives for a 256 MiB and a 1 GiB budget:
K = min(E, floor((budget - trunk) / expert)).

Part 2: the peak resident memory of a ClientApp process (runtime, data and training
together): the device check of ``tests/client_profile_check.py`` (a capacity query
with ``capacity=auto``, then one training round of the default digits run on 300
images) in a process of its own, its ``VmHWM``.

Part 3: the size of what ``flexmoe-export`` writes (TorchScript, the same wrapper and
trace) for a client holding k = 1 and 2 of the 8 experts, against the dense model
(the trunk and all 8 experts), with the parameter bytes behind each.

    python benchmarks/bench_device.py
    python benchmarks/bench_device.py --only digits
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flexmoe_core.config import load_config, load_settings, to_container  # noqa: E402
from flexmoe_core.data.sources import Normaliser  # noqa: E402
from flexmoe_core.export import Deployable  # noqa: E402
from flexmoe_core.footprint import MIB, measure_footprint  # noqa: E402
from flexmoe_core.model import build_model  # noqa: E402

MODELS = {
    "digits": "",  # the default run: the digits CNN
    "cifar10": "experiment=cpu_cifar10_dirichlet",  # the CPU preset's CIFAR-10 CNN
}
BUDGETS_MIB = (256, 1024)
KIB = 1024


def footprint_rows(names: list[str]) -> None:
    print("Training footprint (parameters + gradients + momentum + saved activations)")
    print(f"{'model':30s} {'batch':>5s} {'trunk MiB':>10s} {'expert MiB':>11s} ", end="")
    print(" ".join(f"{f'K@{b} MiB':>10s}" for b in BUDGETS_MIB))
    for name in names:
        cfg = load_settings(MODELS[name])
        e = int(cfg.model.num_experts)
        fp = measure_footprint(
            cfg.model,
            list(cfg.dataset.input_shape),
            int(cfg.dataset.num_classes),
            int(cfg.train.batch_size),
        )
        label = f"{cfg.model.backbone} ({name}, E={e})"
        print(f"{label:30s} {fp.batch_size:5d} {fp.trunk_bytes / MIB:10.2f} ", end="")
        print(f"{fp.expert_bytes / MIB:11.2f} ", end="")
        print(" ".join(f"{fp.capacity(b * MIB, e):10d}" for b in BUDGETS_MIB))


def process_row() -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    from test_deployment import write_digits_folder

    print()
    with tempfile.TemporaryDirectory() as tmp:
        run_config = Path(tmp) / "run-config.json"
        run_config.write_text(json.dumps(to_container(load_config("run_name=bench"))))
        data = write_digits_folder(Path(tmp) / "digits", per_class=30)
        check = ROOT / "tests" / "client_profile_check.py"
        done = subprocess.run(
            [sys.executable, str(check), str(run_config), str(data)],
            env={**os.environ, "PYTHONPATH": str(ROOT), "FLEXMOE_CACHE_DIR": tmp},
            capture_output=True,
            text=True,
            check=True,
        )
    peak = re.search(r"peak resident memory (\d+) MiB", done.stdout)
    assert peak, done.stdout
    print(f"ClientApp process, default digits run, one query + one round: peak {peak[1]} MiB")


def _saved_size(model, cfg, folder: Path, label: str) -> int:
    shape = list(cfg.dataset.input_shape)
    normaliser = Normaliser.from_settings(cfg.dataset.preprocess, int(shape[0]))
    module = Deployable(model, normaliser).eval()
    with torch.no_grad():
        traced = torch.jit.trace(module, torch.zeros(2, *shape))
    path = folder / f"{label}.pt"
    torch.jit.save(traced, str(path))
    return path.stat().st_size


def export_rows(names: list[str]) -> None:
    print()
    print("Export size (TorchScript file; parameter bytes in brackets)")
    print(
        f"{'model':30s} {'k=1 KiB':>18s} {'k=2 KiB':>18s} {'dense KiB':>18s} {'k=1,2/dense':>12s}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            cfg = load_settings(MODELS[name])
            e = int(cfg.model.num_experts)
            shape, classes = list(cfg.dataset.input_shape), int(cfg.dataset.num_classes)
            sizes, params = [], []
            for experts in ([0], [0, 1], list(range(e))):
                torch.manual_seed(0)
                model = build_model(cfg.model, shape, classes, experts)
                sizes.append(_saved_size(model, cfg, Path(tmp), f"{name}-{len(experts)}"))
                params.append(
                    sum(t.numel() * t.element_size() for t in model.state_dict().values())
                )
            cells = [f"{s / KIB:8.1f} ({p / KIB:7.1f})" for s, p in zip(sizes, params, strict=True)]
            ratio = f"{sizes[0] / sizes[2]:.2f}, {sizes[1] / sizes[2]:.2f}"
            label = f"{cfg.model.backbone} ({name}, E={e})"
            print(f"{label:30s} {cells[0]:>18s} {cells[1]:>18s} {cells[2]:>18s} {ratio:>12s}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=sorted(MODELS), help="one model only")
    args = parser.parse_args()
    names = [args.only] if args.only else list(MODELS)
    footprint_rows(names)
    process_row()
    export_rows(names)


if __name__ == "__main__":
    main()
