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

Same rows in any order, with any replays, and the same arguments give an identical dict.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from typing import Any

from qisd.core.math import InterventionStats, MathConfig, Tally, tally

STATUS_SYNTHESIZED = "synthesized"
STATUS_NO_PACKETS = "no_packets"
STATUS_NO_TRUSTWORTHY = "no_trustworthy_packets"
TOP_DECILE = 8
"""outcome_decile at or above which a signer counts in ``top_decile_nodes``."""


def _number(value: float) -> float | None:
    # JSON has no infinities or NaN; The Math never produces them, this is a last guard.
    return value if math.isfinite(value) else None


def intervention_summary(stats: InterventionStats) -> dict[str, Any]:
    """The JSON form of one intervention's statistics."""
    return {
        "intervention": stats.intervention,
        "eligible": stats.eligible,
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


def _normal_cdf(z: float) -> float:
    return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))


def synthesize(
    rows: Iterable[Mapping[str, Any]] | Any,
    *,
    path: str,
    template_id: str | None,
    now_ms: int,
    config: MathConfig | None = None,
) -> dict[str, Any]:
    """What is working for sites on ``path``: The Math's ranking as a JSON-ready dict.

    ``rows`` are the path's outcome rows (mappings or a ``pyarrow.Table``); ``template_id``
    is the Hiring election's choice the path was built with; ``now_ms`` is the caller's clock
    (it filters future and, with ``config.max_age_ms``, stale rows, and is echoed back).
    """
    config = config or MathConfig()
    result = tally(rows, config, now_ms=now_ms)
    eligible = [s for s in result.ranking if s.eligible]
    best = result.best
    out: dict[str, Any] = {
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
        "interventions": [intervention_summary(s) for s in result.ranking],
        "worth_exploring": _worth_exploring(result),
    }
    if result.rows == 0:
        out["status"] = STATUS_NO_PACKETS
        out["reason"] = (
            "no usable outcome rows for this path"
            if result.ignored_rows == 0
            else f"none of the {result.ignored_rows} rows is usable (malformed, weight 0, "
            "another metric or outside the time window)"
        )
        return out
    if best is None:
        out["status"] = STATUS_NO_TRUSTWORTHY
        out["reason"] = (
            f"no intervention is backed by at least {result.quorum} of the "
            f"{result.signers} distinct signers once outliers are dropped"
        )
        return out
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
    return out
