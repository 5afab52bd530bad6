"""Client-level differential privacy for per-expert aggregation (optional, ``privacy.*``).

Mechanism (one round)
---------------------
Each participant c holds the backbone and its k_c assigned experts. Its update is the
delta ``update - global`` of every floating-point array, clipped in two parts whose
squared bounds add up to ``clip_norm^2`` (C^2):

- the backbone delta to L2 norm ``C * sqrt(s)`` (s = ``backbone_share``),
- each of its k_c expert deltas to ``C * sqrt((1 - s) / k_c)``,

so the concatenation of everything the client contributes has L2 norm at most C,
whatever k_c is: adding or removing one client changes the vector of all per-group
sums by at most C (the L2 sensitivity). Each group's sum then gets independent
Gaussian noise of standard deviation ``sigma * C`` (sigma = ``noise_multiplier``) per
element, and is divided by its number of contributors: expert e by the n_e clients
that held it this round, the backbone by all n participants. The noise on an expert's
average is therefore ``sigma * C / n_e``: calibrated to how many clients held it. An
expert nobody held is not released (keeps its value) and gets no noise. Averages are
unweighted (weights would scale a client's contribution past C); integer buffers
(BatchNorm ``num_batches_tracked``, which would reveal how many batches a client ran)
keep their global value. Released BatchNorm variances are clamped at 0 (noise can
make them negative; post-processing does not change the guarantee).

Accounting
----------
One round is one sampled Gaussian mechanism with noise multiplier sigma on the whole
vector of sums. :func:`epsilon` returns the epsilon of (epsilon, delta)-DP after
``rounds`` rounds from Opacus' RDP accountant (``opacus.accountants.analysis.rdp``:
Mironov et al. 2019 for the sampled Gaussian, Balle et al. 2020 for the conversion).
It assumes:

- add/remove-one-client adjacency (client-level, not example-level, privacy);
- each client takes part in a round independently with probability q (Poisson
  sampling), with q = participants per round / clients; the server samples a fixed
  number uniformly, which the Poisson bound approximates (with ``fraction_train=1``,
  q = 1: no amplification is claimed, and the bound is the plain Gaussian one);
- one mechanism step per round, whatever the local epochs;
- the server is trusted: it sees raw updates and clips and noises them itself (central
  DP). The guarantee protects clients from whoever sees the models the server releases
  (other clients, the final model), not from the server;
- the contributor counts n_e, the assignment and the set of participants are treated
  as public (as Flower's server-side DP wrappers do with the number of sampled
  clients); the per-expert feedback (usage, accuracy, loss) and example counts that
  steer the allocation are not privatised by this mechanism.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from .aggregation import ClientUpdate
from .settings import PrivacySettings
from .update_bounds import BACKBONE, VARIANCE_SUFFIX, group_of


@dataclass(frozen=True)
class PrivacyPolicy:
    """The ``privacy.*`` settings (the defaults equal ``conf/config.yaml``'s).

    Attributes
    ----------
    clip_norm : float
        C: L2 bound of a client's whole update (its sensitivity).
    noise_multiplier : float
        sigma: noise standard deviation on every sum, in units of C (0: no noise,
        epsilon is infinite).
    delta : float
        The delta of the reported (epsilon, delta).
    backbone_share : float
        Share s of C^2 given to the backbone; its experts share the rest equally.
    """

    clip_norm: float = 1.0
    noise_multiplier: float = 1.0
    delta: float = 1e-5
    backbone_share: float = 0.5

    @classmethod
    def from_settings(cls, privacy: PrivacySettings) -> PrivacyPolicy | None:
        """Return the policy of ``privacy.*`` (checked by the schema), or None when off."""
        if not privacy.enabled:
            return None
        return cls(
            privacy.clip_norm, privacy.noise_multiplier, privacy.delta, privacy.backbone_share
        )

    def clip_bounds(self, experts_held: int) -> tuple[float, float]:
        """Return (backbone bound, bound of each expert) for a client holding k experts.

        ``backbone^2 + k * expert^2 = clip_norm^2``.
        """
        backbone = self.clip_norm * math.sqrt(self.backbone_share)
        expert = self.clip_norm * math.sqrt((1.0 - self.backbone_share) / max(experts_held, 1))
        return backbone, expert

    @property
    def noise_std(self) -> float:
        """Standard deviation of the noise added to every element of every sum."""
        return self.noise_multiplier * self.clip_norm


def clip_client(
    update: ClientUpdate, global_arrays: Mapping[str, np.ndarray], policy: PrivacyPolicy
) -> dict[str, np.ndarray]:
    """Return the client's clipped deltas (float64) of its floating-point arrays.

    Their concatenation has L2 norm at most ``policy.clip_norm`` (clipped in float64,
    so no rounding to the arrays' dtype can push it over).
    """
    deltas = {
        name: value.astype(np.float64) - global_arrays[name]
        for name, value in update.arrays.items()
        if np.issubdtype(value.dtype, np.floating)
    }
    squares: dict[str | int, float] = {}
    for name, delta in deltas.items():
        flat = delta.ravel()
        squares[group_of(name)] = squares.get(group_of(name), 0.0) + float(flat @ flat)
    backbone_bound, expert_bound = policy.clip_bounds(len(set(squares) - {BACKBONE}))
    scales = {
        group: min(1.0, (backbone_bound if group == BACKBONE else expert_bound) / norm)
        for group, total in squares.items()
        if (norm := math.sqrt(total)) > 0
    }
    return {name: delta * scales.get(group_of(name), 1.0) for name, delta in deltas.items()}


@dataclass
class PrivateAggregation:
    """The new global arrays and the noise each released group received.

    Attributes
    ----------
    arrays : dict
        New global arrays.
    contributors : dict
        ``group -> n``: clients whose update went into the backbone or expert e.
    noise_std : dict
        ``group -> sigma * C / n``: the noise std on that group's released average.
    """

    arrays: dict[str, np.ndarray]
    contributors: dict[str | int, int] = field(default_factory=dict)
    noise_std: dict[str | int, float] = field(default_factory=dict)


def private_aggregate(
    global_arrays: Mapping[str, np.ndarray],
    updates: Sequence[ClientUpdate],
    policy: PrivacyPolicy,
    rng: np.random.Generator,
) -> PrivateAggregation:
    """Aggregate with clipping and per-group Gaussian noise (see the module docstring).

    Parameters
    ----------
    global_arrays : mapping
        The current global backbone and all experts.
    updates : sequence of ClientUpdate
        Accepted updates (judged by :mod:`flexmoe_core.reply_gate`).
    policy : PrivacyPolicy
        Clip norm, noise multiplier and the backbone's share of the clip.
    rng : numpy.random.Generator
        Source of the noise (seed it per round for a repeatable, resumable run; the
        noise is then known to whoever knows the seed, so keep a deployment's seed
        secret).

    Returns
    -------
    PrivateAggregation
    """
    result = PrivateAggregation(dict(global_arrays))
    deltas = [clip_client(u, global_arrays, policy) for u in updates]
    for name in global_arrays:
        reference = global_arrays[name]
        if not np.issubdtype(reference.dtype, np.floating):
            continue  # integer buffers are not released
        contributions = [d[name] for d in deltas if name in d]
        if not contributions:
            continue
        group, count = group_of(name), len(contributions)
        noisy_sum = np.sum(contributions, axis=0) + rng.normal(
            0.0, policy.noise_std, size=reference.shape
        )
        released = reference + noisy_sum / count
        if name.endswith(VARIANCE_SUFFIX):
            # Noise can push a BatchNorm variance below 0, which makes the model's
            # output NaN; clamping is post-processing, so the guarantee is unchanged.
            released = np.maximum(released, 0.0)
        result.arrays[name] = released.astype(reference.dtype)
        result.contributors[group] = count
        result.noise_std[group] = policy.noise_std / count
    return result


def epsilon(noise_multiplier: float, sample_rate: float, rounds: int, delta: float) -> float:
    """Return epsilon of (epsilon, delta)-DP after ``rounds`` rounds (Opacus' RDP accountant).

    Parameters
    ----------
    noise_multiplier : float
        sigma (0 gives infinity).
    sample_rate : float
        q, the probability that a client takes part in a round.
    rounds : int
        Rounds aggregated with the mechanism so far.
    delta : float
        Target delta.
    """
    if rounds <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate={sample_rate}: must be in (0, 1]")
    try:  # imported here: Opacus loads torch and its own modules (seconds)
        from opacus.accountants import RDPAccountant
        from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
    except ImportError as err:  # the settings check asks for it first (config_schema)
        raise ImportError(
            'privacy accounting needs Opacus: pip install "flexmoe[privacy]"'
        ) from err
    orders = RDPAccountant.DEFAULT_ALPHAS
    rdp = compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=rounds, orders=orders)
    with warnings.catch_warnings():
        # For small sigma the best order is the smallest one and Opacus warns that the
        # bound is loose; epsilon is then in the hundreds or more, which says enough.
        warnings.simplefilter("ignore", UserWarning)
        eps, _ = get_privacy_spent(orders=orders, rdp=rdp, delta=delta)
    return float(eps)
