"""Local training with per-expert feedback, and evaluation of a personalised model."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor

from .fitness import ExpertFeedback
from .model import MoEClassifier, MoEOutput, cross_entropy_per_expert


@dataclass(frozen=True)
class TrainResult:
    """Outcome of local training: totals of the last epoch and per-expert feedback."""

    num_examples: int
    loss: float
    accuracy: float
    feedback: dict[int, ExpertFeedback]
    step_time_s: float = 0.0  # wall time inside train_step, all epochs


@dataclass(frozen=True)
class EvalResult:
    """Loss and accuracy of a model on a split, with the samples routed per expert."""

    num_examples: int
    loss: float
    accuracy: float
    expert_usage: dict[int, int]


def round_lr(lr: float, decay: float, server_round: int) -> float:
    """Return the learning rate of ``server_round``: lr * decay^(round - 1)."""
    return lr * decay ** (server_round - 1)


def resolve_device(spec: str = "auto") -> torch.device:
    """Return CUDA when asked for or available under ``auto``, else the CPU."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"train.device={spec} but no CUDA device is visible here")
    return device


class _ExpertStats:
    """Running sums of routed samples, correct predictions and loss per assigned expert."""

    def __init__(self, num_assigned: int, device: torch.device) -> None:
        self.usage = torch.zeros(num_assigned, device=device)
        self.correct = torch.zeros(num_assigned, device=device)
        self.loss = torch.zeros(num_assigned, device=device)

    def add(self, expert_logits: Tensor, routed: Tensor, labels: Tensor) -> None:
        # An expert's logits count only on the samples routed to it (sparse dispatch
        # leaves zeros elsewhere; dense dispatch computes them but they are masked here).
        mask = routed.float()
        hits = (expert_logits.argmax(-1) == labels[:, None]).float()
        losses = cross_entropy_per_expert(expert_logits, labels)
        self.usage += mask.sum(0)
        self.correct += (hits * mask).sum(0)
        self.loss += (losses * mask).sum(0)

    def feedback(self, expert_ids: list[int]) -> dict[int, ExpertFeedback]:
        usage = self.usage.cpu().tolist()
        correct, loss = self.correct.cpu().tolist(), self.loss.cpu().tolist()
        return {
            e: ExpertFeedback(
                usage=u,
                accuracy=c / u if u > 0 else 0.0,
                loss=max(s / u, 0.0) if u > 0 else 0.0,
            )
            for e, u, c, s in zip(expert_ids, usage, correct, loss, strict=True)
        }


def make_optimizer(
    model: MoEClassifier, lr: float, momentum: float = 0.9, weight_decay: float = 0.0
) -> torch.optim.SGD:
    """Return the SGD optimizer of local training (the benchmarks time the same one).

    Not ``fused=True``: it would save about 0.3 ms a step on the CPU presets' CNN, within
    the noise of a 15 ms step, and its rounding differs from the per-tensor update in the
    last bit, which would shift every figure the README reports.
    """
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)


def train_step(
    model: MoEClassifier,
    optimizer: torch.optim.Optimizer,
    xb: Tensor,
    yb: Tensor,
    aux_loss_coef: float = 0.0,
) -> MoEOutput:
    """Run one SGD step on a batch (forward, loss, backward, update); return the forward output.

    Raises
    ------
    FloatingPointError
        If the loss is NaN or Inf; no weight has been updated then (BatchNorm's
        running statistics have: the caller discards the model).
    """
    out = model(xb)
    loss = F.cross_entropy(out.logits, yb) + aux_loss_coef * out.aux_loss
    if not torch.isfinite(loss):
        raise FloatingPointError(f"training loss became {loss.item()}")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return out


def train_local(
    model: MoEClassifier,
    x: Tensor,
    y: Tensor,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    aux_loss_coef: float = 0.0,
    device: torch.device | str = "cpu",
    seed: int = 0,
    augment: Callable[[Tensor, torch.Generator], Tensor] | None = None,
) -> TrainResult:
    """Train backbone, assigned experts and gate with SGD; return last-epoch feedback.

    Raises
    ------
    FloatingPointError
        If the loss becomes NaN or Inf (lower the learning rate).
    """
    device = torch.device(device)
    model.to(device).train()
    optimizer = make_optimizer(model, lr, momentum, weight_decay)
    generator = torch.Generator().manual_seed(seed)
    n = len(y)
    step_time = 0.0
    for epoch in range(epochs):
        stats = _ExpertStats(len(model.expert_ids), device)
        total_loss, correct = 0.0, 0
        for idx in torch.randperm(n, generator=generator).split(batch_size):
            xb, yb = x[idx], y[idx]
            if augment is not None:
                xb = augment(xb, generator)
            xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
            began = time.perf_counter()
            try:
                out = train_step(model, optimizer, xb, yb, aux_loss_coef)
            except FloatingPointError as error:
                raise FloatingPointError(f"{error} in epoch {epoch}; lower train.lr") from None
            step_time += time.perf_counter() - began
            with torch.no_grad():
                total_loss += F.cross_entropy(out.logits, yb, reduction="sum").item()
                correct += int((out.logits.argmax(-1) == yb).sum())
                stats.add(out.expert_logits, out.routed, yb)
    return TrainResult(
        n,
        total_loss / max(n, 1),
        correct / max(n, 1),
        stats.feedback(model.expert_ids),
        step_time,
    )


def _eval_batches(
    model: MoEClassifier, x: Tensor, y: Tensor, batch_size: int, device: torch.device | str
) -> Iterator[tuple[Tensor, Tensor]]:
    """Put ``model`` in eval mode on ``device``; yield ``(x, y)`` in batches there."""
    model.to(torch.device(device)).eval()
    for start in range(0, len(y), batch_size):
        yield x[start : start + batch_size].to(device), y[start : start + batch_size].to(device)


@torch.no_grad()
def evaluate(
    model: MoEClassifier,
    x: Tensor,
    y: Tensor,
    *,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
) -> EvalResult:
    """Return loss and accuracy of ``model`` (its own gate and experts) on ``(x, y)``."""
    total_loss, correct = 0.0, 0
    usage = torch.zeros(len(model.expert_ids), device=device)
    for xb, yb in _eval_batches(model, x, y, batch_size, device):
        out = model(xb)
        total_loss += F.cross_entropy(out.logits, yb, reduction="sum").item()
        correct += int((out.logits.argmax(-1) == yb).sum())
        usage += out.routed.sum(0)
    n = len(y)
    return EvalResult(
        n,
        total_loss / max(n, 1),
        correct / max(n, 1),
        {e: int(u) for e, u in zip(model.expert_ids, usage.cpu().tolist(), strict=True)},
    )


@torch.no_grad()
def heldout_feedback(
    model: MoEClassifier,
    x: Tensor,
    y: Tensor,
    *,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
) -> dict[int, ExpertFeedback]:
    """Return each held expert's own accuracy and loss on every sample of ``(x, y)``.

    Every expert runs on every sample, whatever the gate would route: the question is
    how well the expert suits this client's data, not how the client's gate uses it
    (a newly assigned expert would otherwise be judged through a gate never trained
    for it). ``usage`` is the number of samples.
    """
    correct = torch.zeros(len(model.expert_ids), device=device)
    loss = torch.zeros(len(model.expert_ids), device=device)
    for xb, yb in _eval_batches(model, x, y, batch_size, device):
        features = model.backbone(xb)  # (batch, channels, H, W)
        logits = torch.stack([e(features) for e in model.experts.values()], 1)  # (b, k, c)
        correct += (logits.argmax(-1) == yb[:, None]).float().sum(0)
        loss += cross_entropy_per_expert(logits, yb).sum(0)
    n = max(len(y), 1)
    return {
        e: ExpertFeedback(usage=float(len(y)), accuracy=c / n, loss=max(s / n, 0.0))
        for e, c, s in zip(model.expert_ids, correct.tolist(), loss.tolist(), strict=True)
    }
