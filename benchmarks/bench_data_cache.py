"""Cold vs warm load of CIFAR-10 from its JPEG archives, through the on-disk cache.

Cold: decode all 60,000 JPEGs and write the uint8 cache. Warm: memory-map the cache,
as every later run and every client process does. Both are measured in this run, in
a fresh temporary cache folder, and printed with their ratio.

    python benchmarks/bench_data_cache.py --data-dir /path/to/datasets
    FLEXMOE_TEST_DATA=/path/to/datasets python benchmarks/bench_data_cache.py

The data folder is laid out like the project's test data: ``cifar10_jpg/`` holding
``cifar10-jpg-{train,test}.tar.gz`` (``<split>/<class>/NNNN.jpg`` members).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flexmoe_core.config import load_settings  # noqa: E402
from flexmoe_core.data import federated, load_client_data, load_raw  # noqa: E402

CLIENT_SNIPPET = """
import sys, time
start = time.perf_counter()
import flwr_datasets.partitioner  # Flower Datasets: heavy to import, once per process
from flexmoe_core.config import load_settings
from flexmoe_core.data import load_client_data
imported = time.perf_counter()
cfg = load_settings(sys.argv[1:])
data = load_client_data(cfg.dataset, cfg.partition, 0, cfg.num_clients, cfg.seed)
print(imported - start, time.perf_counter() - imported)
"""


def _overrides(data_dir: Path, cache_dir: Path, clients: int) -> list[str]:
    return [
        "dataset=cifar10",
        f"dataset.path={data_dir / 'cifar10_jpg'}",
        f"dataset.cache_dir={cache_dir}",
        "partition=dirichlet",
        f"num_clients={clients}",
    ]


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=os.environ.get("FLEXMOE_TEST_DATA"))
    parser.add_argument("--repeats", type=int, default=5, help="warm loads to time")
    parser.add_argument("--clients", type=int, default=10, help="partitions for the client timing")
    args = parser.parse_args()
    if not args.data_dir:
        parser.error("give --data-dir or set FLEXMOE_TEST_DATA")
    data_dir = Path(args.data_dir).resolve()
    if not (data_dir / "cifar10_jpg").is_dir():
        parser.error(f"{data_dir / 'cifar10_jpg'} not found")

    with tempfile.TemporaryDirectory(prefix="flexmoe-bench-cache-") as tmp:
        overrides = _overrides(data_dir, Path(tmp), args.clients)
        cfg = load_settings(overrides)

        def touch_all() -> None:
            raw = load_raw(cfg.dataset)
            # Read every byte, so the warm figure is not just opening a memory map.
            int(raw.train.pixels.sum(dtype="uint64")) + int(raw.test.pixels.sum(dtype="uint64"))

        cold = _timed(touch_all)
        warm = statistics.median(_timed(touch_all) for _ in range(args.repeats))

        def client() -> None:
            federated._raw.cache_clear()
            federated._partitions.cache_clear()
            load_client_data(cfg.dataset, cfg.partition, 0, args.clients, 0)

        client_warm = statistics.median(_timed(client) for _ in range(args.repeats))
        process = subprocess.run(
            [sys.executable, "-c", CLIENT_SNIPPET, *overrides],
            capture_output=True,
            text=True,
            check=True,
            cwd=ROOT,
        )
        import_s, data_s = (float(v) for v in process.stdout.split()[-2:])
        size = sum(f.stat().st_size for f in Path(tmp).rglob("*.npy"))

    print("CIFAR-10 from JPEG archives: 50,000 train + 10,000 test images")
    print(f"  cold load (decode 60,000 JPEGs, write cache): {cold:8.2f} s")
    print(
        f"  warm load (memory-map cache, read all bytes): {warm:8.3f} s  (median of {args.repeats})"
    )
    print(f"  ratio cold / warm:                            {cold / warm:8.0f} x")
    print(
        f"  warm client data (1 of {args.clients} Dirichlet partitions, normalised): "
        f"{client_warm:.3f} s"
    )
    print(
        f"  warm client in a fresh process: {data_s:.2f} s for config + data "
        f"(+ {import_s:.2f} s of imports: torch, datasets, Flower Datasets)"
    )
    print(f"  cache on disk: {size / 2**20:.0f} MiB (uint8)")


if __name__ == "__main__":
    main()
