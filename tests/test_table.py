"""The pure routing table (qisd.core.table), without an event loop. The asyncio head checks
around it, and the stock-against-fixed defect tests, are in test_defects."""

from __future__ import annotations

import random

from qisd.core.table import MAX_FORMER_CONTACTS, Contact, Table

K = 4


def idn(value: int) -> bytes:
    return value.to_bytes(20, "big")


def contact(value: int, port: int = 1) -> Contact:
    return Contact(idn(value), "127.0.0.1", port)


TOP = 1 << 159
ME = Contact(idn(0))


def far(i: int) -> Contact:
    """Contacts whose ids share exactly their top 5 bits (11111): their bucket is far from id 0
    and, its depth being 0 mod 5, never splits (section 4.2 of the paper)."""
    return contact((0b11111 << 155) | ((i % 2) << 154) | (i << 8))


def test_a_full_far_bucket_parks_newcomers_and_names_its_head() -> None:
    table = Table(ME, K)
    group = [far(i) for i in range(K + 2)]
    heads = [table.add(c, now=float(i)) for i, c in enumerate(group)]
    assert heads[:K] == [None] * K
    assert heads[K] is group[0] and heads[K + 1] is group[0], "the least recently seen is checked"
    assert not table.is_new_node(group[K]), "a parked contact is known (defect 1)"
    assert [c.id for c in table.contacts()] == [c.id for c in group[:K]]
    assert {c.id for c in table.known()} == {c.id for c in group}
    assert not table.has_room_for(far(99))
    assert table.has_room_for(contact(5)), "the bucket holding this node's id splits"


def test_the_own_bucket_splits_and_add_is_idempotent() -> None:
    table = Table(ME, K)
    rng = random.Random(1)
    values = [rng.getrandbits(160) for _ in range(200)]
    for v in values:
        table.add(contact(v), now=1.0)
    for v in values:
        table.add(contact(v), now=2.0)  # refreshing known contacts changes nothing
    assert len(table.buckets) > 5
    for bucket in table.buckets:
        assert len(bucket) <= K
        assert all(bucket.has_in_range(c) for c in bucket.nodes.values())
    assert table.add(ME, now=3.0) is None and table.get(ME.id) is None, "never itself"


def test_find_neighbors_is_exact_over_the_whole_table() -> None:
    table = Table(ME, 20)
    rng = random.Random(11)
    for _ in range(300):
        table.add(contact(rng.getrandbits(160), rng.randrange(1, 65535)), now=0.0)
    everyone = table.contacts()
    targets = [Contact(idn(rng.getrandbits(160))) for _ in range(50)] + everyone[:20]
    for target in targets:
        for k in (1, 5, 20, 28, 500):
            best = sorted(
                (c for c in everyone if c.id != target.id), key=lambda c: c.long_id ^ target.long_id
            )[:k]
            assert [c.id for c in table.find_neighbors(target, k)] == [c.id for c in best]
    first = everyone[0]
    assert first not in table.find_neighbors(first), "a target is never its own neighbour"
    excluded = table.find_neighbors(Contact(idn(5)), 300, exclude=first)
    assert all((c.ip, c.port) != (first.ip, first.port) for c in excluded)


def test_failures_evict_after_evict_after_and_promote_the_cache() -> None:
    evicted: list[bytes] = []
    table = Table(ME, K, evict_after=3, on_evict=lambda c: evicted.append(c.id))
    group = [far(i) for i in range(K + 1)]
    for c in group:
        table.add(c, now=0.0)
    victim = group[0]
    assert not table.record_failure(victim) and not table.record_failure(victim)
    assert table.get(victim.id) is not None and table.get(victim.id).failures == 2
    assert table.record_failure(victim)
    assert table.get(victim.id) is None and evicted == [victim.id]
    assert victim.id in table.former
    assert group[K].id in {c.id for c in table.contacts()}, "the cached contact took its place"
    assert not table.record_failure(contact(12345)), "an unknown contact is not counted"


def test_a_reply_resets_failures_and_moves_the_contact_to_the_tail() -> None:
    table = Table(ME, K)
    group = [far(i) for i in range(K)]
    for c in group:
        table.add(c, now=0.0)
    table.add(contact(3), now=0.0)  # a second bucket
    first = group[0]
    table.record_failure(first)
    table.heard_from(Contact(first.id, "10.0.0.9", 7), now=50.0)
    bucket = table.buckets[table.get_bucket_for(first)]
    assert list(bucket.nodes)[-1] == first.id
    assert first.failures == 0 and first.last_seen == 50.0
    assert (first.ip, first.port) == ("10.0.0.9", 7), "the address it replied from"
    assert bucket.last_updated == 50.0
    assert table.lonely(50.0 + 3599) == [b for b in table.buckets if b is not bucket]
    assert bucket not in table.lonely(50.0 + 3599)


def test_get_bucket_for_is_exact_at_a_boundary() -> None:
    table = Table(ME, K)
    table.split(0, now=0.0)
    lower = table.buckets[0]
    midpoint = Contact(idn(lower.range[1]))
    assert lower.has_in_range(midpoint) and table.get_bucket_for(midpoint) == 0
    assert table.get_bucket_for(Contact(idn(lower.range[1] + 1))) == 1


def test_former_contacts_are_capped() -> None:
    table = Table(ME, K)
    for i in range(MAX_FORMER_CONTACTS + 5):
        table.remember(contact(TOP + i))
    assert len(table.former) == MAX_FORMER_CONTACTS
    assert idn(TOP) not in table.former and idn(TOP + MAX_FORMER_CONTACTS + 4) in table.former
    table.add(contact(TOP + MAX_FORMER_CONTACTS + 4), now=0.0)
    assert idn(TOP + MAX_FORMER_CONTACTS + 4) not in table.former, "back in the table"


def test_replies_name_the_closest_contacts_that_are_not_suspect() -> None:
    table = Table(ME, K)
    near = [contact(v, port=v) for v in range(1, 12)]
    for c in near:
        table.add(c, now=0.0)
    assert not table.suspect(near[0].id)
    table.record_failure(near[0])
    table.record_failure(near[2])
    assert table.suspect(near[0].id) and not table.suspect(idn(999))
    got = table.closest_live(Contact(idn(0)), K)
    assert [c.long_id for c in got] == [2, 4, 5, 6], "suspects skipped, k still named"
    assert [c.long_id for c in table.closest_live(Contact(idn(0)), K, exclude=near[1])] == [
        4,
        5,
        6,
        7,
    ]
