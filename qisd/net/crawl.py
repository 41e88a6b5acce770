"""Iterative lookups that keep ``alpha`` RPCs in flight and move on as replies arrive.

kademlia's ``SpiderCrawl`` runs lock-step rounds: each round waits for the slowest of its alpha
calls, so one dead contact costs a full RPC timeout per round (defect 5), and its value crawl
stops at the first value and keeps one (defect 2). These subclasses replace ``_find`` with an
asyncio driver of the sans-I/O :class:`qisd.core.lookup.Lookup` (the simulator of
``bench/sim.py`` drives the same class in virtual time):

* at most ``alpha`` calls are *active*; a call unanswered after ``stall_after`` seconds (a few
  smoothed round trips, far below the RPC timeout) stops counting as active, so another contact
  is asked at once; a late reply is still used if it comes before the lookup ends;
* the lookup ends when each of the k closest contacts not known to have failed has answered
  or stalled;
* :class:`PacketCrawl` pages through every replica's packets (``find_packets``) along the way
  and returns them all, unmerged and unverified: the caller verifies and deduplicates.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kademlia.crawling import SpiderCrawl
from kademlia.node import Node

from qisd.core.lookup import Lookup

MAX_PAGES_PER_NODE = 4_096
"""A replica serving more pages than this for one key is cut off (10,000 packets need ~1,700)."""


@dataclass
class PacketReplies:
    """What a packet lookup collected."""

    nodes: list[Node] = field(default_factory=list)
    """The closest contacts that answered, nearest first (at most k)."""
    raws: dict[bytes, list[bytes]] = field(default_factory=dict)
    """Envelope bytes each answering contact returned, by contact id."""
    cursors: dict[bytes, int | None] = field(default_factory=dict)
    """Each answering contact's cursor after its last page (a follower resumes from it)."""
    messages: int = 0
    """RPCs sent by this lookup."""


class _Crawl(SpiderCrawl, abc.ABC):
    """Shared engine: an asyncio driver of the core :class:`~qisd.core.lookup.Lookup`.
    ``_ask(node)`` returns (ok, contacts found) for one contact."""

    def __init__(
        self,
        protocol: Any,
        node: Node,
        peers: list[Node],
        ksize: int,
        alpha: int,
        *,
        stall_after: Callable[[], float],
        meter: list[int] | None = None,
    ) -> None:
        super().__init__(protocol, node, peers, ksize, alpha)
        self.stall_after = stall_after
        self.meter = meter
        self.messages = 0
        self.lookup: Lookup[Node] = Lookup(node.id, protocol.source_node.id, peers, ksize, alpha)

    @abc.abstractmethod
    async def _ask(self, node: Node) -> tuple[bool, list[Node]]:
        """Ask one contact; (it answered, the contacts it returned)."""

    def _suspect(self, node_id: bytes) -> bool:
        check = getattr(self.protocol, "suspect", None)
        return bool(check(node_id)) if check is not None else False

    async def _find(self, rpcmethod: object = None) -> list[Node]:
        loop = asyncio.get_running_loop()
        lookup = self.lookup
        inflight: dict[asyncio.Task[tuple[bool, list[Node]]], Node] = {}
        try:
            while True:
                for node in lookup.next(loop.time(), self.stall_after(), self._suspect):
                    inflight[asyncio.ensure_future(self._ask(node))] = node
                if lookup.done:
                    break
                # No active call (every one stalled, no answer yet): wait for whichever ends.
                deadline = lookup.deadline()
                timeout = None if deadline is None else max(0.0, deadline - loop.time())
                done, _ = await asyncio.wait(
                    inflight, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
                )
                for task in done:
                    node = inflight.pop(task)
                    ok, found = task.result()
                    if ok:
                        lookup.answered(node.id, found)
                    else:
                        lookup.failed(node.id)
        finally:
            for task in inflight:
                # Leave stalled calls to finish on their own (their replies still update the
                # routing table); their results are no longer needed here.
                task.add_done_callback(_consume)
        return lookup.result()

    @property
    def expected(self) -> int:
        """How many of the k closest contacts this lookup heard of, answered or not: what a
        read of the key should have reached (a dead or silent one among them counts)."""
        return self.lookup.expected


def _consume(task: asyncio.Task[Any]) -> None:
    with contextlib.suppress(asyncio.CancelledError, Exception):
        task.result()


class NodeCrawl(_Crawl):
    """Find the k closest nodes to a target id (``find_node``).

    ``meter`` ([bytes, requests]) counts the replies' datagram bytes and the requests sent.
    """

    async def _ask(self, node: Node) -> tuple[bool, list[Node]]:
        self.messages += 1
        if self.meter is None:
            ok, found = await self.protocol.call_find_node(node, self.node)
        else:
            ok, found = await self.protocol.call_find_node(node, self.node, meter=self.meter)
        return ok, found if ok else []

    async def find(self) -> list[Node]:
        """The k closest contacts that answered, nearest first."""
        return await self._find()


class PacketCrawl(_Crawl):
    """Find the k closest nodes to a key and every packet they hold for it."""

    def __init__(
        self,
        protocol: Any,
        node: Node,
        peers: list[Node],
        ksize: int,
        alpha: int,
        *,
        stall_after: Callable[[], float],
        since: dict[bytes, int | None] | None = None,
    ) -> None:
        super().__init__(protocol, node, peers, ksize, alpha, stall_after=stall_after)
        self.replies = PacketReplies()
        self.since = since or {}
        self._paging: list[asyncio.Task[None]] = []

    async def _ask(self, node: Node) -> tuple[bool, list[Node]]:
        """First page: it answers the lookup; further pages are read in the background."""
        cursor = self.since.get(node.id)
        self.messages += 1
        ok, reply = await self.protocol.call_find_packets(node, self.node.id, cursor)
        if not ok:
            return False, []
        self.replies.raws[node.id] = list(reply.packets)
        self.replies.cursors[node.id] = reply.cursor
        if reply.more:
            self._paging.append(asyncio.ensure_future(self._rest(node, reply.cursor)))
        return True, reply.nodes

    async def _rest(self, node: Node, cursor: int | None) -> None:
        collected = self.replies.raws[node.id]
        for _page in range(MAX_PAGES_PER_NODE):
            self.messages += 1
            ok, reply = await self.protocol.call_find_packets(node, self.node.id, cursor)
            if not ok:
                return  # keep what earlier pages gave; the cursor says where they ended
            collected.extend(reply.packets)
            cursor = self.replies.cursors[node.id] = reply.cursor
            if not reply.more:
                return

    async def find(self) -> PacketReplies:
        """Every answering contact's packets and cursor, and the k closest that answered."""
        try:
            self.replies.nodes = await self._find()
            # Paging runs one RPC at a time per replica, each bounded by the RPC timeout.
            await asyncio.gather(*self._paging)
        finally:
            for task in self._paging:
                task.cancel()
        self.replies.messages = self.messages
        return self.replies
