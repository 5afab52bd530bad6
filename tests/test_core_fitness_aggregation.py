"""Fitness EMA, per-expert aggregation, update checks and the feedback wire format."""

from __future__ import annotations

import math

import numpy as np
import pytest

from flexmoe_core import protocol
from flexmoe_core.aggregation import (
    AggregationPolicy,
    ClientUpdate,
    aggregate,
    weighted_mean,
)
from flexmoe_core.fitness import ExpertFeedback, FitnessTable
from flexmoe_core.reply_gate import check_update

# These tests use deltas far larger than SGD makes, which the default bounds would clip.
# The plain weighted mean: no count cap, no clip, no trimming.
NO_CLIP = AggregationPolicy(
    method="mean",
    max_examples_ratio=None,
    max_update_rms=None,
    clip_multiple=None,
    expert_clip_multiple=None,
    reject_multiple=None,
)


def fb(usage: float, acc: float = 0.5, loss: float = 1.0) -> ExpertFeedback:
    return ExpertFeedback(usage, acc, loss)


def test_fitness_ema_loss_signal() -> None:
    table = FitnessTable(4, q0=1.0, beta=0.5, signal="loss", alpha=2.0)
    table.update(7, {1: fb(10, loss=0.5), 2: fb(0, loss=0.1)})
    row = table.rows([7])[0]
    assert row[1] == pytest.approx(0.5 * 1.0 + 0.5 * math.exp(-2.0 * 0.5))
    assert row[2] == 1.0  # usage 0: no update
    assert row[0] == row[3] == 1.0  # not assigned: untouched
    table.update(7, {1: fb(3, loss=0.0)})
    assert table.rows([7])[0][1] == pytest.approx(0.5 * (0.5 + 0.5 * math.exp(-1.0)) + 0.5)


def test_fitness_accuracy_signal_and_new_rows() -> None:
    table = FitnessTable(3, q0=0.2, beta=1.0, signal="accuracy")
    table.update(1, {0: fb(5, acc=0.9)})
    np.testing.assert_allclose(table.rows([1, 99]), [[0.9, 0.2, 0.2], [0.2, 0.2, 0.2]])


def test_fitness_state_round_trip_and_growth() -> None:
    table = FitnessTable(2)
    for client in range(20):  # grows past its initial 8 rows
        table.update(client, {client % 2: fb(1, loss=client)})
    restored = FitnessTable(2)
    restored.load_state(table.state())
    np.testing.assert_array_equal(restored.rows(range(20)), table.rows(range(20)))


@pytest.mark.parametrize("bad", [dict(usage=-1), dict(accuracy=1.5), dict(loss=math.nan)])
def test_feedback_out_of_range_is_refused(bad: dict) -> None:
    values = {"usage": 1.0, "accuracy": 0.5, "loss": 1.0, **bad}
    with pytest.raises(ValueError):
        ExpertFeedback(**values)


def arrays(backbone: float, experts: dict[int, float]) -> dict[str, np.ndarray]:
    out = {"backbone.w": np.full((2, 2), backbone, np.float32), "backbone.n": np.array(4)}
    for e, v in experts.items():
        out[f"experts.{e}.0.weight"] = np.full(3, v, np.float32)
    return out


def test_aggregate_backbone_by_examples_experts_by_usage() -> None:
    global_arrays = arrays(0.0, {0: 0.0, 1: -1.0, 2: 5.0})
    a = ClientUpdate(1, arrays(1.0, {0: 1.0, 1: 10.0}), 30, {0: fb(3), 1: fb(1)})
    b = ClientUpdate(2, arrays(3.0, {1: 20.0}), 10, {1: fb(3)})
    new = aggregate(global_arrays, [a, b], policy=NO_CLIP)
    np.testing.assert_allclose(new["backbone.w"], 1.5)  # (30*1 + 10*3) / 40
    np.testing.assert_allclose(new["experts.0.0.weight"], 1.0)  # only holder
    np.testing.assert_allclose(new["experts.1.0.weight"], 17.5)  # (1*10 + 3*20) / 4
    np.testing.assert_allclose(new["experts.2.0.weight"], 5.0)  # nobody held it
    assert new["backbone.w"].dtype == np.float32 and new["backbone.n"].dtype == np.int64

    by_examples = aggregate(
        global_arrays, [a, b], policy=AggregationPolicy("num_examples", max_update_rms=None)
    )
    np.testing.assert_allclose(by_examples["experts.1.0.weight"], 12.5)  # (30*10+10*20)/40


def test_aggregate_expert_with_zero_usage_counts_holders_equally() -> None:
    update_a = ClientUpdate(1, arrays(0, {0: 2.0}), 5, {0: fb(0)})
    update_b = ClientUpdate(2, arrays(0, {0: 4.0}), 5, {0: fb(0)})
    new = aggregate(arrays(0, {0: 0.0}), [update_a, update_b], policy=NO_CLIP)
    np.testing.assert_allclose(new["experts.0.0.weight"], 3.0)


def test_weighted_mean_rounds_integers() -> None:
    out = weighted_mean([np.array(3), np.array(4)], np.array([1.0, 1.0]))
    assert out.dtype == np.array(3).dtype and int(out) == 4


def test_check_update_names_each_problem() -> None:
    global_arrays = arrays(0.0, {0: 0.0, 1: 0.0, 2: 0.0})
    good = ClientUpdate(1, arrays(1.0, {0: 1.0, 2: 1.0}), 10, {0: fb(1), 2: fb(1)})
    assert check_update(good, global_arrays, [0, 2]) == []

    extra = ClientUpdate(1, arrays(1.0, {0: 1.0, 1: 1.0}), 10, {0: fb(1), 1: fb(1)})
    assert any("not assigned" in p for p in check_update(extra, global_arrays, [0]))

    shaped = arrays(1.0, {0: 1.0})
    shaped["backbone.w"] = np.zeros((3, 3), np.float32)
    problems = check_update(ClientUpdate(1, shaped, 10, {0: fb(1)}), global_arrays, [0])
    assert any("backbone.w" in p and "expected" in p for p in problems)

    typed = arrays(1.0, {0: 1.0})
    typed["backbone.w"] = typed["backbone.w"].astype(np.float64)
    assert check_update(ClientUpdate(1, typed, 10, {0: fb(1)}), global_arrays, [0])

    nan = arrays(1.0, {0: np.nan})
    problems = check_update(ClientUpdate(1, nan, 10, {0: fb(1)}), global_arrays, [0])
    assert any("NaN" in p for p in problems)

    no_feedback = ClientUpdate(1, arrays(1.0, {0: 1.0}), 10, {})
    assert any("no feedback" in p for p in check_update(no_feedback, global_arrays, [0]))

    missing = ClientUpdate(1, arrays(1.0, {}), 10, {0: fb(1)})
    assert any("missing" in p for p in check_update(missing, global_arrays, [0]))


def test_feedback_wire_format_round_trip_and_errors() -> None:
    feedback = {3: fb(4, 0.25, 0.7), 1: fb(2, 1.0, 0.1)}
    assert protocol.decode_feedback(protocol.encode_feedback(feedback)) == feedback
    encoded = protocol.encode_feedback(feedback)
    with pytest.raises(ValueError, match="lacks"):
        protocol.decode_feedback({k: v for k, v in encoded.items() if k != "loss"})
    with pytest.raises(ValueError, match="differ"):
        protocol.decode_feedback({**encoded, "usage": [1.0]})
    with pytest.raises(ValueError, match="finite"):
        protocol.decode_feedback({**encoded, "loss": [math.inf, 0.1]})
