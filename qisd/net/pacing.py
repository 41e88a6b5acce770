"""Per-destination pacing: every request a node sends waits for a slot at its destination.

One :class:`Pacer` per node holds, for each peer address, a window of requests in flight that
grows by one per window of prompt replies, shrinks when replies come slower than a target
round trip (the peer is queueing: more in flight would only wait there), and halves on a
timeout or a *busy* reply (additive increase, multiplicative decrease, as TCP's congestion
window, with a delay signal as in Vegas or LEDBAT), and a time before which nothing is sent
after the peer said it is busy. Waiting requests are served foreground first: lookups, fresh
publishes and fetches go before hand-off, republish, replica sync and notify, which share the
same queue and so can never crowd a peer out by their number.

Above the destinations sits one budget of request bytes in flight for the whole node: its
uplink is shared by every destination, and a slow uplink (a site on 1 Mbit/s) overflows when
each destination's window is full at once. The budget starts at :data:`INITIAL_BUDGET`,
grows by each answered request's bytes until the first loss (slow start), then by about
:data:`GROWTH_BYTES` per budget's worth answered, and is cut by :data:`LOSS_CUT` each time this
host's own queue refuses a datagram (ENOBUFS, :meth:`Pacer.local_loss`): the one loss that is
surely the uplink's. A silent or dead peer costs its own window only. A request that finds
nothing in flight is always sent, so the budget can slow a node but never stop it.
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
INITIAL_BUDGET = 64 * 1024
"""Request bytes in flight for the whole node at first (TCP starts at ~15 kB per flow)."""
MIN_BUDGET = 16 * 1024
MAX_BUDGET = 16 * 1024 * 1024
LOSS_CUT = 0.7
"""The budget's cut on a loss (not TCP's 0.5: one lost datagram of a lookup is not always
congestion)."""
GROWTH_BYTES = 8 * 1024
"""After the first loss the budget grows by about this much per budget's worth answered."""
SMALL_REQUEST = 256
"""The cost of a request whose caller does not say (a ping, a lookup step)."""


@dataclass
class _Peer:
    window: float = INITIAL_WINDOW
    inflight: int = 0
    not_before: float = 0.0
    waiting: tuple[deque[tuple[asyncio.Future[None], int]], ...] = field(
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
        self.budget = float(INITIAL_BUDGET)
        """Request bytes in flight allowed for the whole node (see the module docstring)."""
        self.in_flight_bytes = 0
        self.losses = 0
        self._slow_start = True
        self._blocked: OrderedDict[tuple, None] = OrderedDict()
        """Destinations with a waiter held back by the budget, not by their own window."""

    def _peer(self, addr: tuple) -> _Peer:
        peer = self._peers.get(addr)
        if peer is not None:
            self._peers.move_to_end(addr)
            return peer
        peer = self._peers[addr] = _Peer()
        if len(self._peers) > MAX_PEERS:
            # Forget the least recently used destinations that are idle and not held back
            # (their state is only a window); one in use or held back is kept.
            now = self.clock()
            for old in list(self._peers)[: len(self._peers) - MAX_PEERS + 16]:
                idle = self._peers[old]
                if not (idle.inflight or idle.queued() or idle.not_before > now):
                    del self._peers[old]
        return peer

    def _room(self, cost: int) -> bool:
        return self.in_flight_bytes == 0 or self.in_flight_bytes + cost <= self.budget

    @contextlib.asynccontextmanager
    async def slot(
        self, addr: tuple, priority: int = FOREGROUND, cost: int = SMALL_REQUEST
    ) -> AsyncIterator[None]:
        """Hold one of ``addr``'s in-flight slots, and ``cost`` bytes of the node's budget,
        for the body of the ``async with``."""
        peer = self._peer(addr)
        if (
            peer.inflight >= int(peer.window)
            or peer.queued()
            or self.clock() < peer.not_before
            or not self._room(cost)
        ):
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            entry = (waiter, cost)
            peer.waiting[priority].append(entry)
            self._schedule(addr, peer)
            try:
                await waiter
            except asyncio.CancelledError:
                if not waiter.cancelled() and waiter.done():
                    self._release(addr, peer, cost)  # granted as we were cancelled
                else:
                    with contextlib.suppress(ValueError):
                        peer.waiting[priority].remove(entry)
                raise
        else:
            peer.inflight += 1
            self.in_flight_bytes += cost
        try:
            yield
        finally:
            self._release(addr, peer, cost)

    def _release(self, addr: tuple, peer: _Peer, cost: int) -> None:
        peer.inflight -= 1
        self.in_flight_bytes -= cost
        self._schedule(addr, peer)
        while self._blocked:  # the budget freed: destinations it held back, oldest first
            first = next(iter(self._blocked))
            del self._blocked[first]
            other = self._peers.get(first)
            if other is not None and not self._schedule(first, other):
                break

    def _schedule(self, addr: tuple, peer: _Peer) -> bool:
        """Grant slots to waiters, foreground first, as the window, the busy time and the
        node's budget allow; False if the budget held a waiter back."""
        now = self.clock()
        if now < peer.not_before:
            if peer.wake is None:
                loop = asyncio.get_running_loop()
                peer.wake = loop.call_later(peer.not_before - now, self._woken, addr)
            return True
        for queue in peer.waiting:
            while queue and peer.inflight < int(peer.window):
                waiter, cost = queue[0]
                if waiter.done():
                    queue.popleft()
                    continue
                if not self._room(cost):
                    self._blocked[addr] = None
                    return False
                queue.popleft()
                peer.inflight += 1
                self.in_flight_bytes += cost
                waiter.set_result(None)
        return True

    def _woken(self, addr: tuple) -> None:
        peer = self._peers.get(addr)
        if peer is not None:
            peer.wake = None
            self._schedule(addr, peer)

    def answered(self, addr: tuple, rtt: float = 0.0, cost: int = SMALL_REQUEST) -> None:
        """A reply came after ``rtt`` seconds to a request of ``cost`` bytes: the window grows
        by one per window of prompt replies and shrinks by a tenth for each slow one; the
        node's budget grows (see the module docstring)."""
        peer = self._peers.get(addr)
        if peer is None:
            return
        if self._slow_start:
            self.budget = min(MAX_BUDGET, self.budget + cost)
        else:
            self.budget = min(MAX_BUDGET, self.budget + GROWTH_BYTES * cost / self.budget)
        if rtt > self.target_rtt:
            peer.window = max(MIN_WINDOW, peer.window * 0.9)
        else:
            peer.window = min(MAX_WINDOW, peer.window + 1.0 / peer.window)

    def timed_out(self, addr: tuple) -> None:
        """No reply: halve the window (the node's budget is cut only by :meth:`local_loss`:
        a peer that drops or is dead says nothing of this host's uplink)."""
        peer = self._peers.get(addr)
        if peer is None:
            return
        peer.window = max(MIN_WINDOW, peer.window / 2)

    def local_loss(self) -> None:
        """This host's own send queue was full (ENOBUFS): the surest sign the budget is more
        than the uplink carries."""
        self.losses += 1
        self._slow_start = False
        self.budget = max(MIN_BUDGET, self.budget * LOSS_CUT)

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

    def summary(self) -> dict[str, float | int]:
        """The node's budget: bytes allowed and in flight, losses that cut it."""
        return {
            "budget_bytes": int(self.budget),
            "in_flight_bytes": self.in_flight_bytes,
            "losses": self.losses,
        }

    def queued(self) -> int:
        """Requests waiting for a slot, all destinations."""
        return sum(p.queued() for p in self._peers.values())
