"""The sans-I/O lookup (qisd.core.lookup) driven in memory with a fake clock: no sockets, no
sleeps. The asyncio crawls that drive it on real sockets are tested in test_dht/test_defects."""

from __future__ import annotations

import heapq
import random
from dataclasses import dataclass

import pytest

from qisd.core.lookup import CallState, Lookup, smoothed_rtt, stall_after
from qisd.errors import UsageError

K = 8
ALPHA = 3


@dataclass(frozen=True)
class Peer:
    """A contact as the lookup sees one: an id and its integer."""

    id: bytes
    long_id: int


def peer(value: int) -> Peer:
    return Peer(value.to_bytes(20, "big"), value)


TARGET = peer(0)
ME = peer(1 << 159)


def ids(peers: list[Peer]) -> list[int]:
    return [p.long_id for p in peers]


class Network:
    """Nodes with Kademlia tables (up to ``k`` contacts per bucket), per-node reply delays and
    dead nodes, and an event queue in virtual time that drives one lookup."""

    def __init__(self, count: int, seed: int = 7, k: int = K) -> None:
        rng = random.Random(seed)
        self.nodes = [peer(rng.getrandbits(160)) for _ in range(count)]
        self.tables: dict[bytes, list[Peer]] = {}
        for node in self.nodes:
            buckets: dict[int, list[Peer]] = {}
            for other in self.nodes:
                if other is not node:
                    buckets.setdefault((other.long_id ^ node.long_id).bit_length(), []).append(
                        other
                    )
            self.tables[node.id] = [p for b in buckets.values() for p in b[:k]]
        self.delay: dict[bytes, float] = {n.id: 0.05 + rng.random() * 0.05 for n in self.nodes}
        self.dead: set[bytes] = set()
        self.timeout = 2.0

    def reply(self, asked: bytes, target: int) -> list[Peer]:
        table = self.tables[asked]
        return sorted(table, key=lambda p: p.long_id ^ target)[:K]

    def run(
        self,
        lookup: Lookup[Peer],
        stall_after: float = 0.2,
        suspect: set[bytes] | None = None,
        active_seen: list[int] | None = None,
    ) -> float:
        """Drive ``lookup`` to its end; the virtual time it ended."""
        now = 0.0
        events: list[tuple[float, int, bytes, bool]] = []
        seq = 0
        while True:
            for contact in lookup.next(now, stall_after, (suspect or set()).__contains__):
                seq += 1
                if contact.id in self.dead:
                    heapq.heappush(events, (now + self.timeout, seq, contact.id, False))
                else:
                    heapq.heappush(events, (now + self.delay[contact.id], seq, contact.id, True))
            if active_seen is not None:
                active_seen.append(lookup.active)
            if lookup.done:
                return now
            wake = lookup.deadline()
            if events and (wake is None or events[0][0] <= wake):
                now, _seq, cid, ok = heapq.heappop(events)
                if ok:
                    lookup.answered(cid, self.reply(cid, lookup.target))
                else:
                    lookup.failed(cid)
            else:
                assert wake is not None, "a lookup that is not done has a call or a timer"
                now = wake

    def nodes_ids(self) -> list[int]:
        return [n.long_id for n in self.nodes]

    def true_closest(self, target: int, k: int = K) -> list[int]:
        live = [n.long_id for n in self.nodes if n.id not in self.dead]
        return sorted(live, key=lambda v: v ^ target)[:k]


def test_converges_on_the_true_closest() -> None:
    net = Network(400)
    rng = random.Random(3)
    hops = []
    for _ in range(30):
        start, target = rng.choice(net.nodes), rng.getrandbits(160)
        seeds = net.reply(start.id, target)
        lookup = Lookup(target.to_bytes(20, "big"), start.id, seeds, K, ALPHA)
        net.run(lookup)
        assert ids(lookup.result()) == net.true_closest(target)
        assert lookup.expected == K
        hops.append(lookup.hops)
    # 400 nodes, 8 per bucket: a couple of hops, never more than log2(400).
    assert min(hops) >= 1 and max(hops) <= 9


def test_at_most_alpha_calls_are_active() -> None:
    net = Network(300)
    start = net.nodes[0]
    target = 12345
    active: list[int] = []
    lookup = Lookup(target.to_bytes(20, "big"), start.id, net.reply(start.id, target), K, ALPHA)
    net.run(lookup, active_seen=active)
    assert max(active) == ALPHA
    assert lookup.messages > ALPHA


def test_first_call_asks_alpha_nearest_first() -> None:
    seeds = [peer(v) for v in (50, 10, 40, 20, 30)]
    lookup = Lookup(TARGET.id, ME.id, seeds, K, 2)
    assert ids(lookup.next(0.0, 1.0)) == [10, 20]
    assert lookup.next(0.5, 1.0) == [], "two active calls: nobody else is asked"
    assert lookup.deadline() == 1.0
    assert lookup.messages == 2


def test_a_stalled_call_frees_its_slot_and_its_late_reply_is_used() -> None:
    slow, fast, other = peer(10), peer(20), peer(30)
    lookup = Lookup(TARGET.id, ME.id, [slow, fast, other], K, 2)
    assert ids(lookup.next(0.0, 0.25)) == [10, 20]
    assert lookup.answered(fast.id, [])
    assert ids(lookup.next(0.1, 0.25)) == [30]
    # 10 has not answered by its stall time: it stops counting, and its slot is free again.
    assert lookup.next(0.25, 0.25) == []
    assert lookup.state(slow.id) is CallState.STALLED and lookup.active == 1
    assert not lookup.done, "30 is still active"
    # The late reply comes before the end: it is used, and the contact it names is asked.
    closer = peer(5)
    assert lookup.answered(slow.id, [closer])
    assert ids(lookup.next(0.3, 0.25)) == [5]
    assert lookup.hop(closer.id) == 2
    lookup.answered(closer.id, [])
    lookup.answered(other.id, [])
    lookup.next(0.4, 0.25)
    assert lookup.done
    assert ids(lookup.result()) == [5, 10, 20, 30]
    assert lookup.hops == 2


def test_the_end_does_not_wait_on_stalled_calls() -> None:
    slow, fast = peer(10), peer(20)
    lookup = Lookup(TARGET.id, ME.id, [slow, fast], K, 3)
    lookup.next(0.0, 0.2)
    lookup.answered(fast.id, [])
    lookup.next(0.1, 0.2)
    assert not lookup.done, "10 is the closest and still active"
    lookup.next(0.2, 0.2)
    assert lookup.done and ids(lookup.result()) == [20]
    assert lookup.inflight == 1
    assert not lookup.answered(slow.id, [peer(1)]), "a reply after the end is ignored"
    assert ids(lookup.result()) == [20]


def test_with_no_answer_yet_it_waits_for_a_stalled_call() -> None:
    a, b = peer(10), peer(20)
    lookup = Lookup(TARGET.id, ME.id, [a, b], K, 3)
    lookup.next(0.0, 0.2)
    lookup.next(0.2, 0.2)
    assert not lookup.done and lookup.deadline() is None, "every call stalled: wait for one"
    lookup.answered(b.id, [])
    lookup.next(1.5, 0.2)
    assert lookup.done and ids(lookup.result()) == [20]


def test_suspects_are_asked_but_never_held_for() -> None:
    suspect, good = peer(10), peer(20)
    lookup = Lookup(TARGET.id, ME.id, [suspect, good], K, 1)
    # alpha = 1 and the suspect is nearest: it is asked without taking the one slot.
    assert ids(lookup.next(0.0, 1.0, {suspect.id}.__contains__)) == [10, 20]
    assert lookup.state(suspect.id) is CallState.STALLED and lookup.active == 1
    lookup.answered(good.id, [])
    lookup.next(0.05, 1.0, {suspect.id}.__contains__)
    assert lookup.done, "the suspect's reply is not awaited"
    assert ids(lookup.result()) == [20]


def test_a_failed_contact_is_replaced_by_the_next_closest() -> None:
    seeds = [peer(v) for v in range(10, 10 + K + 1)]
    lookup = Lookup(TARGET.id, ME.id, seeds, K, 1)
    assert ids(lookup.next(0.0, 1.0)) == [10]
    lookup.failed(seeds[0].id)
    assert ids(lookup.next(0.1, 1.0)) == [11]
    for now, contact in enumerate(seeds[1:], start=1):
        lookup.answered(contact.id, [])
        lookup.next(float(now), 1.0)
    assert lookup.done
    assert ids(lookup.result()) == list(range(11, 11 + K)), "k answered, the failed one left out"
    assert lookup.state(seeds[-1].id) is CallState.ANSWERED, "the k+1th was asked in its place"
    assert lookup.expected == K


def test_dead_nodes_in_a_network_cost_time_not_correctness() -> None:
    net = Network(300, seed=11)
    rng = random.Random(5)
    net.dead = {n.id for n in rng.sample(net.nodes, 60)}
    live = [n for n in net.nodes if n.id not in net.dead]
    for _ in range(15):
        start, target = rng.choice(live), rng.getrandbits(160)
        lookup = Lookup(target.to_bytes(20, "big"), start.id, net.reply(start.id, target), K, 3)
        ended = net.run(lookup, stall_after=0.2)
        found, best = ids(lookup.result()), net.true_closest(target)
        # A dead contact among the k closest stalls and counts as reached (``expected``), so
        # the result can be short of k; the closest live node is always found.
        assert found[0] == best[0]
        assert set(found) <= set(net.nodes_ids()) - {int.from_bytes(d, "big") for d in net.dead}
        assert len(set(found) & set(best)) >= K // 2
        assert ended < net.timeout * 3, "stalls keep dead contacts from holding the lookup"


def test_hostile_replies_far_duplicate_and_self() -> None:
    near = [peer(v) for v in range(2, 2 + K)]
    liar = peer(1)
    lookup = Lookup(TARGET.id, ME.id, [liar, *near], K, 1)
    assert ids(lookup.next(0.0, 1.0)) == [1]
    far = [peer((1 << 159) + i) for i in range(50)]
    # Far contacts, the same contact many times, this node itself, the liar itself.
    assert lookup.answered(liar.id, [*far, *[near[0]] * 20, ME, liar])
    assert lookup.state(ME.id) is None, "this node is never a candidate"
    assert lookup.hop(near[0].id) == 1, "a contact named again keeps where it was first found"
    assert not lookup.answered(liar.id, [peer(0)]), "a second reply from one contact is ignored"
    assert not lookup.answered(near[3].id, []), "a reply from a contact not asked is ignored"
    assert not lookup.failed(far[0].id)
    asked: list[int] = []
    now = 0.0
    while not lookup.done:
        now += 0.1
        for contact in lookup.next(now, 1.0):
            asked.append(contact.long_id)
            lookup.answered(contact.id, [])
    assert asked == list(range(2, 2 + K - 1)), "far contacts never asked: k closer are known"
    assert ids(lookup.result()) == [1, *range(2, 2 + K - 1)]
    assert lookup.messages == K


def test_end_condition_needs_each_of_the_k_closest() -> None:
    seeds = [peer(v) for v in range(10, 10 + K)]
    lookup = Lookup(TARGET.id, ME.id, seeds, K, K)
    lookup.next(0.0, 1.0)
    for contact in seeds[:-1]:
        lookup.answered(contact.id, [])
        lookup.next(0.1, 1.0)
        assert not lookup.done
    # The last reply names a closer contact: the lookup is not done until it answers too.
    lookup.answered(seeds[-1].id, [peer(3)])
    assert ids(lookup.next(0.2, 1.0)) == [3]
    assert not lookup.done
    lookup.answered(peer(3).id, [])
    lookup.next(0.3, 1.0)
    assert lookup.done and ids(lookup.result())[0] == 3 and len(lookup.result()) == K


def test_no_seeds_ends_at_once_with_nothing() -> None:
    lookup: Lookup[Peer] = Lookup(TARGET.id, ME.id, [], K, ALPHA)
    assert lookup.next(0.0, 1.0) == [] and lookup.done
    assert lookup.result() == [] and lookup.hops == 0 and lookup.expected == 0


@pytest.mark.parametrize(("ksize", "alpha"), [(0, 3), (20, 0)])
def test_bad_parameters_are_a_usage_error(ksize: int, alpha: int) -> None:
    with pytest.raises(UsageError):
        Lookup(TARGET.id, ME.id, [], ksize, alpha)


def test_stall_time_follows_the_smoothed_round_trip() -> None:
    assert stall_after(0.0, 2.0) == 0.25, "before any measurement"
    assert stall_after(0.1, 2.0) == pytest.approx(0.42)
    assert stall_after(0.001, 2.0) == 0.05 and stall_after(5.0, 2.0) == 2.0
    srtt = smoothed_rtt(0.0, 0.2)
    assert srtt == 0.2 and smoothed_rtt(srtt, 1.0) == pytest.approx(0.3)


def test_a_converged_lookup_asks_the_rest_of_the_k_closest_at_once() -> None:
    seeds = [peer(v) for v in range(10, 10 + K)]
    lookup = Lookup(TARGET.id, ME.id, seeds, K, 2, burst_after=2)
    assert ids(lookup.next(0.0, 1.0)) == [10, 11]
    lookup.answered(seeds[0].id, [peer(3)])  # names a closer contact: not converged
    assert ids(lookup.next(0.1, 1.0)) == [3]
    lookup.answered(seeds[1].id, [peer(200)])
    assert not lookup.converged
    lookup.answered(peer(3).id, [])
    assert lookup.converged, "two answers in a row named nobody closer than 3"
    asked = ids(lookup.next(0.2, 1.0))
    # The k closest are now 3 and 10..16 (17 fell out): all those not asked yet, at once.
    assert asked == list(range(12, 17)), "every one of the k closest not yet asked"
    assert lookup.active == 5 > lookup.alpha


def test_without_burst_after_it_stays_at_alpha() -> None:
    seeds = [peer(v) for v in range(10, 10 + K)]
    lookup = Lookup(TARGET.id, ME.id, seeds, K, 2)
    lookup.next(0.0, 1.0)
    for contact in seeds[:2]:
        lookup.answered(contact.id, [])
    assert not lookup.converged and len(lookup.next(0.1, 1.0)) == 2
    with pytest.raises(UsageError):
        Lookup(TARGET.id, ME.id, seeds, K, 2, burst_after=0)
