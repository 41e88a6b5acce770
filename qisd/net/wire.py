"""rpcudp's datagram framing with the C ``msgpack`` codec, reply shapes and rate limits.

A datagram is ``kind (1 byte) + message id (20 bytes) + msgpack payload``: kind 0 is a request
whose payload is ``[name, [args...]]`` or ``[name, [args...], token]``, kind 1 a reply whose
payload is the handler's result. Without the token this is byte for byte what rpcudp 5.0.1
sends with ``u-msgpack``; the C ``msgpack`` codec produces the same bytes many times faster, and
its unpacker takes explicit size bounds. The token (wire version 2) is the requester's echo of
an address token (:class:`AddressTokens`) the responder handed it earlier.

Everything here is pure and raises :class:`WireError` (with a short reason used as a counter
name) on bad input; the protocol counts and drops, it never lets bad remote data raise.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import math
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import msgpack

from qisd.core.packet import packet_id_of

REQUEST = 0
REPLY = 1
MSG_ID_BYTES = 20
HEADER_BYTES = 1 + MSG_ID_BYTES
NODE_ID_BYTES = 20
NONCE_BYTES = 16
MAX_DATAGRAM_BYTES = 8_192
"""rpcudp's bound on a request payload; qisd applies it to requests and replies alike."""
MAX_CONTACTS_IN_REPLY = 64
MAX_HOST_CHARS = 64


class WireError(Exception):
    """A datagram or a reply that is not what the protocol expects; ``args[0]`` is the reason."""


def packb(obj: Any) -> bytes:
    """msgpack with rpcudp's conventions (bin for bytes, str for text, float64)."""
    return msgpack.packb(obj, use_bin_type=True)


def _unpackb(data: bytes) -> Any:
    return msgpack.unpackb(
        data,
        raw=False,
        use_list=True,
        strict_map_key=True,
        max_bin_len=MAX_DATAGRAM_BYTES,
        max_str_len=MAX_DATAGRAM_BYTES,
        max_array_len=MAX_DATAGRAM_BYTES,
        max_map_len=64,
        max_ext_len=0,
    )


CLIENT = 1
"""Request flag: the sender is not reachable from outside (behind NAT or a firewall, or not
known yet): answer it, but do not add it to the routing table (lookups would wait on it)."""


def encode_request(
    msg_id: bytes,
    name: str,
    args: list[Any] | tuple[Any, ...],
    token: bytes | None = None,
    flags: int = 0,
) -> bytes:
    """A request datagram (rpcudp framing; ``token`` echoes the receiver's address token,
    ``flags`` are :data:`CLIENT` or 0)."""
    payload: list[Any] = [name, list(args)]
    if token is not None or flags:
        payload.append(token)
    if flags:
        payload.append(flags)
    return bytes((REQUEST,)) + msg_id + packb(payload)


def encode_reply(msg_id: bytes, value: Any) -> bytes:
    """A reply datagram (rpcudp framing)."""
    return bytes((REPLY,)) + msg_id + packb(value)


def decode_datagram(data: bytes) -> tuple[int, bytes, Any]:
    """(kind, message id, payload) of a datagram; raises WireError with the reason."""
    if len(data) < HEADER_BYTES + 1:
        raise WireError("short")
    if len(data) > HEADER_BYTES + MAX_DATAGRAM_BYTES:
        raise WireError("oversized")
    kind = data[0]
    if kind not in (REQUEST, REPLY):
        raise WireError("unknown_kind")
    try:
        payload = _unpackb(data[HEADER_BYTES:])
    except Exception:  # msgpack raises several unrelated types on hostile input
        raise WireError("undecodable") from None
    return kind, bytes(data[1:HEADER_BYTES]), payload


def split_request(payload: Any) -> tuple[str, list[Any], bytes | None, int]:
    """(name, args, echoed token or None, flags) of a request payload; raises WireError."""
    if not isinstance(payload, list) or len(payload) not in (2, 3, 4):
        raise WireError("bad_request_shape")
    name, args = payload[0], payload[1]
    token = payload[2] if len(payload) >= 3 else None
    flags = payload[3] if len(payload) == 4 else 0
    if not isinstance(name, str) or not isinstance(args, list):
        raise WireError("bad_request_shape")
    if token is not None and (not isinstance(token, bytes) or len(token) != TOKEN_BYTES):
        raise WireError("bad_token")
    if type(flags) is not int or flags & ~CLIENT:
        raise WireError("bad_flags")
    return name, args, token, flags


MAX_ENVELOPES_PER_REQUEST = 64
"""store_packets / notify carry at most this many envelopes (a request is <= 8,192 bytes)."""
REQUEST_OVERHEAD = 320
"""Bytes of a store_packets/notify request besides its envelopes (name, intro, key, headers)."""
RATE_LIMITED = "rate limited: retry later"
"""The refusal reason of an envelope a receiver had no tokens left to verify."""
MAX_BUSY_RETRIES = 8
"""A request a busy peer turned away is sent again at most this many times (each after the
wait the peer asked for, at most ``pacing.MAX_BUSY_SECONDS``)."""
BUSY = object()
"""The parsed value of a call a peer answered with *busy, retry later*: not a failure."""


def request_cost(args: list[Any]) -> int:
    """About the bytes a request with ``args`` (after the sender) puts on the wire: what the
    node's pacing budget charges it (envelopes and ids counted, framing estimated)."""
    total = 192  # framing, name, message id, sender or introduction, token
    for arg in args:
        if isinstance(arg, bytes | str):
            total += len(arg) + 2
        elif isinstance(arg, list):
            total += sum(len(x) + 3 if isinstance(x, bytes | str) else 9 for x in arg)
        else:
            total += 9
    return total


def envelope_id(raw: bytes) -> str | None:
    """The packet id an envelope's bytes claim, without verifying it (None if unframed)."""
    try:
        frame = msgpack.unpackb(raw, raw=False, max_array_len=16, max_map_len=0)
        _v, kind, _key, _fb, pub, body, _sig = frame
        if not isinstance(pub, bytes) or not isinstance(body, bytes) or not isinstance(kind, int):
            return None
        return packet_id_of(kind, pub, body)
    except Exception:  # hostile bytes: the full check in open_envelope reports the reason
        return None


def batches_within(raws: Sequence[bytes], budget: int) -> list[list[bytes]]:
    """Split envelopes into lists whose packed size stays within ``budget`` bytes."""
    out: list[list[bytes]] = []
    current: list[bytes] = []
    used = 0
    for raw in raws:
        size = len(raw) + 5
        if current and (used + size > budget or len(current) >= MAX_ENVELOPES_PER_REQUEST):
            out.append(current)
            current, used = [], 0
        current.append(raw)
        used += size
    if current:
        out.append(current)
    return out


# --------------------------------------------------------------------------- typed fields


@functools.lru_cache(maxsize=65_536)
def ip_version(host: str) -> int | None:
    """4 or 6 for an IP address literal, None for anything else (cached: called per contact)."""
    try:
        return ipaddress.ip_address(host).version
    except ValueError:
        return None


@functools.lru_cache(maxsize=65_536)
def _host_source(host: str) -> tuple[str, bool]:
    """(source label of ``host``, whether the port must be added: loopback)."""
    if host.startswith("::ffff:") and "." in host:
        host = host[7:]
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host, True
    if ip.is_loopback:
        return str(ip), True
    if ip.version == 6:
        return str(ipaddress.ip_network(f"{ip}/64", strict=False)), False
    return str(ip), False


def source_of(addr: tuple) -> str:
    """The source a datagram from ``addr`` counts against: rate limits and store eviction.

    One host is one source whatever ports it uses: an IPv4 address, or an IPv6 address's /64
    (a host is commonly given a whole /64). On a loopback address (127.0.0.0/8, ::1) the port
    is part of the source, because every node of a local test network shares that address
    (OpenDHT turns its per-IP limit off on loopback for the same reason).
    """
    label, with_port = _host_source(str(addr[0]))
    return f"{label}|{addr[1]}" if with_port else label


def node_id(value: Any) -> bytes:
    """A 160-bit node id or key, or WireError."""
    if not isinstance(value, bytes) or len(value) != NODE_ID_BYTES:
        raise WireError("bad_node_id")
    return value


def contact(value: Any) -> tuple[bytes, str, int]:
    """(id, host, port) of a contact triple from a reply, or WireError."""
    if not isinstance(value, list) or len(value) != 3:
        raise WireError("bad_contact")
    nid, host, port = value
    node_id(nid)
    if not isinstance(host, str) or not host or len(host) > MAX_HOST_CHARS:
        raise WireError("bad_contact")
    if ip_version(host) is None:
        raise WireError("bad_contact")
    if type(port) is not int or not 0 < port < 65536:
        raise WireError("bad_contact")
    return nid, host, port


def contacts(value: Any) -> list[tuple[bytes, str, int]]:
    """A list of contact triples; bad entries are a WireError for the whole reply."""
    if not isinstance(value, list) or len(value) > MAX_CONTACTS_IN_REPLY:
        raise WireError("bad_contacts")
    return [contact(v) for v in value]


def byte_list(value: Any, *, max_items: int) -> list[bytes]:
    """A list of byte strings (envelopes), or WireError."""
    if not isinstance(value, list) or len(value) > max_items:
        raise WireError("bad_list")
    if not all(isinstance(v, bytes) for v in value):
        raise WireError("bad_list")
    return value


def cursor(value: Any) -> int | None:
    """A store cursor from the wire: None or a non-negative int below 2**63."""
    if value is None:
        return None
    if type(value) is not int or not 0 <= value < 2**63:
        raise WireError("bad_cursor")
    return value


# --------------------------------------------------------------------------- address tokens

TOKEN_BYTES = 8
TOKEN_SECONDS = 300.0
"""The token secret rotates this often; a token stays valid for one more period after that."""
AMPLIFICATION_FACTOR = 3
"""To an address not yet validated, a reply is at most this many times its request's bytes
(the rule QUIC follows before address validation)."""


class AddressTokens:
    """Stateless address tokens: a keyed hash of the requester's address under a rotating secret.

    A node hands its token to a requester in small replies; a request that echoes it proves
    the requester receives datagrams at the address it sends from (an off-path spoofer never
    sees the token), so large replies may go there. Nothing is kept per requester: checking a
    token is one hash (as DNS cookies and BEP 5's tokens work).
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._epoch = -1
        self._secrets = (os.urandom(32), os.urandom(32))

    def _current(self) -> tuple[bytes, bytes]:
        epoch = int(self.clock() // TOKEN_SECONDS)
        if epoch != self._epoch:
            if epoch == self._epoch + 1:
                self._secrets = (os.urandom(32), self._secrets[0])
            else:
                self._secrets = (os.urandom(32), os.urandom(32))
            self._epoch = epoch
        return self._secrets

    @staticmethod
    def _mac(secret: bytes, addr: tuple) -> bytes:
        where = f"{addr[0]}|{addr[1]}".encode()
        return hashlib.blake2b(where, key=secret, digest_size=TOKEN_BYTES).digest()

    def issue(self, addr: tuple) -> bytes:
        """The token of ``addr`` now."""
        return self._mac(self._current()[0], addr)

    def valid(self, addr: tuple, token: bytes | None) -> bool:
        """True if ``token`` is ``addr``'s token of this period or the last."""
        if token is None:
            return False
        now, before = self._current()
        return token in (self._mac(now, addr), self._mac(before, addr))


# --------------------------------------------------------------------------- rate limit


class TokenBuckets:
    """Per-source token buckets: ``rate`` tokens a second, at most ``burst`` saved up.

    Holds at most ``max_sources`` buckets (least recently used dropped; a dropped source
    starts again with a full bucket, which is the most it could have had anyway).
    """

    def __init__(
        self,
        rate: float,
        burst: int,
        *,
        max_sources: int = 65_536,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rate = float(rate)
        self.burst = float(burst)
        self.max_sources = max_sources
        self.clock = clock
        self._buckets: OrderedDict[object, tuple[float, float]] = OrderedDict()

    def allow(self, source: object, cost: float = 1.0) -> bool:
        """Take ``cost`` tokens from ``source``'s bucket; False if it has not enough."""
        if math.isinf(self.rate):
            return True
        now = self.clock()
        tokens, stamp = self._buckets.pop(source, (self.burst, now))
        tokens = min(self.burst, tokens + (now - stamp) * self.rate)
        ok = tokens >= cost
        if ok:
            tokens -= cost
        self._buckets[source] = (tokens, now)
        while len(self._buckets) > self.max_sources:
            self._buckets.popitem(last=False)
        return ok

    def take(self, source: object, most: int) -> int:
        """Take up to ``most`` whole tokens from ``source``'s bucket; returns how many it got."""
        if math.isinf(self.rate) or most <= 0:
            return max(0, most)
        now = self.clock()
        tokens, stamp = self._buckets.pop(source, (self.burst, now))
        tokens = min(self.burst, tokens + (now - stamp) * self.rate)
        got = min(most, int(tokens))
        self._buckets[source] = (tokens - got, now)
        while len(self._buckets) > self.max_sources:
            self._buckets.popitem(last=False)
        return got
