"""Bounded influence: poisoned counts and weights move the model by a bounded amount."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

from flexmoe_core import protocol
from flexmoe_core.aggregation import (
    AggregationPolicy,
    ClientUpdate,
    aggregate,
    aggregate_bounded,
    bounded_counts,
    weighted_mean,
)
from flexmoe_core.config import ConfigError, load_config, load_settings
from flexmoe_core.fitness import ExpertFeedback
from flexmoe_core.robust import low_median
from flexmoe_core.update_bounds import group_sizes, round_bounds

RMS = 1.0  # the default max_update_rms
EXPERT = "experts.0.0.weight"
# The plain weighted mean: no count cap, no clip, no trimming.
NO_CLIP = AggregationPolicy(
    method="mean",
    max_examples_ratio=None,
    max_update_rms=None,
    clip_multiple=None,
    expert_clip_multiple=None,
    reject_multiple=None,
)


def unbounded(global_arrays: dict, updates: list[ClientUpdate]) -> dict[str, np.ndarray]:
    """The aggregation before bounds: reported examples and usage as weights."""
    out = dict(global_arrays)
    for name in global_arrays:
        holders = [u for u in updates if name in u.arrays]
        if not holders:
            continue
        expert = int(name.split(".")[1]) if name.startswith("experts.") else None
        weights = [u.num_examples if expert is None else u.feedback[expert].usage for u in holders]
        out[name] = weighted_mean([u.arrays[name] for u in holders], np.array(weights, float))
    return out


def model(seed: int = 0, experts: tuple[int, ...] = (0, 1)) -> dict[str, np.ndarray]:
    """A small global model: backbone weight, a BatchNorm counter, two experts."""
    rng = np.random.default_rng(seed)
    arrays = {
        "backbone.w": rng.normal(0, 0.05, (16, 8)).astype(np.float32),
        "backbone.bn.num_batches_tracked": np.array(40, dtype=np.int64),
    }
    for e in experts:
        arrays[f"experts.{e}.0.weight"] = rng.normal(0, 0.05, (8, 4)).astype(np.float32)
        arrays[f"experts.{e}.0.bias"] = np.zeros(4, np.float32)
    return arrays


def honest(client: int, global_arrays: dict, experts=(0,), examples: int = 100) -> ClientUpdate:
    """An update whose deltas are of the size SGD makes (RMS 0.01)."""
    rng = np.random.default_rng(100 + client)
    arrays = {}
    for name, value in global_arrays.items():
        if name.startswith("experts.") and int(name.split(".")[1]) not in experts:
            continue
        if np.issubdtype(value.dtype, np.floating):
            arrays[name] = (value + rng.normal(0, 0.01, value.shape)).astype(value.dtype)
        else:
            arrays[name] = value + 4
    feedback = {e: ExpertFeedback(usage=60.0 + client, accuracy=0.6, loss=1.0) for e in experts}
    return ClientUpdate(client, arrays, examples, feedback)


def rms_distance(a: dict, b: dict, prefix: str) -> float:
    """L2 distance over the float arrays whose name starts with ``prefix``."""
    total = sum(
        float(((a[n].astype(float) - b[n].astype(float)) ** 2).sum())
        for n in a
        if n.startswith(prefix) and np.issubdtype(a[n].dtype, np.floating)
    )
    return math.sqrt(total)


def test_honest_round_is_unchanged_bit_for_bit() -> None:
    global_arrays = model()
    updates = [honest(c, global_arrays, experts=(0, 1) if c % 2 else (0,)) for c in range(5)]
    # Under the weighted mean, bounds that do not bind change no bit (the default,
    # method=auto, also trims groups of 6 holders or more: tests of it are below).
    mean = AggregationPolicy(top_k=2, method="mean")
    bounded = aggregate_bounded(global_arrays, updates, mean)
    assert bounded.report.clients() == []
    reference = unbounded(global_arrays, updates)
    for result in (aggregate(global_arrays, updates, policy=mean), bounded.arrays):
        for name in global_arrays:
            assert result[name].dtype == global_arrays[name].dtype
            np.testing.assert_array_equal(result[name], reference[name], err_msg=name)
    assert int(bounded.arrays["backbone.bn.num_batches_tracked"]) == 44


def test_usage_1e9_and_weights_7_move_an_expert_by_a_bounded_share() -> None:
    global_arrays = model()
    honest_updates = [honest(c, global_arrays) for c in range(4)]
    attacker = honest(9, global_arrays)
    attacker.arrays = {
        n: np.full_like(v, 7.0) if n.startswith("experts.") else v
        for n, v in attacker.arrays.items()
    }
    attacker.feedback = {0: ExpertFeedback(usage=1e9, accuracy=1.0, loss=0.0)}
    updates = [*honest_updates, attacker]

    poisoned = unbounded(global_arrays, updates)
    assert np.allclose(poisoned[EXPERT], 7.0, atol=1e-5)  # the attack works unbounded

    result = aggregate_bounded(global_arrays, updates, AggregationPolicy(top_k=2))
    honest_only = aggregate(global_arrays, honest_updates, policy=NO_CLIP)
    # The attacker's usage counts at most its examples (100), against 60..63 per honest client.
    share = 100 / (100 + sum(60.0 + c for c in range(4)))
    clip = RMS * math.sqrt(group_sizes(global_arrays)[0])
    moved = rms_distance(result.arrays, global_arrays, "experts.0.")
    honest_move = rms_distance(honest_only, global_arrays, "experts.0.")
    assert moved <= share * clip + honest_move + 1e-6
    assert np.abs(result.arrays[EXPERT]).max() < 1.0  # nowhere near 7.0
    assert result.report.usage[9][0] == (1e9, 100.0)
    assert 0 in result.report.clipped[9]
    assert set(result.report.clients()) == {9}


@pytest.mark.parametrize("declared", [False, True])
def test_num_examples_1e15_cannot_take_over_the_backbone(declared: bool) -> None:
    global_arrays = model()
    honest_updates = [honest(c, global_arrays) for c in range(4)]
    attacker = honest(9, global_arrays, examples=10**15)
    attacker.arrays = {
        n: np.zeros_like(v) if n == "backbone.w" else v for n, v in attacker.arrays.items()
    }
    updates = [*honest_updates, attacker]
    poisoned = unbounded(global_arrays, updates)
    assert np.abs(poisoned["backbone.w"]).max() < 1e-9  # taken over unbounded

    declared_examples = {c: 100 for c in (0, 1, 2, 3, 9)} if declared else None
    # The count caps alone: the weighted mean, the absolute clip only.
    mean = AggregationPolicy(
        top_k=2, method="mean", clip_multiple=None, expert_clip_multiple=None, reject_multiple=None
    )
    result = aggregate_bounded(global_arrays, updates, mean, declared_examples)
    # Declared, else the fence of the reported counts (Q3 + 3 IQR, at least twice the
    # median): one claim moves neither.
    counted = 100.0 if declared else 2.0 * 100
    assert result.report.examples[9] == (1e15, counted)
    share = counted / (counted + 4 * 100)
    honest_only = aggregate(global_arrays, honest_updates, policy=NO_CLIP)
    # The zero backbone is within the clip here, so the result is exactly the honest mean
    # pulled towards zero by the attacker's bounded share, not the attacker's backbone.
    np.testing.assert_allclose(
        result.arrays["backbone.w"], (1 - share) * honest_only["backbone.w"], rtol=1e-5
    )
    assert share <= (0.2 if declared else 0.34)
    # method=auto also trims each coordinate's extremes: closer still to the honest mean.
    trimming = AggregationPolicy(top_k=2, method="auto", trim_min_holders=3)
    auto = aggregate_bounded(global_arrays, updates, trimming, declared_examples)
    honest_w = honest_only["backbone.w"]
    assert (
        np.abs(auto.arrays["backbone.w"] - honest_w).max()
        < np.abs(result.arrays["backbone.w"] - honest_w).max()
    )


def test_auto_trims_only_groups_with_enough_holders() -> None:
    global_arrays = model()
    # Five holders of expert 0 and of the backbone: below trim_min_holders (6), auto is
    # the weighted mean bit for bit; a sixth holder far off in one direction (inside
    # the clip) is then trimmed away coordinate by coordinate.
    five = [honest(c, global_arrays) for c in range(5)]
    mean = AggregationPolicy(top_k=2, method="mean")
    auto = AggregationPolicy(top_k=2, method="auto")
    assert auto.trim_min_holders == 6
    for name, value in aggregate_bounded(global_arrays, five, auto).arrays.items():
        np.testing.assert_array_equal(
            value, aggregate_bounded(global_arrays, five, mean).arrays[name]
        )
    # The pusher moves 4 backbone coordinates by 0.1 each: about the clip in RMS (2x the
    # honest 0.01), far outside the honest spread in those coordinates.
    pusher = honest(5, global_arrays)
    pusher.arrays["backbone.w"] = pusher.arrays["backbone.w"].copy()
    pusher.arrays["backbone.w"][0, :4] += 0.1
    six = [*five, pusher]
    trimmed = aggregate_bounded(global_arrays, six, auto).arrays["backbone.w"][0, :4]
    averaged = aggregate_bounded(global_arrays, six, mean).arrays["backbone.w"][0, :4]
    honest_mean = aggregate(global_arrays, five, policy=NO_CLIP)["backbone.w"][0, :4]
    pull = (averaged - honest_mean).mean()  # about 0.1 / 6, less what the clip takes
    assert pull > 0.01
    assert abs((trimmed - honest_mean).mean()) < pull / 3


@pytest.mark.parametrize("method", ["median", "trimmed_mean"])
def test_robust_aggregators_ignore_one_outlier_among_five(method: str) -> None:
    global_arrays = model()
    honest_updates = [honest(c, global_arrays) for c in range(4)]
    attacker = honest(9, global_arrays)
    attacker.arrays = {
        n: np.full_like(v, 7.0) if v.dtype.kind == "f" else np.full_like(v, 10**12)
        for n, v in attacker.arrays.items()
    }
    attacker.feedback = {0: ExpertFeedback(usage=1e9, accuracy=1.0, loss=0.0)}
    policy = AggregationPolicy(method=method, trim_fraction=0.2, max_update_rms=None)
    result = aggregate(global_arrays, [*honest_updates, attacker], policy=policy)
    for name in ("backbone.w", EXPERT, "backbone.bn.num_batches_tracked"):
        stack = np.stack([u.arrays[name] for u in honest_updates])
        assert result[name].dtype == global_arrays[name].dtype
        assert (result[name] >= stack.min(0)).all() and (result[name] <= stack.max(0)).all()


def test_trimmed_mean_drops_the_ends_and_median_of_integers_rounds() -> None:
    global_arrays = {"backbone.n": np.array(0, np.int64), "backbone.w": np.zeros(1, np.float32)}
    updates = [
        ClientUpdate(c, {"backbone.n": np.array(v), "backbone.w": np.array([v], np.float32)}, 1)
        for c, v in enumerate([1, 2, 3, 4, 100])
    ]
    trimmed = aggregate(
        global_arrays, updates, policy=AggregationPolicy(method="trimmed_mean", max_update_rms=None)
    )
    assert float(trimmed["backbone.w"][0]) == pytest.approx(3.0)  # mean of 2, 3, 4
    median = aggregate(
        global_arrays, updates[:4], policy=AggregationPolicy(method="median", max_update_rms=None)
    )
    assert int(median["backbone.n"]) == 2 and median["backbone.n"].dtype == np.int64  # rint(2.5)


def test_clip_scales_the_delta_to_the_bound_and_keeps_its_direction() -> None:
    global_arrays = model()
    update = honest(1, global_arrays)
    direction = np.random.default_rng(5).normal(size=global_arrays["backbone.w"].shape)
    update.arrays["backbone.w"] = (global_arrays["backbone.w"] + 5 * direction).astype(np.float32)
    result = aggregate_bounded(global_arrays, [update], AggregationPolicy(max_update_rms=0.5))
    delta = result.arrays["backbone.w"].astype(float) - global_arrays["backbone.w"]
    assert np.sqrt(np.mean(delta**2)) == pytest.approx(0.5, rel=1e-4)
    cosine = (delta * direction).sum() / np.linalg.norm(delta) / np.linalg.norm(direction)
    assert cosine > 0.999
    assert result.report.clipped[1]["backbone"] < 0.2


def test_the_backbone_and_the_experts_are_clipped_at_their_own_multiples() -> None:
    # RMS changes of three holders per group: 1, 2, 3 (low median 2) and 100.
    sizes = {"backbone": 4, 0: 9, 1: 9}
    norms = [{g: rms * math.sqrt(sizes[g]) for g in sizes} for rms in (1.0, 2.0, 3.0)]
    bounds = round_bounds(norms, sizes, None, 2.0, 50.0, expert_clip_multiple=4.0)
    assert bounds["backbone"].clip == pytest.approx(2.0 * 2.0 * math.sqrt(4))
    assert bounds[0].clip == pytest.approx(4.0 * 2.0 * math.sqrt(9))
    assert bounds[0].reject == pytest.approx(50.0 * 2.0 * math.sqrt(9))
    # An expert with fewer than 3 holders has no median of its own: the ceiling only.
    two = [{0: 1.0}, {0: 3.0}]
    assert round_bounds(two, {0: 1}, 1.0, 2.0, 50.0, expert_clip_multiple=4.0)[0].clip == 1.0
    unclipped = round_bounds(norms, sizes, None, None, None, expert_clip_multiple=None)
    assert all(math.isinf(b.clip) and math.isinf(b.reject) for b in unclipped.values())


def test_usage_is_bounded_by_examples_times_top_k() -> None:
    global_arrays = model()
    update = honest(3, global_arrays, experts=(0, 1), examples=50)
    update.feedback = {e: ExpertFeedback(50.0, 0.5, 1.0) for e in (0, 1)}  # every sample twice
    _, usage = bounded_counts([update], AggregationPolicy(top_k=2))
    assert usage == [{0: 50.0, 1: 50.0}]  # possible with top-2 routing
    _, usage = bounded_counts([update], AggregationPolicy(top_k=1))
    assert usage == [{0: 25.0, 1: 25.0}]  # top-1 routes each sample once


def test_examples_cap_uses_the_low_median_and_scales_usage() -> None:
    assert low_median([5, 1, 9, 7]) == 5 and low_median([100, 1e15]) == 100
    global_arrays = model()
    updates = [honest(c, global_arrays, examples=n) for c, n in enumerate([100, 100, 5000])]
    examples, usage = bounded_counts(updates, AggregationPolicy(max_examples_ratio=10.0))
    assert examples == [100.0, 100.0, 1000.0]
    assert usage[2][0] == pytest.approx(62.0 * 1000 / 5000)
    examples, _ = bounded_counts(updates, AggregationPolicy(), declared_examples={2: 300})
    assert examples == [100.0, 100.0, 300.0]


@pytest.mark.parametrize(
    "override",
    [
        "aggregation.method=mode",
        "aggregation.trim_fraction=0.5",
        "aggregation.max_examples_ratio=0.5",
        "aggregation.max_update_rms=0.0",
        "aggregation.expert_weighting=x",
    ],
)
def test_bad_aggregation_settings_are_refused_by_the_schema(override: str) -> None:
    # Checked once, where the configuration is loaded; the policy trusts its settings.
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=re.escape(key)):
        load_config(override)


def test_policy_defaults_are_the_configuration_defaults() -> None:
    settings = load_settings()
    policy = AggregationPolicy.from_settings(settings.aggregation, settings.model.top_k)
    assert policy == AggregationPolicy(top_k=settings.model.top_k)
    settings = load_settings("aggregation.method=median aggregation.max_update_rms=null")
    policy = AggregationPolicy.from_settings(settings.aggregation, settings.model.top_k)
    assert (policy.method, policy.max_update_rms) == ("median", None)


def test_nonpositive_examples_are_refused_where_replies_are_read() -> None:
    # One place judges the count: the protocol's decoder (examples in [1, 2^53]).
    metrics = {protocol.NUM_EXAMPLES: 0, protocol.TRAIN_LOSS: 0.5, protocol.TRAIN_ACC: 0.5}
    with pytest.raises(ValueError, match="num-examples=0 is not in"):
        protocol.decode_train_metrics(metrics)
