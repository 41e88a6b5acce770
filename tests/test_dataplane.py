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
from helpers import NOW, make_envelopes, outcome_row
from test_dht import Network, fixed_clock, run

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


async def held_everywhere(nodes: list[DhtNode], envs: list[Envelope], seconds: float) -> None:
    """Until every node's store holds every envelope: woken by each store a node makes (its
    protocol's ``on_stored``, which every path that stores from the network calls), never by
    a timer; fails after ``seconds``."""
    stored = asyncio.Event()
    for node in nodes:
        node.protocol.on_stored = lambda _key, _count: stored.set()
    async with asyncio.timeout(seconds):
        while True:
            stored.clear()
            if all(n.store.has(e.key, e.packet_id) for n in nodes for e in envs):
                return
            await stored.wait()


def unique_bytes(envs: list[Envelope]) -> int:
    return sum(len(e.raw) for e in envs)


@pytest.mark.parametrize("m", [100, 1_000, pytest.param(10_000, marks=pytest.mark.slow)])
def test_a_fresh_reader_receives_each_envelope_about_once(
    tmp_path: Path, m: int, request: pytest.FixtureRequest
) -> None:
    if m == 10_000 and os.environ.get("QISD_SLOW") != "1":
        pytest.skip("10,000 packets only in the full slow run (QISD_SLOW=1): ~1 min")
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
        await held_everywhere([short], envs, 30)
        # The reader found the replica short and sent it what it lacked (upkeep's anti-entropy
        # is held off here).
        assert reader.protocol.counters["entry_corrections"] >= 1
        assert reader.protocol.counters["pushed_bytes"] >= sum(len(e.raw) for e in envs)

    run(tmp_path, body, DhtConfig(upkeep_seconds=3_600))


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
        await held_everywhere(net.nodes, published, 60)
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
        # A peer the target has talked with is no better: its address can be spoofed, so
        # without its token a data request from it gets the token only.
        peer = net.nodes[1]
        assert proto.is_validated(tuple(peer.address))
        rec = Recording()
        proto.transport = rec
        data = wire.encode_request(os.urandom(20), "find_packets", [peer.node_id, key, None])
        proto.datagram_received(data, tuple(peer.address))
        proto.transport = real
        ((reply, _addr),) = rec.sent
        assert len(reply) <= wire.AMPLIFICATION_FACTOR * len(data)

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
        took = loop.time() - t0
        assert ok and MAX_BUSY_SECONDS - 0.5 <= took <= MAX_BUSY_SECONDS + 1, took

    run(tmp_path, body)


# --------------------------------------------------------------------------- liveness


def test_a_dead_contact_is_checked_then_no_longer_handed_out_and_evicted(tmp_path: Path) -> None:
    """A contact not heard from for the liveness bound is pinged by upkeep; once it fails it
    is left out of find_node replies, and after evict_after failures it is gone."""
    from qisd.net.dht import LIVENESS_SECONDS

    config = DhtConfig(rpc_timeout=0.3, evict_after_failures=2)

    async def body(net: Network) -> None:
        await net.add(8)
        await net.settle()
        dead = net.nodes[-1]
        net.kill(dead)
        knowing = [n for n in net.nodes if n.protocol.router.get(dead.node_id) is not None]
        assert knowing
        for node in knowing:
            node.protocol.router.get(dead.node_id).last_seen -= LIVENESS_SECONDS + 1
        for _tick in range(config.evict_after_failures):
            for node in knowing:
                node.upkeep()
            await net.settle()
            for node in net.nodes:
                req = _Request(("127.0.0.1", 9), 1_000, validated=True)
                reply = node.protocol._rpc_find_node(req, [os.urandom(20), dead.node_id])
                assert dead.node_id not in [c[0] for c in reply["nodes"]]
        assert all(n.protocol.router.get(dead.node_id) is None for n in knowing)

    run(tmp_path, body, config)


# --------------------------------------------------------------------------- lying replicas


def test_a_replica_that_lists_ids_it_does_not_serve_is_dropped_from_the_read(
    tmp_path: Path,
) -> None:
    """A replica claims 500 packets that do not exist: the reader asks it for them once, drops
    it, still reads every real packet from the others, and calls the read complete."""
    from qisd.core import reconcile

    envs = make_envelopes(60)

    async def body(net: Network) -> None:
        await net.add(12)
        holders = seed_key(net, envs, net.config.ksize)
        liar = holders[0].protocol
        fake = [(1, os.urandom(16)) for _ in range(500)]
        real_items = liar.items

        def lying_items(key: bytes) -> reconcile.ItemSet:
            return reconcile.ItemSet([*real_items(key).items, *fake])

        liar.items = lying_items  # type: ignore[method-assign]
        reader = await fresh_reader(net, envs[0].key)
        report = await reader.fetch_report(envs[0].key)
        assert {e.packet_id for e in report.envelopes} == {e.packet_id for e in envs}
        assert report.complete and report.missing == 0
        assert report.replicas_answered == report.replicas_expected - 1
        assert reader.protocol.counters["sync_listed_not_served"] >= 1
        sent = reader.protocol.counters["sent.get_packets"]
        assert sent <= 60 / 20 * 2 + 8 + 2, "the liar's claims cost a few requests, not 25"

    run(tmp_path, body, DhtConfig(ksize=5))


# --------------------------------------------------------------------------- restart at volume


@pytest.mark.slow
def test_a_node_holding_many_keys_restarts_without_a_storm(tmp_path: Path, qisd_slow: str) -> None:
    """8 nodes hold 25,000 keys (5,000 in the CI run); one stops, 500 keys gain a packet
    meanwhile, it restarts from its data directory: its routing table is full within 10 s,
    it holds every new packet within the bound below, and its peers rate-limit under 5 % of
    its reconciliations (busy replies pace it; nothing times out)."""
    from qisd.core import packet as P

    keys = 25_000 if qisd_slow == "full" else 5_000
    bound = 240.0 if qisd_slow == "full" else 90.0
    signer = Identity.generate()
    routes = [("domain", "problem_type")]

    def one(k: int, ts: int) -> Envelope:
        row = outcome_row(k, problem_type=f"k{k}", timestamp_utc=ts)
        return P.pack_rows(signer, P.build_rows([row], signer, now_ms=NOW), routes)[0][0]

    async def body(net: Network) -> None:
        await net.add(8)
        await net.settle()
        held = [one(k, NOW - 1) for k in range(keys)]
        later = [one(k, NOW - 2) for k in range(500)]
        for node in net.nodes:
            node.store.put(held, now_ms=NOW)
        victim = net.nodes[3]
        await victim.stop()
        net.nodes.remove(victim)
        for node in net.nodes:
            node.store.put(later, now_ms=NOW)
        limited = sum(n.stats()["rate_limited"] for n in net.nodes)
        back = DhtNode(
            victim.identity,
            victim.store,
            net.config,
            state_path=victim.state_path,
            clock=fixed_clock,
        )
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await back.start()
        net.nodes.append(back)
        async with asyncio.timeout(10):
            while len(back.peers()) < 7:
                await back.bootstrap([])
        await held_everywhere([back], later, bound)
        took = loop.time() - t0
        c = back.protocol.counters
        print(
            f"\n{keys} keys: every new packet back {took:.1f} s after restart; "
            f"{c['syncs']} reconciliations, {c['syncs_agreed']} agreed"
        )
        limited = sum(n.stats()["rate_limited"] for n in net.nodes) - limited
        print(f"peers rate-limited {limited} requests; busy replies {c['busy_received']}")
        assert limited <= 0.05 * c["syncs"], "pacing keeps the peers inside their rates"
        assert c["timeouts"] == 0

    run(tmp_path, body, DhtConfig(rpc_timeout=2.0))


def test_a_call_to_a_closed_port_fails_at_once(tmp_path: Path) -> None:
    """The kernel's port-unreachable (ICMP, read with IP_RECVERR) fails the call well inside
    the RPC timeout: a stopped node costs no wait."""
    config = DhtConfig(rpc_timeout=3.0)

    async def body(net: Network) -> None:
        await net.add(2)
        a, gone = net.nodes
        contact = Contact(gone.node_id, *gone.address)
        net.kill(gone)
        for _ in range(3):  # let the loop run the abort: then its socket is closed
            await asyncio.sleep(0)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        ok, _ = await a.protocol.call_find_node(contact, Contact(a.node_id))
        took = loop.time() - t0
        assert not ok
        assert took < 1.0, f"waited {took:.2f} s of a {config.rpc_timeout} s timeout"
        assert a.protocol.counters["icmp_unreachable"] >= 1

    run(tmp_path, body, config)
