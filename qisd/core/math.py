"""The Math: robust accumulation of outcome rows into ranked interventions (pure).

Input is the outcome rows of one fingerprint (already verified: ``node_id`` is the signer).
Everything below is per intervention (``intervention_type``):

1. **Replays collapse.** Rows equal in all 15 columns are one row, so a packet delivered 50
   times is one packet (``packet_id`` and other provenance columns are ignored).
2. **One vote per signer.** A signer's vote is its latest row by ``timestamp_utc``; among rows
   with the same timestamp the one with the lowest ``metric_delta`` wins (conservative), then
   the smallest row in column order. A signer's 1,000 packets are one vote.
3. **Weight.** ``w = confidence * s(n)`` with ``s(n) = min(1, ln(2 + n) / ln(2 + N_sat))``
   (``n`` = sample_count, ``N_sat`` = :attr:`MathConfig.sample_saturation`). Bounded in
   [0, 1]: a vote that claims a billion samples weighs no more than one with ``N_sat``, so a
   liar gains at most a factor ``1 / (honest confidence * s(honest n))`` by boasting.
   ``n = 0`` still weighs ``ln 2 / ln(2 + N_sat)`` (0.15 for the default) because packets
   that omit the count are common. Votes of weight 0 are dropped.
4. **Outliers.** ``m`` = weighted median of the deltas, ``MAD`` = weighted median of
   ``|d - m|``; a vote is dropped if ``|d - m| > k * max(1.4826 * MAD, eps)``
   (``k`` = :attr:`MathConfig.mad_cutoff`, ``eps`` = :attr:`MathConfig.min_spread`).
5. **Centres** of the kept votes: weighted median (the estimate used for ranking), weighted
   trimmed mean (``trim`` of the weight cut from each end) and the weighted mean.
6. **Interval.** ``sigma = max(1.4826 * MAD_kept, sigma_pooled, eps)``, where ``sigma_pooled``
   is 1.4826 times the weighted median of every kept vote's distance to its own
   intervention's median, over all interventions of the fingerprint (so a small unanimous
   group cannot claim a zero-width interval). ``n_eff = (sum w)^2 / sum w^2`` (Kish), and
   ``se = sqrt(pi / 2) * sigma / sqrt(n_eff)`` (the asymptotic standard error of a median).
   The interval is ``median +- z * se``.
7. **Eligibility.** ``N`` = distinct signers of the fingerprint (any intervention). An
   intervention is eligible only when its kept signers number more than
   ``byzantine_fraction * N`` (and at least ``min_signers``): a claim that could rest on
   liars alone, if fewer than that fraction lie, is never the top recommendation.
8. **Ranking.** Eligible first, then by the interval's lower bound, then median, then kept
   signers (all descending), then intervention name.

Every sum is taken over votes sorted by a canonical key, so the result is identical (bit for
bit) for the same rows in any order.
"""

from __future__ import annotations

import functools
import json
import math
import operator
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from qisd.errors import UsageError

MAD_TO_SIGMA = 1.4826
"""Scales a median absolute deviation to a normal standard deviation."""
MEDIAN_SE_FACTOR = math.sqrt(math.pi / 2)
"""Standard error of a median over that of a mean, for normal data (1.2533)."""
_TIE = 1e-12
"""Relative tolerance for a cumulative weight that lands exactly on a quantile."""


@dataclass(frozen=True)
class MathConfig:
    """Parameters of The Math; the defaults are the documented ones (docs/elections.md)."""

    sample_saturation: int = 100
    """``N_sat``: a vote's sample-size factor reaches 1 at this many samples and stays there."""
    min_confidence: float = 0.0
    """Votes whose confidence is below this are ignored (weight 0 is always ignored)."""
    mad_cutoff: float = 3.5
    """``k``: a vote further than k robust sigmas from the weighted median is an outlier."""
    min_spread: float = 1e-9
    """``eps``: the smallest sigma (metric units), so identical votes do not divide by zero."""
    trim: float = 0.1
    """Fraction of the weight cut from each end for the trimmed mean (0 <= trim < 0.5)."""
    z: float = 1.96
    """Normal quantile of the two-sided interval (1.96 for 95 %)."""
    byzantine_fraction: float = 1 / 3
    """Fraction of the fingerprint's signers that may lie; support must exceed it (0 = off)."""
    min_signers: int = 1
    """An intervention needs at least this many kept signers to be eligible."""
    metric_name: str | None = None
    """Only rows of this metric count; None counts every row (deltas must then be comparable)."""
    max_age_ms: int | None = None
    """Rows older than ``now_ms - max_age_ms`` are ignored (None = no limit, or no ``now_ms``)."""
    max_future_ms: int = 5 * 60 * 1000
    """Rows stamped later than ``now_ms + max_future_ms`` are ignored (only with ``now_ms``)."""

    def __post_init__(self) -> None:
        if self.sample_saturation < 1:
            raise UsageError("sample_saturation must be at least 1")
        if not 0.0 <= self.min_confidence <= 1.0:
            raise UsageError("min_confidence must lie in [0, 1]")
        if not self.mad_cutoff > 0:
            raise UsageError("mad_cutoff must be positive")
        if not self.min_spread > 0:
            raise UsageError("min_spread must be positive")
        if not 0.0 <= self.trim < 0.5:
            raise UsageError("trim must lie in [0, 0.5)")
        if not self.z >= 0:
            raise UsageError("z must be >= 0")
        if not 0.0 <= self.byzantine_fraction < 1.0:
            raise UsageError("byzantine_fraction must lie in [0, 1)")
        if self.min_signers < 1:
            raise UsageError("min_signers must be at least 1")
        if self.max_age_ms is not None and self.max_age_ms < 0:
            raise UsageError("max_age_ms must be >= 0")
        if self.max_future_ms < 0:
            raise UsageError("max_future_ms must be >= 0")


@dataclass(frozen=True)
class Vote:
    """One signer's vote on one intervention: its latest row, with the weight The Math gave it."""

    signer: str
    intervention: str
    timestamp_ms: int
    delta: float
    weight: float
    confidence: float
    sample_count: int
    outcome_decile: int
    params: str
    """intervention_params as canonical JSON text (sorted keys, compact)."""
    metric_name: str


@dataclass(frozen=True)
class InterventionStats:
    """The robust statistics of one intervention within one fingerprint."""

    intervention: str
    signers: int
    """Distinct signers who voted on it (before outlier removal)."""
    kept_signers: int
    """Signers whose votes survived the MAD rule."""
    outliers: int
    """Votes dropped by the MAD rule."""
    weight: float
    """Total weight of the kept votes."""
    effective_n: float
    """Kish effective sample size of the kept votes."""
    median: float
    """Weighted median of the kept deltas: the estimate that ranks."""
    trimmed_mean: float
    """Weighted trimmed mean of the kept deltas."""
    mean: float
    """Weighted mean of the kept deltas."""
    sigma: float
    """The robust spread the interval uses."""
    ci_low: float
    """Lower bound of the interval: the ranking key."""
    ci_high: float
    """Upper bound of the interval."""
    eligible: bool
    """Whether enough distinct signers back it to be recommended (see the module docstring)."""
    params: str
    """The params (canonical JSON) carrying the most kept weight; ties go to the vote nearest
    the median, then the smallest text."""
    votes: tuple[Vote, ...]
    """The kept votes, sorted by (delta, weight, signer)."""

    @property
    def lower_bound(self) -> float:
        """The interval's lower bound (what ranks interventions)."""
        return self.ci_low


@dataclass(frozen=True)
class Tally:
    """The Math's result for one fingerprint."""

    rows: int
    """Distinct usable rows (replays collapsed, filtered rows excluded)."""
    ignored_rows: int
    """Distinct rows not used: malformed, weight 0, another metric, too old or in the future."""
    signers: int
    """Distinct signers among the usable rows (``N``)."""
    quorum: int
    """Kept signers an intervention needs to be eligible."""
    sigma_pooled: float
    """The pooled robust spread (metric units); Darwinism can scale its losses by it."""
    ranking: tuple[InterventionStats, ...]
    """Every intervention, best first."""

    @property
    def best(self) -> InterventionStats | None:
        """The top eligible intervention, or None when none is eligible."""
        if self.ranking and self.ranking[0].eligible:
            return self.ranking[0]
        return None


# --------------------------------------------------------------------------- robust statistics


def _checked_pairs(
    values: Sequence[float], weights: Sequence[float] | None
) -> list[tuple[float, float]]:
    if weights is None:
        weights = [1.0] * len(values)
    if len(values) != len(weights):
        raise UsageError("values and weights must have the same length")
    pairs = [(float(v), float(w)) for v, w in zip(values, weights, strict=True)]
    if not pairs:
        raise UsageError("no values")
    if any(not math.isfinite(v) for v, _ in pairs):
        raise UsageError("values must be finite")
    if any(not (math.isfinite(w) and w > 0) for _, w in pairs):
        raise UsageError("weights must be finite and positive")
    pairs.sort()
    return pairs


def weighted_median(values: Sequence[float], weights: Sequence[float] | None = None) -> float:
    """The weighted median: the value where the cumulative weight crosses half the total.

    When the cumulative weight lands exactly on the half, the midpoint of that value and the
    next is returned (so equal weights give the ordinary median). Breakdown point: the result
    stays within the range of any subset of the votes holding more than half the weight.
    """
    return _median_of(_checked_pairs(values, weights))


# The tally's own calls skip the checks: its weights are positive and its values finite by
# construction, and a path is tallied once per reader under the trust rule.


def _median_of(pairs: list[tuple[float, float]], total: float | None = None) -> float:
    # ``pairs`` sorted; ``total`` is their fsum when the caller has it (fsum is exact, so any
    # order of the same weights gives the same total).
    if total is None:
        total = math.fsum([w for _, w in pairs])
    half = total / 2
    cum = 0.0
    for i, (value, weight) in enumerate(pairs):
        cum += weight
        if abs(cum - half) <= _TIE * total and i + 1 < len(pairs):
            return (value + pairs[i + 1][0]) / 2
        if cum > half:
            return value
    return pairs[-1][0]


def weighted_mad(values: Sequence[float], weights: Sequence[float] | None = None) -> float:
    """Weighted median absolute deviation from the weighted median (unscaled)."""
    centre = weighted_median(values, weights)
    return weighted_median([abs(float(v) - centre) for v in values], weights)


def _mad_of(pairs: list[tuple[float, float]], total: float | None = None) -> float:
    if total is None:
        total = math.fsum([w for _, w in pairs])
    centre = _median_of(pairs, total)
    return _median_of(sorted([(abs(v - centre), w) for v, w in pairs]), total)


def weighted_trimmed_mean(
    values: Sequence[float], weights: Sequence[float] | None = None, trim: float = 0.1
) -> float:
    """Weighted mean of the values left after cutting ``trim`` of the weight off each end.

    A vote straddling a cut counts with the part of its weight inside the kept band.
    """
    if not 0.0 <= trim < 0.5:
        raise UsageError("trim must lie in [0, 0.5)")
    return _trimmed_of(_checked_pairs(values, weights), trim)


def _trimmed_of(pairs: list[tuple[float, float]], trim: float, total: float | None = None) -> float:
    if total is None:
        total = math.fsum([w for _, w in pairs])
    low, high = trim * total, (1.0 - trim) * total
    cum = 0.0
    parts: list[tuple[float, float]] = []
    for value, weight in pairs:
        start, cum = cum, cum + weight
        inside = min(cum, high) - max(start, low)
        if inside > 0:
            parts.append((value, inside))
    kept = math.fsum(w for _, w in parts)
    if kept <= 0:  # every vote straddles both cuts (one vote): its own value
        return _median_of(pairs, total)
    return math.fsum(v * w for v, w in parts) / kept


def effective_n(weights: Sequence[float]) -> float:
    """Kish's effective sample size ``(sum w)^2 / sum w^2``."""
    ws = sorted(float(w) for w in weights)
    squares = math.fsum(w * w for w in ws)
    if squares <= 0:
        raise UsageError("weights must not all be zero")
    return math.fsum(ws) ** 2 / squares


def vote_weight(confidence: float, sample_count: int, config: MathConfig) -> float:
    """``confidence * min(1, ln(2 + n) / ln(2 + N_sat))``, in [0, 1]."""
    n = max(0, sample_count)
    size = min(1.0, math.log(2 + n) / math.log(2 + config.sample_saturation))
    return max(0.0, min(1.0, confidence)) * size


# --------------------------------------------------------------------------- rows to votes

_RowKey = tuple[Any, ...]


@functools.lru_cache(maxsize=4096)
def _canonical_params_text(text: str) -> str | None:
    # Sites reuse a handful of params texts; parsing each row's copy again dominated a tally.
    try:
        parsed = json.loads(text)
    except ValueError:
        return None
    return _canonical_params_value(parsed)


def _canonical_params_value(parsed: object) -> str | None:
    if not isinstance(parsed, dict):
        return None
    try:
        return json.dumps(parsed, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError):
        return None


def _canonical_params(value: object) -> str | None:
    if value is None:
        return "{}"
    if isinstance(value, str):
        return _canonical_params_text(value)
    return _canonical_params_value(value)


def _whole(value: Any) -> int:
    # numpy and Arrow integers are accepted (operator.index); bools and floats are not.
    if isinstance(value, bool):
        raise TypeError("a bool is not a whole number")
    return operator.index(value)


def _row_key(row: Mapping[str, Any]) -> _RowKey | None:
    """The row's 15 columns as a comparable tuple, or None if it cannot be a vote."""
    try:
        signer = row["node_id"]
        intervention = row["intervention_type"]
        ts = _whole(row["timestamp_utc"])
        delta = float(row["metric_delta"])
        confidence = float(row["confidence"])
        value = row.get("metric_value")
        metric_value = 0.0 if value is None else float(value)
        samples = row.get("sample_count")
        samples = 0 if samples is None else _whole(samples)
        decile = row.get("outcome_decile")
        decile = 0 if decile is None else _whole(decile)
    except (KeyError, TypeError, ValueError):
        return None
    if not isinstance(signer, str) or not signer or not isinstance(intervention, str):
        return None
    if samples < 0:
        return None
    if not (math.isfinite(delta) and math.isfinite(metric_value)):
        return None
    if not (math.isfinite(confidence) and 0.0 <= confidence <= 1.0):
        return None
    params = _canonical_params(row.get("intervention_params"))
    if params is None:
        return None
    text = []
    for name in (
        "domain",
        "problem_type",
        "model_architecture",
        "training_phase",
        "metric_name",
        "raw_data_hash",
    ):
        v = row.get(name)
        text.append("" if v is None else str(v))
    domain, problem, arch, phase, metric, raw = text
    return (
        signer, ts, domain, problem, arch, phase, metric, delta, metric_value, confidence,
        intervention, params, decile, samples, raw,
    )  # fmt: skip


def as_rows(rows: Iterable[Mapping[str, Any]] | Any) -> list[Mapping[str, Any]]:
    """Rows as mappings; a ``pyarrow.Table`` (anything with ``to_pylist``) is converted."""
    to_pylist = getattr(rows, "to_pylist", None)
    if callable(to_pylist):
        out = to_pylist()
        if not isinstance(out, list):
            raise UsageError("to_pylist() did not return a list of rows")
        return out
    return list(rows)


def _vote_order(key: _RowKey) -> tuple[Any, ...]:
    # Latest wins; at equal timestamps the lower delta wins (a signer cannot gain by
    # sending two rows at once), then the whole row decides, so the choice is total.
    return (key[1], -key[7], key)


def collect_votes(
    rows: Iterable[Mapping[str, Any]] | Any,
    config: MathConfig | None = None,
    *,
    now_ms: int | None = None,
) -> tuple[list[Vote], int, int]:
    """One vote per signer per intervention, with the distinct usable and ignored row counts."""
    votes, _history, n_rows, n_ignored = collect_history(rows, config, now_ms=now_ms)
    return votes, n_rows, n_ignored


Report = tuple[int, float]
"""One distinct usable row of a signer on an intervention: (timestamp_ms, metric_delta)."""


def collect_history(
    rows: Iterable[Mapping[str, Any]] | Any,
    config: MathConfig | None = None,
    *,
    now_ms: int | None = None,
) -> tuple[list[Vote], dict[tuple[str, str], tuple[Report, ...]], int, int]:
    """:func:`collect_votes` plus every signer's reports on every intervention.

    The history maps (signer, intervention) to that signer's distinct usable rows there, in
    the order that picks the vote (so a vote is the last report of its history).
    """
    config = config or MathConfig()
    distinct: set[_RowKey] = set()
    ignored: set[Any] = set()
    for row in as_rows(rows):
        key = _row_key(row)
        if key is None:
            ignored.add(repr(sorted((str(k), repr(v)) for k, v in row.items())))
            continue
        if (
            (config.metric_name is not None and key[6] != config.metric_name)
            or key[9] < config.min_confidence
            or vote_weight(key[9], key[13], config) <= 0
            or (now_ms is not None and key[1] > now_ms + config.max_future_ms)
            or (
                now_ms is not None
                and config.max_age_ms is not None
                and key[1] < now_ms - config.max_age_ms
            )
        ):
            ignored.add(key)
            continue
        distinct.add(key)
    slots: dict[tuple[str, str], list[_RowKey]] = {}
    for key in distinct:
        slots.setdefault((key[0], key[10]), []).append(key)
    latest: dict[tuple[str, str], _RowKey] = {}
    history: dict[tuple[str, str], tuple[Report, ...]] = {}
    for slot, keys in slots.items():
        keys.sort(key=_vote_order)
        latest[slot] = keys[-1]
        history[slot] = tuple((k[1], k[7]) for k in keys)
    votes = [
        Vote(
            signer=k[0],
            intervention=k[10],
            timestamp_ms=k[1],
            delta=k[7],
            weight=vote_weight(k[9], k[13], config),
            confidence=k[9],
            sample_count=k[13],
            outcome_decile=k[12],
            params=k[11],
            metric_name=k[6],
        )
        for k in latest.values()
    ]
    votes.sort(key=lambda v: (v.intervention, v.delta, v.weight, v.signer))
    return votes, history, len(distinct), len(ignored)


# --------------------------------------------------------------------------- the tally


@dataclass(frozen=True)
class _Kept:
    intervention: str
    signers: int
    votes: tuple[Vote, ...]
    weights: tuple[float, ...]
    """The weight the tally gives each kept vote (its own, or times a trust factor)."""
    pairs: list[tuple[float, float]]
    """(delta, weight) of the kept votes, sorted."""
    total: float
    """fsum of the kept weights."""
    median: float


def _drop_outliers(name: str, votes: list[Vote], weights: list[float], config: MathConfig) -> _Kept:
    pairs = sorted(zip([v.delta for v in votes], weights, strict=True))
    total = math.fsum(weights)
    centre = _median_of(pairs, total)
    scale = max(MAD_TO_SIGMA * _mad_of(pairs, total), config.min_spread)
    cutoff = config.mad_cutoff * scale
    kept = [(v, w) for v, w in zip(votes, weights, strict=True) if abs(v.delta - centre) <= cutoff]
    # Filtering a sorted list keeps it sorted.
    kept_pairs = [p for p in pairs if abs(p[0] - centre) <= cutoff]
    kept_total = total if len(kept) == len(votes) else math.fsum([w for _, w in kept_pairs])
    # The centre is within the cutoff of itself, and it is one of the deltas or the midpoint
    # of two, so at least one vote always survives.
    kept_median = _median_of(kept_pairs, kept_total)
    return _Kept(
        name,
        len(votes),
        tuple(v for v, _ in kept),
        tuple(w for _, w in kept),
        kept_pairs,
        kept_total,
        kept_median,
    )


def _stats(group: _Kept, sigma_pooled: float, quorum: int, config: MathConfig) -> InterventionStats:
    votes = group.votes
    deltas = [v.delta for v in votes]
    weights = group.weights
    pairs, total = group.pairs, group.total
    n_eff = total**2 / math.fsum([w * w for w in weights])
    own = MAD_TO_SIGMA * _mad_of(pairs, total)
    sigma = max(own, sigma_pooled, config.min_spread)
    se = MEDIAN_SE_FACTOR * sigma / math.sqrt(n_eff)
    by_params: dict[str, tuple[float, float]] = {}
    for v, vw in zip(votes, weights, strict=True):
        w, near = by_params.get(v.params, (0.0, math.inf))
        by_params[v.params] = (w + vw, min(near, abs(v.delta - group.median)))
    params = min(by_params, key=lambda p: (-by_params[p][0], by_params[p][1], p))
    return InterventionStats(
        intervention=group.intervention,
        signers=group.signers,
        kept_signers=len(votes),
        outliers=group.signers - len(votes),
        weight=total,
        effective_n=n_eff,
        median=group.median,
        trimmed_mean=_trimmed_of(pairs, config.trim, total),
        mean=math.fsum(d * w for d, w in zip(deltas, weights, strict=True)) / total,
        sigma=sigma,
        ci_low=group.median - config.z * se,
        ci_high=group.median + config.z * se,
        eligible=len(votes) >= quorum,
        params=params,
        votes=votes,
    )


def quorum_for(signers: int, config: MathConfig) -> int:
    """Kept signers an intervention needs: more than ``byzantine_fraction * signers``."""
    # The epsilon keeps 135 * (1/3) from flooring to 44 through rounding.
    strict = math.floor(config.byzantine_fraction * signers + 1e-9) + 1
    return max(config.min_signers, strict if config.byzantine_fraction > 0 else 1)


def tally(
    rows: Iterable[Mapping[str, Any]] | Any,
    config: MathConfig | None = None,
    *,
    now_ms: int | None = None,
) -> Tally:
    """Run The Math over the rows of one fingerprint (any order, replays allowed).

    ``rows`` are mappings with the 15 packet columns (extra keys such as ``packet_id`` are
    ignored) or a ``pyarrow.Table``. ``now_ms`` enables the age and future filters.
    """
    config = config or MathConfig()
    votes, n_rows, n_ignored = collect_votes(rows, config, now_ms=now_ms)
    return tally_votes(votes, config, rows=n_rows, ignored_rows=n_ignored)


def tally_votes(
    votes: Sequence[Vote],
    config: MathConfig | None = None,
    *,
    rows: int,
    ignored_rows: int,
    factors: Mapping[str, float] | None = None,
    only: Iterable[str] | None = None,
) -> Tally:
    """The tally of votes already collected by :func:`collect_votes` (steps 4 to 8).

    ``factors`` maps a signer to a multiplier of its votes' weights (a signer not in it keeps
    factor 1); every weighted step (median, MAD, centres, interval, params) uses the
    multiplied weight, and ``InterventionStats.weight`` is their total. Counts (signers,
    quorum, kept signers) are in keys, whatever the factors. ``only`` limits the factors to
    votes on those interventions. No factors is :func:`tally` itself.
    """
    config = config or MathConfig()
    table = dict(factors or {})
    if any(not (math.isfinite(f) and f > 0) for f in table.values()):
        raise UsageError("weight factors must be finite and positive")
    where = None if only is None else frozenset(only)
    signers = len({v.signer for v in votes})
    quorum = quorum_for(signers, config)
    groups: dict[str, tuple[list[Vote], list[float]]] = {}
    for vote in sorted(votes, key=lambda v: (v.intervention, v.delta, v.weight, v.signer)):
        group, weights = groups.setdefault(vote.intervention, ([], []))
        group.append(vote)
        factor = table.get(vote.signer) if where is None or vote.intervention in where else None
        weights.append(vote.weight if factor is None else vote.weight * factor)
    kept = [_drop_outliers(name, *groups[name], config) for name in sorted(groups)]
    residuals: list[tuple[float, float]] = [
        (abs(v.delta - g.median), w) for g in kept for v, w in zip(g.votes, g.weights, strict=True)
    ]
    sigma_pooled = 0.0
    if residuals:
        sigma_pooled = MAD_TO_SIGMA * _median_of(sorted(residuals))
    stats = [_stats(g, sigma_pooled, quorum, config) for g in kept]
    stats.sort(
        key=lambda s: (not s.eligible, -s.ci_low, -s.median, -s.kept_signers, s.intervention)
    )
    return Tally(
        rows=rows,
        ignored_rows=ignored_rows,
        signers=signers,
        quorum=quorum,
        sigma_pooled=sigma_pooled,
        ranking=tuple(stats),
    )
