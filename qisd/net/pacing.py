"""Per-destination pacing: every request a node sends waits for a slot at its destination.

One :class:`Pacer` per node holds, for each peer address, a window of requests in flight that
grows by one per window of prompt replies, shrinks when replies come slower than a target
round trip (the peer is queueing: more in flight would only wait there), and halves on a
timeout or a *busy* reply (additive increase, multiplicative decrease, as TCP's congestion
window, with a delay signal as in Vegas or LEDBAT), and a time before which nothing is sent
after the peer said it is busy. Waiting requests are served foreground first: lookups, fresh
publishes and fetches go before hand-off, republish, replica sync and notify, which share the
same queue and so can never crowd a peer out by their number.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

FOREGROUND = 0
BACKGROUND = 1
INITIAL_WINDOW = 8.0
MIN_WINDOW = 1.0
MAX_WINDOW = 64.0
MAX_BUSY_SECONDS = 5.0
"""A busy reply holds a destination back at most this long, whatever it asks: a peer (or a
forger who guessed a request id) cannot silence another for longer."""
MAX_PEERS = 4_096


@dataclass
class _Peer:
    window: float = INITIAL_WINDOW
    inflight: int = 0
    not_before: float = 0.0
    waiting: tuple[deque[asyncio.Future[None]], deque[asyncio.Future[None]]] = field(
        default_factory=lambda: (deque(), deque())
    )
    wake: asyncio.TimerHandle | None = None

    def queued(self) -> int:
        return len(self.waiting[0]) + len(self.waiting[1])


class Pacer:
    """Slots per destination address (see the module docstring)."""

    def __init__(
        self, *, target_rtt: float = 0.25, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.clock = clock
        self.target_rtt = target_rtt
        """Replies slower than this shrink the window (a quarter of the RPC timeout)."""
        self._peers: OrderedDict[tuple, _Peer] = OrderedDict()
        self.busy_waits = 0

    def _peer(self, addr: tuple) -> _Peer:
        peer = self._peers.get(addr)
        if peer is None:
            peer = self._peers[addr] = _Peer()
            # Forget idle destinations past the cap (their state is only a window).
            while len(self._peers) > MAX_PEERS:
                old, idle = next(iter(self._peers.items()))
                if idle.inflight or idle.queued():
                    break
                del self._peers[old]
        return peer

    @contextlib.asynccontextmanager
    async def slot(self, addr: tuple, priority: int = FOREGROUND) -> AsyncIterator[None]:
        """Hold one of ``addr``'s in-flight slots for the body of the ``async with``."""
        peer = self._peer(addr)
        if peer.inflight >= int(peer.window) or peer.queued() or self.clock() < peer.not_before:
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            peer.waiting[priority].append(waiter)
            self._schedule(addr, peer)
            try:
                await waiter
            except asyncio.CancelledError:
                if not waiter.cancelled() and waiter.done():
                    peer.inflight -= 1  # granted as we were cancelled: give it back
                    self._schedule(addr, peer)
                else:
                    with contextlib.suppress(ValueError):
                        peer.waiting[priority].remove(waiter)
                raise
        else:
            peer.inflight += 1
        try:
            yield
        finally:
            peer.inflight -= 1
            self._schedule(addr, peer)

    def _schedule(self, addr: tuple, peer: _Peer) -> None:
        """Grant slots to waiters, foreground first, as the window and busy time allow."""
        now = self.clock()
        if now < peer.not_before:
            if peer.wake is None:
                loop = asyncio.get_running_loop()
                peer.wake = loop.call_later(peer.not_before - now, self._woken, addr)
            return
        for queue in peer.waiting:
            while queue and peer.inflight < int(peer.window):
                waiter = queue.popleft()
                if waiter.done():
                    continue
                peer.inflight += 1
                waiter.set_result(None)

    def _woken(self, addr: tuple) -> None:
        peer = self._peers.get(addr)
        if peer is not None:
            peer.wake = None
            self._schedule(addr, peer)

    def answered(self, addr: tuple, rtt: float = 0.0) -> None:
        """A reply came after ``rtt`` seconds: the window grows by one per window of prompt
        replies, and shrinks by a tenth for each slow one."""
        peer = self._peers.get(addr)
        if peer is None:
            return
        if rtt > self.target_rtt:
            peer.window = max(MIN_WINDOW, peer.window * 0.9)
        else:
            peer.window = min(MAX_WINDOW, peer.window + 1.0 / peer.window)

    def timed_out(self, addr: tuple) -> None:
        """No reply: halve the window."""
        peer = self._peers.get(addr)
        if peer is not None:
            peer.window = max(MIN_WINDOW, peer.window / 2)

    def busy(self, addr: tuple, retry_after: float) -> float:
        """``addr`` said it is busy: halve the window, send nothing for ``retry_after`` seconds
        (at most :data:`MAX_BUSY_SECONDS`); returns the wait applied."""
        wait = min(MAX_BUSY_SECONDS, max(0.0, retry_after))
        peer = self._peer(addr)
        peer.window = max(MIN_WINDOW, peer.window / 2)
        peer.not_before = max(peer.not_before, self.clock() + wait)
        self.busy_waits += 1
        return wait

    def stats(self) -> dict[str, dict[str, float | int]]:
        """Per destination with work: window, in flight, queued, seconds held back."""
        now = self.clock()
        return {
            f"{addr[0]}:{addr[1]}": {
                "window": round(p.window, 2),
                "in_flight": p.inflight,
                "queued": p.queued(),
                "held_seconds": round(max(0.0, p.not_before - now), 3),
            }
            for addr, p in self._peers.items()
            if p.inflight or p.queued() or p.not_before > now
        }

    def queued(self) -> int:
        """Requests waiting for a slot, all destinations."""
        return sum(p.queued() for p in self._peers.values())
