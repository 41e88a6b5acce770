"""The trust rule: The Math weighted by what this site has checked itself (pure).

The quorum rule (:mod:`qisd.core.math`) recommends only what more than a third of a path's
signers back, so liars under a third never make their pick the recommendation on their own,
but a genuinely better intervention waits for a third of the signers to try it. The trust
rule keeps that guarantee and learns faster, with evidence only this site can vouch for:
its own outcome rows (``node_id`` = this site), which it reports after it tried something.

1. **Standing.** For each intervention this site reported, its latest own row is the check.
   Every other signer's last report on that intervention made *before* the check (by
   timestamp) is a prediction of it: it *agrees* when
   ``|prediction - check| <= agreement_sigmas * sqrt(2) * sigma``, else it *disagrees*.
   ``sigma`` is the larger of the path's pooled spread and the spread of this site's own
   repeated outcomes (:func:`own_spread`): signers reporting one identical value can shrink
   the first, never the second. One check per (signer, intervention), so a signer's thousand
   packets are checked once per intervention.
   ``trust = max(0, a - disagreement_cost * d) / (a + d + 1)`` for ``a`` agreements and ``d``
   disagreements, in [0, 1): a new key has none, a caught liar loses it. This site's own key
   is never checked, so its own reports never raise its weight.
2. **Weight.** On the interventions this site tried, each vote's weight (The Math's ``w``) is
   multiplied by ``1 + trust * (1 / untrusted_share - 1)``: a fully trusted signer's vote
   weighs ``1 / untrusted_share`` times an unknown key's. Elsewhere weights are The Math's:
   trust earned on what this site checked must not carry a claim it cannot check (a liar
   that copies honest reports everywhere but on its pick earns full trust). The Math then
   runs as before (one vote per signer, MAD outliers, centres, intervals); counts stay in keys.
3. **Eligibility.** An intervention is eligible by **quorum**: more than the Byzantine
   fraction of the path's keys among its kept votes (the quorum rule itself) *and* of the
   path's signers counted by their trust factors (with no trust this is the same condition;
   with trust, fresh keys cannot reach it by numbers); or by **own outcome**: this site tried
   it and the median of all its own outcomes there agrees with the path's estimate (same
   tolerance as step 1). Nothing else: trust never makes a claim eligible on its own.
4. **Ranking.** An intervention eligible by quorum ranks by its interval's lower bound; one
   eligible by own outcome only ranks by the lower of that and the lower bound of this
   site's own outcomes alone (``own median - z * sqrt(pi/2) * sigma / sqrt(n_own)``), so
   other signers can lower its rank but never raise it above what this site saw itself.
5. **Exploring.** When an intervention that is not eligible has a lower bound above the best
   eligible one's rank key, the rule withholds its recommendation (``withheld_for``):
   trying it is how a site settles whether it is real (its own outcome makes it eligible,
   and checks every signer that reported it).

The guarantee, whatever the liars do (constant, many fresh keys, honest for a while, copying
honest reports): a recommendation has either more than a third of the path's keys among its
kept votes (so at least one honest signer when liars are fewer), or this site's own outcomes
agree with it and it ranks no higher than they showed. The cost: an honest swarm's new best
waits until it reaches a third of the signers or until this site tries it; withholding
makes sites try it sooner. docs/elections.md has the reasons and the limits.

:class:`Evidence` is the part of a path's rows every site shares (parsed once);
:func:`elect` is one site's view of it. Deterministic: the same rows and arguments give an
identical result.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from qisd.core.math import (
    MAD_TO_SIGMA,
    MEDIAN_SE_FACTOR,
    InterventionStats,
    MathConfig,
    Report,
    Tally,
    Vote,
    collect_history,
    tally_votes,
    weighted_median,
)
from qisd.errors import UsageError

ROUTE_QUORUM = "quorum"
"""Eligible because more than the Byzantine fraction of the path's signers back it."""
ROUTE_OWN = "own_outcome"
"""Eligible because this site tried it and reported its own outcome."""


@dataclass(frozen=True)
class TrustConfig:
    """Parameters of the trust rule; the defaults are documented in docs/elections.md."""

    untrusted_share: float = 0.05
    """Weight of an unknown key's vote relative to a fully trusted signer's (0 < x <= 1)."""
    agreement_sigmas: float = 2.5
    """A prediction agrees with this site's outcome within this many ``sqrt(2) * sigma``."""
    disagreement_cost: float = 3.0
    """Agreements one disagreement cancels (>= 0)."""
    withhold: bool = True
    """Withhold the recommendation while an unverified claim beats every eligible one."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.untrusted_share) and 0.0 < self.untrusted_share <= 1.0):
            raise UsageError("untrusted_share must lie in (0, 1]")
        if not (math.isfinite(self.agreement_sigmas) and self.agreement_sigmas > 0):
            raise UsageError("agreement_sigmas must be positive")
        if not (math.isfinite(self.disagreement_cost) and self.disagreement_cost >= 0):
            raise UsageError("disagreement_cost must be >= 0")


@dataclass(frozen=True)
class Standing:
    """What this site's own outcomes say about one other signer."""

    signer: str
    agreements: int
    disagreements: int
    trust: float
    """``max(0, a - cost * d) / (a + d + 1)``, in [0, 1)."""


@dataclass(frozen=True)
class Evidence:
    """The part of one path's rows that does not depend on who reads it (parse once)."""

    config: MathConfig
    now_ms: int | None
    votes: tuple[Vote, ...]
    rows: int
    ignored_rows: int
    base: Tally
    """The quorum rule's tally of the same rows (no trust)."""
    reports: Mapping[str, tuple[tuple[str, tuple[int, ...], tuple[float, ...]], ...]]
    """intervention -> (signer, timestamps, deltas) of every signer's reports, by signer."""

    @classmethod
    def from_rows(
        cls,
        rows: Iterable[Mapping[str, Any]] | Any,
        config: MathConfig | None = None,
        *,
        now_ms: int | None = None,
    ) -> Evidence:
        """Collect the votes and report histories of a path's rows (see :func:`tally`)."""
        config = config or MathConfig()
        votes, history, n_rows, n_ignored = collect_history(rows, config, now_ms=now_ms)
        base = tally_votes(votes, config, rows=n_rows, ignored_rows=n_ignored)
        by_x: dict[str, list[tuple[str, tuple[int, ...], tuple[float, ...]]]] = {}
        for (signer, x), reps in sorted(history.items()):
            ordered = sorted(reps)  # by timestamp (ties: lower delta first)
            by_x.setdefault(x, []).append(
                (signer, tuple(t for t, _ in ordered), tuple(d for _, d in ordered))
            )
        return cls(
            config=config,
            now_ms=now_ms,
            votes=tuple(votes),
            rows=n_rows,
            ignored_rows=n_ignored,
            base=base,
            reports={x: tuple(v) for x, v in by_x.items()},
        )


@dataclass(frozen=True)
class Verdict:
    """One intervention under the trust rule: its statistics and why it is (not) eligible."""

    stats: InterventionStats
    """The Math's statistics with trust-weighted votes (``eligible`` is the quorum's)."""
    route: str | None
    """:data:`ROUTE_QUORUM`, :data:`ROUTE_OWN`, or None (not eligible)."""
    rank_key: float | None
    """What ranks it among the eligible (None when not eligible)."""
    own_delta: float | None
    """The median of this site's own outcomes for it, if it tried it."""
    trusted_signers: int
    """Kept signers this site has some trust in."""
    backing_share: float
    """The kept signers' share of all the path's signers, each counted by its trust factor."""

    @property
    def eligible(self) -> bool:
        """Whether it may be recommended."""
        return self.route is not None


@dataclass(frozen=True)
class Election:
    """One site's trust-rule election over one path."""

    own: str
    tally: Tally
    """The trust-weighted tally (its ``ranking`` order is the quorum rule's, reweighted)."""
    verdicts: tuple[Verdict, ...]
    """Eligible first by rank key, then the rest by lower bound."""
    standings: tuple[Standing, ...]
    """Every signer this site could check, by signer."""
    withheld_for: str | None
    """The unverified intervention whose lower bound beats every eligible one, if withheld."""

    @property
    def best(self) -> Verdict | None:
        """The recommendation: the top eligible verdict, unless withheld."""
        if self.withheld_for is None and self.verdicts and self.verdicts[0].eligible:
            return self.verdicts[0]
        return None

    @property
    def best_eligible(self) -> Verdict | None:
        """The top eligible verdict, withheld or not."""
        if self.verdicts and self.verdicts[0].eligible:
            return self.verdicts[0]
        return None


def trust_of(agreements: int, disagreements: int, config: TrustConfig) -> float:
    """``max(0, a - cost * d) / (a + d + 1)``: 0 for a new key, below 1 always."""
    if agreements < 0 or disagreements < 0:
        raise UsageError("counts must be >= 0")
    earned = agreements - config.disagreement_cost * disagreements
    return max(0.0, earned) / (agreements + disagreements + 1)


def own_outcomes(evidence: Evidence, own: str) -> dict[str, Report]:
    """This site's latest own report per intervention (its vote there)."""
    return {v.intervention: (v.timestamp_ms, v.delta) for v in evidence.votes if v.signer == own}


def own_reports(evidence: Evidence, own: str, intervention: str) -> tuple[float, ...]:
    """Every outcome this site reported for ``intervention``, oldest first.

    Each report is a separate trial, so all of them count here (the vote is only the latest).
    """
    for signer, _times, deltas in evidence.reports.get(intervention, ()):
        if signer == own:
            return deltas
    return ()


def own_spread(evidence: Evidence, own: str) -> float:
    """The noise of this site's own outcomes: 1.4826 x the median distance of its reports to
    their intervention's own median (0 with fewer than three repeated reports).

    Nobody else can shrink it, unlike the path's pooled spread, which signers reporting one
    identical value (sybils) pull towards 0.
    """
    residuals: list[float] = []
    for reports in evidence.reports.values():
        for signer, _times, deltas in reports:
            if signer == own and len(deltas) > 1:
                centre = weighted_median(deltas)
                residuals += [abs(d - centre) for d in deltas]
    if len(residuals) < 3:
        return 0.0
    return MAD_TO_SIGMA * weighted_median(residuals)


def _sigma(evidence: Evidence, own: str) -> float:
    return max(evidence.base.sigma_pooled, own_spread(evidence, own), evidence.config.min_spread)


def standings(
    evidence: Evidence, own: str, config: TrustConfig | None = None
) -> tuple[Standing, ...]:
    """Check every other signer's earlier reports against this site's own outcomes."""
    config = config or TrustConfig()
    return _standings(evidence, own, config, _sigma(evidence, own))


def _standings(
    evidence: Evidence, own: str, config: TrustConfig, sigma: float
) -> tuple[Standing, ...]:
    tolerance = config.agreement_sigmas * math.sqrt(2.0) * sigma
    agree: dict[str, int] = {}
    disagree: dict[str, int] = {}
    for x, (t_own, d_own) in sorted(own_outcomes(evidence, own).items()):
        for signer, times, deltas in evidence.reports.get(x, ()):
            if signer == own:
                continue
            # The signer's last report strictly before this site's check: a prediction, not a
            # copy of the outcome it is checked against.
            i = bisect.bisect_left(times, t_own)
            if i == 0:
                continue
            if abs(deltas[i - 1] - d_own) <= tolerance:
                agree[signer] = agree.get(signer, 0) + 1
            else:
                disagree[signer] = disagree.get(signer, 0) + 1
    out = []
    for signer in sorted({*agree, *disagree}):
        a, d = agree.get(signer, 0), disagree.get(signer, 0)
        out.append(Standing(signer, a, d, trust_of(a, d, config)))
    return tuple(out)


def elect(evidence: Evidence, own: str, config: TrustConfig | None = None) -> Election:
    """The trust rule for the site whose key is ``own`` (see the module docstring)."""
    config = config or TrustConfig()
    if not own:
        raise UsageError("the site's own node id must be non-empty")
    sigma = _sigma(evidence, own)
    tolerance = config.agreement_sigmas * math.sqrt(2.0) * sigma
    stand = _standings(evidence, own, config, sigma)
    boost = 1.0 / config.untrusted_share - 1.0
    factors = {s.signer: 1.0 + s.trust * boost for s in stand if s.trust > 0}
    checked = set(own_outcomes(evidence, own))
    # Trust weighs votes only where this site can check them: on an intervention it never
    # tried, a trusted signer may be a liar that copied honest reports everywhere else.
    weighted = (
        tally_votes(
            evidence.votes,
            evidence.config,
            rows=evidence.rows,
            ignored_rows=evidence.ignored_rows,
            factors=factors,
            only=checked,
        )
        if factors and checked
        else evidence.base
    )
    # The trust-weighted quorum: the kept signers' factors must also exceed the Byzantine
    # fraction of every signer's factor. With no trust it is the count quorum itself; with
    # trust, fresh keys (sybils) cannot reach it by numbers alone.
    signer_factor = {v.signer: factors.get(v.signer, 1.0) for v in evidence.votes}
    all_backing = math.fsum(sorted(signer_factor.values()))
    weighted_bar = evidence.config.byzantine_fraction * all_backing
    z = evidence.config.z
    verdicts = []
    for stats in weighted.ranking:
        reports = own_reports(evidence, own, stats.intervention)
        mine = weighted_median(reports) if reports else None
        backing = math.fsum(sorted(signer_factor[v.signer] for v in stats.votes))
        route: str | None = None
        key: float | None = None
        if stats.eligible and backing > weighted_bar:
            route, key = ROUTE_QUORUM, stats.ci_low
        elif mine is not None and abs(mine - stats.median) <= tolerance:
            # This site's own outcomes confirm the path's estimate. It ranks by the lower of
            # the path's lower bound and the lower bound of its own outcomes alone: others
            # can lower its rank but never raise it above what this site saw itself.
            own_low = mine - z * MEDIAN_SE_FACTOR * sigma / math.sqrt(len(reports))
            route, key = ROUTE_OWN, min(stats.ci_low, own_low)
        trusted = sum(1 for v in stats.votes if v.signer in factors)
        verdicts.append(Verdict(stats, route, key, mine, trusted, backing / all_backing))
    verdicts.sort(
        key=lambda v: (
            not v.eligible,
            -(v.rank_key if v.rank_key is not None else v.stats.ci_low),
            -v.stats.median,
            -v.stats.kept_signers,
            v.stats.intervention,
        )
    )
    withheld: str | None = None
    top = verdicts[0] if verdicts and verdicts[0].eligible else None
    if config.withhold and top is not None and top.rank_key is not None:
        lead = min(
            (v for v in verdicts if not v.eligible),
            key=lambda v: (-v.stats.ci_low, -v.stats.median, v.stats.intervention),
            default=None,
        )
        if lead is not None and lead.stats.ci_low > top.rank_key:
            withheld = lead.stats.intervention
    return Election(own, weighted, tuple(verdicts), stand, withheld)
