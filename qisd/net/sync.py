"""Moving a key's packets between nodes by reconciling id sets first (the I/O side).

:mod:`qisd.core.reconcile` says which ids differ; this module runs it over the ``sync`` RPC
and moves only those envelopes: ``get_packets`` pulls what a peer has and we lack,
``store_packets`` pushes what we have and it lacks. Three users:

* **fetch** (:meth:`ReplicaSync.fetch`): a reader reconciles with a key's closest replicas,
  downloads each envelope it lacks once (spread over the replicas that listed it), tells each
  replica what it lacks (entry correction), and states how complete the read is;
* **hand-off** and **anti-entropy** (:meth:`ReplicaSync.enqueue`): a holder reconciles a key
  with another holder, both ways, from a bounded queue worked by a few tasks; a job that fails
  is dropped, never re-armed wholesale (the next hand-off or anti-entropy round picks it up).
  A node holding a key it is not among the k closest of *migrates* it: push only, to the
  closest live node it knows.

Every call is paced per destination (``qisd.net.pacing``); a busy peer is waited for, never
counted as failed. A replica that lies (answers outside the question, never converges, lists
more ids than a key holds, serves envelopes that fail verification) costs bounded work and is
dropped from the read.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kademlia.node import Node

from qisd.core import reconcile
from qisd.core.packet import Envelope, open_envelope
from qisd.errors import PacketError
from qisd.net import wire
from qisd.net.pacing import BACKGROUND, FOREGROUND
from qisd.net.wire import (
    BUSY,
    MAX_BUSY_RETRIES,
    RATE_LIMITED,
    REQUEST_OVERHEAD,
    batches_within,
    envelope_id,
)

if TYPE_CHECKING:
    from qisd.net.dht import QisdProtocol

log = logging.getLogger(__name__)

SYNC_BUDGET = 6_000
"""Bytes of ranges in one ``sync`` request (the reply is bounded by the datagram size)."""
GET_CHUNK = 20
"""Ids asked for in one ``get_packets`` request: about what one reply can carry."""
GETS_IN_FLIGHT = 8
"""``get_packets`` requests one download keeps in flight to one replica."""
PUSH_BATCHES = 64
"""store_packets batches of one push handed to the pacer at once."""
FIRST_WAVE = 2
"""Replicas a fetch reconciles with first; the others are reconciled against what these gave,
so a fresh reader learns the key's ids from two replicas, not from all k."""


@dataclass
class FetchResult:
    """A fetch of one key: the merged envelopes and how complete they are known to be."""

    envelopes: list[Envelope]
    replicas_expected: int = 0
    """The closest nodes the lookup found for the key (at most k)."""
    replicas_answered: int = 0
    """Of those, how many completed a reconciliation (a lying or silent one does not count)."""
    replicas_agreeing: int = 0
    """Of those, how many held exactly the merged set (nothing more, nothing less)."""
    missing: int = 0
    """Ids some replica listed that no replica served (expired or evicted meanwhile, or lies)."""
    bytes_received: int = 0
    """Datagram bytes of every reply this fetch received (lookup, summaries, envelopes)."""
    lookup_bytes: int = 0
    """Of those, the lookup's (``find_node`` replies): a cost that does not grow with the key."""
    messages: int = 0
    """Requests this fetch sent."""
    downloaded: int = 0
    """Envelopes received (verified or not)."""

    @property
    def complete(self) -> bool:
        """Every listed id was obtained, and at least half of the expected replicas (and at
        least one) answered: what the read says can be trusted to be the key's packets."""
        return (
            self.replicas_answered >= 1
            and self.replicas_answered >= math.ceil(self.replicas_expected / 2)
            and self.missing == 0
        )

    def report(self) -> dict[str, Any]:
        """What a reader is told (``qisd query --json``, Flight metadata, synthesis)."""
        return {
            "complete": self.complete,
            "replicas_expected": self.replicas_expected,
            "replicas_answered": self.replicas_answered,
            "replicas_agreeing": self.replicas_agreeing,
            "bytes_received": self.bytes_received,
        }


@dataclass
class _Replica:
    node: Node
    rec: reconcile.Reconciliation | None = None
    served: set[bytes] = field(default_factory=set)
    failed: bool = False
    """It did not answer throughout (silent, busy too long) or lied: asked nothing more."""
    lied: bool = False
    """It listed ids it then did not serve, or served what nobody asked for: its list of ids
    is not trusted (ids only it listed do not make the read incomplete)."""


class ReplicaSync:
    """Reconciliation over the wire for one protocol (see the module docstring)."""

    def __init__(self, protocol: QisdProtocol, *, workers: int, max_jobs: int) -> None:
        self.protocol = protocol
        self.workers = workers
        self.max_jobs = max_jobs
        self._jobs: OrderedDict[tuple[bytes, bytes], tuple[Node, str]] = OrderedDict()
        self._running = 0
        self.counters = protocol.counters

    # -- the reconciliation itself

    async def reconcile(
        self,
        node: Node,
        key: bytes,
        mine: reconcile.ItemSet,
        *,
        priority: int = FOREGROUND,
        meter: list[int] | None = None,
    ) -> reconcile.Reconciliation | None:
        """Reconcile ``mine`` with ``node``'s ids of ``key``; None if it failed or lied."""
        rec = reconcile.Reconciliation(mine)
        busy = 0
        try:
            while True:
                ranges = rec.request(SYNC_BUDGET)
                if not ranges:
                    return rec
                ok, parsed = await self.protocol.call_sync(
                    node, key, ranges, priority=priority, meter=meter
                )
                if not ok:
                    if parsed is BUSY and busy < MAX_BUSY_RETRIES:
                        busy += 1  # busy replies in a row; a reply resets the count
                        rec.lost()
                        continue
                    return None
                busy = 0
                answer, covered = parsed
                rec.receive(answer, covered)
        except reconcile.ReconcileError as exc:
            self.counters["rejected.sync_lies"] += 1
            log.debug("dropping replica %s for key %s: %s", node, key.hex(), exc)
            return None

    async def download(
        self,
        node: Node,
        key: bytes,
        ids: Sequence[bytes],
        *,
        priority: int = FOREGROUND,
        meter: list[int] | None = None,
    ) -> tuple[list[bytes], set[bytes], str]:
        """Ask ``node`` for the envelopes ``ids``: (envelope bytes, ids it says it lacks, how
        it ended: ``"ok"``, ``"silent"`` (a call went unanswered) or ``"lied"`` (it lacks ids
        it listed, or answered with envelopes nobody asked for, or made no progress)).

        Only envelopes whose claimed id was asked for are kept, and the requests are capped
        (about twice what the ids need): a hostile replica cannot keep a download going.
        """
        raws: list[bytes] = []
        missing: set[bytes] = set()
        todo = list(ids)
        ending = "ok"
        budget = 2 * (len(ids) // GET_CHUNK + 1) + GETS_IN_FLIGHT + MAX_BUSY_RETRIES

        async def worker() -> None:
            nonlocal ending, budget
            busy = 0
            while todo and ending == "ok":
                if budget <= 0:
                    ending = "lied"
                    return
                budget -= 1
                chunk, todo[:GET_CHUNK] = todo[:GET_CHUNK], []
                ok, parsed = await self.protocol.call_get_packets(
                    node, key, chunk, priority=priority, meter=meter
                )
                if not ok:
                    if parsed is BUSY and busy < MAX_BUSY_RETRIES:
                        busy += 1  # busy replies in a row; a reply resets the count
                        todo.extend(chunk)
                        continue
                    ending = "silent"
                    return
                busy = 0
                got, lacks = parsed
                asked = set(chunk)
                kept = [r for r in got if (pid := envelope_id(r)) and bytes.fromhex(pid) in asked]
                raws.extend(kept)
                missing.update(pid for pid in lacks if pid in asked)
                if lacks or not kept or len(kept) < len(got):
                    # It lacks what it listed, sent what nobody asked for, or moved nothing:
                    # ask it nothing more.
                    ending = "lied"
                    return
                answered = {bytes.fromhex(i) for i in _claimed_ids(kept)}
                todo.extend(pid for pid in chunk if pid not in answered)

        await asyncio.gather(*(worker() for _ in range(min(GETS_IN_FLIGHT, len(ids)) or 1)))
        return raws, missing, ending

    async def push(
        self,
        node: Node,
        key: bytes,
        raws: Sequence[bytes],
        *,
        priority: int = BACKGROUND,
        meter: list[int] | None = None,
    ) -> list[Any]:
        """Store ``raws`` at ``node`` (``store_packets``), waiting out busy replies and sending
        again what it refused as rate limited; returns its replies (``StoreReply``), with
        the rate-limited refusals of a batch sent again left out. Stops at the first call
        that gets no answer."""
        replies: list[Any] = []
        budget = self.protocol.max_datagram - REQUEST_OVERHEAD
        batches = batches_within(list(raws), budget)
        answering = True

        async def one(batch: list[bytes]) -> None:
            nonlocal answering
            pending = batch
            stalled = 0  # replies in a row that moved nothing (busy, or all rate limited)
            while answering:
                self.counters["pushed_bytes"] += sum(len(r) for r in pending)
                ok, reply = await self.protocol.call_store_packets(
                    node, key, pending, priority=priority, meter=meter
                )
                if not ok:
                    if reply is BUSY and stalled < MAX_BUSY_RETRIES:
                        stalled += 1
                        continue
                    answering = False
                    return
                moved = bool(reply.accepted or reply.duplicates)
                stalled = 0 if moved else stalled + 1
                if not reply.limited or stalled > MAX_BUSY_RETRIES:
                    replies.append(reply)
                    return
                # What it had no tokens left to verify goes again once it asked us to wait:
                # as long as each round moves something, a paced sender gets everything in.
                limited = {pid for pid, why in reply.refused if why == RATE_LIMITED}
                refused = [(p, w) for p, w in reply.refused if w != RATE_LIMITED]
                replies.append(type(reply)(reply.accepted, reply.duplicates, refused))
                pending = [r for r in pending if envelope_id(r) in limited]
                self.counters["rate_limited_resent"] += len(pending)
                self.protocol.pacer.busy(
                    (node.ip, node.port), reply.retry_after or 1 / self.protocol.limiter.rate
                )

        # Batches go out together: the destination's pacing window decides how many are in
        # flight; a batch the peer does not answer stops the rest (its failure is counted).
        for start in range(0, len(batches), PUSH_BATCHES):
            await asyncio.gather(*(one(b) for b in batches[start : start + PUSH_BATCHES]))
            if not answering:
                break
        return replies

    # -- fetch

    async def fetch(
        self, key: bytes, nodes: Sequence[Node], expected: int, lookup: list[int]
    ) -> FetchResult:
        """Read ``key`` from its closest live replicas ``nodes`` by reconciliation (see the
        module docstring); ``expected`` is how many of the k closest the lookup heard of and
        ``lookup`` its meter ([bytes received, requests sent])."""
        proto = self.protocol
        local = proto.items(key)
        got: dict[str, Envelope] = {}
        replicas = [_Replica(n) for n in nodes]
        result = FetchResult([], replicas_expected=max(expected, len(replicas)))
        meter = [0, 0]
        claimed: dict[bytes, list[_Replica]] = {}

        async def reconcile_all(
            wave: list[_Replica], mine: reconcile.ItemSet, patience: float | None = None
        ) -> None:
            tasks = [
                asyncio.ensure_future(self.reconcile(r.node, key, mine, meter=meter)) for r in wave
            ]
            if tasks and patience is not None:
                # The read does not wait on the slowest of the other replicas (one lost
                # datagram would cost it a whole RPC timeout): one not done by then counts as
                # not answered, and its late reconciliation is dropped.
                _done, late = await asyncio.wait(tasks, timeout=patience)
                for task in late:
                    task.cancel()
                    self.counters["fetch_replicas_late"] += 1
            await asyncio.gather(*tasks, return_exceptions=True)
            recs = [
                None if t.cancelled() or t.exception() is not None else t.result() for t in tasks
            ]
            for replica, rec in zip(wave, recs, strict=True):
                replica.rec = rec
                if rec is None:
                    replica.failed = True
                    continue
                for pid in rec.need:
                    if pid.hex() not in got:
                        claimed.setdefault(pid, []).append(replica)

        async def download_claimed() -> None:
            wanted = [pid for pid in claimed if pid.hex() not in got]
            while wanted:
                # Spread: each id goes to the least loaded replica that listed it.
                plan: dict[int, tuple[_Replica, list[bytes]]] = {}
                load: dict[int, int] = {}
                for pid in wanted:
                    options = [r for r in claimed[pid] if not r.failed and pid not in r.served]
                    if not options:
                        continue
                    pick = min(options, key=lambda r: load.get(id(r), 0))
                    load[id(pick)] = load.get(id(pick), 0) + 1
                    plan.setdefault(id(pick), (pick, []))[1].append(pid)
                if not plan:
                    return
                outcomes = await asyncio.gather(
                    *(
                        self.download(rep.node, key, pids, meter=meter)
                        for rep, pids in plan.values()
                    )
                )
                for (rep, pids), (raws, lacks, ending) in zip(plan.values(), outcomes, strict=True):
                    rep.served.update(pids)  # asked once: not asked again for these
                    result.downloaded += len(raws)
                    for env in self._verified(key, raws):
                        if bytes.fromhex(env.packet_id) in claimed:
                            got.setdefault(env.packet_id, env)
                    if lacks:
                        # Listed, then not held: expired or evicted meanwhile, or a lie. Either
                        # way its list is not to be trusted for this read: it is dropped.
                        self.counters["sync_listed_not_served"] += len(lacks)
                    if ending != "ok":
                        rep.failed = True
                        rep.lied = ending == "lied"
                wanted = [pid for pid in claimed if pid.hex() not in got]

        await reconcile_all(replicas[:FIRST_WAVE], local)
        await download_claimed()
        if len(replicas) > FIRST_WAVE:
            merged = reconcile.ItemSet(
                [
                    *local.items,
                    *((e.timestamp_ms, bytes.fromhex(e.packet_id)) for e in got.values()),
                ]
            )
            patience = max(0.5, self.protocol.config.rpc_timeout / 2)
            await reconcile_all(replicas[FIRST_WAVE:], merged, patience)
            await download_claimed()
        final = {pid for _ts, pid in local.items} | {bytes.fromhex(p) for p in got}
        result.missing = sum(
            1
            for pid, listed_by in claimed.items()
            if pid.hex() not in got and any(not r.lied for r in listed_by)
        )
        for replica in replicas:
            rec = replica.rec
            if rec is None or replica.failed:
                continue
            result.replicas_answered += 1
            theirs = ({pid for _ts, pid in rec.mine.items} - rec.lack) | rec.need
            if theirs == final:
                result.replicas_agreeing += 1
            lacking = final - theirs
            if lacking:
                self.counters["entry_corrections"] += 1
                proto.spawn(self._correct(replica.node, key, lacking, got))
        result.envelopes = sorted(got.values(), key=lambda e: (e.timestamp_ms, e.packet_id))
        result.lookup_bytes = lookup[0]
        result.bytes_received = lookup[0] + meter[0]
        result.messages = lookup[1] + meter[1]
        return result

    def _verified(self, key: bytes, raws: Sequence[bytes]) -> list[Envelope]:

        now = int(self.protocol.clock() * 1000)
        out = []
        for raw in raws:
            try:
                out.append(open_envelope(raw, now_ms=now, expected_key=key))
            except PacketError as exc:
                self.counters[f"rejected.fetched_{type(exc).__name__}"] += 1
        return out

    async def _correct(
        self, node: Node, key: bytes, lacking: set[bytes], got: dict[str, Envelope]
    ) -> None:
        """Entry correction: store at a replica what the fetch found it lacks."""
        raws = []
        for pid in sorted(lacking):
            env = got.get(pid.hex())
            raw = env.raw if env is not None else self.protocol.store.get(pid.hex(), key)
            if raw is not None:
                raws.append(raw)
        if raws:
            held = sum(len(r.accepted) for r in await self.push(node, key, raws))
            self.counters["entry_correction_packets"] += held

    # -- hand-off and anti-entropy jobs

    def enqueue(self, key: bytes, node: Node, origin: str = "sync") -> bool:
        """Queue a two-way reconciliation of ``key`` with ``node`` (once per pair while queued)."""
        job = (key, node.id)
        if job in self._jobs or len(self._jobs) >= self.max_jobs:
            return False
        self._jobs[job] = (node, origin)
        while self._running < min(self.workers, len(self._jobs)):
            self._running += 1
            self.protocol.spawn(self._work())
        return True

    def backlog(self, origin: str | None = None) -> int:
        """Reconciliations queued and not yet started (of one ``origin``: "hand_off", ...)."""
        if origin is None:
            return len(self._jobs)
        return sum(1 for _node, why in self._jobs.values() if why == origin)

    async def _work(self) -> None:
        """Work the queue until it is empty (workers are started again by :meth:`enqueue`)."""
        try:
            while self._jobs and not self.protocol.closed:
                (key, _nid), (node, origin) = self._jobs.popitem(last=False)
                try:
                    await self.sync_with(node, key, pull=origin != "migrate")
                except Exception:  # one job's failure must not stop the queue
                    self.counters["sync_errors"] += 1
                    log.debug("sync of %s with %s failed", key.hex(), node, exc_info=True)
        finally:
            self._running -= 1

    async def sync_with(self, node: Node, key: bytes, *, pull: bool = True) -> tuple[int, int]:
        """Reconcile ``key`` with ``node`` both ways (without ``pull``: only push what it
        lacks); (envelopes pulled, envelopes pushed)."""
        proto = self.protocol
        rec = await self.reconcile(node, key, proto.items(key), priority=BACKGROUND)
        self.counters["syncs"] += 1
        if rec is None:
            self.counters["syncs_failed"] += 1
            return 0, 0
        if rec.agreed:
            self.counters["syncs_agreed"] += 1
            return 0, 0
        pulled = pushed = 0
        if rec.need and pull:
            raws, _lacks, _ok = await self.download(
                node, key, sorted(rec.need), priority=BACKGROUND
            )
            stored = proto.accept_raws(
                key, raws, wire.source_of((node.ip, node.port)), charge=False
            )
            pulled = len(stored.accepted)
            self.counters["sync_pulled"] += pulled
        if rec.lack:
            raws = [r for r in (proto.store.get(p.hex(), key) for p in sorted(rec.lack)) if r]
            pushed = sum(len(r.accepted) for r in await self.push(node, key, raws))
            self.counters["sync_pushed"] += pushed
        return pulled, pushed


def _claimed_ids(raws: Sequence[bytes]) -> list[str]:
    return [pid for pid in (envelope_id(r) for r in raws) if pid is not None]
