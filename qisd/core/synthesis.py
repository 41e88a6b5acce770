"""Synthesis: the ranked recommendation for one fingerprint path (pure, deterministic).

:func:`synthesize` runs The Math over the rows of one path and returns a JSON-serialisable
dict. Every status has the same keys, so clients never test for presence:

``status``
    ``"synthesized"``: an intervention is eligible (backed by more than the Byzantine fraction
    of the path's distinct signers, after outliers). ``"no_packets"``: no usable row at all
    (none given, or every row malformed, of weight 0, of another metric or out of the time
    window). ``"no_trustworthy_packets"``: usable rows exist but no intervention is eligible.
``packets_analyzed``
    Distinct usable rows (replays counted once).
``mean_metric_delta``
    Weighted mean of the kept votes of the eligible interventions (None without one).
``best_intervention``, ``best_params``, ``best_delta``
    The top eligible intervention, the params carrying most of its kept weight (parsed), and
    its weighted median delta (the robust estimate, not the single highest row).
``top_decile_nodes``
    Distinct signers with a kept vote of outcome_decile >= 8 in an eligible intervention.
``recommendation``
    A sentence for a human (None unless synthesized); ``reason`` says why when not.
``interventions``
    Every intervention with its robust statistics, best first.
``worth_exploring``
    Interventions not (yet) eligible whose median beats the best's (all of them, by median,
    when none is eligible). Too few signers back them to recommend them, and the only way
    to settle it is for more sites to try them: honest trials either confirm them or outvote
    the liars who may have put them there. Sites that explore should start here.

``rule``, ``own_node_id``, ``withheld_for``, ``trusted_signers``
    Which election ran: ``"quorum"`` (no ``own_node_id``: The Math's quorum rule) or
    ``"trust"`` (:mod:`qisd.core.trust`: the site's own outcome rows, those signed by
    ``own_node_id``, check the other signers and can make what it tried eligible). Under the
    trust rule ``withheld_for`` names the unverified intervention that beats every eligible
    one while the recommendation is withheld, and ``trusted_signers`` counts the signers this
    site trusts; both are None under the quorum rule.
``interventions[*]``
    Besides the statistics: ``eligible_by`` (``"quorum"``, ``"own_outcome"`` or None),
    ``rank_key`` (what ranks it among the eligible), ``own_delta`` (this site's latest own
    outcome for it), ``trusted_signers`` and ``why`` (a sentence: why it is or is not
    the recommendation).

Same rows in any order, with any replays, and the same arguments give an identical dict.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from typing import Any

from qisd.core.math import InterventionStats, MathConfig, Tally, tally
from qisd.core.trust import ROUTE_QUORUM, Election, Evidence, TrustConfig, Verdict, elect
from qisd.errors import UsageError

STATUS_SYNTHESIZED = "synthesized"
STATUS_NO_PACKETS = "no_packets"
STATUS_NO_TRUSTWORTHY = "no_trustworthy_packets"
TOP_DECILE = 8
"""outcome_decile at or above which a signer counts in ``top_decile_nodes``."""


def _number(value: float) -> float | None:
    # JSON has no infinities or NaN; The Math never produces them, this is a last guard.
    return value if math.isfinite(value) else None


def intervention_summary(
    stats: InterventionStats, verdict: Verdict | None = None, why: str | None = None
) -> dict[str, Any]:
    """The JSON form of one intervention's statistics (and its trust-rule verdict, if any)."""
    if verdict is None:
        eligible = stats.eligible
        route = ROUTE_QUORUM if eligible else None
        key = stats.ci_low if eligible else None
        own_delta = trusted = None
    else:
        eligible, route, key = verdict.eligible, verdict.route, verdict.rank_key
        own_delta, trusted = verdict.own_delta, verdict.trusted_signers
    share = None if verdict is None else _number(verdict.backing_share)
    return {
        "intervention": stats.intervention,
        "eligible": eligible,
        "eligible_by": route,
        "rank_key": None if key is None else _number(key),
        "own_delta": None if own_delta is None else _number(own_delta),
        "trusted_signers": trusted,
        "backing_share": share,
        "why": why,
        "signers": stats.signers,
        "kept_signers": stats.kept_signers,
        "outliers": stats.outliers,
        "weight": _number(stats.weight),
        "effective_n": _number(stats.effective_n),
        "median_delta": _number(stats.median),
        "trimmed_mean_delta": _number(stats.trimmed_mean),
        "mean_delta": _number(stats.mean),
        "sigma": _number(stats.sigma),
        "ci_low": _number(stats.ci_low),
        "ci_high": _number(stats.ci_high),
        "params": json.loads(stats.params),
    }


def _quorum_why(stats: InterventionStats, result: Tally, rank: int) -> str:
    if not stats.eligible:
        return (
            f"not eligible: {stats.kept_signers} kept signers ({stats.outliers} outliers "
            f"dropped), the quorum is {result.quorum} of {result.signers}"
        )
    if rank == 0:
        return f"recommended: the best lower bound ({stats.ci_low:+.4g}) among the eligible"
    return f"eligible, ranked {rank + 1}: lower bound {stats.ci_low:+.4g}"


def _trust_why(verdict: Verdict, election: Election, rank: int, config: MathConfig) -> str:
    stats = verdict.stats
    backing = (
        f"{stats.kept_signers} kept signers ({verdict.trusted_signers} trusted, "
        f"{stats.outliers} outliers dropped), quorum {election.tally.quorum} of "
        f"{election.tally.signers}, trust-weighted share {verdict.backing_share:.2f}"
    )
    if not verdict.eligible:
        if stats.eligible:
            text = (
                f"not eligible: {backing}, under the {config.byzantine_fraction:.2f} this "
                "site's trust requires"
            )
        else:
            text = f"not eligible: {backing}"
        if verdict.own_delta is None:
            text += ", and this site has not reported it"
        else:
            text += (
                f", and this site's own outcomes (median {verdict.own_delta:+.4g}) disagree "
                f"with the path's estimate ({stats.median:+.4g})"
            )
        if election.withheld_for == stats.intervention:
            text += (
                f"; its lower bound {stats.ci_low:+.4g} beats every eligible one, so the "
                "recommendation is withheld until it is tried"
            )
        return text
    assert verdict.rank_key is not None
    how = (
        f"eligible by quorum ({backing})"
        if verdict.route == ROUTE_QUORUM
        else f"eligible by this site's own outcomes (median {verdict.own_delta:+.4g}; {backing})"
    )
    if rank == 0 and election.withheld_for is None:
        return f"recommended: {how}, the best rank key ({verdict.rank_key:+.4g})"
    if rank == 0:
        return f"best eligible but withheld for '{election.withheld_for}': {how}"
    return f"{how}, ranked {rank + 1}: rank key {verdict.rank_key:+.4g}"


def _sentence(best: InterventionStats, result: Tally, path: str, z: float) -> str:
    params = json.dumps(json.loads(best.params), sort_keys=True)
    level = round(200 * _normal_cdf(z) - 100)
    evidence = (
        f"median delta {best.median:+.4g} ({level}% interval {best.ci_low:+.4g} to "
        f"{best.ci_high:+.4g}) from {best.kept_signers} distinct signers "
        f"({best.outliers} outliers dropped, {result.signers} signers on {path})"
    )
    if best.ci_low > 0:
        return f"Try '{best.intervention}' with params {params}: {evidence}."
    return (
        f"No intervention is clearly positive yet; the strongest evidence is for "
        f"'{best.intervention}' with params {params}: {evidence}."
    )


def _worth_exploring(result: Tally) -> list[str]:
    best = result.best
    bar = best.median if best is not None else -math.inf
    rest = [s for s in result.ranking if not s.eligible and s.median > bar]
    rest.sort(key=lambda s: (-s.median, s.intervention))
    return [s.intervention for s in rest]


def _trust_worth_exploring(election: Election) -> list[str]:
    # The one unverified intervention most worth this site's next trial: the most credible
    # (best lower bound) of those whose median beats the best eligible one. Trying it either
    # makes it eligible or checks everyone who reported it; naming one focuses the trials.
    top = election.best_eligible
    bar = top.rank_key if top is not None and top.rank_key is not None else -math.inf
    rest = [v.stats for v in election.verdicts if not v.eligible and v.stats.median > bar]
    rest.sort(key=lambda s: (-s.ci_low, -s.median, s.intervention))
    return [s.intervention for s in rest[:1]]


def _normal_cdf(z: float) -> float:
    return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))


def synthesize(
    rows: Iterable[Mapping[str, Any]] | Any,
    *,
    path: str,
    template_id: str | None,
    now_ms: int,
    config: MathConfig | None = None,
    own_node_id: str | None = None,
    trust: TrustConfig | None = None,
) -> dict[str, Any]:
    """What is working for sites on ``path``: The Math's ranking as a JSON-ready dict.

    ``rows`` are the path's outcome rows (mappings or a ``pyarrow.Table``, or an
    :class:`~qisd.core.trust.Evidence` built from them with the same config and ``now_ms``,
    so many sites reading one path parse it once); ``template_id`` is the Hiring election's
    choice the path was built with; ``now_ms`` is the caller's clock (it filters future and,
    with ``config.max_age_ms``, stale rows, and is echoed back). ``own_node_id``, this site's
    node id, selects the trust rule (its own rows in ``rows`` are its observed outcomes);
    without it the quorum rule runs.
    """
    if isinstance(rows, Evidence):
        if (config is not None and config != rows.config) or rows.now_ms != now_ms:
            raise UsageError("the evidence was collected with another config or now_ms")
        config = rows.config
    config = config or MathConfig()
    if own_node_id is None:
        result = rows.base if isinstance(rows, Evidence) else tally(rows, config, now_ms=now_ms)
        return _quorum_synthesis(result, path, template_id, now_ms, config)
    evidence = (
        rows if isinstance(rows, Evidence) else Evidence.from_rows(rows, config, now_ms=now_ms)
    )
    return _trust_synthesis(elect(evidence, own_node_id, trust), path, template_id, now_ms, config)


def _skeleton(result: Tally, path: str, template_id: str | None, now_ms: int) -> dict[str, Any]:
    return {
        "status": STATUS_SYNTHESIZED,
        "path": path,
        "template_id": template_id,
        "generated_ms": now_ms,
        "packets_analyzed": result.rows,
        "packets_ignored": result.ignored_rows,
        "distinct_signers": result.signers,
        "quorum": result.quorum,
        "sigma_pooled": _number(result.sigma_pooled),
        "mean_metric_delta": None,
        "best_intervention": None,
        "best_params": None,
        "best_delta": None,
        "best_ci": None,
        "best_signers": None,
        "top_decile_nodes": 0,
        "recommendation": None,
        "reason": None,
        "rule": "quorum",
        "own_node_id": None,
        "withheld_for": None,
        "trusted_signers": None,
        "interventions": [],
        "worth_exploring": [],
    }


def _no_packets(out: dict[str, Any], result: Tally) -> None:
    out["status"] = STATUS_NO_PACKETS
    out["reason"] = (
        "no usable outcome rows for this path"
        if result.ignored_rows == 0
        else f"none of the {result.ignored_rows} rows is usable (malformed, weight 0, "
        "another metric or outside the time window)"
    )


def _recommend(
    out: dict[str, Any],
    best: InterventionStats,
    eligible: list[InterventionStats],
    result: Tally,
    path: str,
    config: MathConfig,
) -> None:
    kept = [v for s in eligible for v in s.votes]
    total = math.fsum(v.weight for v in kept)
    out["mean_metric_delta"] = _number(math.fsum(v.delta * v.weight for v in kept) / total)
    out["best_intervention"] = best.intervention
    out["best_params"] = json.loads(best.params)
    out["best_delta"] = _number(best.median)
    out["best_ci"] = [_number(best.ci_low), _number(best.ci_high)]
    out["best_signers"] = best.kept_signers
    out["top_decile_nodes"] = len({v.signer for v in kept if v.outcome_decile >= TOP_DECILE})
    out["recommendation"] = _sentence(best, result, path, config.z)


def _quorum_synthesis(
    result: Tally, path: str, template_id: str | None, now_ms: int, config: MathConfig
) -> dict[str, Any]:
    out = _skeleton(result, path, template_id, now_ms)
    out["interventions"] = [
        intervention_summary(s, why=_quorum_why(s, result, k)) for k, s in enumerate(result.ranking)
    ]
    out["worth_exploring"] = _worth_exploring(result)
    best = result.best
    if result.rows == 0:
        _no_packets(out, result)
        return out
    if best is None:
        out["status"] = STATUS_NO_TRUSTWORTHY
        out["reason"] = (
            f"no intervention is backed by at least {result.quorum} of the "
            f"{result.signers} distinct signers once outliers are dropped"
        )
        return out
    _recommend(out, best, [s for s in result.ranking if s.eligible], result, path, config)
    return out


def _trust_synthesis(
    election: Election, path: str, template_id: str | None, now_ms: int, config: MathConfig
) -> dict[str, Any]:
    result = election.tally
    out = _skeleton(result, path, template_id, now_ms)
    out["rule"] = "trust"
    out["own_node_id"] = election.own
    out["withheld_for"] = election.withheld_for
    out["trusted_signers"] = sum(1 for s in election.standings if s.trust > 0)
    out["interventions"] = [
        intervention_summary(v.stats, v, _trust_why(v, election, k, config))
        for k, v in enumerate(election.verdicts)
    ]
    out["worth_exploring"] = _trust_worth_exploring(election)
    if result.rows == 0:
        _no_packets(out, result)
        return out
    top = election.best_eligible
    if top is None:
        out["status"] = STATUS_NO_TRUSTWORTHY
        out["reason"] = (
            f"no intervention is backed by at least {result.quorum} of the "
            f"{result.signers} distinct signers once outliers are dropped, and this site "
            "has reported none of them"
        )
        return out
    best = election.best
    if best is None:
        lead = next(v for v in election.verdicts if v.stats.intervention == election.withheld_for)
        out["status"] = STATUS_NO_TRUSTWORTHY
        out["reason"] = (
            f"'{lead.stats.intervention}' (lower bound {lead.stats.ci_low:+.4g}) beats every "
            f"eligible intervention (best '{top.stats.intervention}', "
            f"{top.rank_key:+.4g}) but is backed by {lead.stats.kept_signers} of the "
            f"{result.quorum} signers the quorum needs and this site has not tried it: "
            "trying it settles whether it is real"
        )
        return out
    eligible = [v.stats for v in election.verdicts if v.eligible]
    _recommend(out, best.stats, eligible, result, path, config)
    return out
