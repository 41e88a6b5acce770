"""Fuzz targets: each takes untrusted bytes and must never fail except as documented.

A target returns normally for input it accepts or refuses the documented way (a PacketError
subclass for envelopes, an error reply for RPCs). Any other exception is a finding: atheris
saves the input, and the input is then added to ``corpus/<target>/`` so that
``tests/test_fuzz.py`` replays it as a regression test forever after.
"""

from __future__ import annotations

from collections.abc import Callable

from qisd.core import packet
from qisd.core.crypto import Identity
from qisd.core.fingerprint import key_for_path
from qisd.errors import PacketError

NOW_MS = 1_767_225_600_000
"""Fixed receiver clock, so a corpus input means the same thing on every run."""


def envelope(data: bytes) -> None:
    """The envelope decoder, single and batched, must agree and only raise PacketError."""
    try:
        single: object = packet.open_envelope(data, now_ms=NOW_MS)
    except PacketError as exc:
        single = exc
    half = len(data) // 2
    batched = packet.open_envelopes([data, data[:half]], now_ms=NOW_MS)
    first = batched[0]
    if isinstance(single, PacketError):
        if type(first) is not type(single):
            raise AssertionError(f"batched decode disagrees: {first!r} vs {single!r}")
    elif first != single:
        raise AssertionError("batched decode returned a different envelope")


_SIGNER = Identity.from_bytes(bytes(range(32)), bytes(32))
_KEY = key_for_path("clinical.oncology/treatment_response")
_FIELDS = ("domain", "problem_type")


def _signed(body: bytes) -> bytes:
    return packet.seal(
        _SIGNER, packet.KIND_PACKET, _KEY, body, fields=_FIELDS, timestamp_ms=NOW_MS
    ).raw


def signed_body(data: bytes) -> None:
    """A hostile peer signs whatever body it likes with its own key: zlib stream as given."""
    if len(data) > packet.MAX_ENVELOPE_BYTES - 200:
        return
    envelope(_signed(data))


def signed_ipc(data: bytes) -> None:
    """Hostile Arrow IPC bytes, compressed the proper way and signed: reaches the IPC reader
    and row validation."""
    body = packet._deflate(data)
    if len(body) > packet.MAX_ENVELOPE_BYTES - 200:
        return
    envelope(_signed(body))


TARGETS: dict[str, Callable[[bytes], None]] = {
    "envelope": envelope,
    "signed_body": signed_body,
    "signed_ipc": signed_ipc,
}


# --------------------------------------------------------------------------- RPC dispatcher
# (appended for issue 7: hostile datagrams into a DHT node, hostile frames into the daemon)

import asyncio  # noqa: E402
import atexit  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

# Imported here, not in the targets, so that run_atheris.py instruments them for coverage.
from kademlia.node import Node as KNode  # noqa: E402

from qisd.config import DhtConfig, NodeConfig, StoreLimits  # noqa: E402
from qisd.net import wire  # noqa: E402
from qisd.net.control import _PREFIX, ControlServer, decode_header  # noqa: E402
from qisd.net.daemon import control_handlers  # noqa: E402
from qisd.net.datadir import init_identity  # noqa: E402
from qisd.net.dht import QisdProtocol, StoreStorage  # noqa: E402
from qisd.net.node import Node  # noqa: E402
from qisd.net.store import Store  # noqa: E402

_SCRATCH: list[str] = []


def _scratch_dir() -> str:
    path = tempfile.mkdtemp(prefix="qisd-fuzz-")
    if not _SCRATCH:
        atexit.register(lambda: [shutil.rmtree(p, ignore_errors=True) for p in _SCRATCH])
    _SCRATCH.append(path)
    return path


class _Recording:
    """A datagram transport that keeps what the node sends."""

    def __init__(self) -> None:
        self.sent: list[tuple[bytes, tuple[Any, ...]]] = []

    def sendto(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self.sent.append((data, addr))

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


_RPC: dict[str, Any] = {}
RPC_SOURCE = ("127.0.0.1", 40_000)
"""The address every fuzzed datagram comes from."""


def _rpc_node() -> dict[str, Any]:
    """One QisdProtocol over a real store (made once per process, reused for every input)."""
    if not _RPC:
        store = Store.open(_scratch_dir(), limits=StoreLimits(), ttl_ms=30 * 86_400_000)
        ident = Identity.from_bytes(bytes(range(1, 33)), bytes(32))

        def clock() -> float:
            return NOW_MS / 1000

        proto = QisdProtocol(
            KNode(ident.dht_id),
            StoreStorage(store, clock),
            20,
            identity=ident,
            config=DhtConfig(rate_limit_per_source=float("inf")),
            clock=clock,
        )
        transport = _Recording()
        proto.connection_made(transport)
        _RPC.update(loop=asyncio.new_event_loop(), proto=proto, store=store, sent=transport.sent)
    return _RPC


def rpc_datagram(data: bytes) -> None:
    """A datagram into a node's RPC dispatcher: it never raises, no handler fails, every reply
    fits one datagram, and the store changes only by envelopes it reports it accepted."""
    rpc = _rpc_node()
    proto, store, sent = rpc["proto"], rpc["store"], rpc["sent"]
    before = store.stats()
    stored_before = proto.counters["stored_packets"]
    errors_before = proto.counters["handler_errors"]

    async def deliver() -> None:
        # A source that proved it receives (an on-path peer): data requests reach their
        # handlers. (Unvalidated sources are held to small replies: test_dataplane.)
        proto._validate(RPC_SOURCE)
        proto.datagram_received(data, RPC_SOURCE)
        # Work it started in the background (verifying the sender, hand-off, notifies) talks
        # to a peer that never answers: end it now so inputs stay independent.
        while proto._tasks:
            tasks = list(proto._tasks)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for msg_id in list(proto._outstanding):
            proto._timeout(msg_id)
        proto.router.cancel()

    rpc["loop"].run_until_complete(deliver())
    if proto.counters["handler_errors"] != errors_before:
        raise AssertionError("an RPC handler raised on this input")
    if proto.counters["task_errors"]:
        raise AssertionError("a background task raised on this input")
    if proto.counters["stored_packets"] == stored_before and store.stats() != before:
        raise AssertionError("the store changed although nothing was accepted")
    for out, _addr in sent:
        if len(out) > wire.HEADER_BYTES + wire.MAX_DATAGRAM_BYTES:
            raise AssertionError(f"a reply of {len(out)} bytes does not fit one datagram")
        wire.decode_datagram(out)  # the node only sends what it can parse itself
    sent.clear()


# --------------------------------------------------------------------------- control socket


class _Writer:
    """Stands in for an asyncio.StreamWriter: keeps the reply bytes."""

    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, data: bytes) -> None:
        self.data += data

    async def drain(self) -> None:
        return None

    def close(self) -> None:
        return None

    async def wait_closed(self) -> None:
        return None


_CTL: dict[str, Any] = {}


def _control_server() -> dict[str, Any]:
    """A daemon's control handlers over a real node without network (made once per process)."""
    if not _CTL:
        data_dir = Path(_scratch_dir()) / "node"
        init_identity(data_dir)
        loop = asyncio.new_event_loop()
        config = NodeConfig(data_dir=str(data_dir), bootstrap_file=os.devnull)
        node = loop.run_until_complete(Node.open(config, network=False))
        box: dict[str, Any] = {}
        handlers, streams = control_handlers(node, lambda: box.get("server"), lambda: None)
        server = ControlServer(data_dir / "control.sock", handlers, streams)
        box["server"] = server
        _CTL.update(loop=loop, node=node, server=server)
    return _CTL


def control_frame(data: bytes) -> None:
    """Bytes from a client into the daemon's control connection handler: it answers with
    well-formed frames, never with an internal error, and never raises but for a hang-up."""
    ctl = _control_server()
    server = ctl["server"]
    writer = _Writer()

    async def serve() -> None:
        reader = asyncio.StreamReader()
        reader.feed_data(data)
        reader.feed_eof()
        task = asyncio.current_task()
        assert task is not None
        try:
            await server._connection(task, reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the client hung up mid-frame: the server drops the connection
        finally:
            server._idle.pop(task, None)

    ctl["loop"].run_until_complete(serve())
    out = bytes(writer.data)
    while out:
        header_len, blob_len = _PREFIX.unpack(out[: _PREFIX.size])
        header = decode_header(out[_PREFIX.size : _PREFIX.size + header_len])
        out = out[_PREFIX.size + header_len + blob_len :]
        if header.get("ok") is False:
            error = header.get("error", {})
            if error.get("type") == "InternalError":
                raise AssertionError(f"the daemon failed internally: {error}")
        elif header.get("ok") is not True:
            raise AssertionError(f"malformed reply header {header!r}")


TARGETS.update({"rpc_datagram": rpc_datagram, "control_frame": control_frame})
