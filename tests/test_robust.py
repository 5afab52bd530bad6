"""Robust statistics over clients: one client's claim moves an average by a bounded step."""

from __future__ import annotations

import numpy as np
import pytest

from flexmoe_core.robust import (
    example_cap,
    low_median,
    summarise_clients,
    trim_count,
    trimmed_weighted_mean,
)
from flexmoe_core.roster import Roster


def test_trim_count_drops_one_at_each_end_from_three_values() -> None:
    assert [trim_count(n, 0.2) for n in (0, 1, 2, 3, 4, 5, 9, 10, 20)] == [
        0,
        0,
        0,
        1,
        1,
        1,
        1,
        2,
        4,
    ]
    assert trim_count(10, 0.0) == 0  # no trimming asked
    assert trim_count(4, 0.49) == 1  # never more than leaves one value


def test_trimmed_weighted_mean_without_a_cut_is_the_weighted_mean() -> None:
    stack = [np.array([1.0, 2.0]), np.array([3.0, 6.0])]
    np.testing.assert_allclose(trimmed_weighted_mean(stack, [1, 3], 0), [2.5, 5.0])


def test_trimmed_weighted_mean_ignores_one_outlier_per_coordinate() -> None:
    honest = [np.array([1.0, -1.0]), np.array([1.2, -1.2]), np.array([0.8, -0.8])]
    attacker = np.array([1e9, -1e9])
    out = trimmed_weighted_mean([*honest, attacker], [1, 1, 1, 1e6], trim_count(4, 0.2))
    assert np.all(np.abs(out) < 1.3)
    # Per coordinate: the outlier and the other extreme go, the middle two stay,
    # averaged with their own weights.
    out = trimmed_weighted_mean([np.array([0.0]), np.array([1.0]), np.array([3.0])], [1, 5, 1], 1)
    assert out.tolist() == [1.0]


def test_a_perfect_score_over_2p53_samples_barely_moves_the_reported_accuracy() -> None:
    honest = [(30, 0.4, 0.94), (36, 0.3, 0.96), (27, 0.5, 0.95), (33, 0.35, 0.97)] * 2
    truth = np.average([a for _, _, a in honest], weights=[n for n, _, _ in honest])
    assert summarise_clients(honest, [40.0] * 8)["acc"] == pytest.approx(truth)  # unchanged
    # Its count is capped at what it can hold (here 40): a share of about 1/9.
    lying = summarise_clients([*honest, (2**53, 0.0, 1.0)], [40.0] * 9)
    assert lying["acc"] - truth == pytest.approx(40 / (40 + 252) * (1.0 - truth))
    assert abs(lying["acc"] - truth) < 0.01


def test_example_cap_follows_the_federation_not_a_claim() -> None:
    honest = [102, 123, 131, 134, 139, 156, 165]
    cap = example_cap([*honest, 2**53], ratio=10.0)
    assert max(honest) <= cap <= 2 * max(honest)
    assert example_cap([100, 2**53], ratio=10.0) == 1000.0  # too few for quartiles
    assert example_cap([], ratio=10.0) == float("inf")
    # Equal partitions keep small differences: never below twice the median.
    assert example_cap([100, 100, 100, 100, 101], ratio=10.0) == 200.0
    assert low_median([5, 1, 9, 7]) == 5


def test_summarise_clients_needs_clients() -> None:
    with pytest.raises(ValueError, match="no client"):
        summarise_clients([], [])


# ------------------------------------------------------------------ identity
class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_late_reply_does_not_hand_the_key_to_a_second_claimant() -> None:
    clock = Clock()
    roster = Roster(4, rebind_grace_s=10.0, clock=clock)
    assert roster.claim("honest", 3, 2, {"honest"}).status == "joined"
    roster.missed(3)  # the round's timeout passed without its reply
    refused = roster.claim("impostor", 3, 2, {"honest", "impostor"})
    assert refused.status == "refused" and refused.retry
    assert roster.holder_of(3) == "honest"
    # The holder answers again: it is sampled again, still holding its key.
    assert roster.claim("honest", 3, 2, {"honest", "impostor"}).status == "kept"
    assert roster.available({"honest", "impostor"}) == [3]


def test_a_key_moves_once_the_holder_is_reported_gone_for_the_grace_period() -> None:
    clock = Clock()
    roster = Roster(4, rebind_grace_s=10.0, clock=clock)
    roster.claim("old", 1, 2, {"old"})
    roster.unavailable(1)
    clock.now = 5.0
    assert roster.claim("new", 1, 2, {"old", "new"}).status == "refused"
    clock.now = 10.0
    assert roster.claim("new", 1, 2, {"old", "new"}).status == "rejoined"
    assert roster.holder_of(1) == "new" and roster.key_of("old") is None


def test_a_key_moves_at_once_when_its_holder_has_left() -> None:
    roster = Roster(4, rebind_grace_s=10.0, clock=Clock())
    roster.claim("old", 1, 2, {"old"})
    assert roster.claim("new", 1, 2, {"new"}).status == "rejoined"
