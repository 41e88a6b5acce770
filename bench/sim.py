"""Discrete-event simulation of qisd lookups at up to 100,000 nodes, on the daemon's own core.

Every simulated node has a :class:`qisd.core.table.Table` (the routing table the daemon's
``QisdRoutingTable`` is a shell around) and every lookup is a :class:`qisd.core.lookup.Lookup`
(the state machine the daemon's crawls drive). This file is only the other shell: datagrams,
timers and churn in virtual time, in one process. Nothing is sent on any network.

Model (every figure is a stated assumption; change it here, not in the core):

* **Latency.** Each node sits in one of nine regions, with the share of nodes below. The RTT
  between two nodes is the regions' base RTT (rounded typical city-pair pings between the
  regions' hubs, of the kind WonderNetwork publishes: New York-Frankfurt ~85 ms, San
  Francisco-Tokyo ~105 ms, Frankfurt-Singapore ~160 ms), inflated per pair by a fixed factor
  in [1, 1.3) (route detours), plus both ends' last-mile RTT: lognormal per node, median 8 ms,
  sigma 1.0 (1 % of hosts add over 80 ms: DSL interleaving, Wi-Fi, mobile). Each datagram
  adds queueing jitter, exponential with mean 2 ms. The model's pairwise median RTT is
  printed with the results (about 150 ms), and its p99 (about 380 ms): a long tail, as in the
  King (Gummadi et al., IMW 2002) and Azureus (Ledlie et al., NSDI 2007) latency matrices.
* **Loss.** Each datagram is lost with probability ``--loss`` (independently).
* **Churn.** ``--churn c``: each node alternates online sessions and offline gaps. Session
  lengths are Weibull with shape 0.38 and scale 42.4 minutes, the fit Stutzbach and Rejaie
  ("Understanding churn in peer-to-peer networks", IMC 2006) report for a BitTorrent swarm;
  gaps have the same shape and the scale that makes the long-run offline fraction c. The
  process is run from 48 virtual hours before the first lookup, so the state at t = 0 is
  close to stationary. An offline node never answers and starts no lookup.
* **Routing tables** are built directly, as if the network had converged: for each node and
  each distance range (the ids sharing exactly i leading bits with it), up to
  ``--per-range`` nodes that exist in that range are offered to the node's core table through
  its own add path (``Table.add``, so bucket splits, the depth rule and the replacement caches
  are the core's), chosen at random, or with ``--pns S`` the lowest-RTT of S times as many
  random candidates (proximity neighbour selection). Liveness is not looked at: an entry is
  dead as often as its node is offline (pessimistic: Kademlia prefers long-lived contacts).
  During the run the tables change as the daemon's do: a reply refreshes the replier, a
  request offers the requester (if its bucket has room), a failed call counts against the
  contact (evicted after 3), and a full bucket that keeps a newcomer out has its head pinged.
  The daemon's liveness upkeep is modelled (``Simulator.upkeep``), and a node that comes back
  online looks up its own id, as the daemon's bootstrap does (``--no-rejoin``: it stays
  silent, and only the traffic it starts makes it known again).
* **Lookups** start at random online nodes at uniform random times over ``--duration``
  virtual seconds, each for a random target id, driven exactly as ``qisd.net.crawl`` drives
  them: ``alpha`` active calls, stall after ``stall_after(srtt)`` (the node's own smoothed
  RTT, warm at the start: the mean RTT to 8 of its contacts), suspects asked but never waited
  on, RPC timeout 2 s. ``find_node`` replies are the
  replier's ``Table.closest_live`` (what the daemon's handler returns).
* **Bytes** are the UDP payloads qisd sends for this exchange, measured with
  ``qisd.net.wire`` (a ``find_node`` request with an address token, the reply's contacts
  with IPv4 addresses); IP and UDP headers (28 bytes a datagram) are not counted.

Measured per N: hops (the hop of the closest contact that answered: the depth of the reply
chain that found it), messages and bytes per lookup, latency in virtual time and as a multiple
of the model's median RTT, and success (the closest online node found; the share of the true
k closest online nodes found).

Run:  .venv/bin/python bench/sim.py --nodes 1000,10000 --lookups 1000 --churn 0.1
      .venv/bin/python bench/sim.py --nodes 10000 --churn 0,0.1,0.3 --json
      .venv/bin/python bench/sim.py --nodes 100000 --churn 0.1 --duration 600   # ~9 min, 5 GB
      .venv/bin/python bench/sim.py --replot out1.json out2.json --plot docs/img
With churn, the own-id lookups of returning nodes are most of the work (about N/20 per
virtual 10 minutes at 10% churn), hence ``--duration 600`` at 100,000 nodes.
"""

from __future__ import annotations

import argparse
import bisect
import heapq
import json
import math
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from qisd.core.lookup import Lookup, smoothed_rtt, stall_after
from qisd.core.table import Contact, Table
from qisd.net import wire
from qisd.net.dht import LIVENESS_PINGS, LIVENESS_SECONDS, UPKEEP_SECONDS

# -- the latency model

REGIONS = ("na-east", "na-west", "s-america", "europe", "africa", "s-asia", "e-asia", "se-asia")
REGIONS += ("oceania",)
SHARES = (0.20, 0.12, 0.04, 0.40, 0.02, 0.04, 0.11, 0.04, 0.03)
"""Share of nodes per region (roughly where DHT clients are: Europe and North America
first, then East Asia)."""
_BASE_MS = {
    ("na-east", "na-east"): 25,
    ("na-west", "na-west"): 25,
    ("s-america", "s-america"): 30,
    ("europe", "europe"): 20,
    ("africa", "africa"): 40,
    ("s-asia", "s-asia"): 35,
    ("e-asia", "e-asia"): 30,
    ("se-asia", "se-asia"): 25,
    ("oceania", "oceania"): 20,
    ("na-east", "na-west"): 65,
    ("na-east", "s-america"): 115,
    ("na-east", "europe"): 85,
    ("na-east", "africa"): 230,
    ("na-east", "s-asia"): 190,
    ("na-east", "e-asia"): 160,
    ("na-east", "se-asia"): 225,
    ("na-east", "oceania"): 200,
    ("na-west", "s-america"): 170,
    ("na-west", "europe"): 145,
    ("na-west", "africa"): 290,
    ("na-west", "s-asia"): 220,
    ("na-west", "e-asia"): 105,
    ("na-west", "se-asia"): 170,
    ("na-west", "oceania"): 140,
    ("s-america", "europe"): 190,
    ("s-america", "africa"): 340,
    ("s-america", "s-asia"): 300,
    ("s-america", "e-asia"): 260,
    ("s-america", "se-asia"): 320,
    ("s-america", "oceania"): 300,
    ("europe", "africa"): 160,
    ("europe", "s-asia"): 115,
    ("europe", "e-asia"): 230,
    ("europe", "se-asia"): 160,
    ("europe", "oceania"): 280,
    ("africa", "s-asia"): 280,
    ("africa", "e-asia"): 350,
    ("africa", "se-asia"): 300,
    ("africa", "oceania"): 400,
    ("s-asia", "e-asia"): 130,
    ("s-asia", "se-asia"): 60,
    ("s-asia", "oceania"): 150,
    ("e-asia", "se-asia"): 70,
    ("e-asia", "oceania"): 110,
    ("se-asia", "oceania"): 95,
}
BASE_RTT = [
    [_BASE_MS.get((a, b), _BASE_MS.get((b, a), 0)) / 1000 for b in REGIONS] for a in REGIONS
]
LAST_MILE_MEDIAN = 0.008
LAST_MILE_SIGMA = 1.0
DETOUR = 0.15
JITTER_MEAN = 0.002

# -- churn (Stutzbach and Rejaie 2006)

SESSION_SHAPE = 0.38
SESSION_SCALE = 42.4 * 60
WARMUP = 48 * 3600.0

# -- the protocol (the daemon's defaults, qisd.config.DhtConfig)

KSIZE = 20
ALPHA = 3
RPC_TIMEOUT = 2.0
EVICT_AFTER = 3


@dataclass(frozen=True)
class SimConfig:
    """One simulation run."""

    nodes: int = 1000
    """How many nodes exist (online or not)."""
    lookups: int = 1000
    """Lookups measured."""
    churn: float = 0.0
    """Long-run fraction of nodes offline at any time."""
    loss: float = 0.0
    """Probability that a datagram is lost."""
    seed: int = 1
    """Everything random follows from it: the same seed gives the same figures."""
    duration: float = 3600.0
    """Virtual seconds over which lookups start."""
    ksize: int = KSIZE
    alpha: int = ALPHA
    rpc_timeout: float = RPC_TIMEOUT
    per_range: int = KSIZE
    """Contacts offered to each table per distance range when it is built."""
    pns: int = 1
    """Proximity neighbour selection: each range's offers are the lowest-RTT of ``pns``
    times as many random candidates (1: chosen at random)."""
    burst_after: int | None = None
    """The lookups' ``burst_after`` (see :class:`qisd.core.lookup.Lookup`)."""
    rejoin: bool = True
    """A node coming back online looks up its own id (the daemon's bootstrap)."""


class SimPeer:
    """A simulated node as a table is told of it: its id, and its index as the 'port'."""

    __slots__ = ("id", "long_id", "ip", "port")

    def __init__(self, node_id: bytes, long_id: int, ip: str, index: int) -> None:
        self.id = node_id
        self.long_id = long_id
        self.ip = ip
        self.port = index


@dataclass
class LookupRecord:
    """What one lookup did."""

    start: float
    origin: int
    target: int
    lookup: Lookup[Contact]
    bytes: int = 0
    end: float | None = None
    wake_at: float | None = None
    found_closest: bool = False
    """The closest contact that answered is the closest node online when the lookup ended."""
    k_share: float = 0.0
    """Of the k closest nodes (online or not: where a key's replicas are), the share of those
    online at the end that the lookup found (a dead one cannot be found, nor needs to be)."""


@dataclass
class Figures:
    """The measured figures of one run (one N, one churn level)."""

    nodes: int
    churn: float
    loss: float
    lookups: int
    seed: int
    alpha: int
    ksize: int
    pns: int
    burst_after: int | None
    median_rtt_ms: float
    p99_rtt_ms: float
    hops_p50: float
    hops_p99: float
    messages_mean: float
    messages_p99: float
    bytes_mean: float
    latency_p50_ms: float
    latency_p99_ms: float
    latency_p50_rtts: float
    latency_p99_rtts: float
    success_closest: float
    success_k: float
    maintenance_messages: int
    contacts_per_table: float
    build_seconds: float
    run_seconds: float
    extra: dict[str, Any] = field(default_factory=dict)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-quantile (0..1) by nearest rank; 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return float(ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))])


class Network:
    """N simulated nodes: ids, places, sessions and core routing tables."""

    def __init__(self, config: SimConfig, rng: random.Random) -> None:
        self.config = config
        self.rng = rng
        n = config.nodes
        raw = sorted({rng.getrandbits(160) for _ in range(n + n // 1000 + 8)})
        rng.shuffle(raw)
        long_ids = raw[:n]
        self.long_ids = long_ids
        self.ids = [v.to_bytes(20, "big") for v in long_ids]
        self.order = sorted(range(n), key=long_ids.__getitem__)
        self.sorted_ids = [long_ids[i] for i in self.order]
        self.region = rng.choices(range(len(REGIONS)), weights=SHARES, k=n)
        self.last_mile = [
            rng.lognormvariate(math.log(LAST_MILE_MEDIAN), LAST_MILE_SIGMA) for _ in range(n)
        ]
        self.pair_salt = rng.getrandbits(61)
        self.peers = [SimPeer(self.ids[i], long_ids[i], _address(rng), i) for i in range(n)]
        self.tables = [
            Table(self.peers[i], config.ksize, evict_after=EVICT_AFTER) for i in range(n)
        ]
        self.srtt = [0.0] * n
        self.online = bytearray(n)
        self.changed_at = [-WARMUP] * n
        """When each node last came online or went offline."""
        self.flips: list[tuple[float, int]] = []
        self._start_sessions()

    # -- latency

    def rtt(self, a: int, b: int) -> float:
        """The base round trip between nodes ``a`` and ``b`` (seconds, symmetric)."""
        lo, hi = (a, b) if a < b else (b, a)
        h = ((lo * 0x9E3779B97F4A7C15) ^ (hi * 0xC2B2AE3D27D4EB4F) ^ self.pair_salt) & 0xFFFF
        detour = 1.0 + DETOUR * h / 0x10000
        base = BASE_RTT[self.region[a]][self.region[b]]
        return base * detour + self.last_mile[a] + self.last_mile[b]

    def one_way(self, a: int, b: int) -> float:
        """A datagram's delay from ``a`` to ``b``: half the round trip, plus queueing."""
        return self.rtt(a, b) / 2 + self.rng.expovariate(1 / JITTER_MEAN)

    def rtt_quantiles(self, samples: int = 100_000) -> tuple[float, float]:
        """(median, p99) of the RTT between random pairs of nodes (a fixed sample)."""
        rng = random.Random(self.config.seed ^ 0x5EED)
        n = self.config.nodes
        values = []
        for _ in range(samples):
            a, b = rng.randrange(n), rng.randrange(n)
            if a != b:
                values.append(self.rtt(a, b))
        return statistics.median(values), percentile(values, 0.99)

    # -- churn

    def _start_sessions(self) -> None:
        c = self.config.churn
        if c <= 0:
            self.online = bytearray(b"\x01" * self.config.nodes)
            return
        gap_scale = SESSION_SCALE * c / (1 - c)
        rng = self.rng
        for i in range(self.config.nodes):
            t = -WARMUP
            up = rng.random() >= c
            while True:
                scale = SESSION_SCALE if up else gap_scale
                flip = t + rng.weibullvariate(scale, SESSION_SHAPE)
                if flip > 0:
                    break
                t, up = flip, not up
            self.online[i] = 1 if up else 0
            self.changed_at[i] = t
            self.flips.append((flip, i))
        self.gap_scale = gap_scale

    def next_flip(self, i: int, now: float) -> float:
        """Node ``i`` just changed state at ``now``: when it changes again."""
        scale = SESSION_SCALE if self.online[i] else self.gap_scale
        return now + self.rng.weibullvariate(scale, SESSION_SHAPE)

    # -- tables

    def build_tables(self, progress: Callable[[int], None] | None = None) -> None:
        """Fill every table as if the network had converged (see the module docstring)."""
        cfg = self.config
        rng = self.rng
        sorted_ids = self.sorted_ids
        order = self.order
        for i in range(cfg.nodes):
            me = self.long_ids[i]
            table = self.tables[i]
            offers: list[int] = []
            for level in range(160):
                shift = 159 - level
                low = ((me >> (shift + 1)) << (shift + 1)) | ((~me >> shift & 1) << shift)
                lo = bisect.bisect_left(sorted_ids, low)
                hi = bisect.bisect_left(sorted_ids, low + (1 << shift))
                if hi > lo:
                    offers.extend(self._choose(i, lo, hi, rng))
                # Stop once no other node shares more than ``level`` bits with this one.
                span_lo = bisect.bisect_left(sorted_ids, (me >> shift) << shift)
                span_hi = bisect.bisect_left(sorted_ids, ((me >> shift) + 1) << shift)
                if span_hi - span_lo <= 1:
                    break
            for position in offers:
                table.add(self.peers[order[position]], 0.0)
            # A running node's smoothed RTT is warm: start it at the mean to a few contacts.
            sample = offers[:: max(1, len(offers) // 8)]
            if sample:
                self.srtt[i] = statistics.fmean(self.rtt(i, order[p]) for p in sample)
            if progress is not None and i % 5000 == 0:
                progress(i)

    def _choose(self, me: int, lo: int, hi: int, rng: random.Random) -> list[int]:
        cfg = self.config
        want = cfg.per_range
        count = hi - lo
        pool = want * cfg.pns
        if count <= want:
            return list(range(lo, hi))
        picks = rng.sample(range(lo, hi), min(count, pool))
        if cfg.pns > 1:
            order = self.order
            picks.sort(key=lambda p: self.rtt(me, order[p]))
        return picks[:want]

    def closest_online(self, target: int, k: int) -> list[int]:
        """The ids of the k online nodes closest to ``target`` (exact, by id subtree)."""
        sorted_ids = self.sorted_ids
        order = self.order
        online = self.online
        for prefix_bits in range(160, -1, -1):
            shift = 160 - prefix_bits
            lo = bisect.bisect_left(sorted_ids, (target >> shift) << shift)
            hi = bisect.bisect_left(sorted_ids, ((target >> shift) + 1) << shift)
            if hi - lo < k:
                continue
            live = [sorted_ids[p] for p in range(lo, hi) if online[order[p]]]
            if len(live) >= k or prefix_bits == 0:
                return sorted(live, key=lambda v: v ^ target)[:k]
        return []

    def live_among_closest(self, target: int, k: int) -> list[int]:
        """The ids of the online nodes among the k closest to ``target`` (online or not)."""
        sorted_ids, order, online = self.sorted_ids, self.order, self.online
        for prefix_bits in range(160, -1, -1):
            shift = 160 - prefix_bits
            lo = bisect.bisect_left(sorted_ids, (target >> shift) << shift)
            hi = bisect.bisect_left(sorted_ids, ((target >> shift) + 1) << shift)
            if hi - lo >= k or prefix_bits == 0:
                ranked = sorted(range(lo, hi), key=lambda p: sorted_ids[p] ^ target)[:k]
                return [sorted_ids[p] for p in ranked if online[order[p]]]
        return []


def _address(rng: random.Random) -> str:
    """A public-looking IPv4 address (only its length matters: it is never used)."""
    return (
        f"{rng.randrange(1, 224)}.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}"
    )


class Simulator:
    """The event loop in virtual time: lookups, datagrams, timers, churn."""

    def __init__(self, net: Network) -> None:
        self.net = net
        self.cfg = net.config
        self.events: list[tuple[float, int, int, Any]] = []
        self.seq = 0
        self.records: list[LookupRecord] = []
        self.maintenance = 0
        self.head_checks: set[tuple[int, bytes]] = set()
        self.upkept: dict[int, float] = {}
        self.rejoins = 0
        target = bytes(20)
        self.request_bytes = len(
            wire.encode_request(bytes(20), "find_node", [bytes(20), target], bytes(8))
        )

    # event kinds
    START, ARRIVE, REPLY, TIMEOUT, WAKE, FLIP, PING_REPLY, PING_TIMEOUT = range(8)

    def push(self, at: float, kind: int, payload: Any) -> None:
        self.seq += 1
        heapq.heappush(self.events, (at, self.seq, kind, payload))

    def reply_bytes(self, found: list[Contact]) -> int:
        nodes = [[c.id, c.ip, c.port] for c in found]
        return len(wire.encode_reply(bytes(20), {"nodes": nodes}))

    def run(self) -> None:
        net, cfg, rng = self.net, self.cfg, self.net.rng
        for at, i in net.flips:
            if at < cfg.duration + 60:
                self.push(at, self.FLIP, i)
        starts = sorted(rng.uniform(0, cfg.duration) for _ in range(cfg.lookups))
        for at in starts:
            self.push(at, self.START, rng.getrandbits(160))
        while self.events:
            now, _seq, kind, payload = heapq.heappop(self.events)
            if kind == self.FLIP:
                i = payload
                net.online[i] ^= 1
                net.changed_at[i] = now
                at = net.next_flip(i, now)
                if at < cfg.duration + 60:
                    self.push(at, self.FLIP, i)
                if net.online[i] and cfg.rejoin:
                    # Back: the daemon bootstraps from its saved contacts, a lookup of its own
                    # id, so the nodes near it hear of it (not measured).
                    self.rejoins += 1
                    self.lookup(now, i, net.long_ids[i])
            elif kind == self.START:
                self.start(now, payload)
            elif kind == self.ARRIVE:
                self.arrive(now, *payload)
            elif kind == self.REPLY:
                self.replied(now, *payload)
            elif kind == self.TIMEOUT:
                record, origin, asked = payload
                net.tables[origin].record_failure(net.peers[asked])
                if record is not None:
                    record.lookup.failed(net.ids[asked])
                    self.drive(record, now)
            elif kind == self.WAKE:
                record = payload
                if record.end is None and record.wake_at == now:
                    record.wake_at = None
                    self.drive(record, now)
            elif kind == self.PING_REPLY:
                origin, head = payload
                self.head_checks.discard((origin, net.ids[head]))
                net.tables[origin].heard_from(net.peers[head], now)
            elif kind == self.PING_TIMEOUT:
                origin, head = payload
                self.head_checks.discard((origin, net.ids[head]))
                net.tables[origin].record_failure(net.peers[head])

    def upkeep(self, i: int, now: float) -> None:
        """The daemon's liveness upkeep for node ``i``'s table, as of ``now``.

        ``DhtNode.upkeep`` pings, every ``UPKEEP_SECONDS``, the ``LIVENESS_PINGS`` stalest
        contacts not heard from for ``LIVENESS_SECONDS``: each contact is checked about every
        ``max(LIVENESS_SECONDS, contacts / LIVENESS_PINGS * UPKEEP_SECONDS)``. Rather than
        simulate each ping, a contact gets the outcome of the checks it would have had by
        now: one failure per interval its node has been offline (evicted at the third); a
        suspect whose node has been back for an interval is heard from again.
        """
        last = self.upkept.get(i)
        if last is not None and now - last < UPKEEP_SECONDS:
            return
        self.upkept[i] = now
        net = self.net
        table = net.tables[i]
        contacts = table.contacts()
        interval = max(LIVENESS_SECONDS, len(contacts) / LIVENESS_PINGS * UPKEEP_SECONDS)
        online, changed_at = net.online, net.changed_at
        for c in contacts:
            j = c.port
            assert j is not None
            since = now - changed_at[j]
            if online[j]:
                if c.failures and since > interval:
                    table.heard_from(c, now)
            else:
                due = min(EVICT_AFTER, int(since // interval))
                while c.failures < due and not table.record_failure(c):
                    pass

    # -- lookups

    def start(self, now: float, target: int) -> None:
        """A measured lookup of ``target`` from a random online node."""
        net = self.net
        online = [i for i in self._sample_nodes(64) if net.online[i]]
        if online:
            self.records.append(self.lookup(now, online[0], target))

    def lookup(self, now: float, origin: int, target: int) -> LookupRecord:
        """Start a lookup of ``target`` from ``origin``, seeded as the daemon seeds one."""
        net = self.net
        self.upkeep(origin, now)
        table = net.tables[origin]
        probe = Contact(target.to_bytes(20, "big"))
        seeds = table.find_neighbors(probe, self.cfg.ksize)
        lookup: Lookup[Contact] = Lookup(
            probe.id,
            net.ids[origin],
            seeds,
            self.cfg.ksize,
            self.cfg.alpha,
            burst_after=self.cfg.burst_after,
        )
        record = LookupRecord(now, origin, target, lookup)
        self.drive(record, now)
        return record

    def _sample_nodes(self, count: int) -> list[int]:
        rng, n = self.net.rng, self.cfg.nodes
        return [rng.randrange(n) for _ in range(count)]

    def drive(self, record: LookupRecord, now: float) -> None:
        """What the crawls' ``_find`` does after every event: ask, check the end, set a timer."""
        if record.end is not None:
            return
        net, cfg = self.net, self.cfg
        origin = record.origin
        lookup = record.lookup
        table = net.tables[origin]
        stall = stall_after(net.srtt[origin], cfg.rpc_timeout)
        for contact in lookup.next(now, stall, table.suspect):
            self.send(record, origin, contact.port, now)
        if lookup.done:
            record.end = now
            found = [c.long_id for c in lookup.result()]
            nearest = net.closest_online(record.target, 1)
            record.found_closest = bool(found) and bool(nearest) and found[0] == nearest[0]
            live = net.live_among_closest(record.target, cfg.ksize)
            record.k_share = len(set(found) & set(live)) / len(live) if live else 1.0
            return
        deadline = lookup.deadline()
        if deadline is not None and deadline != record.wake_at:
            record.wake_at = deadline
            self.push(deadline, self.WAKE, record)

    def send(self, record: LookupRecord | None, origin: int, asked: int, now: float) -> None:
        """A find_node request from ``origin`` to ``asked`` (``record``: the lookup's)."""
        net, rng = self.net, self.net.rng
        if record is not None:
            record.bytes += self.request_bytes
        if rng.random() < self.cfg.loss:
            self.push(now + self.cfg.rpc_timeout, self.TIMEOUT, (record, origin, asked))
            return
        self.push(now + net.one_way(origin, asked), self.ARRIVE, (record, origin, asked, now))

    def arrive(
        self, now: float, record: LookupRecord | None, origin: int, asked: int, sent: float
    ) -> None:
        """The request reaches ``asked``: it answers from its table, if it is online."""
        net, cfg, rng = self.net, self.cfg, self.net.rng
        timeout_at = sent + cfg.rpc_timeout
        if not net.online[asked]:
            self.push(timeout_at, self.TIMEOUT, (record, origin, asked))
            return
        self.upkeep(asked, now)
        table = net.tables[asked]
        self.welcome(asked, origin, now)
        target = Contact(record.target.to_bytes(20, "big")) if record is not None else None
        found = table.closest_live(target, cfg.ksize, exclude=net.peers[origin]) if target else []
        if record is not None:
            record.bytes += self.reply_bytes(found)
        back = now + net.one_way(asked, origin)
        if rng.random() < cfg.loss or back > timeout_at:
            self.push(timeout_at, self.TIMEOUT, (record, origin, asked))
            return
        self.push(back, self.REPLY, (record, origin, asked, found, sent))

    def replied(
        self,
        now: float,
        record: LookupRecord | None,
        origin: int,
        asked: int,
        found: list[Contact],
        sent: float,
    ) -> None:
        net = self.net
        net.srtt[origin] = smoothed_rtt(net.srtt[origin], now - sent)
        self.welcome(origin, asked, now)
        if record is not None:
            record.lookup.answered(net.ids[asked], found)
            self.drive(record, now)

    def welcome(self, at: int, sender: int, now: float) -> None:
        """``at`` heard from ``sender``: as the daemon's ``welcome_if_new`` for a sender that
        proved its id (a known contact is refreshed; a newcomer enters if its bucket has room;
        a full bucket that will not split has its head pinged)."""
        net = self.net
        table = net.tables[at]
        peer = net.peers[sender]
        if table.get(peer.id) is not None:
            table.heard_from(peer, now)
            return
        if not table.has_room_for(peer):
            return
        head = table.add(peer, now)
        if head is not None and (at, head.id) not in self.head_checks:
            self.head_checks.add((at, head.id))
            self.ping(at, head.port, now)

    def ping(self, origin: int, head: int, now: float) -> None:
        net, rng = self.net, self.net.rng
        self.maintenance += 1
        there = now + net.one_way(origin, head)
        back = there + net.one_way(head, origin)
        lost = rng.random() < self.cfg.loss or rng.random() < self.cfg.loss
        if lost or not net.online[head] or back > now + self.cfg.rpc_timeout:
            self.push(now + self.cfg.rpc_timeout, self.PING_TIMEOUT, (origin, head))
        else:
            self.push(back, self.PING_REPLY, (origin, head))

    # -- figures

    def figures(self, build_seconds: float, run_seconds: float) -> Figures:
        net, cfg = self.net, self.cfg
        median_rtt, p99_rtt = net.rtt_quantiles()
        done = [r for r in self.records if r.end is not None]
        hops = [r.lookup.hops for r in done]
        messages = [r.lookup.messages for r in done]
        latency = [r.end - r.start for r in done if r.end is not None]
        closest_ok = sum(r.found_closest for r in done)
        k_share = sum(r.k_share for r in done)
        contacts = sum(len(t.contacts()) for t in net.tables[:: max(1, cfg.nodes // 500)])
        sampled = len(net.tables[:: max(1, cfg.nodes // 500)])
        return Figures(
            nodes=cfg.nodes,
            churn=cfg.churn,
            loss=cfg.loss,
            lookups=len(done),
            seed=cfg.seed,
            alpha=cfg.alpha,
            ksize=cfg.ksize,
            pns=cfg.pns,
            burst_after=cfg.burst_after,
            median_rtt_ms=round(median_rtt * 1000, 1),
            p99_rtt_ms=round(p99_rtt * 1000, 1),
            hops_p50=percentile(hops, 0.5),
            hops_p99=percentile(hops, 0.99),
            messages_mean=round(statistics.fmean(messages), 2) if messages else 0.0,
            messages_p99=percentile(messages, 0.99),
            bytes_mean=round(statistics.fmean(r.bytes for r in done), 1) if done else 0.0,
            latency_p50_ms=round(percentile(latency, 0.5) * 1000, 1),
            latency_p99_ms=round(percentile(latency, 0.99) * 1000, 1),
            latency_p50_rtts=round(percentile(latency, 0.5) / median_rtt, 2),
            latency_p99_rtts=round(percentile(latency, 0.99) / median_rtt, 2),
            success_closest=round(closest_ok / len(done), 5) if done else 0.0,
            success_k=round(k_share / len(done), 5) if done else 0.0,
            maintenance_messages=self.maintenance,
            extra={"rejoin_lookups": self.rejoins, "rejoin": cfg.rejoin},
            contacts_per_table=round(contacts / sampled, 1),
            build_seconds=round(build_seconds, 1),
            run_seconds=round(run_seconds, 1),
        )


# -- running, printing, plotting


def simulate(config: SimConfig, log: Callable[[str], None] | None = None) -> Figures:
    """Build the network of ``config``, run its lookups, measure."""
    rng = random.Random(config.seed)
    t0 = time.perf_counter()
    net = Network(config, rng)
    net.build_tables(
        (lambda i: log(f"  tables {i:,}/{config.nodes:,}"))
        if log and config.nodes > 20_000
        else None
    )
    built = time.perf_counter() - t0
    sim = Simulator(net)
    t1 = time.perf_counter()
    sim.run()
    ran = time.perf_counter() - t1
    return sim.figures(built, ran)


COLUMNS = (
    ("nodes", "N", "{:,}"),
    ("churn", "churn", "{:.0%}"),
    ("hops_p50", "hops p50", "{:g}"),
    ("hops_p99", "p99", "{:g}"),
    ("messages_mean", "msgs/lookup", "{:.1f}"),
    ("bytes_mean", "bytes/lookup", "{:,.0f}"),
    ("latency_p50_ms", "latency p50 ms", "{:.0f}"),
    ("latency_p99_ms", "p99 ms", "{:.0f}"),
    ("latency_p50_rtts", "p50/RTT", "{:.2f}"),
    ("latency_p99_rtts", "p99/RTT", "{:.2f}"),
    ("success_closest", "closest found", "{:.2%}"),
    ("success_k", "k found", "{:.2%}"),
    ("build_seconds", "build s", "{:.0f}"),
    ("run_seconds", "run s", "{:.0f}"),
)


def table(rows: Sequence[Figures]) -> str:
    """The figures as a fixed-width text table."""
    head = [title for _key, title, _fmt in COLUMNS]
    body = [[fmt.format(getattr(r, key)) for key, _title, fmt in COLUMNS] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(head, widths, strict=True))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(b, widths, strict=True)) for b in body]
    return "\n".join(lines)


def log_fit(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """(a, b) of the least-squares fit y = a + b * log10(x)."""
    lx = [math.log10(x) for x in xs]
    mx, my = statistics.fmean(lx), statistics.fmean(ys)
    var = sum((x - mx) ** 2 for x in lx)
    b = sum((x - mx) * (y - my) for x, y in zip(lx, ys, strict=True)) / var if var else 0.0
    return my - b * mx, b


def svg_plot(
    title: str,
    series: Sequence[tuple[str, str, Sequence[float], Sequence[float]]],
    y_label: str,
    *,
    fit: bool = True,
    hlines: Sequence[tuple[float, str]] = (),
) -> str:
    """A line plot against N on a log axis, as SVG text; each series is (name, colour, xs,
    ys), drawn as points with its log N fit as a dashed line; ``hlines`` are (y, label)
    reference lines (goals). The legend sits under the plot."""
    width, left, right, top, bottom = 640, 70, 20, 40, 60
    plot_h = 300
    height = top + plot_h + bottom + 18 * len(series) + 10
    xs_all = [x for _n, _c, xs, _ys in series for x in xs]
    ys_all = [y for _n, _c, _xs, ys in series for y in ys]
    x_lo = 10 ** math.floor(math.log10(min(xs_all)))
    x_hi = 10 ** math.ceil(math.log10(max(xs_all)))
    if x_hi == x_lo:
        x_hi = x_lo * 10
    y_hi = max([*ys_all, *(y for y, _l in hlines)]) * 1.15 or 1.0
    plot_w = width - left - right

    def px(x: float) -> float:
        return left + plot_w * (math.log10(x) - math.log10(x_lo)) / (
            math.log10(x_hi) - math.log10(x_lo)
        )

    def py(y: float) -> float:
        return top + plot_h * (1 - y / y_hi)

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="{width / 2}" y="22" text-anchor="middle" font-size="15">{_esc(title)}</text>',
        f'<line x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}" '
        'stroke="black"/>',
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + plot_h}" stroke="black"/>',
    ]
    decade = x_lo
    while decade <= x_hi:
        x = px(decade)
        out.append(
            f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{top + plot_h}" stroke="#ddd"/>'
        )
        out.append(
            f'<text x="{x:.1f}" y="{top + plot_h + 18}" text-anchor="middle">{decade:,.0f}</text>'
        )
        decade *= 10
    step = _nice_step(y_hi / 5)
    tick = 0.0
    while tick <= y_hi:
        y = py(tick)
        out.append(
            f'<line x1="{left}" y1="{y:.1f}" x2="{left + plot_w}" y2="{y:.1f}" stroke="#eee"/>'
        )
        out.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{tick:g}</text>')
        tick = round(tick + step, 10)
    out.append(
        f'<text x="{left + plot_w / 2}" y="{height - 18}" text-anchor="middle">'
        "N (nodes, log scale)</text>"
    )
    out.append(
        f'<text x="18" y="{top + plot_h / 2}" text-anchor="middle" '
        f'transform="rotate(-90 18 {top + plot_h / 2})">{_esc(y_label)}</text>'
    )
    for y, text in hlines:
        out.append(
            f'<line x1="{left}" y1="{py(y):.1f}" x2="{left + plot_w}" y2="{py(y):.1f}" '
            'stroke="#888" stroke-dasharray="2,3"/>'
        )
        out.append(
            f'<text x="{left + plot_w - 4}" y="{py(y) - 4:.1f}" text-anchor="end" '
            f'fill="#555">{_esc(text)}</text>'
        )
    for index, (name, colour, xs, ys) in enumerate(series):
        points = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in zip(xs, ys, strict=True))
        out.append(f'<polyline points="{points}" fill="none" stroke="{colour}" stroke-width="1"/>')
        for x, y in zip(xs, ys, strict=True):
            out.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="4" fill="{colour}"/>')
        label = name
        if fit and len(xs) >= 2:
            a, b = log_fit(xs, ys)
            x0, x1 = min(xs), max(xs)
            out.append(
                f'<line x1="{px(x0):.1f}" y1="{py(a + b * math.log10(x0)):.1f}" '
                f'x2="{px(x1):.1f}" y2="{py(a + b * math.log10(x1)):.1f}" stroke="{colour}" '
                'stroke-dasharray="5,4"/>'
            )
            label = f"{name}: fit {a:.2f} + {b:.2f} log10 N"
        ly = top + plot_h + bottom + 4 + 18 * index
        out.append(f'<rect x="{left + 12}" y="{ly - 9}" width="10" height="10" fill="{colour}"/>')
        out.append(f'<text x="{left + 28}" y="{ly}">{_esc(label)}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def _lighter(colour: str) -> str:
    """``colour`` (#rrggbb) halfway to white."""
    channels = [int(colour[i : i + 2], 16) for i in (1, 3, 5)]
    return "#" + "".join(f"{(c + 255) // 2:02x}" for c in channels)


def _nice_step(raw: float) -> float:
    magnitude = 10 ** math.floor(math.log10(raw)) if raw > 0 else 1.0
    for m in (1, 2, 2.5, 5, 10):
        if raw <= m * magnitude:
            return m * magnitude
    return 10 * magnitude


def _esc(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")


def _label(r: Figures) -> str:
    tuned = [f"burst_after {r.burst_after}"] if r.burst_after else []
    tuned += [f"pns {r.pns}"] if r.pns > 1 else []
    tuned += [f"alpha {r.alpha}"] if r.alpha != ALPHA else []
    tuned += ["no rejoin"] if not r.extra.get("rejoin", True) else []
    return f"{', '.join(tuned) or 'defaults'}, churn {r.churn:.0%}"


def write_plots(rows: Sequence[Figures], directory: Path) -> list[Path]:
    """Messages and latency against N (one series per configuration and churn), as SVG."""
    directory.mkdir(parents=True, exist_ok=True)
    groups: dict[str, list[Figures]] = {}
    for r in sorted(rows, key=lambda r: r.nodes):
        groups.setdefault(_label(r), []).append(r)
    messages, latency = [], []
    for i, (label, group) in enumerate(groups.items()):
        ns = [r.nodes for r in group]
        colour = COLOURS[i % len(COLOURS)]
        messages.append((label, colour, ns, [r.messages_mean for r in group]))
        latency.append((f"p50, {label}", colour, ns, [r.latency_p50_rtts for r in group]))
        latency.append((f"p99, {label}", _lighter(colour), ns, [r.latency_p99_rtts for r in group]))
    paths = [directory / "sim_messages_vs_n.svg", directory / "sim_latency_vs_n.svg"]
    paths[0].write_text(
        svg_plot("find_node messages per lookup (simulated)", messages, "messages per lookup")
    )
    paths[1].write_text(
        svg_plot(
            "lookup latency (simulated), in median RTTs",
            latency,
            "latency / median RTT",
            hlines=[(2.5, "goal p50 <= 2.5"), (6.0, "goal p99 <= 6")],
        )
    )
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", default="1000,10000", help="comma-separated N (up to 100,000)")
    ap.add_argument("--lookups", type=int, default=1000, help="lookups measured per run")
    ap.add_argument("--churn", default="0", help="comma-separated offline fractions, e.g. 0,0.1")
    ap.add_argument("--loss", type=float, default=0.0, help="datagram loss probability")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--duration", type=float, default=3600.0, help="virtual seconds of lookups")
    ap.add_argument("--alpha", type=int, default=ALPHA)
    ap.add_argument("--ksize", type=int, default=KSIZE)
    ap.add_argument("--per-range", type=int, default=None, help="contacts offered per range")
    ap.add_argument("--pns", type=int, default=1, help="proximity choice among S x candidates")
    ap.add_argument("--burst-after", type=int, default=None, help="lookups' burst_after")
    ap.add_argument("--no-rejoin", action="store_true", help="returning nodes stay silent")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    ap.add_argument("--plot", type=Path, help="write SVG plots (messages, latency) here")
    ap.add_argument("--replot", type=Path, nargs="+", help="plot these --json outputs, no run")
    args = ap.parse_args(argv)
    if args.replot:
        rows_in = [Figures(**r) for f in args.replot for r in json.loads(f.read_text())]
        print(table(rows_in))
        for path in write_plots(rows_in, args.plot or Path("docs/img")):
            print(f"wrote {path}", file=sys.stderr)
        return 0
    sizes = [int(x.replace("_", "")) for x in args.nodes.split(",") if x]
    churns = [float(x) for x in args.churn.split(",") if x]
    if any(n < 2 or n > 200_000 for n in sizes) or any(not 0 <= c < 1 for c in churns):
        ap.error("--nodes must be within 2..200,000 and --churn within [0, 1)")

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    rows = []
    for churn in churns:
        for n in sizes:
            config = SimConfig(
                nodes=n,
                lookups=args.lookups,
                churn=churn,
                loss=args.loss,
                seed=args.seed,
                duration=args.duration,
                ksize=args.ksize,
                alpha=args.alpha,
                per_range=args.per_range or args.ksize,
                pns=args.pns,
                burst_after=args.burst_after,
                rejoin=not args.no_rejoin,
            )
            log(f"N={n:,} churn={churn:.0%} ...")
            rows.append(simulate(config, log))
            log(table(rows[-1:]))
    if args.json:
        print(json.dumps([asdict(r) for r in rows], indent=2))
    else:
        print(table(rows))
        if rows:
            r = rows[0]
            print(
                f"model: median RTT {r.median_rtt_ms:.0f} ms, p99 {r.p99_rtt_ms:.0f} ms; "
                f"k={r.ksize}, alpha={r.alpha}, pns={r.pns}, loss={r.loss:g}"
            )
    if args.plot is not None:
        for path in write_plots(rows, args.plot):
            log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
