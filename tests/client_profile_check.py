"""Run the ClientApp as a SuperNode would, with only the client profile's packages.

``python client_profile_check.py <run-config.json> <data folder> [--block]``: answer a
capacity query (``capacity=auto``) and one train message, then export and predict.
With ``--block``, importing any server-only package raises, so the check fails if
the client path needs one; without it (a fresh venv holding the client profile only),
a missing package fails it the same way.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import json
import sys
import tempfile
from pathlib import Path

# Packages the server, the simulation, sweeps and reports use; a device has none.
SERVER_ONLY = (
    "cvxpy",
    "highspy",
    "ray",
    "matplotlib",
    "wandb",
    "opacus",
    "sklearn",
    "scipy",
    "datasets",
    "flwr_datasets",
    "pyarrow",
    "pandas",
    "hydra",
    "optuna",
    "tomlkit",
)


class _Refused(importlib.abc.Loader):
    def __init__(self, name: str) -> None:
        self.name = name

    def create_module(self, spec):
        raise ImportError(f"the client path imports server-only package {self.name!r}")

    def exec_module(self, module):
        raise ImportError(f"the client path imports server-only package {self.name!r}")


class Blocker(importlib.abc.MetaPathFinder):
    """Make importing a server-only package fail, saying which.

    The spec it returns has no origin: code that only probes whether a package exists
    (``importlib.util.find_spec``, as torch does for its tracing rules) sees nothing to
    load; an ``import`` of it fails.
    """

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in SERVER_ONLY:
            return importlib.machinery.ModuleSpec(name, _Refused(name), origin=None)
        return None


def main() -> int:
    run_config_path, data_path = sys.argv[1], sys.argv[2]
    if "--block" in sys.argv:
        sys.meta_path.insert(0, Blocker())
    from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    import client_app.app as client
    from flexmoe_core import protocol as proto
    from flexmoe_core.model import build_model, shared_state

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    run_config = Path(run_config_path).read_text()
    cfg = json.loads(run_config)
    state_dir = tempfile.mkdtemp()
    node_config = {
        "capacity": "auto",
        "memory-mb": 64,
        "client-id": 7,
        "data-path": data_path,
        "data-format": "imagefolder",
        "state-dir": state_dir,
    }
    context = Context(1, 1001, node_config, RecordDict(), {})
    config = {proto.RUN_CONFIG: run_config}
    query = Message(RecordDict({proto.CONFIG: ConfigRecord(config)}), 1001, "query")
    info = client.query(query, context).content[proto.INFO]
    capacity = int(info[proto.CAPACITY])
    assert 1 <= capacity <= cfg["model"]["num_experts"] and info[proto.MEMORY_MB] == 64.0
    model = build_model(
        client.run_settings(query).model,
        cfg["dataset"]["input_shape"],
        cfg["dataset"]["num_classes"],
    )
    experts = list(range(capacity))
    arrays = {
        k: Array(v)
        for k, v in shared_state(model).items()
        if not k.startswith("experts.") or int(k.split(".")[1]) in experts
    }
    config = {proto.ROUND: 1, proto.EXPERTS: experts, proto.SEED: 0, proto.RUN_CONFIG: run_config}
    content = RecordDict({proto.ARRAYS: ArrayRecord(arrays), proto.CONFIG: ConfigRecord(config)})
    reply = client.train(Message(content, 1001, "train"), context)
    assert reply.content[proto.METRICS][proto.NUM_EXAMPLES] > 0
    loaded = [m for m in ("cvxpy", "ray", "sklearn", "scipy", "matplotlib") if m in sys.modules]
    assert not loaded, loaded
    peak = next(
        int(line.split()[1]) // 1024
        for line in Path("/proc/self/status").read_text().splitlines()
        if line.startswith("VmHWM:")
    )
    print(
        f"client profile ok: capacity {capacity}, trained on "
        f"{reply.content[proto.METRICS][proto.NUM_EXAMPLES]} examples; "
        f"peak resident memory {peak} MiB"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
