"""The Kademlia routing table, pure: k-buckets with replacement caches, no I/O and no clock.

This is kademlia's ``RoutingTable``/``KBucket`` (same attribute names and split rule, section
4.2 of the paper) with qisd's fixes (numbers of ``docs/kademlia-defects.md``):

1.  A contact parked in a bucket's replacement cache is not "new" on every message
    (``is_new_node`` looks at the cache too), so hand-off and head pings happen once.
5.  A contact is evicted after ``evict_after`` failures in a row, not after one.
11. ``find_neighbors`` returns the k closest contacts of the whole table (upstream #28).
12. A live bucket head is moved to the tail; ``get_bucket_for`` is exact at bucket boundaries
    (ranges are inclusive). (At most one head ping per bucket in flight is the shell's part.)

It is not a subclass of kademlia's classes because the core imports no I/O: kademlia's
``routing`` module imports asyncio and its buckets read ``time.monotonic()``. Time is the
caller's ``now``. When a full bucket will not split, :meth:`Table.add` returns the bucket's head
for the caller to check (a ping is I/O); the caller reports the outcome with
:meth:`Table.heard_from` or :meth:`Table.record_failure`. ``qisd.net.routing`` is that caller
on real sockets, ``bench/sim.py`` in virtual time.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Protocol

ID_SPACE_MAX = 2**160 - 1
MAX_FORMER_CONTACTS = 32
"""Evicted contacts remembered for rejoining (the most recently evicted)."""
REPLACEMENT_FACTOR = 5
"""A bucket's replacement cache holds this many times k contacts (kademlia's default)."""
SUSPECT_SLACK = 8
""":meth:`Table.closest_live` looks this many contacts past k to make up for suspects."""
LONELY_SECONDS = 3600.0
"""A bucket not updated for this long is refreshed by a lookup (kademlia's rule)."""


class Addressed(Protocol):
    """What the table needs of a contact it is given: an id, its integer and an address."""

    @property
    def id(self) -> bytes: ...

    @property
    def long_id(self) -> int: ...

    @property
    def ip(self) -> str | None: ...

    @property
    def port(self) -> int | None: ...


class Contact:
    """A routing-table entry: a node id, its address, when it was last heard and failures.

    It has kademlia ``Node``'s interface (``id``, ``ip``, ``port``, ``long_id``,
    ``distance_to``, ``same_home_as``, ``tuple(contact)``), so kademlia's code takes it.
    """

    __slots__ = ("id", "ip", "port", "long_id", "last_seen", "failures")

    def __init__(self, node_id: bytes, ip: str | None = None, port: int | None = None) -> None:
        self.id = node_id
        self.ip = ip
        self.port = port
        self.long_id = int.from_bytes(node_id, "big")
        self.last_seen = 0.0
        self.failures = 0

    @classmethod
    def of(cls, node: Addressed) -> Contact:
        """``node`` as a Contact (the same object if it already is one)."""
        if isinstance(node, Contact):
            return node
        contact = cls.__new__(cls)
        contact.id, contact.ip, contact.port = node.id, node.ip, node.port
        contact.long_id = node.long_id  # shared, not recomputed: 10^5-node simulations hold 10^7
        contact.last_seen = 0.0
        contact.failures = 0
        return contact

    def same_home_as(self, node: Addressed) -> bool:
        return self.ip == node.ip and self.port == node.port

    def distance_to(self, node: Addressed) -> int:
        return self.long_id ^ node.long_id

    def __iter__(self) -> Iterator[object]:
        return iter([self.id, self.ip, self.port])

    def __repr__(self) -> str:
        return repr([self.long_id, self.ip, self.port])

    def __str__(self) -> str:
        return f"{self.ip}:{self.port}"

    def as_dict(self) -> dict[str, object]:
        """What ``DhtNode.peers()`` shows."""
        return {
            "id": self.id.hex(),
            "host": self.ip,
            "port": self.port,
            "last_seen": self.last_seen,
            "failures": self.failures,
        }


def _prefix_length(ids: list[bytes]) -> int:
    """Bits the ids share from the top (kademlia's ``depth``)."""
    if not ids:
        return 0
    low, high = min(ids), max(ids)
    differ = int.from_bytes(low, "big") ^ int.from_bytes(high, "big")
    return len(low) * 8 - differ.bit_length()


def _floor_distance(span: tuple[int, int], target: int) -> int:
    """The least XOR distance from ``target`` to an id in the aligned subtree ``span``."""
    lower, upper = span
    return (target ^ lower) & ~(upper - lower)


def _first(pair: tuple[int, Contact]) -> int:
    return pair[0]


class Bucket:
    """A k-bucket: up to ``ksize`` contacts, least recently seen first, and a replacement cache
    of the newest contacts that did not fit. The cache counts as known (defect 1)."""

    __slots__ = (
        "range",
        "nodes",
        "replacement_nodes",
        "ksize",
        "max_replacement_nodes",
        "last_updated",
    )

    def __init__(self, lower: int, upper: int, ksize: int, now: float) -> None:
        self.range = (lower, upper)
        self.nodes: OrderedDict[bytes, Contact] = OrderedDict()
        self.replacement_nodes: OrderedDict[bytes, Contact] = OrderedDict()
        self.ksize = ksize
        self.max_replacement_nodes = ksize * REPLACEMENT_FACTOR
        self.last_updated = now

    def __len__(self) -> int:
        return len(self.nodes)

    def get_nodes(self) -> list[Contact]:
        return list(self.nodes.values())

    def head(self) -> Contact:
        """The least recently seen contact."""
        return next(iter(self.nodes.values()))

    def has_in_range(self, node: Addressed) -> bool:
        return self.range[0] <= node.long_id <= self.range[1]

    def is_new_node(self, node: Addressed) -> bool:
        return node.id not in self.nodes and node.id not in self.replacement_nodes

    def depth(self) -> int:
        """The length of the id prefix the bucket's contacts share."""
        return _prefix_length(list(self.nodes))

    def split(self, now: float) -> tuple[Bucket, Bucket]:
        midpoint = (self.range[0] + self.range[1]) // 2
        one = Bucket(self.range[0], midpoint, self.ksize, now)
        two = Bucket(midpoint + 1, self.range[1], self.ksize, now)
        for node in [*self.nodes.values(), *self.replacement_nodes.values()]:
            (one if node.long_id <= midpoint else two).add_node(node)
        return one, two

    def add_node(self, node: Contact) -> bool:
        """Add or refresh ``node``; False if the bucket is full (it is then cached)."""
        old = self.nodes.get(node.id) or self.replacement_nodes.get(node.id)
        if old is not None:
            node.failures = 0
            node.last_seen = max(node.last_seen, old.last_seen)
        if node.id in self.nodes:
            del self.nodes[node.id]
            self.nodes[node.id] = node
        elif len(self.nodes) < self.ksize:
            self.nodes[node.id] = node
        else:
            self.replacement_nodes.pop(node.id, None)
            self.replacement_nodes[node.id] = node
            while len(self.replacement_nodes) > self.max_replacement_nodes:
                self.replacement_nodes.popitem(last=False)
            return False
        self.replacement_nodes.pop(node.id, None)
        return True

    def remove_node(self, node: Addressed) -> None:
        """Drop ``node``; the newest cached contact takes a freed place."""
        self.replacement_nodes.pop(node.id, None)
        if self.nodes.pop(node.id, None) is not None and self.replacement_nodes:
            newest_id, newest = self.replacement_nodes.popitem()
            self.nodes[newest_id] = newest


class Table:
    """The routing table of the node ``node`` (anything with ``id`` and ``long_id``).

    ``evict_after`` failures in a row remove a contact, which is then remembered in ``former``
    (the last :data:`MAX_FORMER_CONTACTS`) so the node can try it again later: two halves of a
    partition that evicted each other find their way back. ``on_evict`` is called with each
    evicted contact.
    """

    def __init__(
        self,
        node: Addressed,
        ksize: int,
        *,
        evict_after: int = 3,
        on_evict: Callable[[Contact], None] | None = None,
        now: float = 0.0,
    ) -> None:
        self.node = node
        self.ksize = ksize
        self.evict_after = max(1, evict_after)
        self.on_evict = on_evict
        self.former: OrderedDict[bytes, Contact] = OrderedDict()
        self.buckets = [Bucket(0, ID_SPACE_MAX, ksize, now)]

    # -- buckets

    def get_bucket_for(self, node: Addressed) -> int:
        """The index of the bucket whose (inclusive) range holds ``node``'s id."""
        long_id = node.long_id
        for index, bucket in enumerate(self.buckets):
            if long_id <= bucket.range[1]:
                return index
        raise ValueError("node id outside the 160-bit id space")

    def split(self, index: int, now: float) -> None:
        """Split bucket ``index`` in two halves of its range."""
        one, two = self.buckets[index].split(now)
        self.buckets[index] = one
        self.buckets.insert(index + 1, two)

    def splits(self, bucket: Bucket) -> bool:
        """True if a full ``bucket`` splits rather than refuse a newcomer: it holds this node's
        id, or its depth is not 0 mod 5 (section 4.2 of the paper)."""
        return bucket.has_in_range(self.node) or bucket.depth() % 5 != 0

    def lonely(self, now: float) -> list[Bucket]:
        """Buckets not updated for :data:`LONELY_SECONDS`."""
        return [b for b in self.buckets if b.last_updated < now - LONELY_SECONDS]

    # -- contacts

    def contacts(self) -> list[Contact]:
        """Every contact in the buckets (not the replacement caches)."""
        return [n for b in self.buckets for n in b.nodes.values()]

    def known(self) -> list[Contact]:
        """Every contact this node knows of: the buckets and their replacement caches. Who is
        closer to a key is judged on these (a full bucket parks live nodes in its cache, and a
        node judged on its buckets alone would think itself, or a newcomer, among the k closest
        of keys it is far from)."""
        return [n for b in self.buckets for n in (*b.nodes.values(), *b.replacement_nodes.values())]

    def get(self, node_id: bytes) -> Contact | None:
        """The contact with ``node_id`` (bucket or replacement cache), if known."""
        bucket = self.buckets[self.get_bucket_for(Contact(node_id))]
        return bucket.nodes.get(node_id) or bucket.replacement_nodes.get(node_id)

    def suspect(self, node_id: bytes) -> bool:
        """True if the last call to this contact failed: lookups ask it but never wait on it,
        and replies do not hand it out."""
        contact = self.get(node_id)
        return contact is not None and contact.failures > 0

    def is_new_node(self, node: Addressed) -> bool:
        """True if ``node`` is in no bucket and no replacement cache."""
        return self.buckets[self.get_bucket_for(node)].is_new_node(node)

    def has_room_for(self, node: Addressed) -> bool:
        """True if ``node`` would enter its bucket (room, or the bucket would split).

        A full bucket that would not split keeps its old, live contacts (Kademlia prefers
        them): a newcomer there is not worth a verification ping and a head ping.
        """
        bucket = self.buckets[self.get_bucket_for(node)]
        if len(bucket) < self.ksize or node.id in bucket.nodes:
            return True
        return self.splits(bucket)

    def add(self, node: Addressed, now: float) -> Contact | None:
        """Add or refresh ``node`` (moved to its bucket's tail: live contacts stay). If its
        bucket is full and will not split, ``node`` waits in the replacement cache and the
        bucket's head is returned: the caller should check it is alive."""
        if node.id == self.node.id:
            return None
        contact = Contact.of(node)
        contact.last_seen = now
        contact.failures = 0
        self.former.pop(contact.id, None)
        while True:
            index = self.get_bucket_for(contact)
            bucket = self.buckets[index]
            if bucket.add_node(contact):
                return None
            if not self.splits(bucket):
                return bucket.head() if bucket.nodes else None
            self.split(index, now)

    def heard_from(self, node: Addressed, now: float) -> None:
        """A reply came from ``node``: reset its failures and move it to its bucket's tail."""
        bucket = self.buckets[self.get_bucket_for(node)]
        contact = bucket.nodes.get(node.id)
        if contact is None:
            return
        if node.ip is not None:
            contact.ip, contact.port = node.ip, node.port
        contact.failures = 0
        contact.last_seen = now
        del bucket.nodes[node.id]
        bucket.nodes[node.id] = contact
        bucket.last_updated = now

    def record_failure(self, node: Addressed) -> bool:
        """Count a failed call to ``node``; True if that evicted it."""
        bucket = self.buckets[self.get_bucket_for(node)]
        contact = bucket.nodes.get(node.id) or bucket.replacement_nodes.get(node.id)
        if contact is None:
            return False
        contact.failures += 1
        if contact.failures < self.evict_after:
            return False
        bucket.remove_node(contact)
        if self.get(contact.id) is None:  # not promoted back from the replacement cache
            self.remember(contact)
            if self.on_evict is not None:
                self.on_evict(contact)
        return True

    def remove_contact(self, node: Addressed) -> None:
        """Stock callers remove on one failure; qisd counts it instead (defect 5)."""
        self.record_failure(node)

    def remember(self, contact: Contact) -> None:
        """Keep ``contact`` among the former contacts to re-try (oldest dropped past the cap)."""
        if contact.id == self.node.id:
            return
        self.former.pop(contact.id, None)
        self.former[contact.id] = Contact(contact.id, contact.ip, contact.port)
        while len(self.former) > MAX_FORMER_CONTACTS:
            self.former.popitem(last=False)

    def find_neighbors(
        self, node: Addressed, k: int | None = None, exclude: Addressed | None = None
    ) -> list[Contact]:
        """The ``k`` contacts closest to ``node`` in the whole table (defect 11), none at
        ``exclude``'s address and never ``node`` itself.

        Buckets are aligned id subtrees, so each has a least possible distance to ``node``;
        they are read nearest first, and reading stops once the next one cannot hold a contact
        closer than the k-th found (the same answer as reading every bucket, a few buckets
        read instead of all)."""
        k = k or self.ksize
        target = node.long_id
        skip = (exclude.ip, exclude.port) if exclude is not None else None
        ranked = sorted((_floor_distance(b.range, target), i) for i, b in enumerate(self.buckets))
        found: list[tuple[int, Contact]] = []
        for floor, index in ranked:
            if len(found) >= k and floor > heapq.nsmallest(k, found, key=_first)[-1][0]:
                break
            for c in self.buckets[index].nodes.values():
                if c.long_id != target and (skip is None or (c.ip, c.port) != skip):
                    found.append((c.long_id ^ target, c))
        return [c for _d, c in heapq.nsmallest(k, found, key=_first)]

    def closest_live(
        self, node: Addressed, k: int | None = None, exclude: Addressed | None = None
    ) -> list[Contact]:
        """What a ``find_node`` reply names: the ``k`` closest contacts to ``node`` that are
        not suspect (a dead contact is not handed out), as :meth:`find_neighbors` finds them."""
        k = k or self.ksize
        nearest = self.find_neighbors(node, k + SUSPECT_SLACK, exclude=exclude)
        return [c for c in nearest if c.failures == 0][:k]
