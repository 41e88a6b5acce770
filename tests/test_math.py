"""The Math: one vote per signer, robust centres, outliers, intervals, Byzantine resistance."""

from __future__ import annotations

import math
import random
import statistics

import pyarrow as pa
import pytest
from election_rows import NOW, byzantine_rows, outcome
from hypothesis import given, settings
from hypothesis import strategies as st

from qisd.core.math import (
    MathConfig,
    effective_n,
    quorum_for,
    tally,
    vote_weight,
    weighted_mad,
    weighted_median,
    weighted_trimmed_mean,
)
from qisd.errors import UsageError

# --------------------------------------------------------------------------- Byzantine


def test_thirty_liars_boosting_b_that_honest_sites_also_report_do_not_change_the_top() -> None:
    result = tally(byzantine_rows(30, honest_report_b=True))
    assert result.best is not None and result.best.intervention == "A"
    b = next(s for s in result.ranking if s.intervention == "B")
    # The liars are exactly the votes the MAD rule drops; B's estimate is the honest one.
    assert b.outliers == 30 and b.kept_signers == 100
    assert abs(b.median - 0.02) < 0.02


def test_thirty_liars_pushing_b_that_few_honest_sites_report_do_not_change_the_top() -> None:
    result = tally(byzantine_rows(30, honest_report_b=False))
    assert result.best is not None and result.best.intervention == "A"
    b = next(s for s in result.ranking if s.intervention == "B")
    # Here the liars own B's median, but 30 of 130 signers is under the quorum of 44.
    assert b.median == 1000.0 and not b.eligible
    assert result.quorum == 44 and b.kept_signers == 30


def test_thirty_liars_attacking_a_directly_do_not_change_the_top() -> None:
    rows = byzantine_rows(0, honest_report_b=True)
    rows += [outcome(f"liar{k}", "A", -1000.0, confidence=1.0, samples=10**9) for k in range(30)]
    result = tally(rows)
    assert result.best is not None and result.best.intervention == "A"
    assert result.best.outliers == 30 and result.best.median > 0.05


def test_seventy_liars_documented_threshold() -> None:
    # Where honest sites also report B, 70 liars (41 % of signers) still lose: the weighted
    # median of B holds while the liars' weight (70 x 1.0) stays under the honest 100 x 0.8.
    both = tally(byzantine_rows(70, honest_report_b=True))
    assert both.best is not None and both.best.intervention == "A"
    # Where few honest sites report B, 70 liars (41 %) pass the quorum and B wins.
    few = tally(byzantine_rows(70, honest_report_b=False))
    assert few.best is not None and few.best.intervention == "B"


def _first_break(honest_report_b: bool) -> int:
    for liars in range(0, 131):
        best = tally(byzantine_rows(liars, honest_report_b=honest_report_b)).best
        if best is None or best.intervention != "A":
            return liars
    return -1


def test_breaking_points_are_the_documented_ones() -> None:
    # docs/elections.md: a quorum of more than a third of the signers makes the push on an
    # intervention few honest sites report break at the first L with L > (100 + L) / 3,
    # i.e. L = 51 (33.8 % of signers); the median of a shared intervention breaks when the
    # liars' weight reaches the honest weight, 80 x 1.0 = 100 x 0.8 (44 % of signers).
    assert _first_break(honest_report_b=False) == 51
    assert _first_break(honest_report_b=True) == 80


# --------------------------------------------------------------------------- Sybil and replay


def test_one_signers_thousand_packets_count_as_one_vote() -> None:
    honest = byzantine_rows(0, honest_report_b=True)
    flood = [
        outcome("flooder", "B", 500.0 + k, ts=NOW - 10_000_000 + k, confidence=1.0)
        for k in range(1000)
    ]
    result = tally(honest + flood)
    assert result.signers == 101
    b = next(s for s in result.ranking if s.intervention == "B")
    assert b.signers == 101
    # Exactly as if the flooder had sent only its latest packet.
    assert tally(honest + flood[-1:]).ranking == result.ranking
    assert result.best is not None and result.best.intervention == "A"


def test_same_packet_fifty_times_changes_nothing() -> None:
    rows = [
        {**r, "packet_id": f"p{i}"} for i, r in enumerate(byzantine_rows(10, honest_report_b=True))
    ]
    once = tally(rows)
    replayed = tally([r for r in rows for _ in range(50)])
    assert replayed == once
    assert replayed.rows == len(rows)


# --------------------------------------------------------------------------- votes and weights


def test_a_signers_latest_row_is_its_vote_and_ties_take_the_lower_delta() -> None:
    rows = [
        outcome("s1", "A", 0.5, ts=NOW - 3000),
        outcome("s1", "A", 0.1, ts=NOW - 1000),
        outcome("s1", "B", 0.9, ts=NOW - 1000),
        outcome("s1", "B", 0.3, ts=NOW - 1000),
    ]
    result = tally(rows)
    by = {s.intervention: s for s in result.ranking}
    assert [v.delta for v in by["A"].votes] == [0.1]
    assert [v.delta for v in by["B"].votes] == [0.3]
    assert result.signers == 1


def test_vote_weight_is_bounded_and_grows_with_samples() -> None:
    config = MathConfig()
    assert vote_weight(1.0, 10**9, config) == 1.0
    assert vote_weight(0.5, 10**9, config) == 0.5
    assert vote_weight(0.0, 10**9, config) == 0.0
    assert 0 < vote_weight(1.0, 0, config) < vote_weight(1.0, 10, config) < 1.0
    assert vote_weight(1.0, 100, config) == pytest.approx(1.0)
    assert vote_weight(1.0, 0, config) == pytest.approx(math.log(2) / math.log(102))


def test_zero_confidence_and_malformed_rows_are_ignored() -> None:
    rows = [
        outcome("s1", "A", 0.1),
        outcome("s2", "A", 0.2, confidence=0.0),
        {"node_id": "s3", "intervention_type": "A"},
        {**outcome("s4", "A", 0.1), "metric_delta": float("nan")},
        {**outcome("s5", "A", 0.1), "intervention_params": "[1]"},
        {**outcome("s6", "A", 0.1), "timestamp_utc": True},
    ]
    result = tally(rows)
    assert result.rows == 1 and result.ignored_rows == 5 and result.signers == 1


def test_time_window_and_metric_filters() -> None:
    rows = [
        outcome("old", "A", 0.1, ts=NOW - 10 * 86_400_000),
        outcome("new", "A", 0.2, ts=NOW - 1_000),
        outcome("future", "A", 0.3, ts=NOW + 3_600_000),
        outcome("loss", "A", 0.4, metric="loss"),
    ]
    config = MathConfig(max_age_ms=86_400_000, metric_name="accuracy")
    result = tally(rows, config, now_ms=NOW)
    assert [v.signer for s in result.ranking for v in s.votes] == ["new"]
    assert result.ignored_rows == 3
    # Without a clock, nothing is filtered by time.
    assert tally(rows, MathConfig(metric_name="accuracy")).signers == 3


def test_mad_rule_drops_far_votes_and_keeps_the_bulk() -> None:
    rng = random.Random(3)
    rows = [outcome(f"s{k}", "A", rng.gauss(1.0, 0.1)) for k in range(40)]
    rows.append(outcome("far", "A", 5.0))
    stats = tally(rows).ranking[0]
    assert stats.outliers == 1 and "far" not in {v.signer for v in stats.votes}
    assert stats.ci_low < stats.median < stats.ci_high
    assert stats.ci_low < 1.0 < stats.ci_high


def test_interval_narrows_with_more_signers() -> None:
    rng = random.Random(5)
    widths = []
    for n in (10, 100):
        rows = [outcome(f"s{k}", "A", rng.gauss(0.5, 0.1)) for k in range(n)]
        s = tally(rows).ranking[0]
        widths.append(s.ci_high - s.ci_low)
    assert widths[1] < widths[0] / 2


def test_ranking_is_by_lower_bound_not_by_centre() -> None:
    rng = random.Random(9)
    rows = [outcome(f"a{k}", "A", rng.gauss(0.30, 0.05)) for k in range(60)]
    # Two signers reporting a higher centre: wide interval, lower bound below A's.
    rows += [outcome("b1", "B", 0.33), outcome("b2", "B", 0.36)]
    result = tally(rows, MathConfig(byzantine_fraction=0))
    b = next(s for s in result.ranking if s.intervention == "B")
    assert b.median > result.ranking[0].median
    assert result.best is not None and result.best.intervention == "A"


def test_quorum_is_more_than_the_byzantine_fraction() -> None:
    config = MathConfig()
    assert [quorum_for(n, config) for n in (1, 2, 3, 130, 135)] == [1, 1, 2, 44, 46]
    assert quorum_for(130, MathConfig(byzantine_fraction=0)) == 1
    assert quorum_for(3, MathConfig(min_signers=5)) == 5


def test_table_input_equals_row_input() -> None:
    rows = byzantine_rows(5, honest_report_b=True)
    table = pa.Table.from_pylist(rows)
    assert tally(table) == tally(table.to_pylist())
    assert tally(table).best is not None


def test_config_rejects_nonsense() -> None:
    for bad in (
        {"trim": 0.5},
        {"mad_cutoff": 0},
        {"byzantine_fraction": 1.0},
        {"min_signers": 0},
        {"sample_saturation": 0},
    ):
        with pytest.raises(UsageError):
            MathConfig(**bad)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- estimators


def test_estimators_match_their_unweighted_definitions() -> None:
    values = [3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0]
    assert weighted_median(values) == statistics.median(values)
    assert weighted_median(values[:-1]) == statistics.median(values[:-1])
    assert weighted_trimmed_mean(values, trim=0.0) == pytest.approx(statistics.fmean(values))
    # 12.5 % of eight equal weights is one value from each end.
    cut = sorted(values)[1:-1]
    assert weighted_trimmed_mean(values, trim=0.125) == pytest.approx(statistics.fmean(cut))
    assert effective_n([1.0] * 7) == pytest.approx(7)
    assert effective_n([1.0, 0.0001]) == pytest.approx(1.0, abs=0.01)
    centre = statistics.median(values)
    assert weighted_mad(values) == statistics.median(abs(v - centre) for v in values)


def test_weights_move_the_median() -> None:
    assert weighted_median([0.0, 10.0], [1.0, 3.0]) == 10.0
    assert weighted_median([0.0, 10.0], [3.0, 1.0]) == 0.0
    with pytest.raises(UsageError):
        weighted_median([])
    with pytest.raises(UsageError):
        weighted_median([1.0], [0.0])


# --------------------------------------------------------------------------- properties

_deltas = st.floats(min_value=-5, max_value=5, allow_nan=False, width=32)
_row = st.builds(
    outcome,
    signer=st.sampled_from([f"s{k}" for k in range(8)]),
    intervention=st.sampled_from(["A", "B", "C"]),
    delta=_deltas,
    ts=st.integers(min_value=NOW - 5, max_value=NOW),
    confidence=st.sampled_from([0.0, 0.3, 0.9, 1.0]),
    samples=st.integers(min_value=0, max_value=500),
    decile=st.integers(min_value=1, max_value=10),
    params=st.sampled_from([{"lr": 0.1}, {"lr": 0.01}, {}]),
)


@settings(max_examples=150, deadline=None)
@given(rows=st.lists(_row, max_size=30), seed=st.integers(0, 2**32 - 1), dup=st.integers(0, 3))
def test_tally_ignores_order_and_replays(
    rows: list[dict[str, object]], seed: int, dup: int
) -> None:
    shuffled = rows + rows[:dup]
    random.Random(seed).shuffle(shuffled)
    assert tally(shuffled) == tally(rows)


@settings(max_examples=50, deadline=None)
@given(rows=st.lists(_row, max_size=30))
def test_tally_is_deterministic(rows: list[dict[str, object]]) -> None:
    first = tally(rows)
    assert tally([dict(r) for r in rows]) == first
    assert repr(tally(rows)) == repr(first)


_weights = st.floats(min_value=0.01, max_value=10, allow_nan=False)


@settings(max_examples=200, deadline=None)
@given(
    clean=st.lists(st.tuples(_deltas, _weights), min_size=1, max_size=20),
    corrupt=st.lists(st.tuples(st.floats(-1e9, 1e9, allow_nan=False), _weights), max_size=20),
)
def test_weighted_median_holds_while_corruption_has_less_than_half_the_weight(
    clean: list[tuple[float, float]], corrupt: list[tuple[float, float]]
) -> None:
    clean_weight = math.fsum(w for _, w in clean)
    # Scale the corrupt weights to just under the clean weight: the worst allowed case.
    total_bad = math.fsum(w for _, w in corrupt)
    if total_bad > 0:
        corrupt = [(v, w * 0.999 * clean_weight / total_bad) for v, w in corrupt]
    values = [v for v, _ in clean + corrupt]
    weights = [w for _, w in clean + corrupt]
    m = weighted_median(values, weights)
    assert min(v for v, _ in clean) <= m <= max(v for v, _ in clean)


@settings(max_examples=100, deadline=None)
@given(clean=st.lists(_deltas, min_size=1, max_size=20), extra=st.integers(0, 3))
def test_weighted_median_breaks_once_corruption_has_the_majority(
    clean: list[float], extra: int
) -> None:
    # The breakdown point is exactly one half: a corrupt majority moves the median anywhere.
    bad = [1e6] * (len(clean) + 1 + extra)
    assert weighted_median(clean + bad) == 1e6
