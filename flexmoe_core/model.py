"""The MoE classifier: a shared trunk, experts that carry the rest of the network, a private gate.

    x ──► trunk (stages before ``moe_from``) ──► feature map ──┬──► expert e ∈ A_c ──► logits
                                                               │     (stages from ``moe_from``:
              global average pool ──► gate (masked to A_c) ────┘      conv stage(s) + head)

Each sample runs through the trunk once, then only through its top-k experts of A_c
(sparse dispatch: gather the routed samples, run the expert, scatter-add its
gate-weighted logits back). A client builds the model with only its assigned experts:
the others are never allocated. The gate always has one logit per global expert (so it
survives changes of assignment between rounds), but only the assigned columns are read,
which masks the rest out of routing and out of the gradient.

Array names: ``backbone.*`` the shared trunk, ``experts.<id>.*`` expert ``id`` (its
BatchNorm statistics included, so they are aggregated with it), ``gate.*`` the private gate.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from .backbones import Stage, network_stages
from .settings import ModelSettings

BACKBONE_PREFIX = "backbone."
EXPERT_PREFIX = "experts."
GATE_PREFIX = "gate."
DISPATCH_MODES = ("sparse", "dense")


@dataclass
class MoEOutput:
    """What one forward pass returns (k = number of assigned experts)."""

    logits: Tensor  # (batch, classes): gate-weighted mix of each sample's top-k experts
    expert_logits: Tensor  # (batch, k, classes): each expert's own logits, for feedback
    #   (sparse dispatch: detached, and 0 where the expert is not routed)
    routed: Tensor  # (batch, k) bool: the expert is among the sample's top-k
    aux_loss: Tensor  # Switch-style load-balancing loss over the assigned experts


class MoEClassifier(nn.Module):
    """Trunk -> top-k routing over the assigned experts -> class logits.

    Parameters
    ----------
    trunk : nn.Module
        The shared stages: maps inputs to a feature map (batch, channels, H, W).
    trunk_channels : int
        Channels of that feature map (the gate's input size).
    expert_stages : sequence of Stage
        The stages every expert is a fresh copy of; the last one returns class logits.
    num_classes, num_experts : int
        Classes, and E, the number of experts in the federation.
    expert_ids : sequence of int
        A_c, the experts this model holds (all E on the server).
    top_k : int
        Experts per sample; capped at ``len(expert_ids)``.
    dispatch : str
        ``sparse`` (each expert runs on its routed samples only) or ``dense`` (every
        assigned expert runs on every sample, then the unchosen are masked: the reference).
    """

    def __init__(
        self,
        trunk: nn.Module,
        trunk_channels: int,
        expert_stages: Sequence[Stage],
        num_classes: int,
        num_experts: int,
        expert_ids: Sequence[int],
        top_k: int,
        dispatch: str = "sparse",
    ) -> None:
        super().__init__()
        ids = sorted(int(e) for e in expert_ids)
        if not ids or len(set(ids)) != len(ids) or ids[0] < 0 or ids[-1] >= num_experts:
            raise ValueError(f"expert_ids={ids} must be distinct ids in [0, {num_experts})")
        if dispatch not in DISPATCH_MODES:
            raise ValueError(f"model.dispatch={dispatch!r}: choose one of {DISPATCH_MODES}")
        self.expert_ids = ids
        self.top_k = min(top_k, len(ids))
        self.num_classes = num_classes
        self.dispatch = dispatch
        # Built in this order (trunk, gate, experts) so that the gate's initial values
        # do not depend on how many experts the client holds.
        self.backbone = trunk
        self.gate = nn.Linear(trunk_channels, num_experts)
        self.experts = nn.ModuleDict(
            {
                str(e): nn.Sequential(OrderedDict((s.name, s.build()) for s in expert_stages))
                for e in ids
            }
        )
        self.register_buffer("assigned", torch.tensor(ids), persistent=False)

    def forward(self, x: Tensor) -> MoEOutput:
        """Route each sample to its top-k assigned experts and mix their logits."""
        features = self.backbone(x)  # (batch, channels, H, W)
        probs, top_i, weights = self.route(features)
        routed = torch.zeros_like(probs, dtype=torch.bool).scatter_(1, top_i, True)  # (batch, k)
        if self.dispatch == "sparse":
            logits, expert_logits = self._sparse(features, top_i, weights)
        else:
            logits, expert_logits = self._dense(features, top_i, weights)
        # Switch Transformer balance loss: k * sum_e (share routed to e) * (mean prob of e).
        share = routed.float().mean(0) / self.top_k  # (k,)
        aux_loss = probs.size(1) * (share * probs.mean(0)).sum()
        return MoEOutput(logits, expert_logits, routed, aux_loss)

    def route(self, features: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Return the gate's routing: probabilities, top-k choices and their weights.

        Probabilities over A_c (batch, k), each sample's top-k (batch, top_k), and
        their weights, renormalised over the chosen.
        """
        pooled = features.mean(dim=(2, 3))  # (batch, channels)
        gate_logits = self.gate(pooled).index_select(1, self.assigned)  # (batch, k): A_c only
        probs = gate_logits.softmax(dim=-1)  # (batch, k)
        top_p, top_i = probs.topk(self.top_k, dim=-1)  # (batch, top_k)
        return probs, top_i, top_p / top_p.sum(dim=-1, keepdim=True)

    def logits(self, x: Tensor) -> Tensor:
        """Return the class logits only, with dense dispatch (the export's forward).

        The same logits as :meth:`forward`'s, without the feedback and balance-loss
        terms training needs, and without data-dependent branches, so one trace
        (TorchScript, ONNX) serves every input.
        """
        features = self.backbone(x)
        _, top_i, weights = self.route(features)
        return self._dense(features, top_i, weights)[0]

    def _sparse(self, features: Tensor, top_i: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
        """Run each expert on its routed samples only: gather, run, scatter-add.

        The (sample, expert) pairs are sorted by expert so that one gather feeds every
        expert a contiguous chunk and one scatter-add mixes their outputs back.
        """
        batch, top_k = top_i.shape
        pair_expert = top_i.reshape(-1)  # (batch * top_k,): pair p is sample p // top_k
        order = pair_expert.argsort(stable=True)  # pairs grouped by expert
        sample, expert_idx = order // top_k, pair_expert[order]  # (pairs,)
        counts = torch.bincount(pair_expert, minlength=len(self.experts)).tolist()  # (k,)
        chunks = features.index_select(0, sample).split(counts)  # k x (n_j, channels, H, W)
        outs = [
            expert(chunk)  # (n_j, classes)
            for expert, chunk in zip(self.experts.values(), chunks, strict=True)
            if len(chunk)  # nothing routed: the expert does not run and gets no gradient
        ]
        out = torch.cat(outs)  # (pairs, classes), in sorted pair order
        weight = weights.reshape(-1)[order].unsqueeze(-1)  # (pairs, 1)
        logits = features.new_zeros(batch, self.num_classes).index_add(0, sample, weight * out)
        # Each expert's own logits, for the per-expert feedback (no gradient needed).
        expert_logits = features.new_zeros(batch, len(self.experts), self.num_classes)
        expert_logits[sample, expert_idx] = out.detach()  # (batch, k, classes), 0 if unrouted
        return logits, expert_logits

    def _dense(self, features: Tensor, top_i: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
        """Run every assigned expert on every sample, then keep the chosen (reference)."""
        expert_logits = torch.stack([e(features) for e in self.experts.values()], 1)  # (b, k, c)
        combine = torch.zeros_like(expert_logits[..., 0]).scatter(1, top_i, weights)  # (b, k)
        logits = (combine.unsqueeze(-1) * expert_logits).sum(dim=1)  # (batch, classes)
        return logits, expert_logits


def split_stages(
    model: ModelSettings, in_channels: int, num_classes: int
) -> tuple[list[Stage], list[Stage]]:
    """Return (trunk stages, expert stages) of ``model``, cut at ``model.moe_from``.

    The schema has checked the cut (``model.moe_from``) for the run's backbone.
    """
    stages = network_stages(
        model.backbone,
        in_channels,
        num_classes,
        int(model.width),  # type: ignore[arg-type]
        model.feature_dim,
        model.pool,
    )
    names = [s.name for s in stages]
    cut = names.index(model.moe_from)
    return stages[:cut], stages[cut:]


def build_model(
    model: ModelSettings,
    input_shape: Sequence[int],
    num_classes: int,
    expert_ids: Sequence[int] | None = None,
) -> MoEClassifier:
    """Build the model of ``model`` holding ``expert_ids`` (default: all experts)."""
    ids = range(model.num_experts) if expert_ids is None else expert_ids
    trunk_stages, expert_stages = split_stages(model, int(input_shape[0]), num_classes)
    trunk = nn.Sequential(OrderedDict((s.name, s.build()) for s in trunk_stages))
    return MoEClassifier(
        trunk,
        trunk_stages[-1].out_channels,
        expert_stages,
        num_classes,
        model.num_experts,
        ids,
        model.top_k,
        model.dispatch,
    )


def shared_state(model: nn.Module) -> dict[str, np.ndarray]:
    """Return trunk and expert tensors (everything but the private gate) as NumPy."""
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


def inherit_gate_rows(model: MoEClassifier, previous: Sequence[int]) -> dict[int, int | None]:
    """Give each newly held expert the gate row of an expert the client let go.

    A gate row of an expert the client did not hold when its gate last trained is
    still at its initial value, while the others grew with training: the new expert
    would get few or no samples. It takes over the row of a dropped expert instead
    (in id order), so it inherits that expert's routing role; when nothing was dropped
    (the capacity grew), the mean of the rows the client kept. Returns new expert ->
    the expert whose row it got (None: the mean).
    """
    previous = [int(e) for e in previous]
    new = [e for e in model.expert_ids if e not in previous]
    dropped = [e for e in previous if e not in model.expert_ids]
    kept = [e for e in previous if e in model.expert_ids]
    sources: dict[int, int | None] = {}
    with torch.no_grad():
        weight, bias = model.gate.weight, model.gate.bias  # (E, channels), (E,)
        for i, expert in enumerate(new):
            if i < len(dropped):
                sources[expert] = dropped[i]
                weight[expert], bias[expert] = weight[dropped[i]], bias[dropped[i]]
            elif kept:
                sources[expert] = None
                weight[expert], bias[expert] = weight[kept].mean(0), bias[kept].mean(0)
    return sources


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
