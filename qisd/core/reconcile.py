"""Range-based set reconciliation of the packet ids held under one key.

Two nodes that hold packets of the same key find out which ids each lacks by exchanging
summaries of id *ranges* instead of the ids themselves (Meyer's range-based set reconciliation,
as negentropy builds it): a range is summarised by its count and a fingerprint; ranges whose
summaries agree are done, ranges that differ are split, and small ranges are sent as id lists.
Two equal sets agree in one round trip of a few dozen bytes; a set that lacks ``d`` of ``n``
ids costs about ``d`` ids plus ``log16(n)`` rounds of summaries.

Items are ``(timestamp_ms, packet_id)`` pairs, ordered by time first, so what is new sits in the
last ranges (a follower's catch-up touches only those). A range is the half-open interval
``[lower, upper)`` of bounds (``(timestamp_ms, id prefix)``).

The responder is stateless (:func:`respond`): each request carries every range it is about,
so serving costs no per-peer memory and a request is answered on its own. The initiator
(:class:`Reconciliation`) keeps the ranges still open and checks every reply against what it
asked: a reply range outside the asked range, a page that does not advance, or more ids or
rounds than the bounds allow is a :class:`ReconcileError`, and the caller drops that replica.

Pure: no I/O, no clock. Sizes are counted in msgpack bytes by the caller's ``budget``.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

ID_BYTES = 16
"""A packet id on the wire: the 16 bytes of its BLAKE2b-128 hash."""
MASK = (1 << 128) - 1
MAX_TIMESTAMP = 2**63
"""Above every item's timestamp (timestamps are below 2**63)."""
LOWEST: tuple[int, bytes] = (0, b"")
HIGHEST: tuple[int, bytes] = (MAX_TIMESTAMP, b"")

MODE_FINGERPRINT = 0
"""``[lo_ts, lo_id, hi_ts, hi_id, 0, count, fingerprint]``: the sender's summary of the range."""
MODE_IDS = 1
"""``[lo_ts, lo_id, hi_ts, hi_id, 1, [ids]]``: every id the sender holds in the range."""
MODE_DIFF = 2
"""``[lo_ts, lo_id, hi_ts, hi_id, 2, [ids only the responder holds], [ids only the initiator
holds]]``: the responder's answer to an id list; final for that range."""

ID_LIST_MAX = 32
"""A side holding at most this many ids in a differing range sends them instead of splitting."""
SPLIT = 16
"""A differing range too large for an id list is split into this many sub-ranges."""
FINGERPRINT_BYTES = 12
RANGE_BYTES = 2 * (9 + 2 + ID_BYTES) + 2
"""An upper bound on the packed size of a range's bounds and mode."""
FINGERPRINT_RANGE_BYTES = RANGE_BYTES + 9 + 2 + FINGERPRINT_BYTES
ID_ENTRY_BYTES = ID_BYTES + 2
MAX_ROUNDS = 512
"""An initiator gives up on a replica after this many requests for one reconciliation."""

Bound = tuple[int, bytes]
Item = tuple[int, bytes]


class ReconcileError(Exception):
    """A peer's reconciliation message is malformed or inconsistent with what was asked."""


def _fingerprint(total: int, count: int) -> bytes:
    data = (total & MASK).to_bytes(16, "big") + count.to_bytes(8, "big")
    return hashlib.blake2b(data, digest_size=FINGERPRINT_BYTES, person=b"qisd/recon").digest()


class ItemSet:
    """A sorted set of items with prefix sums: a range's count and fingerprint in O(log n)."""

    __slots__ = ("items", "_prefix", "_ids")

    def __init__(self, items: Iterable[Item]) -> None:
        self.items: list[Item] = sorted(set(items))
        prefix = [0]
        total = 0
        for _ts, pid in self.items:
            total = (total + int.from_bytes(pid, "big")) & MASK
            prefix.append(total)
        self._prefix = prefix
        self._ids = {pid for _ts, pid in self.items}

    def __len__(self) -> int:
        return len(self.items)

    def __contains__(self, pid: object) -> bool:
        return pid in self._ids

    def span(self, lower: Bound, upper: Bound) -> tuple[int, int]:
        """Indexes ``[i, j)`` of the items in ``[lower, upper)``."""
        i = bisect.bisect_left(self.items, lower)
        j = bisect.bisect_left(self.items, upper, lo=i)
        return i, j

    def fingerprint(self, i: int, j: int) -> bytes:
        """The fingerprint of ``items[i:j]`` (count and sum of ids, hashed)."""
        return _fingerprint(self._prefix[j] - self._prefix[i], j - i)

    def ids(self, i: int, j: int) -> list[bytes]:
        return [pid for _ts, pid in self.items[i:j]]

    def summary(self) -> tuple[int, bytes]:
        """(count, fingerprint) of the whole set."""
        return len(self.items), self.fingerprint(0, len(self.items))


# --------------------------------------------------------------------------- wire shapes


def _bound(ts: Any, pid: Any) -> Bound:
    if type(ts) is not int or not 0 <= ts <= MAX_TIMESTAMP:
        raise ReconcileError("bad bound")
    if not isinstance(pid, bytes) or len(pid) > ID_BYTES:
        raise ReconcileError("bad bound")
    return ts, pid


def _ids(value: Any, limit: int) -> list[bytes]:
    if not isinstance(value, list) or len(value) > limit:
        raise ReconcileError("bad id list")
    for pid in value:
        if not isinstance(pid, bytes) or len(pid) != ID_BYTES:
            raise ReconcileError("bad id")
    return value


@dataclass(frozen=True)
class Range:
    """One range of a reconciliation message (validated on construction from the wire)."""

    lower: Bound
    upper: Bound
    mode: int
    count: int = 0
    fingerprint: bytes = b""
    ids: tuple[bytes, ...] = ()
    theirs: tuple[bytes, ...] = ()
    """MODE_DIFF only: ids only the initiator holds."""

    @classmethod
    def parse(cls, value: Any, *, max_ids: int) -> Range:
        if not isinstance(value, list) or len(value) < 6:
            raise ReconcileError("bad range")
        lower = _bound(value[0], value[1])
        upper = _bound(value[2], value[3])
        if not lower < upper:
            raise ReconcileError("empty range")
        mode = value[4]
        if mode == MODE_FINGERPRINT and len(value) == 7:
            count, fp = value[5], value[6]
            if type(count) is not int or not 0 <= count < 2**40:
                raise ReconcileError("bad count")
            if not isinstance(fp, bytes) or len(fp) != FINGERPRINT_BYTES:
                raise ReconcileError("bad fingerprint")
            return cls(lower, upper, mode, count=count, fingerprint=fp)
        if mode == MODE_IDS and len(value) == 6:
            return cls(lower, upper, mode, ids=tuple(_ids(value[5], max_ids)))
        if mode == MODE_DIFF and len(value) == 7:
            return cls(
                lower,
                upper,
                mode,
                ids=tuple(_ids(value[5], max_ids)),
                theirs=tuple(_ids(value[6], max_ids)),
            )
        raise ReconcileError("bad range mode")

    def wire(self) -> list[Any]:
        head: list[Any] = [*self.lower, *self.upper, self.mode]
        if self.mode == MODE_FINGERPRINT:
            return [*head, self.count, self.fingerprint]
        if self.mode == MODE_IDS:
            return [*head, list(self.ids)]
        return [*head, list(self.ids), list(self.theirs)]

    def size(self) -> int:
        """An upper bound of this range's packed bytes."""
        if self.mode == MODE_FINGERPRINT:
            return FINGERPRINT_RANGE_BYTES
        return RANGE_BYTES + 6 + ID_ENTRY_BYTES * (len(self.ids) + len(self.theirs))


def parse_ranges(value: Any, *, max_ranges: int, max_ids: int) -> list[Range]:
    """A message's ranges from the wire; ReconcileError if malformed."""
    if not isinstance(value, list) or len(value) > max_ranges:
        raise ReconcileError("bad ranges")
    return [Range.parse(r, max_ids=max_ids) for r in value]


def _summary(items: ItemSet, lower: Bound, upper: Bound, i: int, j: int) -> Range:
    return Range(lower, upper, MODE_FINGERPRINT, count=j - i, fingerprint=items.fingerprint(i, j))


def _split(items: ItemSet, lower: Bound, upper: Bound, i: int, j: int) -> list[Range]:
    """``[lower, upper)`` cut into about :data:`SPLIT` summaries at item boundaries."""
    n = j - i
    cuts = [lower]
    for s in range(1, SPLIT):
        k = i + (n * s) // SPLIT
        if i < k < j:
            bound = items.items[k]
            if bound > cuts[-1]:
                cuts.append(bound)
    cuts.append(upper)
    out = []
    for a, b in zip(cuts, cuts[1:], strict=False):
        ia, ib = items.span(a, b)
        out.append(_summary(items, a, b, ia, ib))
    return out


def _paged_ids(
    items: ItemSet, lower: Bound, upper: Bound, i: int, j: int, room: int, theirs: set[bytes]
) -> list[Range]:
    """This side's ids of ``[lower, upper)``, as many as fit ``room`` bytes.

    With ``theirs`` (the other side's complete id list of the range, a MODE_IDS question) the
    answer is a MODE_DIFF: the ids the other side lacks, and every id of ``theirs`` this side
    lacks (it cannot place those in time, so they are named for the whole asked range).
    Without, it is this side's MODE_IDS list. What does not fit is summarised as a remainder
    range ``[cut, upper)``, which the other side asks about again.
    """
    lacking = sorted(pid for pid in theirs if pid not in items)
    fixed = 2 * RANGE_BYTES + FINGERPRINT_RANGE_BYTES + 12 + ID_ENTRY_BYTES * len(lacking)
    fit = max(1, (room - fixed) // ID_ENTRY_BYTES)
    page: list[bytes] = []
    cut_index = j
    for k in range(i, j):
        pid = items.items[k][1]
        if pid in theirs:
            continue
        if len(page) == fit:
            cut_index = k
            break
        page.append(pid)
    cut = upper if cut_index == j else items.items[cut_index]
    out: list[Range] = []
    if theirs:
        out.append(Range(lower, cut, MODE_DIFF, ids=tuple(page), theirs=tuple(lacking)))
    else:
        out.append(Range(lower, cut, MODE_IDS, ids=tuple(page)))
    if cut < upper:
        out.append(_summary(items, cut, upper, cut_index, j))
    return out


def respond(items: ItemSet, ranges: Sequence[Range], budget: int) -> tuple[list[Range], int]:
    """A responder's answer to ``ranges``: (answer ranges, how many input ranges it covers).

    Ranges that agree are left out. Input ranges past the returned count were not looked at
    (the reply would not fit ``budget`` bytes): the initiator asks them again.
    """
    out: list[Range] = []
    used = 0
    for n, asked in enumerate(ranges):
        i, j = items.span(asked.lower, asked.upper)
        room = budget - used
        if room < 2 * FINGERPRINT_RANGE_BYTES + ID_ENTRY_BYTES * 4:
            return out, n
        answer: list[Range]
        if asked.mode == MODE_FINGERPRINT:
            if asked.count == j - i and asked.fingerprint == items.fingerprint(i, j):
                continue
            if j - i <= ID_LIST_MAX or asked.count == 0:
                answer = _paged_ids(items, asked.lower, asked.upper, i, j, room, set())
            else:
                answer = _split(items, asked.lower, asked.upper, i, j)
        elif asked.mode == MODE_IDS:
            answer = _paged_ids(items, asked.lower, asked.upper, i, j, room, set(asked.ids))
        else:
            raise ReconcileError("a diff is an answer, not a question")
        size = sum(r.size() for r in answer)
        if size > room:
            if out:
                return out, n
            raise ReconcileError("budget too small for one range")
        out.extend(answer)
        used += size
    return out, len(ranges)


# --------------------------------------------------------------------------- initiator


@dataclass
class Reconciliation:
    """The initiator's side: which ids the peer holds that we lack (``need``) and which we
    hold that it lacks (``lack``), against a snapshot ``mine`` of our items."""

    mine: ItemSet
    max_ids: int = 200_000
    """More ids than this learned from one peer is a lie (a key holds at most 100,000)."""
    need: set[bytes] = field(default_factory=set)
    lack: set[bytes] = field(default_factory=set)
    rounds: int = 0
    _open: list[Range] = field(default_factory=list)
    _asked: list[Range] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._open = [self._question(LOWEST, HIGHEST)]

    @property
    def done(self) -> bool:
        return not self._open and not self._asked

    @property
    def agreed(self) -> bool:
        """Finished with nothing to move either way."""
        return self.done and not self.need and not self.lack

    def _question(self, lower: Bound, upper: Bound) -> Range:
        i, j = self.mine.span(lower, upper)
        if j - i <= ID_LIST_MAX:
            return Range(lower, upper, MODE_IDS, ids=tuple(self.mine.ids(i, j)))
        return _summary(self.mine, lower, upper, i, j)

    def request(self, budget: int) -> list[Range]:
        """The next request's ranges (at most ``budget`` bytes); empty when nothing is open."""
        if self._asked:
            raise ReconcileError("a request is already outstanding")
        if not self._open:
            return []
        self.rounds += 1
        if self.rounds > MAX_ROUNDS:
            raise ReconcileError("too many rounds")
        used = 0
        while self._open and (not self._asked or used + self._open[0].size() <= budget):
            r = self._open.pop(0)
            used += r.size()
            self._asked.append(r)
        return list(self._asked)

    def lost(self) -> None:
        """The outstanding request got no usable answer: ask it again next time."""
        self._open[:0] = self._asked
        self._asked = []

    def receive(self, answer: Sequence[Range], covered: int) -> None:
        """Take the peer's answer to the outstanding request (ReconcileError if it lies)."""
        asked, self._asked = self._asked, []
        if not 0 <= covered <= len(asked) or (covered == 0 and asked):
            raise ReconcileError("the answer covers nothing")
        self._open[:0] = asked[covered:]
        scope = asked[:covered]
        for r in answer:
            parent = next((a for a in scope if a.lower <= r.lower and r.upper <= a.upper), None)
            if parent is None:
                raise ReconcileError("answer range outside the question")
            self._take(r, parent)
        if len(self.need) + len(self.lack) > self.max_ids:
            raise ReconcileError("too many ids")

    def _take(self, r: Range, parent: Range) -> None:
        i, j = self.mine.span(r.lower, r.upper)
        if r.mode == MODE_FINGERPRINT:
            if r.count == j - i and r.fingerprint == self.mine.fingerprint(i, j):
                return
            if (r.lower, r.upper) == (parent.lower, parent.upper) and parent.mode == MODE_IDS:
                raise ReconcileError("an id list answered by a summary of its own range")
            if j - i > ID_LIST_MAX:
                # The side that sees a difference splits (as negentropy does): one round trip
                # per level instead of two.
                self._open.extend(_split(self.mine, r.lower, r.upper, i, j))
            else:
                self._open.append(Range(r.lower, r.upper, MODE_IDS, ids=tuple(self.mine.ids(i, j))))
            return
        if r.mode == MODE_IDS:
            theirs = set(r.ids)
            self.need.update(pid for pid in theirs if pid not in self.mine)
            self.lack.update(pid for pid in self.mine.ids(i, j) if pid not in theirs)
            return
        if parent.mode != MODE_IDS:
            raise ReconcileError("a diff answers an id list only")
        asked = set(parent.ids)
        self.need.update(pid for pid in r.ids if pid not in self.mine)
        for pid in r.theirs:
            if pid not in asked:
                raise ReconcileError("a diff names an id that was not sent")
            self.lack.add(pid)


def ids_of_hex(packet_ids: Iterable[str]) -> list[bytes]:
    """Wire ids of hex packet ids."""
    return [bytes.fromhex(p) for p in packet_ids]


__all__ = [
    "ID_BYTES",
    "ItemSet",
    "Range",
    "ReconcileError",
    "Reconciliation",
    "parse_ranges",
    "respond",
]
