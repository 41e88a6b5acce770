"""qisd's Kademlia DHT: kademlia's classes, subclassed, storing many signed packets per key.

Layers, each a subclass of the ``kademlia``/``rpcudp`` class it replaces:

* :class:`QisdProtocol` (``KademliaProtocol``, hence ``rpcudp.RPCProtocol``): the wire with the
  C msgpack codec, explicit RPC stubs (no ``__getattr__`` network calls), per-source token
  buckets, replies accepted only from the address the request went to, every bad datagram
  counted and dropped. RPCs: ``ping`` (a signed challenge: proof of key possession),
  ``find_node``, ``store_packets``, ``find_packets``, ``listen`` and ``notify``.
* :class:`QisdRoutingTable` (``qisd.net.routing``) and the crawls of ``qisd.net.crawl``.
* :class:`DhtServer` (``kademlia.network.Server`` with ``protocol_class`` and ``storage=``).
* :class:`DhtNode`: the API the daemon uses (start, bootstrap, publish, fetch, follow, stop).

Every numbered defect of ``kademlia-defects.md`` is fixed here or in the modules above; the
docstring of each override names the defect, and ``tests/test_defects.py`` has a test per number.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import heapq
import ipaddress
import logging
import math
import os
import random
import socket
import sys
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import pyarrow as pa
from kademlia.network import Server
from kademlia.node import Node
from kademlia.protocol import KademliaProtocol
from kademlia.storage import IStorage
from rpcudp.protocol import RPCProtocol

from qisd.config import DhtConfig
from qisd.core import reconcile
from qisd.core.crypto import PUBLIC_KEY_BYTES, SIGNATURE_BYTES, Identity, dht_id_for, verify
from qisd.core.lookup import smoothed_rtt
from qisd.core.lookup import stall_after as lookup_stall_after
from qisd.core.packet import (
    KIND_PACKET,
    MAX_FUTURE_MS,
    RESULT_SCHEMA,
    Envelope,
    open_envelope,
    read_trusted,
    with_provenance,
)
from qisd.errors import PacketError, QisdError, UsageError
from qisd.net import wire
from qisd.net.crawl import NodeCrawl, PacketCrawl
from qisd.net.datadir import read_json, write_json_atomic
from qisd.net.pacing import BACKGROUND, FOREGROUND, Pacer
from qisd.net.routing import Contact, QisdRoutingTable
from qisd.net.sync import FetchResult, ReplicaSync
from qisd.net.wire import (
    BUSY,
    MAX_ENVELOPES_PER_REQUEST,
    RATE_LIMITED,
    REQUEST_OVERHEAD,
    batches_within,
)
from qisd.net.wire import envelope_id as _envelope_id

log = logging.getLogger(__name__)

_HELLO_TAG = b"qisd/hello/2\x00"
"""Proofs of key possession sign the nonce, both ids and the address the challenge came from."""
MAX_SEEN_VOTES = 256
"""Addresses peers reported seeing this node at, remembered for confirming its own address."""
CONFIRM_VOTES = 2
"""Distinct peer sources that must report the same address before it counts as this node's."""
_INTRO_TAG = b"qisd/intro\x00"
INTRO_WINDOW_MS = MAX_FUTURE_MS + 60_000
"""A request's signed introduction is accepted this far from the receiver's clock: the packet
clock tolerance (two nodes within +-2.5 minutes of true time) plus a minute for delivery."""
MAX_INTRODUCED = 100_000
STATE_VERSION = 1
MAX_LISTENERS_PER_KEY = 64
MAX_LISTENED_KEYS = 4_096
MAX_PENDING_VERIFICATIONS = 256
REPLY_CONTACTS_BYTES = 40
"""Upper bound of one packed contact triple (id, IPv4/IPv6 text, port) in a reply."""
PROOF_BYTES = 176
"""A reply's proof of key possession: public key, signature and the address seen, packed."""
LISTEN_FANOUT = 4
"""A follower registers with this many of a key's closest holders."""
MAX_HANDED_OFF = 100_000
MAX_PEER_KEYS = 8_192
"""Public keys of proven ids remembered (a routing table holds at most 160 x k contacts)."""
RECEIVE_BUFFER_BYTES = 4 << 20
IP_RECVERR = 11
IPV6_RECVERR = 25
"""Linux socket options (not in Python's socket module): queue ICMP errors on the socket."""
MAX_ICMP_PER_WAKE = 64
MAX_VALIDATED = 65_536
VALIDATED_SECONDS = 600.0
"""An address that answered one of our requests (or echoed our token) counts as validated this
long: large replies, pages and pushes may go to it."""
BUSY_REPLIES_PER_SECOND = 50.0
"""Busy replies one source can draw a second; past that its excess requests are dropped."""
MAX_SYNC_RANGES = 512
MAX_SYNC_IDS = 4_096
MAX_IDS_PER_GET = 256
SYNC_WORKERS = 4
"""Replica reconciliations (hand-off, anti-entropy) running at once, all peers together."""
MAX_SYNC_JOBS = 1_000_000
PROBE_PEERS = 3
"""Peers a reachability check asks for a dial-back, at most (it stops at the first that
arrives, or at the second that does not)."""
_CAUSES = {
    errno.ECONNREFUSED: "port unreachable: nothing listens there",
    errno.EHOSTUNREACH: "host unreachable",
    errno.ENETUNREACH: "no route to its network",
    errno.EACCES: "refused by a firewall (ICMP administratively prohibited)",
    errno.EPERM: "refused by a local firewall",
}
"""What a failed call's errno says to an operator."""
_QUEUE_FULL = {errno.ENOBUFS, errno.EAGAIN, errno.EWOULDBLOCK}
"""A send refused for this host's own lack of room, not for anything the peer did."""
SEND_RETRIES = 5
SEND_RETRY_SECONDS = 0.02
"""A datagram this host's full queue refused goes again after 20, 40, ... 320 ms."""
NO_REPLY = object()
"""A handler's answer that sends nothing back (a dial-back is not answered)."""
LIVENESS_SECONDS = 60.0
"""A contact not heard from for this long is pinged by the upkeep loop before it is trusted
again; one that failed its last call is never handed out in a ``find_node`` reply."""
UPKEEP_SECONDS = 5.0
"""The upkeep tick: liveness pings and one round of periodic anti-entropy."""
ANTI_ENTROPY_KEYS = 32
"""Keys reconciled per upkeep tick with one random co-holder each (periodic anti-entropy)."""
LIVENESS_PINGS = 16
"""Stale contacts pinged per upkeep tick."""
MAX_CACHED_ITEM_SETS = 256
EXCHANGE_BUSY_WAITS = 3
"""A call a peer answers *busy* is sent again after the wait it asked for, this many times,
before the caller is told (lookups then move on; background work retries on its own)."""
REPUBLISH_KEYS = 32
"""Keys a republish works on at once."""


@dataclass(frozen=True)
class _Request:
    """What a handler knows of the datagram it answers."""

    addr: tuple
    size: int
    validated: bool
    client: bool = False
    """The sender said it is not reachable from outside (``wire.CLIENT``): answer, never add."""


def _spawn_into(
    tasks: set[asyncio.Task[Any]], counters: Counter[str], coro: Any, level: int
) -> asyncio.Task[Any]:
    """Run ``coro`` in the background, referenced in ``tasks`` until it ends (so it is never
    garbage-collected mid-flight); a failure is counted as ``task_errors`` and logged."""
    task = asyncio.ensure_future(coro)
    tasks.add(task)

    def done(task: asyncio.Task[Any]) -> None:
        tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            counters["task_errors"] += 1
            log.log(level, "DHT background task failed: %r", task.exception())

    task.add_done_callback(done)
    return task


def _now_ms(clock: Callable[[], float]) -> int:
    return int(clock() * 1000)


def _reason(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text[:96]


def _counter_name(exc: BaseException) -> str:
    return type(exc).__name__


def _valid_seen(value: Any) -> bool:
    """An address field of a proof: [host text, port]."""
    return (
        isinstance(value, list)
        and len(value) == 2
        and isinstance(value[0], str)
        and len(value[0]) <= 64
        and type(value[1]) is int
        and 0 <= value[1] < 65536
    )


def _packed_seen(seen: list[Any]) -> bytes:
    return msgpack.packb([seen[0], seen[1]])


# --------------------------------------------------------------------------- replies


@dataclass(frozen=True)
class FindPacketsReply:
    """One page of a ``find_packets`` reply."""

    nodes: list[Node]
    packets: list[bytes]
    cursor: int | None
    more: bool


@dataclass(frozen=True)
class StoreReply:
    """A ``store_packets`` reply: packet ids accepted, already held, and refused with reasons."""

    accepted: list[str]
    duplicates: list[str]
    refused: list[tuple[str, str]]
    limited: int = 0
    """Envelopes refused only because the sender was past its rate (send them again later)."""
    retry_after: float = 0.0
    """Seconds the receiver asked the sender to wait before sending those again."""


@dataclass
class PublishResult:
    """What :meth:`DhtNode.publish` achieved.

    ``replicas[packet_id]`` counts the remote nodes that hold the packet after the call (they
    accepted it, or already had it); ``refused[packet_id]`` lists remote refusal reasons.
    """

    replicas: dict[str, int] = field(default_factory=dict)
    refused: dict[str, list[str]] = field(default_factory=dict)
    contacted: int = 0
    """Nodes asked to store (the k closest found for each key)."""
    messages: int = 0
    """RPCs sent by this publish (lookups and stores)."""

    @property
    def min_replicas(self) -> int:
        """The fewest replicas any published packet reached (0 if none were published)."""
        return min(self.replicas.values(), default=0)


# --------------------------------------------------------------------------- storage adapter


class StoreStorage(IStorage):
    """kademlia's ``IStorage`` over qisd's :class:`~qisd.net.store.Store` (``Server(storage=)``).

    A key maps to the list of raw envelopes held under it. Writes verify every envelope (defect
    4: no unauthenticated, last-writer-wins values), so stock code paths cannot store junk.
    """

    def __init__(self, store: Any, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.clock = clock

    def raws(self, key: bytes) -> list[bytes]:
        """Every unexpired raw envelope under ``key``."""
        out: list[bytes] = []
        cursor = 0
        while True:
            page, cursor, more = self.store.page(
                key, since=cursor, max_bytes=1 << 20, now_ms=_now_ms(self.clock)
            )
            out.extend(page)
            if not more:
                return out

    def __setitem__(self, key: bytes, value: bytes | Sequence[bytes]) -> None:
        raws = [value] if isinstance(value, bytes) else list(value)
        now = _now_ms(self.clock)
        envs = [open_envelope(raw, now_ms=now, expected_key=key) for raw in raws]
        self.store.put(envs, now_ms=now)

    def __getitem__(self, key: bytes) -> list[bytes]:
        found = self.raws(key)
        if not found:
            raise KeyError(key)
        return found

    def get(self, key: bytes, default: Any = None) -> Any:
        return self.raws(key) or default

    def iter_older_than(self, seconds_old: float) -> list[tuple[bytes, list[bytes]]]:
        """This node's own envelopes by key (the only ones qisd republishes, defect 13)."""
        by_key: dict[bytes, list[bytes]] = {}
        for env in self.store.own_envelopes(now_ms=_now_ms(self.clock)):
            by_key.setdefault(env.key, []).append(env.raw)
        return list(by_key.items())

    def __iter__(self) -> Iterator[tuple[bytes, list[bytes]]]:
        for key, _count in self.store.keys():  # noqa: SIM118 (a Store, not a dict)
            yield key, self.raws(key)


# --------------------------------------------------------------------------- protocol


class QisdProtocol(KademliaProtocol):
    """The qisd wire protocol (see the module docstring)."""

    def __init__(
        self,
        source_node: Node,
        storage: StoreStorage,
        ksize: int,
        *,
        identity: Identity,
        config: DhtConfig,
        clock: Callable[[], float] = time.time,
    ) -> None:
        RPCProtocol.__init__(self, wait_timeout=config.rpc_timeout)
        self.source_node = source_node
        self.storage = storage
        self.store = storage.store
        self.identity = identity
        self.config = config
        self.clock = clock
        self.ksize = ksize
        self.router = QisdRoutingTable(
            self,
            ksize,
            source_node,
            evict_after=config.evict_after_failures,
            check_head=self._head_alive,
            on_evict=self._evicted,
            clock=clock,
        )
        self.limiter = wire.TokenBuckets(config.rate_limit_per_source, config.rate_burst_per_source)
        self.max_datagram = min(config.max_datagram_bytes, wire.MAX_DATAGRAM_BYTES)
        self.counters: Counter[str] = Counter()
        self.tokens = wire.AddressTokens()
        self.pacer = Pacer(target_rtt=config.rpc_timeout / 4)
        self.busy_limiter = wire.TokenBuckets(BUSY_REPLIES_PER_SECOND, int(BUSY_REPLIES_PER_SECOND))
        self._validated: OrderedDict[tuple, float] = OrderedDict()
        self._peer_tokens: OrderedDict[tuple, bytes] = OrderedDict()
        self._items: OrderedDict[bytes, tuple[int, reconcile.ItemSet, float]] = OrderedDict()
        self._meters: dict[bytes, list[int]] = {}
        self.sync = ReplicaSync(self, workers=SYNC_WORKERS, max_jobs=MAX_SYNC_JOBS)
        self._returning: set[bytes] = set()
        self.srtt = 0.0
        self.family = socket.AF_INET
        self.dual_stack = False
        self._outstanding: dict[bytes, tuple[asyncio.Future[Any], asyncio.Handle, tuple]] = {}
        self._sent_at: dict[bytes, float] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._verifying: set[bytes] = set()
        self._handed_off: OrderedDict[bytes, None] = OrderedDict()
        self._introduced: OrderedDict[bytes, None] = OrderedDict()
        self._intro_nonces: OrderedDict[bytes, int] = OrderedDict()
        self._listeners: dict[bytes, dict[tuple, tuple[bytes, float]]] = {}
        self.on_notify: Callable[[bytes, list[Envelope]], None] | None = None
        self.on_stored: Callable[[bytes, int], None] | None = None
        self.closed = False
        self.own_sources: set[str] = set()
        """Sources (``wire.source_of``) this node knows as its own address: proofs must name one."""
        self._seen_votes: OrderedDict[str, set[str]] = OrderedDict()
        self.loopback_bind = False
        self._causes: OrderedDict[tuple, str] = OrderedDict()
        self._sending: tuple | None = None
        self._send_again = False
        self._sent_again = False
        self._queue_full = False
        self.reachability = "unknown"
        """``public`` (a dial-back from a peer's fresh socket reached us, or the bind is
        loopback), ``unreachable`` (dial-backs did not arrive: behind NAT or a firewall) or
        ``unknown`` (not checked yet). Anything but public runs in client mode: requests carry
        ``wire.CLIENT`` and receivers do not add this node to their routing tables."""
        self.public_address: tuple[str, int] | None = None
        """This node's address as peers see it (from a probe's reply; the bind if loopback)."""
        self._probes: dict[bytes, asyncio.Future[tuple]] = {}
        self.peer_keys: OrderedDict[bytes, bytes] = OrderedDict()
        """Public keys of ids that proved holding them (so peers can be shown by node id)."""
        self._handlers: dict[str, Callable[[_Request, list[Any]], Any]] = {
            "ping": self._rpc_ping,
            "find_node": self._rpc_find_node,
            "store_packets": self._rpc_store_packets,
            "find_packets": self._rpc_find_packets,
            "listen": self._rpc_listen,
            "notify": self._rpc_notify,
            "sync": self._rpc_sync,
            "get_packets": self._rpc_get_packets,
            "probe": self._rpc_probe,
            "dial_back": self._rpc_dial_back,
        }

    def __getattr__(self, name: str) -> Any:
        """No magic: a misspelt attribute is an AttributeError, never a network call."""
        raise AttributeError(f"{type(self).__name__!s} has no attribute {name!r}")

    # -- addresses (defect 15)

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self._errors: socket.socket | None = None
        raw = transport.get_extra_info("socket")
        if raw is not None and hasattr(socket, "MSG_ERRQUEUE"):
            # A second handle on the same socket, to read its ICMP error queue (the loop's
            # transport socket offers no recvmsg).
            with contextlib.suppress(OSError):
                self._errors = socket.socket(fileno=os.dup(raw.fileno()))
                self._errors.setblocking(False)
        sockname = transport.get_extra_info("sockname")
        with contextlib.suppress(TypeError, ValueError, IndexError):
            ip = ipaddress.ip_address(self._peer_host(sockname))
            # A wildcard or private bind says nothing of the address peers see (NAT): the node
            # learns that from peers' proofs instead (see _address_ok).
            if ip.is_loopback or ip.is_global:
                self.own_sources.add(wire.source_of(sockname))
            if ip.is_loopback:
                # Loopback peers reach a loopback bind by definition: nothing to probe.
                self.loopback_bind = True
                self.reachability = "public"
                self.public_address = (self._peer_host(sockname), int(sockname[1]))
        sock = transport.get_extra_info("socket")
        if sock is not None:
            self.family = sock.family
            if sock.family == socket.AF_INET6:
                with contextlib.suppress(OSError):
                    v6only = sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY)
                    self.dual_stack = not v6only

    def _peer_host(self, addr: tuple) -> str:
        """A sender's host as contacts store it (IPv4-mapped IPv6 shown as IPv4)."""
        host = addr[0]
        if host.startswith("::ffff:") and "." in host:
            return host[7:]
        return host

    def send_address(self, host: str | None, port: int | None) -> tuple | None:
        """The socket address for a contact, or None if this socket cannot reach it."""
        if host is None or port is None:
            return None
        version = wire.ip_version(host)
        if version is None:
            return None
        if self.family == socket.AF_INET:
            return (host, port) if version == 4 else None
        if version == 6:
            return (host, port)
        return (f"::ffff:{host}", port) if self.dual_stack else None

    def reachable(self, node: Node) -> bool:
        """True if this socket's address family can reach ``node``."""
        return self.send_address(node.ip, node.port) is not None

    # -- receiving (defect 8)

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        """Decode and dispatch one datagram; bad input is counted and dropped, never raised."""
        self.counters["bytes_received"] += len(data)
        try:
            kind, msg_id, payload = wire.decode_datagram(data)
        except wire.WireError as exc:
            self.counters[f"malformed.{exc.args[0]}"] += 1
            return
        if kind == wire.REPLY:
            self._accept_response(msg_id, payload, addr, len(data))
            return
        try:
            name, args, token, flags = wire.split_request(payload)
        except wire.WireError as exc:
            self.counters[f"malformed.{exc.args[0]}"] += 1
            return
        handler = self._handlers.get(name)
        if handler is None:
            self.counters["malformed.unknown_rpc"] += 1
            return
        where = (addr[0], addr[1])
        # Only a token proves this request came from where it says: an address that answered
        # us before could be spoofed by anyone off-path, so it earns small replies only (the
        # busy reply, never larger than the request).
        validated = self.tokens.valid(where, token)
        if validated:
            self._validate(where)
        source = wire.source_of(addr)
        if not self.limiter.allow(source):
            self.counters["rate_limited"] += 1
            known = validated or self.is_validated(where)
            self._busy(msg_id, addr, source, known, 1.0 / max(1e-3, self.limiter.rate))
            return
        self.counters[f"received.{name}"] += 1
        try:
            reply = handler(_Request(where, len(data), validated, bool(flags & wire.CLIENT)), args)
        except wire.WireError as exc:
            self.counters[f"rejected.{exc.args[0]}"] += 1
            return
        except Exception:  # a handler bug must not kill the socket; count and log it
            self.counters["handler_errors"] += 1
            log.debug("handler %s failed for %s", name, addr, exc_info=True)
            return
        if reply is NO_REPLY:
            return
        self._reply(msg_id, reply, addr, None if validated else len(data))

    def _busy(
        self, msg_id: bytes, addr: tuple, source: str, validated: bool, retry_after: float
    ) -> None:
        """Tell a validated requester we cannot serve it now (never larger than its request);
        others, and a source that keeps on past its share of busy replies, get silence."""
        if not validated or not self.busy_limiter.allow(source):
            return
        self.counters["busy_sent"] += 1
        wait_ms = max(10, min(int(retry_after * 1000), 5_000))
        self._reply(msg_id, {"busy": wait_ms}, addr, None)

    def is_validated(self, where: tuple) -> bool:
        """True if ``where`` is known to receive what is sent to it (see :meth:`_validate`)."""
        until = self._validated.get(where)
        return until is not None and until > time.monotonic()

    def _validate(self, where: tuple) -> None:
        """``where`` answered a request of ours, or echoed our token: it is no spoofed source."""
        self._validated.pop(where, None)
        self._validated[where] = time.monotonic() + VALIDATED_SECONDS
        while len(self._validated) > MAX_VALIDATED:
            self._validated.popitem(last=False)

    def connection_lost(self, exc: Exception | None) -> None:
        """The socket is gone: so is the second handle on it (it would keep the port open)."""
        errors = getattr(self, "_errors", None)
        if errors is not None:
            errors.close()
            self._errors = None

    def error_received(self, exc: Exception) -> None:
        """The kernel reported an ICMP error: every call outstanding to the address it names
        fails now (as a timeout would, counted ``icmp_unreachable``), not after the timeout.

        Linux also returns an earlier datagram's ICMP error from the *next* ``sendto``,
        whatever its destination, so a failed send says nothing of its own peer at first: the
        error queue is read (it names the address each error belongs to) and the datagram goes
        again at once (:meth:`_send`). Only a send that fails again straight away with "no
        route to the network" failed for itself: its calls fail now, with the cause; any other
        error may still be another datagram's, so the call waits for its reply or timeout. A
        send refused for this host's own lack of room (ENOBUFS) is paced, never failed.
        """
        sending = self._sending
        failed_send = sending is not None and isinstance(exc, OSError) and bool(exc.errno)
        if failed_send and getattr(exc, "errno", None) in _QUEUE_FULL:
            self._queue_full = True  # this host's own queue or socket buffer: see _send
            return
        self._read_error_queue()
        if not failed_send or sending is None:
            return
        if not self._sent_again:
            self._send_again = True
            return
        code = getattr(exc, "errno", 0) or 0
        self.counters["send_errors"] += 1
        if code == errno.ENETUNREACH:
            # No route to the destination's network: only this send can have caused it.
            self._failed_because(sending, code)
            self._fail_calls_to((sending[0], sending[1]))
        # Anything else may still be another datagram's error (a burst of ICMP host
        # unreachables while ARP fails, say): the call waits for its reply or its timeout.

    def _read_error_queue(self) -> int:
        """Fail the calls each queued ICMP error names, with its cause; how many were read."""
        errors = getattr(self, "_errors", None)
        if errors is None:
            return 0
        read = 0
        for _ in range(MAX_ICMP_PER_WAKE):
            try:
                _data, anc, _flags, addr = errors.recvmsg(1, 512, socket.MSG_ERRQUEUE)
            except OSError:  # BlockingIOError: the queue is empty
                return read
            read += 1
            if not isinstance(addr, tuple) or len(addr) < 2:
                continue
            self.counters["icmp_unreachable"] += 1
            where = (addr[0], addr[1])
            # sock_extended_err begins with the errno (ECONNREFUSED for port unreachable).
            code = next((int.from_bytes(d[:4], sys.byteorder) for _l, _t, d in anc if d[3:]), 0)
            self._failed_because(where, code)
            self._fail_calls_to(where)
        return read

    def _fail_calls_to(self, where: tuple) -> None:
        for msg_id, (_future, _timer, expected) in list(self._outstanding.items()):
            if (expected[0], expected[1]) == where:
                self._timeout(msg_id)

    def _failed_because(self, where: tuple, code: int) -> None:
        """Remember why sending to ``where`` failed (an errno from ICMP or from sendto)."""
        self._causes.pop(where, None)
        self._causes[where] = _CAUSES.get(code, os.strerror(code) if code else "ICMP error")
        while len(self._causes) > MAX_VALIDATED:
            self._causes.popitem(last=False)

    def failure_cause(self, address: tuple | None) -> str | None:
        """Why the last call to ``address`` failed, when the kernel said (port unreachable,
        no route); None when it did not (no answer: a silent host or a dropping firewall)."""
        if address is None:
            return None
        return self._causes.get((address[0], address[1]))

    def _reply(self, msg_id: bytes, value: Any, addr: tuple, request_bytes: int | None) -> None:
        """Send a reply; to an unvalidated address (``request_bytes`` given) with our token and
        at most :data:`wire.AMPLIFICATION_FACTOR` times the request's bytes."""
        if request_bytes is not None:
            token = self.tokens.issue((addr[0], addr[1]))
            if isinstance(value, dict):
                value["token"] = token
            elif isinstance(value, list):
                value = [*value, token]
        data = wire.encode_reply(msg_id, value)
        if request_bytes is not None and len(data) > wire.AMPLIFICATION_FACTOR * request_bytes:
            # Handlers size their replies to fit; this is a last guard: only the token goes.
            self.counters["unvalidated_replies_cut"] += 1
            data = wire.encode_reply(msg_id, self._validate_first(addr))
        if len(data) - wire.HEADER_BYTES > self.max_datagram:
            # Handlers size replies to fit; this is a last guard (defect 6).
            self.counters["reply_too_large"] += 1
            data = wire.encode_reply(msg_id, {"error": "reply too large"})
        if self.transport is not None and not self.closed:
            self.counters["bytes_sent"] += len(data)
            self._send(data, addr, None)

    def _send(self, data: bytes, address: tuple, msg_id: bytes | None, attempt: int = 0) -> None:
        """Put one datagram on the socket. A send the kernel refused because this host's own
        queue is full (ENOBUFS: a slow uplink) is no failure of the peer: the node's pacing
        budget is cut and the datagram goes again after a short wait, while its call (by
        ``msg_id``; a reply has none) is still waiting. A send that failed for an earlier
        datagram's queued ICMP error (Linux reports it on the next send) goes again at once."""
        if self.transport is None or self.closed:
            return
        if msg_id is not None and msg_id not in self._outstanding:
            return  # answered or timed out meanwhile
        self._sending = address
        try:
            self.transport.sendto(data, address)
            if self._send_again:  # an earlier datagram's ICMP error, most likely: once more
                self._send_again = False
                self._sent_again = True
                self.counters["sent_again"] += 1
                self.transport.sendto(data, address)
        finally:
            self._sending = None
            self._send_again = self._sent_again = False
        if self._queue_full:
            self._queue_full = False
            self.counters["send_queue_full"] += 1
            self.pacer.local_loss()
            if attempt < SEND_RETRIES:
                asyncio.get_running_loop().call_later(
                    SEND_RETRY_SECONDS * 2**attempt, self._send, data, address, msg_id, attempt + 1
                )

    def _validate_first(self, addr: tuple) -> dict[str, Any]:
        """The whole reply to a data request from an unvalidated address: our token, to echo."""
        self.counters["validation_requests_sent"] += 1
        return {"validate": True, "token": self.tokens.issue((addr[0], addr[1]))}

    def _accept_response(self, msg_id: bytes, data: Any, address: tuple, size: int = 0) -> None:
        entry = self._outstanding.get(msg_id)
        if entry is None:
            self.counters["malformed.unexpected_reply"] += 1
            return
        future, timer, expected = entry
        if (address[0], address[1]) != expected[:2]:
            self.counters["malformed.reply_wrong_address"] += 1
            return
        del self._outstanding[msg_id]
        timer.cancel()
        self._validate((address[0], address[1]))
        meter = self._meters.pop(msg_id, None)
        if meter is not None:
            meter[0] += size
        sent = self._sent_at.pop(msg_id, None)
        if sent is not None:
            rtt = time.monotonic() - sent
            self.srtt = smoothed_rtt(self.srtt, rtt)
        if not future.done():
            future.set_result((True, data))

    def _timeout(self, msg_id: bytes) -> None:
        """A call got no reply in time; tolerate a future already cancelled (defect 9)."""
        entry = self._outstanding.pop(msg_id, None)
        self._sent_at.pop(msg_id, None)
        self._meters.pop(msg_id, None)
        if entry is None:
            return
        self.counters["timeouts"] += 1
        self.pacer.timed_out(entry[2][:2])
        if not entry[0].done():
            entry[0].set_result((False, None))

    def _forget(self, msg_id: bytes) -> None:
        entry = self._outstanding.pop(msg_id, None)
        self._sent_at.pop(msg_id, None)
        self._meters.pop(msg_id, None)
        if entry is not None:
            entry[1].cancel()

    def stall_after(self) -> float:
        """Seconds after which a lookup stops waiting on a call (a few smoothed RTTs)."""
        return lookup_stall_after(self.srtt, self.config.rpc_timeout)

    def suspect(self, node_id: bytes) -> bool:
        """True if the last call to this contact failed: lookups ask it but never wait on it."""
        return self.router.suspect(node_id)

    # -- sending: explicit stubs

    def _call(
        self, address: tuple | None, name: str, args: list[Any], meter: list[int] | None = None
    ) -> asyncio.Future[Any]:
        """Send a request; a future of (replied, reply). ``meter`` ([bytes, messages]) adds
        the reply's datagram bytes and one message when a reply comes."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        if address is None or self.transport is None or self.closed:
            self.counters["unreachable"] += 1
            future.set_result((False, None))
            return future
        msg_id = os.urandom(wire.MSG_ID_BYTES)
        token = self._peer_tokens.get((address[0], address[1]))
        data = wire.encode_request(
            msg_id, name, args, token, wire.CLIENT if self.client_mode else 0
        )
        if len(data) - wire.HEADER_BYTES > self.max_datagram:
            self.counters["request_too_large"] += 1
            future.set_result((False, None))
            return future
        self.counters[f"sent.{name}"] += 1
        self.counters["bytes_sent"] += len(data)
        timer = loop.call_later(self._wait_timeout, self._timeout, msg_id)
        self._outstanding[msg_id] = (future, timer, address)
        if meter is not None:
            meter[1] += 1
            self._meters[msg_id] = meter
        self._sent_at[msg_id] = time.monotonic()
        future.add_done_callback(lambda _f: self._forget(msg_id))
        self._causes.pop((address[0], address[1]), None)
        self._send(data, address, msg_id)
        return future

    def _address(self, node: Node) -> tuple | None:
        return self.send_address(node.ip, node.port)

    def _me(self, to: bytes | None) -> Any:
        """The sender field of a request to ``to``: our id, or a signed introduction.

        Until ``to`` has answered one introduced request, requests carry
        ``[id, public_key, time_ms, nonce, sig(tag, id, to, time_ms, nonce)]``: proof that we
        hold the key our id hashes, so the receiver can add us without pinging back.
        """
        me = self.source_node.id
        if to is None or to in self._introduced:
            return me
        ts = _now_ms(self.clock)
        nonce = os.urandom(wire.NONCE_BYTES)
        sig = self.identity.sign(_INTRO_TAG + me + to + ts.to_bytes(8, "big") + nonce)
        return [me, self.identity.public_key, ts, nonce, sig]

    def _introduce(self, future: asyncio.Future[Any], to: bytes, args: list[Any]) -> None:
        if not isinstance(args[0], list) or future.cancelled() or not future.result()[0]:
            return
        self._introduced[to] = None
        while len(self._introduced) > MAX_INTRODUCED:
            self._introduced.popitem(last=False)

    def _request(
        self, address: tuple | None, name: str, to: bytes | None, rest: list[Any]
    ) -> asyncio.Future[Any]:
        return self._introduced_request(address, name, to, rest)[0]

    def _introduced_request(
        self,
        address: tuple | None,
        name: str,
        to: bytes | None,
        rest: list[Any],
        meter: list[int] | None = None,
    ) -> tuple[asyncio.Future[Any], bytes | None]:
        """Send a request; also the nonce of its introduction (None if it carries none)."""
        me = self._me(to)
        args = [me, *rest]
        future = self._call(address, name, args, meter)
        if to is not None:
            future.add_done_callback(lambda f: self._introduce(f, to, args))
        return future, (me[3] if isinstance(me, list) else None)

    def _seen(self, addr: tuple) -> list[Any]:
        """The address a request came from, as this node saw it: what a proof signs."""
        return [self._peer_host(addr), int(addr[1])]

    def _signed_hello(self, nonce: bytes, requester: bytes, seen: list[Any]) -> bytes:
        me = self.source_node.id
        return self.identity.sign(_HELLO_TAG + nonce + requester + me + _packed_seen(seen))

    def _proof(self, nonce: bytes, requester: bytes, addr: tuple) -> list[Any]:
        """Our answer to an introduction: proof that we hold the key our id hashes, bound to
        the address the request came from (a relayed request names the relay's address)."""
        seen = self._seen(addr)
        return [self.identity.public_key, self._signed_hello(nonce, requester, seen), seen]

    def _address_ok(self, seen: Any, responder: tuple | None) -> bool:
        """Whether a proof that names ``seen`` (where the prover saw our challenge come from)
        was answered to us rather than to a relay.

        ``seen`` must be one of this node's own sources (``wire.source_of``: the host, or host
        and port on loopback). A node learns its address from its bind (loopback or global)
        and from :data:`CONFIRM_VOTES` distinct peer sources reporting the same one (NAT);
        until it knows any, it accepts the proof unbound (it cannot tell a relay apart).
        """
        try:
            mine = wire.source_of((seen[0], seen[1]))
        except (TypeError, IndexError):
            return False
        if mine in self.own_sources:
            return True
        if responder is not None:
            voters = self._seen_votes.pop(mine, set())
            voters.add(wire.source_of(responder))
            self._seen_votes[mine] = voters
            while len(self._seen_votes) > MAX_SEEN_VOTES:
                self._seen_votes.popitem(last=False)
            if len(voters) >= CONFIRM_VOTES:
                self.own_sources.add(mine)
                self.counters["own_address_confirmed"] += 1
                return True
        if not self.own_sources:
            self.counters["proof_unbound"] += 1
            return True
        self.counters["rejected.proof_wrong_address"] += 1
        return False

    def _proven(self, reply: Any, nonce: bytes | None, node: Node) -> bool:
        """True if ``reply`` proves that ``node`` holds the key its id hashes, at its address."""
        if nonce is None or not isinstance(reply, dict):
            return False
        proof = reply.get("proof")
        if not isinstance(proof, list) or len(proof) != 3:
            return False
        pub, sig, seen = proof
        if not isinstance(pub, bytes) or not isinstance(sig, bytes) or not _valid_seen(seen):
            return False
        if len(pub) != PUBLIC_KEY_BYTES or dht_id_for(pub) != node.id:
            return False
        signed = _HELLO_TAG + nonce + self.source_node.id + node.id + _packed_seen(seen)
        if verify(pub, sig, signed) and self._address_ok(seen, self._address(node)):
            self._learn_key(node.id, pub)
            return True
        return False

    def ping(
        self, address: tuple | None, nonce: bytes, *, to: bytes | None = None
    ) -> asyncio.Future[Any]:
        """Send ``ping``: the answer proves the peer holds the key its id hashes."""
        return self._request(address, "ping", to, [nonce])

    def find_node(
        self, address: tuple | None, target: bytes, *, to: bytes | None = None
    ) -> asyncio.Future[Any]:
        """Send ``find_node``."""
        return self._request(address, "find_node", to, [target])

    def store_packets(
        self, address: tuple | None, key: bytes, raws: list[bytes], *, to: bytes | None = None
    ) -> asyncio.Future[Any]:
        """Send ``store_packets``."""
        return self._request(address, "store_packets", to, [key, raws])

    def find_packets(
        self, address: tuple | None, key: bytes, cursor: int | None, *, to: bytes | None = None
    ) -> asyncio.Future[Any]:
        """Send ``find_packets``."""
        return self._request(address, "find_packets", to, [key, cursor])

    def listen(
        self, address: tuple | None, key: bytes, *, to: bytes | None = None
    ) -> asyncio.Future[Any]:
        """Send ``listen``."""
        return self._request(address, "listen", to, [key])

    def notify(self, address: tuple | None, key: bytes, raws: list[bytes]) -> asyncio.Future[Any]:
        """Send ``notify``."""
        return self._request(address, "notify", None, [key, raws])

    # -- calls with checked replies (defect 7)

    def handle_call_response(self, result: tuple[bool, Any], node: Node) -> tuple[bool, Any]:
        """A reply refreshes the contact; a failure counts against it (defect 5)."""
        if not result[0]:
            self.router.record_failure(node)
            return result
        self.welcome_if_new(node)
        return result

    def _bad_reply(self, node: Node, reason: str) -> tuple[bool, None]:
        self.counters[f"malformed.reply_{reason}"] += 1
        self.router.record_failure(node)
        return False, None

    async def verified_ping(self, address: tuple | None, expect: bytes | None) -> bytes | None:
        """Ping ``address``; the id it proves it holds the key of (``expect`` if given)."""
        nonce = os.urandom(wire.NONCE_BYTES)
        ok, reply = await self.ping(address, nonce, to=expect)
        if not ok:
            return None
        if isinstance(reply, list) and len(reply) == 5 and address is not None:
            self._learn_token(address, reply.pop())
        if (
            not isinstance(reply, list)
            or len(reply) != 4
            or not all(isinstance(x, bytes) for x in reply[:3])
            or not _valid_seen(reply[3])
        ):
            self.counters["malformed.reply_ping"] += 1
            return None
        nid, pub, sig, seen = reply
        if len(pub) != PUBLIC_KEY_BYTES or len(sig) != SIGNATURE_BYTES or dht_id_for(pub) != nid:
            self.counters["rejected.id_not_key_hash"] += 1
            return None
        if expect is not None and nid != expect:
            self.counters["rejected.id_changed"] += 1
            return None
        if not verify(
            pub, sig, _HELLO_TAG + nonce + self.source_node.id + nid + _packed_seen(seen)
        ):
            self.counters["rejected.bad_proof"] += 1
            return None
        if not self._address_ok(seen, address):
            return None  # answered to someone else: a relay at ``address``
        self._learn_key(nid, pub)
        return nid

    def _learn_key(self, nid: bytes, pub: bytes) -> None:
        self.peer_keys[nid] = pub
        self.peer_keys.move_to_end(nid)
        while len(self.peer_keys) > MAX_PEER_KEYS:
            self.peer_keys.popitem(last=False)

    async def call_ping(self, node_to_ask: Node) -> tuple[bool, Any]:
        """A verified ping of a known contact."""
        nid = await self.verified_ping(self._address(node_to_ask), node_to_ask.id)
        result = (nid is not None, nid)
        return self.handle_call_response(result, node_to_ask)

    async def _head_alive(self, head: Contact) -> bool:
        nid = await self.verified_ping(self._address(head), head.id)
        return nid is not None

    def _learn_token(self, address: tuple, token: Any) -> None:
        """Keep the address token a peer handed us, to echo in our next requests to it."""
        if isinstance(token, bytes) and len(token) == wire.TOKEN_BYTES:
            where = (address[0], address[1])
            self._peer_tokens.pop(where, None)
            self._peer_tokens[where] = token
            while len(self._peer_tokens) > MAX_VALIDATED:
                self._peer_tokens.popitem(last=False)

    async def _exchange(
        self,
        node: Node,
        name: str,
        args: list[Any],
        parse: Callable[[dict[str, Any]], Any],
        *,
        priority: int = FOREGROUND,
        meter: list[int] | None = None,
    ) -> tuple[bool, Any]:
        """Send one introduced request, paced per destination, and parse its reply.

        Returns (ok, parsed). No reply: the contact's failure is recorded. A *busy* reply is
        no failure: the call waits out the hold-back the peer asked
        for and goes again (up to :data:`EXCHANGE_BUSY_WAITS` times), then returns
        (False, :data:`BUSY`). A
        request to a node that has not validated our address yet is answered with its token
        only; the request goes again at once, echoing it. A reply ``parse`` refuses
        (WireError) is counted as bad and dropped. A good reply refreshes (or, proven, adds)
        the contact.
        """
        address = self._address(node)
        if address is None:
            return self.handle_call_response((False, None), node)
        where = (address[0], address[1])
        validations = busy_waits = 0
        cost = wire.request_cost(args)
        while True:
            async with self.pacer.slot(where, priority, cost):
                sent = time.monotonic()
                future, nonce = self._introduced_request(address, name, node.id, args, meter)
                ok, reply = await future
                rtt = time.monotonic() - sent
            if not ok:
                return self.handle_call_response((False, None), node)
            if not isinstance(reply, dict):
                return self._bad_reply(node, name)
            self._learn_token(address, reply.get("token"))
            busy = reply.get("busy")
            if type(busy) is int and len(reply) == 1:
                self.counters["busy_received"] += 1
                self.pacer.busy(where, busy / 1000)
                self.router.touch(node)
                busy_waits += 1
                if busy_waits > EXCHANGE_BUSY_WAITS:
                    return False, BUSY
                continue  # the slot waits out the hold-back the peer asked for
            if reply.get("validate") is True and "token" in reply:
                self.counters["validation_requests_received"] += 1
                validations += 1
                if validations > 1:
                    return self._bad_reply(node, f"{name}_unvalidated")
                continue
            self.pacer.answered(where, rtt, cost)
            try:
                parsed = parse(reply)
            except wire.WireError:
                return self._bad_reply(node, name)
            self.welcome_if_new(node, proven=self._proven(reply, nonce, node))
            return True, parsed

    def _reachable_contacts(self, value: Any) -> list[Contact]:
        return [
            c for c in (Contact(i, h, p) for i, h, p in wire.contacts(value)) if self.reachable(c)
        ]

    async def call_find_node(
        self, node_to_ask: Node, node_to_find: Node, *, meter: list[int] | None = None
    ) -> tuple[bool, Any]:
        """``find_node``: (ok, contacts as Nodes)."""
        return await self._exchange(
            node_to_ask,
            "find_node",
            [node_to_find.id],
            lambda reply: self._reachable_contacts(reply.get("nodes")),
            meter=meter,
        )

    async def call_find_packets(
        self, node_to_ask: Node, key: bytes, cursor: int | None
    ) -> tuple[bool, Any]:
        """``find_packets``: (ok, FindPacketsReply)."""

        def parse(reply: dict[str, Any]) -> FindPacketsReply:
            nodes = self._reachable_contacts(reply.get("nodes", []))
            packets = wire.byte_list(reply.get("packets"), max_items=wire.MAX_DATAGRAM_BYTES)
            more = reply.get("more")
            if not isinstance(more, bool):
                raise wire.WireError("shape")
            return FindPacketsReply(nodes, packets, wire.cursor(reply.get("cursor")), more)

        return await self._exchange(node_to_ask, "find_packets", [key, cursor], parse)

    async def call_store_packets(
        self,
        node_to_ask: Node,
        key: bytes,
        raws: list[bytes],
        *,
        priority: int = FOREGROUND,
        meter: list[int] | None = None,
    ) -> tuple[bool, Any]:
        """``store_packets``: (ok, StoreReply)."""

        def parse(reply: dict[str, Any]) -> StoreReply:
            accepted = reply.get("accepted")
            duplicates = reply.get("duplicates")
            refused = reply.get("refused")
            if not (
                isinstance(accepted, list)
                and isinstance(duplicates, list)
                and isinstance(refused, list)
                and all(isinstance(x, str) for x in accepted + duplicates)
                and all(
                    isinstance(r, list) and len(r) == 2 and all(isinstance(x, str) for x in r)
                    for r in refused
                )
            ):
                raise wire.WireError("shape")
            retry_ms = reply.get("retry_ms", 0)
            if type(retry_ms) is not int or not 0 <= retry_ms <= 60_000:
                raise wire.WireError("shape")
            pairs = [(a, b) for a, b in refused]
            limited = sum(1 for _pid, why in pairs if why == RATE_LIMITED)
            return StoreReply(accepted, duplicates, pairs, limited, retry_ms / 1000)

        return await self._exchange(
            node_to_ask, "store_packets", [key, raws], parse, priority=priority, meter=meter
        )

    async def call_sync(
        self,
        node_to_ask: Node,
        key: bytes,
        ranges: list[reconcile.Range],
        *,
        priority: int = FOREGROUND,
        meter: list[int] | None = None,
    ) -> tuple[bool, Any]:
        """``sync``: (ok, (answer ranges, how many asked ranges they cover))."""

        def parse(reply: dict[str, Any]) -> tuple[list[reconcile.Range], int]:
            covered = reply.get("covered")
            if type(covered) is not int:
                raise wire.WireError("shape")
            try:
                answer = reconcile.parse_ranges(
                    reply.get("ranges"), max_ranges=MAX_SYNC_RANGES, max_ids=MAX_SYNC_IDS
                )
            except reconcile.ReconcileError:
                raise wire.WireError("shape") from None
            return answer, covered

        wire_ranges = [r.wire() for r in ranges]
        return await self._exchange(
            node_to_ask, "sync", [key, wire_ranges], parse, priority=priority, meter=meter
        )

    async def call_get_packets(
        self,
        node_to_ask: Node,
        key: bytes,
        ids: list[bytes],
        *,
        priority: int = FOREGROUND,
        meter: list[int] | None = None,
    ) -> tuple[bool, Any]:
        """``get_packets``: (ok, (envelope bytes, ids the peer does not hold))."""

        def parse(reply: dict[str, Any]) -> tuple[list[bytes], list[bytes]]:
            packets = wire.byte_list(reply.get("packets"), max_items=MAX_IDS_PER_GET)
            missing = wire.byte_list(reply.get("missing"), max_items=MAX_IDS_PER_GET)
            return packets, missing

        return await self._exchange(
            node_to_ask, "get_packets", [key, ids], parse, priority=priority, meter=meter
        )

    async def call_listen(self, node_to_ask: Node, key: bytes) -> bool:
        """``listen``: True if the holder registered us."""

        def parse(reply: dict[str, Any]) -> int:
            ttl = reply.get("ttl")
            if not isinstance(ttl, int):
                raise wire.WireError("shape")
            return ttl

        ok, _ttl = await self._exchange(node_to_ask, "listen", [key], parse)
        return bool(ok)

    async def call_notify(self, address: tuple, key: bytes, raws: list[bytes]) -> bool:
        """``notify`` a listener at ``address`` (paced with the background work to it)."""
        cost = wire.request_cost([key, raws])
        async with self.pacer.slot((address[0], address[1]), BACKGROUND, cost):
            ok, _reply = await self.notify(address, key, raws)
        return bool(ok)

    async def call_store(self, node_to_ask: Node, key: bytes, value: Any) -> tuple[bool, Any]:
        """Stock single-value STORE is not spoken by qisd (defect 4): store signed packets."""
        raws = [value] if isinstance(value, bytes) else list(value)
        return await self.call_store_packets(node_to_ask, key, raws)

    async def call_find_value(self, node_to_ask: Node, node_to_find: Node) -> tuple[bool, Any]:
        """Stock FIND_VALUE is ``find_packets`` from the start in qisd."""
        return await self.call_find_packets(node_to_ask, node_to_find.id, None)

    # -- contacts, proof of key possession, hand-off (defects 1 and 10)

    def spawn(self, coro: Any) -> asyncio.Task[Any]:
        """Run ``coro`` in the background, kept referenced and its errors counted."""
        return _spawn_into(self._tasks, self.counters, coro, logging.DEBUG)

    def welcome_if_new(self, node: Node, *, proven: bool = False) -> None:
        """Refresh a known contact; verify an unknown one (signed ping) before adding it.

        A node enters the routing table only after it proved it holds the key its id hashes
        (no self-chosen ids). A newcomer whose bucket is full (and would not split) is left
        out, without pings. Hand-off runs once per node id, on its first verified contact;
        a contact already known, in a bucket or its replacement cache, is never "new" (defect 1).
        """
        if node.id == self.source_node.id or self.closed or not self.reachable(node):
            return
        known = self.router.get(node.id)
        if known is not None and (known.ip, known.port) == (node.ip, node.port):
            self.router.touch(known)
            return
        if node.id in self._verifying or len(self._verifying) >= MAX_PENDING_VERIFICATIONS:
            return
        if known is None and not self.router.has_room_for(node):
            self.counters["contacts_skipped_full_bucket"] += 1
            return
        if proven:
            self._add_verified(Contact(node.id, node.ip, node.port))
            return
        self._verifying.add(node.id)
        self.spawn(self._verify_and_add(Contact(node.id, node.ip, node.port)))

    async def _verify_and_add(self, node: Contact) -> None:
        try:
            nid = await self.verified_ping(self._address(node), node.id)
        finally:
            self._verifying.discard(node.id)
        if nid is None or self.closed:
            return
        self._add_verified(node)

    def _evicted(self, contact: Contact) -> None:
        # A contact that comes back after eviction is reconciled with again: while it was
        # gone (a partition), its keys' packets may have changed. Reconciling costs a summary
        # per key that agrees, and jobs still queued for it are not queued twice, so a peer
        # that comes and goes never multiplies the work (no livelock).
        self._returning.add(contact.id)
        while len(self._returning) > MAX_HANDED_OFF:
            self._returning.pop()

    def _add_verified(self, node: Contact) -> None:
        self.router.add_contact(node)
        if node.id not in self._handed_off or node.id in self._returning:
            self._returning.discard(node.id)
            self._handed_off[node.id] = None
            while len(self._handed_off) > MAX_HANDED_OFF:
                self._handed_off.popitem(last=False)
            self.hand_off(node)

    def hand_off(self, node: Node) -> int:
        """Queue reconciliation with ``node`` of the keys it should now hold (Kademlia paper,
        2.5); returns the keys queued.

        A key goes to ``node`` if it is among the k closest to the key and this node is closer
        to the key than every contact it knows, so one node, not all, hands each key off. The
        key itself is the DHT id (stock hashes it again, defect 10). The work is a queue of
        reconciliations (:class:`~qisd.net.sync.ReplicaSync`) worked by a few tasks and paced
        per peer: only envelopes ``node`` lacks cross the network, whatever the number of keys.
        """
        ids = [c.long_id for c in self.router.known() if c.id != node.id]
        me, newcomer, sent = self.source_node.long_id, node.long_id, 0
        for key, _count in self.store.keys():  # noqa: SIM118 (a Store, not a dict)
            k = int.from_bytes(key, "big")
            mine = me ^ k
            # Most keys fail the first test at the first few contacts: cheap for many keys.
            if any(i ^ k < mine for i in ids):
                continue  # a known contact is closer to the key than this node
            theirs = newcomer ^ k
            if sum(1 for i in ids if i ^ k < theirs) >= self.ksize:
                continue  # the newcomer is not among the k closest
            if self.sync.enqueue(key, node, "hand_off"):
                sent += 1
        self.counters["hand_off_keys"] += sent
        return sent

    # -- reachability (dial-back probes) and client mode

    @property
    def client_mode(self) -> bool:
        """True unless peers are known to reach this node (see :attr:`reachability`)."""
        return self.reachability != "public"

    def _welcome(self, req: _Request, sender: Node, proven: bool) -> None:
        """A handler's sender joins the routing table, unless it said it cannot be reached
        (client mode): lookups would wait on it once its NAT mapping lapsed."""
        if req.client:
            self.counters["client_requests"] += 1
            return
        self.welcome_if_new(sender, proven=proven)

    def _rpc_probe(self, req: _Request, args: list[Any]) -> Any:
        """``probe`` [sender, nonce]: tell the sender the address its request came from, and
        send it a ``dial_back`` from a fresh socket (another port: a NAT that only lets in
        replies from where its host sent drops it). Only to a validated address, so a spoofed
        probe gets no datagram sent anywhere."""
        if len(args) != 2:
            raise wire.WireError("bad_args")
        self._sender(req.addr, args[0])
        nonce = args[1]
        if not isinstance(nonce, bytes) or len(nonce) != wire.NONCE_BYTES:
            raise wire.WireError("bad_args")
        if not req.validated:
            return self._validate_first(req.addr)
        self._dial_back(req.addr, nonce)
        return {"seen": self._seen(req.addr)}

    def _dial_back(self, addr: tuple, nonce: bytes) -> None:
        data = wire.encode_request(os.urandom(wire.MSG_ID_BYTES), "dial_back", [nonce])
        try:
            with socket.socket(self.family, socket.SOCK_DGRAM) as sock:
                if self.family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
                sock.setblocking(False)
                sock.sendto(data, addr)
        except OSError as exc:
            self.counters["dial_back_errors"] += 1
            log.debug("dial-back to %s failed: %s", addr, exc)
            return
        self.counters["dial_backs_sent"] += 1
        self.counters["bytes_sent"] += len(data)

    def _rpc_dial_back(self, req: _Request, args: list[Any]) -> Any:
        """``dial_back`` [nonce]: a probe of ours came back through a socket we never sent to."""
        if len(args) != 1 or not isinstance(args[0], bytes):
            raise wire.WireError("bad_args")
        future = self._probes.get(args[0])
        if future is None or future.done():
            self.counters["rejected.dial_back_unexpected"] += 1
            return NO_REPLY
        future.set_result(req.addr)
        return NO_REPLY

    async def probe(self, node: Node) -> tuple[bool | None, tuple[str, int] | None]:
        """Ask ``node`` to dial us back: (reached: True / False / None if it did not answer,
        the address it saw our request come from)."""

        def parse(reply: dict[str, Any]) -> tuple[str, int]:
            seen = reply.get("seen")
            if not _valid_seen(seen):
                raise wire.WireError("shape")
            return (str(seen[0]), int(seen[1]))

        nonce = os.urandom(wire.NONCE_BYTES)
        arrived: asyncio.Future[tuple] = asyncio.get_running_loop().create_future()
        self._probes[nonce] = arrived
        self.counters["probes_sent"] += 1
        try:
            ok, seen = await self._exchange(node, "probe", [nonce], parse)
            if not ok:
                return None, None
            try:
                async with asyncio.timeout(max(1.0, self.config.rpc_timeout)):
                    await asyncio.shield(arrived)
            except TimeoutError:
                self.counters["probes_not_reached"] += 1
                return False, seen
            self.counters["probes_reached"] += 1
            return True, seen
        finally:
            del self._probes[nonce]

    # -- handlers: (address, args) -> reply; WireError = bad arguments (counted)

    def _sender(self, addr: tuple, value: Any) -> tuple[Contact, bool, bytes | None]:
        """The requester, whether its introduction proved its id, and the intro's nonce."""
        host = self._peer_host(addr)
        if isinstance(value, bytes):
            return Contact(wire.node_id(value), host, addr[1]), False, None
        if not isinstance(value, list) or len(value) != 5:
            raise wire.WireError("bad_sender")
        nid, pub, ts, nonce, sig = value
        wire.node_id(nid)
        if (
            not isinstance(pub, bytes)
            or len(pub) != PUBLIC_KEY_BYTES
            or type(ts) is not int
            or not 0 <= ts < 2**63
            or not isinstance(nonce, bytes)
            or len(nonce) != wire.NONCE_BYTES
            or not isinstance(sig, bytes)
            or len(sig) != SIGNATURE_BYTES
        ):
            raise wire.WireError("bad_sender")
        contact = Contact(nid, host, addr[1])
        known = self.router.get(nid)
        if known is not None and (known.ip, known.port) == (host, addr[1]):
            return contact, False, nonce  # nothing to prove: skip the signature check
        now = _now_ms(self.clock)
        if abs(now - ts) > INTRO_WINDOW_MS or nonce in self._intro_nonces:
            self.counters["rejected.stale_introduction"] += 1
            return contact, False, None  # fall back to a verification ping
        if dht_id_for(pub) != nid or not verify(
            pub, sig, _INTRO_TAG + nid + self.source_node.id + ts.to_bytes(8, "big") + nonce
        ):
            raise wire.WireError("bad_introduction")
        self._intro_nonces[nonce] = ts
        self._learn_key(nid, pub)
        while self._intro_nonces and (
            len(self._intro_nonces) > MAX_INTRODUCED
            or next(iter(self._intro_nonces.values())) < now - INTRO_WINDOW_MS
        ):
            self._intro_nonces.popitem(last=False)
        return contact, True, nonce

    def _rpc_ping(self, req: _Request, args: list[Any]) -> list[bytes]:
        addr = req.addr
        if len(args) != 2:
            raise wire.WireError("bad_args")
        sender, proven, _intro = self._sender(addr, args[0])
        nonce = args[1]
        if not isinstance(nonce, bytes) or len(nonce) != wire.NONCE_BYTES:
            raise wire.WireError("bad_args")
        self._welcome(req, sender, proven)
        seen = self._seen(addr)
        proof = self._signed_hello(nonce, sender.id, seen)
        return [self.source_node.id, self.identity.public_key, proof, seen]

    def _proved(
        self, reply: dict[str, Any], nonce: bytes | None, sender: Node, addr: tuple
    ) -> dict[str, Any]:
        """``reply``, with our proof of key possession when the request introduced itself."""
        if nonce is not None:
            reply["proof"] = self._proof(nonce, sender.id, addr)
        return reply

    def _contacts_reply(
        self, target: bytes, exclude: Node, req: _Request, spent: int = 0
    ) -> list[list[Any]]:
        """The closest contacts to ``target`` for a reply: none that failed its last call
        (a dead contact is not handed out), and to an unvalidated requester only as many as
        keep the reply within the amplification bound (``spent``: the reply's other bytes)."""
        neighbors = self.router.closest_live(Node(target), self.ksize, exclude=exclude)
        if not req.validated:
            room = wire.AMPLIFICATION_FACTOR * req.size - spent - 48 - wire.TOKEN_BYTES
            neighbors = neighbors[: max(0, room // REPLY_CONTACTS_BYTES)]
        return [[n.id, n.ip, n.port] for n in neighbors]

    def _rpc_find_node(self, req: _Request, args: list[Any]) -> dict[str, Any]:
        addr = req.addr
        if len(args) != 2:
            raise wire.WireError("bad_args")
        sender, proven, nonce = self._sender(addr, args[0])
        target = wire.node_id(args[1])
        self._welcome(req, sender, proven)
        spent = PROOF_BYTES if nonce is not None else 0
        reply: dict[str, Any] = {"nodes": self._contacts_reply(target, sender, req, spent)}
        return self._proved(reply, nonce, sender, addr)

    def _rpc_find_packets(self, req: _Request, args: list[Any]) -> dict[str, Any]:
        addr = req.addr
        if len(args) != 3:
            raise wire.WireError("bad_args")
        sender, proven, nonce = self._sender(addr, args[0])
        key = wire.node_id(args[1])
        cursor = wire.cursor(args[2])
        self._welcome(req, sender, proven)
        if not req.validated:
            return self._validate_first(addr)
        nodes = self._contacts_reply(key, sender, req)
        budget = self.max_datagram - 64 - PROOF_BYTES - REPLY_CONTACTS_BYTES * len(nodes)
        raws, next_cursor, more = self.store.page(
            key, since=cursor or 0, max_bytes=budget, now_ms=_now_ms(self.clock)
        )
        reply = {"nodes": nodes, "packets": raws, "cursor": next_cursor, "more": more}
        return self._proved(reply, nonce, sender, addr)

    def _rpc_store_packets(self, req: _Request, args: list[Any]) -> dict[str, Any]:
        addr = req.addr
        if len(args) != 3:
            raise wire.WireError("bad_args")
        sender, proven, nonce = self._sender(addr, args[0])
        key = wire.node_id(args[1])
        raws = wire.byte_list(args[2], max_items=MAX_ENVELOPES_PER_REQUEST)
        self._welcome(req, sender, proven)
        if not req.validated:
            return self._validate_first(addr)
        stored = self.accept_raws(key, raws, wire.source_of(addr), exclude=addr)
        reply: dict[str, Any] = {
            "accepted": stored.accepted,
            "duplicates": stored.duplicates,
            "refused": [list(r) for r in stored.refused],
        }
        if stored.limited:
            reply["retry_ms"] = max(10, min(5_000, int(1000 * stored.limited / self.limiter.rate)))
        return self._proved(reply, nonce, sender, addr)

    def accept_raws(
        self,
        key: bytes,
        raws: Sequence[bytes],
        source: str,
        *,
        charge: bool = True,
        exclude: tuple | None = None,
    ) -> StoreReply:
        """Verify and store envelopes that came from ``source``; what was accepted, already
        held and refused (with reasons). With ``charge``, each envelope to verify costs the
        source a token (a request's cost is weighed, so one source inside its burst cannot
        keep the loop busy verifying); those past its tokens are refused as rate limited
        (``limited`` counts them). New packets are pushed to the key's listeners."""
        now = _now_ms(self.clock)
        valid: list[Envelope] = []
        duplicates: list[str] = []
        refused: list[tuple[str, str]] = []
        seen: set[str] = set()
        fresh_raws: list[tuple[int, str | None, bytes]] = []
        for i, raw in enumerate(raws):
            claimed = _envelope_id(raw)
            if claimed is not None and (claimed in seen or self.store.has(key, claimed)):
                duplicates.append(claimed)
                continue
            if claimed is not None:
                seen.add(claimed)
            fresh_raws.append((i, claimed, raw))
        granted = self._charge(source, len(fresh_raws)) if charge else len(fresh_raws)
        for i, claimed, _raw in fresh_raws[granted:]:
            refused.append((claimed or f"#{i}", RATE_LIMITED))
        for i, claimed, raw in fresh_raws[:granted]:
            try:
                env = open_envelope(raw, now_ms=now, expected_key=key)
            except PacketError as exc:
                self.counters[f"rejected.{_counter_name(exc)}"] += 1
                refused.append((claimed or f"#{i}", _reason(exc)))
                continue
            valid.append(env)
        # Everything was verified above; only now is anything stored (one transaction).
        result = self.store.put(valid, now_ms=now, origin=source)
        for pid, why in result.refused:
            self.counters[f"rejected.{why.split(':')[0].replace(' ', '_')}"] += 1
            refused.append((pid, why[:96]))
        duplicates.extend(result.duplicates)
        if result.accepted:
            self.counters["stored_packets"] += len(result.accepted)
            if self.on_stored is not None:
                self.on_stored(key, len(result.accepted))
            accepted_ids = set(result.accepted)
            fresh = [e for e in valid if e.packet_id in accepted_ids]
            self.push_to_listeners(key, fresh, exclude=exclude)
        return StoreReply(
            list(result.accepted), duplicates, refused, limited=len(fresh_raws) - granted
        )

    def _charge(self, source: str, envelopes: int) -> int:
        """Take one token per envelope to verify from ``source``; how many it may verify."""
        granted = self.limiter.take(source, envelopes)
        if granted < envelopes:
            self.counters["rate_limited"] += 1
            self.counters["rate_limited_envelopes"] += envelopes - granted
        return granted

    def _rpc_listen(self, req: _Request, args: list[Any]) -> dict[str, Any]:
        addr = req.addr
        if len(args) != 2:
            raise wire.WireError("bad_args")
        sender, proven, nonce = self._sender(addr, args[0])
        key = wire.node_id(args[1])
        self._welcome(req, sender, proven)
        if not req.validated:
            return self._validate_first(addr)  # no push ever goes to an address that did not ask
        now = self.clock()
        listeners = self._listeners.get(key)
        if listeners is None:
            if len(self._listeners) >= MAX_LISTENED_KEYS:
                self._expire_listeners(now)
                if len(self._listeners) >= MAX_LISTENED_KEYS:
                    raise wire.WireError("too_many_listened_keys")
            listeners = self._listeners[key] = {}
        where = (addr[0], addr[1])
        if where not in listeners and len(listeners) >= MAX_LISTENERS_PER_KEY:
            self._expire_listeners(now)
            if len(listeners) >= MAX_LISTENERS_PER_KEY:
                raise wire.WireError("too_many_listeners")
        listeners[where] = (sender.id, now + self.config.listen_seconds)
        reply: dict[str, Any] = {"ttl": int(self.config.listen_seconds)}
        return self._proved(reply, nonce, sender, addr)

    def _rpc_notify(self, req: _Request, args: list[Any]) -> dict[str, Any]:
        addr = req.addr
        if len(args) != 3:
            raise wire.WireError("bad_args")
        sender, proven, nonce = self._sender(addr, args[0])
        key = wire.node_id(args[1])
        raws = wire.byte_list(args[2], max_items=MAX_ENVELOPES_PER_REQUEST)
        self._welcome(req, sender, proven)
        if self.on_notify is None:
            return {"accepted": 0}
        now = _now_ms(self.clock)
        envs = []
        for raw in raws[: self._charge(wire.source_of(addr), len(raws))]:
            try:
                envs.append(open_envelope(raw, now_ms=now, expected_key=key))
            except PacketError as exc:
                self.counters[f"rejected.{_counter_name(exc)}"] += 1
        if envs:
            self.on_notify(key, envs)
        return {"accepted": len(envs)}

    def items(self, key: bytes) -> reconcile.ItemSet:
        """The reconciliation items of ``key``, kept until the key's rows change.

        Always what the store holds now: a summary behind the store would hide a packet
        just emitted here from a reader that asks right after (read-your-writes across
        nodes). The rebuild after a change costs ~0.3 s per 100,000 packets; a peer that
        alternates stores and summaries pays a token per request for it.
        """
        generation = self.store.generation(key)
        cached = self._items.get(key)
        now = time.monotonic()
        if cached is not None and cached[0] == generation:
            self._items.move_to_end(key)
            return cached[1]
        generation, index = self.store.index(key, now_ms=_now_ms(self.clock))
        items = reconcile.ItemSet((ts, bytes.fromhex(pid)) for ts, pid in index)
        self._items[key] = (generation, items, now)
        while len(self._items) > MAX_CACHED_ITEM_SETS:
            self._items.popitem(last=False)
        return items

    def _rpc_sync(self, req: _Request, args: list[Any]) -> dict[str, Any]:
        addr = req.addr
        if len(args) != 3:
            raise wire.WireError("bad_args")
        sender, proven, nonce = self._sender(addr, args[0])
        key = wire.node_id(args[1])
        try:
            ranges = reconcile.parse_ranges(
                args[2], max_ranges=MAX_SYNC_RANGES, max_ids=reconcile.ID_LIST_MAX
            )
        except reconcile.ReconcileError:
            raise wire.WireError("bad_ranges") from None
        self._welcome(req, sender, proven)
        if not req.validated:
            return self._validate_first(addr)
        budget = self.max_datagram - 64 - (PROOF_BYTES if nonce is not None else 0)
        try:
            answer, covered = reconcile.respond(self.items(key), ranges, budget)
        except reconcile.ReconcileError:
            raise wire.WireError("bad_ranges") from None
        reply = {"ranges": [r.wire() for r in answer], "covered": covered}
        return self._proved(reply, nonce, sender, addr)

    def _rpc_get_packets(self, req: _Request, args: list[Any]) -> dict[str, Any]:
        addr = req.addr
        if len(args) != 3:
            raise wire.WireError("bad_args")
        sender, proven, nonce = self._sender(addr, args[0])
        key = wire.node_id(args[1])
        ids = wire.byte_list(args[2], max_items=MAX_IDS_PER_GET)
        if any(len(pid) != reconcile.ID_BYTES for pid in ids):
            raise wire.WireError("bad_ids")
        self._welcome(req, sender, proven)
        if not req.validated:
            return self._validate_first(addr)
        budget = self.max_datagram - 96 - (PROOF_BYTES if nonce is not None else 0)
        packets: list[bytes] = []
        missing: list[bytes] = []
        used = 0
        for pid in ids:
            raw = self.store.get(pid.hex(), key)
            if raw is None:
                if used + reconcile.ID_ENTRY_BYTES > budget:
                    break
                missing.append(pid)
                used += reconcile.ID_ENTRY_BYTES
                continue
            if packets and used + len(raw) + 5 > budget:
                break  # the rest are neither sent nor missing: the requester asks again
            packets.append(raw)
            used += len(raw) + 5
        self.counters["served_packets"] += len(packets)
        self.counters["served_bytes"] += sum(len(p) for p in packets)
        reply = {"packets": packets, "missing": missing}
        return self._proved(reply, nonce, sender, addr)

    # -- listeners

    def _expire_listeners(self, now: float) -> None:
        for key in list(self._listeners):
            live = {a: v for a, v in self._listeners[key].items() if v[1] > now}
            if live:
                self._listeners[key] = live
            else:
                del self._listeners[key]

    def listeners(self, key: bytes) -> list[tuple]:
        """Addresses registered (and not expired) to be notified about ``key``."""
        now = self.clock()
        return [a for a, (_nid, exp) in self._listeners.get(key, {}).items() if exp > now]

    def push_to_listeners(
        self, key: bytes, envs: Sequence[Envelope], *, exclude: tuple | None = None
    ) -> int:
        """Notify every live listener of ``key`` of ``envs``; returns notifications sent."""
        targets = [a for a in self.listeners(key) if a != exclude]
        if not targets or not envs:
            return 0
        sent = 0
        for batch in batches_within([e.raw for e in envs], self.max_datagram - REQUEST_OVERHEAD):
            for address in targets:
                self.spawn(self.call_notify(address, key, batch))
                sent += 1
        return sent

    def close(self) -> None:
        """Stop: fail every outstanding call, cancel background work."""
        self.closed = True
        self.connection_lost(None)
        for msg_id in list(self._outstanding):
            self._timeout(msg_id)
        for task in list(self._tasks):
            task.cancel()
        self.router.cancel()


# --------------------------------------------------------------------------- server


class DhtServer(Server):
    """kademlia's ``Server`` with qisd's protocol and storage (``protocol_class``, ``storage=``)."""

    protocol_class = QisdProtocol

    def __init__(
        self,
        identity: Identity,
        store: Any,
        config: DhtConfig,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(
            ksize=config.ksize,
            alpha=config.alpha,
            node_id=identity.dht_id,
            storage=StoreStorage(store, clock),
        )
        self.identity = identity
        self.config = config
        self.clock = clock
        self.protocol: QisdProtocol | None = None

    def _create_protocol(self) -> QisdProtocol:
        return self.protocol_class(
            self.node,
            self.storage,
            self.ksize,
            identity=self.identity,
            config=self.config,
            clock=self.clock,
        )

    async def listen(self, port: int, interface: str = "127.0.0.1") -> None:
        """Bind the UDP socket; ``::`` makes one dual-stack socket for both families (15)."""
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(interface, port, type=socket.SOCK_DGRAM)
        if not infos:
            raise UsageError(f"cannot resolve the listen address {interface!r}")
        family, _type, proto, _name, sockaddr = infos[0]
        sock = socket.socket(family, socket.SOCK_DGRAM, proto)
        try:
            if family == socket.AF_INET6 and ipaddress.ip_address(sockaddr[0]).is_unspecified:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            # Room for bursts: a full receive buffer drops datagrams silently (best effort:
            # the kernel caps this at net.core.rmem_max).
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER_BYTES)
            # Room to send, too: a full send buffer makes the loop's transport queue datagrams
            # and retry them itself, and libuv retries ENOBUFS (this host's full queue, which
            # IP_RECVERR reports) at once, in a loop. With room, the kernel's queue refuses
            # first and the refusal comes back to the protocol (paced, see _send).
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, RECEIVE_BUFFER_BYTES)
            # Ask the kernel to queue ICMP errors (port unreachable) for reading: a call to a
            # closed port then fails at once instead of after the RPC timeout (Linux only).
            with contextlib.suppress(OSError):
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVERR, 1)
                sock.setsockopt(socket.IPPROTO_IP, IP_RECVERR, 1)
            sock.bind(sockaddr)
        except OSError as exc:
            sock.close()
            raise UsageError(f"cannot bind UDP {interface}:{port}: {exc.strerror}") from None
        self.transport, self.protocol = await loop.create_datagram_endpoint(
            self._create_protocol, sock=sock
        )
        self.refresh_table(interval=3600)

    def refresh_table(self, interval: int = 3600) -> None:
        asyncio.ensure_future(self._refresh_table())
        loop = asyncio.get_running_loop()
        self.refresh_loop = loop.call_later(interval, self.refresh_table, interval)

    async def _refresh_table(self) -> None:
        """Refresh lonely buckets only: republish is the node's own packets (defect 13)."""
        if self.protocol is None or self.protocol.closed:
            return
        with contextlib.suppress(Exception):
            for node_id in self.protocol.get_refresh_ids():
                await self.crawl_nodes(node_id)

    async def crawl_nodes(self, target: bytes) -> list[Node]:
        """The k closest live nodes to ``target`` (an iterative ``find_node``)."""
        return (await self.crawl_nodes_counted(target))[0]

    async def crawl_nodes_counted(
        self, target: bytes, meter: list[int] | None = None
    ) -> tuple[list[Node], int]:
        """:meth:`crawl_nodes`, and the RPCs the lookup sent."""
        crawl = self._crawl(NodeCrawl, target, meter=meter)
        found = await crawl.find()
        return found, crawl.messages

    async def crawl_replicas(self, key: bytes, meter: list[int]) -> tuple[list[Node], int]:
        """The k closest live nodes to ``key``, and how many of the k closest the lookup
        heard of, live or not (what a read should reach)."""
        crawl = self._crawl(NodeCrawl, key, meter=meter)
        found = await crawl.find()
        return found, crawl.expected

    async def crawl_packets(self, key: bytes, since: dict[bytes, int | None] | None = None) -> Any:
        """Every packet the k closest nodes to ``key`` hold (see :class:`PacketCrawl`)."""
        return await self._crawl(PacketCrawl, key, since=since).find()

    def _crawl(self, kind: Any, target: bytes, **extra: Any) -> Any:
        """A lookup of ``kind`` toward ``target``, started from this node's nearest contacts."""
        assert self.protocol is not None
        node = Node(target)
        nearest = self.protocol.router.find_neighbors(node, self.ksize)
        return kind(
            self.protocol,
            node,
            nearest,
            self.ksize,
            self.alpha,
            stall_after=self.protocol.stall_after,
            **extra,
        )

    async def bootstrap(self, addrs: Sequence[tuple[str, int]]) -> list[Node]:
        """Verified pings to ``addrs`` (IP addresses), then a lookup of this node's own id."""
        assert self.protocol is not None
        results = await asyncio.gather(*(self.bootstrap_node(a) for a in addrs))
        if not any(results):
            return []
        return await self.crawl_nodes(self.node.id)

    async def bootstrap_node(self, addr: tuple[str, int]) -> Node | None:
        """Ping one address; the contact if it proved its id (it is then in the table)."""
        assert self.protocol is not None
        host, port = addr[0], int(addr[1])
        nid = await self.protocol.verified_ping(self.protocol.send_address(host, port), None)
        if nid is None:
            return None
        node = Contact(nid, host, port)
        self.protocol.welcome_if_new(node)
        self.protocol.router.add_contact(node)
        return node

    async def get(self, key: bytes) -> Any:
        """Stock single-value get is replaced by :meth:`DhtNode.fetch` (defects 2, 3)."""
        raise UsageError("qisd keys hold many signed packets: use DhtNode.fetch(key)")

    async def set(self, key: bytes, value: Any) -> Any:
        """Stock single-value set is replaced by :meth:`DhtNode.publish` (defects 4, 14)."""
        raise UsageError("qisd stores signed packets: use DhtNode.publish(envelopes)")

    async def set_digest(self, dkey: bytes, value: Any) -> Any:
        raise UsageError("qisd stores signed packets: use DhtNode.publish(envelopes)")

    def save_state(self, fname: str | os.PathLike[str]) -> None:
        """Routing state as JSON, written atomically (defect 16: never pickle)."""
        assert self.protocol is not None
        contacts = sorted(
            self.protocol.router.contacts(), key=lambda c: c.long_id ^ self.node.long_id
        )
        write_json_atomic(
            Path(fname),
            {
                "version": STATE_VERSION,
                "id": self.node.id.hex(),
                "ksize": self.ksize,
                "alpha": self.alpha,
                "contacts": [[c.id.hex(), c.ip, c.port] for c in contacts],
            },
        )

    @classmethod
    async def load_state(cls, fname: Any, port: int, interface: str = "0.0.0.0") -> Any:
        """Pickle-based state is refused (defect 16): use ``DhtNode(state_path=...)``."""
        raise UsageError("qisd routing state is JSON: use DhtNode(..., state_path=path)")


def read_state_contacts(path: Path) -> list[tuple[bytes, str, int]]:
    """Contacts from a routing-state JSON file (nothing if absent, unreadable or not ours)."""
    try:
        data = read_json(path, None)
    except Exception:  # a damaged or foreign file is ignored, never executed
        log.warning("ignoring unreadable routing state %s", path)
        return []
    if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
        return []
    out = []
    for item in data.get("contacts", [])[:1024]:
        try:
            nid_hex, host, port = item
            out.append(wire.contact([bytes.fromhex(nid_hex), host, port]))
        except (ValueError, TypeError, wire.WireError):
            continue
    return out


# --------------------------------------------------------------------------- the node


@dataclass
class _Follow:
    callback: Callable[[list[Envelope]], None]
    seen: set[str] = field(default_factory=set)
    holders: dict[bytes, Node] = field(default_factory=dict)
    task: asyncio.Task[Any] | None = None


class DhtNode:
    """A qisd DHT node: the API the daemon uses.

    ``store`` is the node's :class:`~qisd.net.store.Store`; ``identity`` its key (the node id
    is the hash of its public key); ``state_path`` where routing state is kept as JSON.
    """

    def __init__(
        self,
        identity: Identity,
        store: Any,
        config: DhtConfig,
        *,
        state_path: Path | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.identity = identity
        self.store = store
        self.config = config
        self.state_path = Path(state_path) if state_path is not None else None
        self.clock = clock
        self.server = DhtServer(identity, store, config, clock=clock)
        self._follows: dict[bytes, _Follow] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._unreachable: dict[tuple[str, int], str] = {}
        self._peer_addresses: dict[tuple[str, int], tuple[str, int]] = {}
        """Resolved bootstrap addresses, each with the peer (as configured) it resolved from."""
        self._counters: Counter[str] = Counter()
        self.address: tuple[str, int] | None = None
        self._anti_entropy_at = 0
        self._rng = random.Random()
        self._caught_up = False
        self._reachability_at = -math.inf
        self._checking: asyncio.Task[str] | None = None
        self._kept_alive_at = 0.0

    # -- lifecycle

    @property
    def protocol(self) -> QisdProtocol:
        """The running protocol (after :meth:`start`)."""
        if self.server.protocol is None:
            raise UsageError("the DHT node is not started")
        return self.server.protocol

    @property
    def node_id(self) -> bytes:
        """This node's 160-bit id."""
        return self.server.node.id

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> tuple[str, int]:
        """Bind the UDP socket and start background work; returns the bound address.

        With a ``state_path`` holding contacts from an earlier run, the node rejoins through
        them in the background (see :meth:`bootstrap` to wait for it).
        """
        await self.server.listen(port, host)
        self.protocol.on_notify = self._on_notify
        sockname = self.server.transport.get_extra_info("sockname")
        self.address = (sockname[0], sockname[1])
        self._spawn(self._republish_loop())
        self._spawn(self._expire_loop())
        self._spawn(self._rejoin_loop())
        self._spawn(self._upkeep_loop())
        if self.state_path is not None and read_state_contacts(self.state_path):
            self._spawn(self.bootstrap(()))
        return self.address

    async def stop(self) -> None:
        """Save routing state (JSON, atomic), stop background work and close the socket."""
        if self.server.protocol is None:
            return
        if self.state_path is not None and self.protocol.router.contacts():
            try:
                self.server.save_state(self.state_path)
            except QisdError as exc:
                log.warning("could not save routing state to %s: %s", self.state_path, exc)
        for task in list(self._tasks):
            task.cancel()
        for follow in self._follows.values():
            if follow.task is not None:
                follow.task.cancel()
        self.protocol.close()
        self.server.stop()
        await asyncio.gather(*self._tasks, *self.protocol._tasks, return_exceptions=True)

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        return _spawn_into(self._tasks, self._counters, coro, logging.WARNING)

    # -- joining

    @classmethod
    def bootstrap_addresses_from_file(cls, path: str | os.PathLike[str]) -> list[tuple[str, int]]:
        """``host:port`` lines of a bootstrap file ('#' comments, blanks, ``[v6]:port``)."""
        out = []
        text = Path(path).read_text(encoding="utf-8")
        for n, line in enumerate(text.splitlines(), 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            out.append(parse_host_port(line, where=f"{path}:{n}"))
        return out

    async def bootstrap(self, peers: Sequence[tuple[str, int]]) -> int:
        """Join through ``peers`` (names resolved) and saved contacts; returns contacts reached.

        Unreachable or unresolvable peers are reported in ``stats()['bootstrap_unreachable']``
        and retried in the background until they answer or the node stops.
        """
        loop = asyncio.get_running_loop()
        resolved: list[tuple[tuple[str, int], tuple[str, int]]] = []
        for host, port in peers:
            try:
                infos = await loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
            except OSError as exc:
                self._unreachable[(host, port)] = f"cannot resolve: {exc}"
                self._spawn(self._retry_peer(host, port))
                continue
            addrs = {
                (info[4][0], info[4][1])
                for info in infos
                if self.protocol.send_address(info[4][0], info[4][1]) is not None
            }
            if not addrs:
                self._unreachable[(host, port)] = "no address of this socket's family"
                continue
            resolved.extend(((host, port), a) for a in sorted(addrs))
        saved = read_state_contacts(self.state_path) if self.state_path is not None else []
        targets = [a for _peer, a in resolved] + [(h, p) for _i, h, p in saved]
        for peer, a in resolved:
            self._peer_addresses[a] = peer
        results = await asyncio.gather(*(self.server.bootstrap_node(a) for a in targets))
        reached = {n.id for n in results if n is not None}
        for (nid, host, port), got in zip(saved, results[len(resolved) :], strict=True):
            if got is None:  # a saved contact that did not answer: try it again later
                self.protocol.router.remember(Contact(nid, host, port))
        ok_peers = {peer for (peer, _a), n in zip(resolved, results, strict=False) if n}
        for peer, _a in resolved:
            if peer not in ok_peers:
                address = next(a for p, a in resolved if p == peer)
                cause = self.protocol.failure_cause(address)
                self._unreachable[peer] = cause or (
                    f"no answer within {self.config.rpc_timeout:g} s (a silent host, or a "
                    "firewall that drops)"
                )
                self._spawn(self._retry_peer(*peer))
            else:
                self._unreachable.pop(peer, None)
        if reached:
            # Reachability first: the lookup that follows then adds this node to the tables
            # of the nodes it meets only if they can reach it (client mode otherwise).
            await self.check_reachability()
            await self.server.crawl_nodes(self.node_id)
            if self.state_path is not None:
                with contextlib.suppress(QisdError):
                    self.server.save_state(self.state_path)
            if not self._caught_up:
                self._caught_up = True
                self.catch_up()
        return len(reached)

    def catch_up(self) -> int:
        """Queue a reconciliation of every key this node holds as one of its k closest with
        the closest other holder: what a node that was away (a restart) missed comes back,
        and what it holds that they lack goes out. Returns the keys queued (paced, 4 at a
        time, a summary each for a key that agrees)."""
        proto = self.protocol
        me = proto.source_node.long_id
        queued = 0
        for key, _n in self.store.keys():  # noqa: SIM118 (a Store, not a dict)
            target = int.from_bytes(key, "big")
            holders = proto.router.find_neighbors(Node(key), self.config.ksize)
            if len(holders) >= self.config.ksize and all(
                h.long_id ^ target < me ^ target for h in holders
            ):
                continue
            if holders and proto.sync.enqueue(key, holders[0]):
                queued += 1
        proto.counters["catch_up_keys"] += queued
        return queued

    async def _retry_peer(self, host: str, port: int) -> None:
        delay = max(1.0, self.config.rpc_timeout)
        while (host, port) in self._unreachable:
            await asyncio.sleep(delay)
            delay = min(delay * 2, 300.0)
            if (host, port) not in self._unreachable:
                return
            with contextlib.suppress(OSError):
                reached = await self._bootstrap_one(host, port)
                if reached:
                    self._unreachable.pop((host, port), None)
                    await self.server.crawl_nodes(self.node_id)
                    return

    async def _bootstrap_one(self, host: str, port: int) -> bool:
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
        for info in infos:
            addr = (info[4][0], info[4][1])
            if self.protocol.send_address(*addr) and await self.server.bootstrap_node(addr):
                return True
        return False

    async def rejoin(self) -> int:
        """Re-contact bootstrap peers and former contacts missing from the routing table.

        Returns how many answered; if any did, a lookup of this node's id follows, so the
        table learns their side of the network (a healed partition becomes one network).
        """
        router = self.protocol.router
        in_table = {(c.ip, c.port) for c in router.contacts()}
        targets: dict[tuple[str, int], None] = {}
        for c in list(router.former.values()):
            if router.get(c.id) is None and c.ip is not None and c.port is not None:
                targets[(c.ip, c.port)] = None
        for address in self._peer_addresses:
            if address not in in_table:
                targets[address] = None
        if not targets:
            return 0
        results = await asyncio.gather(*(self.server.bootstrap_node(a) for a in targets))
        back = sum(1 for n in results if n is not None)
        for address, node in zip(targets, results, strict=True):
            # A bootstrap peer that answered here is reachable, whenever its own retry (its
            # delay doubles to 5 minutes) would have noticed.
            if node is not None and address in self._peer_addresses:
                self._unreachable.pop(self._peer_addresses[address], None)
        self._counters["rejoin_rounds"] += 1
        if back:
            self._counters["rejoined_contacts"] += back
            await self.server.crawl_nodes(self.node_id)
        return back

    def check_reachability(self) -> asyncio.Task[str]:
        """Learn by dial-back probes whether peers can reach this node at the address they see
        (one check at a time; awaiting the task gives :attr:`QisdProtocol.reachability`).

        Up to :data:`PROBE_PEERS` random live contacts are asked in turn; the first dial-back
        that arrives makes the node public (and confirms its address: proofs must then name
        it), two that do not make it unreachable (client mode). A loopback bind is public
        without asking. A change is logged; becoming public re-runs the lookup of this node's
        id, so the nodes it meets add it.
        """
        if self._checking is None or self._checking.done():
            self._checking = self._spawn(self._check_reachability())
        return self._checking

    async def _check_reachability(self) -> str:
        proto = self.protocol
        self._reachability_at = self.clock()
        before = proto.reachability
        if proto.loopback_bind:
            return before
        contacts = [c for c in proto.router.contacts() if not proto.suspect(c.id)]
        self._rng.shuffle(contacts)
        reached = missed = 0
        for contact in contacts[:PROBE_PEERS]:
            ok, seen = await proto.probe(contact)
            if ok is None or seen is None:
                continue
            proto.public_address = seen
            if ok:
                reached += 1
                break
            missed += 1
            if missed >= min(2, len(contacts)):
                break
        if reached:
            proto.reachability = "public"
            assert proto.public_address is not None
            source = wire.source_of(proto.public_address)
            if source not in proto.own_sources:
                proto.own_sources.add(source)
                proto.counters["own_address_confirmed"] += 1
        elif missed:
            proto.reachability = "unreachable"
        after = proto.reachability
        if after != before:
            where = proto.public_address
            shown = f"{where[0]}:{where[1]}" if where else "?"
            if after == "public":
                log.info("reachable at %s (a peer's dial-back arrived)", shown)
                await self.server.crawl_nodes(self.node_id)
            else:
                log.info(
                    "not reachable at %s (dial-backs did not arrive: NAT or a firewall); "
                    "running as a client: emit, query and follow work, no other node waits "
                    "on this one",
                    shown,
                )
        return after

    def _keep_alive(self, now: float) -> int:
        """In client mode, ping the holders this node listens on every ``keepalive_seconds``
        (their pushes come back through the NAT mapping these pings keep open)."""
        proto = self.protocol
        if not proto.client_mode or now - self._kept_alive_at < self.config.keepalive_seconds:
            return 0
        self._kept_alive_at = now
        holders = {n.id: n for f in self._follows.values() for n in f.holders.values()}
        for node in holders.values():
            proto.spawn(proto.call_ping(node))
        proto.counters["keepalive_pings"] += len(holders)
        return len(holders)

    async def _rejoin_loop(self) -> None:
        while True:
            await asyncio.sleep(max(0.1, float(self.config.rejoin_seconds)))
            try:
                await self.rejoin()
            except Exception:
                self._counters["rejoin_errors"] += 1
                log.debug("rejoin failed", exc_info=True)

    # -- publish / fetch

    async def publish(
        self, envelopes: Sequence[Envelope], *, priority: int = FOREGROUND
    ) -> PublishResult:
        """Store ``envelopes`` (already stored locally) at the k closest nodes of their keys.

        Each destination is paced: a busy one is waited for, and what it refused as rate
        limited is sent again.
        """
        result = PublishResult()
        by_key: dict[bytes, list[Envelope]] = {}
        for env in envelopes:
            by_key.setdefault(env.key, []).append(env)
            result.replicas.setdefault(env.packet_id, 0)
        await asyncio.gather(
            *(self._publish_key(k, envs, result, priority) for k, envs in by_key.items())
        )
        return result

    async def _publish_key(
        self, key: bytes, envs: list[Envelope], result: PublishResult, priority: int
    ) -> None:
        # Count this key's own RPCs: keys are published concurrently, so a delta of the
        # node's sent counters would count every other key's traffic too.
        proto = self.protocol
        nodes, lookup_messages = await self.server.crawl_nodes_counted(key)
        result.messages += lookup_messages
        result.contacted += len(nodes)
        raws = [e.raw for e in envs]

        async def store_at(node: Node) -> None:
            meter = [0, 0]
            replies = await proto.sync.push(node, key, raws, priority=priority, meter=meter)
            result.messages += meter[1]
            for reply in replies:
                for pid in {*reply.accepted, *reply.duplicates}:
                    if pid in result.replicas:
                        result.replicas[pid] += 1
                for pid, why in reply.refused:
                    result.refused.setdefault(pid, []).append(why)

        await asyncio.gather(*(store_at(n) for n in nodes))
        result.messages += proto.push_to_listeners(key, envs)

    async def fetch(self, key: bytes) -> list[Envelope]:
        """Every packet under ``key``: the k closest replicas' merged with local, verified
        (see :meth:`fetch_report`, which also says how complete the read is)."""
        report = await self.fetch_report(key)
        return self._merge(key, (e.raw for e in report.envelopes))

    async def fetch_report(self, key: bytes) -> FetchResult:
        """The packets under ``key`` this node lacks, from the key's k closest replicas, and
        how complete the read is (:class:`~qisd.net.sync.FetchResult`).

        A lookup finds the k closest nodes (it never stops at the first reply); then the
        node reconciles its own id set with theirs (two first, the rest against what those
        gave), downloads each envelope it lacks once, verifies every one, tells each replica
        what it lacks, and never waits on a caching store.
        """
        lookup = [0, 0]
        nodes, expected = await self.server.crawl_replicas(key, lookup)
        result = await self.protocol.sync.fetch(key, nodes, expected, lookup)
        self._counters["fetches"] += 1
        self._counters["fetch_messages"] += result.messages
        self._counters["fetch_bytes_received"] += result.bytes_received
        if not result.complete:
            self._counters["fetches_incomplete"] += 1
        return result

    async def fetch_full(self, key: bytes) -> list[Envelope]:
        """The read before reconciliation: every packet paged from every replica (kept as
        ``bench/fetch.py``'s baseline)."""
        replies = await self.server.crawl_packets(key)
        return self._merge(key, (r for raws in replies.raws.values() for r in raws))

    async def fetch_table(self, key: bytes) -> pa.Table:
        """:meth:`fetch` as one Arrow table (``RESULT_SCHEMA``: rows plus packet id, signer)."""
        batches = [
            with_provenance(env.batch(), env.packet_id, env.public_key)
            for env in await self.fetch(key)
            if env.kind == KIND_PACKET
        ]
        return pa.Table.from_batches(batches, schema=RESULT_SCHEMA)

    def _local(self, key: bytes) -> list[Envelope]:
        return [read_trusted(raw)[0] for raw in self.server.storage.raws(key)]

    def _merge(self, key: bytes, remote: Any) -> list[Envelope]:
        by_id: dict[str, Envelope] = {e.packet_id: e for e in self._local(key)}
        now = _now_ms(self.clock)
        checked: set[bytes] = set()
        for raw in remote:
            if raw in checked:
                continue
            checked.add(raw)
            try:
                env = open_envelope(raw, now_ms=now, expected_key=key)
            except PacketError as exc:
                self.protocol.counters[f"rejected.fetched_{_counter_name(exc)}"] += 1
                continue
            by_id.setdefault(env.packet_id, env)
        return sorted(by_id.values(), key=lambda e: (e.timestamp_ms, e.packet_id))

    # -- follow

    async def follow(self, key: bytes, on_packets: Callable[[list[Envelope]], None]) -> None:
        """Call ``on_packets`` with ``key``'s packets now and with each new one as it arrives.

        Registers with the key's closest holders (``listen``); they push new packets
        (``notify``). Registrations are refreshed every third of ``listen_seconds``, and each
        refresh catches up from every holder's cursor (only what is new) in case a push was lost.
        """
        if key in self._follows:
            self._follows[key].callback = on_packets
            return
        follow = _Follow(on_packets)
        self._follows[key] = follow
        await self._refresh_follow(key, follow, first=True)
        follow.task = self._spawn(self._follow_loop(key, follow))

    def unfollow(self, key: bytes) -> None:
        """Stop following ``key`` (holders' registrations lapse on their own)."""
        follow = self._follows.pop(key, None)
        if follow is not None and follow.task is not None:
            follow.task.cancel()

    def _deliver(self, follow: _Follow, envs: Sequence[Envelope]) -> None:
        fresh = []
        for env in envs:
            if env.packet_id not in follow.seen:
                follow.seen.add(env.packet_id)
                fresh.append(env)
        if fresh:
            try:
                follow.callback(fresh)
            except Exception:  # a caller's callback must not break the DHT
                self._counters["follow_callback_errors"] += 1
                log.exception("follow callback failed")

    def _on_notify(self, key: bytes, envs: list[Envelope]) -> None:
        follow = self._follows.get(key)
        if follow is None:
            self.protocol.counters["rejected.notify_not_following"] += 1
            return
        self._deliver(follow, envs)

    async def _refresh_follow(self, key: bytes, follow: _Follow, *, first: bool = False) -> None:
        """Catch up by reconciliation (only what this node lacks moves), then (re-)register
        with the closest holders."""
        proto = self.protocol
        lookup = [0, 0]
        nodes, expected = await self.server.crawl_replicas(key, lookup)
        report = await proto.sync.fetch(key, nodes, expected, lookup)
        envs = self._local(key) if first else []
        self._deliver(follow, [*envs, *report.envelopes])
        holders = nodes[: max(LISTEN_FANOUT, self.config.alpha)]
        follow.holders = {n.id: n for n in holders}
        await asyncio.gather(*(proto.call_listen(n, key) for n in holders))

    async def _follow_loop(self, key: bytes, follow: _Follow) -> None:
        interval = max(1.0, self.config.listen_seconds / 3)
        while True:
            await asyncio.sleep(interval)
            try:
                await self._refresh_follow(key, follow)
            except Exception:
                self._counters["follow_refresh_errors"] += 1
                log.debug("follow refresh failed", exc_info=True)

    # -- upkeep

    async def republish(self) -> int:
        """Re-store this node's own unexpired packets at the current k closest; returns count.

        Background work: it waits behind fresh emits and lookups at every destination, and goes
        through the keys :data:`REPUBLISH_KEYS` at a time (a node with 25,000 keys never starts
        25,000 lookups at once).
        """
        own = self.store.own_envelopes(now_ms=_now_ms(self.clock))
        by_key: dict[bytes, list[Envelope]] = {}
        for env in own:
            by_key.setdefault(env.key, []).append(env)
        keys = list(by_key)
        for start in range(0, len(keys), REPUBLISH_KEYS):
            chunk = [e for k in keys[start : start + REPUBLISH_KEYS] for e in by_key[k]]
            await self.publish(chunk, priority=BACKGROUND)
        return len(own)

    async def _upkeep_loop(self) -> None:
        while True:
            await asyncio.sleep(max(0.05, float(self.config.upkeep_seconds)))
            try:
                self.upkeep()
            except Exception:
                self._counters["upkeep_errors"] += 1
                log.debug("upkeep failed", exc_info=True)

    def upkeep(self) -> tuple[int, int]:
        """One upkeep tick; returns (contacts pinged, reconciliations queued).

        Liveness: the contacts not heard from for :data:`LIVENESS_SECONDS` are pinged (the
        stalest first, :data:`LIVENESS_PINGS` a tick); a dead one fails its pings, stops being
        handed out, is evicted after ``evict_after_failures`` and replaced from the bucket's
        replacement cache. Anti-entropy: the next :data:`ANTI_ENTROPY_KEYS` keys this node
        holds as one of their k closest are each reconciled with one random other holder.
        """
        proto = self.protocol
        now = self.clock()
        self._keep_alive(now)
        due = self._reachability_at + (
            self.config.reachability_seconds if proto.reachability != "unknown" else 0
        )
        if now >= due and proto.router.contacts() and not proto.closed:
            self.check_reachability()
        stale = [c for c in proto.router.contacts() if now - c.last_seen > LIVENESS_SECONDS]
        stale.sort(key=lambda c: c.last_seen)
        for contact in stale[:LIVENESS_PINGS]:
            proto.spawn(proto.call_ping(contact))
        keys = [k for k, _n in self.store.keys()]  # noqa: SIM118 (a Store, not a dict)
        queued = 0
        if keys:
            start = self._anti_entropy_at % len(keys)
            batch = (keys[start:] + keys[:start])[:ANTI_ENTROPY_KEYS]
            self._anti_entropy_at = start + len(batch)
            me = proto.source_node.long_id
            known = proto.router.known()
            live = {c.id for c in proto.router.contacts()}
            k = self.config.ksize
            for key in batch:
                target = int.from_bytes(key, "big")
                holders = heapq.nsmallest(k, known, key=lambda c: c.long_id ^ target)
                if len(holders) >= k and all(h.long_id ^ target < me ^ target for h in holders):
                    # Not one of this key's k closest (it published while closer ones were
                    # down, or read it): what it holds goes to the closest live one, push
                    # only, so packets stranded by churn reach the key's replicas.
                    closest = next(
                        (h for h in holders if h.id in live and not proto.suspect(h.id)), None
                    )
                    if closest is not None and proto.sync.enqueue(key, closest, "migrate"):
                        queued += 1
                    continue
                # The other holders as this node knows them (a far node is never taken for
                # one because a full bucket parked a closer one in its cache).
                holders = holders[: k - 1]
                others = [h for h in holders if h.id in live and not proto.suspect(h.id)]
                if others and proto.sync.enqueue(key, self._rng.choice(others)):
                    queued += 1
        proto.counters["anti_entropy_queued"] += queued
        return min(len(stale), LIVENESS_PINGS), queued

    async def _republish_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.republish_seconds)
            try:
                await self.republish()
            except Exception:
                self._counters["republish_errors"] += 1
                log.warning("republish failed", exc_info=True)

    async def _expire_loop(self) -> None:
        interval = min(60.0, float(self.config.republish_seconds))
        while True:
            await asyncio.sleep(interval)
            try:
                self.store.expire(_now_ms(self.clock))
            except Exception:
                self._counters["expire_errors"] += 1
                log.warning("expiry failed", exc_info=True)

    # -- introspection

    def peers(self) -> list[dict[str, Any]]:
        """The routing table: id hex, host, port, last seen (epoch s), failures in a row."""
        return [c.as_dict() for c in self.protocol.router.contacts()]

    def stats(self) -> dict[str, Any]:
        """Counters: RPCs sent/received by type, rejected by reason, rate-limited, malformed."""
        counters = self.protocol.counters if self.server.protocol is not None else Counter()

        def group(prefix: str) -> dict[str, int]:
            return {
                k[len(prefix) :]: v for k, v in sorted(counters.items()) if k.startswith(prefix)
            }

        running = self.server.protocol is not None
        return {
            "rpcs_sent": group("sent."),
            "rpcs_received": group("received."),
            "rejected": group("rejected."),
            "malformed": group("malformed."),
            "rate_limited": counters.get("rate_limited", 0),
            "rate_limited_envelopes": counters.get("rate_limited_envelopes", 0),
            "handler_errors": counters.get("handler_errors", 0),
            "timeouts": counters.get("timeouts", 0),
            "send_failures": {
                name: counters.get(name, 0)
                for name in ("icmp_unreachable", "send_errors", "sent_again", "send_queue_full")
            },
            "busy_sent": counters.get("busy_sent", 0),
            "busy_received": counters.get("busy_received", 0),
            "bytes_sent": counters.get("bytes_sent", 0),
            "bytes_received": counters.get("bytes_received", 0),
            "sync_backlog": self.protocol.sync.backlog() if running else 0,
            "handoff_backlog": self.protocol.sync.backlog("hand_off") if running else 0,
            "sync": {
                name: counters.get(name, 0)
                for name in (
                    "hand_off_keys",
                    "catch_up_keys",
                    "anti_entropy_queued",
                    "syncs",
                    "syncs_agreed",
                    "syncs_failed",
                    "sync_pulled",
                    "sync_pushed",
                    "entry_corrections",
                    "served_packets",
                )
            },
            "send_queue": self.protocol.pacer.queued() if running else 0,
            "send_budget": self.protocol.pacer.summary() if running else {},
            "peer_queues": self.protocol.pacer.stats() if running else {},
            "stored_packets": counters.get("stored_packets", 0),
            "contacts": len(self.protocol.router.contacts())
            if self.server.protocol is not None
            else 0,
            "following": len(self._follows),
            "bootstrap_unreachable": {f"{h}:{p}": why for (h, p), why in self._unreachable.items()},
            "reachability": self.protocol.reachability if running else "unknown",
            "public_address": _shown(self.protocol.public_address) if running else None,
            "own_addresses": sorted(self.protocol.own_sources) if running else [],
            "address_checks": {
                name: counters.get(name, 0)
                for name in (
                    "probes_sent",
                    "probes_reached",
                    "probes_not_reached",
                    "dial_backs_sent",
                    "own_address_confirmed",
                    "proof_unbound",
                    "rejected.proof_wrong_address",
                    "client_requests",
                    "keepalive_pings",
                )
            },
            **dict(self._counters),
        }


def _shown(address: tuple[str, int] | None) -> str | None:
    """``host:port`` (``[v6]:port``) for status, or None."""
    if address is None:
        return None
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_host_port(text: str, *, where: str = "") -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` as (host, port); UsageError naming ``where`` if bad."""
    text = text.strip()
    prefix = f"{where}: " if where else ""
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise UsageError(f"{prefix}{text!r} is not [IPv6]:PORT")
        port_text = rest[1:]
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or ":" in host:
            raise UsageError(f"{prefix}{text!r} is not HOST:PORT (bracket IPv6 addresses)")
    if not host:
        raise UsageError(f"{prefix}{text!r} has no host")
    try:
        port = int(port_text)
    except ValueError:
        raise UsageError(f"{prefix}{text!r}: port must be a number") from None
    if not 0 < port < 65536:
        raise UsageError(f"{prefix}{text!r}: port must be in 1..65535")
    return host, port


__all__ = [
    "DhtNode",
    "DhtServer",
    "FindPacketsReply",
    "PublishResult",
    "QisdProtocol",
    "StoreReply",
    "StoreStorage",
    "parse_host_port",
]
