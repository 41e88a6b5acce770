"""Churn and partition in in-process networks of real DHT nodes (UDP on 127.0.0.1).

* Churn: every ``period`` seconds 10% of the live nodes are killed (socket gone, nothing saved or
  said) and the ones killed the round before come back from their data directories (same key,
  same store, new port), while packets are published continuously from random live nodes. At
  the end every packet whose publish reached a quorum (a majority of k) of replicas is fetched
  from every live node. Full: 100 nodes for 60 s; ``QISD_SLOW=ci``: 40 nodes for 15 s; the
  default run: 20 nodes, 3 rounds.
* Partition: traffic between two halves is dropped *in the transport* (each node's ``sendto`` is
  wrapped by a filtering proxy here, in the test), both halves publish under the same keys, the
  partition heals, and the time until every one of each key's k closest live nodes holds the
  union (replicas converged) and every node's fetch returns it is measured.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import NOW, make_packets
from test_dht import TTL_MS, fixed_clock

from qisd.config import DhtConfig, StoreLimits
from qisd.core.crypto import Identity
from qisd.core.packet import Envelope
from qisd.net.dht import DhtNode
from qisd.net.store import Store


class Gate:
    """Which side each port is on, and whether traffic between sides is dropped."""

    def __init__(self) -> None:
        self.side: dict[int, int] = {}
        self.closed = False
        self.dropped = 0

    def blocks(self, src_port: int, addr: tuple) -> bool:
        if not self.closed:
            return False
        a, b = self.side.get(src_port), self.side.get(addr[1])
        return a is not None and b is not None and a != b


class FilteredTransport:
    """A node's datagram transport with a partition filter on ``sendto``."""

    def __init__(self, inner: Any, port: int, gate: Gate) -> None:
        self._inner = inner
        self._port = port
        self._gate = gate

    def sendto(self, data: bytes, addr: tuple) -> None:
        if self._gate.blocks(self._port, addr):
            self._gate.dropped += 1
            return
        self._inner.sendto(data, addr)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class Swarm:
    """Nodes that can be killed hard and brought back from their data directories."""

    def __init__(self, root: Path, config: DhtConfig, seed: int) -> None:
        self.root = root
        self.config = config
        self.rng = random.Random(seed)
        self.live: list[DhtNode] = []
        self.dead: dict[int, tuple[Identity, Path]] = {}
        self.all_dirs: list[Path] = []
        self.stored = asyncio.Event()

    def _make(self, ident: Identity, data_dir: Path) -> DhtNode:
        store = Store.open(data_dir, limits=StoreLimits(), ttl_ms=TTL_MS)
        node = DhtNode(
            ident, store, self.config, state_path=data_dir / "routing.json", clock=fixed_clock
        )
        return node

    async def _start(self, node: DhtNode) -> None:
        await node.start()
        node.protocol.on_stored = lambda _key, _n: self.stored.set()
        if self.live:
            peers = [p.address for p in self.rng.sample(self.live, min(3, len(self.live)))]
            assert await node.bootstrap(peers) >= 1
        self.live.append(node)

    async def grow(self, n: int) -> None:
        for _ in range(n):
            data_dir = self.root / f"n{len(self.all_dirs)}"
            data_dir.mkdir()
            self.all_dirs.append(data_dir)
            await self._start(self._make(Identity.generate(), data_dir))

    async def kill(self, node: DhtNode) -> None:
        """Socket gone at once; then its tasks are cancelled without saving anything."""
        self.live.remove(node)
        node.protocol.closed = True
        node.server.transport.abort()
        node.state_path = None  # a killed process saves nothing
        await node.stop()
        node.store.close()
        self.dead[id(node)] = (node.identity, node.store.path.parent)

    async def revive(self, ident: Identity, data_dir: Path) -> DhtNode:
        node = self._make(ident, data_dir)
        await self._start(node)
        return node

    async def settle(self, timeout: float = 60) -> None:
        async with asyncio.timeout(timeout):
            while pending := [t for n in self.live for t in n.protocol._tasks]:
                await asyncio.gather(*pending, return_exceptions=True)

    async def close(self) -> None:
        for node in self.live:
            await node.stop()
            node.store.close()


def run(body: Any, timeout: float) -> Any:
    async def main() -> Any:
        async with asyncio.timeout(timeout):
            return await body()

    return asyncio.run(main())


async def publish_from(node: DhtNode, envs: list[Envelope]) -> dict[str, int]:
    node.store.put(envs, now_ms=NOW, local=True)
    return (await node.publish(envs)).replicas


# --------------------------------------------------------------------------- churn


def churn(tmp_path: Path, nodes: int, rounds: int, period: float, keys: int) -> dict[str, Any]:
    config = DhtConfig(ksize=20, rpc_timeout=1.0)
    quorum = config.ksize // 2 + 1

    async def body() -> dict[str, Any]:
        swarm = Swarm(tmp_path, config, seed=nodes)
        try:
            await swarm.grow(nodes)
            await swarm.settle()
            published: list[tuple[Envelope, int]] = []
            stop = asyncio.Event()
            serial = iter(range(10**9))

            async def publisher() -> None:
                while not stop.is_set():
                    node = swarm.rng.choice(swarm.live)
                    k = swarm.rng.randrange(keys)
                    env = make_packets(
                        1, node.identity, start=next(serial), problem_type=f"churn{k}"
                    )[0][0]
                    try:
                        replicas = await publish_from(node, [env])
                    except Exception:  # the node was killed under the publish: not published
                        continue
                    published.append((env, replicas[env.packet_id]))

            pub = asyncio.ensure_future(publisher())
            killed = revived = 0
            t0 = time.perf_counter()
            for _ in range(rounds):
                # Wait one period (the stop event never fires here: this is the churn clock).
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), period)
                comeback = list(swarm.dead.values())
                swarm.dead.clear()
                victims = swarm.rng.sample(swarm.live, max(1, len(swarm.live) // 10))
                await asyncio.gather(*(swarm.kill(v) for v in victims))
                killed += len(victims)
                await asyncio.gather(*(swarm.revive(i, d) for i, d in comeback))
                revived += len(comeback)
            stop.set()
            await pub
            churn_seconds = time.perf_counter() - t0
            await swarm.settle()
            quorate = [env for env, n in published if n >= quorum]
            by_key: dict[bytes, set[str]] = {}
            for env in quorate:
                by_key.setdefault(env.key, set()).add(env.packet_id)
            sem = asyncio.Semaphore(16)
            missing: list[tuple[str, int]] = []

            async def check(node: DhtNode, key: bytes, want: set[str]) -> None:
                async with sem:
                    got = {e.packet_id for e in await node.fetch(key)}
                lost = want - got
                if lost:
                    missing.append((node.node_id.hex()[:8], len(lost)))

            t1 = time.perf_counter()
            await asyncio.gather(
                *(check(n, k, want) for n in swarm.live for k, want in by_key.items())
            )
            figures = {
                "nodes": nodes,
                "live_at_end": len(swarm.live),
                "killed": killed,
                "revived": revived,
                "churn_seconds": round(churn_seconds, 1),
                "published": len(published),
                "quorate": len(quorate),
                "fetches": len(swarm.live) * len(by_key),
                "fetch_seconds": round(time.perf_counter() - t1, 1),
            }
            assert missing == [], (missing[:10], figures)
            assert len(quorate) >= 0.8 * len(published) > 0, figures
            return figures
        finally:
            await swarm.close()

    return run(body, timeout=rounds * period + 900)


def test_churn_quorum_packets_fetchable_from_every_live_node(tmp_path: Path) -> None:
    figures = churn(tmp_path, nodes=20, rounds=3, period=1.0, keys=3)
    print(f"\nchurn: {figures}")


@pytest.mark.slow
def test_churn_minute_long_ten_percent_every_few_seconds(tmp_path: Path, qisd_slow: str) -> None:
    if qisd_slow == "full":
        figures = churn(tmp_path, nodes=100, rounds=20, period=3.0, keys=8)
    else:
        figures = churn(tmp_path, nodes=30, rounds=4, period=2.0, keys=4)
    print(f"\nchurn: {figures}")


# --------------------------------------------------------------------------- partition


def closest(nodes: list[DhtNode], key: bytes, k: int) -> list[DhtNode]:
    target = int.from_bytes(key, "big")
    return sorted(nodes, key=lambda n: int.from_bytes(n.node_id, "big") ^ target)[:k]


def partition(
    tmp_path: Path,
    nodes: int,
    keys: int,
    per_side: int,
    republish_seconds: int,
    lookups: int = 0,
    forget: bool = False,
) -> dict[str, Any]:
    """``lookups``: random lookups each node makes during the partition (a long partition:
    each one that reaches across counts a failure against the contact, until it is evicted).
    ``forget``: then every contact across the cut still known fails until it is evicted, so
    the halves know nothing of each other (buckets and replacement caches) when it heals."""
    config = DhtConfig(
        ksize=8,
        rpc_timeout=0.5,
        republish_seconds=republish_seconds,
        rejoin_seconds=republish_seconds,
    )
    # Documented bound: rejoin_seconds + republish_seconds + lookups; the test allows slack.
    bound = 3 * republish_seconds + 10.0

    async def body() -> dict[str, Any]:
        swarm = Swarm(tmp_path, config, seed=nodes + 1)
        try:
            await swarm.grow(nodes)
            await swarm.settle()
            gate = Gate()
            sides: list[list[DhtNode]] = [[], []]
            for i, node in enumerate(swarm.live):
                port = node.address[1]
                gate.side[port] = i % 2
                sides[i % 2].append(node)
                node.protocol.transport = FilteredTransport(node.protocol.transport, port, gate)
            gate.closed = True
            published: dict[bytes, set[str]] = {}
            by_side: list[set[str]] = [set(), set()]
            serial = iter(range(10**9))
            for side in (0, 1):
                for author in sides[side][:per_side]:
                    for k in range(keys):
                        envs = [
                            p[0]
                            for p in make_packets(
                                2, author.identity, start=next(serial) * 10, problem_type=f"p{k}"
                            )
                        ]
                        await publish_from(author, envs)
                        for env in envs:
                            published.setdefault(env.key, set()).add(env.packet_id)
                            by_side[side].add(env.packet_id)
            for _ in range(lookups):
                await asyncio.gather(
                    *(n.server.crawl_nodes(random.randbytes(20)) for n in swarm.live)
                )
            await swarm.settle()

            def across(node: DhtNode, side: int) -> list[Any]:
                router = node.protocol.router
                known = [
                    c
                    for b in router.buckets
                    for c in (*b.nodes.values(), *b.replacement_nodes.values())
                ]
                return [c for c in known if gate.side.get(c.port) == 1 - side]

            if forget:
                for side in (0, 1):
                    for n in sides[side]:
                        while lost := across(n, side):
                            for c in lost:
                                n.protocol.router.record_failure(c)
                assert not any(across(n, side) for side in (0, 1) for n in sides[side])
            cross = sum(
                1
                for side in (0, 1)
                for n in sides[side]
                for c in n.protocol.router.contacts()
                if gate.side.get(c.port) == 1 - side
            )
            # The partition holds: each side reads only its own side's packets.
            for side in (0, 1):
                reader = sides[side][-1]
                for key in published:
                    got = {e.packet_id for e in await reader.fetch(key)}
                    assert got <= by_side[side] and got, (side, len(got))
            dropped_during = gate.dropped
            gate.closed = False
            healed = time.perf_counter()

            def replicas_converged() -> bool:
                return all(
                    all(n.store.has(key, pid) for pid in want)
                    for key, want in published.items()
                    for n in closest(swarm.live, key, config.ksize)
                )

            try:
                async with asyncio.timeout(bound):
                    while not replicas_converged():
                        swarm.stored.clear()
                        await swarm.stored.wait()
            except TimeoutError:
                lacking = sum(
                    len(want) - sum(n.store.has(key, pid) for pid in want)
                    for key, want in published.items()
                    for n in closest(swarm.live, key, config.ksize)
                )
                raise AssertionError(
                    f"replicas did not converge within {bound:.0f} s of healing "
                    f"({lacking} packet copies missing at the keys' {config.ksize} closest; "
                    f"{cross} contacts across the cut were left when it healed)"
                ) from None
            converged = time.perf_counter() - healed
            for node in swarm.live:
                for key, want in published.items():
                    assert {e.packet_id for e in await node.fetch(key)} == want
            reads = time.perf_counter() - healed
            return {
                "nodes": nodes,
                "packets": sum(len(v) for v in published.values()),
                "dropped_datagrams": dropped_during,
                "cross_contacts_left": cross,
                "replicas_converged_s": round(converged, 2),
                "every_read_whole_s": round(reads, 2),
                "republish_s": republish_seconds,
                "bound_s": bound,
            }
        finally:
            await swarm.close()

    return run(body, timeout=bound + 240)


def test_partition_heals_to_the_union_within_the_republish_bound(tmp_path: Path) -> None:
    figures = partition(tmp_path, nodes=16, keys=2, per_side=2, republish_seconds=3)
    print(f"\npartition: {figures}")


def test_long_partition_halves_rejoin_after_forgetting_each_other(tmp_path: Path) -> None:
    figures = partition(
        tmp_path, nodes=16, keys=2, per_side=2, republish_seconds=3, lookups=12, forget=True
    )
    assert figures["cross_contacts_left"] == 0
    print(f"\npartition: {figures}")


@pytest.mark.slow
def test_partition_heals_at_scale(tmp_path: Path, qisd_slow: str) -> None:
    nodes = 100 if qisd_slow == "full" else 40
    figures = partition(tmp_path, nodes=nodes, keys=4, per_side=3, republish_seconds=5)
    print(f"\npartition: {figures}")
