"""The embedded Arrow Flight endpoint: the local door into the daemon for Arrow pipelines.

pandas, Polars, DuckDB, Spark or Ray processes on the site reach the node with Arrow data and no
conversion step; the DHT does the routing between sites. Every call goes through the same
:class:`~qisd.net.node.Node` methods as ``qisd emit`` / ``query`` / ``follow``, so a row put here
is validated, signed, stored and published exactly like one emitted with the CLI.

The API a client sees (docs/flight.md has examples):

* **DoPut** — descriptor path = fingerprint path, e.g. ``FlightDescriptor.for_path(domain,
  problem_type)``; or a command descriptor holding JSON ``{"path": "...", "partial": true}``.
  Batches carry the 15 packet columns (``node_id`` may be absent and is always replaced by the
  node's own; an extra ``data_ref`` column becomes the keyed commitment in ``raw_data_hash``).
  The path must be a prefix of each row's fingerprint under the domain's hired template (the
  rows belong where the client says it puts them). All rows or none are stored unless the
  client asks for partial acceptance (``"partial": true`` in a command descriptor, or the call
  header ``x-qisd-partial: true``). The reply is one PutResult whose ``app_metadata`` is JSON:
  ``{"path", "rows", "accepted", "packet_ids", "duplicates", "rejected": [{"row", "reason"}],
  "replicas"}``; ``duplicates`` lists the packet ids of ``packet_ids`` that the store already
  held (a replayed put is stored once and is not a new vote).
* **DoGet** — ticket = fingerprint path as UTF-8 (``b"domain/problem_type"``), the network and
  the local store; ``b"local:" + path`` reads the local store only. Record batches of
  ``RESULT_SCHEMA`` (the packet columns plus ``packet_id`` and ``signer``) of at most
  :data:`BATCH_ROWS` rows, mapped from the key's columnar view as they are sent.
* **DoExchange** — descriptor as for DoPut: follow the path. The server first sends a
  metadata-only message ``{"following": path}`` (the follow is registered when it arrives), then
  each new packet as record batches, until the client ends its side (``done_writing()``/close).
* **ListFlights** (criteria = optional path prefix), **GetFlightInfo**, **GetSchema**.
* **DoAction** ``synthesize`` / ``follow`` / ``unfollow`` (body: a path, or JSON
  ``{"path": ...}``) and ``status`` (no body); each returns one JSON result. **ListActions**.

Security: a loopback address by default; any other bind address needs a token, checked on every
call by a server middleware (``authorization: Bearer <token>``, or Flight's basic-auth handshake
with the token as password, which answers with the bearer header). TLS when a certificate and key
are given (``grpc+tls://``).

Threads: gRPC serves calls on its own threads; the node lives on the daemon's event loop. Calls
reach the node with ``asyncio.run_coroutine_threadsafe`` and wait for the result, so the node's
state is only driven from the loop (the store's blocking reads run in the loop's worker
threads, as the node's own reads do). Two exceptions, where the hops would cost more than the
work: DoPut validates, signs and commits in its gRPC thread (:meth:`Node.emit_table_blocking`;
concurrent puts share the store's group commits) and hands the loop only the bookkeeping after
the commit; DoGet streams its snapshot of the store's view in its gRPC thread (the store is
thread-safe; only the network fetch before it runs on the loop).
"""

from __future__ import annotations

import asyncio
import base64
import collections
import concurrent.futures
import contextlib
import hmac
import ipaddress
import json
import logging
import queue
import socket
import ssl
import threading
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.flight as flight

from qisd.config import DEFAULT_FLIGHT_URI
from qisd.core import completeness
from qisd.core.fingerprint import normalize_path
from qisd.core.packet import (
    COLUMNS,
    RESULT_SCHEMA,
    SCHEMA,
    Envelope,
    is_text_type,
    read_trusted,
    with_provenance,
)
from qisd.errors import ConfigError, QisdError, StoreError
from qisd.net.node import rows_matching

log = logging.getLogger(__name__)

BATCH_ROWS = 16_384
"""Most rows in one record batch sent by DoGet or DoExchange."""
MAX_PUT_ROWS = 100_000
"""Most rows one DoPut stream may carry (all of them are checked before any is stored)."""
LOCAL_PREFIX = "local:"
"""DoGet ticket prefix: read the local store only."""
PARTIAL_HEADER = "x-qisd-partial"
"""Call header asking DoPut to keep the valid rows of a batch with invalid ones."""
CALL_TIMEOUT = 300.0
"""Seconds a Flight call waits for the node before it fails (a stuck loop never hangs gRPC)."""
MAX_FOLLOW_BACKLOG = 1_024
"""Tables queued for one DoExchange follower that does not read; past it, the follow ends."""

_STRING = "text"
_FLOAT = "a number"
_INT = "a whole number"
_KINDS: dict[str, str] = {
    "timestamp_utc": _INT,
    "domain": _STRING,
    "problem_type": _STRING,
    "model_architecture": _STRING,
    "training_phase": _STRING,
    "metric_name": _STRING,
    "metric_delta": _FLOAT,
    "metric_value": _FLOAT,
    "confidence": _FLOAT,
    "intervention_type": _STRING,
    "intervention_params": _STRING,
    "outcome_decile": _INT,
    "sample_count": _INT,
    "raw_data_hash": _STRING,
    "data_ref": _STRING,
}
"""What each accepted input column must hold (``node_id`` is ignored whatever it holds)."""
REQUIRED_COLUMNS: tuple[str, ...] = tuple(c for c in COLUMNS if c != "node_id")
"""Columns a DoPut must carry: the packet columns but ``node_id`` (and ``raw_data_hash`` when
a ``data_ref`` column replaces it)."""

_T = TypeVar("_T")
_END: Any = object()

ACTIONS: dict[str, str] = {
    "synthesize": (
        'Body: a fingerprint path, or JSON {"path": ...}. Result: JSON synthesis of the path\'s '
        "packets (network and local): ranked interventions with evidence."
    ),
    "status": "No body. Result: JSON node status (identity, peers, store, follows, counters).",
    "follow": (
        'Body: a fingerprint path, or JSON {"path": ...}. Follow it (persisted). '
        'Result: JSON {"followed": [paths]}.'
    ),
    "unfollow": (
        'Body: a fingerprint path, or JSON {"path": ...}. Stop following it. '
        'Result: JSON {"followed": [paths]}.'
    ),
}


# --------------------------------------------------------------------------- addresses


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class _Address:
    scheme: str
    host: str
    port: int

    def location(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"


def parse_uri(uri: str, *, tls: bool) -> _Address:
    """``grpc://HOST:PORT`` (also ``grpc+tcp``, ``grpc+tls``; a bare ``HOST:PORT`` is grpc).

    Raises :class:`ConfigError` for anything else. ``tls`` (a certificate was given) turns
    ``grpc``/``grpc+tcp`` into ``grpc+tls``; ``grpc+tls`` without a certificate is refused.
    """
    text = (uri or DEFAULT_FLIGHT_URI).strip()
    if "://" not in text:
        text = "grpc://" + text
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"flight URI {uri!r} is malformed ({exc})") from None
    if parts.scheme not in ("grpc", "grpc+tcp", "grpc+tls") or not parts.hostname:
        raise ConfigError(
            f"flight URI {uri!r} must look like grpc://127.0.0.1:8815 "
            "(schemes grpc, grpc+tcp, grpc+tls)"
        )
    if parts.path not in ("", "/") or parts.query or parts.username:
        raise ConfigError(f"flight URI {uri!r} must be only scheme://host:port")
    scheme = parts.scheme
    if scheme == "grpc+tls" and not tls:
        raise ConfigError(
            f"flight URI {uri!r} asks for TLS: give a certificate and key (tls_cert, tls_key)"
        )
    if tls:
        scheme = "grpc+tls"
    return _Address(scheme, parts.hostname, 8815 if port is None else port)


# --------------------------------------------------------------------------- errors


def _bad_request(message: str, code: str, **details: Any) -> flight.FlightServerError:
    """A client error: the message for humans, JSON ``extra_info`` for programs."""
    info = json.dumps({"code": code, "message": message, **details}, default=str)
    return flight.FlightServerError(message, info.encode())


@contextlib.contextmanager
def _translated(what: str) -> Iterator[None]:
    """Turn qisd errors into Flight errors a client can act on; never leak a traceback."""
    try:
        yield
    except flight.FlightError:
        raise
    except StoreError as exc:
        log.warning("flight %s: %s", what, exc)
        raise flight.FlightInternalError(f"{what}: {exc}") from None
    except QisdError as exc:
        raise _bad_request(f"{what}: {exc}", type(exc).__name__) from None
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise _bad_request(f"{what}: {exc}", "invalid") from None
    except (concurrent.futures.CancelledError, asyncio.CancelledError):
        raise flight.FlightUnavailableError(f"{what}: the daemon is shutting down") from None
    except Exception:
        log.exception("flight %s failed", what)
        raise flight.FlightInternalError(
            f"{what}: internal error in the daemon (see its log)"
        ) from None


# --------------------------------------------------------------------------- auth


class _CallMiddleware(flight.ServerMiddleware):
    """Per-call state: the options the client sent as headers, and the bearer to answer with."""

    def __init__(
        self, partial: bool, bearer: str | None, done: Callable[[str], None] | None = None
    ) -> None:
        self.partial = partial
        self._bearer = bearer
        self._done = done

    def call_completed(self, exception: Any) -> None:
        if self._done is not None:
            self._done("ok" if exception is None else "error")

    def sending_headers(self) -> dict[str, str]:
        if self._bearer is None:
            return {}
        return {"authorization": f"Bearer {self._bearer}"}


def _header(headers: dict[str, list[Any]], name: str) -> list[str]:
    out = []
    for value in headers.get(name, []):
        out.append(value.decode("latin-1") if isinstance(value, bytes) else str(value))
    return out


def _truthy(text: str) -> bool:
    return text.strip().lower() in ("1", "true", "yes", "on")


class _CallMiddlewareFactory(flight.ServerMiddlewareFactory):
    """Checks the token (when one is set) on every call and reads qisd's call headers."""

    def __init__(self, token: str) -> None:
        self._token = token.encode("utf-8")
        self.calls: collections.Counter[tuple[str, str]] = collections.Counter()
        """Calls by (method, outcome: ok, error, unauthenticated), for metrics."""
        self._calls_lock = threading.Lock()

    def _counter(self, method: str) -> Callable[[str], None]:
        def done(outcome: str) -> None:
            with self._calls_lock:  # gRPC threads
                self.calls[(method, outcome)] += 1

        return done

    def _matches(self, candidate: str) -> bool:
        return hmac.compare_digest(candidate.strip().encode("utf-8"), self._token)

    def start_call(self, info: Any, headers: dict[str, list[Any]]) -> _CallMiddleware:
        partial = any(_truthy(v) for v in _header(headers, PARTIAL_HEADER))
        method = getattr(getattr(info, "method", None), "name", "unknown").lower()
        done = self._counter(method)
        if not self._token:
            return _CallMiddleware(partial, None, done)
        for value in _header(headers, "authorization"):
            scheme, _, credential = value.strip().partition(" ")
            scheme = scheme.lower()
            if scheme == "bearer" and self._matches(credential):
                return _CallMiddleware(partial, None, done)
            if scheme == "basic":
                try:
                    decoded = base64.b64decode(credential.strip(), validate=True).decode("utf-8")
                except (ValueError, UnicodeDecodeError):
                    continue
                _, _, password = decoded.partition(":")
                if self._matches(password):
                    # Flight's basic-auth handshake: answer with the bearer header to reuse.
                    return _CallMiddleware(partial, self._token.decode("utf-8"), done)
        done("unauthenticated")
        raise flight.FlightUnauthenticatedError(
            "this qisd Flight endpoint needs its token: send the header "
            "'authorization: Bearer <token>' (or authenticate_basic_token(user, token))"
        )


class _HeaderAuthHandler(flight.ServerAuthHandler):
    """Enables Flight's Handshake (basic-auth) RPC; the middleware does the checking."""

    def authenticate(self, outgoing: Any, incoming: Any) -> None:
        return None

    def is_valid(self, token: bytes) -> str:
        return ""


# --------------------------------------------------------------------------- descriptors


@dataclass(frozen=True)
class _Request:
    path: str
    partial: bool = False


def _path_text(text: str) -> str:
    with _translated("fingerprint path"):
        return normalize_path(text)


def _descriptor_request(descriptor: flight.FlightDescriptor) -> _Request:
    """A descriptor's path and options: a PATH descriptor, or a CMD holding JSON."""
    if descriptor.descriptor_type == flight.DescriptorType.PATH:
        segments = []
        for part in descriptor.path or []:
            try:
                segments.append(part.decode("utf-8") if isinstance(part, bytes) else str(part))
            except UnicodeDecodeError:
                raise _bad_request("descriptor path is not UTF-8", "bad_descriptor") from None
        return _Request(_path_text("/".join(segments)))
    command = descriptor.command or b""
    try:
        value = json.loads(command.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise _bad_request(
            'a command descriptor holds JSON like {"path": "domain/problem_type"}',
            "bad_descriptor",
        ) from None
    if not isinstance(value, dict) or not isinstance(value.get("path"), str):
        raise _bad_request(
            'a command descriptor holds a JSON object with a "path" string', "bad_descriptor"
        )
    unknown = sorted(set(value) - {"path", "partial"})
    if unknown:
        raise _bad_request(
            f"unknown command descriptor fields {unknown} (known: path, partial)",
            "bad_descriptor",
        )
    partial = value.get("partial", False)
    if not isinstance(partial, bool):
        raise _bad_request('"partial" must be true or false', "bad_descriptor")
    return _Request(_path_text(value["path"]), partial)


def _ticket_request(ticket: flight.Ticket) -> tuple[str, bool]:
    """``(path, local_only)`` from a DoGet ticket."""
    raw = ticket.ticket
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _bad_request(
            "a ticket is a fingerprint path as UTF-8, e.g. b'clinical.oncology/treatment'",
            "bad_ticket",
        ) from None
    local = text.startswith(LOCAL_PREFIX)
    if local:
        text = text[len(LOCAL_PREFIX) :]
    return _path_text(text), local


def _action_path(body: bytes) -> str:
    try:
        text = body.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise _bad_request("the action body is a path or JSON, as UTF-8", "bad_action") from None
    if text.startswith("{"):
        try:
            value = json.loads(text)
        except ValueError:
            raise _bad_request("the action body is not valid JSON", "bad_action") from None
        if not isinstance(value, dict) or not isinstance(value.get("path"), str):
            raise _bad_request('the action body needs a "path" string', "bad_action")
        text = value["path"]
    return _path_text(text)


# --------------------------------------------------------------------------- DoPut input


def _type_fits(kind: str, t: pa.DataType) -> bool:
    if pa.types.is_null(t):
        return True  # an all-null column: each row then says which value is missing
    if pa.types.is_dictionary(t):
        t = t.value_type
    if kind == _STRING:
        return is_text_type(t)
    if kind == _FLOAT:
        return pa.types.is_floating(t) or pa.types.is_integer(t) or pa.types.is_decimal(t)
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_timestamp(t)


def check_put_schema(schema: pa.Schema) -> None:
    """Refuse, naming them, missing or unknown columns and columns of the wrong kind."""
    if any(schema.equals(good) for good in _GOOD_SCHEMAS):  # the same one on every put
        return
    names = list(schema.names)
    duplicated = sorted({n for n in names if names.count(n) > 1})
    unknown = [n for n in names if n != "node_id" and n not in _KINDS]
    missing = [
        c
        for c in REQUIRED_COLUMNS
        if c not in names and not (c == "raw_data_hash" and "data_ref" in names)
    ]
    problems = []
    if duplicated:
        problems.append(f"duplicated columns {duplicated}")
    if unknown:
        problems.append(f"unknown columns {unknown}")
    if missing:
        problems.append(f"missing columns {missing}")
    wrong = [
        f"{f.name} is {f.type} (must be {_KINDS[f.name]})"
        for f in schema
        if f.name in _KINDS and not _type_fits(_KINDS[f.name], f.type)
    ]
    if wrong:
        problems.append("wrong column types: " + "; ".join(wrong))
    if problems:
        raise _bad_request(
            "DoPut batches must have the outcome packet schema: "
            + ", ".join(problems)
            + f" (expected {list(SCHEMA.names)}; node_id may be left out, and data_ref may"
            " replace raw_data_hash)",
            "schema",
            missing=missing,
            unknown=unknown,
            duplicated=duplicated,
        )
    _GOOD_SCHEMAS.appendleft(schema)


_GOOD_SCHEMAS: collections.deque[pa.Schema] = collections.deque(maxlen=8)
"""The last schemas :func:`check_put_schema` passed (comparing is cheap; hashing is not)."""


def _normalise_columns(table: pa.Table) -> pa.Table:
    """Drop ``node_id`` (the daemon sets it); plain values for timestamps and dictionaries."""
    if "node_id" in table.schema.names:
        table = table.drop_columns(["node_id"])
    if not any(pa.types.is_dictionary(t) or pa.types.is_timestamp(t) for t in table.schema.types):
        return table
    for i, f in enumerate(table.schema):
        column = table.column(i)
        if pa.types.is_dictionary(f.type):
            column = column.cast(f.type.value_type)
        if pa.types.is_timestamp(f.type):
            # Timestamps from pandas/Polars: milliseconds since 1970 (naive ones taken as UTC).
            # Sub-millisecond digits are dropped, as the schema's int64 milliseconds require.
            column = column.cast(pa.timestamp("ms", f.type.tz), safe=False).cast(pa.int64())
        if column is not table.column(i):
            table = table.set_column(i, f.name, column)
    return table


def _path_mismatches(table: pa.Table, path: str, fields: tuple[str, ...]) -> list[tuple[int, str]]:
    """Rows whose fingerprint over the template's first fields is not ``path``."""
    segments = path.split("/")
    if len(segments) > len(fields):
        reason = (
            f"descriptor path {path!r} has {len(segments)} segments but the domain's template "
            f"routes by {len(fields)} fields {list(fields)}"
        )
        return [(i, reason) for i in range(table.num_rows)]
    used = fields[: len(segments)]
    values = [table.column(f).to_pylist() for f in used]
    out = []
    for i, row in enumerate(zip(*values, strict=True)):
        if list(row) != segments:
            shown = "/".join("" if v is None else str(v) for v in row)
            out.append(
                (i, f"fingerprint {shown!r} over {list(used)} is not the descriptor path {path!r}")
            )
    return out


def _put_reply(
    path: str,
    rows: int,
    result: Any,
    rejected: list[tuple[int, str]],
    partial: bool,
    held: set[str] | None = None,
) -> dict[str, Any]:
    ids = [] if result is None else list(result.packet_ids)
    return {
        "path": path,
        "rows": rows,
        "accepted": 0 if result is None else result.rows,
        "packet_ids": ids,
        "duplicates": [pid for pid in ids if held and pid in held],
        "rejected": [{"row": i, "reason": reason} for i, reason in sorted(rejected)],
        "replicas": {} if result is None else dict(result.replicas),
        "partial": partial,
    }


class _PutTally(threading.local):
    """What the store's puts made of the envelopes of the DoPut running on this thread."""

    accepted: set[str] | None = None
    duplicates: set[str] | None = None


def _tally_puts(store: Any, tally: _PutTally) -> None:
    """Have ``store.put`` tell ``tally`` which packets it already held.

    A DoPut commits in its own gRPC thread (:meth:`Node.emit_table_blocking`), and the node's
    emit result does not carry the store's duplicates; this thread-local tally reads them from
    the one put the emit makes. Other callers of the store (the loop's emits, the DHT) are
    untouched: the tally only records while a DoPut on the same thread has armed it.
    """
    put = store.put

    def put_and_tally(envelopes: Any, **kwargs: Any) -> Any:
        result = put(envelopes, **kwargs)
        if tally.accepted is not None and tally.duplicates is not None:
            tally.accepted.update(result.accepted)
            tally.duplicates.update(result.duplicates)
        return result

    store.put = put_and_tally


# --------------------------------------------------------------------------- the server


def _provenance_table(envelopes: list[Envelope]) -> pa.Table:
    batches = []
    for env in envelopes:
        _, batch = read_trusted(env.raw)
        if batch is not None:
            batches.append(with_provenance(batch, env.packet_id, env.public_key))
    return pa.Table.from_batches(batches, schema=RESULT_SCHEMA)


@dataclass(eq=False)
class _Follower:
    """One DoExchange follow: the loop's pump task feeds ``tables``; the gRPC thread sends."""

    path: str
    tables: queue.SimpleQueue[Any] = field(default_factory=queue.SimpleQueue)
    task: asyncio.Task[None] | None = None
    ended: threading.Event = field(default_factory=threading.Event)


class QisdFlightServer(flight.FlightServerBase):
    """The Flight service of one node. Start it with :func:`start_flight`."""

    def __init__(
        self,
        node: Any,
        loop: asyncio.AbstractEventLoop,
        location: str,
        *,
        token: str,
        tls_certificates: list[tuple[bytes, bytes]],
    ) -> None:
        self.call_counter = _CallMiddlewareFactory(token)
        super().__init__(
            location,
            tls_certificates=tls_certificates or None,
            auth_handler=_HeaderAuthHandler() if token else None,
            middleware={"qisd": self.call_counter},
        )
        self.node = node
        self.loop = loop
        self._followers: set[_Follower] = set()
        self._auto_followed: dict[str, int] = {}
        self._state = threading.Lock()
        self._closing = False
        self._paths: dict[bytes, str] = {}
        self._tally = _PutTally()
        _tally_puts(node.store, self._tally)

    # ------------------------------------------------------------------ the loop bridge

    def _run(self, make: Callable[[], Awaitable[_T]], timeout: float = CALL_TIMEOUT) -> _T:
        """Run a coroutine on the node's loop and wait for its result (from a gRPC thread)."""
        if self._closing:
            raise flight.FlightUnavailableError("the daemon is shutting down")

        async def call() -> _T:
            return await make()

        try:
            future = asyncio.run_coroutine_threadsafe(call(), self.loop)
        except RuntimeError:  # the loop is closed
            raise flight.FlightUnavailableError("the daemon is shutting down") from None
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise flight.FlightTimedOutError(
                f"the node did not answer within {timeout:.0f} s"
            ) from None

    def _blocking(self, fn: Callable[[], _T]) -> _T:
        """A blocking node/store call, run by the loop in one of its worker threads."""
        return self._run(lambda: asyncio.to_thread(fn))

    # ------------------------------------------------------------------ DoPut

    def do_put(
        self,
        context: flight.ServerCallContext,
        descriptor: flight.FlightDescriptor,
        reader: flight.MetadataRecordBatchReader,
        writer: flight.FlightMetadataWriter,
    ) -> None:
        with _translated("DoPut"):
            self._do_put(context, descriptor, reader, writer)

    def _do_put(
        self,
        context: flight.ServerCallContext,
        descriptor: flight.FlightDescriptor,
        reader: flight.MetadataRecordBatchReader,
        writer: flight.FlightMetadataWriter,
    ) -> None:
        request = _descriptor_request(descriptor)
        middleware = context.get_middleware("qisd")
        partial = request.partial or bool(middleware is not None and middleware.partial)
        check_put_schema(reader.schema)
        batches = []
        rows = 0
        for chunk in reader:
            if chunk.data is None:
                continue
            rows += chunk.data.num_rows
            if rows > MAX_PUT_ROWS:
                raise _bad_request(
                    f"DoPut carries at most {MAX_PUT_ROWS} rows per stream (this one has more): "
                    "split the data over several DoPut calls",
                    "too_large",
                    limit=MAX_PUT_ROWS,
                )
            batches.append(chunk.data)
        table = _normalise_columns(pa.Table.from_batches(batches, schema=reader.schema))
        reply = self._put(request.path, table, partial)
        writer.write(pa.py_buffer(json.dumps(reply).encode()))

    def _put(self, path: str, table: pa.Table, partial: bool) -> dict[str, Any]:
        rows = table.num_rows
        if rows == 0:
            return _put_reply(path, 0, None, [], partial)
        domain = path.split("/", 1)[0]
        with _translated("DoPut"):
            _, template = self.node.template_for(domain)
        mismatched = _path_mismatches(table, path, template.fields)
        if mismatched and not partial:
            self._refuse(path, rows, mismatched)
        keep = list(range(rows))
        if mismatched:
            bad = {i for i, _ in mismatched}
            keep = [i for i in keep if i not in bad]
            table = table.take(pa.array(keep, pa.int64()))
        rejected = list(mismatched)
        result = None
        if keep:
            try:
                if self._closing:
                    raise flight.FlightUnavailableError("the daemon is shutting down")
                # Validated, signed and committed in this gRPC thread: the loop only hears of it.
                self._tally.accepted, self._tally.duplicates = set(), set()
                result = self.node.emit_table_blocking(table, partial=partial)
                # A packet is a duplicate when none of its envelopes (one per routable level)
                # was new to the store.
                held = self._tally.duplicates - self._tally.accepted
            except QisdError as exc:
                row = getattr(exc, "row", None)
                reason = str(exc)
                if row is not None:
                    # The node names rows of what it was given: map back to the stream's rows.
                    reason = reason.replace(f"row {row}:", f"row {keep[row]}:", 1)
                    self._refuse(path, rows, [(keep[row], reason)])
                raise _bad_request(
                    f"DoPut to {path!r} refused: {exc}", type(exc).__name__
                ) from None
            except flight.FlightError:
                raise
            except Exception:
                with _translated("DoPut"):
                    raise
            finally:
                self._tally.accepted = self._tally.duplicates = None
            rejected += [(keep[i], reason) for i, reason in result.rejected]
            return _put_reply(path, rows, result, rejected, partial, held)
        return _put_reply(path, rows, result, rejected, partial)

    @staticmethod
    def _refuse(path: str, rows: int, rejected: list[tuple[int, str]]) -> None:
        shown = "; ".join(reason for _, reason in rejected[:5])
        more = f" (and {len(rejected) - 5} more)" if len(rejected) > 5 else ""
        raise _bad_request(
            f"DoPut to {path!r} refused, nothing stored: {shown}{more}. Send "
            f'{{"path": ..., "partial": true}} or the header {PARTIAL_HEADER}: true '
            "to store the valid rows",
            "rejected",
            rejected=[{"row": i, "reason": r} for i, r in rejected[:1000]],
            rows=rows,
        )

    # ------------------------------------------------------------------ DoGet

    def do_get(self, context: flight.ServerCallContext, ticket: flight.Ticket) -> Any:
        path, local = _ticket_request(ticket)
        node = self.node
        with _translated("DoGet"):
            key, wanted = node.query_route(path)
            refused: list[Envelope] = []
            report = None
            if not local:
                refused, report = self._run(lambda: node.fetch_into_store(key))
        # The read's completeness rides in the schema's metadata (qisd.core.completeness).
        schema = completeness.attach(RESULT_SCHEMA, report)
        return flight.GeneratorStream(schema, self._rows_of(key, wanted, refused))

    def _rows_of(
        self, key: bytes, wanted: dict[str, str], refused: list[Envelope]
    ) -> Iterator[pa.RecordBatch]:
        """The path's rows in bounded batches: the store's (the network's were fetched into
        it), then the fetched envelopes the store refused.

        The store's rows are a snapshot of the key's columnar view taken when the stream
        starts, read in this gRPC thread: mapped record batches (a deep path's rows picked out
        with Arrow compute), no envelope decoded, memory bounded whatever the key's size.
        """
        node = self.node
        with _translated("DoGet"):
            batches = node.store.scan(key, now_ms=_now_ms(), max_rows=BATCH_ROWS, wanted=wanted)
        while True:
            with _translated("DoGet"):
                batch = next(batches, None)
            if batch is None:
                break
            yield batch
        if refused:
            table = rows_matching(_provenance_table(refused), wanted)
            yield from table.to_batches(max_chunksize=BATCH_ROWS)

    # ------------------------------------------------------------------ DoExchange

    def do_exchange(
        self,
        context: flight.ServerCallContext,
        descriptor: flight.FlightDescriptor,
        reader: flight.MetadataRecordBatchReader,
        writer: flight.MetadataRecordBatchWriter,
    ) -> None:
        path = _descriptor_request(descriptor).path
        follower = _Follower(path)
        with self._state:
            if self._closing:
                raise flight.FlightUnavailableError("the daemon is shutting down")
            self._followers.add(follower)
        try:
            with _translated("DoExchange"):
                self._run(lambda: self._start_follow(follower))
            writer.begin(RESULT_SCHEMA)
            writer.write_metadata(pa.py_buffer(json.dumps({"following": path}).encode()))
            # The client's half: it sends nothing we need; its end (or a broken call) stops us.
            watcher = threading.Thread(
                target=self._watch_client, args=(reader, follower), daemon=True
            )
            watcher.start()
            while True:
                item = follower.tables.get()
                if item is _END or follower.ended.is_set():
                    break
                if isinstance(item, Exception):
                    raise item
                for batch in item.to_batches(max_chunksize=BATCH_ROWS):
                    writer.write_batch(batch)
        finally:
            self._end_follow(follower)

    def _watch_client(self, reader: flight.MetadataRecordBatchReader, follower: _Follower) -> None:
        # Drain what the client sends until it closes (or the call ends): then stop.
        with contextlib.suppress(Exception):
            collections.deque(reader, maxlen=0)
        self._stop_follower(follower)

    def _stop_follower(self, follower: _Follower) -> None:
        if follower.ended.is_set():
            return
        follower.ended.set()
        follower.tables.put(_END)
        task = follower.task
        if task is not None:
            with contextlib.suppress(RuntimeError):  # the loop is already closed
                self.loop.call_soon_threadsafe(task.cancel)

    async def _start_follow(self, follower: _Follower) -> None:
        path = follower.path
        node = self.node
        if path not in node.followed() or path in self._auto_followed:
            # Follow for as long as the exchange lasts; a path followed before stays followed.
            await node.follow(path)
            self._auto_followed[path] = self._auto_followed.get(path, 0) + 1
        subscription = node.subscribe(path)
        first = asyncio.ensure_future(subscription.__anext__())
        # Let the subscription register before the client is told the follow is on.
        await asyncio.sleep(0)
        follower.task = asyncio.create_task(self._pump(follower, subscription, first))

    async def _pump(self, follower: _Follower, subscription: Any, first: Any) -> None:
        try:
            table = await first
            while not follower.ended.is_set():
                if follower.tables.qsize() > MAX_FOLLOW_BACKLOG:
                    follower.tables.put(
                        flight.FlightServerError(
                            f"the follower of {follower.path!r} fell {MAX_FOLLOW_BACKLOG} "
                            "tables behind; follow again and read faster"
                        )
                    )
                    return
                follower.tables.put(table)
                table = await subscription.__anext__()
        except (StopAsyncIteration, asyncio.CancelledError):
            log.debug("following %s for a Flight client ended", follower.path)
        except Exception:
            log.exception("following %s for a Flight client failed", follower.path)
        finally:
            if not first.done():
                first.cancel()
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await subscription.aclose()
            follower.tables.put(_END)

    def _end_follow(self, follower: _Follower) -> None:
        self._stop_follower(follower)

        async def finish() -> None:
            task = follower.task
            if task is not None:
                await asyncio.gather(task, return_exceptions=True)
            path = follower.path
            count = self._auto_followed.get(path, 0)
            if count:
                if count == 1:
                    del self._auto_followed[path]
                    if path in self.node.followed():
                        with contextlib.suppress(QisdError):
                            await self.node.unfollow(path)
                else:
                    self._auto_followed[path] = count - 1

        try:
            asyncio.run_coroutine_threadsafe(finish(), self.loop).result(CALL_TIMEOUT)
        except Exception:
            log.debug("ending a Flight follow of %s", follower.path, exc_info=True)
        finally:
            with self._state:
                self._followers.discard(follower)

    # ------------------------------------------------------------------ flights

    def _path_of_key(self, key: bytes, now: int) -> str | None:
        """The fingerprint path a stored key is the hash of (read from one of its envelopes)."""
        if key in self._paths:
            return self._paths[key]
        raws, _, _ = self.node.store.page(key, since=0, max_bytes=1, now_ms=now)
        if not raws:
            return None
        env, _ = read_trusted(raws[0])
        path = env.path
        if path is not None:
            self._paths[key] = path
        return path

    def _packets_at(self, path: str, now: int, held: dict[bytes, int] | None = None) -> int:
        """Packets the store holds for ``path``: those under its own key, or for a path deeper
        than its template's routable levels, the routed key's packets with a row on the path
        (read in bounded steps); 0 for a path no key answers. ``held`` is the store's
        ``keys()`` when the caller has read it already."""
        node = self.node
        try:
            key, wanted = node.query_route(path)
        except QisdError:
            return 0
        if held is None:
            held = dict(node.store.keys())
        if key not in held:
            return 0
        return node.store.count(key, now_ms=now, wanted=wanted)

    def _flights(self, prefix: str) -> list[tuple[str, int, bool]]:
        """``(path, packets, followed)`` of every known or followed path starting ``prefix``."""
        now = _now_ms()
        node = self.node
        followed = node.followed()
        found: dict[str, int] = {}
        held = dict(node.store.keys())
        for key in held:
            path = self._path_of_key(key, now)
            if path is not None:
                found[path] = node.store.count(key, now_ms=now)
        for path in followed:
            if path not in found:
                found[path] = self._packets_at(path, now, held)
        return [
            (path, found[path], path in followed)
            for path in sorted(found)
            if path == prefix or not prefix or path.startswith(prefix.rstrip("/") + "/")
        ]

    def _info(
        self, path: str, packets: int, followed: bool, descriptor: Any = None
    ) -> flight.FlightInfo:
        return flight.FlightInfo(
            RESULT_SCHEMA,
            descriptor or flight.FlightDescriptor.for_path(*path.split("/")),
            [flight.FlightEndpoint(path.encode(), [])],
            -1,
            -1,
            app_metadata=json.dumps(
                {"path": path, "packets": packets, "followed": followed}
            ).encode(),
        )

    def list_flights(
        self, context: flight.ServerCallContext, criteria: bytes
    ) -> Iterator[flight.FlightInfo]:
        prefix = ""
        if criteria:
            try:
                prefix = criteria.decode("utf-8").strip("/")
            except UnicodeDecodeError:
                raise _bad_request("criteria is a path prefix as UTF-8", "bad_criteria") from None
        with _translated("ListFlights"):
            flights = self._blocking(lambda: self._flights(prefix))
        for path, packets, followed in flights:
            yield self._info(path, packets, followed)

    def get_flight_info(
        self, context: flight.ServerCallContext, descriptor: flight.FlightDescriptor
    ) -> flight.FlightInfo:
        path = _descriptor_request(descriptor).path
        node = self.node

        def count() -> tuple[int, bool]:
            return self._packets_at(path, _now_ms()), path in node.followed()

        with _translated("GetFlightInfo"):
            packets, followed = self._blocking(count)
        return self._info(path, packets, followed, descriptor)

    def get_schema(
        self, context: flight.ServerCallContext, descriptor: flight.FlightDescriptor
    ) -> flight.SchemaResult:
        _descriptor_request(descriptor)
        return flight.SchemaResult(RESULT_SCHEMA)

    # ------------------------------------------------------------------ actions

    def list_actions(self, context: flight.ServerCallContext) -> list[tuple[str, str]]:
        return list(ACTIONS.items())

    def do_action(
        self, context: flight.ServerCallContext, action: flight.Action
    ) -> Iterator[bytes]:
        kind = action.type
        body = action.body.to_pybytes() if action.body is not None else b""
        node = self.node
        if kind == "status":

            async def status() -> dict[str, Any]:
                return dict(await asyncio.to_thread(node.status))

            with _translated("status"):
                result: Any = self._run(status)
        elif kind == "synthesize":
            path = _action_path(body)
            with _translated("synthesize"):
                result = self._run(lambda: node.synthesize(path))
        elif kind in ("follow", "unfollow"):
            path = _action_path(body)

            async def change() -> dict[str, Any]:
                # An explicit follow keeps the path followed after any DoExchange on it ends.
                self._auto_followed.pop(path, None)
                await getattr(node, kind)(path)
                return {"followed": node.followed()}

            with _translated(kind):
                result = self._run(change)
        else:
            raise _bad_request(
                f"unknown action {kind!r}; known: {sorted(ACTIONS)}", "unknown_action"
            )
        yield json.dumps(result, default=str).encode()

    # ------------------------------------------------------------------ shutdown

    def stop_followers(self) -> None:
        """End every DoExchange follow (their clients see the stream end)."""
        with self._state:
            self._closing = True
            followers = list(self._followers)
        for follower in followers:
            self._stop_follower(follower)


def _now_ms() -> int:
    from qisd.net.node import now_ms

    return now_ms()


# --------------------------------------------------------------------------- entry point


class FlightHandle:
    """A running Flight endpoint: ``port``, ``uri``, and ``await close()``."""

    def __init__(self, server: QisdFlightServer, address: _Address) -> None:
        self._server = server
        self.port: int = server.port
        self.uri: str = _Address(address.scheme, address.host, self.port).location()
        self._closed = False

    def calls(self) -> dict[tuple[str, str], int]:
        """Flight calls so far by (method, outcome), e.g. ``("do_put", "ok")``."""
        return dict(self._server.call_counter.calls)

    async def close(self) -> None:
        """Stop accepting calls, end follows, and wait for calls in progress to finish."""
        if self._closed:
            return
        self._closed = True
        self._server.stop_followers()
        # shutdown() blocks until running calls end; they may be waiting on this loop.
        await asyncio.to_thread(self._server.shutdown)

    async def __aenter__(self) -> FlightHandle:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def _read_pem(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read the Flight TLS {what} {path}: {exc.strerror}") from None


def _check_tls_pair(cert: str, key: str) -> None:
    """ConfigError in one line unless ``cert`` and ``key`` are a PEM certificate and its key.

    gRPC would otherwise refuse them at bind time with its own lines on stderr and Flight's
    "Server did not start properly", which names neither file.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        # An encrypted key gets an empty password (gRPC cannot use one) instead of a prompt.
        context.load_cert_chain(cert, key, password=lambda: b"")
    except ssl.SSLError as exc:
        detail = f" (OpenSSL: {exc.reason})" if exc.reason else ""
        raise ConfigError(
            f"the Flight TLS certificate {cert} and key {key} are not a PEM certificate and "
            f"its unencrypted private key{detail}"
        ) from None


def _why_not_served(address: _Address, error: Exception) -> str:
    """One line saying why gRPC could not serve ``address``, asked of the kernel afterwards.

    gRPC's own bind is the only attempt: a probe before it would leave a window in which
    another process takes the port, and then the user would read Flight's "Server did not
    start properly" again. Binding the port once more after the failure names the cause (in
    use, not an address of this machine, no permission) while it still holds.
    """
    where = f"{address.host}:{address.port}"
    try:
        infos = socket.getaddrinfo(address.host, address.port, type=socket.SOCK_STREAM)
    except OSError as exc:
        return f"cannot serve Arrow Flight at {where}: {exc.strerror or exc}"
    for family, kind, proto, _name, sockaddr in infos:
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC does
            try:
                sock.bind(sockaddr)
                sock.listen()
            except OSError as exc:
                return (
                    f"cannot serve Arrow Flight at {where}: {exc.strerror or exc} "
                    "(choose another with --flight URI)"
                )
    return (
        f"cannot serve Arrow Flight at {address.location()}: gRPC could not start it ({error}; "
        "GRPC_VERBOSITY=error shows gRPC's reason)"
    )


async def start_flight(
    node: Any, uri: str, *, token: str = "", tls_cert: str = "", tls_key: str = ""
) -> FlightHandle:
    """Serve ``node`` over Arrow Flight at ``uri`` (``grpc://127.0.0.1:8815`` if empty).

    Raises :class:`ConfigError` for a malformed URI, a non-loopback address without a token,
    half a TLS pair, or an address that cannot be bound. Calls are served on gRPC's threads and
    reach the node on the running event loop.
    """
    if bool(tls_cert) != bool(tls_key):
        raise ConfigError("Flight TLS needs both a certificate and its key (tls_cert, tls_key)")
    address = parse_uri(uri, tls=bool(tls_cert))
    if not _is_loopback(address.host) and not token:
        raise ConfigError(
            f"Flight address {address.host} is not loopback: set a token (flight_token, "
            "QISD_FLIGHT_TOKEN) so that clients must authenticate, or bind 127.0.0.1"
        )
    certificates = []
    if tls_cert:
        certificates.append((_read_pem(tls_cert, "certificate"), _read_pem(tls_key, "key")))
        _check_tls_pair(tls_cert, tls_key)
    loop = asyncio.get_running_loop()

    def create() -> QisdFlightServer:
        return QisdFlightServer(
            node, loop, address.location(), token=token, tls_certificates=certificates
        )

    try:
        server = await asyncio.to_thread(create)
    except (pa.ArrowException, OSError) as exc:
        why = await asyncio.to_thread(_why_not_served, address, exc)
        raise ConfigError(why) from None
    handle = FlightHandle(server, address)
    if not tls_cert:
        await asyncio.to_thread(_warm_up, handle.uri, token)
    log.info("Arrow Flight endpoint at %s%s", handle.uri, " (token required)" if token else "")
    return handle


WARM_UP_TICKET = LOCAL_PREFIX + "qisd-warm-up.invalid/first-read"
"""What the endpoint reads from itself once at start (a path no packet has): the first call
of a process pays ~50 ms of one-off set-up in gRPC, Flight and pyarrow, which belongs to
start-up, not to the first client's read."""


def _warm_up(uri: str, token: str) -> None:
    headers = [(b"authorization", f"Bearer {token}".encode())] if token else []
    options = flight.FlightCallOptions(timeout=5, headers=headers)
    try:
        with flight.connect(uri) as client:
            client.do_get(flight.Ticket(WARM_UP_TICKET.encode()), options).read_all()
    except Exception:  # a warm-up that fails costs the first reader the set-up, nothing else
        log.debug("Flight warm-up read failed", exc_info=True)
