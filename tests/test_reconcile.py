"""Range-based set reconciliation (qisd.core.reconcile): exact differences, bounded cost."""

from __future__ import annotations

import hashlib
import random

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qisd.core.reconcile import (
    ID_BYTES,
    MODE_FINGERPRINT,
    ItemSet,
    Range,
    ReconcileError,
    Reconciliation,
    parse_ranges,
    respond,
)

BUDGET = 7_000


def item(n: int) -> tuple[int, bytes]:
    pid = hashlib.blake2b(n.to_bytes(8, "big"), digest_size=ID_BYTES).digest()
    return 1_700_000_000_000 + (n * 7919) % 100_000, pid


def run(mine: set[int], theirs: set[int]) -> tuple[Reconciliation, int, int]:
    """Reconcile over the wire encoding; (result, rounds, bytes answered)."""
    a = ItemSet(item(n) for n in mine)
    b = ItemSet(item(n) for n in theirs)
    rec = Reconciliation(a)
    answered = 0
    while True:
        ranges = rec.request(BUDGET)
        if not ranges:
            break
        wire = msgpack.packb([r.wire() for r in ranges])
        assert len(wire) <= BUDGET + 1_000
        asked = parse_ranges(msgpack.unpackb(wire), max_ranges=512, max_ids=4_096)
        answer, covered = respond(b, asked, BUDGET)
        packed = msgpack.packb([[r.wire() for r in answer], covered])
        assert len(packed) <= BUDGET + 64
        answered += len(packed)
        got, covered = msgpack.unpackb(packed)
        rec.receive(parse_ranges(got, max_ranges=512, max_ids=4_096), covered)
    return rec, rec.rounds, answered


def ids(ns: set[int]) -> set[bytes]:
    return {item(n)[1] for n in ns}


@settings(max_examples=60, deadline=None)
@given(
    common=st.sets(st.integers(0, 5_000), max_size=400),
    only_mine=st.sets(st.integers(5_001, 6_000), max_size=60),
    only_theirs=st.sets(st.integers(6_001, 7_000), max_size=60),
)
def test_finds_exactly_the_differences(common, only_mine, only_theirs):
    rec, _rounds, _bytes = run(common | only_mine, common | only_theirs)
    assert rec.need == ids(only_theirs)
    assert rec.lack == ids(only_mine)
    assert rec.agreed == (not only_mine and not only_theirs)


def test_equal_sets_agree_in_one_small_round_trip():
    both = set(range(10_000))
    rec, rounds, answered = run(both, both)
    assert rec.agreed and rounds == 1
    assert answered < 16


def test_a_fresh_node_learns_every_id_at_little_more_than_their_size():
    theirs = set(range(10_000))
    rec, rounds, answered = run(set(), theirs)
    assert rec.need == ids(theirs)
    # Paged id lists: each id costs its 16 bytes plus a little framing.
    assert answered < 10_000 * (ID_BYTES + 3)
    assert rounds < 40


def test_ten_missing_of_ten_thousand_cost_a_few_rounds_of_summaries():
    theirs = set(range(10_000))
    gone = set(random.Random(7).sample(sorted(theirs), 10))
    rec, rounds, answered = run(theirs - gone, theirs)
    assert rec.need == ids(gone) and not rec.lack
    assert rounds <= 5
    assert answered < 40_000  # summaries of the differing ranges only, not 160 kB of ids


def test_answers_outside_the_question_are_refused():
    a = ItemSet(item(n) for n in range(100))
    rec = Reconciliation(a)
    asked = rec.request(BUDGET)
    lo, hi = asked[0].lower, asked[0].upper
    assert lo[0] == 0
    outside = Range((hi[0] - 1, b""), (hi[0], b"\x01"), MODE_FINGERPRINT, 1, b"x" * 12)
    with pytest.raises(ReconcileError):
        rec.receive([outside], 1)


def _midpoint(lower, upper):
    if upper[0] - lower[0] > 1:
        return (lower[0] + upper[0]) // 2, b""
    return lower[0], lower[1] + b"\x01"  # just above lower, still below upper


def test_a_responder_that_never_converges_is_cut_off():
    mine = ItemSet(item(n) for n in range(5_000))
    rec = Reconciliation(mine)
    with pytest.raises(ReconcileError, match="too many rounds"):
        for _ in range(10_000):
            asked = rec.request(BUDGET)
            assert asked, "a liar must not be able to end the reconciliation as agreed"
            lies = []
            for r in asked:
                if r.mode == MODE_FINGERPRINT:  # every range "differs"
                    lies.append(Range(r.lower, r.upper, MODE_FINGERPRINT, r.count + 1, b"\0" * 12))
                else:  # an id list is "paged" forever: nothing, then a remainder that differs
                    mid = _midpoint(r.lower, r.upper)
                    lies.append(Range(r.lower, mid, 2, ids=(), theirs=()))
                    lies.append(Range(mid, r.upper, MODE_FINGERPRINT, 1, b"\0" * 12))
            rec.receive(lies, len(asked))
    assert rec.rounds == 513


@pytest.mark.parametrize(
    "bad",
    [
        "x",
        [[0, b"", 5, b"", 9, 0, b"x" * 12]],
        [[5, b"", 5, b"", 0, 0, b"x" * 12]],
        [[0, b"", 5, b"", 0, -1, b"x" * 12]],
        [[0, b"", 5, b"", 1, [b"short"]]],
        [[0, b"" * 1, 2**64, b"", 0, 0, b"x" * 12]],
    ],
)
def test_malformed_ranges_are_refused(bad):
    with pytest.raises(ReconcileError):
        parse_ranges(bad, max_ranges=16, max_ids=16)
