"""The MoE classifier: shared backbone, experts, and a private gate masked to A_c.

A client builds the model with only its assigned experts: the others are never
allocated. The gate always has one logit per global expert (so it survives changes of
assignment between rounds), but only the assigned columns are read, which masks the
rest out of routing and out of the gradient.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from omegaconf import DictConfig
from torch import Tensor, nn

from .backbones import build_backbone

BACKBONE_PREFIX = "backbone."
EXPERT_PREFIX = "experts."
GATE_PREFIX = "gate."


@dataclass
class MoEOutput:
    """What one forward pass returns."""

    logits: Tensor  # (batch, classes): gate-weighted mix of the chosen experts
    expert_logits: Tensor  # (batch, assigned, classes): every assigned expert's output
    routed: Tensor  # (batch, assigned) bool: expert is among the sample's top-k
    aux_loss: Tensor  # Switch-style load-balancing loss over the assigned experts


def make_expert(feature_dim: int, hidden: int, num_classes: int) -> nn.Module:
    """Return one expert: a two-layer MLP from features to class logits."""
    return nn.Sequential(
        nn.Linear(feature_dim, hidden),
        nn.ReLU(inplace=True),
        nn.Linear(hidden, num_classes),
    )


class MoEClassifier(nn.Module):
    """Backbone -> top-k routing over the assigned experts -> class logits.

    Parameters
    ----------
    backbone : nn.Module
        Maps inputs to features of size ``feature_dim``.
    feature_dim, expert_hidden, num_classes : int
        Layer sizes.
    num_experts : int
        E, the number of experts in the federation.
    expert_ids : sequence of int
        A_c, the experts this model holds (all E on the server).
    top_k : int
        Experts per sample; capped at ``len(expert_ids)``.
    """

    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int,
        expert_hidden: int,
        num_classes: int,
        num_experts: int,
        expert_ids: Sequence[int],
        top_k: int,
    ) -> None:
        super().__init__()
        ids = sorted(int(e) for e in expert_ids)
        if not ids or len(set(ids)) != len(ids) or ids[0] < 0 or ids[-1] >= num_experts:
            raise ValueError(f"expert_ids={ids} must be distinct ids in [0, {num_experts})")
        self.expert_ids = ids
        self.top_k = min(top_k, len(ids))
        self.backbone = backbone
        self.gate = nn.Linear(feature_dim, num_experts)
        self.experts = nn.ModuleDict(
            {str(e): make_expert(feature_dim, expert_hidden, num_classes) for e in ids}
        )
        self.register_buffer("assigned", torch.tensor(ids), persistent=False)

    def forward(self, x: Tensor) -> MoEOutput:
        """Route each sample to its top-k assigned experts and mix their logits."""
        features = self.backbone(x)
        gate_logits = self.gate(features).index_select(1, self.assigned)  # mask to A_c
        probs = gate_logits.softmax(dim=-1)
        top_p, top_i = probs.topk(self.top_k, dim=-1)
        weights = top_p / top_p.sum(dim=-1, keepdim=True)  # renormalise over the chosen
        expert_logits = torch.stack([expert(features) for expert in self.experts.values()], 1)
        chosen = expert_logits.gather(1, top_i.unsqueeze(-1).expand(-1, -1, expert_logits.size(-1)))
        logits = (weights.unsqueeze(-1) * chosen).sum(dim=1)
        routed = torch.zeros_like(probs, dtype=torch.bool).scatter_(1, top_i, True)
        # Switch Transformer balance loss: m * sum_i (share routed to i) * (mean prob of i).
        share = routed.float().mean(0) / self.top_k
        aux_loss = probs.size(1) * (share * probs.mean(0)).sum()
        return MoEOutput(logits, expert_logits, routed, aux_loss)


def build_model(
    model_cfg: DictConfig,
    input_shape: Sequence[int],
    num_classes: int,
    expert_ids: Sequence[int] | None = None,
) -> MoEClassifier:
    """Build the model of ``model_cfg`` holding ``expert_ids`` (default: all experts)."""
    ids = range(model_cfg.num_experts) if expert_ids is None else expert_ids
    backbone = build_backbone(
        model_cfg.backbone,
        int(input_shape[0]),
        model_cfg.width,
        model_cfg.feature_dim,
        bool(model_cfg.get("pool", False)),
    )
    return MoEClassifier(
        backbone,
        model_cfg.feature_dim,
        model_cfg.expert_hidden,
        num_classes,
        model_cfg.num_experts,
        ids,
        model_cfg.top_k,
    )


def shared_state(model: nn.Module) -> dict[str, np.ndarray]:
    """Return backbone and expert tensors (everything but the private gate) as NumPy."""
    return {
        name: tensor.detach().cpu().numpy()
        for name, tensor in model.state_dict().items()
        if not name.startswith(GATE_PREFIX)
    }


def gate_state(model: nn.Module) -> dict[str, np.ndarray]:
    """Return the private gate's tensors as NumPy."""
    return {
        name: tensor.detach().cpu().numpy()
        for name, tensor in model.state_dict().items()
        if name.startswith(GATE_PREFIX)
    }


def load_arrays(model: nn.Module, arrays: Mapping[str, np.ndarray]) -> None:
    """Copy NumPy arrays into the model's tensors of the same names (strict on shapes)."""
    state = model.state_dict()
    unknown = sorted(set(arrays) - set(state))
    if unknown:
        raise KeyError(f"Arrays not in the model: {unknown[:5]}")
    for name, value in arrays.items():
        target = state[name]
        if tuple(target.shape) != tuple(value.shape):
            raise ValueError(
                f"Shape mismatch for {name}: model {tuple(target.shape)}, got {value.shape}"
            )
        target.copy_(torch.as_tensor(value))


def expert_key(expert_id: int, param: str) -> str:
    """Return the state-dict name of an expert parameter."""
    return f"{EXPERT_PREFIX}{expert_id}.{param}"


def split_expert_key(name: str) -> tuple[int, str] | None:
    """Return ``(expert_id, param)`` for an expert tensor name, else ``None``."""
    if not name.startswith(EXPERT_PREFIX):
        return None
    expert, param = name[len(EXPERT_PREFIX) :].split(".", 1)
    return int(expert), param


def count_parameters(model: nn.Module) -> int:
    """Return the number of parameters of ``model``."""
    return sum(p.numel() for p in model.parameters())


def cross_entropy_per_expert(expert_logits: Tensor, labels: Tensor) -> Tensor:
    """Return the (batch, assigned) cross-entropy of every expert's own prediction."""
    batch, assigned, classes = expert_logits.shape
    flat = F.cross_entropy(
        expert_logits.reshape(-1, classes),
        labels.repeat_interleave(assigned),
        reduction="none",
    )
    return flat.view(batch, assigned)
