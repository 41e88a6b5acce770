"""The network data plane at volume: reconciled fetch, replica sync, pacing, no amplification.

Real qisd DHT nodes on 127.0.0.1 (UDP, port 0) in one event loop, as in ``test_dht``. Bytes are
the datagram bytes the reading node's socket received (its own meter, checked against the
unique envelope bytes of the key). Waits are on conditions under ``asyncio.timeout``.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import pytest
from helpers import NOW, make_envelopes
from test_dht import Network, run

from qisd.config import DhtConfig, StoreLimits
from qisd.core.crypto import Identity
from qisd.core.packet import Envelope
from qisd.net import wire
from qisd.net.dht import DhtNode, _Request
from qisd.net.routing import Contact
from qisd.net.store import Store


def holders_of(net: Network, key: bytes, k: int) -> list[DhtNode]:
    """The ``k`` nodes of ``net`` whose ids are closest to ``key`` (its replicas)."""
    target = int.from_bytes(key, "big")
    return sorted(net.nodes, key=lambda n: int.from_bytes(n.node_id, "big") ^ target)[:k]


def seed_key(net: Network, envs: list[Envelope], k: int) -> list[DhtNode]:
    """Place ``envs`` at the k closest nodes of their key, as a converged network holds them."""
    holders = holders_of(net, envs[0].key, k)
    for node in holders:
        node.store.put(envs, now_ms=NOW)
    return holders


async def fresh_reader(net: Network, key: bytes) -> DhtNode:
    """A node that joins now, holding nothing, and is no replica of ``key`` (so no hand-off
    brings it the key before it reads)."""
    target = int.from_bytes(key, "big")
    farthest = max(int.from_bytes(n.node_id, "big") ^ target for n in net.nodes)
    while True:
        identity = Identity.generate()
        if int.from_bytes(identity.dht_id, "big") ^ target > farthest:
            return await net.join(net.make(identity))


def unique_bytes(envs: list[Envelope]) -> int:
    return sum(len(e.raw) for e in envs)


@pytest.mark.parametrize("m", [100, 1_000])
def test_a_fresh_reader_receives_each_envelope_about_once(tmp_path: Path, m: int) -> None:
    envs = make_envelopes(m)

    async def body(net: Network) -> None:
        await net.add(30)
        seed_key(net, envs, net.config.ksize)
        reader = await fresh_reader(net, envs[0].key)
        report = await reader.fetch_report(envs[0].key)
        assert {e.packet_id for e in report.envelopes} == {e.packet_id for e in envs}
        data = report.bytes_received - report.lookup_bytes
        ratio = data / unique_bytes(envs)
        print(
            f"\nM={m}: {data} B of summaries and envelopes for {unique_bytes(envs)} B "
            f"({ratio:.2f}x),"
            f" lookup {report.lookup_bytes} B, {report.messages} requests, {report.report()}"
        )
        assert ratio <= 1.3
        assert report.downloaded == m, "each envelope crossed the network once"
        assert report.complete and report.replicas_agreeing == report.replicas_answered

        # A repeat read of the unchanged key (now held here) costs about one more lookup.
        reader.store.put(report.envelopes, now_ms=NOW)
        meter = [0, 0]
        await reader.server.crawl_nodes_counted(envs[0].key, meter)
        again = await reader.fetch_report(envs[0].key)
        assert again.envelopes == [] and again.complete
        assert again.bytes_received <= 2 * meter[0], (again.bytes_received, meter)
        assert again.messages <= 2 * meter[1], (again.messages, meter)

    run(tmp_path, body)


def test_a_reader_missing_ten_packets_receives_about_ten_envelopes(tmp_path: Path) -> None:
    envs = make_envelopes(1_000)

    async def body(net: Network) -> None:
        await net.add(30)
        seed_key(net, envs, net.config.ksize)
        reader = await fresh_reader(net, envs[0].key)
        reader.store.put(envs[10:], now_ms=NOW)
        report = await reader.fetch_report(envs[0].key)
        assert {e.packet_id for e in report.envelopes} == {e.packet_id for e in envs[:10]}
        assert report.downloaded == 10
        data = report.bytes_received - report.lookup_bytes
        assert data < unique_bytes(envs[:10]) + 40_000, data  # 10 envelopes and summaries

    run(tmp_path, body)


def test_a_fetch_tells_replicas_what_they_lack(tmp_path: Path) -> None:
    """Entry correction: a replica short of packets gets them from the reader that noticed."""
    envs = make_envelopes(50)

    async def body(net: Network) -> None:
        await net.add(12)
        holders = seed_key(net, envs, net.config.ksize)
        short = holders[0]
        short.store.close()  # replace its store with an empty one: it lost the key
        (tmp_path / "empty").mkdir()
        short.store = Store.open(tmp_path / "empty", limits=StoreLimits(), ttl_ms=30 * 86_400_000)
        short.protocol.store = short.protocol.storage.store = short.store
        reader = await fresh_reader(net, envs[0].key)
        report = await reader.fetch_report(envs[0].key)
        assert report.replicas_agreeing < report.replicas_answered
        async with asyncio.timeout(30):
            while not all(short.store.has(e.key, e.packet_id) for e in envs):
                await asyncio.sleep(0.05)

    run(tmp_path, body)


def test_every_holder_converges_after_a_partition_heals(tmp_path: Path) -> None:
    """Packets published on both sides of a cut reach every holder within 60 s of the heal,
    with default settings, moving at most twice the bytes that were missing."""

    async def body(net: Network) -> None:
        await net.add(10)
        await net.settle()
        left, right = net.nodes[:5], net.nodes[5:]
        cut = Cut(left, right)
        for node in net.nodes:
            node.protocol.transport = cut.wrap(node.protocol.transport)
        published: list[Envelope] = []
        for side in (left, right):
            for i, author in enumerate(side[:2]):
                envs = make_envelopes(
                    20, author.identity, start=1_000 * i + 10_000 * len(published)
                )
                author.store.put(envs, now_ms=NOW, local=True)
                await author.publish(envs)
                published += envs
        missing = sum(
            len(e.raw) for n in net.nodes for e in published if not n.store.has(e.key, e.packet_id)
        )
        assert missing > 0, "the cut kept packets from the other side"
        before = moved(net)
        cut.heal()
        async with asyncio.timeout(60):
            while not all(n.store.has(e.key, e.packet_id) for n in net.nodes for e in published):
                await asyncio.sleep(0.1)
        assert moved(net) - before <= 2 * missing, (moved(net) - before, missing)

    run(tmp_path, body, DhtConfig())


def moved(net: Network) -> int:
    """Envelope bytes the nodes sent one another by replica sync (served and pushed)."""
    return sum(
        n.protocol.counters["served_bytes"] + n.protocol.counters["pushed_bytes"] for n in net.nodes
    )


class Cut:
    """Drops every datagram between two groups of in-process nodes until healed."""

    def __init__(self, left: list[DhtNode], right: list[DhtNode]) -> None:
        self.sides = [{n.address[1] for n in left}, {n.address[1] for n in right}]
        self.active = True

    def heal(self) -> None:
        self.active = False

    def wrap(self, transport: Any) -> Any:
        cut = self
        port = transport.get_extra_info("sockname")[1]

        class Filtered:
            def sendto(self, data: bytes, addr: tuple) -> None:
                if cut.active and any(port in s and addr[1] not in s for s in cut.sides):
                    return
                transport.sendto(data, addr)

            def __getattr__(self, name: str) -> Any:
                return getattr(transport, name)

        return Filtered()


def test_a_busy_peer_is_paced_not_dropped(tmp_path: Path) -> None:
    """A rate-limited receiver says busy; the sender waits, sends again, never times out,
    never evicts it, and every envelope arrives."""
    config = DhtConfig(rate_limit_per_source=200.0, rate_burst_per_source=50)
    envs = make_envelopes(600)

    async def body(net: Network) -> None:
        await net.add(2)
        sender, receiver = net.nodes
        sender.store.put(envs, now_ms=NOW, local=True)
        result = await sender.publish(envs)
        assert result.min_replicas == 1
        assert all(receiver.store.has(e.key, e.packet_id) for e in envs)
        s, r = sender.stats(), receiver.stats()
        assert r["busy_sent"] + r["rate_limited"] > 0, "the receiver was never past its rate"
        assert s["timeouts"] == 0
        assert sender.protocol.router.get(receiver.node_id) is not None

    run(tmp_path, body, config)


# --------------------------------------------------------------------------- amplification


def _requests(key: bytes, sender: bytes) -> dict[str, list[Any]]:
    env = make_envelopes(1)[0]
    return {
        "ping": [sender, os.urandom(wire.NONCE_BYTES)],
        "find_node": [sender, os.urandom(20)],
        "find_packets": [sender, key, None],
        "store_packets": [sender, env.key, [env.raw]],
        "listen": [sender, key],
        "notify": [sender, key, [env.raw]],
        "sync": [sender, key, [[0, b"", 2**63, b"", 1, []]]],
        "get_packets": [sender, key, [os.urandom(16) for _ in range(3)]],
    }


class Recording:
    def __init__(self) -> None:
        self.sent: list[tuple[bytes, tuple]] = []

    def sendto(self, data: bytes, addr: tuple) -> None:
        self.sent.append((data, addr))

    def get_extra_info(self, name: str) -> Any:
        return None


def test_no_reply_to_an_unvalidated_source_exceeds_three_times_its_request(
    tmp_path: Path,
) -> None:
    """Every RPC, from an address that never proved it receives (a spoofer's victim): the reply
    is at most 3x the request; with the token echoed, a data request gets its full answer."""
    envs = make_envelopes(40)

    async def body(net: Network) -> None:
        await net.add(25)
        target = net.nodes[0]
        target.store.put(envs, now_ms=NOW)
        key = envs[0].key
        victim = ("127.0.0.1", 9)
        proto = target.protocol
        real = proto.transport
        for name, args in _requests(key, Identity.generate().dht_id).items():
            for introduced in (False, True):
                if introduced:
                    args = [proto._me(os.urandom(20)), *args[1:]]  # any signed introduction
                rec = Recording()
                proto.transport = rec
                data = wire.encode_request(os.urandom(20), name, args)
                proto.datagram_received(data, victim)
                proto.transport = real
                for reply, addr in rec.sent:
                    assert addr == victim
                    assert len(reply) <= wire.AMPLIFICATION_FACTOR * len(data), (name, introduced)
        # The same pages go in full once the requester echoes its token.
        token = proto.tokens.issue(victim)
        rec = Recording()
        proto.transport = rec
        data = wire.encode_request(
            os.urandom(20), "find_packets", [os.urandom(20), key, None], token
        )
        proto.datagram_received(data, victim)
        proto.transport = real
        ((reply, _addr),) = rec.sent
        assert len(reply) > 7_000, "a validated requester gets a full page"
        assert proto.listeners(key) == [], "no listen registered an unvalidated address"

    run(tmp_path, body)


def test_a_listen_from_a_spoofed_address_registers_nothing(tmp_path: Path) -> None:
    async def body(net: Network) -> None:
        await net.add(2)
        target = net.nodes[0]
        key = make_envelopes(1)[0].key
        req = _Request(("127.0.0.1", 9), 80, validated=False)
        reply = target.protocol._rpc_listen(req, [Identity.generate().dht_id, key])
        assert reply.get("validate") is True
        assert target.protocol.listeners(key) == []

    run(tmp_path, body)


def test_a_busy_reply_holds_a_destination_back_for_a_bounded_time(tmp_path: Path) -> None:
    """A busy reply that asks for an hour (a forger's, say) holds sends back at most 5 s."""
    from qisd.net.pacing import MAX_BUSY_SECONDS

    async def body(net: Network) -> None:
        await net.add(2)
        a, b = net.nodes
        waited = a.protocol.pacer.busy(tuple(b.address), 3_600)
        assert waited == MAX_BUSY_SECONDS
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        ok, _ = await a.protocol.call_find_node(Contact(b.node_id, *b.address), Contact(a.node_id))
        assert ok and loop.time() - t0 <= MAX_BUSY_SECONDS + 1

    run(tmp_path, body)
