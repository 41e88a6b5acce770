"""The durable envelope store: idempotence, quotas, eviction, expiry, cursors, tables, bad files."""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path

import pyarrow as pa
import pytest
from helpers import NOW, assert_view_matches, coarse_key, make_envelopes, make_packets
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qisd.config import StoreLimits
from qisd.core import packet as P
from qisd.core.crypto import Identity
from qisd.errors import StoreError
from qisd.net.store import (
    REFUSED_EXPIRED,
    REFUSED_KEY_QUOTA,
    REFUSED_SIGNER_QUOTA,
    REFUSED_STORE_FULL,
    STORE_FILE,
    Store,
)

TTL = 30 * 86_400_000
BIG = StoreLimits(per_key=1_000_000, per_signer_per_key=1_000_000, max_bytes=1 << 40)
KEY = coarse_key()


def open_store(tmp_path: Path, limits: StoreLimits = BIG, ttl_ms: int = TTL) -> Store:
    return Store.open(tmp_path, limits=limits, ttl_ms=ttl_ms)


def ids(envs: list[P.Envelope]) -> list[str]:
    return [e.packet_id for e in envs]


def all_pages(store: Store, key: bytes, *, since: int, max_bytes: int, now_ms: int = NOW):
    """Every envelope after ``since`` by paging; returns (raws, final cursor, pages)."""
    out: list[bytes] = []
    pages = 0
    more = True
    while more:
        got, since, more = store.page(key, since=since, max_bytes=max_bytes, now_ms=now_ms)
        assert got or not more
        out.extend(got)
        pages += 1
        assert pages < 10_000
    return out, since, pages


# --------------------------------------------------------------------------- put


def test_put_then_read_back_after_reopen(tmp_path: Path) -> None:
    packets = make_packets(5)
    with open_store(tmp_path) as store:
        result = store.put([e for p in packets for e in p], now_ms=NOW)
        assert sorted(result.accepted) == sorted(e.packet_id for p in packets for e in p)
        assert result.duplicates == [] and result.refused == []
    assert (tmp_path / STORE_FILE).exists()
    with open_store(tmp_path) as store:
        for envs in packets:
            for env in envs:
                assert store.has(env.key, env.packet_id)
                assert store.get(env.packet_id, env.key) == env.raw
        assert store.get(packets[0][0].packet_id) == packets[0][0].raw
        assert store.get("0" * 32) is None
        assert dict(store.keys()) == {packets[0][0].key: 5, packets[0][1].key: 5}
        stats = store.stats()
        assert stats["keys"] == 2 and stats["packets"] == 10 and stats["local_packets"] == 0
        assert stats["bytes"] == sum(len(e.raw) for p in packets for e in p)
        assert store.integrity_check()


def test_duplicate_put_is_a_no_op(tmp_path: Path) -> None:
    envs = make_envelopes(4)
    with open_store(tmp_path) as store:
        first = store.put(envs, now_ms=NOW)
        before = store.stats()
        _, cursor, _ = store.page(KEY, max_bytes=1 << 20, now_ms=NOW)
        again = store.put(envs + envs[:1], now_ms=NOW + 1)
        assert first.accepted == ids(envs)
        assert again.accepted == [] and again.refused == []
        assert again.duplicates == ids(envs) + ids(envs[:1])
        assert store.stats() == before
        # A duplicate is not news: nothing new after the cursor, and one row per packet.
        assert store.page(KEY, since=cursor, max_bytes=1 << 20, now_ms=NOW) == ([], cursor, False)
        assert store.table(KEY, now_ms=NOW).num_rows == 4
        # The same envelope twice within one put is stored once.
        other = make_envelopes(1, problem_type="other")
        twice = store.put(other + other, now_ms=NOW)
        assert twice.accepted == ids(other) and twice.duplicates == ids(other)
        assert store.integrity_check()


def test_duplicate_local_put_marks_the_packet_local(tmp_path: Path) -> None:
    envs = make_envelopes(2)
    with open_store(tmp_path) as store:
        store.put(envs, now_ms=NOW)
        assert store.own_envelopes(now_ms=NOW) == []
        assert store.put(envs[:1], now_ms=NOW, local=True).duplicates == ids(envs[:1])
        own = store.own_envelopes(now_ms=NOW)
        assert [e.packet_id for e in own] == ids(envs[:1])
        assert own[0].raw == envs[0].raw and own[0].key == envs[0].key
        assert store.stats()["local_packets"] == 1
        assert store.integrity_check()


def test_expired_envelope_is_refused(tmp_path: Path) -> None:
    ttl = 60_000
    old = make_envelopes(1, timestamps=[NOW - ttl])
    fresh = make_envelopes(1, timestamps=[NOW - ttl + 1], start=1)
    with open_store(tmp_path, ttl_ms=ttl) as store:
        result = store.put(old + fresh, now_ms=NOW, local=True)
        assert result.accepted == ids(fresh)
        assert [(pid, r.split(":")[0]) for pid, r in result.refused] == [
            (old[0].packet_id, REFUSED_EXPIRED)
        ]
        assert not store.has(old[0].key, old[0].packet_id)


def test_documents_are_stored_with_the_put_time(tmp_path: Path) -> None:
    ident = Identity.generate()
    doc = P.seal(ident, P.KIND_TEMPLATE, KEY, b'{"fields":["domain"]}', timestamp_ms=0)
    packet = make_envelopes(1, ident)
    ttl = 60_000
    with open_store(tmp_path, ttl_ms=ttl) as store:
        assert store.put([doc, *packet], now_ms=NOW).accepted == [doc.packet_id, *ids(packet)]
        raws, _, _ = store.page(KEY, max_bytes=1 << 20, now_ms=NOW)
        assert raws == [doc.raw, packet[0].raw]
        # Documents carry no rows: the table holds only the packet.
        assert store.table(KEY, now_ms=NOW).column("packet_id").to_pylist() == ids(packet)
        # A republished document lives on; an unrenewed one expires ttl after it was stored.
        assert store.put([doc], now_ms=NOW + ttl - 1).duplicates == [doc.packet_id]
        assert store.expire(NOW + ttl) == 1  # the packet (timestamp NOW); the doc was renewed
        assert store.has(KEY, doc.packet_id)
        assert store.expire(NOW + 2 * ttl - 1) == 1
        assert not store.has(KEY, doc.packet_id)


# --------------------------------------------------------------------------- quotas


def test_signer_and_key_quotas_refuse_with_a_reason(tmp_path: Path) -> None:
    limits = StoreLimits(per_key=3, per_signer_per_key=2, max_bytes=1 << 30)
    a, b = Identity.generate(), Identity.generate()
    from_a = make_envelopes(3, a)
    from_b = make_envelopes(2, b)
    with open_store(tmp_path, limits) as store:
        result = store.put(from_a, now_ms=NOW)
        assert result.accepted == ids(from_a[:2])
        [(pid, reason)] = result.refused
        assert pid == from_a[2].packet_id and reason.startswith(REFUSED_SIGNER_QUOTA)
        assert "2 packets" in reason

        result = store.put(from_b, now_ms=NOW)
        assert result.accepted == ids(from_b[:1])
        [(pid, reason)] = result.refused
        assert pid == from_b[1].packet_id and reason.startswith(REFUSED_KEY_QUOTA)
        assert "3 packets" in reason

        # Another key has its own quota.
        elsewhere = make_envelopes(2, a, problem_type="elsewhere")
        assert store.put(elsewhere, now_ms=NOW).accepted == ids(elsewhere)
        # The node's own packets are never refused by a quota.
        mine = make_envelopes(3, a, start=10)
        assert store.put(mine, now_ms=NOW, local=True).accepted == ids(mine)
        assert dict(store.keys())[KEY] == 6
        assert store.integrity_check()


def test_quota_counts_only_unexpired_packets(tmp_path: Path) -> None:
    ttl = 60_000
    limits = StoreLimits(per_key=2, per_signer_per_key=2, max_bytes=1 << 30)
    ident = Identity.generate()
    old = make_envelopes(2, ident, timestamps=[NOW, NOW])
    new = make_envelopes(1, ident, start=5, now_ms=NOW + ttl, timestamps=[NOW + ttl])
    with open_store(tmp_path, limits, ttl_ms=ttl) as store:
        store.put(old, now_ms=NOW)
        # The two old ones have expired (not yet removed by expire()): they must not block.
        assert store.put(new, now_ms=NOW + ttl).accepted == ids(new)
        assert [store.has(KEY, e.packet_id) for e in old] == [False, False]
        assert store.integrity_check()


def sizes(envs: list[P.Envelope]) -> int:
    return sum(len(e.raw) for e in envs)


def test_global_cap_evicts_expired_first(tmp_path: Path) -> None:
    ttl = 60_000
    signer = Identity.generate()
    # `stale` expires at NOW + 1000; the others live until NOW + ttl.
    stale = make_envelopes(1, signer, timestamps=[NOW - ttl + 1000], start=100)
    heavy = make_envelopes(3, Identity.generate(), timestamps=[NOW - 3, NOW - 2, NOW - 1])
    keep = stale + heavy
    incoming = make_envelopes(1, now_ms=NOW + 1000, timestamps=[NOW + 1000], start=200)
    limits = StoreLimits(max_bytes=sizes(keep) + len(incoming[0].raw) - 1)
    with open_store(tmp_path, limits, ttl_ms=ttl) as store:
        assert store.put(keep, now_ms=NOW).accepted == ids(keep)
        result = store.put(incoming, now_ms=NOW + 1000)
        assert result.accepted == ids(incoming)
        # Dropping the expired one made room: the heavy signer kept everything.
        assert not store.has(KEY, stale[0].packet_id)
        assert all(store.has(KEY, e.packet_id) for e in heavy)
        assert result.evicted == 0
        assert store.stats()["bytes"] <= limits.max_bytes
        assert store.integrity_check()


def test_global_cap_evicts_oldest_of_the_largest_remote_signer(tmp_path: Path) -> None:
    heavy = make_envelopes(4, Identity.generate(), timestamps=[NOW - 40, NOW - 10, NOW - 30, NOW])
    light = make_envelopes(1, Identity.generate(), timestamps=[NOW - 100], start=50)
    mine = make_envelopes(2, Identity.generate(), timestamps=[NOW - 500, NOW - 400], start=60)
    incoming = make_envelopes(1, Identity.generate(), start=70)
    with open_store(tmp_path, StoreLimits(max_bytes=1 << 30)) as store:
        store.put(heavy + light, now_ms=NOW)
        store.put(mine, now_ms=NOW, local=True)
    cap = sizes(heavy + light + mine)  # full: any new byte needs an eviction
    with open_store(tmp_path, StoreLimits(max_bytes=cap)) as store:
        result = store.put(incoming, now_ms=NOW)
        assert result.accepted == ids(incoming)
        # Oldest first within the heaviest signer: timestamps NOW-40, then NOW-30, ...
        by_age = [heavy[0], heavy[2], heavy[1], heavy[3]]
        gone = [e for e in by_age if not store.has(KEY, e.packet_id)]
        assert gone == by_age[: len(gone)]
        assert len(gone) == result.evicted >= 1
        assert sizes(gone) >= len(incoming[0].raw)  # just enough room was made
        assert sizes(gone[:-1]) < len(incoming[0].raw)
        assert store.has(KEY, light[0].packet_id)
        assert all(store.has(KEY, e.packet_id) for e in mine)
        assert store.stats()["bytes"] <= cap
        assert store.integrity_check()


def test_global_cap_never_evicts_or_refuses_local_packets(tmp_path: Path) -> None:
    me = Identity.generate()
    # Older than the remote ones, and some remote ones share our signer (echoed back to us),
    # so "the largest signer's oldest first" would pick ours if local ones were not exempt.
    mine = make_envelopes(3, me, timestamps=[NOW - 9, NOW - 8, NOW - 7])
    remote = make_envelopes(3, me, start=10)
    cap = sizes(mine + remote)
    with open_store(tmp_path, StoreLimits(max_bytes=cap)) as store:
        assert store.put(mine, now_ms=NOW, local=True).accepted == ids(mine)
        assert store.put(remote, now_ms=NOW).accepted == ids(remote)
        # A flood of remote packets from many signers churns remote packets only.
        for i in range(5):
            flood = make_envelopes(2, Identity.generate(), start=100 + 10 * i)
            store.put(flood, now_ms=NOW)
            assert all(store.has(KEY, e.packet_id) for e in mine)
            assert store.stats()["bytes"] <= cap
        # More local packets than the cap allows: every remote one goes, the local ones stay.
        more_mine = make_envelopes(6, Identity.generate(), start=200)
        result = store.put(more_mine, now_ms=NOW, local=True)
        assert result.accepted == ids(more_mine) and result.refused == []
        stats = store.stats()
        assert stats["packets"] == stats["local_packets"] == 9
        # With nothing remote left to evict, a remote packet is refused, not a local one lost.
        late = make_envelopes(1, Identity.generate(), start=300)
        result = store.put(late, now_ms=NOW)
        [(pid, reason)] = result.refused
        assert pid == late[0].packet_id and reason.startswith(REFUSED_STORE_FULL)
        assert len(store.own_envelopes(now_ms=NOW)) == 9
        assert store.integrity_check()


def test_a_put_never_evicts_what_it_just_accepted(tmp_path: Path) -> None:
    batch = make_envelopes(5, Identity.generate())
    cap = sizes(batch[:2])
    with open_store(tmp_path, StoreLimits(max_bytes=cap)) as store:
        result = store.put(batch, now_ms=NOW)
        assert result.accepted == ids(batch[:2])
        assert [r.split(":")[0] for _, r in result.refused] == [REFUSED_STORE_FULL] * 3
        assert all(store.has(KEY, pid) for pid in result.accepted)


# --------------------------------------------------------------------------- expiry


def test_expire_removes_exactly_the_expired(tmp_path: Path) -> None:
    ttl = 60_000
    stamps = [NOW - 30_000, NOW - 20_000, NOW - 10_000, NOW]
    envs = make_envelopes(4, timestamps=stamps)
    with open_store(tmp_path, ttl_ms=ttl) as store:
        store.put(envs, now_ms=NOW, local=True)
        assert store.expire(NOW) == 0
        # Expiry is timestamp + ttl; a packet is gone at that instant, not one ms before.
        assert store.expire(stamps[1] + ttl - 1) == 1
        assert [store.has(KEY, e.packet_id) for e in envs] == [False, True, True, True]
        assert store.expire(stamps[1] + ttl) == 1
        assert [store.has(KEY, e.packet_id) for e in envs] == [False, False, True, True]
        assert store.expire(stamps[1] + ttl) == 0
        assert ids(store.own_envelopes(now_ms=stamps[1] + ttl)) == ids(envs[2:])
        assert store.stats()["packets"] == 2
        # Reads already hide what has expired, before expire() runs.
        later = stamps[2] + ttl
        assert store.table(KEY, now_ms=later).column("packet_id").to_pylist() == ids(envs[3:])
        assert store.page(KEY, max_bytes=1 << 20, now_ms=later)[0] == [envs[3].raw]
        assert ids(store.own_envelopes(now_ms=later)) == ids(envs[3:])
        assert store.integrity_check()


# --------------------------------------------------------------------------- cursors


def test_pages_give_everything_once_in_order(tmp_path: Path) -> None:
    envs = make_envelopes(40)
    with open_store(tmp_path) as store:
        store.put(envs, now_ms=NOW)
        store.put(make_envelopes(5, problem_type="another"), now_ms=NOW)  # other key: not here
        largest = max(len(e.raw) for e in envs)
        for max_bytes in (1, largest, 3 * largest, 1 << 20):
            raws, cursor, pages = all_pages(store, KEY, since=0, max_bytes=max_bytes)
            assert raws == [e.raw for e in envs]
            if max_bytes == 1:
                assert pages == 40  # at least one per page even if it is over the budget
            if max_bytes == 1 << 20:
                assert pages == 1
        got, _, more = store.page(KEY, max_bytes=3 * largest, now_ms=NOW)
        assert 1 <= len(got) <= 3 and more and sum(map(len, got)) <= 3 * largest
        # Past the end: nothing, the same cursor, nothing more.
        assert store.page(KEY, since=cursor, max_bytes=1 << 20, now_ms=NOW) == ([], cursor, False)
        assert store.page(b"\x00" * 20, max_bytes=1 << 20, now_ms=NOW) == ([], 0, False)


def test_a_cursor_gives_only_what_is_new(tmp_path: Path) -> None:
    ident = Identity.generate()
    first = make_envelopes(5, ident)
    second = make_envelopes(5, ident, start=5)
    third = make_envelopes(2, ident, start=10)
    with open_store(tmp_path) as store:
        store.put(first, now_ms=NOW)
        raws, cursor, _ = all_pages(store, KEY, since=0, max_bytes=700)
        assert raws == [e.raw for e in first]
        store.put(first[:2] + second, now_ms=NOW)  # duplicates are not new
        raws, cursor, _ = all_pages(store, KEY, since=cursor, max_bytes=700)
        assert raws == [e.raw for e in second]
    # Deleting the newest rows must not let seqs be reused: a new packet is still new.
    with open_store(tmp_path, limits=StoreLimits(max_bytes=1 << 30)) as store:
        conn = sqlite3.connect(store.path)
        conn.execute("DELETE FROM envelopes WHERE packet_id IN (?, ?)", ids(second[-2:]))
        conn.commit()
        conn.close()
        store.put(third, now_ms=NOW)
        raws, _, _ = all_pages(store, KEY, since=cursor, max_bytes=700)
        assert raws == [e.raw for e in third]


# --------------------------------------------------------------------------- tables


def test_table_has_result_schema_in_seq_order(tmp_path: Path) -> None:
    ident = Identity.generate()
    packets = make_packets(3, ident, rows_per_packet=4)
    with open_store(tmp_path) as store:
        store.put([p[1] for p in reversed(packets)], now_ms=NOW)
        key = packets[0][1].key
        table = store.table(key, now_ms=NOW)
        assert table.schema == P.RESULT_SCHEMA and table.num_rows == 12
        assert table.column("packet_id").to_pylist() == [
            p[1].packet_id for p in reversed(packets) for _ in range(4)
        ]
        expected = pa.Table.from_batches(
            [
                P.with_provenance(p[1].batch(), p[1].packet_id, p[1].public_key)
                for p in packets[::-1]
            ]
        )
        assert table.equals(expected)
        assert set(table.column("signer").to_pylist()) == {ident.public_key.hex()}
        assert set(table.column("node_id").to_pylist()) == {ident.node_id}
        empty = store.table(b"\x01" * 20, now_ms=NOW)
        assert empty.num_rows == 0 and empty.schema == P.RESULT_SCHEMA


def test_table_follows_puts_time_and_expire(tmp_path: Path) -> None:
    ttl = 60_000
    envs = make_envelopes(3, timestamps=[NOW - 1000, NOW, NOW])
    with open_store(tmp_path, ttl_ms=ttl) as store:
        store.put(envs[:2], now_ms=NOW)
        assert store.table(KEY, now_ms=NOW).column("packet_id").to_pylist() == ids(envs[:2])
        store.put(envs[2:], now_ms=NOW)
        assert store.table(KEY, now_ms=NOW).num_rows == 3
        # A duplicate changes nothing.
        store.put(envs[:1], now_ms=NOW)
        assert store.table(KEY, now_ms=NOW).num_rows == 3
        # Time passing the first row's expiry hides it even before expire() runs.
        t3 = store.table(KEY, now_ms=NOW - 1000 + ttl)
        assert t3.column("packet_id").to_pylist() == ids(envs[1:])
        assert store.count(KEY, now_ms=NOW - 1000 + ttl) == 2
        assert store.table(KEY, now_ms=NOW).num_rows == 3
        store.expire(NOW - 1000 + ttl)
        assert store.table(KEY, now_ms=NOW).column("packet_id").to_pylist() == ids(envs[1:])


def test_reads_come_from_the_view_without_decoding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import qisd.net.store as store_module

    envs = make_envelopes(30)
    with open_store(tmp_path) as store:
        store.put(envs[:20], now_ms=NOW)
    with open_store(tmp_path) as store:
        store.put(envs[20:], now_ms=NOW)
        decoded = pa.Table.from_batches(store.decoded(KEY, now_ms=NOW, max_rows=8))
        # A put queues its rows; the first read builds them, once. From then on, and for the
        # rows written out to the file, reads decode nothing.
        assert store.table(KEY, now_ms=NOW).equals(decoded)

        def no_decoding(*args: object) -> None:
            raise AssertionError("decoded an envelope")

        monkeypatch.setattr(store_module, "read_trusted", no_decoding)
        monkeypatch.setattr(P.Envelope, "batch", no_decoding)
        assert pa.Table.from_batches(store.scan(KEY, now_ms=NOW, max_rows=8)).equals(decoded)
        assert store.table(KEY, now_ms=NOW).equals(decoded)
        # The view is an Arrow IPC stream any Arrow reader opens (with two hidden columns).
        view_file = tmp_path / "view" / (KEY.hex() + ".arrows")
    assert view_file.exists()  # written out at close
    on_disk = pa.ipc.open_stream(pa.memory_map(str(view_file))).read_all()
    assert on_disk.num_rows == 30
    assert on_disk.select(P.RESULT_SCHEMA.names).equals(decoded)


def test_a_scan_keeps_the_rows_of_the_moment_it_began(tmp_path: Path) -> None:
    held = make_envelopes(16, Identity.generate())
    with Store.open(tmp_path, limits=StoreLimits(max_bytes=sizes(held)), ttl_ms=TTL) as capped:
        capped.put(held, now_ms=NOW)
        stream = capped.scan(KEY, now_ms=NOW, max_rows=8)
        evicted = capped.put(make_envelopes(1, start=500), now_ms=NOW).evicted
        assert evicted >= 1
        # Begun before the eviction: it yields the 16 rows it began with.
        assert pa.Table.from_batches(stream).column("packet_id").to_pylist() == ids(held)
        after = capped.table(KEY, now_ms=NOW)["packet_id"].to_pylist()
        assert held[0].packet_id not in after and len(after) == 17 - evicted


def test_a_scan_begun_before_a_compaction_reads_the_file_it_began_with(tmp_path: Path) -> None:
    envs = make_envelopes(40, timestamps=[NOW - 10_000] * 30 + [NOW] * 10)
    with open_store(tmp_path) as store:
        store.put(envs, now_ms=NOW)
    with open_store(tmp_path) as store:  # the rows are in the file now, not in memory
        stream = store.scan(KEY, now_ms=NOW, max_rows=7)
        view_file = tmp_path / "view" / (KEY.hex() + ".arrows")
        before = view_file.stat().st_ino
        assert store.expire(NOW - 10_000 + TTL) == 30  # compacts: a new file replaces the old
        assert view_file.stat().st_ino != before
        assert pa.Table.from_batches(stream).column("packet_id").to_pylist() == ids(envs)
        assert store.table(KEY, now_ms=NOW).column("packet_id").to_pylist() == ids(envs[30:])


def test_batches_are_bounded_and_match_the_table(tmp_path: Path) -> None:
    packets = make_packets(12, rows_per_packet=5)
    with open_store(tmp_path) as store:
        store.put([p[0] for p in packets], now_ms=NOW)
        for max_rows in (1, 7, 60, 1000):
            batches = list(store.batches(KEY, now_ms=NOW, max_rows=max_rows))
            assert all(0 < b.num_rows <= max_rows for b in batches)
            assert all(b.schema == P.RESULT_SCHEMA for b in batches)
            assert sum(b.num_rows for b in batches) == 60
            if max_rows == 7:
                assert len(batches) == 9  # only the last batch is short
        whole = store.table(KEY, now_ms=NOW)  # now cached: batches slice it
        streamed = pa.Table.from_batches(store.batches(KEY, now_ms=NOW, max_rows=7))
        assert streamed.equals(whole)
        assert list(store.batches(b"\x02" * 20, now_ms=NOW)) == []


# --------------------------------------------------------------------------- meta


def test_meta_values_persist(tmp_path: Path) -> None:
    with open_store(tmp_path) as store:
        assert store.get_meta("followed", []) == []
        store.set_meta("followed", ["a/b", "c/d"])
        store.set_meta("followed", ["a/b"])
        store.set_meta("cursor", {"k": 12})
    with open_store(tmp_path) as store:
        assert store.get_meta("followed") == ["a/b"]
        assert store.get_meta("cursor") == {"k": 12}
        assert store.get_meta("missing") is None


# --------------------------------------------------------------------------- bad files


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_file_that_is_not_sqlite_is_refused_and_left_alone(tmp_path: Path) -> None:
    path = tmp_path / STORE_FILE
    path.write_bytes(b"definitely not a database\n" * 200)
    before = digest(path)
    with pytest.raises(StoreError, match="not a qisd store"):
        open_store(tmp_path)
    assert digest(path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [STORE_FILE]


def test_a_foreign_sqlite_file_is_refused_and_left_alone(tmp_path: Path) -> None:
    path = tmp_path / STORE_FILE
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE envelopes (x)")
    conn.execute("INSERT INTO envelopes VALUES (1)")
    conn.commit()
    conn.close()
    before = digest(path)
    with pytest.raises(StoreError, match="another program"):
        open_store(tmp_path)
    assert digest(path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [STORE_FILE]


def test_a_damaged_store_gives_a_clear_error_and_is_left_alone(tmp_path: Path) -> None:
    with open_store(tmp_path) as store:
        store.put(make_envelopes(30), now_ms=NOW)
    path = tmp_path / STORE_FILE
    data = bytearray(path.read_bytes())
    page_size = int.from_bytes(data[16:18], "big")
    # Keep the header (so it still looks like ours) and wreck the schema and every other page.
    data[100:] = b"\xa5" * (len(data) - 100)
    path.write_bytes(bytes(data))
    before = digest(path)
    with pytest.raises(StoreError, match="damaged") as info:
        open_store(tmp_path)
    assert "Traceback" not in str(info.value) and str(path) in str(info.value)
    assert digest(path) == before
    assert page_size > 0


def test_a_store_from_a_newer_qisd_is_refused(tmp_path: Path) -> None:
    open_store(tmp_path).close()
    conn = sqlite3.connect(tmp_path / STORE_FILE)
    conn.execute("PRAGMA user_version=99")
    conn.close()
    with pytest.raises(StoreError, match="newer qisd"):
        open_store(tmp_path)


def _indexes(conn: sqlite3.Connection) -> dict[str, str]:
    return dict(conn.execute("SELECT name, sql FROM sqlite_master WHERE type = 'index'"))


def test_a_schema_1_store_is_migrated_on_open_with_its_rows(tmp_path: Path) -> None:
    packets = make_packets(4)
    with open_store(tmp_path) as store:
        store.put([e for p in packets for e in p], now_ms=NOW)
    # Turn the file back into what schema 1 wrote: full indexes, the signer index, version 1.
    conn = sqlite3.connect(tmp_path / STORE_FILE, isolation_level=None)
    conn.executescript(
        "BEGIN; DROP INDEX envelopes_source; DROP INDEX envelopes_local;"
        " CREATE INDEX envelopes_signer ON envelopes (signer, local, timestamp_ms);"
        " CREATE INDEX envelopes_source ON envelopes (source, local, timestamp_ms);"
        " CREATE INDEX envelopes_local ON envelopes (local, expires_ms);"
        " PRAGMA user_version=1; COMMIT;"
    )
    conn.close()
    with open_store(tmp_path) as store:
        conn = store._conn
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 2
        indexes = _indexes(conn)
        assert "envelopes_signer" not in indexes
        assert "WHERE local = 0" in indexes["envelopes_source"]
        assert "WHERE local = 1" in indexes["envelopes_local"]
        key = packets[0][0].key
        got = store.table(key, now_ms=NOW).column("packet_id").to_pylist()
        assert sorted(got) == sorted(p[0].packet_id for p in packets if p[0].key == key)
        assert store.put(make_envelopes(1), now_ms=NOW).accepted
    # A new store is created at schema 2 directly, with the same indexes.
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    with open_store(fresh) as store:
        assert _indexes(store._conn) == indexes


def test_a_one_packet_put_writes_few_wal_bytes(tmp_path: Path) -> None:
    # Every page a commit dirties is written whole to the WAL and fsynced before the put
    # returns: an emit of one packet (two envelopes) must write kilobytes, not a dozen 4 KiB
    # pages, so the page size and the indexes it touches stay small.
    written = []
    with open_store(tmp_path) as store:
        conn = store._conn
        page = conn.execute("PRAGMA page_size").fetchone()[0]
        for packet in make_packets(60):
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # the next commit starts the WAL
            store.put(packet, now_ms=NOW, local=True)
            written.append(conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()[1] * page)
    mean = sum(written) / len(written)
    assert mean <= 24 * 1024, f"a one-packet put writes {mean:.0f} WAL bytes on average"


def test_missing_directory_and_closed_store(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="qisd init"):
        Store.open(tmp_path / "nope" / STORE_FILE, limits=BIG, ttl_ms=TTL)
    store = open_store(tmp_path)
    store.close()
    store.close()
    with pytest.raises(StoreError, match="closed"):
        store.put(make_envelopes(1), now_ms=NOW)


def test_store_file_is_owner_only(tmp_path: Path) -> None:
    open_store(tmp_path).close()
    assert (tmp_path / STORE_FILE).stat().st_mode & 0o777 == 0o600


def test_store_runs_in_wal_mode_with_full_sync(tmp_path: Path) -> None:
    # Power loss cannot be simulated here, so pin the settings that make a commit survive it.
    with open_store(tmp_path) as store:
        conn = store._conn
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert conn.execute("PRAGMA application_id").fetchone()[0] == 0x51495344


def test_an_empty_file_becomes_a_store(tmp_path: Path) -> None:
    (tmp_path / STORE_FILE).touch()
    with open_store(tmp_path) as store:
        assert store.put(make_envelopes(1), now_ms=NOW).accepted


def test_batches_never_decode_more_rows_at_once_than_max_rows(tmp_path: Path) -> None:
    # 40 envelopes of 128 rows: a step bounded by envelope count instead of rows would
    # decode all 5,120 rows to produce the first 128-row batch.
    store = Store.open(tmp_path, limits=BIG, ttl_ms=TTL, cache_bytes=0)
    envs = [p[0] for p in make_packets(40, rows_per_packet=P.MAX_ROWS)]
    store.put(envs, now_ms=NOW)
    full = store.table(coarse_key(), now_ms=NOW)
    assert full.num_rows == 40 * P.MAX_ROWS
    full_bytes = full.nbytes
    del full
    base = pa.total_allocated_bytes()
    peak = 0
    rows = 0
    for batch in store.batches(coarse_key(), now_ms=NOW, max_rows=P.MAX_ROWS):
        assert batch.num_rows <= P.MAX_ROWS
        rows += batch.num_rows
        peak = max(peak, pa.total_allocated_bytes() - base)
    assert rows == 40 * P.MAX_ROWS
    assert peak < full_bytes / 4, (peak, full_bytes)


# --------------------------------------------------------------------------- columnar view

_SIGNERS = [Identity.generate() for _ in range(3)]
_POOL = [
    envs
    for i, ident in enumerate(_SIGNERS)
    for envs in make_packets(
        14,
        ident,
        rows_per_packet=1 + i,
        start=100 * i,
        timestamps=[NOW - 1_000 * (j % 7) for j in range(14)],
    )
]
"""42 packets (two envelopes each) of three signers, of 1-3 rows, timestamps 0-6 s old."""


def _crash(store: Store) -> None:
    """Leave ``store`` as SIGKILL leaves it: tails never written, compactions never made."""
    import os

    views = store._views
    assert views is not None
    os.close(views._lock_fd)
    store._views = None
    store.close()


def test_a_torn_or_lost_view_is_repaired_from_the_envelopes(tmp_path: Path) -> None:
    envs = [e for p in _POOL for e in p]
    with open_store(tmp_path) as store:
        store.put(envs, now_ms=NOW)
    view_file = tmp_path / "view" / (KEY.hex() + ".arrows")
    whole = view_file.read_bytes()
    with open(view_file, "ab") as f:
        f.write(whole[-300:])  # half a batch after the last whole one, as a crash mid-write
    with open_store(tmp_path) as store:
        assert store._views is not None and store._views.repaired["cut"] == 1
        assert assert_view_matches(store, NOW) == 2 * sum(p[0].rows for p in _POOL)
    assert view_file.read_bytes() == whole
    view_file.write_bytes(b"not arrow at all")
    with open_store(tmp_path) as store:
        assert assert_view_matches(store, NOW) == 2 * sum(p[0].rows for p in _POOL)
    for f in (tmp_path / "view").glob("*.arrows"):
        f.unlink()
    with open_store(tmp_path) as store:
        assert assert_view_matches(store, NOW) == 2 * sum(p[0].rows for p in _POOL)


def test_another_connections_writes_reach_the_view(tmp_path: Path) -> None:
    envs = [p[0] for p in _POOL]
    with open_store(tmp_path) as owner:
        owner.put(envs[:10], now_ms=NOW)
        assert owner.table(KEY, now_ms=NOW).num_rows == sum(e.rows for e in envs[:10])
        # A second store on the same file does not own the view: it reads the envelopes.
        with open_store(tmp_path) as other:
            assert other._views is None
            other.put(envs[10:20], now_ms=NOW)
            assert other.table(KEY, now_ms=NOW).num_rows == sum(e.rows for e in envs[:20])
            other.expire(NOW + TTL - 3_000)
        assert_view_matches(owner, NOW)
        assert owner.table(KEY, now_ms=NOW).num_rows == other_rows(envs[:20], NOW + TTL - 3_000)


def other_rows(envs: list[P.Envelope], expired_at: int) -> int:
    return sum(e.rows for e in envs if e.timestamp_ms + TTL > expired_at)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.lists(
        st.one_of(
            st.tuples(
                st.just("put"),
                st.lists(st.integers(0, len(_POOL) - 1), min_size=1, max_size=8),
                st.booleans(),
            ),
            st.tuples(st.just("expire"), st.integers(0, 7_000), st.just(False)),
            st.tuples(st.just("reopen"), st.just(0), st.just(False)),
            st.tuples(st.just("crash"), st.just(0), st.just(False)),
        ),
        min_size=1,
        max_size=12,
    )
)
def test_the_view_always_equals_a_decode_of_the_envelopes(tmp_path: Path, ops: list) -> None:
    """Puts (local and remote, with quota refusals, purges and evictions), expiry, clean
    reopens and simulated crashes in any order: after each, every key's view equals a decode
    of its envelopes, and the reads hide what is expired at the time asked."""
    import shutil
    import uuid

    ttl = 20_000
    directory = tmp_path / uuid.uuid4().hex
    directory.mkdir()
    limits = StoreLimits(per_key=30, per_signer_per_key=12, max_bytes=40 * 700)
    store = Store.open(directory, limits=limits, ttl_ms=ttl)
    now = NOW
    try:
        for op, arg, local in ops:
            if op == "put":
                store.put([e for i in arg for e in _POOL[i]], now_ms=now, local=local)
            elif op == "expire":
                now = NOW + arg + ttl - 7_000
                store.expire(now)
            elif op == "reopen":
                store.close()
                store = Store.open(directory, limits=limits, ttl_ms=ttl)
            else:
                _crash(store)
                store = Store.open(directory, limits=limits, ttl_ms=ttl)
            assert_view_matches(store, now)
            assert_view_matches(store, now + 3_000)
            assert store.integrity_check()
    finally:
        store.close()
        shutil.rmtree(directory)


# --------------------------------------------------------------------------- group commit


def test_concurrent_puts_share_commits_and_each_gets_its_own_result(tmp_path: Path) -> None:
    import threading

    writers, per_writer = 8, 40
    packets = [make_packets(per_writer, Identity.generate()) for _ in range(writers)]
    results: dict[int, list[list[str]]] = {}
    start = threading.Barrier(writers)
    with open_store(tmp_path) as store:

        def write(w: int) -> None:
            start.wait(timeout=30)
            results[w] = [store.put(p, now_ms=NOW).accepted for p in packets[w]]

        threads = [threading.Thread(target=write, args=(w,)) for w in range(writers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert all(not t.is_alive() for t in threads)
        # Each put was told exactly what it stored, and all of it is there.
        for w in range(writers):
            assert results[w] == [ids(p) for p in packets[w]]
        for p in (p for ps in packets for p in ps):
            assert all(store.has(e.key, e.packet_id) for e in p)
        puts = writers * per_writer
        assert store.groups["puts"] == puts
        # Writers waiting while a commit was under way went together into the next one.
        assert store.groups["commits"] < puts, store.groups
        assert store.integrity_check()
        assert assert_view_matches(store, NOW) == 2 * puts


def test_a_failing_put_in_a_group_fails_alone(tmp_path: Path) -> None:
    envs = make_envelopes(3)
    with open_store(tmp_path) as store:
        store.put(envs[:1], now_ms=NOW)
        store._conn.execute(
            "CREATE TRIGGER refuse BEFORE INSERT ON envelopes WHEN NEW.packet_id = ?"
            " BEGIN SELECT RAISE(ABORT, 'refused by a test trigger'); END".replace(
                "?", f"'{envs[1].packet_id}'"
            )
        )
        from qisd.net.store import _PutCall

        calls = [_PutCall([e], NOW, False, "") for e in envs[1:]]
        store._commit_group(calls)
        assert isinstance(calls[0].error, StoreError) and "test trigger" in str(calls[0].error)
        assert calls[1].error is None and calls[1].result.accepted == [envs[2].packet_id]
        assert not store.has(KEY, envs[1].packet_id) and store.has(KEY, envs[2].packet_id)
        assert store.table(KEY, now_ms=NOW).column("packet_id").to_pylist() == ids(
            [envs[0], envs[2]]
        )


def test_view_files_are_owner_only(tmp_path: Path) -> None:
    import os

    old = os.umask(0o022)
    try:
        with open_store(tmp_path) as store:
            store.put(make_envelopes(3), now_ms=NOW)
    finally:
        os.umask(old)
    view = tmp_path / "view"
    assert (view.stat().st_mode & 0o777) == 0o700
    files = list(view.glob("*.arrows"))
    assert files and all((f.stat().st_mode & 0o777) == 0o600 for f in files)


def test_generation_changes_exactly_when_a_keys_rows_do(tmp_path: Path) -> None:
    envs = make_envelopes(3, timestamps=[NOW - 10_000, NOW, NOW])
    with open_store(tmp_path) as store:
        g0 = store.generation(KEY)
        store.put(envs, now_ms=NOW)
        g1 = store.generation(KEY)
        assert g1 != g0
        store.put(envs[:1], now_ms=NOW)  # a duplicate changes nothing
        assert store.generation(KEY) == g1
        assert store.expire(NOW - 10_000 + TTL) == 1
        g2 = store.generation(KEY)
        assert g2 != g1
        assert store.index(KEY, now_ms=NOW - 10_000 + TTL)[0] == g2
        with open_store(tmp_path) as other:  # another connection's write
            other.put(make_envelopes(1, start=900), now_ms=NOW)
        assert store.table(KEY, now_ms=NOW).num_rows == 3
        assert store.generation(KEY) != g2
