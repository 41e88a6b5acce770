"""Hostile traffic at a live node: random and truncated datagrams, well-formed hostile RPCs.

The node must keep answering, leave its store unchanged, raise nothing (no "Task exception was
never retrieved", no handler errors) and count every rejection.
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path
from typing import Any

import umsgpack
from helpers import NOW, make_packets
from test_dht import Network, publish_from, run

from qisd.config import DhtConfig
from qisd.net import wire
from qisd.net.routing import Contact

ROUNDS = 200
PER_ROUND = 25
"""Small rounds: a burst larger than the receive buffer would be dropped by the kernel."""


def hostile_requests(rng: random.Random, key: bytes, raws: list[bytes]) -> list[bytes]:
    """Well-formed datagrams (valid framing) whose RPC name or arguments are hostile."""
    nid = rng.randbytes(20)
    junk_values: list[Any] = [
        None,
        True,
        -1,
        2**64 - 1,
        1.5,
        "text",
        b"",
        b"x" * 19,
        b"x" * 21,
        [],
        [1, 2, 3],
        {"a": 1},
        [[b"x" * 20, "127.0.0.1", 1]] * 50,
    ]
    out: list[Any] = []
    for name in ("ping", "find_node", "store_packets", "find_packets", "listen", "notify"):
        for _ in range(3):
            arity = rng.randrange(0, 5)
            out.append([name, [rng.choice(junk_values) for _ in range(arity)]])
        out.append([name, [nid, rng.choice(junk_values), rng.choice(junk_values)]])
    out += [
        ["rpc_store", [nid, key, b"v"]],  # stock names are not spoken
        ["store", [nid, key, b"v"]],
        ["find_value", [nid, key]],
        ["__init__", []],
        ["_accept_request", [b"m" * 20, ["ping", [nid]], ["127.0.0.1", 1]]],
        ["x" * 5000, []],
        ["ping", [nid, b"n" * 15]],
        ["find_node", [nid, key, "extra"]],
        ["find_packets", [nid, key, -5]],
        ["find_packets", [nid, key, 2**63]],
        ["find_packets", [nid, key, "0"]],
        ["store_packets", [nid, key, [b"\x00"] * 4000]],  # huge list of junk
        ["store_packets", [nid, key, [rng.randbytes(200) for _ in range(30)]]],
        ["store_packets", [nid, rng.randbytes(20), raws[:3]]],  # right packets, wrong key
        ["store_packets", [nid, key, [r[:-1] + bytes([r[-1] ^ 1]) for r in raws[:3]]]],
        ["notify", [nid, key, [rng.randbytes(100)]]],
        ["listen", [nid, rng.randbytes(20)]],
        ["find_node", [nid, {"nested": [[[[[]]]]]}]],
        ["ping"],
        "not a list",
        [b"ping", [nid, b"n" * 16]],
    ]
    msg = rng.randbytes(20)
    return [b"\x00" + msg + umsgpack.packb(item) for item in out]


def random_datagrams(rng: random.Random, valid: list[bytes], count: int) -> list[bytes]:
    out = []
    for _ in range(count):
        choice = rng.random()
        if choice < 0.4:
            data = rng.randbytes(rng.randrange(0, 600))
        elif choice < 0.5:
            data = bytes([rng.choice((0, 1))]) + rng.randbytes(rng.randrange(0, 9000))
        elif choice < 0.9:
            base = rng.choice(valid)
            data = base[: rng.randrange(0, len(base))]
        else:
            base = bytearray(rng.choice(valid))
            for _ in range(rng.randrange(1, 8)):
                base[rng.randrange(len(base))] = rng.randrange(256)
            data = bytes(base)
        out.append(data)
    return out


class Sender(asyncio.DatagramProtocol):
    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        pass


def test_fuzzed_node_keeps_answering_store_unchanged_rejections_counted(tmp_path: Path) -> None:
    config = DhtConfig(rate_limit_per_source=1e9, rate_burst_per_source=10**9)

    async def body(net: Network) -> None:
        loop = asyncio.get_running_loop()
        errors: list[Any] = []
        loop.set_exception_handler(lambda _loop, ctx: errors.append(ctx))
        await net.add(4)
        target, friend = net.nodes[0], net.nodes[1]
        envs = [p[0] for p in make_packets(12)]
        await publish_from(net.nodes[2], envs)
        await net.settle()
        key = envs[0].key
        before = (
            target.store.stats(),
            target.store.keys(),
            target.store.page(key, since=0, max_bytes=1 << 20, now_ms=NOW),
        )
        rng = random.Random(1234)
        nid = friend.node_id
        transport, _ = await loop.create_datagram_endpoint(Sender, local_addr=("127.0.0.1", 0))
        # With the target's address token, data requests reach their handlers (sync and
        # get_packets included) instead of being asked to validate first.
        token = target.protocol.tokens.issue(transport.get_extra_info("sockname")[:2])
        ranges = [[0, b"", 2**63, b"", 0, 0, b"\0" * 12], [0, b"", 5, b"", 1, [b"i" * 16]]]
        valid = [
            wire.encode_request(rng.randbytes(20), "sync", [nid, key, ranges], token),
            wire.encode_request(rng.randbytes(20), "get_packets", [nid, key, [b"i" * 16]], token),
            wire.encode_request(rng.randbytes(20), "find_packets", [nid, key, None], token),
            wire.encode_request(rng.randbytes(20), "ping", [nid, rng.randbytes(16)]),
            wire.encode_request(rng.randbytes(20), "find_node", [nid, key]),
            wire.encode_request(rng.randbytes(20), "find_packets", [nid, key, None]),
            wire.encode_request(rng.randbytes(20), "store_packets", [nid, key, [envs[0].raw]]),
            wire.encode_request(rng.randbytes(20), "listen", [nid, key]),
            wire.encode_reply(rng.randbytes(20), [nid, b"k" * 32, b"s" * 64]),
        ]
        me = Contact(target.node_id, *target.address)
        sent = 0
        for r in range(ROUNDS):
            batch = random_datagrams(rng, valid, PER_ROUND)
            if r % 10 == 0:
                batch += hostile_requests(rng, key, [e.raw for e in envs])
            for data in batch:
                transport.sendto(data, target.address)
            sent += len(batch)
            # A datagram is handled synchronously on arrival: once the friend's ping (sent
            # after the batch) is answered, the batch has been handled.
            ok, _ = await friend.protocol.call_ping(me)
            assert ok, repr((r, target.stats(), friend.stats()))
        transport.close()
        after = (
            target.store.stats(),
            target.store.keys(),
            target.store.page(key, since=0, max_bytes=1 << 20, now_ms=NOW),
        )
        assert after == before
        stats = target.stats()
        counted = sum(stats["malformed"].values()) + sum(stats["rejected"].values())
        assert sent > 4_000 and counted > 0.8 * sent, (sent, stats)
        assert stats["malformed"]["undecodable"] > 100
        assert stats["malformed"]["short"] > 10
        assert stats["malformed"]["unknown_rpc"] >= 5
        assert stats["rejected"]["bad_args"] >= 10
        assert target.protocol.counters["handler_errors"] == 0
        assert target.protocol.counters["task_errors"] == 0
        assert errors == []
        # Its neighbours were not disturbed either: a fetch through the network is whole.
        got = await friend.fetch(key)
        assert {e.packet_id for e in got} == {e.packet_id for e in envs}

    run(tmp_path, body, config)


def test_rate_limit_drops_a_flood_and_serves_others(tmp_path: Path) -> None:
    config = DhtConfig(rate_limit_per_source=50.0, rate_burst_per_source=100)

    async def body(net: Network) -> None:
        loop = asyncio.get_running_loop()
        await net.add(3)
        target, friend = net.nodes[0], net.nodes[1]
        transport, _ = await loop.create_datagram_endpoint(Sender, local_addr=("127.0.0.1", 0))
        rng = random.Random(5)
        for _ in range(10):
            for _ in range(100):
                transport.sendto(
                    wire.encode_request(rng.randbytes(20), "find_node", [rng.randbytes(20)] * 2),
                    target.address,
                )
            ok, _ = await friend.protocol.call_ping(Contact(target.node_id, *target.address))
            assert ok, "another source is still served"
        transport.close()
        stats = target.stats()
        assert stats["rate_limited"] >= 800
        assert stats["rpcs_received"]["find_node"] <= 200

    run(tmp_path, body, config)
