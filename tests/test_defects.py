"""One test per defect of ``kademlia-defects.md`` (kademlia 2.2.3 / rpcudp 5.0.1).

Each test first runs the scenario against the stock class and asserts that it misbehaves as
the defect describes, then runs it against qisd's override and asserts the fixed behaviour, so
a test fails both if the stock package changes under us and if qisd's fix is removed. Stock
classes are driven in-process (a recording transport or a scripted protocol stands in for the
network where that is enough); qisd's are real UDP nodes on 127.0.0.1 where it matters.
"""

from __future__ import annotations

import asyncio
import builtins
import hashlib
import json
import pickle
import random
import socket
import time
from collections import Counter
from pathlib import Path
from typing import Any

import msgpack
import pytest
import umsgpack
from helpers import NOW, make_packets
from kademlia.crawling import NodeSpiderCrawl, ValueSpiderCrawl
from kademlia.network import Server
from kademlia.node import Node
from kademlia.protocol import KademliaProtocol
from kademlia.routing import RoutingTable
from kademlia.storage import ForgetfulStorage
from kademlia.utils import digest
from rpcudp.exceptions import MalformedMessage
from test_dht import Network, fixed_clock, publish_from, run

from qisd.config import DhtConfig, StoreLimits
from qisd.core.crypto import Identity
from qisd.net import wire
from qisd.net.crawl import NodeCrawl, PacketCrawl
from qisd.net.dht import (
    DhtNode,
    FindPacketsReply,
    QisdProtocol,
    StoreStorage,
    _Request,
)
from qisd.net.routing import Contact, QisdRoutingTable
from qisd.net.store import Store

TTL_MS = 30 * 86_400_000


class RecordingTransport:
    """Stands in for a datagram transport: keeps what was sent."""

    def __init__(self) -> None:
        self.sent: list[tuple[bytes, tuple]] = []

    def sendto(self, data: bytes, addr: tuple) -> None:
        self.sent.append((data, addr))

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def names(self) -> list[str]:
        out = []
        for data, _addr in self.sent:
            kind, _mid, payload = wire.decode_datagram(data)
            if kind == wire.REQUEST:
                out.append(payload[0])
        return out


def qisd_protocol(tmp_path: Path, node_id: bytes | None = None, **config: Any) -> QisdProtocol:
    """A QisdProtocol over a real Store and a recording transport (call inside a loop)."""
    store = Store.open(tmp_path, limits=StoreLimits(), ttl_ms=TTL_MS)
    ident = Identity.generate()
    proto = QisdProtocol(
        Node(node_id or ident.dht_id),
        StoreStorage(store, fixed_clock),
        config.pop("ksize", 20),
        identity=ident,
        config=DhtConfig(**config),
        clock=fixed_clock,
    )
    proto.connection_made(RecordingTransport())
    return proto


def stock_protocol(node_id: bytes, ksize: int = 20) -> KademliaProtocol:
    proto = KademliaProtocol(Node(node_id), ForgetfulStorage(), ksize)
    proto.connection_made(RecordingTransport())
    return proto


def idn(value: int) -> bytes:
    return value.to_bytes(20, "big")


class ScriptedProtocol:
    """A protocol double for crawls: per-peer scripted replies, optionally delayed."""

    def __init__(self, replies: dict[bytes, Any], delays: dict[bytes, float] | None = None):
        self.source_node = Node(idn(0))
        self.replies = replies
        self.delays = delays or {}
        self.asked: list[bytes] = []
        self.stored: list[bytes] = []
        self.events: list[str] = []

    async def _reply(self, node: Node) -> Any:
        self.asked.append(node.id)
        delay = self.delays.get(node.id)
        if delay:
            fut = asyncio.get_running_loop().create_future()
            asyncio.get_running_loop().call_later(delay, fut.set_result, None)
            await fut
        return self.replies[node.id]

    async def call_find_value(self, node: Node, target: Node) -> Any:
        return await self._reply(node)

    async def call_find_node(self, node: Node, target: Node) -> Any:
        return await self._reply(node)

    async def call_find_packets(self, node: Node, key: bytes, cursor: Any) -> Any:
        return await self._reply(node)

    async def call_store(self, node: Node, key: bytes, value: Any) -> Any:
        self.stored.append(node.id)
        self.events.append("store")
        return True


async def drain() -> list[BaseException]:
    """Run every other task of the loop to completion; the exceptions they raised."""
    errors: list[BaseException] = []
    while True:
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        if not tasks:
            return errors
        results = await asyncio.gather(*tasks, return_exceptions=True)
        errors.extend(r for r in results if isinstance(r, BaseException))


def ids_with_top_bits(top: int, bits: int, count: int) -> list[Identity]:
    """Identities whose dht_id starts with the ``bits``-bit prefix ``top``."""
    out = []
    while len(out) < count:
        ident = Identity.generate()
        if int.from_bytes(ident.dht_id, "big") >> (160 - bits) == top:
            out.append(ident)
    return out


# --------------------------------------------------------------------------- 1


def test_defect_01_store_storm(tmp_path: Path) -> None:
    # Stock: a peer parked in the replacement cache is "new" on every message, so each of its
    # pings re-sends the store and pings the bucket head again.
    async def stock() -> tuple[int, int]:
        proto = stock_protocol(idn(0), ksize=1)
        proto._wait_timeout = 0.01  # nobody answers here; let the calls end quickly
        key = next(k for k in (b"k%d" % i for i in range(1000)) if digest(k)[0] >> 6 == 0)
        proto.storage[key] = b"value"
        head = Node(idn((1 << 160) - 1), "127.0.0.1", 1)
        parked = Node(idn((1 << 159) + 1), "127.0.0.1", 2)
        proto.router.add_contact(head)
        for _ in range(50):
            proto.rpc_ping(("127.0.0.1", 2), parked.id)
        await drain()
        names = proto.transport.names()
        return names.count("store"), names.count("ping")

    stores, pings = asyncio.run(stock())
    assert stores >= 50 and pings >= 50

    # qisd: S (top bit 0) with A and B (top bit 1) and k=1: B is parked; 50 pings from B
    # cause no hand-off storm and no head pings.
    async def body(net: Network) -> None:
        (s_id,) = ids_with_top_bits(0, 1, 1)
        a_id, b_id = ids_with_top_bits(1, 1, 2)
        net.config = DhtConfig(ksize=1)
        s, a, b = (net.make(i) for i in (s_id, a_id, b_id))
        for n in (s, a, b):
            await n.start()
            net.nodes.append(n)
        envs = [p[0] for p in make_packets(3)]
        s.store.put(envs, now_ms=NOW)
        assert await a.bootstrap([s.address]) == 1
        await net.settle()
        ok = await b.bootstrap([s.address])
        assert ok == 1
        await net.settle()
        head_pings_before = a.stats()["rpcs_received"].get("ping", 0)
        s_view = s.protocol.router
        assert [c.id for c in s_view.contacts()] == [a.node_id]
        assert s_view.get(b.node_id) is not None, "B is parked in the replacement cache"
        stores_before = b.stats()["rpcs_received"].get("store_packets", 0)
        contact = Contact(s.node_id, *s.address)
        for _ in range(50):
            ok, _ = await b.protocol.call_ping(contact)
            assert ok
        await net.settle()
        assert b.stats()["rpcs_received"].get("store_packets", 0) - stores_before == 0
        assert a.stats()["rpcs_received"].get("ping", 0) - head_pings_before == 0

    run(tmp_path, body)


# --------------------------------------------------------------------------- 2


def test_defect_02_get_stops_at_first_value_and_keeps_one(tmp_path: Path) -> None:
    p1, p2, p3, p4 = (Node(idn(i), "127.0.0.1", 1000 + i) for i in (1, 2, 3, 4))
    target = Node(idn(0))

    async def stock(values: dict[bytes, Any]) -> tuple[Any, ScriptedProtocol]:
        replies = {
            p1.id: (True, [tuple(p4)]),
            p2.id: (True, {"value": values[p2.id]}),
            p3.id: (True, {"value": values[p3.id]}),
            p4.id: (True, {"value": values[p4.id]}),
        }
        proto = ScriptedProtocol(replies)
        crawl = ValueSpiderCrawl(proto, target, [p1, p2, p3], 20, 3)
        return await crawl.find(), proto

    value, proto = asyncio.run(stock({p2.id: b"a", p3.id: b"b", p4.id: b"c"}))
    assert value in (b"a", b"b") and p4.id not in proto.asked, "stopped at the first round"
    assert proto.events == ["store"], "awaited a caching STORE before returning"
    with pytest.raises(TypeError):
        asyncio.run(stock({p2.id: [b"a"], p3.id: [b"b"], p4.id: [b"c"]}))

    def page(*raws: bytes, nodes: list[Node] | None = None) -> tuple[bool, FindPacketsReply]:
        return True, FindPacketsReply(nodes or [], list(raws), 1, False)

    async def ours() -> tuple[Any, ScriptedProtocol]:
        replies = {p1.id: page(nodes=[p4]), p2.id: page(b"a"), p3.id: page(b"b"), p4.id: page(b"c")}
        proto = ScriptedProtocol(replies)
        crawl = PacketCrawl(proto, target, [p1, p2, p3], 20, 3, stall_after=lambda: 1.0)
        return await crawl.find(), proto

    replies, proto = asyncio.run(ours())
    assert sorted(r for raws in replies.raws.values() for r in raws) == [b"a", b"b", b"c"]
    assert proto.stored == []

    # End to end: a fetch merges every replica's packets (one replica holds an extra one).
    async def body(net: Network) -> None:
        await net.add(8)
        envs = [p[0] for p in make_packets(3)]
        await publish_from(net.nodes[0], envs[:2])
        extra_holder = net.nodes[5]
        extra_holder.store.put([envs[2]], now_ms=NOW)
        got = await net.nodes[2].fetch(envs[0].key)
        assert {e.packet_id for e in got} == {e.packet_id for e in envs}

    run(tmp_path, body)


# --------------------------------------------------------------------------- 3


def test_defect_03_get_answers_from_local_storage(tmp_path: Path) -> None:
    async def stock() -> Any:
        server = Server()  # never listening: a network call would fail
        server.storage[digest("k")] = "stale local value"
        return await server.get("k")

    assert asyncio.run(stock()) == "stale local value"

    async def body(net: Network) -> None:
        await net.add(6)
        local_only, networked = (p[0] for p in make_packets(2))
        asker = net.nodes[1]
        asker.store.put([local_only], now_ms=NOW)
        await publish_from(net.nodes[4], [networked])
        sent_before = sum(asker.stats()["rpcs_sent"].values())
        got = await asker.fetch(networked.key)
        assert {e.packet_id for e in got} == {local_only.packet_id, networked.packet_id}
        assert sum(asker.stats()["rpcs_sent"].values()) > sent_before

    run(tmp_path, body)


# --------------------------------------------------------------------------- 4


def test_defect_04_no_authentication_last_writer_wins(tmp_path: Path) -> None:
    stock = stock_protocol(idn(0))

    async def stock_run() -> None:
        stock.rpc_store(("127.0.0.1", 9), idn(5), b"k" * 20, b"first writer")
        stock.rpc_store(("127.0.0.1", 9), idn(6), b"k" * 20, b"anything" * 1000)

    asyncio.run(stock_run())
    assert stock.storage[b"k" * 20] == b"anything" * 1000

    async def ours() -> None:
        proto = qisd_protocol(tmp_path)
        first, second = (p[0] for p in make_packets(2))
        sender = [Identity.generate().dht_id]
        peer = _Request(("127.0.0.1", 9), 1_000, validated=True)
        reply = proto._rpc_store_packets(peer, [*sender, first.key, [b"anything" * 100, first.raw]])
        assert reply["accepted"] == [first.packet_id]
        assert "DecodeError" in reply["refused"][0][1]
        reply = proto._rpc_store_packets(peer, [*sender, first.key, [second.raw]])
        assert reply["accepted"] == [second.packet_id]
        held = set(proto.storage[first.key])
        assert held == {first.raw, second.raw}, "many signed values per key, none overwritten"
        assert proto.counters["rejected.DecodeError"] == 1
        proto.close()

    asyncio.run(ours())


# --------------------------------------------------------------------------- 5


def test_defect_05_fixed_timeout_single_failure_evicts_lockstep_rounds(tmp_path: Path) -> None:
    async def stock() -> tuple[int, bool, float]:
        proto = stock_protocol(idn(0))
        peer = Node(idn(7), "127.0.0.1", 9)
        proto.router.add_contact(peer)
        proto.handle_call_response((False, None), peer)
        evicted = proto.router.is_new_node(peer)
        dead, live = Node(idn(1), "127.0.0.1", 1), Node(idn(2), "127.0.0.1", 2)
        scripted = ScriptedProtocol(
            {dead.id: (False, None), live.id: (True, [])}, delays={dead.id: 0.6}
        )
        t0 = time.perf_counter()
        await NodeSpiderCrawl(scripted, Node(idn(3)), [dead, live], 20, 3).find()
        return proto._wait_timeout, evicted, time.perf_counter() - t0

    timeout, evicted, took = asyncio.run(stock())
    assert timeout == 5 and evicted and took >= 0.6

    async def ours() -> None:
        proto = qisd_protocol(tmp_path, rpc_timeout=0.75, evict_after_failures=3)
        assert proto._wait_timeout == 0.75
        peer = Contact(idn(7), "127.0.0.1", 9)
        proto.router.add_contact(peer)
        for _ in range(2):
            proto.handle_call_response((False, None), peer)
        assert proto.router.get(peer.id) is not None, "two failures do not evict"
        proto.handle_call_response((False, None), peer)
        assert proto.router.get(peer.id) is None
        dead, live = Node(idn(1), "127.0.0.1", 1), Node(idn(2), "127.0.0.1", 2)
        scripted = ScriptedProtocol(
            {dead.id: (False, None), live.id: (True, [])}, delays={dead.id: 0.6}
        )
        t0 = time.perf_counter()
        found = await NodeCrawl(
            scripted, Node(idn(3)), [dead, live], 20, 3, stall_after=lambda: 0.05
        ).find()
        assert time.perf_counter() - t0 < 0.3
        assert [n.id for n in found] == [live.id]
        proto.close()

    asyncio.run(ours())


# --------------------------------------------------------------------------- 6


def test_defect_06_udp_size_replies_are_paged(tmp_path: Path) -> None:
    async def stock() -> int:
        proto = stock_protocol(idn(0))
        proto.storage[idn(9)] = b"x" * 72_000
        await proto._accept_request(b"m" * 20, ["find_value", [idn(5), idn(9)]], ("127.0.0.1", 9))
        with pytest.raises(MalformedMessage):
            proto.store(("127.0.0.1", 9), idn(0), idn(9), b"y" * 9000)
        return max(len(d) for d, _a in proto.transport.sent)

    assert asyncio.run(stock()) > 72_000, "stock sends a 72 KB reply"

    # qisd: 10,000 packets under one key are read in full, every reply within 8,192 bytes.
    packets = [p[0] for p in make_packets(10_000, routes=[("domain", "problem_type")])]

    async def body(net: Network) -> None:
        await net.add(2)
        holder, reader = net.nodes
        holder.store.put(packets, now_ms=NOW)
        biggest = 0
        original = reader.protocol._accept_response

        def measuring(msg_id: bytes, data: Any, address: tuple, size: int = 0) -> None:
            nonlocal biggest
            biggest = max(biggest, len(wire.packb(data)))
            original(msg_id, data, address, size)

        reader.protocol._accept_response = measuring  # type: ignore[method-assign]
        got = await reader.fetch(packets[0].key)
        assert len(got) == 10_000
        assert {e.packet_id for e in got} == {e.packet_id for e in packets}
        assert 7_000 < biggest <= 8_192
        sent = reader.stats()["rpcs_sent"]
        print(sent)
        assert 300 < sent["get_packets"] < 700

    run(tmp_path, body)


# --------------------------------------------------------------------------- 7


class HostileResponder(asyncio.DatagramProtocol):
    """Answers every request with a fixed (bad) reply payload."""

    def __init__(self, payload: Any) -> None:
        self.payload = payload

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        self.transport.sendto(b"\x01" + data[1:21] + umsgpack.packb(self.payload), addr)


def test_defect_07_unvalidated_replies_crash_the_caller(tmp_path: Path) -> None:
    p1 = Node(idn(1), "127.0.0.1", 1)

    async def stock(reply: Any, kind: type) -> Any:
        proto = ScriptedProtocol({p1.id: (True, reply)})
        return await kind(proto, Node(idn(9)), [p1], 20, 3).find()

    with pytest.raises(KeyError):
        # {} is "a value" to stock, then indexed by "value"
        asyncio.run(stock({"no": "value"}, ValueSpiderCrawl))
    with pytest.raises(AttributeError):
        asyncio.run(stock([[1, 2, 3]], NodeSpiderCrawl))

    async def ours() -> None:
        loop = asyncio.get_running_loop()
        proto = qisd_protocol(tmp_path)
        await loop.create_datagram_endpoint(lambda: proto, local_addr=("127.0.0.1", 0))
        for bad in ({}, [[1, 2, 3]], [[b"x" * 20, "not an ip", 5]], "junk", None, [b"a"] * 3):
            transport, _ = await loop.create_datagram_endpoint(
                lambda bad=bad: HostileResponder(bad), local_addr=("127.0.0.1", 0)
            )
            port = transport.get_extra_info("sockname")[1]
            peer = Contact(idn(1), "127.0.0.1", port)
            ok_node, _ = await proto.call_find_node(peer, Node(idn(9)))
            ok_pkts, _ = await proto.call_find_packets(peer, idn(9), None)
            ok_store, _ = await proto.call_store_packets(peer, idn(9), [b"x"])
            assert not (ok_node or ok_pkts or ok_store)
            transport.close()
        malformed = sum(v for k, v in proto.counters.items() if k.startswith("malformed.reply"))
        assert malformed == 18
        proto.close()

    asyncio.run(ours())


# --------------------------------------------------------------------------- 8


def test_defect_08_malformed_datagrams_raise_and_replies_are_not_address_checked(
    tmp_path: Path,
) -> None:
    bad = b"\x00" + b"m" * 20 + b"\xc1\xc1"  # 0xc1 is never valid msgpack

    async def drive(proto: Any) -> tuple[list[Any], bool]:
        if isinstance(proto, QisdProtocol):
            future = proto.ping(("127.0.0.1", 9), b"n" * 16)
        else:
            future = proto.ping(("127.0.0.1", 9), idn(0))
        msg_id = wire.decode_datagram(proto.transport.sent[-1][0])[1]
        proto.datagram_received(bad, ("127.0.0.1", 7))
        proto.datagram_received(b"\x00" + b"m" * 20 + umsgpack.packb("x"), ("127.0.0.1", 7))
        proto.datagram_received(b"\x01" + msg_id + umsgpack.packb(idn(1)), ("127.0.0.1", 66))
        errors = await drain()
        hijacked = future.done()
        future.cancel()
        return errors, hijacked

    async def stock() -> tuple[list[Any], bool]:
        proto = stock_protocol(idn(0))
        return await drive(proto)

    errors, hijacked = asyncio.run(stock())
    assert errors, "stock raises inside tasks"
    assert hijacked, "stock accepts a reply from an address the request did not go to"

    async def ours() -> tuple[list[Any], bool, QisdProtocol]:
        proto = qisd_protocol(tmp_path)
        errors, hijacked = await drive(proto)
        proto.close()
        return errors, hijacked, proto

    errors, hijacked, proto = asyncio.run(ours())
    assert errors == [] and not hijacked
    assert proto.counters["malformed.undecodable"] == 1
    assert proto.counters["malformed.bad_request_shape"] == 1
    assert proto.counters["malformed.reply_wrong_address"] == 1


# --------------------------------------------------------------------------- 9


def test_defect_09_cancelled_calls_leak(tmp_path: Path) -> None:
    async def stock() -> tuple[int, list[Any]]:
        loop = asyncio.get_running_loop()
        errors: list[Any] = []
        seen = asyncio.Event()

        def handler(_loop: Any, ctx: dict) -> None:
            errors.append(ctx)
            seen.set()

        loop.set_exception_handler(handler)
        proto = stock_protocol(idn(0))
        proto._wait_timeout = 0.05
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(proto.ping(("127.0.0.1", 9), idn(0)), 0.01)
        async with asyncio.timeout(2):
            await seen.wait()
        return len(proto._outstanding), errors

    leaked, errors = asyncio.run(stock())
    assert leaked == 1
    assert isinstance(errors[0].get("exception"), asyncio.InvalidStateError)

    async def ours() -> None:
        proto = qisd_protocol(tmp_path, rpc_timeout=0.05)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(proto.ping(("127.0.0.1", 9), b"n" * 16), 0.01)
        assert proto._outstanding == {} and proto._sent_at == {}
        # The timer was cancelled with the call: _timeout of a forgotten id is harmless too.
        proto._timeout(b"x" * 20)
        proto.close()

    asyncio.run(ours())


# --------------------------------------------------------------------------- 10


def test_defect_10_welcome_hashes_an_already_hashed_key(tmp_path: Path) -> None:
    envs = [p[0] for p in make_packets(2)]
    key = envs[0].key
    key_int = int.from_bytes(key, "big")
    me = idn(key_int ^ (1 << 100))  # close to the key
    far = idn(int.from_bytes(digest(key), "big") ^ 1)  # close to digest(key), far from key
    newcomer = idn(key_int ^ 1)  # the closest of all to the key

    async def stock() -> list[str]:
        proto = stock_protocol(me)
        proto.storage[key] = b"value"
        proto.router.add_contact(Node(far, "127.0.0.1", 1))
        proto.welcome_if_new(Node(newcomer, "127.0.0.1", 2))
        return proto.transport.names()

    assert "store" not in asyncio.run(stock()), "stock judged the key by digest(key)"

    async def ours() -> list[Any]:
        proto = qisd_protocol(tmp_path, node_id=me, rpc_timeout=0.1)
        proto.store.put(envs, now_ms=NOW)
        proto.router.add_contact(Contact(far, "127.0.0.1", 1))
        assert proto.hand_off(Contact(newcomer, "127.0.0.1", 2)) == 1
        await drain()  # the reconciliation is sent, then times out (nobody answers here)
        sent = [wire.decode_datagram(d)[2] for d, _a in proto.transport.sent]
        proto.close()
        return sent

    # The hand-off is a reconciliation of the key itself; only what the newcomer lacks moves
    # then (test_dataplane shows the envelopes follow).
    syncs = [p for p in asyncio.run(ours()) if p[0] == "sync"]
    assert len(syncs) == 1 and syncs[0][1][1] == key


# --------------------------------------------------------------------------- 11


class _NoNet:
    async def call_ping(self, node: Node) -> Any:
        return True, None


def _fill(table: RoutingTable, rng: random.Random, count: int) -> None:
    for _ in range(count):
        table.add_contact(Node(idn(rng.getrandbits(160)), "127.0.0.1", rng.randrange(1, 65535)))


def test_defect_11_find_neighbors_does_not_return_the_closest() -> None:
    def wrong_fraction(table_cls: type, **kw: Any) -> float:
        async def body() -> float:
            rng = random.Random(11)
            me = Node(idn(rng.getrandbits(160)))
            table = table_cls(_NoNet(), 20, me, **kw)
            _fill(table, rng, 150)
            contacts = [n for b in table.buckets for n in b.nodes.values()]
            wrong = 0
            for _ in range(100):
                target = Node(idn(rng.getrandbits(160)))
                got = {n.id for n in table.find_neighbors(target)}
                best = sorted(contacts, key=lambda n: n.long_id ^ target.long_id)[:20]
                wrong += got != {n.id for n in best}
            return wrong / 100

        return asyncio.run(body())

    assert wrong_fraction(RoutingTable) > 0.5
    assert wrong_fraction(QisdRoutingTable) == 0.0


# --------------------------------------------------------------------------- 12


# Two ids sharing a 5-bit prefix: their bucket (not holding id 0) is full at k=2 and, its
# depth being 0 mod 5, is not split, so newcomers make the table check the head.
HEAD = (1 << 159) | (1 << 154)
SECOND = (1 << 159) + 1


def test_defect_12_bucket_upkeep(tmp_path: Path) -> None:
    # get_bucket_for at a bucket boundary: the split put the midpoint in the lower bucket.
    for cls in (RoutingTable, QisdRoutingTable):
        table = cls(_NoNet(), 20, Node(idn(0)))
        table.split_bucket(0)
        lower = table.buckets[0]
        midpoint = Node(idn(lower.range[1]))
        assert lower.has_in_range(midpoint)
        index = table.get_bucket_for(midpoint)
        assert index == (1 if cls is RoutingTable else 0)

    async def stock() -> tuple[int, list[bytes]]:
        pings: list[bytes] = []

        class Counting(_NoNet):
            async def call_ping(self, node: Node) -> Any:
                pings.append(node.id)
                return True, None

        table = RoutingTable(Counting(), 2, Node(idn(0)))
        head, second = Node(idn(HEAD), "h", 1), Node(idn(SECOND), "s", 2)
        table.add_contact(head)
        table.add_contact(second)
        for i in range(10):
            table.add_contact(Node(idn((1 << 159) + 100 + i), "n", 3))
        await drain()
        proto = stock_protocol(idn(0), ksize=2)
        proto.router = table
        proto.handle_call_response((True, head.id), head)
        return len(pings), [n.id for n in table.buckets[-1].nodes.values()]

    pings, order = asyncio.run(stock())
    assert pings == 10, "one head ping per newcomer"
    assert order[0] == idn(HEAD), "a live head stays at the head"

    async def ours() -> tuple[int, list[bytes]]:
        checks: list[bytes] = []
        done = asyncio.Event()

        async def check_head(node: Contact) -> bool:
            checks.append(node.id)
            await done.wait()
            return True

        table = QisdRoutingTable(None, 2, Node(idn(0)), check_head=check_head)
        head, second = Contact(idn(HEAD), "h", 1), Contact(idn(SECOND), "s", 2)
        table.add_contact(head)
        table.add_contact(second)
        for i in range(10):
            table.add_contact(Contact(idn((1 << 159) + 100 + i), "n", 3))
        pending = list(table._head_checks.values())
        done.set()
        await asyncio.gather(*pending)
        return len(checks), [n.id for n in table.buckets[-1].nodes.values()]

    checks, order = asyncio.run(ours())
    assert checks == 1, "head pings are de-duplicated"
    assert order == [idn(SECOND), idn(HEAD)], "the live head moved to the tail"


# --------------------------------------------------------------------------- 13


def test_defect_13_republish_resets_ttl(tmp_path: Path) -> None:
    async def stock() -> list[bytes]:
        server = Server()
        republished: list[bytes] = []

        async def set_digest(dkey: bytes, value: Any) -> bool:
            republished.append(dkey)
            return True

        server.set_digest = set_digest  # type: ignore[method-assign]
        server.protocol = stock_protocol(server.node.id)
        server.storage[b"someone else's key"] = b"v"
        birthday, value = server.storage.data[b"someone else's key"]
        server.storage.data[b"someone else's key"] = (birthday - 7200, value)
        await server._refresh_table()
        return republished

    assert asyncio.run(stock()) == [b"someone else's key"], "stock republishes what it holds"

    async def body(net: Network) -> None:
        await net.add(6)
        node = net.nodes[2]
        own = [p[0] for p in make_packets(2, node.identity)]
        foreign = make_packets(1, problem_type="foreign")[0][0]
        node.store.put(own, now_ms=NOW, local=True)
        node.store.put([foreign], now_ms=NOW)
        keys: list[bytes] = []
        original = node.protocol.call_store_packets

        async def recording(peer: Node, key: bytes, raws: list[bytes], **kw: Any) -> Any:
            keys.append(key)
            return await original(peer, key, raws, **kw)

        node.protocol.call_store_packets = recording  # type: ignore[method-assign]
        assert await node.republish() == 2
        assert keys and set(keys) == {own[0].key}
        # Expiry is by packet timestamp + TTL: a republished old packet is refused, not renewed.
        old = make_packets(1, node.identity, now_ms=NOW, timestamps=[NOW - TTL_MS - 1])[0][0]
        reply = net.nodes[0].protocol._rpc_store_packets(
            _Request(("127.0.0.1", 9), 1_000, validated=True), [node.node_id, old.key, [old.raw]]
        )
        assert reply["accepted"] == [] and "expired" in reply["refused"][0][1]

    run(tmp_path, body)


# --------------------------------------------------------------------------- 14


def test_defect_14_set_result_is_wrong_or_crashes(tmp_path: Path) -> None:
    async def stock() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
            silent.bind(("127.0.0.1", 0))
            server = Server()
            await server.listen(0, "127.0.0.1")
            server.protocol._wait_timeout = 0.1
            server.protocol.router.add_contact(Node(idn(5), *silent.getsockname()))
            try:
                await server.set("k", "v")
            finally:
                server.stop()

    with pytest.raises(ValueError, match="empty"):
        asyncio.run(stock())
    # and on success it is `any()` over (ok, value) tuples: (False, None) is truthy.
    assert any([(False, None)])

    async def body(net: Network) -> None:
        net.config = DhtConfig(rpc_timeout=0.2)
        await net.add(4)
        node = net.nodes[0]
        envs = [p[0] for p in make_packets(2, node.identity)]
        for other in net.nodes[1:]:
            net.kill(other)
        result = await publish_from(node, envs)
        assert result.replicas == {e.packet_id: 0 for e in envs}
        assert result.min_replicas == 0

    run(tmp_path, body)


# --------------------------------------------------------------------------- 15


def test_defect_15_one_address_family_per_server(tmp_path: Path) -> None:
    async def stock() -> tuple[float, bool]:
        server = Server()
        await server.listen(0, "127.0.0.1")
        server.protocol._wait_timeout = 0.2
        v6 = Node(idn(5), "::1", 9)
        server.protocol.router.add_contact(v6)
        t0 = time.perf_counter()
        await server.protocol.call_ping(v6)
        took = time.perf_counter() - t0
        evicted = server.protocol.router.is_new_node(v6)
        server.stop()
        return took, evicted

    took, evicted = asyncio.run(stock())
    assert took >= 0.2 and evicted

    async def body(net: Network) -> None:
        await net.add(2)
        v4 = net.nodes[0]
        v6 = Contact(Identity.generate().dht_id, "::1", 9)
        t0 = time.perf_counter()
        ok, _ = await v4.protocol.call_ping(v6)
        assert not ok and time.perf_counter() - t0 < 0.05
        v4.protocol.welcome_if_new(v6)
        assert v4.protocol.router.get(v6.id) is None, "an unreachable family is never added"
        # A node bound to '::' is dual-stack: it joins IPv4 nodes and IPv6 nodes alike.
        dual = net.make()
        await dual.start("::", 0)
        net.nodes.append(dual)
        assert await dual.bootstrap([v4.address]) == 1
        only6 = net.make()
        await only6.start("::1", 0)
        net.nodes.append(only6)
        assert await only6.bootstrap([("::1", dual.address[1])]) == 1
        envs = [p[0] for p in make_packets(1)]
        await publish_from(only6, envs)
        got = await v4.fetch(envs[0].key)
        assert [e.packet_id for e in got] == [envs[0].packet_id]

    run(tmp_path, body)


# --------------------------------------------------------------------------- 16


def test_defect_16_state_files_are_pickle(tmp_path: Path) -> None:
    class Exploit:
        def __reduce__(self) -> Any:
            return (exec, ("import builtins; builtins._qisd_pwned = True",))

    crafted = tmp_path / "state"
    crafted.write_bytes(pickle.dumps(Exploit()))
    try:
        with pytest.raises(TypeError):
            asyncio.run(Server.load_state(crafted, 0, "127.0.0.1"))
        assert getattr(builtins, "_qisd_pwned", False), "stock ran code from the state file"
    finally:
        builtins.__dict__.pop("_qisd_pwned", None)

    async def body(net: Network) -> None:
        await net.add(4)
        node = net.make()
        node.state_path = crafted
        await node.start()
        net.nodes.append(node)
        assert await node.bootstrap([net.nodes[0].address]) == 1
        await net.settle()
        assert not hasattr(builtins, "_qisd_pwned")
        await node.stop()
        net.nodes.remove(node)
        node.store.close()
        state = json.loads(crafted.read_text())  # JSON now, replaced atomically
        assert state["id"] == node.node_id.hex() and len(state["contacts"]) == 4

    run(tmp_path, body)


# --------------------------------------------------------------------------- wire extras


def test_c_msgpack_codec_gives_rpcudps_bytes() -> None:
    rng = random.Random(3)
    for _ in range(200):
        args = [
            rng.randbytes(20),
            [[rng.randbytes(20), "127.0.0.1", rng.randrange(65536)] for _ in range(3)],
            None,
            rng.random() < 0.5,
            rng.randrange(-(2**40), 2**40),
            rng.random(),
            {"packets": [rng.randbytes(rng.randrange(300))], "more": False, "cursor": 7},
        ]
        msg_id = rng.randbytes(20)
        assert wire.encode_request(msg_id, "find_packets", args) == (
            b"\x00" + msg_id + umsgpack.packb(["find_packets", args])
        )
        assert wire.encode_reply(msg_id, args) == b"\x01" + msg_id + umsgpack.packb(args)
        assert wire.decode_datagram(wire.encode_reply(msg_id, args))[2] == umsgpack.unpackb(
            umsgpack.packb(args)
        )
    assert msgpack.version >= (1, 0, 0)


def test_no_getattr_magic_typos_are_errors(tmp_path: Path) -> None:
    stock = stock_protocol(idn(0))
    assert callable(stock.finde_node), "stock turns a typo into a network call"

    async def ours() -> None:
        proto = qisd_protocol(tmp_path)
        with pytest.raises(AttributeError):
            proto.finde_node  # noqa: B018
        proto.close()

    asyncio.run(ours())


def test_per_source_rate_limit_counts_and_drops(tmp_path: Path) -> None:
    async def ours() -> None:
        proto = qisd_protocol(tmp_path, rate_limit_per_source=1.0, rate_burst_per_source=5)
        ping = wire.encode_request(b"m" * 20, "find_node", [idn(1), idn(2)])
        for _ in range(20):
            proto.datagram_received(ping, ("127.0.0.1", 5000))
        proto.datagram_received(ping, ("127.0.0.1", 5001))
        replies = [a for d, a in proto.transport.sent if d[0] == wire.REPLY]
        assert replies.count(("127.0.0.1", 5000)) == 5
        assert replies.count(("127.0.0.1", 5001)) == 1
        assert proto.counters["rate_limited"] == 15
        proto.close()

    asyncio.run(ours())


def test_proof_of_key_possession_on_first_contact(tmp_path: Path) -> None:
    """A node claiming an id that is not the hash of a key it holds never enters a table."""

    chosen = hashlib.blake2b(b"chosen", digest_size=20).digest()

    class Impostor(QisdProtocol):
        """Claims a chosen id (say, next to a key) in its ping answers and introductions."""

        def _rpc_ping(self, req: Any, args: list[Any]) -> list[bytes]:
            _me, pub, *proof = super()._rpc_ping(req, args)
            return [chosen, pub, *proof]

        def _me(self, to: bytes | None) -> Any:
            value = super()._me(to)
            return [chosen, *value[1:]] if isinstance(value, list) else chosen

    async def body(net: Network) -> None:
        await net.add(3)
        liar = net.make()
        liar.server.protocol_class = Impostor
        await liar.start()
        net.nodes.append(liar)
        assert await net.nodes[0].bootstrap([liar.address]) == 0
        assert await liar.bootstrap([net.nodes[1].address]) == 0
        await liar.server.crawl_nodes(chosen)
        await net.settle()
        assert all(n.protocol.router.get(chosen) is None for n in net.nodes[:3])
        rejected = Counter()
        for n in net.nodes[:3]:
            rejected.update(n.stats()["rejected"])
        assert rejected["id_not_key_hash"] >= 1 and rejected["bad_introduction"] >= 1

    run(tmp_path, body)


def test_dht_node_api_shape() -> None:
    for name in ("start", "bootstrap", "publish", "fetch", "follow", "stop"):
        assert asyncio.iscoroutinefunction(getattr(DhtNode, name))
    for name in ("peers", "stats", "unfollow", "bootstrap_addresses_from_file"):
        assert callable(getattr(DhtNode, name))
