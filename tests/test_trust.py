"""The trust rule: standing from this site's own outcomes, the guarantee under every liar
strategy, floods, self-trust, explanations and determinism."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest
from election_rows import NOW, byzantine_rows, outcome
from hypothesis import given, settings
from hypothesis import strategies as st

from qisd.core.math import MathConfig, collect_votes, tally, tally_votes
from qisd.core.synthesis import synthesize
from qisd.core.trust import (
    ROUTE_OWN,
    ROUTE_QUORUM,
    Evidence,
    TrustConfig,
    elect,
    standings,
    trust_of,
)
from qisd.errors import UsageError

PATH = "vision/classification"
HOUR = 3_600_000
TRUTH = {"A": 0.30, "B": 0.10, "C": 0.15, "D": 0.05, "T": -0.20}
"""A is best; T, the liars' pick, is clearly bad for every honest site that tries it."""


def _synth(rows: Any, own: str | None = None, **kw: Any) -> dict[str, Any]:
    return synthesize(rows, path=PATH, template_id=None, now_ms=NOW, own_node_id=own, **kw)


def _standing(rows: list[dict[str, Any]], own: str) -> dict[str, tuple[int, int, float]]:
    return {
        s.signer: (s.agreements, s.disagreements, s.trust)
        for s in standings(Evidence.from_rows(rows), own)
    }


# --------------------------------------------------------------------------- standing


def test_trust_formula_starts_at_none_and_a_disagreement_costs_three_agreements() -> None:
    config = TrustConfig()
    assert trust_of(0, 0, config) == 0.0
    assert trust_of(1, 0, config) == 0.5
    assert trust_of(3, 0, config) == 0.75
    assert trust_of(3, 1, config) == 0.0
    assert trust_of(5, 1, config) == pytest.approx(2 / 7)
    with pytest.raises(UsageError):
        trust_of(-1, 0, config)
    for bad in ({"untrusted_share": 0.0}, {"agreement_sigmas": 0.0}, {"disagreement_cost": -1}):
        with pytest.raises(UsageError):
            TrustConfig(**bad)


def test_earlier_reports_that_match_this_sites_later_outcome_earn_trust() -> None:
    early, late = NOW - 2 * HOUR, NOW - HOUR
    rows = [
        outcome("me", "A", 0.30, ts=late),
        outcome("right", "A", 0.31, ts=early),
        outcome("wrong", "A", 1.50, ts=early),
        # Reported at the same time as this site's outcome, or after: a copy, not a prediction.
        outcome("copy", "A", 0.30, ts=late),
        outcome("after", "A", 0.30, ts=NOW - 1000),
        # Reported only what this site never tried: nothing to check.
        outcome("elsewhere", "B", 0.10, ts=early),
    ]
    # Noisy reports elsewhere set the path's spread (sigma_pooled about 0.1).
    rng = random.Random(2)
    rows += [outcome(f"n{k}", "C", rng.gauss(0.1, 0.1), ts=early) for k in range(15)]
    got = _standing(rows, "me")
    assert got["right"] == (1, 0, 0.5)
    assert got["wrong"] == (0, 1, 0.0)
    assert {"copy", "after", "elsewhere", "me"}.isdisjoint(got)


def test_a_new_key_has_no_weight_beyond_the_quorum_rules() -> None:
    # No own rows, or no checkable reports: the trust rule is the quorum rule, ranking and all.
    rows = byzantine_rows(30, honest_report_b=False)
    base = tally(rows)
    election = elect(Evidence.from_rows(rows), "a-new-site")
    assert election.standings == ()
    assert election.tally == base
    assert [v.route for v in election.verdicts] == [
        ROUTE_QUORUM if s.eligible else None for s in base.ranking
    ]


def test_tally_votes_with_unit_factors_is_tally() -> None:
    rows = byzantine_rows(12, honest_report_b=True)
    votes, n_rows, n_ignored = collect_votes(rows)
    base = tally(rows)
    assert tally_votes(votes, rows=n_rows, ignored_rows=n_ignored) == base
    ones = {v.signer: 1.0 for v in votes}
    assert tally_votes(votes, rows=n_rows, ignored_rows=n_ignored, factors=ones) == base
    with pytest.raises(UsageError):
        tally_votes(votes, rows=n_rows, ignored_rows=n_ignored, factors={"x": 0.0})


# --------------------------------------------------------------------------- eligibility


def test_what_this_site_tried_is_eligible_by_its_own_outcome() -> None:
    # Three signers, three interventions: nothing reaches the quorum of 2.
    rows = [
        outcome("s1", "A", 0.10, ts=NOW - 2 * HOUR),
        outcome("s2", "B", 0.20, ts=NOW - 2 * HOUR),
        outcome("me", "C", 0.30, ts=NOW - HOUR),
    ]
    assert _synth(rows)["status"] == "no_trustworthy_packets"
    out = _synth(rows, own="me", trust=TrustConfig(withhold=False))
    assert out["rule"] == "trust" and out["own_node_id"] == "me"
    assert out["status"] == "synthesized" and out["best_intervention"] == "C"
    c = next(i for i in out["interventions"] if i["intervention"] == "C")
    assert c["eligible_by"] == ROUTE_OWN and c["own_delta"] == pytest.approx(0.30)
    # Ranked by its own lower bound, below its own median.
    assert c["rank_key"] < 0.30
    assert "own outcomes" in c["why"] and c["why"].startswith("recommended")
    others = [i for i in out["interventions"] if i["intervention"] != "C"]
    assert all(not i["eligible"] and "has not reported it" in i["why"] for i in others)


def test_an_unverified_claim_that_beats_everything_eligible_is_tried_not_recommended() -> None:
    rng = random.Random(4)
    rows = [outcome(f"h{k}", "B", rng.gauss(0.10, 0.03), ts=NOW - 3 * HOUR) for k in range(20)]
    rows += [outcome(f"a{k}", "A", rng.gauss(0.40, 0.03), ts=NOW - 3 * HOUR) for k in range(6)]
    rows.append(outcome("me", "B", 0.11, ts=NOW - HOUR))
    quorum = _synth(rows)
    assert quorum["best_intervention"] == "B" and quorum["worth_exploring"] == ["A"]
    out = _synth(rows, own="me")
    assert out["status"] == "no_trustworthy_packets" and out["best_intervention"] is None
    assert out["withheld_for"] == "A" and out["worth_exploring"] == ["A"]
    assert "trying it settles" in out["reason"]
    a = next(i for i in out["interventions"] if i["intervention"] == "A")
    assert "withheld" in a["why"]
    # Once this site has tried A and seen it work, A is its recommendation.
    tried = [*rows, outcome("me", "A", 0.41, ts=NOW - 1000)]
    assert _synth(tried, own="me")["best_intervention"] == "A"


def test_trying_the_liars_pick_turns_their_claim_into_outliers() -> None:
    rows = byzantine_rows(30, honest_report_b=False)
    quorum = next(s for s in tally(rows).ranking if s.intervention == "B")
    assert quorum.median == 1000.0  # 30 liars own B's median against 5 honest reports
    rows.append(outcome("me", "B", 0.01, ts=NOW - 1000))
    out = _synth(rows, own="me")
    b = next(i for i in out["interventions"] if i["intervention"] == "B")
    # The five honest B reports predicted this site's outcome: trusted, they outweigh the
    # liars, who become B's outliers; B is eligible by this site's outcome, and ranks low.
    assert b["outliers"] == 30 and abs(b["median_delta"] - 0.02) < 0.03
    assert b["eligible_by"] == ROUTE_OWN and b["trusted_signers"] == 5
    assert out["best_intervention"] == "A"
    liars = [s for s in standings(Evidence.from_rows(rows), "me") if s.signer.startswith("liar")]
    assert len(liars) == 30 and all(s.trust == 0 and s.disagreements == 1 for s in liars)


def test_own_outcomes_that_disagree_with_the_path_do_not_make_it_eligible() -> None:
    rng = random.Random(8)
    rows = [outcome(f"h{k}", "A", rng.gauss(0.1, 0.05), ts=NOW - HOUR) for k in range(9)]
    rows += [outcome(f"g{k}", "B", rng.gauss(0.0, 0.05), ts=NOW - HOUR) for k in range(3)]
    rows.append(outcome("me", "B", 0.9, ts=NOW - 1000))  # this site's B is unlike the path's
    out = _synth(rows, own="me")
    b = next(i for i in out["interventions"] if i["intervention"] == "B")
    assert not b["eligible"] and "disagree" in b["why"]
    assert out["best_intervention"] == "A"


# --------------------------------------------------------------------------- the guarantee


def _swarm(
    strategy: str, honest: int, liar_keys: int, rounds: int, lie: float, seed: int, tried: bool
) -> list[dict[str, Any]]:
    """A random swarm: ``honest`` sites trying A..D (and sometimes T, which is bad for them)
    over ``rounds`` rounds, ``liar_keys`` keys pushing T with the largest weight."""
    rng = random.Random(seed)
    rows: list[dict[str, Any]] = []
    honest_rows: list[dict[str, Any]] = []
    choices = ["A", "B", "C", "D", "T"]
    for r in range(rounds):
        ts = NOW - (rounds - r) * HOUR
        for h in range(honest):
            x = rng.choice(choices) if rng.random() < 0.3 else rng.choice(choices[:4])
            row = outcome(
                f"h{h:03d}", x, rng.gauss(TRUTH[x], 0.05), ts=ts,
                confidence=round(rng.uniform(0.5, 0.95), 2), samples=rng.randint(10, 300),
            )  # fmt: skip
            rows.append(row)
            honest_rows.append(row)
        sleeping = strategy == "sleeper" and r < rounds // 2
        for k in range(liar_keys if strategy != "sybil" else 0):
            key = f"liar{k:03d}"
            if sleeping:  # honest for now: reports what honest sites see
                x = rng.choice(choices[:4])
                rows.append(outcome(key, x, rng.gauss(TRUTH[x], 0.05), ts=ts + 1))
                continue
            if strategy == "copier" and honest_rows:
                copy = dict(rng.choice([h for h in honest_rows if h["intervention_type"] != "T"]))
                copy.update(node_id=key, timestamp_utc=ts + 1, raw_data_hash=f"c-{key}")
                rows.append(copy)
            rows.append(outcome(key, "T", lie, ts=ts + 1, confidence=1.0, samples=10**9))
    if strategy == "sybil":  # every key is fresh: one lie each, spread over the rounds
        for k in range(liar_keys):
            ts = NOW - (rounds - k % rounds) * HOUR + 1
            rows.append(outcome(f"sybil{k:03d}", "T", lie, ts=ts, confidence=1.0, samples=10**9))
    if tried:  # this site tried the liars' pick itself and saw it fail
        rows.append(outcome("h000", "T", rng.gauss(TRUTH["T"], 0.05), ts=NOW - 1000))
    return rows


@settings(max_examples=120, deadline=None)
@given(
    strategy=st.sampled_from(["constant", "sybil", "sleeper", "copier"]),
    honest=st.integers(4, 30),
    liar_share=st.floats(0.0, 1.0),
    rounds=st.integers(1, 5),
    lie=st.sampled_from([10.0, 0.6, 0.35]),
    seed=st.integers(0, 2**32 - 1),
    tried=st.booleans(),
)
def test_liars_under_a_third_never_make_their_pick_the_recommendation(
    strategy: str, honest: int, liar_share: float, rounds: int, lie: float, seed: int, tried: bool
) -> None:
    # Liar keys strictly under a third of all keys: L < (honest + L) / 3, i.e. 2L < honest.
    liar_keys = int(liar_share * (honest - 1) / 2)
    rows = _swarm(strategy, honest, liar_keys, rounds, lie, seed, tried)
    signers = {r["node_id"] for r in rows}
    liars = {s for s in signers if not s.startswith("h")}
    assert 3 * len(liars) < len(signers)
    # "On their own": when T is the recommendation anyway, the liars' votes are not among its
    # kept votes (its estimate is the honest sites') or it is the recommendation without the
    # liars' rows too (honest sites reported it and nothing else is eligible).
    honest_rows = [r for r in rows if r["node_id"] not in liars]
    evidence = Evidence.from_rows(rows)
    for own in ("h000", "h001", None):
        if _synth(rows, own=own)["best_intervention"] != "T":
            continue
        if own is None:
            kept = next(s for s in tally(rows).ranking if s.intervention == "T").votes
        else:
            election = elect(evidence, own)
            kept = next(v.stats for v in election.verdicts if v.stats.intervention == "T").votes
        carried = any(v.signer in liars for v in kept)
        assert not carried or _synth(honest_rows, own=own)["best_intervention"] == "T"


def test_the_guarantee_test_catches_a_rule_without_the_quorum() -> None:
    # The same swarm with the quorum off: the liars' pick wins (the test above can fail).
    rows = _swarm("copier", 20, 9, 3, 0.35, seed=1, tried=False)
    assert _synth(rows, config=MathConfig(byzantine_fraction=0))["best_intervention"] == "T"


# --------------------------------------------------------------------------- floods and self


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 1000),
    seed=st.integers(0, 2**32 - 1),
    target=st.sampled_from(["A", "B", "T"]),
)
def test_one_signers_thousand_packets_are_checked_once_per_intervention(
    n: int, seed: int, target: str
) -> None:
    rng = random.Random(seed)
    rows = _swarm("constant", 12, 0, 3, 0.0, seed, tried=True)
    own = "h000"
    flood = [
        outcome(
            "flooder",
            rng.choice(["A", "B", target]),
            rng.gauss(TRUTH["A"], 0.05),
            ts=NOW - rng.randrange(4 * HOUR),
            confidence=1.0,
            samples=10**9,
        )  # fmt: skip
        for _ in range(n)
    ]
    evidence = Evidence.from_rows(rows + flood)
    mine = {v.intervention for v in evidence.votes if v.signer == own}
    theirs = {r["intervention_type"] for r in flood}
    got = {s.signer: s for s in standings(evidence, own)}
    if "flooder" in got:
        s = got["flooder"]
        assert s.agreements + s.disagreements <= len(mine & theirs)
        assert s.trust <= trust_of(len(mine & theirs), 0, TrustConfig())
    # One vote per intervention, one key among the path's signers, however many packets.
    votes = [v for v in evidence.votes if v.signer == "flooder"]
    assert sorted(v.intervention for v in votes) == sorted(theirs)
    assert evidence.base.signers == len({r["node_id"] for r in rows}) + 1


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), extra=st.integers(0, 30), own=st.integers(0, 11))
def test_a_sites_own_reports_never_raise_its_own_weight(seed: int, extra: int, own: int) -> None:
    rng = random.Random(seed)
    me = f"h{own:03d}"
    rows = _swarm("constant", 12, 2, 3, 10.0, seed, tried=False)
    rows += [
        outcome(me, rng.choice("ABCD"), rng.gauss(0.2, 0.1), ts=NOW - rng.randrange(HOUR))
        for _ in range(extra)
    ]
    evidence = Evidence.from_rows(rows)
    election = elect(evidence, me)
    assert me not in {s.signer for s in election.standings}
    base = {(v.intervention, v.signer): v.weight for v in evidence.votes}
    for stats in election.tally.ranking:
        for v in stats.votes:
            if v.signer == me:
                assert v.weight == base[(v.intervention, me)]
    # Its own votes are counted at their own weight in the reweighted totals too.
    for verdict in election.verdicts:
        stats = verdict.stats
        if stats.kept_signers == 1 and stats.votes[0].signer == me:
            assert stats.weight == stats.votes[0].weight


# --------------------------------------------------------------------------- explaining


def test_every_status_has_the_same_keys_and_every_intervention_a_why() -> None:
    cases = [
        [],
        [outcome("s1", "A", 0.1), outcome("s2", "B", 0.2), outcome("s3", "C", 0.3)],
        byzantine_rows(30, honest_report_b=False),
    ]
    keys = None
    for rows in cases:
        for own in (None, "honest000"):
            out = _synth(rows, own=own)
            keys = keys or set(out)
            assert set(out) == keys
            for item in out["interventions"]:
                assert isinstance(item["why"], str) and item["why"]
                assert item["eligible_by"] in (None, ROUTE_QUORUM, ROUTE_OWN)
            json.dumps(out, allow_nan=False)
    assert _synth(cases[2])["rule"] == "quorum"
    assert _synth(cases[2])["interventions"][0]["why"].startswith("recommended")


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), replays=st.integers(0, 30))
def test_same_packets_in_any_order_give_the_identical_trust_synthesis(
    seed: int, replays: int
) -> None:
    rng = random.Random(seed)
    rows = _swarm(rng.choice(["constant", "copier", "sleeper"]), 10, 3, 3, 0.35, seed, True)
    noisy = rows + [rows[rng.randrange(len(rows))] for _ in range(replays)]
    rng.shuffle(noisy)
    first = json.dumps(_synth(rows, own="h000"), sort_keys=True)
    assert json.dumps(_synth(noisy, own="h000"), sort_keys=True) == first
    # Evidence parsed once gives the same answer as the rows.
    evidence = Evidence.from_rows(noisy, MathConfig(), now_ms=NOW)
    assert json.dumps(_synth(evidence, own="h000"), sort_keys=True) == first


def test_evidence_must_match_the_config_and_clock() -> None:
    evidence = Evidence.from_rows([outcome("s", "A", 0.1)], now_ms=NOW)
    with pytest.raises(UsageError):
        _synth(evidence, config=MathConfig(z=1.0))
    with pytest.raises(UsageError):
        synthesize(evidence, path=PATH, template_id=None, now_ms=NOW + 1)
