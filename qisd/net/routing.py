"""The routing table of a qisd node: the pure table of ``qisd.core.table``, and the asyncio part.

Every rule of the buckets (and the defect fixes 1, 5, 11 and 12 of ``kademlia-defects.md``)
lives in :class:`qisd.core.table.Table`. This shell adds what needs the event loop: a full
bucket's head is asked whether it is alive (a verified ping), at most one such check per head
in flight (defect 12); and it keeps kademlia's ``RoutingTable`` method names
(``add_contact``, ``touch``, ``split_bucket``, ``lonely_buckets``), so kademlia's protocol code
drives it, with this node's clock as the core's ``now``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from kademlia.node import Node

from qisd.core.table import ID_SPACE_MAX, MAX_FORMER_CONTACTS, Bucket, Contact, Table

__all__ = ["ID_SPACE_MAX", "MAX_FORMER_CONTACTS", "Contact", "HeadCheck", "QisdRoutingTable"]

log = logging.getLogger(__name__)

HeadCheck = Callable[[Contact], Awaitable[bool]]


class QisdRoutingTable(Table):
    """The routing table of a qisd node.

    ``check_head`` is awaited to ask a full bucket's head whether it is alive (a verified
    ping); ``evict_after`` failures in a row remove a contact, which is then remembered in
    ``former`` so the node can try it again later (``DhtNode.rejoin``). ``on_evict`` is called
    with each evicted contact. ``protocol`` is kept for kademlia's code that expects it.
    """

    def __init__(
        self,
        protocol: object,
        ksize: int,
        node: Node,
        *,
        evict_after: int = 3,
        check_head: HeadCheck | None = None,
        on_evict: Callable[[Contact], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(node, ksize, evict_after=evict_after, on_evict=on_evict, now=clock())
        self.protocol = protocol
        self.check_head = check_head
        self.clock = clock
        self._head_checks: dict[bytes, asyncio.Task[None]] = {}

    def flush(self) -> None:
        """Forget every contact (kademlia's name)."""
        self.buckets = [Bucket(0, ID_SPACE_MAX, self.ksize, self.clock())]

    def split_bucket(self, index: int) -> None:
        """Split bucket ``index`` (kademlia's name)."""
        self.split(index, self.clock())

    def lonely_buckets(self) -> list[Bucket]:
        """Buckets to refresh (kademlia's name)."""
        return self.lonely(self.clock())

    def add_contact(self, node: Node) -> None:
        """Add or refresh ``node``; a full bucket that keeps it out has its head checked."""
        head = self.add(node, self.clock())
        if head is not None:
            self._check_head(head)

    def touch(self, node: Node) -> None:
        """A reply came from ``node``: reset its failures and move it to its bucket's tail."""
        self.heard_from(node, self.clock())

    def _check_head(self, head: Contact) -> None:
        """Ping a full bucket's head once (de-duplicated); a live head moves to the tail."""
        if self.check_head is None or head.id in self._head_checks:
            return
        self._head_checks[head.id] = asyncio.ensure_future(self._run_head_check(head))

    async def _run_head_check(self, head: Contact) -> None:
        try:
            assert self.check_head is not None
            alive = await self.check_head(head)
        except Exception:  # a check is best effort; never let it kill the loop
            log.debug("head check of %s failed", head, exc_info=True)
            alive = False
        finally:
            self._head_checks.pop(head.id, None)
        if alive:
            self.touch(head)
        else:
            self.record_failure(head)

    def cancel(self) -> None:
        """Stop pending head checks (node shutting down)."""
        for task in list(self._head_checks.values()):
            task.cancel()
        self._head_checks.clear()
