"""Clocks: nodes whose clocks are minutes apart keep valid packets and drop future ones on time.

The bounds (README "Guarantees", docs/guarantees.md):

* A node accepts a packet whose newest row is at most ``MAX_FUTURE_MS`` (5 minutes) ahead of
  *its own* clock. So a packet published by a node whose clock is ``a`` ahead of true time is
  accepted by a node whose clock is ``b`` ahead as long as ``a - b <= 5 min``: any two clocks
  within +-2.5 minutes of true time always agree; further apart, the slower node refuses the
  packet (reason: "... in the future") until its clock catches up, while the others hold it.
* A packet expires at ``timestamp + ttl`` on every holder's clock: a holder whose clock is ``b``
  ahead drops it ``b`` early, one ``b`` behind keeps it ``b`` longer. A packet stamped in the
  future (at most 5 minutes) lives at most 5 minutes past ``ttl`` after true time.

Time is injected (``DhtNode(clock=...)``, ``Store.put(now_ms=...)``): nothing here reads the wall
clock or waits for real minutes to pass.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from helpers import NOW, make_packets
from test_dht import Network

from qisd.config import DhtConfig, StoreLimits
from qisd.core.crypto import Identity
from qisd.core.packet import MAX_FUTURE_MS, Envelope
from qisd.net.dht import DhtNode
from qisd.net.routing import Contact
from qisd.net.store import Store

TTL_MS = 30 * 86_400_000
MINUTE_MS = 60_000


class SkewedNetwork(Network):
    """A Network whose nodes each run ``offset_ms`` off a shared true time (``true_ms``)."""

    def __init__(self, root: Path, config: DhtConfig | None = None) -> None:
        super().__init__(root, config or DhtConfig(rpc_timeout=1.0))
        self.true_ms = NOW
        self.offsets: dict[int, int] = {}
        self._pending_offset = 0

    def make(self, identity: Identity | None = None, data_dir: Path | None = None) -> DhtNode:
        if data_dir is None:
            data_dir = self.root / f"node{self._made}"
            self._made += 1
            data_dir.mkdir()
        store = Store.open(data_dir, limits=StoreLimits(), ttl_ms=TTL_MS)
        offset = self._pending_offset

        def clock() -> float:
            return (self.true_ms + offset) / 1000

        node = DhtNode(identity or Identity.generate(), store, self.config, clock=clock)
        self.offsets[id(node)] = offset
        return node

    async def add_skewed(self, offsets_ms: list[int]) -> list[DhtNode]:
        out = []
        for offset in offsets_ms:
            self._pending_offset = offset
            out += await self.add(1)
        self._pending_offset = 0
        return out

    def now_of(self, node: DhtNode) -> int:
        return self.true_ms + self.offsets[id(node)]


def run_skewed(tmp_path: Path, body: object) -> None:
    async def main() -> None:
        net = SkewedNetwork(tmp_path)
        try:
            await body(net)  # type: ignore[operator]
        finally:
            await net.close()

    asyncio.run(main())


async def publish_at(net: SkewedNetwork, node: DhtNode, n: int, **kw: object) -> list[Envelope]:
    """``n`` packets stamped with ``node``'s own clock, stored locally and published."""
    now = net.now_of(node)
    envs = [p[0] for p in make_packets(n, node.identity, now_ms=now, **kw)]  # type: ignore[arg-type]
    node.store.put(envs, now_ms=now, local=True)
    await node.publish(envs)
    return envs


def test_clocks_within_two_and_a_half_minutes_lose_no_valid_packet(tmp_path: Path) -> None:
    spread = [-150_000, -90_000, -30_000, 0, 30_000, 90_000, 150_000]

    async def body(net: SkewedNetwork) -> None:
        nodes = await net.add_skewed(spread * 2)
        ahead = nodes[6]  # +2.5 min: its packets are the furthest in the future anyone sees
        behind = nodes[7]  # -2.5 min
        mine = await publish_at(net, ahead, 3, problem_type="skew_ahead")
        theirs = await publish_at(net, behind, 3, problem_type="skew_behind")
        await net.settle()
        for envs in (mine, theirs):
            want = {e.packet_id for e in envs}
            for node in net.nodes:
                got = await node.fetch(envs[0].key)
                assert {e.packet_id for e in got} == want, net.offsets[id(node)]
        rejected = sum(sum(n.stats()["rejected"].values()) for n in net.nodes)
        assert rejected == 0

    run_skewed(tmp_path, body)


def test_a_clock_past_the_bound_refuses_then_catches_up(tmp_path: Path) -> None:
    """Publisher +4 min, one holder -2 min: 6 min apart, past the 5-minute bound."""

    async def body(net: SkewedNetwork) -> None:
        await net.add_skewed([0] * 8)
        fast = (await net.add_skewed([4 * MINUTE_MS]))[0]
        slow = (await net.add_skewed([-2 * MINUTE_MS]))[0]
        envs = await publish_at(net, fast, 2, problem_type="skew_far")
        key = envs[0].key
        await net.settle()
        # The slow node refuses what it is sent, with the reason; everyone else holds it.
        ok, reply = await fast.protocol.call_store_packets(
            Contact(slow.node_id, *slow.address), key, [envs[0].raw]
        )
        assert ok and not reply.accepted
        assert any("in the future" in why for _pid, why in reply.refused), reply.refused
        assert not slow.store.has(key, envs[0].packet_id)
        assert {e.packet_id for e in await slow.fetch(key)} == set()
        for node in net.nodes[:8]:
            assert {e.packet_id for e in await node.fetch(key)} == {e.packet_id for e in envs}
        # Nothing vanished: a minute later (6 - 1 = 5 minutes apart) the slow node sees them.
        net.true_ms += MINUTE_MS
        assert {e.packet_id for e in await slow.fetch(key)} == {e.packet_id for e in envs}

    run_skewed(tmp_path, body)


def test_expiry_bounds_under_skew(tmp_path: Path) -> None:
    """A packet lives ttl on every holder's clock; skew moves that by exactly the skew."""
    ident = Identity.generate()
    honest = make_packets(1, ident, now_ms=NOW)[0][0]
    future = make_packets(1, ident, now_ms=NOW, timestamps=[NOW + MAX_FUTURE_MS], start=1)[0][0]
    for skew in (-4 * MINUTE_MS, 0, 4 * MINUTE_MS):
        (tmp_path / str(skew)).mkdir()
        with Store.open(tmp_path / str(skew), limits=StoreLimits(), ttl_ms=TTL_MS) as store:

            def held(true_ms: int, store: Store = store, skew: int = skew) -> set[str]:
                raws, _c, _m = store.page(
                    honest.key, since=0, max_bytes=1 << 20, now_ms=true_ms + skew
                )
                return {e.packet_id for e in (honest, future) if e.raw in raws}

            result = store.put([honest, future], now_ms=NOW + skew)
            if skew < 0:
                # 4 min behind, a packet 5 min ahead of true time is 9 min in its future: the
                # store is the last line, and the RPC layer (open_envelope) refuses it first.
                assert future.packet_id in result.accepted
            both = {honest.packet_id, future.packet_id}
            assert held(NOW + TTL_MS - skew - 1) == both
            # Gone on the holder's clock at timestamp + ttl, whatever true time that is.
            assert held(NOW + TTL_MS - skew) == {future.packet_id}
            assert held(NOW + TTL_MS + MAX_FUTURE_MS - skew) == set()
            # expire() deletes exactly what reads already hide.
            store.expire(NOW + TTL_MS + MAX_FUTURE_MS)  # the holder's clock
            assert store.stats()["packets"] == 0
