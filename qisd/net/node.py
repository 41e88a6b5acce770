"""The node: one facade over identity, store, DHT and elections that every interface uses.

The control socket (CLI, :class:`qisd.Client`), the Arrow Flight endpoint and the in-process
demo all call the same :class:`Node` methods, so an emit means the same thing everywhere:

1. every row is validated first (all or nothing, unless ``emit_table(partial=True)``);
2. rows are signed into envelopes, one per routable level of the domain's hired template;
3. ``Store.put(local=True)`` commits them durably: that commit is the acknowledgement;
4. only then are they published to the DHT (in the background, or awaited with
   ``wait_replicas``), and handed to local subscribers of their paths.

Followed paths are persisted in the store's meta table, registered with the DHT's listen/notify,
and caught up by the election loop every ``election_seconds``; when a followed path's packets
change, its synthesis is re-run and kept for :meth:`Node.status`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from qisd import __version__
from qisd.config import NodeConfig
from qisd.core import completeness
from qisd.core.crypto import Identity, node_id_for
from qisd.core.darwin import Darwinism, DarwinStateError
from qisd.core.fingerprint import Template, key_for_path, normalize_path, split_path
from qisd.core.hiring import (
    Endorsement,
    Hire,
    TemplateDoc,
    decode_doc,
    default_template_doc,
    elect,
    templates_key,
    templates_path,
)
from qisd.core.math import tally
from qisd.core.packet import (
    KIND_ENDORSEMENT,
    KIND_PACKET,
    KIND_TEMPLATE,
    RESULT_SCHEMA,
    Envelope,
    build_rows,
    build_table_rows,
    pack_rows,
    read_trusted,
    seal,
    with_provenance,
)
from qisd.errors import IdentityError, PacketError, QisdError, UsageError
from qisd.net import datadir
from qisd.net.store import Store, rows_matching

log = logging.getLogger(__name__)

ROUTING_STATE_FILE = "routing.json"
"""The DHT's routing state (JSON) inside the data directory."""
DARWIN_META = "darwinism"
"""Store meta entry holding the Darwinism state (its ``to_dict``)."""
FOLLOWED_META = "followed_paths"
"""Store meta entry holding the followed fingerprint paths (a JSON list)."""
MAX_EMIT_ROWS = 100_000
"""Rows one emit call may carry (bulk input is sent in chunks well below this)."""
MAX_WAIT_SECONDS = 3600.0
"""The longest an emit may wait for replicas (``wait_timeout``)."""
PUBLISH_LINGER = 0.01
"""Seconds the publisher waits after an emit for more to publish with it."""
PUBLISH_TRIES = 5
"""An envelope still short of replicas after this many background publishes is counted
(``publish_short_after_retries``); it stays in the publish backlog and is tried again, backing
off from 1 s to :data:`PUBLISH_RETRY_MAX_SECONDS`, until it reaches them or the node stops."""
PUBLISH_RETRY_MAX_SECONDS = 60.0
PUBLISH_CONCURRENCY = 8
"""Keys published at once (each is a lookup plus stores at its k closest nodes)."""
MAX_FOLLOWED = 1_000
"""Paths one node may follow."""
_SUBSCRIBER_QUEUE = 1_024
RECENT_PACKETS = 50
"""Packets kept for the dashboard's "recent packets"."""
"""Tables buffered per subscriber; a subscriber that falls further behind loses the oldest."""


def now_ms() -> int:
    """The wall clock in milliseconds since 1970 (the one clock the shell passes to the core)."""
    return time.time_ns() // 1_000_000


@dataclass
class _Subscription:
    """The local subscribers of one key and the packets already handed to them.

    Subscribers of different paths may share a key (``domain/problem/architecture/phase`` reads
    ``domain/problem/architecture``): each queue maps to the row filter of its path.
    """

    queues: dict[asyncio.Queue[pa.Table], dict[str, str]] = field(default_factory=dict)
    delivered: set[str] = field(default_factory=set)


@dataclass(frozen=True)
class EmitResult:
    """What an emit committed.

    ``packet_ids`` are committed to the local store (durable) when this is returned;
    ``replicas`` counts, per packet id, the DHT nodes that acknowledged storing it (0 when the
    emit did not wait for the network); ``rejected`` lists ``(row_index, reason)`` of rows left
    out by a partial emit; ``duplicates`` the packet ids (of ``packet_ids``) that the store
    already held, so this emit did not store them again (the same rows emitted twice make the
    same packets); ``duplicate_count`` how many of the packets the rows made were not new
    (those, and repeats within this emit).
    """

    packet_ids: list[str]
    rows: int
    replicas: dict[str, int] = field(default_factory=dict)
    rejected: list[tuple[int, str]] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)
    duplicate_count: int = 0

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON output."""
        return {
            "packet_ids": list(self.packet_ids),
            "rows": self.rows,
            "replicas": dict(self.replicas),
            "rejected": [list(r) for r in self.rejected],
            "duplicates": list(self.duplicates),
            "duplicate_count": self.duplicate_count,
        }


_Build = Callable[[int], tuple[list[dict[str, Any]], list[tuple[int, str]]]]
"""Validates an emit's rows at a time (ms): the good rows, and the (index, reason) left out."""


def _check_wait(wait_replicas: int, wait_timeout: float | None) -> None:
    if not isinstance(wait_replicas, int) or wait_replicas < 0:
        raise UsageError("wait_replicas must be a whole number >= 0")
    if wait_timeout is not None and not (
        isinstance(wait_timeout, (int, float)) and 0 < wait_timeout <= MAX_WAIT_SECONDS
    ):
        raise UsageError(f"wait_timeout must be seconds in (0, {MAX_WAIT_SECONDS}]")


def _emitted(
    groups: list[list[Envelope]], rows: list[dict[str, Any]], duplicates: list[str]
) -> EmitResult:
    """What a committed emit returns: each packet id once, no replicas counted yet."""
    ids = list(dict.fromkeys(group[0].packet_id for group in groups))
    return EmitResult(
        ids,
        len(rows),
        {pid: 0 for pid in ids},
        duplicates=duplicates,
        duplicate_count=len(groups) - len(ids) + len(duplicates),
    )


def _duplicates(groups: list[list[Envelope]], accepted: Sequence[str]) -> list[str]:
    """Packet ids of ``groups`` none of whose envelopes the store newly accepted."""
    new = set(accepted)
    ids = dict.fromkeys(group[0].packet_id for group in groups)
    return [pid for pid in ids if pid not in new]


def _warm_arrow() -> None:
    """Convert one row from Python objects, as every emit does: pyarrow's first such
    conversion imports pandas when it is installed (~0.6 s here), which belongs to start-up,
    not to the first emit or DoPut."""
    pa.array([{"x": 0}], pa.struct([("x", pa.int64())]))


def _table_of(envelopes: Sequence[Envelope]) -> pa.Table:
    """Envelopes' rows with provenance, as one ``RESULT_SCHEMA`` table (deduplicated)."""
    batches = []
    seen: set[str] = set()
    for env in envelopes:
        if env.packet_id in seen:
            continue
        seen.add(env.packet_id)
        _, batch = read_trusted(env.raw)
        if batch is not None:
            batches.append(with_provenance(batch, env.packet_id, env.public_key))
    return pa.Table.from_batches(batches, schema=RESULT_SCHEMA)


class Node:
    """A running qisd node. Create with ``await Node.open(config)``; ``await close()`` at the end.

    ``network=False`` opens the node without a DHT (no UDP socket, no peers): emits commit to
    the local store and queries read it, which is what a node cut off from every peer sees.
    """

    def __init__(
        self,
        config: NodeConfig,
        identity: Identity,
        store: Store,
        lock: datadir.DataDirLock,
        data_dir: Any,
    ) -> None:
        self.config = config
        self.identity = identity
        self.store = store
        self.dht: Any = None
        self.data_dir = data_dir
        self.address: tuple[str, int] | None = None
        self._lock = lock
        self._started = time.monotonic()
        self._ttl_ms = config.dht.ttl_seconds * 1000
        self._followed: list[str] = []
        self._subscribers: dict[bytes, _Subscription] = {}
        self._listening: set[bytes] = set()
        # The keys the followed paths route to, as of the last follow, unfollow or election
        # pass (checked on every store a peer makes here: not recomputed each time).
        self._follow_keys: set[bytes] = set()
        self._syntheses: dict[str, dict[str, Any]] = {}
        self._digests: dict[str, tuple[int, str]] = {}
        self._dirty = asyncio.Event()
        self._elected = asyncio.Event()
        self._publish_queue: asyncio.Queue[list[Envelope]] = asyncio.Queue()
        self._tasks: list[asyncio.Task[Any]] = []
        self._callbacks: set[asyncio.Task[Any]] = set()
        self._closed = False
        self._commit_lock = asyncio.Lock()
        self._emitting = 0
        """Emits of the loop committing in worker threads (close() waits for them)."""
        self._emits_done = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._publish_slots = asyncio.Semaphore(PUBLISH_CONCURRENCY)
        self._backlog = 0
        self._publish_tries: dict[str, int] = {}
        self._hires: dict[str, Hire] = {}
        self._domains: set[str] = set()
        self._recommended: dict[str, tuple[str, str]] = {}
        self.darwin = Darwinism()
        self.counters: dict[str, int] = {
            "emits": 0,
            "emit_commits": 0,
            "rows_emitted": 0,
            "packets_emitted": 0,
            "duplicate_packets": 0,
            "rejected_emits": 0,
            "rejected_rows": 0,
            "received_envelopes": 0,
            "publish_failures": 0,
            "publish_retried": 0,
            "publish_short_after_retries": 0,
            "election_runs": 0,
            "darwin_observations": 0,
        }
        # Envelopes newly stored here that came from peers, by how they came: a peer's
        # store_packets (publish, republish, hand-off), a follow (push or catch-up), a fetch.
        self.received: dict[str, int] = {"stored_by_peers": 0, "followed": 0, "fetched": 0}
        self.recent: collections.deque[dict[str, Any]] = collections.deque(maxlen=RECENT_PACKETS)
        """The latest packets emitted here or received, newest last (for the dashboard)."""
        self.on_timing: Callable[[str, float], None] | None = None
        """Called with ("emit_commit" | "fetch", seconds) when metrics are on."""

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    async def open(cls, config: NodeConfig, *, network: bool = True) -> Node:
        """Load the identity, take the data directory's lock, open the store, start the DHT.

        Bootstrapping runs in the background (retried until a peer answers), so a node whose
        peers are down still starts and serves local emits and queries.
        """
        data_dir = datadir.resolve_data_dir(config.data_dir or None)
        if not data_dir.is_dir():
            raise IdentityError(f"{data_dir} does not exist: run qisd init first")
        identity = datadir.load_identity(data_dir)
        lock = datadir.acquire_lock(data_dir)
        try:
            store = await asyncio.to_thread(
                Store.open, data_dir, limits=config.store, ttl_ms=config.dht.ttl_seconds * 1000
            )
            await asyncio.to_thread(_warm_arrow)
        except BaseException:
            lock.release()
            raise
        node = cls(config, identity, store, lock, data_dir)
        try:
            node._followed = node._load_followed()
            node.darwin = node._load_darwin()
            node._follow_routes()
            if network:
                await node._start_network()
            node._tasks.append(asyncio.create_task(node._publisher(), name="qisd-publisher"))
            node._tasks.append(asyncio.create_task(node._election_loop(), name="qisd-elections"))
        except BaseException:
            await node.close()
            raise
        return node

    async def _start_network(self) -> None:
        from qisd.net.dht import DhtNode  # the I/O shell is only loaded by a networked node
        from qisd.net.settings import bootstrap_peers

        peers = bootstrap_peers(self.config)
        self.dht = DhtNode(
            self.identity,
            self.store,
            self.config.dht,
            state_path=self.data_dir / ROUTING_STATE_FILE,
        )
        self.address = await self.dht.start(self.config.host, self.config.port)
        self.dht.protocol.on_stored = self._on_stored
        if peers:
            # One attempt here (bounded by the RPC timeout); the DHT keeps retrying peers that
            # did not answer, so a node whose peers are down still starts.
            joined = await self.dht.bootstrap(peers)
            if joined:
                log.info("joined the network: %d contacts reached", joined)
            else:
                log.warning("no bootstrap peer answered yet; retrying in the background")
        routes = await self._listen_to_follows()
        for path in self._followed:
            if path not in routes:
                log.warning("followed path %s names no key under its template; not listening", path)

    async def close(self) -> None:
        """Stop background work, stop the DHT (saving routing state), close the store."""
        if self._closed:
            return
        self._closed = True
        # Give publishes of packets already committed a moment to leave; republish covers
        # anything that does not (the packets are in the store, marked local).
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.config.dht.rpc_timeout * 2):
                await self._publish_queue.join()
        for task in [*self._tasks, *self._callbacks]:
            task.cancel()
        await asyncio.gather(*self._tasks, *self._callbacks, return_exceptions=True)
        for sub in self._subscribers.values():
            for q in sub.queues:
                with contextlib.suppress(asyncio.QueueFull):
                    q.put_nowait(_CLOSED)
        if self.dht is not None:
            try:
                await self.dht.stop()
            except Exception:
                log.exception("stopping the DHT failed")
        while self._emitting:  # emits committing in worker threads finish first
            self._emits_done.clear()
            await self._emits_done.wait()
        async with self._commit_lock:  # and so does a network store or a document's put
            self.store.close()
        self._lock.release()

    async def __aenter__(self) -> Node:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ------------------------------------------------------------------ templates

    def template_for(self, domain: str) -> tuple[str, Template]:
        """The template this node routes ``domain`` by: ``(template_id, template)``.

        The Hiring election over the template documents and endorsements this node holds for
        the domain, weighted by Darwinism; a pinned template (config) always wins. Cached
        until the domain's documents or weights change. Safe to call from any thread.
        """
        hire = self._hires.get(domain)
        if hire is None:
            hire = self.hire(domain)
            self._hires[domain] = hire
        return hire.template_id, hire.template

    def _current_hires(self) -> dict[str, Hire]:
        """The hire of every domain this node knows (a pin whose document has not arrived
        yet has no hire to show)."""
        out: dict[str, Hire] = {}
        for domain in self._known_domains():
            try:
                out[domain] = self._hires.get(domain) or self.hire(domain)
            except QisdError:
                continue
        return out

    def hire(self, domain: str) -> Hire:
        """Run the Hiring election for ``domain`` now (UsageError for an unknown pin)."""
        templates, endorsements = self._documents(domain)
        return elect(
            domain,
            templates,
            endorsements,
            self.darwin.weights(domain),
            self.config.pinned_templates.get(domain),
            retired=self.darwin.retired(domain),
        )

    def _documents(
        self, domain: str
    ) -> tuple[list[tuple[str, TemplateDoc]], list[tuple[str, Endorsement]]]:
        """Verified (signer, document) pairs held under the domain's templates key."""
        key = templates_key(domain)
        templates: list[tuple[str, TemplateDoc]] = []
        endorsements: list[tuple[str, Endorsement]] = []
        since, more = 0, True
        while more:
            raws, since, more = self.store.page(
                key, since=since, max_bytes=1 << 20, now_ms=now_ms()
            )
            for raw in raws:
                env, _ = read_trusted(raw)
                if env.kind not in (KIND_TEMPLATE, KIND_ENDORSEMENT):
                    continue
                try:
                    doc = decode_doc(env.body)
                except PacketError:
                    continue  # verified signature, but not a document of ours: ignore it
                if doc.domain != domain:
                    continue
                if isinstance(doc, TemplateDoc):
                    templates.append((env.signer, doc))
                else:
                    endorsements.append((env.signer, doc))
        return templates, endorsements

    def _template_doc(self, domain: str, template_id: str) -> TemplateDoc | None:
        """The domain's template whose id is ``template_id`` or starts with it (a prefix of at
        least 8 hex digits, as people copy them from tables); None if none or ambiguous."""
        candidates = [default_template_doc(domain)]
        candidates += [doc for _, doc in self._documents(domain)[0]]
        exact = [d for d in candidates if d.template_id == template_id]
        if exact:
            return exact[0]
        if len(template_id) < 8:
            return None
        found = {d.template_id: d for d in candidates if d.template_id.startswith(template_id)}
        if len(found) > 1:
            raise UsageError(
                f"template id prefix {template_id} matches {len(found)} templates: give more digits"
            )
        return next(iter(found.values()), None)

    async def _refresh_documents(self, domain: str) -> None:
        """Fetch the domain's template documents from the network into the store."""
        await self.fetch_into_store(templates_key(domain))
        self._hires.pop(domain, None)

    async def _publish_document(self, domain: str, body: bytes, kind: int) -> dict[str, Any]:
        env = seal(self.identity, kind, templates_key(domain), body, timestamp_ms=0)
        self._domains.add(domain)
        async with self._commit_lock:
            self._check_open()
            result = await asyncio.to_thread(self.store.put, [env], now_ms=now_ms(), local=True)
        if result.refused:
            raise PacketError(f"the store refused the document: {result.refused[0][1]}")
        self._hires.pop(domain, None)
        replicas = await self._publish([env]) if self.dht is not None else {}
        return {"packet_id": env.packet_id, "replicas": replicas.get(env.packet_id, 0)}

    async def publish_template(self, document: Mapping[str, Any]) -> dict[str, Any]:
        """Sign and publish a similarity template for a domain (a Hiring candidate).

        ``document``: ``{"domain", "fields", "levels", "note"?}``. Publishing counts as the
        author's endorsement. Returns ``{template_id, domain, packet_id, replicas}``.
        """
        self._check_open()
        if not isinstance(document, Mapping):
            raise UsageError("a template is a JSON object with domain, fields and levels")
        unknown = set(document) - {"domain", "fields", "levels", "note"}
        if unknown:
            raise UsageError(
                f"unknown template keys {sorted(unknown)} (domain, fields, levels, note)"
            )
        fields, levels = document.get("fields"), document.get("levels")
        if not isinstance(fields, list) or not isinstance(levels, list):
            raise UsageError("a template needs 'fields' and 'levels' lists")
        doc = TemplateDoc(
            domain=document.get("domain"),  # type: ignore[arg-type]
            fields=tuple(fields),
            levels=tuple(levels),
            created_ms=now_ms(),
            note=document.get("note", ""),  # type: ignore[arg-type]
        )
        out = await self._publish_document(doc.domain, doc.to_bytes(), KIND_TEMPLATE)
        return {"template_id": doc.template_id, "domain": doc.domain, **out}

    async def endorse_template(self, template_id: str, domain: str | None = None) -> dict[str, Any]:
        """Sign and publish an endorsement of a known template (found by id)."""
        self._check_open()
        if not isinstance(template_id, str):
            raise UsageError("a template id is 40 hex digits")
        domains = [domain] if domain else self._known_domains()
        found: TemplateDoc | None = None
        for d in domains:
            if domain:
                await self._refresh_documents(d)
            found = self._template_doc(d, template_id)
            if found is not None:
                break
        if found is None:
            where = f"domain {domain!r}" if domain else "any domain this node knows"
            raise UsageError(
                f"template {template_id} is not known in {where}: run qisd template list DOMAIN "
                "first, or pass --domain"
            )
        template_id = found.template_id
        endorsement = Endorsement(template_id=template_id, domain=found.domain, created_ms=now_ms())
        out = await self._publish_document(found.domain, endorsement.to_bytes(), KIND_ENDORSEMENT)
        return {"template_id": template_id, "domain": found.domain, **out}

    async def templates(self, domain: str) -> dict[str, Any]:
        """The domain's template candidates (from the network and the store) and the hire."""
        self._check_open()
        templates_path(domain)  # validates the domain name
        await self._refresh_documents(domain)
        self._domains.add(domain)
        templates, endorsements = self._documents(domain)
        hire = self.hire(domain)
        self._hires[domain] = hire
        weights = self.darwin.weights(domain)
        retired = self.darwin.retired(domain)
        backers: dict[str, set[str]] = {}
        docs: dict[str, TemplateDoc] = {}
        default = default_template_doc(domain)
        docs[default.template_id] = default
        for signer, doc in templates:
            docs[doc.template_id] = doc
            backers.setdefault(doc.template_id, set()).add(signer)
        for signer, e in endorsements:
            backers.setdefault(e.template_id, set()).add(signer)
        listed = []
        for tid, doc in sorted(docs.items(), key=lambda kv: (kv[1].created_ms, kv[0])):
            listed.append(
                {
                    "template_id": tid,
                    "fields": list(doc.fields),
                    "levels": list(doc.levels),
                    "note": doc.note,
                    "created_ms": doc.created_ms,
                    "endorsers": len(backers.get(tid, ())),
                    "weight": weights.get(tid),
                    "retired": tid in retired,
                    "hired": tid == hire.template_id,
                }
            )
        return {
            "domain": domain,
            "hired": hire.template_id,
            "reason": hire.reason,
            "templates": listed,
        }

    def _known_domains(self) -> list[str]:
        return sorted(self._domains | {p.split("/", 1)[0] for p in self._followed})

    # ------------------------------------------------------------------ emit

    def _check_open(self) -> None:
        if self._closed:
            raise UsageError("the node is closed")

    async def emit(
        self,
        records: Sequence[Mapping[str, Any]],
        *,
        wait_replicas: int = 0,
        wait_timeout: float | None = None,
        continues: bool = False,
    ) -> EmitResult:
        """Validate, sign, commit and publish outcome rows (all rows or none).

        Returns once the rows are durable in the local store; with ``wait_replicas`` > 0 it
        also waits for the DHT to store them and reports the replica count per packet, for at
        most ``wait_timeout`` seconds when given (else until the network stops making
        progress). Raises :class:`FieldError` naming the row, field, value and rule of the
        first bad row. ``continues`` marks a later chunk of one bulk emit (counted as one emit
        request, however many commits it takes).
        """
        _check_wait(wait_replicas, wait_timeout)
        records = self._emit_records(records)
        return await self._emit(
            lambda now: (
                build_rows(records, self.identity, now_ms=now, lifetime_ms=self._ttl_ms),
                [],
            ),
            wait_replicas,
            wait_timeout,
            continues,
        )

    async def emit_table(
        self,
        table: pa.Table | pa.RecordBatch,
        *,
        partial: bool = False,
        wait_replicas: int = 0,
        wait_timeout: float | None = None,
        continues: bool = False,
    ) -> EmitResult:
        """Emit the rows of an Arrow table or record batch whose columns are packet columns.

        With ``partial`` valid rows are emitted and the others returned in ``rejected`` as
        ``(row_index, reason)``; without it one bad row refuses the whole table.
        """
        _check_wait(wait_replicas, wait_timeout)
        return await self._emit(
            self._table_builder(table, partial), wait_replicas, wait_timeout, continues
        )

    def emit_table_blocking(
        self, table: pa.Table | pa.RecordBatch, *, partial: bool = False
    ) -> EmitResult:
        """:meth:`emit_table` for a caller on another thread than the node's event loop.

        The Flight server's gRPC threads call this: validating, signing and the durable commit
        run right in the calling thread (no hop to the loop and on to a worker and back, which
        costs more than the work for one row); only the bookkeeping after the commit
        (subscribers, the publish queue) is handed to the loop, without waiting for it.
        Returns once the rows are durable, like :meth:`emit`.
        """
        # No lock beyond the store's: sealing may run beside other emits, the put serialises,
        # and a put racing close() fails with "the store is closed" (nothing acknowledged).
        self._check_open()
        groups, rows, rejected, duplicates = self._commit(self._table_builder(table, partial))
        if not rows:
            return EmitResult([], 0, {}, rejected)
        result = self._committed_threadsafe(groups, rows, duplicates)
        return dataclasses.replace(result, rejected=rejected)

    async def _emit(
        self, build: _Build, wait_replicas: int, wait_timeout: float | None, continues: bool
    ) -> EmitResult:
        # No lock around the commit: concurrent emits reach the store together and share one
        # group commit (one fsync); the store orders them. close() waits for them (_emitting).
        self._check_open()
        self._emitting += 1
        try:
            groups, rows, rejected, duplicates = await asyncio.to_thread(self._commit, build)
        finally:
            self._emitting -= 1
            if not self._emitting:
                self._emits_done.set()
        if not rows:
            return EmitResult([], 0, {}, rejected)
        result = self._committed(groups, rows, duplicates, continues=continues)
        if wait_replicas > 0 and self.dht is not None:
            envelopes = [env for group in groups for env in group]
            result.replicas.update(
                await self._publish_until(envelopes, wait_replicas, wait_timeout)
            )
            log.debug("emit: replicas per packet %s", result.replicas)
        else:
            self._enqueue_publish(groups)
        return dataclasses.replace(result, rejected=rejected)

    def _emit_records(self, records: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
        """The argument checks every emit of rows makes before any work."""
        self._check_open()
        if isinstance(records, (str, bytes)) or not isinstance(records, Sequence):
            raise UsageError("emit takes a sequence of row mappings")
        if not records:
            raise UsageError("nothing to emit: no rows given")
        if len(records) > MAX_EMIT_ROWS:
            raise UsageError(f"one emit carries at most {MAX_EMIT_ROWS} rows; send chunks")
        return list(records)

    def _table_builder(self, table: pa.Table | pa.RecordBatch, partial: bool) -> _Build:
        """What :meth:`_commit` runs to validate an Arrow table's rows (with ``partial``, the
        rows left out are counted and returned beside the good ones)."""
        self._check_open()
        if not isinstance(table, (pa.Table, pa.RecordBatch)):
            raise UsageError("emit_table takes a pyarrow Table or RecordBatch")
        if table.num_rows > MAX_EMIT_ROWS:
            raise UsageError(f"one emit carries at most {MAX_EMIT_ROWS} rows; send chunks")

        def build(now: int) -> tuple[list[dict[str, Any]], list[tuple[int, str]]]:
            rows, rejected = build_table_rows(
                table, self.identity, now_ms=now, partial=partial, lifetime_ms=self._ttl_ms
            )
            self.counters["rejected_rows"] += len(rejected)
            return rows, rejected

        return build

    def _commit(
        self, build: _Build
    ) -> tuple[list[list[Envelope]], list[dict[str, Any]], list[tuple[int, str]], list[str]]:
        """Validate (``build``) and sign the rows, then one durable put (runs off the loop).

        Returns the envelopes per body, the rows, the rows a partial build left out, and the
        packet ids the store already held; no rows at all commits nothing.
        """
        started = time.perf_counter()
        try:
            now = now_ms()
            rows, rejected = build(now)
            if not rows:
                return [], [], rejected, []
            by_domain: dict[str, list[dict[str, Any]]] = {}
            for row in rows:
                by_domain.setdefault(row["domain"], []).append(row)
            groups: list[list[Envelope]] = []
            for domain, domain_rows in by_domain.items():
                _, template = self.template_for(domain)
                routes = [template.fields_at(level) for level in template.levels]
                groups.extend(pack_rows(self.identity, domain_rows, routes))
            result = self.store.put([e for g in groups for e in g], now_ms=now, local=True)
            if result.refused:
                pid, reason = result.refused[0]
                raise PacketError(f"the store refused packet {pid}: {reason}")
        except PacketError as exc:
            self.counters["rejected_emits"] += 1
            log.debug("emit refused: %s", exc)
            raise
        elapsed = time.perf_counter() - started
        duplicates = _duplicates(groups, result.accepted)
        log.debug(
            "emit: %d rows signed into %d packets (%d envelopes, %d already stored) and "
            "committed in %.1f ms: %s",
            len(rows),
            len(groups),
            sum(len(g) for g in groups),
            len(duplicates),
            elapsed * 1000,
            " ".join(dict.fromkeys(g[0].packet_id for g in groups)),
        )
        if self.on_timing is not None:
            self.on_timing("emit_commit", elapsed)
        return groups, rows, rejected, duplicates

    def _committed(
        self,
        groups: list[list[Envelope]],
        rows: list[dict[str, Any]],
        duplicates: list[str],
        *,
        continues: bool = False,
    ) -> EmitResult:
        """The bookkeeping after an emit's commit, on the loop: counters, subscribers, learning."""
        result = _emitted(groups, rows, duplicates)
        if not continues:
            self.counters["emits"] += 1
        self.counters["emit_commits"] += 1
        self.counters["rows_emitted"] += len(rows)
        self.counters["packets_emitted"] += len(result.packet_ids) - len(duplicates)
        self.counters["duplicate_packets"] += result.duplicate_count
        self._remember([group[0] for group in groups], "emitted here")
        if any(env.key in self._follow_keys for group in groups for env in group):
            self._dirty.set()  # a followed path's synthesis includes this site's own packets
        self._domains.update(row["domain"] for row in rows)
        self._deliver([env for group in groups for env in group])
        if self._recommended:
            self._background(self._observe(rows, set(result.packet_ids)))
        return result

    def _committed_threadsafe(
        self, groups: list[list[Envelope]], rows: list[dict[str, Any]], duplicates: list[str]
    ) -> EmitResult:
        """:meth:`_committed` and the publish, handed to the loop from another thread."""

        def on_loop() -> None:
            self._committed(groups, rows, duplicates)
            self._enqueue_publish(groups)

        try:
            self._loop.call_soon_threadsafe(on_loop)
        except RuntimeError:  # the loop closed after the commit: republish covers the packets
            log.warning("emit committed while the node was stopping; republish will send it")
        return _emitted(groups, rows, duplicates)

    def _enqueue_publish(self, groups: list[list[Envelope]]) -> None:
        if self.dht is None or self._closed:
            return
        envelopes = [env for group in groups for env in group]
        self._backlog += len(envelopes)
        self._publish_queue.put_nowait(envelopes)

    async def _publish(self, envelopes: list[Envelope]) -> dict[str, int]:
        """Publish; per packet id, the replicas of its least-replicated routable level.

        A packet lives under one key per routable level; it is only as findable as its
        worst-placed level, so that is the count ``--wait`` compares against.
        """
        by_key: dict[bytes, list[Envelope]] = {}
        for env in envelopes:
            by_key.setdefault(env.key, []).append(env)

        async def one(group: list[Envelope]) -> Any:
            # A bounded number of keys at a time: a bulk emit of thousands of fingerprints
            # would otherwise fire all their lookups at once and run into every peer's
            # per-source rate limit (then nothing gets stored anywhere).
            async with self._publish_slots:
                return await self.dht.publish(group)

        started = time.perf_counter()
        try:
            results = await asyncio.gather(*(one(g) for g in by_key.values()))
        except Exception:
            self.counters["publish_failures"] += 1
            log.exception("publishing %d envelopes failed", len(envelopes))
            return {}
        replicas: dict[str, int] = {}
        for result in results:
            for pid, n in result.replicas.items():
                replicas[pid] = min(replicas.get(pid, n), n)
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "published %d envelopes under %d keys in %.1f ms: %s",
                len(envelopes),
                len(by_key),
                (time.perf_counter() - started) * 1000,
                ", ".join(
                    f"key {key.hex()[:12]} at {r.contacted} nodes, min replicas {r.min_replicas}"
                    for key, r in zip(by_key, results, strict=True)
                ),
            )
        return replicas

    async def _publish_until(
        self, envelopes: list[Envelope], wanted: int, timeout: float | None = None
    ) -> dict[str, int]:
        """Publish until every packet has ``wanted`` replicas or the wait runs out.

        A node that just joined may not know its neighbours yet, and a replica may time out:
        packets short of replicas are published again, backing off, until a round of ten RPC
        timeouts passes without any packet gaining a replica, or ``timeout`` seconds pass
        (then the counts of the rounds that finished are returned).
        """
        loop = asyncio.get_running_loop()
        patience = max(5.0, 10 * self.config.dht.rpc_timeout)
        deadline = loop.time() + patience
        end = loop.time() + timeout if timeout is not None else None
        best: dict[str, int] = {pid: 0 for pid in {e.packet_id for e in envelopes}}
        pending = envelopes
        delay = 0.1
        while True:
            progress = False
            try:
                async with asyncio.timeout_at(end):
                    published = await self._publish(pending)
            except TimeoutError:
                return best
            for pid, n in published.items():
                if n > best.get(pid, 0):
                    best[pid] = n
                    progress = True
                best.setdefault(pid, n)
            pending = [e for e in pending if best.get(e.packet_id, 0) < wanted]
            if progress:
                deadline = loop.time() + patience
            if end is not None:
                deadline = min(deadline, end)
            if not pending or loop.time() + delay > deadline:
                return best
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    async def _publisher(self) -> None:
        """Publish committed envelopes in the background, batching what queued meanwhile."""
        while True:
            batch = await self._publish_queue.get()
            taken = 1
            # Linger a moment so the emits of a burst go out together: one lookup per key per
            # round instead of one per emit (a stream of one-row puts would otherwise pay a
            # lookup for each). Emits are durable already; the network learns of them 10 ms on.
            await asyncio.sleep(PUBLISH_LINGER)
            while not self._publish_queue.empty() and len(batch) < 2_048:
                batch = batch + self._publish_queue.get_nowait()
                taken += 1
            short: list[Envelope] = []
            # What the round must reach is fixed before it runs: a peer evicted while it times
            # out (the only one, say) must not turn a round that reached nobody into a success.
            wanted = self._replicas_wanted()
            try:
                replicas = await self._publish(batch)
                short = self._short_of_replicas(batch, replicas, wanted)
                if short and replicas:  # (replicas is {} when the publish raised: counted)
                    self.counters["publish_failures"] += 1
            finally:
                self._backlog -= len(batch) - len(short)
                for _ in range(taken):
                    self._publish_queue.task_done()
            if short:
                self._background(self._publish_again(short))

    def _replicas_wanted(self) -> int:
        """The replicas a publish should reach: k, or every peer of a smaller network."""
        if self.dht is None:
            return 0
        return min(self.config.dht.ksize, len(self.dht.peers()))

    def _short_of_replicas(
        self, envelopes: list[Envelope], replicas: dict[str, int], wanted: int
    ) -> list[Envelope]:
        """The envelopes that reached fewer than ``wanted`` replicas, to publish again (they
        stay in the publish backlog)."""
        if self.dht is None or self._closed:
            return []
        short = []
        for env in envelopes:
            if replicas.get(env.packet_id, 0) >= wanted:
                self._publish_tries.pop(env.packet_id, None)
                continue
            tries = self._publish_tries.get(env.packet_id, 0) + 1
            if tries == PUBLISH_TRIES:
                self.counters["publish_short_after_retries"] += 1
            self._publish_tries[env.packet_id] = tries
            short.append(env)
        return short

    async def _publish_again(self, envelopes: list[Envelope]) -> None:
        """Queue envelopes short of replicas again after a back-off (still in the backlog)."""
        tries = max(self._publish_tries.get(e.packet_id, 1) for e in envelopes)
        await asyncio.sleep(min(PUBLISH_RETRY_MAX_SECONDS, 0.5 * 2**tries))
        if self._closed:
            return
        self.counters["publish_retried"] += len(envelopes)
        self._publish_queue.put_nowait(envelopes)

    # ------------------------------------------------------------------ query

    async def query(self, path: str, *, local_only: bool = False) -> pa.Table:
        """Every packet row under a fingerprint path (``RESULT_SCHEMA``), network and local.

        The network's packets are verified by the DHT, kept in the local store (so the next
        local query has them) and merged with what this node already held.
        """
        self._check_open()
        key, wanted = self.query_route(path)
        extra: list[Envelope] = []
        log.debug("query %s: key %s, rows where %s", path, key.hex(), wanted or "all")
        report = None
        if not local_only:
            extra, report = await self.fetch_into_store(key)
        table = await asyncio.to_thread(self.store.table, key, now_ms=now_ms(), wanted=wanted)
        if extra:
            held = set(table.column("packet_id").to_pylist())
            missing = [e for e in extra if e.packet_id not in held]
            if missing:
                table = pa.concat_tables([table, rows_matching(_table_of(missing), wanted)])
        return completeness.attach_table(table, report)

    async def fetch_into_store(self, key: bytes) -> tuple[list[Envelope], dict[str, Any] | None]:
        """Read ``key`` from the network into the local store (only what it lacks moves).

        Returns the fetched envelopes the store refused (a quota), so a reader can still see
        them, and the read's report (:mod:`qisd.core.completeness`; None without a network).
        """
        if self.dht is None:
            return [], None
        started = time.perf_counter()
        fetched = await self.dht.fetch_report(key)
        elapsed = time.perf_counter() - started
        if self.on_timing is not None:
            self.on_timing("fetch", elapsed)
        log.debug(
            "fetch of key %s: %d envelopes from the network (verified) in %.1f ms",
            key.hex(),
            len(fetched.envelopes),
            elapsed * 1000,
        )
        refused = await self._keep(fetched.envelopes) if fetched.envelopes else []
        return refused, fetched.report()

    def query_route(self, path: str) -> tuple[bytes, dict[str, str]]:
        """Where a query for ``path`` reads: ``(key, wanted)``.

        A path at a routable level of its domain's template is its own key. A deeper path is
        read from the deepest routable level it extends, keeping the rows whose further fields
        equal its further segments (``wanted``: field -> value), so
        ``domain/problem/architecture/phase`` finds the rows of that phase. A path shallower
        than every routable level names no key and is refused (UsageError), as is one with
        more segments than the template has fields.
        """
        segments = split_path(path)
        _, template = self.template_for(segments[0])
        fields = template.fields
        if len(segments) > len(fields):
            raise UsageError(
                f"fingerprint path {'/'.join(segments)!r} has {len(segments)} segments, but "
                f"{segments[0]} is fingerprinted by {len(fields)} fields {list(fields)}"
            )
        levels = [level for level in template.levels if level <= len(segments)]
        if not levels:
            need = template.levels[0]
            raise UsageError(
                f"fingerprint path {'/'.join(segments)!r} is too coarse: packets of "
                f"{segments[0]} are filed by at least {need} fields {list(fields[:need])}"
            )
        level = max(levels)
        wanted = dict(zip(fields[level:], segments[level:], strict=False))
        return key_for_path("/".join(segments[:level])), wanted

    async def _keep(self, envelopes: Sequence[Envelope]) -> list[Envelope]:
        """Store envelopes received from the network; returns those the store refused."""
        accepted, refused = await self._store_remote(envelopes)
        self._count_received("fetched", accepted)
        if accepted:
            self._deliver(accepted)
        return refused

    def _count_received(self, how: str, accepted: Sequence[Envelope]) -> None:
        if not accepted:
            return
        self.received[how] += len(accepted)
        self.counters["received_envelopes"] += len(accepted)
        self._remember(accepted, "from peers")
        log.debug(
            "stored %d new envelopes from peers (%s): %s",
            len(accepted),
            how,
            " ".join(e.packet_id for e in accepted[:8]) + (" ..." if len(accepted) > 8 else ""),
        )

    def _remember(self, envelopes: Sequence[Envelope], source: str) -> None:
        """Keep the latest packets for the dashboard (decoded only when it asks)."""
        now = time.time()
        for env in envelopes[-RECENT_PACKETS:]:
            if env.kind == KIND_PACKET:
                self.recent.append({"envelope": env, "source": source, "at": now})

    async def _store_remote(
        self, envelopes: Sequence[Envelope]
    ) -> tuple[list[Envelope], list[Envelope]]:
        """Put verified network envelopes; returns (newly stored, refused by a quota)."""
        async with self._commit_lock:
            if self._closed:
                return [], list(envelopes)
            result = await asyncio.to_thread(
                self.store.put, list(envelopes), now_ms=now_ms(), local=False
            )
        accepted = set(result.accepted)
        refused = {pid for pid, _ in result.refused}
        return (
            [e for e in envelopes if e.packet_id in accepted],
            [e for e in envelopes if e.packet_id in refused],
        )

    # ------------------------------------------------------------------ follow / subscribe

    def _load_darwin(self) -> Darwinism:
        try:
            return Darwinism.from_dict(
                self.store.get_meta(DARWIN_META, None) or {"version": 1, "domains": {}}
            )
        except DarwinStateError as exc:
            log.warning("ignoring unreadable Darwinism state (%s); starting fresh", exc)
            return Darwinism()

    def _load_followed(self) -> list[str]:
        value = self.store.get_meta(FOLLOWED_META, [])
        if not isinstance(value, list):
            return []
        return [p for p in value if isinstance(p, str)]

    def followed(self) -> list[str]:
        """The fingerprint paths this node follows (persisted across restarts)."""
        return list(self._followed)

    async def follow(self, path: str) -> None:
        """Follow a path: persist it, register with its holders for pushes, catch it up.

        The path is routed as a query is (:meth:`query_route`): a path deeper than the routable
        levels listens on the deepest one it extends and its synthesis keeps only its own rows;
        a path no key answers is refused (UsageError).
        """
        self._check_open()
        path = normalize_path(path)
        if path in self._followed:
            return
        key, _ = self.query_route(path)  # a path no key answers is refused, as by query
        if len(self._followed) >= MAX_FOLLOWED:
            raise UsageError(f"this node already follows {MAX_FOLLOWED} paths")
        self._followed.append(path)
        self._follow_keys.add(key)
        await asyncio.to_thread(self.store.set_meta, FOLLOWED_META, self._followed)
        await self._listen(key)
        log.info("following %s (key %s)", path, key.hex())
        self._dirty.set()

    async def unfollow(self, path: str) -> None:
        """Stop following a path (its packets stay in the store until they expire)."""
        self._check_open()
        path = normalize_path(path)
        if path not in self._followed:
            raise UsageError(f"{path} is not followed")
        self._followed.remove(path)
        await asyncio.to_thread(self.store.set_meta, FOLLOWED_META, self._followed)
        self._syntheses.pop(path, None)
        self._digests.pop(path, None)
        self._follow_routes()
        log.info("no longer following %s", path)
        try:
            key, _ = self.query_route(path)
        except QisdError:
            return  # a path its template no longer routes was listened on nowhere
        self._release(key)

    def _follow_routes(self) -> dict[str, tuple[bytes, dict[str, str]]]:
        """Each followed path's :meth:`query_route`: the key it listens on and its row filter
        (and ``_follow_keys`` brought up to date).

        A path persisted earlier that its domain's template no longer routes is left out
        (it stays listed and can be unfollowed).
        """
        routes: dict[str, tuple[bytes, dict[str, str]]] = {}
        for path in self._followed:
            with contextlib.suppress(QisdError):
                routes[path] = self.query_route(path)
        self._follow_keys = {key for key, _ in routes.values()}
        return routes

    async def _listen_to_follows(self) -> dict[str, tuple[bytes, dict[str, str]]]:
        """Listen on the key each followed path routes to now, and stop listening on keys
        that no followed path and no subscriber reads any more: a newly hired template may
        route a followed path to another key. Returns :meth:`_follow_routes`."""
        for key in {key for key, _ in self._follow_routes().values()} - self._listening:
            await self._listen(key)
        # Routed again after the awaits: a follow made meanwhile must keep its key.
        routes = self._follow_routes()
        for key in self._listening - self._follow_keys - set(self._subscribers):
            self._unlisten(key)
        return routes

    def _release(self, key: bytes) -> None:
        """Stop listening on ``key`` unless a followed path or a subscriber still reads it."""
        if key not in self._subscribers and key not in self._follow_keys:
            self._unlisten(key)

    async def _listen(self, key: bytes) -> None:
        if self.dht is None or key in self._listening:
            return
        self._listening.add(key)
        try:
            await self.dht.follow(key, self._on_network_packets)
        except Exception:
            self._listening.discard(key)
            log.exception("registering to follow a key failed")

    def _unlisten(self, key: bytes) -> None:
        if self.dht is None or key not in self._listening:
            return
        self._listening.discard(key)
        with contextlib.suppress(Exception):
            self.dht.unfollow(key)

    def _on_network_packets(self, envelopes: list[Envelope]) -> None:
        """The DHT has packets of a followed key (verified): a push, or a catch-up fetch."""
        if self._closed or not envelopes:
            return
        task = asyncio.ensure_future(self._received(envelopes))
        self._callbacks.add(task)
        task.add_done_callback(self._callbacks.discard)

    async def _received(self, envelopes: list[Envelope]) -> None:
        accepted, _ = await self._store_remote(envelopes)
        self._count_received("followed", accepted)
        # Deliver even what the store already held: this node may be one of the key's
        # replicas, stored by a peer's store_packets before the push reached the follow.
        self._deliver(envelopes)
        self._dirty.set()

    def _on_stored(self, key: bytes, accepted: int) -> None:
        """A peer stored packets here (this node is one of the key's replicas)."""
        if self._closed:
            return
        self.received["stored_by_peers"] += accepted
        self.counters["received_envelopes"] += accepted
        if accepted:
            log.debug("a peer stored %d new envelopes here under key %s", accepted, key.hex())
        if key in self._follow_keys:
            self._dirty.set()
        if key in self._subscribers:
            table = self.store.table(key, now_ms=now_ms())
            self._deliver_table(key, table)

    def _deliver(self, envelopes: Sequence[Envelope]) -> None:
        """Hand envelopes to the subscribers of their keys (each packet once per key)."""
        if not self._subscribers:
            return
        by_key: dict[bytes, list[Envelope]] = {}
        for env in envelopes:
            sub = self._subscribers.get(env.key)
            if sub is not None and env.packet_id not in sub.delivered:
                by_key.setdefault(env.key, []).append(env)
        for key, envs in by_key.items():
            self._deliver_table(key, _table_of(envs))

    def _deliver_table(self, key: bytes, table: pa.Table) -> None:
        sub = self._subscribers.get(key)
        if sub is None or table.num_rows == 0:
            return
        ids = table.column("packet_id").to_pylist()
        fresh = [i for i, pid in enumerate(ids) if pid not in sub.delivered]
        if not fresh:
            return
        if len(fresh) < len(ids):
            table = table.take(pa.array(fresh, pa.int64()))
        sub.delivered.update(ids[i] for i in fresh)
        for q, wanted in sub.queues.items():
            rows = rows_matching(table, wanted)
            if rows.num_rows == 0:
                continue
            if q.full():
                with contextlib.suppress(asyncio.QueueEmpty):
                    q.get_nowait()
            q.put_nowait(rows)

    def subscribe(self, path: str) -> Subscription:
        """New packets of a path as they arrive (local emits and network pushes).

        Registered when called: every packet stored after this call is delivered, once, as
        part of a ``RESULT_SCHEMA`` table (``async for table in node.subscribe(path)``).
        Closing it (``await sub.aclose()`` or leaving the ``async for``) unsubscribes; it
        ends when the node closes. The path's holders are asked to push (listen) meanwhile.
        The path is routed as :meth:`query_route` routes a query: a path deeper than the
        routable levels listens on the deepest one it extends and gets only its own rows; a
        path no key answers is refused (UsageError).
        """
        self._check_open()
        path = normalize_path(path)
        key, wanted = self.query_route(path)
        entry = self._subscribers.get(key)
        if entry is None:
            # What is stored now is not new; read synchronously so nothing slips in between.
            held = self.store.table(key, now_ms=now_ms()).column("packet_id").to_pylist()
            entry = self._subscribers[key] = _Subscription(delivered=set(held))
        sub = Subscription(self, path, key, wanted, entry)
        if self.dht is not None and key not in self._listening:
            self._background(self._listen(key))
        return sub

    def _unsubscribe(self, sub: Subscription) -> None:
        entry = sub._entry
        entry.queues.pop(sub._queue, None)
        if not entry.queues and self._subscribers.get(sub.key) is entry:
            del self._subscribers[sub.key]
            if not self._closed:
                self._release(sub.key)

    # ------------------------------------------------------------------ elections

    async def synthesize(self, path: str, *, local_only: bool = False) -> dict[str, Any]:
        """The synthesis of a fingerprint path's packets (network and local)."""
        table = await self.query(path, local_only=local_only)
        result = self._synthesize(normalize_path(path), table)
        report = completeness.read(table.schema)
        if report is not None:
            result["read"] = report
        return result

    def _synthesize(self, path: str, table: pa.Table) -> dict[str, Any]:
        from qisd.core.synthesis import synthesize

        domain = path.split("/", 1)[0]
        template_id, _ = self.template_for(domain)
        # The trust rule: this node's own packets on the path are its observed outcomes.
        result = synthesize(
            table,
            path=path,
            template_id=template_id,
            now_ms=now_ms(),
            own_node_id=self.identity.node_id,
        )
        if result.get("best_intervention"):
            # Remembered so that when this site later reports that intervention's outcome,
            # Darwinism can score the templates on it.
            self._recommended[path] = (result["best_intervention"], template_id)
        return result

    def _background(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._callbacks.add(task)
        task.add_done_callback(self._callbacks.discard)

    async def _observe(self, rows: list[dict[str, Any]], own_ids: set[str]) -> None:
        """Darwinism: score every candidate template on this site's reported outcomes.

        For each emitted row whose intervention this node was recommended (by a synthesis
        of one of the row's routable paths), each candidate template of the domain predicts
        the intervention's delta (The Math's weighted median at the row's finest path under
        that template, from the packets held here, this emit's own left out); the row's
        ``metric_delta`` is the observed outcome. The state is persisted in the store.
        """
        done: set[tuple[str, str, str]] = set()
        changed: set[str] = set()
        try:
            for row in rows:
                domain, intervention = row["domain"], row["intervention_type"]
                hired_id, hired = self.template_for(domain)
                match = next(
                    (
                        p
                        for p in (hired.path(row, level) for level in hired.levels)
                        if self._recommended.get(p, ("",))[0] == intervention
                    ),
                    None,
                )
                if match is None or (domain, match, intervention) in done:
                    continue
                done.add((domain, match, intervention))
                now = now_ms()
                predictions: dict[str, float | None] = {}
                scale = None
                for tid in sorted({*self.darwin.candidates(domain), hired_id}):
                    doc = self._template_doc(domain, tid)
                    if doc is None:
                        continue
                    template = doc.template
                    path = template.path(row, max(template.levels))
                    table = await asyncio.to_thread(
                        self.store.table, key_for_path(path), now_ms=now
                    )
                    votes = [r for r in table.to_pylist() if r["packet_id"] not in own_ids]
                    result = tally(votes, now_ms=now)
                    stats = next(
                        (s for s in result.ranking if s.intervention == intervention), None
                    )
                    predictions[tid] = stats.median if stats is not None else None
                    if tid == hired_id and result.sigma_pooled > 0:
                        scale = 3 * result.sigma_pooled
                self.darwin.observe(
                    domain, predictions, float(row["metric_delta"]), now_ms=now, scale=scale
                )
                self.counters["darwin_observations"] += 1
                changed.add(domain)
            if changed:
                await asyncio.to_thread(self.store.set_meta, DARWIN_META, self.darwin.to_dict())
                for domain in changed:
                    self._hires.pop(domain, None)
        except Exception:
            log.exception("scoring templates (Darwinism) failed")

    async def _election_loop(self) -> None:
        """Catch followed paths up every ``election_seconds`` (or at once when pushed to) and
        re-run the synthesis of each path whose packets changed."""
        while True:
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that
            # races with the event being set, and the loop would never stop.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.config.election_seconds):
                    await self._dirty.wait()
            pushed = self._dirty.is_set()
            self._dirty.clear()
            if not pushed:
                for domain in self._known_domains():
                    try:
                        await self._refresh_documents(domain)  # Hiring candidates
                    except asyncio.CancelledError:
                        raise
                    except Exception:
                        log.exception("refreshing the templates of %s failed", domain)
            for path, route in (await self._listen_to_follows()).items():
                try:
                    await self._refresh(path, route, fetch=not pushed)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("refreshing followed path %s failed", path)
            self._elected.set()

    async def _refresh(
        self, path: str, route: tuple[bytes, dict[str, str]], *, fetch: bool
    ) -> None:
        key, wanted = route
        if fetch:
            await self.fetch_into_store(key)
        table = await asyncio.to_thread(self.store.table, key, now_ms=now_ms(), wanted=wanted)
        ids = table.column("packet_id").to_pylist()
        digest = (len(ids), ids[-1] if ids else "")
        if self._digests.get(path) == digest and path in self._syntheses:
            return
        self._digests[path] = digest
        self.counters["election_runs"] += 1
        result = self._synthesize(path, table)
        self._syntheses[path] = result
        log.debug(
            "election: %s re-synthesized over %d rows of %s signers: %s",
            path,
            table.num_rows,
            result.get("distinct_signers"),
            result.get("best_intervention") or result.get("status"),
        )

    # ------------------------------------------------------------------ status

    def uptime(self) -> float:
        """Seconds since the node opened."""
        return time.monotonic() - self._started

    def publish_backlog(self) -> int:
        """Committed envelopes not yet through their first publish."""
        return self._backlog

    def subscriber_count(self) -> int:
        """Local subscriptions open (watch streams, Flight follows)."""
        return sum(len(sub.queues) for sub in self._subscribers.values())

    def peers(self) -> list[dict[str, Any]]:
        """The routing table's contacts (empty without a network).

        Each shows its ``node_id`` (the hash of its public key that its packets carry, the
        id ``status`` and ``query`` show) beside ``dht_id``, its 160-bit routing id; a contact
        whose key this node has not seen yet has ``node_id`` None.
        """
        if self.dht is None:
            return []
        keys = getattr(self.dht.protocol, "peer_keys", {})
        out = []
        for peer in self.dht.peers():
            dht_id = peer.get("id", "")
            pub = keys.get(bytes.fromhex(dht_id)) if dht_id else None
            out.append(
                {
                    "node_id": node_id_for(pub) if pub else None,
                    "dht_id": dht_id,
                    **{k: v for k, v in peer.items() if k != "id"},
                }
            )
        return out

    def status(self) -> dict[str, Any]:
        """What ``qisd status`` shows: identity, address, uptime, peers, store, follows."""
        stats = self.store.stats()
        dht_stats = dict(self.dht.stats()) if self.dht is not None else {}
        return {
            "node_id": self.identity.node_id,
            "dht_id": self.identity.dht_id.hex(),
            "version": __version__,
            "data_dir": str(self.data_dir),
            "address": f"{self.address[0]}:{self.address[1]}" if self.address else None,
            "public_address": dht_stats.get("public_address"),
            "reachability": dht_stats.get("reachability", "offline"),
            "uptime_seconds": round(time.monotonic() - self._started, 3),
            "peers": len(self.peers()),
            "keys": stats["keys"],
            "packets": stats["packets"],
            "local_packets": stats["local_packets"],
            "store_bytes": stats["bytes"],
            "store_commits": dict(self.store.groups),
            "publish_backlog": self._backlog,
            "followed": self.followed(),
            "counters": dict(self.counters),
            "received": dict(self.received),
            "dht": dht_stats,
            "syntheses": {p: self._syntheses[p] for p in self._followed if p in self._syntheses},
            "templates": {
                domain: {
                    "hired": hire.template_id,
                    "reason": hire.reason,
                    "fields": list(hire.template.fields),
                    "levels": list(hire.template.levels),
                    "weights": self.darwin.weights(domain),
                }
                for domain, hire in self._current_hires().items()
            },
        }


_CLOSED: Any = object()
"""Queued to subscribers when the node closes."""


class Subscription:
    """An async iterator of new packets of one path; made by :meth:`Node.subscribe`.

    ``key`` is the key it listens on, and ``wanted`` (kept with its queue in the key's
    ``_Subscription``) the fields its rows must equal, both from :meth:`Node.query_route`.
    """

    def __init__(
        self, node: Node, path: str, key: bytes, wanted: dict[str, str], entry: _Subscription
    ) -> None:
        self.node = node
        self.path = path
        self.key = key
        self._entry = entry
        self._queue: asyncio.Queue[pa.Table] = asyncio.Queue(_SUBSCRIBER_QUEUE)
        self._closed = False
        entry.queues[self._queue] = wanted

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> pa.Table:
        if self._closed:
            raise StopAsyncIteration
        try:
            table = await self._queue.get()
        except BaseException:
            if not self._closed and self.node._closed:
                await self.aclose()
            raise
        if table is _CLOSED:
            await self.aclose()
            raise StopAsyncIteration
        return table

    async def aclose(self) -> None:
        """Unsubscribe (idempotent)."""
        if not self._closed:
            self._closed = True
            self.node._unsubscribe(self)

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
