"""Darwinism: Hedge over competing templates, retirement, persistence, and a simulation."""

from __future__ import annotations

import json
import math
import random
from typing import Any

import pytest
from election_rows import NOW, outcome

from qisd.core.darwin import DarwinConfig, Darwinism, DarwinStateError
from qisd.core.hiring import TemplateDoc
from qisd.core.math import tally
from qisd.errors import UsageError

DOMAIN = "vision"


def test_one_hedge_step_is_exactly_multiplicative() -> None:
    d = Darwinism(DarwinConfig(learning_rate=0.3))
    d.add(DOMAIN, "good")
    d.add(DOMAIN, "bad")
    event = d.observe(DOMAIN, {"good": 0.5, "bad": 1.5}, 0.5, now_ms=NOW, scale=1.0)
    assert dict(event.losses) == {"good": 0.0, "bad": 1.0}
    expected = 1 / (1 + math.exp(-0.3))
    assert d.weights(DOMAIN)["good"] == pytest.approx(expected)
    assert math.fsum(d.weights(DOMAIN).values()) == pytest.approx(1.0)
    assert event.winner == d.winner(DOMAIN) == "good"
    assert d.rounds(DOMAIN) == 1


def test_losses_are_capped_and_abstaining_costs_half() -> None:
    d = Darwinism()
    for tid in ("a", "b", "c"):
        d.add(DOMAIN, tid)
    event = d.observe(DOMAIN, {"a": 100.0, "b": None}, 0.0, now_ms=NOW, scale=2.0)
    assert dict(event.losses) == {"a": 1.0, "b": 0.5, "c": 0.5}


def test_newcomer_gets_an_equal_share_and_the_retired_never_return() -> None:
    d = Darwinism(DarwinConfig(learning_rate=2.0, floor=0.1))
    d.add(DOMAIN, "a")
    assert d.weights(DOMAIN) == {"a": 1.0}
    assert d.add(DOMAIN, "b") and not d.add(DOMAIN, "b")
    assert d.weights(DOMAIN) == {"a": 0.5, "b": 0.5}
    event = None
    for k in range(5):
        event = d.observe(DOMAIN, {"a": 0.0, "b": 9.0}, 0.0, now_ms=NOW + k)
        if event.retired:
            break
    assert event is not None and event.retired == ("b",)
    assert d.weights(DOMAIN) == {"a": 1.0} and d.retired(DOMAIN) == {"b"}
    assert not d.add(DOMAIN, "b")
    d.observe(DOMAIN, {"b": 0.0}, 0.0, now_ms=NOW + 9)
    assert d.candidates(DOMAIN) == ["a"]


def test_the_leader_is_never_retired() -> None:
    d = Darwinism(DarwinConfig(floor=0.6))
    for tid in ("a", "b", "c"):
        d.add(DOMAIN, tid)
    event = d.observe(DOMAIN, {"a": 0.0, "b": 0.0, "c": 0.0}, 0.0, now_ms=NOW)
    # Everyone is under the floor; ties go to the smallest id, which stays.
    assert event.retired == ("b", "c") and d.weights(DOMAIN) == {"a": 1.0}


def test_winner_ties_go_to_the_smallest_id_and_empty_domains_have_none() -> None:
    d = Darwinism()
    assert d.winner(DOMAIN) is None
    d.add(DOMAIN, "zz")
    d.add(DOMAIN, "aa")
    assert d.winner(DOMAIN) == "aa"


def test_state_round_trips_through_json_exactly() -> None:
    d = Darwinism()
    rng = random.Random(1)
    for k in range(30):
        preds = {t: rng.random() for t in ("t1", "t2", "t3")}
        d.observe(DOMAIN, preds, rng.random(), now_ms=NOW + k, scale=0.5)
    d.add("audio", "x")
    restored = Darwinism.from_dict(json.loads(json.dumps(d.to_dict())))
    assert restored.to_dict() == d.to_dict()
    assert restored.weights(DOMAIN) == d.weights(DOMAIN)
    # The restored state evolves exactly like the original.
    a = d.observe(DOMAIN, {"t1": 0.2}, 0.3, now_ms=NOW + 99)
    b = restored.observe(DOMAIN, {"t1": 0.2}, 0.3, now_ms=NOW + 99)
    assert a == b


@pytest.mark.parametrize(
    "bad",
    [
        None,
        {"version": 2, "domains": {}},
        {"version": 1},
        {"version": 1, "domains": {"v": {"weights": {"a": -1.0}, "retired": {}}}},
        {"version": 1, "domains": {"v": {"weights": {"a": 0.5}, "retired": {}}}},
        {"version": 1, "domains": {"v": {"weights": {"a": 1.0}, "retired": {"a": 1}}}},
        {"version": 1, "domains": {"v": {"weights": {"a": 1.0}, "retired": {}, "rounds": "x"}}},
    ],
)
def test_malformed_state_is_refused(bad: Any) -> None:
    with pytest.raises(DarwinStateError):
        Darwinism.from_dict(bad)


def test_misuse_is_refused() -> None:
    with pytest.raises(UsageError):
        DarwinConfig(learning_rate=0)
    with pytest.raises(UsageError):
        Darwinism().observe(DOMAIN, {}, float("nan"), now_ms=NOW)
    with pytest.raises(UsageError):
        Darwinism().observe(DOMAIN, {}, 0.0, now_ms=NOW, scale=0.0)


# --------------------------------------------------------------------------- the simulation

# Two problem types in one domain whose best interventions differ.
TRUTH = {
    "segmentation": {"A": 0.30, "B": 0.00, "C": 0.05},
    "classification": {"A": 0.00, "B": 0.30, "C": 0.05},
}
NOISE = 0.05
MIXING = TemplateDoc(DOMAIN, ("domain", "model_architecture"), (2,), created_ms=1)
SEPARATING = TemplateDoc(DOMAIN, ("domain", "problem_type"), (2,), created_ms=1)
TEMPLATES = {doc.template_id: doc.template for doc in (MIXING, SEPARATING)}


def _estimate(rows: list[dict[str, Any]], site_row: dict[str, Any], tid: str) -> Any:
    """The Math over what template ``tid`` routes together with ``site_row``."""
    template = TEMPLATES[tid]
    path = template.path(site_row, template.levels[-1])
    return tally([r for r in rows if template.path(r, template.levels[-1]) == path])


def test_darwinism_retires_the_template_that_mixes_problem_types() -> None:
    rng = random.Random(2024)
    sites = [(f"site{k:02d}", problem) for k in range(20) for problem in [sorted(TRUTH)[k % 2]]]
    rows: list[dict[str, Any]] = []
    clock = NOW - 10_000_000
    # Warm-up: every site has tried each intervention once.
    for signer, problem in sites:
        for x, mu in TRUTH[problem].items():
            clock += 1
            rows.append(outcome(signer, x, rng.gauss(mu, NOISE), ts=clock, problem=problem))
    d = Darwinism()
    for tid in sorted(TEMPLATES):
        d.add(DOMAIN, tid)
    best_picks = 0
    for round_no in range(200):
        signer, problem = rng.choice(sites)
        clock += 1
        probe = outcome(signer, "?", 0.0, problem=problem)
        winner = d.winner(DOMAIN)
        assert winner is not None
        best = _estimate(rows, probe, winner).best
        choice = best.intervention if best and rng.random() > 0.1 else rng.choice(sorted("ABC"))
        observed = rng.gauss(TRUTH[problem][choice], NOISE)
        predictions = {}
        for tid in d.candidates(DOMAIN):
            stats = {s.intervention: s for s in _estimate(rows, probe, tid).ranking}
            predictions[tid] = stats[choice].median if choice in stats else None
        d.observe(DOMAIN, predictions, observed, now_ms=clock, scale=3 * NOISE)
        rows.append(outcome(signer, choice, observed, ts=clock, problem=problem))
        if round_no >= 150:
            best_picks += TRUTH[problem][choice] == 0.30
    assert d.weights(DOMAIN).get(SEPARATING.template_id, 0.0) > 0.9
    assert MIXING.template_id in d.retired(DOMAIN)
    assert d.winner(DOMAIN) == SEPARATING.template_id
    # Routing by the winner, sites end up picking their own problem's best intervention.
    assert best_picks >= 40
