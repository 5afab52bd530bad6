"""Shared test setup: keep every tool's files in a temporary folder, options, fixtures."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

# Flower, Ray, HF datasets, W&B, matplotlib and our cache write under ~ or /tmp unless
# redirected; set before anything imports them.
_SANDBOX = Path(tempfile.mkdtemp(prefix="flexmoe-tests-"))
for _var, _sub in {
    "FLWR_HOME": "flwr",
    "RAY_TMPDIR": "ray",
    "HF_HOME": "hf",
    "HF_DATASETS_CACHE": "hf/datasets",
    "WANDB_DIR": "wandb",
    "MPLCONFIGDIR": "mpl",
    "FLEXMOE_CACHE_DIR": "cache",
}.items():
    os.environ[_var] = str(_SANDBOX / _sub)
    (_SANDBOX / _sub).mkdir(parents=True, exist_ok=True)
os.environ["WANDB_MODE"] = "offline"
os.environ["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-slow", action="store_true", help="also run tests marked slow")
    parser.addoption(
        "--data-dir",
        default=None,
        help="folder laid out like ../shared/datasets (else $FLEXMOE_TEST_DATA)",
    )


def pytest_configure(config: pytest.Config) -> None:
    if data_dir := config.getoption("--data-dir"):
        os.environ["FLEXMOE_TEST_DATA"] = str(Path(data_dir).resolve())


def pytest_unconfigure(config: pytest.Config) -> None:
    shutil.rmtree(_SANDBOX, ignore_errors=True)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow experiment: pass --run-slow to run it")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def sandbox() -> Path:
    """The session's temporary folder that stands in for ~ and /tmp."""
    return _SANDBOX


@pytest.fixture
def tiny_overrides(tmp_path: Path) -> str:
    """Overrides for a fast run: 4 clients, 3 rounds, one local epoch."""
    return (
        f"num_clients=4 num_rounds=3 train.local_epochs=1 evaluate.global_every=3 "
        f"capacity.profile=list capacity.values=[1,2,3,4] output_root={tmp_path}/out"
    )


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One intra-op thread: bit-for-bit comparisons need the same reduction order."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def isolated_data_caches(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Keep the dataset cache, Hugging Face and Matplotlib files out of the home folder."""
    base = tmp_path_factory.getbasetemp() / "home-caches"
    for var, sub in (("FLEXMOE_CACHE_DIR", "flexmoe"), ("HF_HOME", "hf"), ("MPLCONFIGDIR", "mpl")):
        monkeypatch.setenv(var, str(base / sub))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")  # tests never touch the network
