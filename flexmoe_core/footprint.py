"""How much memory training needs: the trunk's share and each expert's, measured.

A node that declares ``capacity=auto`` derives its expert capacity K from a memory
budget B (node config ``memory-mb``, else a share of the RAM available now):

    K = min(E, floor((B - trunk) / expert))

``trunk`` and ``expert`` are measured, not estimated from parameter counts: one real
training step (:func:`flexmoe_core.training.train_step`, the optimizer of local
training) runs on a model holding one expert and on one holding two, at the run's
batch size, and every tensor the step keeps alive is counted:

* parameters, their gradients and the optimizer's state (SGD momentum buffers),
  counted from the tensors after the step;
* activations: the tensors autograd saves for the backward pass, counted as they are
  saved (``torch.autograd.graph.saved_tensors_hooks``, each storage once), plus the
  input batch.

Both models use dense dispatch, in which every expert sees the whole batch: with
sparse dispatch an expert sees only its routed samples, but routing may send the
whole batch to one expert, so dense is the bound a device must plan for. The
expert's share is the difference of the two totals, the trunk's (gate included) the
rest of the one-expert total. Not counted: the Python and torch runtime (measure it as
the process's resident memory before training) and the node's dataset in memory.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from .model import build_model
from .settings import ModelSettings
from .training import make_optimizer, train_step

MIB = 2**20
# Share of the available RAM taken as the budget when the node config sets no
# memory-mb: the rest is left to the runtime, the node's data and other processes.
AVAILABLE_SHARE = 0.5


@dataclass(frozen=True)
class Footprint:
    """Bytes training needs: the trunk (with the gate) and one expert, at one batch size."""

    trunk_bytes: int
    expert_bytes: int
    batch_size: int

    def capacity(self, budget_bytes: float, num_experts: int) -> int:
        """Return K: how many experts fit in ``budget_bytes`` next to the trunk (0: none)."""
        room = budget_bytes - self.trunk_bytes
        if room < self.expert_bytes:
            return 0
        return min(num_experts, math.floor(room / self.expert_bytes))


def _tensor_bytes(tensors: Sequence[torch.Tensor]) -> int:
    seen: set[tuple[int, int]] = set()
    total = 0
    for t in tensors:
        storage = t.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes())
        if key not in seen:
            seen.add(key)
            total += storage.nbytes()
    return total


def _step_bytes(
    settings: ModelSettings, input_shape: Sequence[int], num_classes: int, experts: int, batch: int
) -> int:
    """Return the bytes one training step of a model holding ``experts`` experts keeps."""
    # Two experts at least, so that a one-expert model (a baseline) is measured too; the
    # gate's width follows E, a few hundred bytes.
    measured = dataclasses.replace(
        settings, dispatch="dense", num_experts=max(2, settings.num_experts)
    )
    torch.manual_seed(0)
    model = build_model(measured, input_shape, num_classes, list(range(experts)))
    model.train()
    optimizer = make_optimizer(model, lr=0.01, momentum=0.9)
    x = torch.randn(batch, *input_shape)
    y = torch.randint(0, num_classes, (batch,))
    saved: list[torch.Tensor] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        train_step(model, optimizer, x, y, aux_loss_coef=0.01)
    params = [p for p in model.parameters()]
    grads = [p.grad for p in params if p.grad is not None]
    state = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    buffers = list(model.buffers())
    # One count over everything: autograd saves some parameters, counted once.
    return _tensor_bytes([*params, *grads, *state, *buffers, x, *saved])


@lru_cache(maxsize=8)
def _measure(model: ModelSettings, input_shape: tuple[int, ...], num_classes: int, batch: int):
    one = _step_bytes(model, input_shape, num_classes, 1, batch)
    two = _step_bytes(model, input_shape, num_classes, 2, batch)
    return Footprint(trunk_bytes=2 * one - two, expert_bytes=two - one, batch_size=batch)


def measure_footprint(
    model: ModelSettings, input_shape: Sequence[int], num_classes: int, batch_size: int
) -> Footprint:
    """Measure the trunk's and one expert's training memory (see the module docstring).

    Cached per (model, input shape, classes, batch size): a node measures once per run.
    """
    with torch.random.fork_rng():  # the caller's seeds stay as they were
        return _measure(model, tuple(int(s) for s in input_shape), int(num_classes), batch_size)


def available_memory_bytes(meminfo: Path = Path("/proc/meminfo")) -> int:
    """Return the RAM available to new allocations now (Linux ``MemAvailable``).

    Raises
    ------
    ValueError
        If the system does not say (no ``/proc/meminfo``): set ``memory-mb`` then.
    """
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    raise ValueError(
        f"cannot read the available memory from {meminfo}; set memory-mb=<MiB> in the "
        "node config next to capacity=auto"
    )


def memory_budget_bytes(memory_mb: object | None) -> tuple[float, str]:
    """Return (budget in bytes, where it came from) for ``capacity=auto``.

    ``memory_mb`` is the node config's ``memory-mb`` (None: not set, then
    :data:`AVAILABLE_SHARE` of the available RAM).

    Raises
    ------
    ValueError
        If ``memory-mb`` is not a finite number > 0.
    """
    if memory_mb is None:
        available = available_memory_bytes()
        return AVAILABLE_SHARE * available, (
            f"{AVAILABLE_SHARE:.0%} of the {available / MIB:.0f} MiB of RAM available"
        )
    try:
        value = float(memory_mb)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        value = math.nan
    if isinstance(memory_mb, bool) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"memory-mb={memory_mb!r}: set a number of MiB > 0")
    return value * MIB, f"memory-mb={value:g}"
