"""Kademlia routing table: kademlia's ``RoutingTable``/``KBucket`` with their defects fixed.

Fixes (numbers of ``kademlia-defects.md``):

1.  A contact parked in a bucket's replacement cache is not "new" on every message
    (``is_new_node`` looks at the cache too), so hand-off and head pings happen once.
5.  A contact is evicted after ``evict_after`` failures in a row, not after one.
11. ``find_neighbors`` returns the k closest contacts of the whole table (upstream #28).
12. A live bucket head is moved to the tail; at most one head ping per bucket is in flight;
    ``get_bucket_for`` is exact at bucket boundaries (ranges are inclusive).
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable

from kademlia.node import Node
from kademlia.routing import KBucket, RoutingTable

log = logging.getLogger(__name__)

ID_SPACE_MAX = 2**160 - 1
MAX_FORMER_CONTACTS = 32
"""Evicted contacts remembered for rejoining (the most recently evicted)."""


class Contact(Node):
    """A routing-table entry: a node id, its address, when it was last heard and failures."""

    def __init__(self, node_id: bytes, ip: str | None = None, port: int | None = None) -> None:
        super().__init__(node_id, ip, port)
        self.last_seen = 0.0
        self.failures = 0

    @classmethod
    def of(cls, node: Node) -> Contact:
        """``node`` as a Contact (the same object if it already is one)."""
        if isinstance(node, Contact):
            return node
        return cls(node.id, node.ip, node.port)

    def as_dict(self) -> dict[str, object]:
        """What ``DhtNode.peers()`` shows."""
        return {
            "id": self.id.hex(),
            "host": self.ip,
            "port": self.port,
            "last_seen": self.last_seen,
            "failures": self.failures,
        }


class QisdKBucket(KBucket):
    """A k-bucket whose replacement cache counts as known (defect 1)."""

    def split(self) -> tuple[QisdKBucket, QisdKBucket]:
        midpoint = (self.range[0] + self.range[1]) // 2
        one = QisdKBucket(self.range[0], midpoint, self.ksize)
        two = QisdKBucket(midpoint + 1, self.range[1], self.ksize)
        for node in [*self.nodes.values(), *self.replacement_nodes.values()]:
            (one if node.long_id <= midpoint else two).add_node(node)
        return one, two

    def is_new_node(self, node: Node) -> bool:
        return node.id not in self.nodes and node.id not in self.replacement_nodes

    def add_node(self, node: Node) -> bool:
        old = self.nodes.get(node.id) or self.replacement_nodes.get(node.id)
        if old is not None and isinstance(old, Contact) and isinstance(node, Contact):
            node.failures = 0
            node.last_seen = max(node.last_seen, old.last_seen)
        added = bool(super().add_node(node))
        if added:
            self.replacement_nodes.pop(node.id, None)
        return added


HeadCheck = Callable[[Contact], Awaitable[bool]]


class QisdRoutingTable(RoutingTable):
    """The routing table of a qisd node.

    ``check_head`` is awaited to ask a full bucket's head whether it is alive (a verified
    ping); ``evict_after`` failures in a row remove a contact, which is then remembered in
    ``former`` (the last :data:`MAX_FORMER_CONTACTS`) so the node can try it again later: two
    halves of a partition that evicted each other find their way back (``DhtNode.rejoin``).
    ``on_evict`` is called with each evicted contact.
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
        self.evict_after = max(1, evict_after)
        self.on_evict = on_evict
        self.former: OrderedDict[bytes, Contact] = OrderedDict()
        self.check_head = check_head
        self.clock = clock
        self._head_checks: dict[bytes, asyncio.Task[None]] = {}
        super().__init__(protocol, ksize, node)

    def flush(self) -> None:
        self.buckets = [QisdKBucket(0, ID_SPACE_MAX, self.ksize)]

    def get_bucket_for(self, node: Node) -> int:
        for index, bucket in enumerate(self.buckets):
            if node.long_id <= bucket.range[1]:
                return index
        raise ValueError("node id outside the 160-bit id space")

    # -- contacts

    def contacts(self) -> list[Contact]:
        """Every contact in the buckets (not the replacement caches)."""
        return [n for b in self.buckets for n in b.nodes.values()]

    def known(self) -> list[Contact]:
        """Every contact this node knows of: the buckets and their replacement caches. Who is
        closer to a key is judged on these (a full bucket parks live nodes in its cache, and a
        node judged on its buckets alone would think itself, or a newcomer, among the k closest
        of keys it is far from)."""
        return [
            n
            for b in self.buckets
            for n in (*b.nodes.values(), *b.replacement_nodes.values())
            if isinstance(n, Contact)
        ]

    def get(self, node_id: bytes) -> Contact | None:
        """The contact with ``node_id`` (bucket or replacement cache), if known."""
        bucket = self.buckets[self.get_bucket_for(Node(node_id))]
        found = bucket.nodes.get(node_id) or bucket.replacement_nodes.get(node_id)
        return found if isinstance(found, Contact) else None

    def has_room_for(self, node: Node) -> bool:
        """True if ``node`` would enter its bucket (room, or the bucket would split).

        A full bucket that would not split keeps its old, live contacts (Kademlia prefers
        them): a newcomer there is not worth a verification ping and a head ping.
        """
        bucket = self.buckets[self.get_bucket_for(node)]
        if len(bucket) < self.ksize or node.id in bucket.nodes:
            return True
        return bool(bucket.has_in_range(self.node) or bucket.depth() % 5 != 0)

    def add_contact(self, node: Node) -> None:
        """Add or refresh ``node`` (moved to its bucket's tail: live contacts stay)."""
        if node.id == self.node.id:
            return
        contact = Contact.of(node)
        contact.last_seen = self.clock()
        contact.failures = 0
        self.former.pop(contact.id, None)
        index = self.get_bucket_for(contact)
        bucket = self.buckets[index]
        if bucket.add_node(contact):
            return
        if bucket.has_in_range(self.node) or bucket.depth() % 5 != 0:
            self.split_bucket(index)
            self.add_contact(contact)
            return
        self._check_head(bucket)

    def _check_head(self, bucket: KBucket) -> None:
        """Ping a full bucket's head once (de-duplicated); a live head moves to the tail."""
        if self.check_head is None or not bucket.nodes:
            return
        head = bucket.head()
        if head.id in self._head_checks:
            return
        task = asyncio.ensure_future(self._run_head_check(Contact.of(head)))
        self._head_checks[head.id] = task

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

    def touch(self, node: Node) -> None:
        """A reply came from ``node``: reset its failures and move it to its bucket's tail."""
        bucket = self.buckets[self.get_bucket_for(node)]
        if node.id in bucket.nodes:
            contact = Contact.of(bucket.nodes[node.id])
            if node.ip is not None:
                contact.ip, contact.port = node.ip, node.port
            contact.failures = 0
            contact.last_seen = self.clock()
            del bucket.nodes[node.id]
            bucket.nodes[node.id] = contact
            bucket.touch_last_updated()

    def record_failure(self, node: Node) -> bool:
        """Count a failed call to ``node``; True if that evicted it."""
        bucket = self.buckets[self.get_bucket_for(node)]
        contact = bucket.nodes.get(node.id) or bucket.replacement_nodes.get(node.id)
        if contact is None:
            return False
        if not isinstance(contact, Contact):
            contact = Contact.of(contact)
        contact.failures += 1
        if contact.failures >= self.evict_after:
            bucket.remove_node(contact)
            if self.get(contact.id) is None:  # not promoted back from the replacement cache
                self.remember(contact)
                if self.on_evict is not None:
                    self.on_evict(contact)
            return True
        return False

    def remember(self, contact: Contact) -> None:
        """Keep ``contact`` among the former contacts to re-try (oldest dropped past the cap)."""
        if contact.id == self.node.id:
            return
        self.former.pop(contact.id, None)
        self.former[contact.id] = Contact(contact.id, contact.ip, contact.port)
        while len(self.former) > MAX_FORMER_CONTACTS:
            self.former.popitem(last=False)

    def remove_contact(self, node: Node) -> None:
        """Stock callers remove on one failure; qisd counts it instead (defect 5)."""
        self.record_failure(node)

    def find_neighbors(
        self, node: Node, k: int | None = None, exclude: Node | None = None
    ) -> list[Contact]:
        """The ``k`` contacts closest to ``node`` in the whole table (defect 11)."""
        k = k or self.ksize
        target = node.long_id
        skip = (exclude.ip, exclude.port) if exclude is not None else None
        candidates: Iterable[Contact] = (
            c
            for b in self.buckets
            for c in b.nodes.values()
            if c.long_id != target and (skip is None or (c.ip, c.port) != skip)
        )
        return heapq.nsmallest(k, candidates, key=lambda c: c.long_id ^ target)

    def cancel(self) -> None:
        """Stop pending head checks (node shutting down)."""
        for task in list(self._head_checks.values()):
            task.cancel()
        self._head_checks.clear()
