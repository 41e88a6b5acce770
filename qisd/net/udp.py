"""The node's UDP socket on the event loop, without a library's datagram transport.

asyncio's and uvloop's datagram transports queue a send the kernel refuses for lack of room
and retry it themselves. With ``IP_RECVERR`` set (qisd reads ICMP errors, so a call to a
closed port fails at once), Linux answers a send that its own queueing discipline dropped with
``ENOBUFS``; libuv takes that for "try again" and retries at once, so on a slow uplink (a site
on 1 Mbit/s) the loop spins, re-sending fragments of the same datagrams into a full queue: in
the lab that was 3.4 million dropped packets and 11.9 MB on the wire for 0.7 MB the node meant
to send, every peer timing out, and a crash. Here a refused send is reported to the protocol
(``error_received``) and never retried by the shell: the protocol decides when to send again
(:meth:`qisd.net.dht.QisdProtocol._send`).

The object offers what the protocol and kademlia's ``Server`` use of a transport:
``sendto``, ``get_extra_info``, ``close``, ``abort``, ``is_closing``.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

MAX_READS_PER_WAKE = 256
"""Datagrams read per readiness callback before other work gets the loop."""
MAX_DATAGRAM = 65_535


class UdpEndpoint:
    """``sock`` (bound, any family) driven by the loop's reader callback (see the module
    docstring); ``protocol`` gets ``connection_made``, ``datagram_received``,
    ``error_received`` and ``connection_lost`` as from a transport."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket, protocol: Any):
        sock.setblocking(False)
        self._loop = loop
        self._sock: socket.socket | None = sock
        self._protocol = protocol
        self._sockname = sock.getsockname()
        protocol.connection_made(self)
        loop.add_reader(sock.fileno(), self._readable)

    def _readable(self) -> None:
        for _ in range(MAX_READS_PER_WAKE):
            sock = self._sock
            if sock is None:
                return
            try:
                data, addr = sock.recvfrom(MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                # A queued ICMP error (IP_RECVERR): the protocol reads the error queue.
                self._protocol.error_received(exc)
                continue
            self._protocol.datagram_received(data, addr)

    def sendto(self, data: bytes, addr: tuple) -> None:
        """Send one datagram now, or report why the kernel would not (never queued here)."""
        sock = self._sock
        if sock is None:
            return
        try:
            sock.sendto(data, addr)
        except OSError as exc:  # BlockingIOError (EAGAIN) included: the socket's buffer is full
            self._protocol.error_received(exc)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "socket":
            return self._sock
        if name == "sockname":
            return self._sockname
        return default

    def is_closing(self) -> bool:
        return self._sock is None

    def close(self) -> None:
        """Stop reading, close the socket, tell the protocol (once)."""
        sock, self._sock = self._sock, None
        if sock is None:
            return
        self._loop.remove_reader(sock.fileno())
        sock.close()
        self._loop.call_soon(self._protocol.connection_lost, None)

    abort = close
