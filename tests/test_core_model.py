"""The MoE model: masking to A_c, top-k mixing, storage saving; local training feedback."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flexmoe_core.config import load_config
from flexmoe_core.model import (
    build_model,
    count_parameters,
    gate_state,
    load_arrays,
    shared_state,
)
from flexmoe_core.training import evaluate, train_local


@pytest.fixture(scope="module")
def cfg():
    return load_config("model.top_k=2")


def make(cfg, experts, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(cfg.model, (1, 8, 8), 10, experts)


def test_routing_and_gradients_stay_inside_the_assigned_experts(cfg) -> None:
    model = make(cfg, [1, 4, 6])
    x, y = torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,))
    out = model(x)
    assert out.routed.shape == (32, 3) and (out.routed.sum(1) == 2).all()
    assert torch.nn.functional.cross_entropy(out.logits, y).isfinite()
    (torch.nn.functional.cross_entropy(out.logits, y) + out.aux_loss).backward()
    grad = model.gate.weight.grad.abs().sum(1)
    assert (grad[[0, 2, 3, 5, 7]] == 0).all() and (grad[[1, 4, 6]] > 0).all()
    assert set(model.experts) == {"1", "4", "6"}


def test_top_k_mix_is_renormalised_over_the_chosen_experts(cfg) -> None:
    model = make(cfg, [0, 3, 5]).eval()
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        out = model(x)
        h = model.backbone(x)
        probs = model.gate(h)[:, [0, 3, 5]].softmax(-1)
        top_p, top_i = probs.topk(2, -1)
        w = top_p / top_p.sum(-1, keepdim=True)
        experts = [model.experts[str(e)](h) for e in (0, 3, 5)]
        manual = torch.stack(
            [sum(w[b, j] * experts[top_i[b, j]][b] for j in range(2)) for b in range(5)]
        )
    torch.testing.assert_close(out.logits, manual)


def test_top_k_is_capped_by_the_number_of_assigned_experts(cfg) -> None:
    model = make(cfg, [2])
    out = model(torch.randn(4, 1, 8, 8))
    assert model.top_k == 1 and out.routed.all()
    torch.testing.assert_close(out.logits, out.expert_logits[:, 0])


def test_a_client_model_of_k_experts_stores_fewer_parameters(cfg) -> None:
    full, two = make(cfg, range(8)), make(cfg, [0, 1])
    per_expert = count_parameters(make(cfg, [0, 1, 2])) - count_parameters(make(cfg, [0, 1]))
    assert per_expert > 0
    assert count_parameters(full) - count_parameters(two) == 6 * per_expert
    assert not any(k.startswith("experts.5") for k in shared_state(two))


def test_state_split_and_strict_loading(cfg) -> None:
    model = make(cfg, [0, 1])
    assert set(gate_state(model)) == {"gate.weight", "gate.bias"}
    assert not any(k.startswith("gate.") for k in shared_state(model))
    server = shared_state(make(cfg, range(8), seed=1))
    mine = {
        k: v
        for k, v in server.items()
        if not k.startswith("experts.") or k.split(".")[1] in ("0", "1")
    }
    load_arrays(model, mine)
    np.testing.assert_array_equal(
        shared_state(model)["experts.1.0.weight"], server["experts.1.0.weight"]
    )
    with pytest.raises(KeyError, match="not in the model"):
        load_arrays(model, {"experts.5.0.weight": server["experts.5.0.weight"]})
    with pytest.raises(ValueError, match="Shape mismatch"):
        load_arrays(model, {"gate.bias": np.zeros(3, np.float32)})


def test_invalid_expert_ids_are_refused(cfg) -> None:
    for ids in ([], [0, 0], [8]):
        with pytest.raises(ValueError, match="expert_ids"):
            make(cfg, ids)


def test_local_training_learns_and_reports_feedback_per_expert(cfg) -> None:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.from_numpy(digits.images[:192, None].astype(np.float32) / 16.0)
    y = torch.from_numpy(digits.target[:192].astype(np.int64))
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


def test_training_refuses_a_diverging_loss(cfg) -> None:
    model = make(cfg, [0, 1])
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    with torch.no_grad():
        model.gate.weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match=r"lower train\.lr"):
        train_local(model, x, y, epochs=1, batch_size=8, lr=0.1)
