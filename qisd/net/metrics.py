"""Prometheus metrics of a running node (``qisd start --metrics``), with ``prometheus_client``.

Counters and gauges are not kept twice: :class:`NodeCollector` reads the node's own figures
(``Node.status()``-level counters, ``DhtNode.stats()``, ``Store.stats()``, the Flight
endpoint's call counts) at scrape time. Only durations are observed as they happen, into the
histograms of :class:`Timings`: RPC round trips and lookups (by wrapping, on the running
instance, the DHT's one send path and its two lookup methods) and emit commits and fetches
(the node's ``on_timing`` hook).

Names follow Prometheus conventions: ``qisd_`` prefix, ``_total`` counters, ``_seconds`` and
``_bytes`` units, labels of low cardinality (RPC name, outcome, reason, direction), never a
peer id or a key. DHT figures are read generically: every ``rpcs_sent`` / ``rpcs_received``
entry, every ``rejected`` / ``malformed`` reason, and any further number or table of numbers
``DhtNode.stats()`` reports, so counters added to the DHT appear without a change here (see
README, "Metrics, logs and the dashboard", for the list).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from qisd import __version__

log = logging.getLogger(__name__)

RPC_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
"""Round trips on one machine take ~1 ms; across the internet 20-300 ms; timeouts 2 s."""
WORK_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
"""Commits (an fsync each), fetches and lookups (several round trips)."""

# DHT stats() keys that are read by name (documented in the README); every other numeric key
# is exposed generically below. Keys the README documents but today's DHT does not report
# yet are exposed as 0, so dashboards and alerts can be written against them now.
_DHT_COUNTERS: dict[str, tuple[str, str]] = {
    "rate_limited": ("dht_rate_limited_requests", "Requests dropped by the per-source limit."),
    "rate_limited_envelopes": (
        "dht_rate_limited_envelopes",
        "Envelopes refused by the per-source limit.",
    ),
    "timeouts": ("dht_rpc_timeouts", "RPCs this node sent that got no reply in time."),
    "stored_packets": (
        "dht_stored_envelopes",
        "Envelopes peers stored here with store_packets.",
    ),
    "bytes_sent": ("dht_sent_bytes", "UDP payload bytes this node sent."),
    "bytes_received": ("dht_received_bytes", "UDP payload bytes this node received."),
    "fetches": ("dht_fetches", "Fetches (lookups of a key's packets) this node ran."),
    "fetch_messages": ("dht_fetch_messages", "RPCs those fetches sent."),
    "handler_errors": ("dht_handler_errors", "Requests whose handler failed (a bug; logged)."),
}
_DHT_GAUGES: dict[str, tuple[str, str]] = {
    "contacts": ("routing_table_contacts", "Contacts in the routing table."),
    "following": ("dht_followed_keys", "Keys this node listens on (follows)."),
    "handoff_backlog": ("handoff_backlog", "Keys waiting to be handed off to joining nodes."),
    "sync_backlog": ("sync_backlog", "Keys waiting to be reconciled with their replicas."),
}
_DHT_TABLES: dict[str, tuple[str, str, str]] = {
    # stats key: (metric name, label, help)
    "rpcs_sent": ("dht_rpcs_sent", "rpc", "RPC requests this node sent, by RPC."),
    "rpcs_received": ("dht_rpcs_received", "rpc", "RPC requests this node answered, by RPC."),
    "rejected": ("dht_rejected", "reason", "Requests or packets refused, by reason."),
    "malformed": ("dht_malformed", "reason", "Undecodable datagrams or replies, by reason."),
    "busy": ("dht_busy_replies", "direction", "'Busy, retry later' replies, sent or received."),
}
_DHT_PER_PEER: dict[str, tuple[str, ...]] = {
    "peer_queues": ("window", "in_flight", "queued", "held_seconds"),
}
"""Tables by peer address that are served when empty too, as 0 (a family that comes and goes
with the traffic breaks rate() and alerts): their entries, and each field summed."""
_DHT_FOLDED = {"busy_sent": ("busy", "sent"), "busy_received": ("busy", "received")}
"""Numbers the DHT reports one by one that belong in a table above (key: (table, label))."""
_GAUGE_WORDS = ("backlog", "queue", "queued", "pending", "contacts", "following", "peers")
_NOT_METRICS = {"bootstrap_unreachable"}
_NAME = re.compile(r"[^a-zA-Z0-9_]")


def _metric_name(key: str) -> str:
    return _NAME.sub("_", key).strip("_").lower() or "unnamed"


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


LOOKUPS = {
    "crawl_nodes_counted": "nodes",
    "crawl_replicas": "replicas",
    "crawl_packets": "packets",
}
"""The DHT server's lookup methods, timed by kind."""


class Timings:
    """The histograms: durations observed as they happen (thread-safe)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.rpc = Histogram(
            "qisd_dht_rpc_round_trip_seconds",
            "Round trip of RPCs this node sent, by RPC and outcome (reply or no_reply).",
            ["rpc", "outcome"],
            buckets=RPC_BUCKETS,
            registry=registry,
        )
        self.lookup = Histogram(
            "qisd_dht_lookup_seconds",
            "Iterative lookups, by kind: nodes and replicas (find_node), packets (find_packets).",
            ["kind"],
            buckets=WORK_BUCKETS,
            registry=registry,
        )
        self.emit_commit = Histogram(
            "qisd_emit_commit_seconds",
            "Validating, signing and durably committing one emit (or one chunk of it).",
            buckets=WORK_BUCKETS,
            registry=registry,
        )
        self.fetch = Histogram(
            "qisd_fetch_seconds",
            "Fetching one key's packets from the network (lookup, pages, verification).",
            buckets=WORK_BUCKETS,
            registry=registry,
        )

    def observe(self, what: str, seconds: float) -> None:
        """The node's ``on_timing`` hook: ``emit_commit`` or ``fetch``."""
        if what == "emit_commit":
            self.emit_commit.observe(seconds)
        elif what == "fetch":
            self.fetch.observe(seconds)

    def instrument(self, dht: Any) -> bool:
        """Time the RPCs and lookups of a started ``DhtNode``; False if its shape changed."""
        proto = dht.protocol
        server = dht.server
        send = getattr(proto, "_call", None)
        if send is None:
            log.warning("the DHT has no _call to time: the RPC histogram stays empty")
            return False
        rpc = self.rpc
        lookup = self.lookup

        def timed_call(address: Any, name: str, *args: Any, **kwargs: Any) -> Any:
            future = send(address, name, *args, **kwargs)
            if future.done():  # not sent (unreachable, too large): no round trip
                return future
            started = time.perf_counter()

            def done(f: Any) -> None:
                ok = not f.cancelled() and f.exception() is None and bool(f.result()[0])
                rpc.labels(name, "reply" if ok else "no_reply").observe(
                    time.perf_counter() - started
                )

            future.add_done_callback(done)
            return future

        def timed_lookup(kind: str, crawl: Callable[..., Any]) -> Callable[..., Any]:
            async def timed(*args: Any, **kwargs: Any) -> Any:
                with lookup.labels(kind).time():
                    return await crawl(*args, **kwargs)

            return timed

        proto._call = timed_call
        for method, kind in LOOKUPS.items():
            crawl = getattr(server, method, None)
            if crawl is not None:
                setattr(server, method, timed_lookup(kind, crawl))
        return True


class NodeCollector(Collector):
    """Reads a node's figures at scrape time and yields them as metric families."""

    def __init__(
        self,
        node: Any,
        *,
        flight_calls: Callable[[], Mapping[tuple[str, str], int]] | None = None,
        control_rejected: Callable[[], int] | None = None,
    ) -> None:
        self.node = node
        self.flight_calls = flight_calls
        self.control_rejected = control_rejected

    def describe(self) -> list[Metric]:
        # Families depend on what the DHT reports: no fixed description (collect at register).
        return []

    def collect(self) -> Iterator[Metric]:
        node = self.node
        yield InfoMetricFamily(
            "qisd_node",
            "This node: its version and node id.",
            value={"version": __version__, "node_id": node.identity.node_id},
        )
        yield GaugeMetricFamily(
            "qisd_uptime_seconds", "Seconds since the node opened.", value=node.uptime()
        )
        yield from self._node_counters()
        yield from self._store()
        yield from self._dht()
        yield from self._flight()

    def _node_counters(self) -> Iterator[Metric]:
        c = self.node.counters

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(f"qisd_{name}", doc, value=value)

        yield counter(
            "emits",
            "Emit requests (a bulk emit counts once, a Flight DoPut once).",
            c.get("emits", 0),
        )
        yield counter("emit_commits", "Durable commits of emitted rows.", c.get("emit_commits", 0))
        yield counter("emitted_rows", "Rows emitted and committed.", c.get("rows_emitted", 0))
        yield counter(
            "emitted_packets",
            "Distinct new packets emitted and committed.",
            c.get("packets_emitted", 0),
        )
        yield counter(
            "emit_duplicate_packets",
            "Emitted packets the store already held (the same rows emitted again).",
            c.get("duplicate_packets", 0),
        )
        rejected = CounterMetricFamily(
            "qisd_emit_rejected", "Emits and rows refused locally, by what.", labels=["what"]
        )
        rejected.add_metric(["emit"], c.get("rejected_emits", 0))
        rejected.add_metric(["row"], c.get("rejected_rows", 0))
        yield rejected
        received = CounterMetricFamily(
            "qisd_received_envelopes",
            "Envelopes from peers newly stored here, by how they came.",
            labels=["via"],
        )
        for via, n in sorted(self.node.received.items()):
            received.add_metric([via], n)
        yield received
        yield counter(
            "publish_failures",
            "Background publish rounds that left envelopes short of replicas, or raised.",
            c.get("publish_failures", 0),
        )
        yield counter(
            "publish_retried_envelopes",
            "Envelopes published again (with back-off) after a round left them short.",
            c.get("publish_retried", 0),
        )
        yield counter(
            "election_runs",
            "Syntheses the election loop re-ran for followed paths.",
            c.get("election_runs", 0),
        )
        yield counter(
            "darwin_observations",
            "Outcomes this site reported that scored the templates.",
            c.get("darwin_observations", 0),
        )
        yield GaugeMetricFamily(
            "qisd_followed_paths",
            "Fingerprint paths this node follows.",
            value=len(self.node.followed()),
        )
        yield GaugeMetricFamily(
            "qisd_publish_backlog_envelopes",
            "Committed envelopes waiting for their first publish.",
            value=self.node.publish_backlog(),
        )
        yield GaugeMetricFamily(
            "qisd_watch_streams",
            "Local subscriptions open (qisd watch, Flight DoExchange).",
            value=self.node.subscriber_count(),
        )
        if self.control_rejected is not None:
            yield counter(
                "control_rejected_requests",
                "Malformed or refused control-socket requests.",
                self.control_rejected(),
            )

    def _store(self) -> Iterator[Metric]:
        stats = self.node.store.stats()
        limits = self.node.config.store
        gauge = GaugeMetricFamily
        yield gauge("qisd_store_keys", "Keys the store holds packets under.", value=stats["keys"])
        packets = gauge("qisd_store_envelopes", "Envelopes stored, by origin.", labels=["origin"])
        packets.add_metric(["local"], stats["local_packets"])
        packets.add_metric(["remote"], stats["packets"] - stats["local_packets"])
        yield packets
        nbytes = gauge("qisd_store_bytes", "Envelope bytes stored, by origin.", labels=["origin"])
        nbytes.add_metric(["local"], stats["local_bytes"])
        nbytes.add_metric(["remote"], stats["bytes"] - stats["local_bytes"])
        yield nbytes
        yield gauge(
            "qisd_store_max_bytes",
            "The store's cap on envelope bytes (store.max_bytes).",
            value=limits.max_bytes,
        )
        yield gauge(
            "qisd_store_file_bytes",
            "Bytes of the SQLite file and its WAL on disk.",
            value=stats["file_bytes"],
        )

    def _dht(self) -> Iterator[Metric]:
        dht = self.node.dht
        stats: dict[str, Any] = dict(dht.stats()) if dht is not None else {}
        peers = self.node.peers() if dht is not None else []
        state = GaugeMetricFamily(
            "qisd_peers",
            "Routing-table contacts, by state: responsive, or failing (last call failed).",
            labels=["state"],
        )
        failing = sum(1 for p in peers if p.get("failures"))
        state.add_metric(["responsive"], len(peers) - failing)
        state.add_metric(["failing"], failing)
        yield state
        yield GaugeMetricFamily(
            "qisd_bootstrap_unreachable_peers",
            "Bootstrap peers that have not answered yet (retried in the background).",
            value=len(stats.get("bootstrap_unreachable") or {}),
        )
        seen: set[str] = set(_NOT_METRICS) | set(_DHT_FOLDED)
        for single, (key, item) in _DHT_FOLDED.items():
            if _number(stats.get(single)) is not None:
                folded = dict(stats.get(key) or {})
                folded.setdefault(item, stats[single])
                stats[key] = folded
        for key, (name, label, doc) in _DHT_TABLES.items():
            seen.add(key)
            table = stats.get(key)
            family = CounterMetricFamily(f"qisd_{name}", doc, labels=[label])
            if isinstance(table, Mapping):
                for item, value in sorted(table.items()):
                    number = _number(value)
                    if number is not None:
                        family.add_metric([_metric_name(str(item))], number)
            yield family
        for key, (name, doc) in _DHT_COUNTERS.items():
            seen.add(key)
            number = _number(stats.get(key))
            yield CounterMetricFamily(f"qisd_{name}", doc, value=number or 0.0)
        for key, (name, doc) in _DHT_GAUGES.items():
            seen.add(key)
            number = _number(stats.get(key))
            if key == "contacts" and number is None:
                number = float(len(peers))
            yield GaugeMetricFamily(f"qisd_{name}", doc, value=number or 0.0)
        # Per-destination tables (keyed by peer address) are summed, never labelled by peer.
        tables: dict[str, Mapping[str, Any]] = {
            key: value
            for key, value in stats.items()
            if key not in seen
            and isinstance(value, Mapping)
            and value
            and all(isinstance(r, Mapping) for r in value.values())
        }
        for key in _DHT_PER_PEER:
            known = stats.get(key)
            tables[key] = known if isinstance(known, Mapping) else {}
        for key, value in sorted(tables.items()):
            rows = list(value.values())
            seen.add(key)
            name = _metric_name(key)
            yield GaugeMetricFamily(
                f"qisd_dht_{name}_entries",
                f"Entries of DhtNode.stats()[{key!r}] (e.g. peers with queued sends).",
                value=len(rows),
            )
            fields = sorted(
                {f for r in rows for f, v in r.items() if _number(v) is not None}
                | set(_DHT_PER_PEER.get(key, ()))
            )
            for field in fields:
                total = sum(_number(r.get(field)) or 0.0 for r in rows)
                yield GaugeMetricFamily(
                    f"qisd_dht_{name}_{_metric_name(field)}",
                    f"Sum over the entries of DhtNode.stats()[{key!r}] of {field!r}.",
                    value=total,
                )
        # Everything else the DHT reports: numbers, and tables of numbers by one label.
        taken = {name for name, *_ in (*_DHT_TABLES.values(), *_DHT_COUNTERS.values())}
        taken |= {name for name, _ in _DHT_GAUGES.values()}
        for key in sorted(set(stats) - seen):
            value = stats[key]
            name = _metric_name(key)
            if f"dht_{name}" in taken:
                continue  # a name the fixed families already use
            taken.add(f"dht_{name}")
            gauge = any(word in name for word in _GAUGE_WORDS)
            doc = f"DhtNode.stats()[{key!r}]."
            if isinstance(value, Mapping):
                items = [(str(k), _number(v)) for k, v in sorted(value.items())]
                if not items or any(v is None for _, v in items):
                    continue
                family: Metric = (
                    GaugeMetricFamily(f"qisd_dht_{name}", doc, labels=["kind"])
                    if gauge
                    else CounterMetricFamily(f"qisd_dht_{name}", doc, labels=["kind"])
                )
                for item, number in items:
                    family.add_metric([_metric_name(item)], number or 0.0)  # type: ignore[attr-defined]
                yield family
                continue
            number = _number(value)
            if number is None:
                continue
            if gauge:
                yield GaugeMetricFamily(f"qisd_dht_{name}", doc, value=number)
            else:
                yield CounterMetricFamily(f"qisd_dht_{name}", doc, value=number)

    def _flight(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "qisd_flight_calls",
            "Arrow Flight calls, by method and outcome (ok, error, unauthenticated).",
            labels=["method", "outcome"],
        )
        if self.flight_calls is not None:
            for (method, outcome), n in sorted(self.flight_calls().items()):
                family.add_metric([method, outcome], n)
        yield family


class Metrics:
    """The registry of one node: the collector, the timings, and process metrics."""

    def __init__(
        self,
        node: Any,
        *,
        flight_calls: Callable[[], Mapping[tuple[str, str], int]] | None = None,
        control_rejected: Callable[[], int] | None = None,
    ) -> None:
        from prometheus_client.process_collector import ProcessCollector

        self.registry = CollectorRegistry(auto_describe=False)
        self.timings = Timings(self.registry)
        self.collector = NodeCollector(
            node, flight_calls=flight_calls, control_rejected=control_rejected
        )
        self.registry.register(self.collector)
        ProcessCollector(registry=self.registry)  # process_* (CPU, memory, descriptors)
        node.on_timing = self.timings.observe
        if node.dht is not None:
            self.timings.instrument(node.dht)

    def exposition(self, accept: str = "") -> tuple[bytes, str]:
        """The scrape body and its content type (OpenMetrics when the scraper asks for it)."""
        from prometheus_client.exposition import choose_encoder

        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type
