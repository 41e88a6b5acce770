"""In-process networks of real qisd DHT nodes on 127.0.0.1 (UDP, port 0), issue 3's list.

Each test runs its own event loop with ``asyncio.run``; waits are on events and futures under
``asyncio.timeout``, never on ``sleep``. Time as the packets see it is fixed (``helpers.NOW``),
so packet expiry never depends on the machine's date.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from helpers import NOW, coarse_key, make_packets

from qisd.config import DhtConfig, StoreLimits
from qisd.core.crypto import Identity
from qisd.core.packet import Envelope
from qisd.net.dht import DhtNode
from qisd.net.store import Store

TTL_MS = 30 * 86_400_000


def fixed_clock() -> float:
    return NOW / 1000


class Network:
    """A set of DhtNodes in one event loop, each with its own data directory and Store."""

    def __init__(self, root: Path, config: DhtConfig | None = None, *, seed: int = 1) -> None:
        self.root = root
        self.config = config or DhtConfig(rpc_timeout=2.0)
        self.nodes: list[DhtNode] = []
        self.rng = random.Random(seed)
        self._made = 0

    def make(self, identity: Identity | None = None, data_dir: Path | None = None) -> DhtNode:
        """A node (not started) with a fresh Store in its own directory."""
        if data_dir is None:
            data_dir = self.root / f"node{self._made}"
            self._made += 1
            data_dir.mkdir()
        store = Store.open(data_dir, limits=StoreLimits(), ttl_ms=TTL_MS)
        return DhtNode(
            identity or Identity.generate(),
            store,
            self.config,
            state_path=data_dir / "routing.json",
            clock=fixed_clock,
        )

    async def add(self, count: int = 1) -> list[DhtNode]:
        """Start ``count`` nodes, each bootstrapping from a random running node."""
        added = []
        for _ in range(count):
            node = self.make()
            await node.start()
            if self.nodes:
                peer = self.rng.choice(self.nodes)
                assert await node.bootstrap([peer.address]) == 1
            self.nodes.append(node)
            added.append(node)
        return added

    async def join(self, node: DhtNode) -> DhtNode:
        await node.start()
        assert await node.bootstrap([self.rng.choice(self.nodes).address]) == 1
        self.nodes.append(node)
        return node

    async def settle(self) -> None:
        """Wait until no node has background RPC work pending (verifications, hand-offs)."""
        async with asyncio.timeout(30):
            while True:
                pending = [t for n in self.nodes for t in n.protocol._tasks]
                if not pending:
                    return
                await asyncio.gather(*pending, return_exceptions=True)

    def kill(self, node: DhtNode) -> None:
        """Stop a node the hard way: its socket goes away, nothing is saved or said."""
        node.protocol.closed = True
        node.server.transport.abort()
        self.nodes.remove(node)

    async def close(self) -> None:
        for node in self.nodes:
            await node.stop()
            node.store.close()


def run(
    tmp_path: Path, body: Callable[[Network], Awaitable[Any]], config: DhtConfig | None = None
) -> Any:
    async def main() -> Any:
        net = Network(tmp_path, config)
        try:
            return await body(net)
        finally:
            await net.close()

    return asyncio.run(main())


async def publish_from(node: DhtNode, envs: list[Envelope]) -> Any:
    """What the daemon does: durable local put, then the DHT publish."""
    node.store.put(envs, now_ms=NOW, local=True)
    return await node.publish(envs)


def packets_for_keys(
    net: Network, keys: int, per_key: int
) -> dict[bytes, list[tuple[DhtNode, Envelope]]]:
    """``per_key`` packets at each of ``keys`` keys, each signed by a random node."""
    out: dict[bytes, list[tuple[DhtNode, Envelope]]] = {}
    serial = 0
    for k in range(keys):
        for _ in range(per_key):
            node = net.rng.choice(net.nodes)
            env = make_packets(1, node.identity, start=serial, problem_type=f"problem{k}")[0][0]
            serial += 1
            out.setdefault(env.key, []).append((node, env))
    return out


# --------------------------------------------------------------------------- tests


def test_fifty_nodes_two_hundred_packets_at_twenty_keys_fetched_exactly(tmp_path: Path) -> None:
    async def body(net: Network) -> None:
        await net.add(50)
        published = packets_for_keys(net, keys=20, per_key=10)
        assert sum(len(v) for v in published.values()) == 200
        for items in published.values():
            for node, env in items:
                result = await publish_from(node, [env])
                assert result.replicas[env.packet_id] >= net.config.ksize - 1
        await net.settle()
        sem = asyncio.Semaphore(16)

        async def check(node: DhtNode, key: bytes) -> None:
            async with sem:
                got = await node.fetch(key)
            want = {e.packet_id: e.raw for _n, e in published[key]}
            assert {e.packet_id: e.raw for e in got} == want
            assert all(e.key == key for e in got)

        # Every key from every node (its publishers included: they must see the others' too).
        checks = [check(node, key) for key in published for node in net.nodes]
        assert len(checks) == 1000
        async with asyncio.timeout(120):
            await asyncio.gather(*checks)
        stats = [n.stats() for n in net.nodes]
        assert sum(s["rejected"].get("fetched_SignatureError", 0) for s in stats) == 0

    run(tmp_path, body)


def test_forged_envelopes_are_refused_by_holders_and_never_fetched(tmp_path: Path) -> None:
    async def body(net: Network) -> None:
        await net.add(12)
        author = net.nodes[0]
        good, other = (p[0] for p in make_packets(2, author.identity))
        elsewhere = make_packets(1, author.identity, start=9, problem_type="elsewhere")[0][0]
        await publish_from(author, [good])
        attacker = net.nodes[-1]
        raw = bytearray(other.raw)
        raw[-3] ^= 0x01  # inside the signature
        forged_sig = bytes(raw)
        holders = [n for n in net.nodes if n.store.has(good.key, good.packet_id)]
        assert holders
        for holder in holders[:5]:
            target = holder.protocol.source_node
            contact = type(target)(target.id, *holder.address)
            ok, reply = await attacker.protocol.call_store_packets(
                contact, good.key, [forged_sig, elsewhere.raw]
            )
            assert ok and not reply.accepted
            reasons = " ".join(why for _pid, why in reply.refused)
            assert "SignatureError" in reasons and "KeyMismatchError" in reasons
            assert not holder.store.has(good.key, other.packet_id)
            assert not holder.store.has(good.key, elsewhere.packet_id)
            rejected = holder.stats()["rejected"]
            assert rejected["SignatureError"] >= 1 and rejected["KeyMismatchError"] >= 1
        for node in net.nodes:
            got = await node.fetch(good.key)
            assert [e.packet_id for e in got] == [good.packet_id]
        table = await net.nodes[3].fetch_table(good.key)
        assert table.column("packet_id").to_pylist() == [good.packet_id]
        assert table.column("signer").to_pylist() == [author.identity.public_key.hex()]

    run(tmp_path, body)


def test_churn_thirty_percent_killed_every_key_whole_and_fast(tmp_path: Path) -> None:
    config = DhtConfig(rpc_timeout=2.0)

    async def body(net: Network) -> None:
        await net.add(60)
        published = packets_for_keys(net, keys=10, per_key=3)
        for items in published.values():
            for node, env in items:
                await publish_from(node, [env])
        await net.settle()
        authors = {n for items in published.values() for n, _e in items}
        victims = net.rng.sample([n for n in net.nodes if n not in authors], 18)
        for victim in victims:
            net.kill(victim)
        assert len(net.nodes) == 42
        durations = []
        for key, items in published.items():
            want = {e.packet_id for _n, e in items}
            for node in net.rng.sample(net.nodes, 8):
                t0 = time.perf_counter()
                got = await node.fetch(key)
                durations.append(time.perf_counter() - t0)
                assert {e.packet_id for e in got} == want
        durations.sort()
        # One lock-step round with a dead contact would cost a full timeout; these cost less
        # than one timeout for the whole lookup.
        assert durations[-1] < config.rpc_timeout, durations[-5:]
        assert durations[len(durations) // 2] < config.rpc_timeout / 4, durations

    run(tmp_path, body, config)


def test_late_joiner_among_the_closest_receives_a_keys_packets_once(tmp_path: Path) -> None:
    async def body(net: Network) -> None:
        await net.add(30)
        author = net.nodes[3]
        envs = [p[0] for p in make_packets(6, author.identity)]
        key = envs[0].key
        await publish_from(author, envs)
        await net.settle()
        key_long = int.from_bytes(key, "big")
        closest = min(int.from_bytes(n.node_id, "big") ^ key_long for n in net.nodes)
        while True:  # an identity whose id is closer to the key than every node's
            ident = Identity.generate()
            if int.from_bytes(ident.dht_id, "big") ^ key_long < closest:
                break
        joiner = net.make(ident)
        received: list[int] = []
        await joiner.start()
        handler = joiner.protocol._handlers["store_packets"]

        def counting(addr: tuple, args: list) -> Any:
            if len(args) == 3 and args[1] == key:
                received.append(len(args[2]))
            return handler(addr, args)

        joiner.protocol._handlers["store_packets"] = counting
        assert await joiner.bootstrap([net.nodes[0].address]) == 1
        net.nodes.append(joiner)
        await net.settle()
        assert sorted(e.packet_id for e in envs) == sorted(
            pid for pid in (e.packet_id for e in envs) if joiner.store.has(key, pid)
        )
        assert sum(received) == len(envs), received
        # A second contact with the same nodes hands nothing off again.
        await joiner.bootstrap([n.address for n in net.nodes[:10]])
        await net.settle()
        assert sum(received) == len(envs), received

    run(tmp_path, body)


def test_publish_in_a_small_network_reaches_every_other_node_right_after_joining(
    tmp_path: Path,
) -> None:
    """Six nodes, each joined through the first (what ``qisd demo`` does), k = 20: a publish
    made as soon as the last node joined reaches all five others, from every node."""

    async def body(net: Network) -> None:
        first = (await net.add(1))[0]
        for _ in range(5):
            node = net.make()
            await node.start()
            assert await node.bootstrap([first.address]) == 1
            net.nodes.append(node)
        for i, author in enumerate(net.nodes):
            envs = [p[0] for p in make_packets(1, author.identity, start=100 * i)]
            result = await publish_from(author, envs)
            assert result.min_replicas == 5, (i, result.replicas, result.contacted)

    run(tmp_path, body)


def test_publish_counts_each_rpc_once_across_keys(tmp_path: Path) -> None:
    """``PublishResult.messages`` of a publish under several keys (published concurrently)
    is the RPCs it sent, not each key's share of the node's total traffic."""

    async def body(net: Network) -> None:
        await net.add(12)
        await net.settle()
        author = net.nodes[4]
        envs = [
            p[0]
            for k in range(3)
            for p in make_packets(2, author.identity, start=10 * k, problem_type=f"count{k}")
        ]
        assert len({e.key for e in envs}) == 3
        author.store.put(envs, now_ms=NOW, local=True)
        sent_before = sum(author.stats()["rpcs_sent"].values())
        result = await author.publish(envs)
        sent = sum(author.stats()["rpcs_sent"].values()) - sent_before
        # Every store and lookup RPC is counted; background verification pings may add a few.
        assert result.contacted == 3 * 11
        assert result.contacted < result.messages <= sent, (result.messages, sent)

    run(tmp_path, body)


def test_follower_is_pushed_a_packet_published_after_it_followed(tmp_path: Path) -> None:
    async def body(net: Network) -> None:
        await net.add(25)
        author, follower = net.nodes[5], net.nodes[17]
        before = make_packets(2, author.identity)
        await publish_from(author, [p[0] for p in before])
        got: list[Envelope] = []
        arrived = asyncio.Event()
        expected: set[str] = set()

        def on_packets(envs: list[Envelope]) -> None:
            got.extend(envs)
            if expected and expected <= {e.packet_id for e in got}:
                arrived.set()

        await follower.follow(coarse_key(), on_packets)
        assert {e.packet_id for e in got} == {p[0].packet_id for p in before}
        new = make_packets(1, author.identity, start=50)[0][0]
        expected.add(new.packet_id)
        t0 = time.perf_counter()
        await publish_from(author, [new])
        async with asyncio.timeout(5):
            await arrived.wait()
        assert time.perf_counter() - t0 < 5
        assert [e.packet_id for e in got].count(new.packet_id) == 1
        assert follower.stats()["rpcs_received"].get("notify", 0) >= 1
        # The refresh interval is listen_seconds/3 = 100 s: only a push can have delivered it.
        assert net.config.listen_seconds / 3 > 60

    run(tmp_path, body)


def test_restart_from_data_directory_alone_rejoins_and_serves(tmp_path: Path) -> None:
    async def body(net: Network) -> None:
        await net.add(15)
        node = net.nodes[4]
        envs = [p[0] for p in make_packets(3, node.identity, problem_type="restart")]
        await publish_from(node, envs)
        await net.settle()
        data_dir = node.store.path.parent
        identity = node.identity
        net.nodes.remove(node)
        await node.stop()
        node.store.close()
        assert (data_dir / "routing.json").exists()

        again = net.make(identity, data_dir)
        await again.start()  # no bootstrap peers: only the saved routing state
        assert await again.bootstrap([]) > 0
        net.nodes.append(again)
        await net.settle()
        assert len(again.peers()) >= 10
        # Others learnt its new address and ask it; it serves its keys.
        other = net.nodes[0]
        contact = other.protocol.router.get(again.node_id)
        assert contact is not None and (contact.ip, contact.port) == again.address
        ok, reply = await other.protocol.call_find_packets(contact, envs[0].key, None)
        assert ok and sorted(reply.packets) == sorted(e.raw for e in envs)
        got = await again.fetch(envs[0].key)
        assert {e.packet_id for e in got} == {e.packet_id for e in envs}

    run(tmp_path, body)


def test_bootstrap_reports_unreachable_and_unresolvable_peers(tmp_path: Path) -> None:
    async def body(net: Network) -> None:
        await net.add(3)
        node = net.make()
        await node.start()
        net.nodes.append(node)
        import socket

        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind(("127.0.0.1", 0))
            silent = s.getsockname()
            reached = await node.bootstrap(
                [("localhost", net.nodes[0].address[1]), silent, ("no-such-host.invalid", 9)]
            )
        assert reached == 1
        unreachable = node.stats()["bootstrap_unreachable"]
        assert f"{silent[0]}:{silent[1]}" in unreachable
        assert "no-such-host.invalid:9" in unreachable

    run(tmp_path, body, DhtConfig(rpc_timeout=0.3))


def test_bootstrap_file_format(tmp_path: Path) -> None:
    path = tmp_path / "bootstrap-nodes.txt"
    path.write_text(
        "# peers\n\n127.0.0.1:8468\nseed.example.org:9000  # a name\n[::1]:8469\n",
        encoding="utf-8",
    )
    assert DhtNode.bootstrap_addresses_from_file(path) == [
        ("127.0.0.1", 8468),
        ("seed.example.org", 9000),
        ("::1", 8469),
    ]
    repo_file = Path(__file__).parent.parent / "bootstrap-nodes.txt"
    assert DhtNode.bootstrap_addresses_from_file(repo_file) == []


def test_listen_registrations_expire_unless_refreshed(tmp_path: Path) -> None:
    async def body(net: Network) -> None:
        holder, follower = await net.add(2)
        key = coarse_key()
        contact = holder.protocol.router.get(holder.node_id) or type(follower.protocol.source_node)(
            holder.node_id, *holder.address
        )
        assert await follower.protocol.call_listen(contact, key)
        assert holder.protocol.listeners(key) == [follower.address]
        lifetime = net.config.listen_seconds
        holder.protocol.clock = lambda: fixed_clock() + lifetime - 1
        assert await follower.protocol.call_listen(contact, key)  # refreshed in time
        holder.protocol.clock = lambda: fixed_clock() + 2 * lifetime - 2
        assert holder.protocol.listeners(key) == [follower.address]
        holder.protocol.clock = lambda: fixed_clock() + 2 * lifetime
        assert holder.protocol.listeners(key) == []
        env = make_packets(1)[0][0]
        assert holder.protocol.push_to_listeners(key, [env]) == 0

    run(tmp_path, body)


def test_bootstrap_says_why_a_peer_did_not_answer(tmp_path: Path) -> None:
    """A closed port (the kernel's ICMP port unreachable) and a silent socket are told apart,
    and a closed port fails well inside the RPC timeout."""
    import socket

    async def body(net: Network) -> None:
        node = net.make()
        await node.start()
        net.nodes.append(node)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as closed:
            closed.bind(("127.0.0.1", 0))
            closed_at = closed.getsockname()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
            silent.bind(("127.0.0.1", 0))
            silent_at = silent.getsockname()
            assert await node.bootstrap([closed_at, silent_at]) == 0
        why = node.stats()["bootstrap_unreachable"]
        assert why[f"127.0.0.1:{closed_at[1]}"] == "port unreachable: nothing listens there"
        assert why[f"127.0.0.1:{silent_at[1]}"].startswith("no answer within 1 s")

    run(tmp_path, body, DhtConfig(rpc_timeout=1.0))


def test_bootstrap_keeps_retrying_an_unreachable_peer_in_the_background(tmp_path: Path) -> None:
    import socket

    async def body(net: Network) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
            node = net.make()
            await node.start()
            net.nodes.append(node)
            upkeep = set(node._tasks)  # republish and expiry loops
            # The peer's port answers nothing yet: bootstrap reports it and keeps trying.
            assert await node.bootstrap([("127.0.0.1", port)]) == 0
        assert f"127.0.0.1:{port}" in node.stats()["bootstrap_unreachable"]
        retries = list(node._tasks - upkeep)
        assert retries
        peer = net.make()
        await peer.start("127.0.0.1", port)  # the peer comes up on that address
        net.nodes.append(peer)
        async with asyncio.timeout(10):
            await asyncio.gather(*retries)
        assert node.stats()["bootstrap_unreachable"] == {}
        assert [p["id"] for p in node.peers()] == [peer.node_id.hex()]

    run(tmp_path, body, DhtConfig(rpc_timeout=0.3))
