"""Per-expert client-level DP: clipping bounds sensitivity, noise per expert, the accountant."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.optimize import brentq
from scipy.special import gammaln, logsumexp
from scipy.stats import norm

from flexmoe_core.aggregation import ClientUpdate
from flexmoe_core.config import ConfigError, load_config, load_settings
from flexmoe_core.fitness import ExpertFeedback
from flexmoe_core.privacy import PrivacyPolicy, clip_client, epsilon, private_aggregate


def model(size: int = 6) -> dict[str, np.ndarray]:
    arrays = {
        "backbone.w": np.zeros((size, size), np.float32),
        "backbone.bn.num_batches_tracked": np.array(7, np.int64),
    }
    for e in range(4):
        arrays[f"experts.{e}.0.weight"] = np.zeros((size, size), np.float32)
    return arrays


def update(client: int, global_arrays: dict, experts, scale: float, seed: int = 0) -> ClientUpdate:
    rng = np.random.default_rng([seed, client])
    arrays = {
        name: (value + scale * rng.normal(size=value.shape)).astype(value.dtype)
        if value.dtype.kind == "f"
        else value + 3
        for name, value in global_arrays.items()
        if not name.startswith("experts.") or int(name.split(".")[1]) in experts
    }
    feedback = {e: ExpertFeedback(10.0, 0.5, 1.0) for e in experts}
    return ClientUpdate(client, arrays, 10, feedback)


def flat(deltas: dict[str, np.ndarray], prefix: str = "") -> np.ndarray:
    return np.concatenate([d.ravel() for n, d in sorted(deltas.items()) if n.startswith(prefix)])


@pytest.mark.parametrize("experts", [(0,), (0, 1, 2), (0, 1, 2, 3)])
def test_clipping_bounds_a_clients_whole_update_by_clip_norm(experts: tuple) -> None:
    policy = PrivacyPolicy(clip_norm=2.0, backbone_share=0.3)
    global_arrays = model()
    deltas = clip_client(update(1, global_arrays, experts, scale=50.0), global_arrays, policy)
    assert np.linalg.norm(flat(deltas)) <= 2.0 * (1 + 1e-12)
    assert np.linalg.norm(flat(deltas, "backbone.")) == pytest.approx(2.0 * math.sqrt(0.3))
    for e in experts:
        expected = 2.0 * math.sqrt(0.7 / len(experts))
        assert np.linalg.norm(flat(deltas, f"experts.{e}.")) == pytest.approx(expected)
    assert "backbone.bn.num_batches_tracked" not in deltas  # integer buffers are not released
    backbone, expert = policy.clip_bounds(len(experts))
    assert backbone**2 + len(experts) * expert**2 == pytest.approx(4.0)


def test_small_updates_are_not_clipped() -> None:
    policy = PrivacyPolicy(clip_norm=100.0)
    global_arrays = model()
    client = update(1, global_arrays, (0, 2), scale=0.01)
    deltas = clip_client(client, global_arrays, policy)
    for name, delta in deltas.items():
        expected = client.arrays[name].astype(np.float64) - global_arrays[name]
        np.testing.assert_allclose(delta, expected)


def test_adding_one_client_moves_the_vector_of_sums_by_at_most_clip_norm() -> None:
    """The L2 sensitivity the accountant assumes: neighbouring rounds, noiseless sums."""
    policy = PrivacyPolicy(clip_norm=1.5, noise_multiplier=0.0)
    global_arrays = model()
    others = [update(c, global_arrays, (c % 4, (c + 1) % 4), scale=3.0) for c in range(5)]
    for extra_experts in [(0,), (1, 3), (0, 1, 2, 3)]:
        extra = update(9, global_arrays, extra_experts, scale=40.0)
        sums = []
        for updates in (others, [*others, extra]):
            total = {n: np.zeros(v.shape) for n, v in global_arrays.items() if v.dtype.kind == "f"}
            for u in updates:
                for name, delta in clip_client(u, global_arrays, policy).items():
                    total[name] += delta
            sums.append(flat(total))
        assert np.linalg.norm(sums[1] - sums[0]) <= 1.5 * (1 + 1e-12)


def test_noise_of_each_expert_is_calibrated_to_its_holders() -> None:
    policy = PrivacyPolicy(clip_norm=0.5, noise_multiplier=2.0)
    global_arrays = model(size=150)  # 22,500 elements per group: a tight std estimate
    holders = {0: 4, 1: 1, 2: 2}  # expert 3: nobody
    updates = [
        update(c, global_arrays, tuple(e for e, n in holders.items() if c < n), scale=0.0)
        for c in range(5)
    ]
    result = private_aggregate(global_arrays, updates, policy, np.random.default_rng(0))
    expected = {"backbone": 5, 0: 4, 1: 1, 2: 2}
    assert result.contributors == expected
    for group, count in expected.items():
        name = "backbone.w" if group == "backbone" else f"experts.{group}.0.weight"
        std = float(np.std(result.arrays[name].astype(np.float64)))
        assert std == pytest.approx(2.0 * 0.5 / count, rel=0.03), group
        assert result.noise_std[group] == pytest.approx(1.0 / count)
    np.testing.assert_array_equal(result.arrays["experts.3.0.weight"], 0.0)  # not released
    assert int(result.arrays["backbone.bn.num_batches_tracked"]) == 7
    assert result.arrays["backbone.w"].dtype == np.float32


def test_without_noise_the_result_is_the_unweighted_mean_of_clipped_deltas() -> None:
    policy = PrivacyPolicy(clip_norm=1e6, noise_multiplier=0.0)
    global_arrays = model()
    updates = [update(c, global_arrays, (0,), scale=0.1) for c in range(3)]
    updates[0].num_examples = 10**9  # weights do not count under DP
    result = private_aggregate(global_arrays, updates, policy, np.random.default_rng(0))
    mean = np.mean([u.arrays["experts.0.0.weight"] for u in updates], axis=0)
    np.testing.assert_allclose(result.arrays["experts.0.0.weight"], mean, rtol=1e-6)


# ------------------------------------------------------------------ accounting
def exact_gaussian_epsilon(mu: float, delta: float) -> float:
    """Exact epsilon of a mu-GDP mechanism (Balle & Wang 2018, Thm 8; Dong et al. 2019).

    T Gaussian mechanisms with noise multiplier sigma compose to mu = sqrt(T) / sigma:
    delta(eps) = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2).
    """
    gap = lambda eps: (  # noqa: E731
        norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * norm.cdf(-eps / mu - mu / 2) - delta
    )
    return brentq(gap, 0.0, 500.0)


def rdp_conversion(rdp: np.ndarray, orders: np.ndarray, delta: float) -> float:
    """RDP -> (eps, delta) of Balle et al. 2020, Thm 21 (the one Opacus uses)."""
    eps = rdp + np.log1p(-1 / orders) - (np.log(delta) + np.log(orders)) / (orders - 1)
    return float(np.min(eps))


@pytest.mark.parametrize(("sigma", "rounds"), [(1.0, 20), (2.0, 20), (5.0, 100)])
def test_accountant_full_participation_matches_the_gaussian_mechanism(sigma, rounds) -> None:
    delta = 1e-5
    eps = epsilon(sigma, 1.0, rounds, delta)
    # Independently: RDP of the Gaussian mechanism is alpha / (2 sigma^2) per round
    # (Mironov 2017, Prop. 7), minimised over a fine grid of orders.
    orders = np.linspace(1.01, 256, 100_000)
    closed_form = rdp_conversion(rounds * orders / (2 * sigma**2), orders, delta)
    assert closed_form <= eps <= closed_form * 1.005
    # And it is a valid, not much looser, bound on the exact epsilon.
    exact = exact_gaussian_epsilon(math.sqrt(rounds) / sigma, delta)
    assert exact <= eps <= exact * 1.1


def test_accountant_with_sampling_matches_the_sampled_gaussian_rdp() -> None:
    """Mironov, Talwar & Zhang 2019, Sec. 3.3, integer orders, against Opacus' epsilon."""
    q, sigma, rounds, delta = 0.1, 1.2, 200, 1e-5
    orders = np.arange(2, 64)
    rdp = []
    for alpha in orders:
        k = np.arange(alpha + 1)
        log_binom = gammaln(alpha + 1) - gammaln(k + 1) - gammaln(alpha - k + 1)
        terms = log_binom + k * math.log(q) + (alpha - k) * math.log1p(-q)
        rdp.append(logsumexp(terms + (k * k - k) / (2 * sigma**2)) / (alpha - 1))
    reference = rdp_conversion(rounds * np.array(rdp), orders.astype(float), delta)
    eps = epsilon(sigma, q, rounds, delta)
    # Opacus also tries fractional orders, so it may only find a (slightly) smaller bound.
    assert reference * 0.95 <= eps <= reference + 1e-9


def test_accountant_reproduces_opacus_published_value() -> None:
    # opacus/tests/accountants_test.py (Opacus 1.6): q=0.04, sigma=1.5, 2250 steps.
    assert epsilon(1.5, 0.04, int(90 / 0.04), 1e-5) == pytest.approx(7.32911117143, rel=1e-9)


def test_accountant_edge_cases() -> None:
    assert epsilon(1.0, 0.5, 0, 1e-5) == 0.0
    assert epsilon(0.0, 0.5, 3, 1e-5) == math.inf
    assert epsilon(1.0, 0.5, 10, 1e-5) < epsilon(1.0, 0.5, 20, 1e-5)
    assert epsilon(2.0, 0.5, 10, 1e-5) < epsilon(1.0, 0.5, 10, 1e-5)
    with pytest.raises(ValueError, match="sample_rate"):
        epsilon(1.0, 0.0, 10, 1e-5)


def test_policy_from_settings() -> None:
    assert PrivacyPolicy.from_settings(load_settings().privacy) is None
    policy = PrivacyPolicy.from_settings(load_settings("privacy.enabled=true").privacy)
    assert policy == PrivacyPolicy()  # the code defaults are the configuration's
    # Bad values are the schema's to refuse (once, naming the key), not the policy's.
    for override in (
        "privacy.backbone_share=1.0",
        "privacy.clip_norm=0",
        "privacy.noise_multiplier=-1",
        "privacy.delta=1.0",
    ):
        with pytest.raises(ConfigError, match=override.split("=")[0].replace(".", r"\.")):
            load_config(f"privacy.enabled=true {override}")
