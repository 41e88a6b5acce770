"""Synthesis: the article's keys plus robust statistics, statuses, and determinism."""

from __future__ import annotations

import json
import random

import pyarrow as pa
from election_rows import NOW, byzantine_rows, outcome
from hypothesis import given, settings
from hypothesis import strategies as st

from qisd.core.math import MathConfig
from qisd.core.synthesis import synthesize

PATH = "vision/classification"
TID = "ab" * 20
ARTICLE_KEYS = {
    "status",
    "packets_analyzed",
    "mean_metric_delta",
    "best_intervention",
    "best_params",
    "best_delta",
    "top_decile_nodes",
    "recommendation",
}


def _synth(rows: object, **kw: object) -> dict[str, object]:
    return synthesize(rows, path=PATH, template_id=TID, now_ms=NOW, **kw)  # type: ignore[arg-type]


def test_synthesized_result_has_the_article_keys_and_the_robust_statistics() -> None:
    rows = byzantine_rows(30, honest_report_b=True)
    rows[0] = outcome("honest000", "A", 0.1, params={"lr": 0.0003}, decile=9)
    out = _synth(rows)
    assert set(out) >= ARTICLE_KEYS
    assert out["status"] == "synthesized"
    assert out["best_intervention"] == "A"
    assert out["best_params"] == {"lr": 0.001}  # what most of A's weight used
    assert isinstance(out["best_delta"], float) and abs(out["best_delta"] - 0.1) < 0.02
    assert out["packets_analyzed"] == 230
    assert out["distinct_signers"] == 130
    assert out["template_id"] == TID and out["path"] == PATH
    # Only honest A reporters said decile 9 and survive; the liars' decile 10 was dropped.
    assert out["top_decile_nodes"] == 100
    assert abs(out["mean_metric_delta"] - 0.06) < 0.02  # A and B honest votes, liars dropped
    ranked = out["interventions"]
    assert [r["intervention"] for r in ranked] == ["A", "B"]
    assert ranked[1]["outliers"] == 30 and ranked[0]["kept_signers"] == 100
    assert ranked[0]["ci_low"] < out["best_delta"] < ranked[0]["ci_high"]
    assert out["recommendation"].startswith("Try 'A' with params {\"lr\": 0.001}")
    assert "100 distinct signers" in out["recommendation"]
    json.dumps(out, allow_nan=False)


def test_no_packets() -> None:
    for rows in ([], pa.Table.from_pylist([outcome("s", "A", 0.1)]).slice(0, 0)):
        out = _synth(rows)
        assert out["status"] == "no_packets"
        assert out["recommendation"] is None and out["best_intervention"] is None
        assert out["packets_analyzed"] == 0 and out["interventions"] == []
    only_bad = _synth([outcome("s", "A", 0.1, confidence=0.0)])
    assert only_bad["status"] == "no_packets" and "1 rows" in only_bad["reason"]


def test_no_trustworthy_packets_when_no_intervention_reaches_the_quorum() -> None:
    # Three signers, three different interventions: none is backed by more than a third.
    rows = [outcome("s1", "A", 0.1), outcome("s2", "B", 0.2), outcome("s3", "C", 0.3)]
    out = _synth(rows)
    assert out["status"] == "no_trustworthy_packets"
    assert out["recommendation"] is None and out["best_intervention"] is None
    assert len(out["interventions"]) == 3 and not any(r["eligible"] for r in out["interventions"])
    assert "2 of the 3" in out["reason"]
    # With the Byzantine quorum off, the same rows synthesize.
    assert _synth(rows, config=MathConfig(byzantine_fraction=0))["best_intervention"] == "C"


def test_a_negative_best_is_not_presented_as_a_win() -> None:
    rows = [outcome(f"s{k}", "A", -0.2 + 0.01 * k) for k in range(5)]
    out = _synth(rows)
    assert out["status"] == "synthesized"
    assert out["recommendation"].startswith("No intervention is clearly positive")


def test_future_rows_are_not_counted() -> None:
    rows = [outcome("s1", "A", 0.1), outcome("s2", "A", 9.0, ts=NOW + 3_600_000)]
    out = _synth(rows)
    assert out["packets_analyzed"] == 1 and out["packets_ignored"] == 1


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), replays=st.integers(1, 50))
def test_same_packets_in_any_order_with_replays_give_the_identical_dict(
    seed: int, replays: int
) -> None:
    rng = random.Random(seed)
    rows = [
        {**r, "packet_id": f"p{i}"} for i, r in enumerate(byzantine_rows(20, honest_report_b=False))
    ]
    noisy = rows + [rows[rng.randrange(len(rows))] for _ in range(replays)]
    rng.shuffle(noisy)
    assert json.dumps(_synth(noisy), sort_keys=True) == json.dumps(_synth(rows), sort_keys=True)


def test_table_and_rows_give_the_same_synthesis() -> None:
    rows = byzantine_rows(3, honest_report_b=True)
    table = pa.Table.from_pylist(rows)
    assert _synth(table) == _synth(table.to_pylist())


def test_liar_only_claims_are_flagged_for_exploration_not_recommended() -> None:
    out = _synth(byzantine_rows(30, honest_report_b=False))
    assert out["best_intervention"] == "A" and out["worth_exploring"] == ["B"]
    # Once honest sites try B, their votes outweigh the liars' and the flag goes away.
    assert _synth(byzantine_rows(30, honest_report_b=True))["worth_exploring"] == []
    # Without an eligible intervention every one is worth exploring, best median first.
    rows = [outcome("s1", "A", 0.1), outcome("s2", "B", 0.3), outcome("s3", "C", 0.2)]
    assert _synth(rows)["worth_exploring"] == ["B", "C", "A"]
