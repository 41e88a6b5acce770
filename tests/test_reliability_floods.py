"""Floods and quotas: hostile signers and sources cannot push honest packets out of a node.

* One hostile signer storing as fast as the socket takes it, under the honest key and under many
  keys of its own: the per-signer-per-key quota refuses it under the honest key, and past the
  global byte cap the eviction order (heaviest remote source first) takes its own packets, so
  every honest packet stays, fetchable; the store stays within its cap and RSS growth is bounded.
* A sybil flood (hundreds of fresh signers from one host, one packet each, many keys) fills the
  global cap: the node's own packets are never evicted, the store stays within its cap, and
  honest remote packets delivered by other hosts stay too (eviction weighs the delivering host,
  not the key, because keys cost nothing to mint).
* One host, many ports: the rate limit is per host (an IPv4 address, an IPv6 /64), so a host
  cannot multiply its rate by the ports it uses; on loopback the port counts too (every local
  node shares 127.0.0.1). A non-loopback host is simulated by handing datagrams to the node's
  ``datagram_received`` with a remote address while its transport drops anything not bound for
  loopback: no traffic ever leaves 127.0.0.1.
* A request's cost is weighed (one token per envelope to verify), so one source inside its
  burst cannot stall the event loop past the RPC timeout; and the host that delivered remote
  envelopes is their source for eviction, so a sybil flood from one host evicts itself.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import time
from pathlib import Path
from typing import Any

import msgpack
from helpers import NOW, make_packets
from test_dht import TTL_MS, Network, fixed_clock, publish_from

from qisd.config import DhtConfig, StoreLimits
from qisd.core.crypto import Identity
from qisd.core.packet import Envelope
from qisd.net import wire
from qisd.net.dht import DhtNode, batches_within
from qisd.net.routing import Contact
from qisd.net.store import Store
from qisd.net.wire import source_of

REMOTE_HOST = "192.0.2.7"
"""A documentation address (RFC 5737): datagrams 'from' it are handed to a node in-process."""


def rss_bytes() -> int:
    """This process's resident set size (Linux /proc)."""
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


class LimitedNetwork(Network):
    """Network whose next made node gets ``limits`` for its store."""

    limits = StoreLimits()

    def make(self, identity: Identity | None = None, data_dir: Path | None = None) -> DhtNode:
        if data_dir is None:
            data_dir = self.root / f"node{self._made}"
            self._made += 1
            data_dir.mkdir()
        store = Store.open(data_dir, limits=self.limits, ttl_ms=TTL_MS)
        return DhtNode(identity or Identity.generate(), store, self.config, clock=fixed_clock)


class Blaster(asyncio.DatagramProtocol):
    """A hostile socket: sends, never reads."""

    def connection_made(self, transport: Any) -> None:
        self.transport = transport


async def blaster() -> Any:
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(Blaster, local_addr=("127.0.0.1", 0))
    return transport


def run_net(tmp_path: Path, limits: StoreLimits, config: DhtConfig, body: Any) -> None:
    async def main() -> None:
        net = LimitedNetwork(tmp_path, config)
        net.limits = limits
        try:
            await body(net)
        finally:
            await net.close()

    asyncio.run(main())


async def barrier(friend: DhtNode, target: DhtNode) -> bool:
    """True once ``target`` answered a ping sent after everything queued before it."""
    ok, _ = await friend.protocol.call_ping(Contact(target.node_id, *target.address))
    return bool(ok)


def token_for(target: DhtNode, addr: tuple) -> bytes:
    """The address token ``target`` hands a requester at ``addr``: a flooder that receives
    at its address has it after one round trip (a spoofer never does: test_dataplane)."""
    return target.protocol.tokens.issue((addr[0], addr[1]))


def store_requests(
    sender_id: bytes, envs: list[Envelope], token: bytes | None = None
) -> list[bytes]:
    """store_packets datagrams carrying ``envs``, grouped by key, each within one datagram."""
    by_key: dict[bytes, list[bytes]] = {}
    for env in envs:
        by_key.setdefault(env.key, []).append(env.raw)
    out = []
    for key, raws in by_key.items():
        for batch in batches_within(raws, wire.MAX_DATAGRAM_BYTES - 200):
            args = [sender_id, key, batch]
            out.append(wire.encode_request(os.urandom(20), "store_packets", args, token))
    return out


def test_one_signer_flooding_cannot_push_out_honest_packets(tmp_path: Path) -> None:
    limits = StoreLimits(per_key=5_000, per_signer_per_key=50, max_bytes=300_000)
    config = DhtConfig(rpc_timeout=2.0, rate_limit_per_source=5_000, rate_burst_per_source=5_000)
    hostile = Identity.generate()
    # Under the honest key (200 > the signer quota of 50) and under 30 keys of its own.
    flood = [p[0] for p in make_packets(200, hostile)]
    for k in range(30):
        flood += [p[0] for p in make_packets(60, hostile, start=1000 * k, problem_type=f"f{k}")]
    flood_bytes = sum(len(e.raw) for e in flood)
    assert flood_bytes > 1.5 * limits.max_bytes

    async def body(net: LimitedNetwork) -> None:
        await net.add(6)
        target, friend = net.nodes[0], net.nodes[1]
        honest = [net.nodes[2], net.nodes[3]]
        await net.settle()
        rss_before = rss_bytes()
        sock = await blaster()
        requests = store_requests(
            os.urandom(20), flood, token_for(target, sock.get_extra_info("sockname"))
        )
        half = len(requests) // 2
        honest_envs: list[Envelope] = []
        t0 = time.perf_counter()
        for data in requests[:half]:
            sock.sendto(data, target.address)
        assert await barrier(friend, target)
        for i, node in enumerate(honest):  # honest signers publish in the middle of the flood
            envs = [p[0] for p in make_packets(25, node.identity, start=10_000 * (i + 1))]
            await publish_from(node, envs)
            honest_envs += envs
        for data in requests[half:]:
            sock.sendto(data, target.address)
        assert await barrier(friend, target)
        elapsed = time.perf_counter() - t0
        sock.close()
        rss_growth = rss_bytes() - rss_before
        key = honest_envs[0].key
        missing = [e.packet_id for e in honest_envs if not target.store.has(key, e.packet_id)]
        assert missing == [], f"{len(missing)} honest packets pushed out"
        stats = target.store.stats()
        assert stats["bytes"] <= limits.max_bytes
        held_hostile = [
            pid
            for pid in (e.packet_id for e in flood if e.key == key)
            if target.store.has(key, pid)
        ]
        assert len(held_hostile) <= limits.per_signer_per_key
        rejected = target.stats()["rejected"]
        assert rejected.get("signer_quota", 0) >= 150
        # Everyone else still fetches every honest packet.
        got = await net.nodes[5].fetch(key)
        assert {e.packet_id for e in honest_envs} <= {e.packet_id for e in got}
        print(
            f"\nflood: {len(flood)} envelopes ({flood_bytes} B) in {len(requests)} requests, "
            f"handled in {elapsed:.2f} s; store {stats['bytes']} B of {limits.max_bytes}; "
            f"RSS growth {rss_growth / 1e6:.1f} MB"
        )
        assert rss_growth < 64 << 20

    run_net(tmp_path, limits, config, body)


SYBIL_HOST = "127.0.0.66"
"""Where the sybil flood comes from: one host minting keys (a label in the store, no traffic)."""


def sybil_flood(store: Store, signers: int, per_signer: int) -> list[Envelope]:
    envs = []
    for s in range(signers):
        ident = Identity.generate()
        envs += [
            p[0]
            for p in make_packets(per_signer, ident, start=s * 100, problem_type=f"sybil{s % 97}")
        ]
    for i in range(0, len(envs), 100):
        store.put(envs[i : i + 100], now_ms=NOW, origin=SYBIL_HOST)
    return envs


def test_sybil_flood_hits_the_cap_never_the_nodes_own_packets(tmp_path: Path) -> None:
    limits = StoreLimits(max_bytes=100_000)
    with Store.open(tmp_path, limits=limits, ttl_ms=TTL_MS) as store:
        me = Identity.generate()
        own = [e for p in make_packets(40, me) for e in p]
        store.put(own, now_ms=NOW, local=True)
        flood = sybil_flood(store, signers=600, per_signer=1)
        assert sum(len(e.raw) for e in flood) > 1.5 * limits.max_bytes
        assert all(store.has(e.key, e.packet_id) for e in own)
        stats = store.stats()
        assert stats["bytes"] <= limits.max_bytes
        assert stats["local_packets"] == len(own)
        assert store.integrity_check()


def test_sybil_flood_does_not_evict_honest_remote_packets(tmp_path: Path) -> None:
    """Honest remote signers with 20 packets each, delivered by their own hosts, vs 600
    sybil keys with one packet each from one host: eviction takes the heaviest source."""
    limits = StoreLimits(max_bytes=100_000)
    with Store.open(tmp_path, limits=limits, ttl_ms=TTL_MS) as store:
        honest = []
        for h in range(3):
            mine = [p[0] for p in make_packets(20, Identity.generate())]
            store.put(mine, now_ms=NOW, origin=f"127.0.0.{11 + h}")
            honest += mine
        sybil_flood(store, signers=600, per_signer=1)
        lost = [e.packet_id for e in honest if not store.has(e.key, e.packet_id)]
        assert lost == [], f"{len(lost)} of {len(honest)} honest remote packets evicted"


class LoopbackOnly:
    """A node's transport that drops every datagram not bound for a loopback address (its
    replies and verification pings to a simulated remote host): tests send only to 127.0.0.1."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.dropped = 0

    def sendto(self, data: bytes, addr: tuple) -> None:
        if ipaddress.ip_address(addr[0]).is_loopback:
            self._inner.sendto(data, addr)
        else:
            self.dropped += 1

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def test_source_of_is_the_host_except_on_loopback() -> None:
    assert source_of(("192.0.2.7", 1)) == source_of(("192.0.2.7", 2)) == "192.0.2.7"
    assert source_of(("::ffff:192.0.2.7", 3)) == "192.0.2.7"
    assert source_of(("2001:db8::1", 1)) == source_of(("2001:db8::ffff:2", 9)) == "2001:db8::/64"
    assert source_of(("2001:db8:0:1::1", 1)) != source_of(("2001:db8::1", 1))
    assert source_of(("127.0.0.1", 1)) != source_of(("127.0.0.1", 2))
    assert source_of(("127.0.0.2", 1)) != source_of(("127.0.0.1", 1))
    assert source_of(("::1", 1)) != source_of(("::1", 2))


def test_one_host_is_one_source_whatever_its_ports(tmp_path: Path) -> None:
    """32 ports of one address get the rate of one source, not 32; on loopback each port is
    a source of its own (every node of a local network shares 127.0.0.1)."""
    config = DhtConfig(rate_limit_per_source=10.0, rate_burst_per_source=20)

    def request() -> bytes:
        return wire.encode_request(os.urandom(20), "find_node", [os.urandom(20)] * 2)

    async def body(net: LimitedNetwork) -> None:
        await net.add(2)
        target = net.nodes[0]
        target.protocol.transport = LoopbackOnly(target.protocol.transport)
        t0 = time.perf_counter()
        for _ in range(10):
            for port in range(40_000, 40_032):
                target.protocol.datagram_received(request(), (REMOTE_HOST, port))
        elapsed = time.perf_counter() - t0
        served = target.stats()["rpcs_received"].get("find_node", 0)
        allowed = config.rate_burst_per_source + config.rate_limit_per_source * elapsed
        assert served <= allowed + 1, f"{served} requests served from one host, limit {allowed:.0f}"
        assert target.stats()["rate_limited"] >= 320 - allowed - 1
        for _ in range(10):
            for port in range(40_000, 40_032):
                target.protocol.datagram_received(request(), ("127.0.0.1", port))
        assert target.stats()["rpcs_received"]["find_node"] == served + 320

    run_net(tmp_path, StoreLimits(), config, body)


def test_sybil_flood_over_the_wire_from_one_host_evicts_its_own_packets(tmp_path: Path) -> None:
    """600 sybil keys, one packet each, stored by one host over many ports, past the cap:
    the honest remote packets other hosts stored stay (the DHT passes the host as origin)."""
    limits = StoreLimits(max_bytes=100_000)
    config = DhtConfig(rate_limit_per_source=1e9, rate_burst_per_source=10**9)
    sybils = []
    for s in range(600):
        sybils += [
            p[0]
            for p in make_packets(1, Identity.generate(), start=s, problem_type=f"sybil{s % 97}")
        ]

    async def body(net: LimitedNetwork) -> None:
        await net.add(4)
        target = net.nodes[0]
        await net.settle()
        honest: list[Envelope] = []
        for i, node in enumerate(net.nodes[1:]):
            envs = [p[0] for p in make_packets(20, node.identity, start=1_000 * (i + 1))]
            await publish_from(node, envs)
            honest += envs
        assert all(target.store.has(e.key, e.packet_id) for e in honest)
        target.protocol.transport = LoopbackOnly(target.protocol.transport)
        for i, data in enumerate(store_requests(os.urandom(20), sybils)):
            addr = (REMOTE_HOST, 50_000 + i)
            name, args, _token, _flags = wire.split_request(wire.decode_datagram(data)[2])
            data = wire.encode_request(os.urandom(20), name, args, token_for(target, addr))
            target.protocol.datagram_received(data, addr)
        assert target.stats()["stored_packets"] >= len(honest) + 100
        assert target.store.stats()["bytes"] <= limits.max_bytes
        lost = [e.packet_id for e in honest if not target.store.has(e.key, e.packet_id)]
        assert lost == [], f"{len(lost)} of {len(honest)} honest remote packets evicted"

    run_net(tmp_path, limits, config, body)


def forged_request(sender: bytes, template: Envelope, count: int, token: bytes) -> bytes:
    """A store_packets request of ``count`` envelopes with random bodies: each costs a
    signature check before it is refused, and none is a duplicate of another."""
    v, kind, key, fb, pub, _body, sig = msgpack.unpackb(template.raw)
    raws = [msgpack.packb([v, kind, key, fb, pub, os.urandom(16), sig]) for _ in range(count)]
    return wire.encode_request(os.urandom(20), "store_packets", [sender, key, raws], token)


def test_one_source_within_its_burst_cannot_stall_the_node(tmp_path: Path) -> None:
    """300 requests of 50 forged envelopes (inside the default burst of 1,000 requests)."""
    config = DhtConfig(rpc_timeout=2.0)
    template = make_packets(1)[0][0]

    async def body(net: LimitedNetwork) -> None:
        await net.add(3)
        target, friend = net.nodes[0], net.nodes[1]
        sock = await blaster()
        token = token_for(target, sock.get_extra_info("sockname"))
        requests = [forged_request(os.urandom(20), template, 50, token) for _ in range(300)]
        assert all(len(r) <= wire.HEADER_BYTES + wire.MAX_DATAGRAM_BYTES for r in requests)
        for data in requests:
            sock.sendto(data, target.address)
        t0 = time.perf_counter()
        ok = await barrier(friend, target)
        stalled = time.perf_counter() - t0
        sock.close()
        stats = target.stats()
        rejected = stats["rejected"].get("SignatureError", 0)
        assert ok, f"an honest ping timed out: the node spent {stalled:.1f} s on {rejected} forged"
        # The burst bought about its size in signature checks, not 15,000.
        assert rejected <= config.rate_burst_per_source + config.rate_limit_per_source * stalled
        assert stats["rate_limited"] > 0

    run_net(tmp_path, StoreLimits(), config, body)
