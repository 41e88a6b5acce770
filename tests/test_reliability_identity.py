"""Identity and keys: a node id is bound to the key it hashes, and key files are owner-only.

* A host that merely *claims* another node's id (in the sender field of its requests, or in
  contacts it hands out) never gets that id into anyone's routing table: the first contact is a
  signed challenge (``ping``) that only the key's holder can answer.
* A host that *relays* the challenge to the real node and passes its answer back (a man in the
  middle on the path of nobody, just a second host on the network) does not get the id either:
  the proof signs the address the real node saw the challenge come from (the relay's), and the
  challenger accepts only a proof naming its own address.
* ``qisd start`` refuses a key or secret file group or others can read, with a one-line message
  that names the file and the fix, before it opens any socket.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from helpers import clean_env, lone_daemon_argv
from test_dht import Network, run

from qisd.net import wire
from qisd.net.datadir import KEY_FILE, SECRET_FILE, init_identity
from qisd.net.routing import Contact

QISD = Path(sys.executable).with_name("qisd")


class RawPeer(asyncio.DatagramProtocol):
    """A hostile host speaking qisd's wire by hand; it answers nothing unless told to relay."""

    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self.requests: list[tuple[bytes, str, list[Any], tuple]] = []
        self.replies: dict[bytes, asyncio.Future[Any]] = {}
        self.relay_to: tuple | None = None
        self.relayed = 0

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        kind, msg_id, payload = wire.decode_datagram(data)
        if kind == wire.REPLY:
            fut = self.replies.pop(msg_id, None)
            if fut is not None and not fut.done():
                fut.set_result(payload)
            return
        name, args, _token, _flags = wire.split_request(payload)
        self.requests.append((msg_id, name, args, addr))
        if name == "ping" and self.relay_to is not None:
            asyncio.ensure_future(self._relay(msg_id, args, addr))

    async def _relay(self, msg_id: bytes, args: list[Any], asker: tuple) -> None:
        """Forward a challenge to the real node and hand its signed answer back as ours."""
        assert self.relay_to is not None and self.transport is not None
        answer = await self.request(self.relay_to, "ping", args)
        self.relayed += 1
        self.transport.sendto(wire.encode_reply(msg_id, answer), asker)

    async def request(self, addr: tuple, name: str, args: list[Any], timeout: float = 3) -> Any:
        assert self.transport is not None
        msg_id = os.urandom(wire.MSG_ID_BYTES)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.replies[msg_id] = fut
        self.transport.sendto(wire.encode_request(msg_id, name, args), addr)
        async with asyncio.timeout(timeout):
            return await fut


async def raw_peer() -> tuple[RawPeer, tuple[str, int]]:
    loop = asyncio.get_running_loop()
    transport, peer = await loop.create_datagram_endpoint(RawPeer, local_addr=("127.0.0.1", 0))
    return peer, transport.get_extra_info("sockname")[:2]


def test_claiming_another_nodes_id_gets_nowhere(tmp_path: Path) -> None:
    """Requests and contacts naming a victim's id from another address do not move the id."""

    async def body(net: Network) -> None:
        await net.add(6)
        victim, target = net.nodes[0], net.nodes[1]
        await net.settle()
        assert target.protocol.router.get(victim.node_id) is not None
        peer, where = await raw_peer()
        nonce = os.urandom(wire.NONCE_BYTES)
        # 1. Requests whose sender field is the victim's id, from the attacker's address.
        for name, args in (
            ("ping", [victim.node_id, nonce]),
            ("find_node", [victim.node_id, os.urandom(20)]),
            ("find_packets", [victim.node_id, os.urandom(20), None]),
        ):
            await peer.request(target.address, name, args)
        # 2. A contact naming the victim's id at the attacker's address, handed to the target
        #    the way a lookup reply would: the target must verify before it believes it.
        target.protocol.welcome_if_new(Contact(victim.node_id, *where))
        await net.settle()
        for node in net.nodes:
            known = node.protocol.router.get(victim.node_id)
            if node is not victim:
                assert known is not None and (known.ip, known.port) == victim.address
        challenges = [r for r in peer.requests if r[1] == "ping"]
        assert challenges, "the target challenged the claimed address"
        assert target.stats()["rejected"].get("id_changed", 0) + target.stats()["timeouts"] >= 1
        # The challenge the attacker received asks for a signature over the victim's id: it
        # cannot make one (no reply was sent), so the address never entered the table.
        assert all(wire.node_id(args[0]) == target.node_id for _m, _n, args, _a in challenges)
        peer.transport.close()  # type: ignore[union-attr]

    from qisd.config import DhtConfig

    run(tmp_path, body, DhtConfig(rpc_timeout=0.5))


def test_relayed_proof_does_not_move_a_nodes_id_to_another_host(tmp_path: Path) -> None:
    """A second host that forwards challenges to the real node must not take over its id."""

    async def body(net: Network) -> None:
        await net.add(6)
        victim, target = net.nodes[0], net.nodes[1]
        await net.settle()
        peer, where = await raw_peer()
        peer.relay_to = victim.address
        await peer.request(target.address, "ping", [victim.node_id, os.urandom(16)])
        await net.settle()
        known = target.protocol.router.get(victim.node_id)
        assert known is not None
        assert (known.ip, known.port) == victim.address, (
            f"victim's id now routes to the relaying host {where} "
            f"({peer.relayed} challenges relayed)"
        )
        assert peer.relayed >= 1, "the target challenged the relay, which relayed it"
        assert target.stats()["rejected"].get("proof_wrong_address", 0) >= 1
        # The relayed introduction-free requests got the relay nowhere else either.
        assert all((c.ip, c.port) != where for n in net.nodes for c in n.protocol.router.contacts())

    from qisd.config import DhtConfig

    run(tmp_path, body, DhtConfig(rpc_timeout=1.0))


@pytest.mark.parametrize(
    ("name", "mode"), [(KEY_FILE, 0o640), (KEY_FILE, 0o604), (SECRET_FILE, 0o644)]
)
def test_start_refuses_key_files_others_can_read(tmp_path: Path, name: str, mode: int) -> None:
    data_dir = tmp_path / "node"
    init_identity(data_dir)
    os.chmod(data_dir / name, mode)
    proc = subprocess.run(
        [str(QISD), *lone_daemon_argv(data_dir)],
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_env(),
    )
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr  # one line, no traceback
    assert name in lines[0] and "chmod 600" in lines[0], lines[0]
    assert not (data_dir / "control.sock").exists()
    # Tightening the mode is all it takes.
    os.chmod(data_dir / name, 0o600)
    from qisd.net.datadir import load_identity

    assert load_identity(data_dir).node_id


def test_a_node_behind_nat_learns_its_address_from_two_peers_then_binds_proofs(
    tmp_path: Path,
) -> None:
    """A node that does not know the address peers see (a wildcard or private bind, NAT)
    accepts proofs unbound until two distinct peer sources report the same address for it;
    from then on a proof naming another address (a relay's) is refused."""

    async def body(net: Network) -> None:
        node = (await net.add(1))[0]
        proto = node.protocol
        assert proto.own_sources == {f"127.0.0.1|{node.address[1]}"}  # loopback bind: known
        proto.own_sources.clear()  # as if bound to 0.0.0.0 or 10.0.0.5 behind a NAT
        public = ["203.0.113.9", 40_001]  # documentation addresses: no traffic is sent
        assert proto._address_ok(public, ("198.51.100.1", 8468))  # unknown yet: unbound
        assert proto.counters["proof_unbound"] == 1 and not proto.own_sources
        assert proto._address_ok(public, ("198.51.100.1", 9999))  # same source again
        assert not proto.own_sources
        assert proto._address_ok([public[0], 50_000], ("198.51.100.2", 8468))  # NAT port varies
        assert proto.own_sources == {"203.0.113.9"}
        assert proto._address_ok(public, ("198.51.100.3", 8468))
        # A relay at 192.0.2.50: the real node saw the challenge come from the relay.
        assert not proto._address_ok(["192.0.2.50", 8468], ("192.0.2.50", 8468))
        assert node.stats()["rejected"]["proof_wrong_address"] == 1

    run(tmp_path, body)
