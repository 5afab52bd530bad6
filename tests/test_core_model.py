"""The MoE model: experts as sub-networks, masking to A_c, sparse dispatch, feedback."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from run_helpers import as_settings
from torch import nn

from flexmoe_core.backbones import network_stages
from flexmoe_core.config import ConfigError, load_config
from flexmoe_core.model import (
    build_model,
    count_parameters,
    gate_state,
    load_arrays,
    shared_state,
    split_expert_key,
)
from flexmoe_core.training import evaluate, make_optimizer, train_local, train_step

DIGITS = (1, 8, 8)
# Tiny versions of every MoE cut, with an input size each network runs on.
CUTS = [
    ("model=cnn model.width=4 model.feature_dim=8 model.moe_from=block2", DIGITS),
    ("model=cnn model.width=4 model.feature_dim=8 model.moe_from=head", DIGITS),
    ("model=cnn model.width=4 model.feature_dim=8 model.pool=true", (3, 32, 32)),
    ("model=resnet18 model.width=4 model.moe_from=layer4", (3, 16, 16)),
    ("model=resnet18 model.width=4 model.moe_from=layer3", (3, 16, 16)),
]


@pytest.fixture(scope="module")
def cfg():
    return load_config("model.top_k=2")


def make(cfg, experts, seed: int = 0, shape=DIGITS):
    torch.manual_seed(seed)
    return build_model(as_settings(cfg).model, shape, 10, experts)


def params_of(module: nn.Module) -> int:
    return count_parameters(module)


def test_routing_and_gradients_stay_inside_the_assigned_experts(cfg) -> None:
    model = make(cfg, [1, 4, 6])
    x, y = torch.randn(32, *DIGITS), torch.randint(0, 10, (32,))
    out = model(x)
    assert out.routed.shape == (32, 3) and (out.routed.sum(1) == 2).all()
    (nn.functional.cross_entropy(out.logits, y) + out.aux_loss).backward()
    grad = model.gate.weight.grad.abs().sum(1)
    assert (grad[[0, 2, 3, 5, 7]] == 0).all() and (grad[[1, 4, 6]] > 0).all()
    assert set(model.experts) == {"1", "4", "6"}  # experts outside A_c do not exist


def test_top_k_mix_is_renormalised_over_the_chosen_experts(cfg) -> None:
    model = make(cfg, [0, 3, 5]).eval()
    x = torch.randn(5, *DIGITS)
    with torch.no_grad():
        out = model(x)
        h = model.backbone(x)  # (5, channels, 8, 8)
        probs = model.gate(h.mean(dim=(2, 3)))[:, [0, 3, 5]].softmax(-1)
        top_p, top_i = probs.topk(2, -1)
        w = top_p / top_p.sum(-1, keepdim=True)
        experts = [model.experts[str(e)](h) for e in (0, 3, 5)]
        manual = torch.stack(
            [sum(w[b, j] * experts[top_i[b, j]][b] for j in range(2)) for b in range(5)]
        )
    torch.testing.assert_close(out.logits, manual)


def test_top_k_is_capped_by_the_number_of_assigned_experts(cfg) -> None:
    model = make(cfg, [2])
    out = model(torch.randn(4, *DIGITS))
    assert model.top_k == 1 and out.routed.all()
    torch.testing.assert_close(out.logits, out.expert_logits[:, 0])


@pytest.mark.parametrize(("overrides", "shape"), CUTS)
def test_a_client_of_k_experts_allocates_the_trunk_k_experts_and_the_gate(
    overrides: str, shape
) -> None:
    cfg = load_config(overrides)
    # The plain network (no MoE) and the cut, built from the same stages.
    stages = network_stages(
        cfg.model.backbone,
        shape[0],
        10,
        cfg.model.width,
        cfg.model.get("feature_dim", 64),
        bool(cfg.model.get("pool", False)),
    )
    plain = nn.Sequential(*(s.build() for s in stages))
    names = [s.name for s in stages]
    cut = names.index(cfg.model.moe_from)
    trunk = sum(params_of(s.build()) for s in stages[:cut])
    expert = sum(params_of(s.build()) for s in stages[cut:])
    assert trunk + expert == params_of(plain) and expert > trunk
    gate = (stages[cut - 1].out_channels + 1) * cfg.model.num_experts
    for k in (1, 2, 8):
        model = build_model(as_settings(cfg).model, shape, 10, list(range(k)))
        assert {n for n, _ in model.named_children()} == {"backbone", "gate", "experts"}
        assert len(model.experts) == k
        assert count_parameters(model) == trunk + k * expert + gate
        assert params_of(model.backbone) == trunk and params_of(model.gate) == gate
    # array names: trunk stages under backbone.<stage>, expert stages under experts.<id>.<stage>
    arrays = shared_state(build_model(as_settings(cfg).model, shape, 10, [3, 5]))
    assert {n.split(".")[1] for n in arrays if n.startswith("backbone.")} == set(names[:cut])
    assert {split_expert_key(n)[1].split(".")[0] for n in arrays if split_expert_key(n)} == set(
        names[cut:]
    )
    assert {split_expert_key(n)[0] for n in arrays if split_expert_key(n)} == {3, 5}


@pytest.mark.parametrize(("overrides", "shape"), CUTS)
def test_sparse_and_dense_dispatch_agree_on_outputs_and_gradients(overrides: str, shape) -> None:
    # Exact in eval mode. In train mode an expert's BatchNorm normalises over the samples
    # routed to it (sparse) rather than the whole batch (dense), as in any sparse MoE.
    cfg = load_config(overrides)
    torch.manual_seed(1)
    sparse = build_model(as_settings(cfg).model, shape, 10, [0, 2, 5, 7]).eval()
    dense = build_model(as_settings(cfg).model, shape, 10, [0, 2, 5, 7]).eval()
    dense.load_state_dict(sparse.state_dict())
    dense.dispatch = "dense"
    x, y = torch.randn(32, *shape), torch.randint(0, 10, (32,))
    # Random inputs look alike to a fresh trunk: a fixed per-sample offset on the gate's
    # logits spreads them over the experts (the gate still gets its gradient).
    offset = 3 * torch.randn(32, cfg.model.num_experts)
    outs = []
    for model in (sparse, dense):
        model.gate.register_forward_hook(lambda module, inputs, logits: logits + offset)
        out = model(x)
        (nn.functional.cross_entropy(out.logits, y) + 0.1 * out.aux_loss).backward()
        outs.append(out)
    torch.testing.assert_close(outs[0].logits, outs[1].logits)
    assert torch.equal(outs[0].routed, outs[1].routed) and outs[0].routed.any(0).all()
    routed = outs[0].routed
    torch.testing.assert_close(outs[0].expert_logits[routed], outs[1].expert_logits[routed])
    assert (outs[0].expert_logits[~routed] == 0).all()
    grads = {n: p.grad for n, p in dense.named_parameters()}
    for name, param in sparse.named_parameters():
        torch.testing.assert_close(param.grad, grads[name], msg=name)


def test_an_expert_no_sample_is_routed_to_does_not_run_and_gets_no_gradient(cfg) -> None:
    model = make(cfg, [1, 4, 6])
    with torch.no_grad():  # the gate prefers experts 1 and 4 for every input
        model.gate.weight.zero_()
        model.gate.bias.copy_(torch.tensor([0, 5, 0, 0, 5, 0, -5, 0.0]))
    x, y = torch.randn(16, *DIGITS), torch.randint(0, 10, (16,))
    out = model(x)
    assert out.routed[:, 2].sum() == 0
    nn.functional.cross_entropy(out.logits, y).backward()
    assert all(p.grad is None for p in model.experts["6"].parameters())
    assert all(p.grad is not None for p in model.experts["4"].parameters())
    assert int(model.experts["6"].block2[1].num_batches_tracked) == 0  # never ran


@pytest.mark.parametrize(("overrides", "shape"), [CUTS[0], CUTS[3]])
def test_a_single_routed_sample_trains_through_the_expert_batchnorm(overrides, shape) -> None:
    cfg = load_config(overrides)
    model = build_model(as_settings(cfg).model, shape, 10, [0, 1]).train()
    features = model.backbone(torch.randn(5, *shape))
    top_i = torch.tensor([[0], [1], [1], [1], [1]])  # expert 0: one sample; expert 1: four
    logits, expert_logits = model._sparse(features, top_i, torch.ones(5, 1))
    logits.sum().backward()
    assert logits.isfinite().all() and expert_logits[0, 0].abs().sum() > 0
    assert all(p.grad is not None for p in model.experts["0"].parameters())


def test_moe_from_must_name_a_stage_after_the_first() -> None:
    # Refused, once, when the configuration is loaded (the model trusts its settings).
    for bad, backbone in (("block1", "cnn"), ("layer5", "resnet18")):
        with pytest.raises(ConfigError, match=r"model\.moe_from=.*choose one of"):
            load_config(f"model={backbone} model.moe_from={bad}")
    with pytest.raises(ConfigError, match=r"model\.dispatch"):
        load_config("model.dispatch=all")


def test_state_split_and_strict_loading(cfg) -> None:
    model = make(cfg, [0, 1])
    assert set(gate_state(model)) == {"gate.weight", "gate.bias"}
    assert not any(k.startswith("gate.") for k in shared_state(model))
    # BatchNorm inside an expert travels (and is aggregated) with that expert
    assert "experts.1.block2.1.running_mean" in shared_state(model)
    server = shared_state(make(cfg, range(8), seed=1))
    mine = {k: v for k, v in server.items() if (key := split_expert_key(k)) is None or key[0] < 2}
    load_arrays(model, mine)
    name = "experts.1.head.2.weight"
    np.testing.assert_array_equal(shared_state(model)[name], server[name])
    with pytest.raises(KeyError, match="not in the model"):
        load_arrays(model, {"experts.5.head.2.weight": server["experts.5.head.2.weight"]})
    with pytest.raises(ValueError, match="Shape mismatch"):
        load_arrays(model, {"gate.bias": np.zeros(3, np.float32)})


def test_invalid_expert_ids_are_refused(cfg) -> None:
    for ids in ([], [0, 0], [8]):
        with pytest.raises(ValueError, match="expert_ids"):
            make(cfg, ids)


def digits(n: int = 192) -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.from_numpy(data.images[:n, None].astype(np.float32) / 16.0)
    return x, torch.from_numpy(data.target[:n].astype(np.int64))


def test_local_training_learns_and_reports_feedback_per_expert(cfg) -> None:
    x, y = digits()
    model = make(cfg, [2, 5, 7])
    before = evaluate(model, x, y)
    result = train_local(model, x, y, epochs=4, batch_size=32, lr=0.05, seed=0)
    after = evaluate(model, x, y)
    assert after.accuracy > before.accuracy and after.accuracy > 0.8
    assert set(result.feedback) == {2, 5, 7}
    # each sample is routed to top_k = 2 experts in the last epoch
    assert sum(f.usage for f in result.feedback.values()) == 2 * 192
    assert all(0 <= f.accuracy <= 1 and f.loss >= 0 for f in result.feedback.values())
    assert sum(after.expert_usage.values()) == 2 * 192


def test_feedback_is_each_experts_own_prediction_on_its_routed_samples(cfg) -> None:
    x, y = digits(64)
    model = make(cfg, [0, 3, 6])
    # lr = 0 and one batch per epoch: training leaves the weights as they are, so the
    # routing and the experts' outputs in its last epoch are those of this forward pass
    # (BatchNorm's batch statistics do not depend on the order of the samples).
    result = train_local(model, x, y, epochs=1, batch_size=64, lr=0.0, momentum=0.0)
    with torch.no_grad():
        out = model.train()(x)
        ce = nn.functional.cross_entropy
        for j, e in enumerate([0, 3, 6]):
            mine = out.routed[:, j]
            own = out.expert_logits[mine, j]
            assert result.feedback[e].usage == int(mine.sum())
            if mine.any():
                hits = (own.argmax(-1) == y[mine]).float().mean().item()
                assert result.feedback[e].accuracy == pytest.approx(hits)
                assert result.feedback[e].loss == pytest.approx(ce(own, y[mine]).item(), rel=1e-4)
    assert sum(f.usage for f in result.feedback.values()) == 2 * 64


def test_a_non_finite_step_updates_no_weight(cfg) -> None:
    model = make(cfg, [0, 1])
    optimizer = make_optimizer(model, lr=0.1)
    x, y = torch.randn(16, *DIGITS), torch.randint(0, 10, (16,))
    train_step(model, optimizer, x, y)  # a finite step moves the weights and fills momentum
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    x[3, 0, 2, 2] = float("inf")
    with pytest.raises(FloatingPointError, match="training loss became nan"):
        train_step(model, optimizer, x, y)
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())


def test_training_refuses_a_diverging_loss(cfg) -> None:
    model = make(cfg, [0, 1])
    x, y = torch.randn(16, *DIGITS), torch.randint(0, 10, (16,))
    with torch.no_grad():
        model.gate.weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match=r"lower train\.lr"):
        train_local(model, x, y, epochs=1, batch_size=8, lr=0.1)
