"""The iterative Kademlia lookup as a sans-I/O state machine.

One :class:`Lookup` finds the ``k`` closest contacts to a target id by asking contacts for the
contacts they know closer to it. It sends nothing and waits for nothing: its driver (the
asyncio crawls of ``qisd.net.crawl``, or the simulator of ``bench/sim.py``) asks it whom to ask
next (:meth:`Lookup.next`), tells it what came back (:meth:`Lookup.answered`,
:meth:`Lookup.failed`), and wakes it at :meth:`Lookup.deadline`. Time is the caller's ``now``.

Invariants, and the rules the lookup follows:

* Every contact it heard of (the seeds, and every contact a reply named) is a *candidate* in
  exactly one state: ``NEW`` (not asked), ``ASKED`` (asked, no reply, still *active*),
  ``STALLED`` (asked, no reply, no longer active), ``ANSWERED`` or ``FAILED``. This node's own
  id is never a candidate, and a contact named twice is one candidate.
* Only the ``k`` closest candidates that have not failed are ever asked, nearest first, and at
  most ``alpha`` calls are active at once; once the lookup has *converged* (``burst_after``
  answers in a row named nobody closer than the closest known), at most ``k``. A call
  unanswered ``stall_after`` seconds after it was sent stops being active (so the next contact
  is asked at once), but its reply, if it comes before the end, is still used.
* A contact the driver calls *suspect* (its last call failed) is asked but is stalled from the
  start: the lookup never holds a slot, nor its end, for it.
* The lookup ends when each of the ``k`` closest candidates not known to have failed has
  answered or stalled, and at least one contact answered (with no answer at all, it waits for
  the stalled calls, so a slow network still gives a result). Replies after the end are
  ignored; so is a reply from a contact that was not asked, or a second reply from one.

These are the semantics of the crawls' ``_find`` (defect 5 of ``docs/kademlia-defects.md``),
which now drive this class.
"""

from __future__ import annotations

import bisect
import enum
from collections.abc import Callable, Iterable
from typing import Generic, Protocol, TypeVar

from qisd.errors import UsageError


class Peer(Protocol):
    """What a lookup needs of a contact: its id, and the id as an integer (for XOR distance).
    kademlia's ``Node`` and qisd's ``Contact`` are peers."""

    @property
    def id(self) -> bytes: ...

    @property
    def long_id(self) -> int: ...


P = TypeVar("P", bound=Peer)


class CallState(enum.Enum):
    """Where one candidate stands in a lookup."""

    NEW = "new"
    ASKED = "asked"
    STALLED = "stalled"
    ANSWERED = "answered"
    FAILED = "failed"


_PENDING = (CallState.NEW, CallState.ASKED)

FIRST_STALL_SECONDS = 0.25
"""A lookup's stall time before any round trip has been measured."""
MIN_STALL_SECONDS = 0.05


def smoothed_rtt(srtt: float, sample: float) -> float:
    """The smoothed round trip after one more ``sample`` (RFC 6298's 1/8 gain; 0 = none yet)."""
    return sample if srtt == 0 else 0.875 * srtt + 0.125 * sample


def stall_after(srtt: float, rpc_timeout: float) -> float:
    """Seconds after which a lookup stops waiting on a call: a few smoothed round trips,
    within [:data:`MIN_STALL_SECONDS`, ``rpc_timeout``]."""
    base = 4 * srtt + 0.02 if srtt else FIRST_STALL_SECONDS
    return min(rpc_timeout, max(MIN_STALL_SECONDS, base))


class Lookup(Generic[P]):
    """An iterative lookup of the ``ksize`` closest contacts to ``target_id``.

    ``seeds`` are the contacts to start from (the node's own nearest); ``alpha`` bounds the
    active calls. Each candidate's *hop* is the depth of the reply chain that found it: a seed
    is asked at hop 1, a contact named by a hop-``h`` reply at hop ``h + 1``.
    """

    def __init__(
        self,
        target_id: bytes,
        self_id: bytes,
        seeds: Iterable[P],
        ksize: int,
        alpha: int,
        *,
        burst_after: int | None = None,
    ) -> None:
        if ksize < 1 or alpha < 1:
            raise UsageError(f"a lookup needs ksize >= 1 and alpha >= 1 (got {ksize}, {alpha})")
        if burst_after is not None and burst_after < 1:
            raise UsageError(f"burst_after must be None or >= 1 (got {burst_after})")
        self.burst_after = burst_after
        """After this many answers in a row that named nobody closer than the closest contact
        known, the lookup has converged: it asks every one of the k closest not yet asked at
        once (up to k active calls) instead of alpha at a time (the paper's final round).
        None: never (alpha at a time to the end)."""
        self.converged = False
        self._quiet = 0
        self.target = int.from_bytes(target_id, "big")
        self.self_id = self_id
        self.ksize = ksize
        self.alpha = alpha
        self.messages = 0
        """Calls this lookup asked its driver to send."""
        self.done = False
        """True once :meth:`next` found the end condition; the result is then fixed."""
        self._contacts: dict[bytes, P] = {}
        self._state: dict[bytes, CallState] = {}
        self._hop: dict[bytes, int] = {}
        self._order: list[tuple[int, bytes]] = []  # every candidate as (distance, id), sorted
        self._deadline: dict[bytes, float] = {}  # active calls: when each one stalls
        self._inflight: set[bytes] = set()  # asked and not yet replied (active or stalled)
        self._answered: list[bytes] = []
        for seed in seeds:
            self._offer(seed, 1)

    # -- what the driver calls

    def next(
        self, now: float, stall_after: float, suspect: Callable[[bytes], bool] | None = None
    ) -> list[P]:
        """The contacts to ask now (each is then asked, its call stalling at
        ``now + stall_after``). Calls whose stall time has come stop being active first; the
        end is checked last (see :attr:`done`). ``suspect(id)`` tells which contacts are asked
        without being waited on."""
        if self.done:
            return []
        for cid, deadline in list(self._deadline.items()):
            if deadline <= now:
                del self._deadline[cid]
                self._state[cid] = CallState.STALLED
        closest = self._closest()
        active = len(self._deadline)
        width = self.ksize if self.converged else self.alpha
        ask: list[P] = []
        for cid in closest:
            if active >= width:
                break
            if self._state[cid] is not CallState.NEW:
                continue
            self.messages += 1
            self._inflight.add(cid)
            ask.append(self._contacts[cid])
            if suspect is not None and suspect(cid):
                self._state[cid] = CallState.STALLED
                continue
            self._state[cid] = CallState.ASKED
            self._deadline[cid] = now + stall_after
            active += 1
        pending = any(self._state[cid] in _PENDING for cid in closest)
        if not pending and (self._answered or not self._inflight):
            self.done = True
        return ask

    def answered(self, contact_id: bytes, found: Iterable[P]) -> bool:
        """``contact_id`` replied, naming ``found``; False if the reply was ignored (after the
        end, or from a contact with no call in flight)."""
        if not self._settle(contact_id, CallState.ANSWERED):
            return False
        self._answered.append(contact_id)
        hop = self._hop[contact_id] + 1
        best = self._order[0][0] if self._order else None
        for peer in found:
            self._offer(peer, hop)
        if self._order and self._order[0][0] == best:
            self._quiet += 1
            if self.burst_after is not None and self._quiet >= self.burst_after:
                self.converged = True
        else:
            self._quiet = 0
        return True

    def failed(self, contact_id: bytes) -> bool:
        """The call to ``contact_id`` failed (timed out, or the reply was refused); False if
        ignored, as for :meth:`answered`."""
        return self._settle(contact_id, CallState.FAILED)

    def deadline(self) -> float | None:
        """When the next active call stalls (wake :meth:`next` then); None if no call is
        active (wait for a reply)."""
        return min(self._deadline.values()) if self._deadline else None

    # -- what the lookup found

    def result(self) -> list[P]:
        """The ``ksize`` closest contacts that answered, nearest first."""
        answered = sorted(self._answered, key=self._distance)
        return [self._contacts[cid] for cid in answered[: self.ksize]]

    @property
    def expected(self) -> int:
        """How many of the k closest contacts this lookup heard of, answered or not: what a
        read of the key should have reached (a dead or silent one among them counts)."""
        return min(self.ksize, len(self._contacts))

    @property
    def hops(self) -> int:
        """The hop of the closest contact that answered (0 if none did)."""
        answered = self.result()
        return self._hop[answered[0].id] if answered else 0

    def state(self, contact_id: bytes) -> CallState | None:
        """Where ``contact_id`` stands (None if the lookup never heard of it)."""
        return self._state.get(contact_id)

    def hop(self, contact_id: bytes) -> int | None:
        """The hop at which ``contact_id`` was (or would be) asked; None if unheard of."""
        return self._hop.get(contact_id)

    @property
    def inflight(self) -> int:
        """Calls asked and not yet replied to, active or stalled."""
        return len(self._inflight)

    @property
    def active(self) -> int:
        """Calls asked, not yet replied to and not stalled (at most ``alpha``)."""
        return len(self._deadline)

    # -- inside

    def _distance(self, contact_id: bytes) -> int:
        return self._contacts[contact_id].long_id ^ self.target

    def _offer(self, peer: P, hop: int) -> None:
        cid = peer.id
        if cid == self.self_id or cid in self._state:
            return
        self._contacts[cid] = peer
        self._state[cid] = CallState.NEW
        self._hop[cid] = hop
        bisect.insort(self._order, (peer.long_id ^ self.target, cid))

    def _closest(self) -> list[bytes]:
        out: list[bytes] = []
        for _distance, cid in self._order:
            if self._state[cid] is not CallState.FAILED:
                out.append(cid)
                if len(out) == self.ksize:
                    break
        return out

    def _settle(self, contact_id: bytes, state: CallState) -> bool:
        if self.done or contact_id not in self._inflight:
            return False
        self._inflight.discard(contact_id)
        self._deadline.pop(contact_id, None)
        self._state[contact_id] = state
        return True
