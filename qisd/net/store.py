"""The durable local store of envelopes: SQLite (standard library) in WAL mode.

One file, ``<data_dir>/store.sqlite3``. Every envelope this node holds (its own and the ones
other nodes asked it to store) is one row of ``envelopes``, unique by ``(key, packet_id)``; the
same packet stored under several routable levels is one row per key.

Durability. ``journal_mode=WAL`` with ``synchronous=FULL``: every commit fsyncs the WAL before
:meth:`Store.put` returns, so an acknowledged put survives SIGKILL *and* power loss. NORMAL would
survive a killed process but could lose the last commits on power loss; an emit is acknowledged
to the user as stored, so we pay one fsync per :meth:`Store.put` call (batch envelopes into one
call to amortise it).

Quotas and eviction (remote packets only; packets this node emitted, ``local=True``, are never
refused by a quota and never evicted):

1. ``per_key`` packets under one key, then ``per_signer_per_key`` packets of one signer under one
   key: past either, the packet is refused (expired rows of that key are purged first).
2. ``max_bytes`` total envelope bytes: past it, room is made by deleting, in order, every expired
   row, then remote packets of the source holding the most remote bytes (the host that
   delivered them, else their signer), oldest timestamp first (re-picking the largest source
   as bytes shift). Packets accepted by the same ``put`` call are
   never evicted by it. If no room can be made a remote packet is refused ("store full"); a local
   packet is stored anyway (the cap bounds what the *network* can make this node hold).

Cursors. ``seq`` is an AUTOINCREMENT integer, so it only grows and is never reused, even after
deletes: :meth:`Store.page` with ``since=cursor`` returns exactly the envelopes stored after the
cursor was issued. Cursors are local to one store file.

Threads. One ``sqlite3`` connection, opened with ``check_same_thread=False`` and guarded by a
lock: calls may come from the event loop or a worker thread, one at a time (they serialise).

A file that is not a qisd store (another program's SQLite file, or not SQLite at all) or is
corrupt raises :class:`StoreError`; it is never modified, replaced or deleted.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pyarrow as pa

from qisd.config import StoreLimits
from qisd.core.packet import (
    KIND_PACKET,
    MAX_ROWS,
    RESULT_SCHEMA,
    SCHEMA,
    Envelope,
    read_trusted,
)
from qisd.errors import StoreError

STORE_FILE = "store.sqlite3"
"""Name of the store inside the data directory."""
APPLICATION_ID = 0x51495344
"""``PRAGMA application_id`` of a qisd store ("QISD"): tells our file from any other SQLite file."""
SCHEMA_VERSION = 2
"""``PRAGMA user_version`` this code writes and reads (1 is migrated on open)."""
PAGE_SIZE = 1024
"""SQLite page size of a new store (an existing file keeps the size it was created with)."""
DEFAULT_CACHE_BYTES = 64 << 20
"""Arrow bytes of assembled per-key tables kept in memory (least recently used dropped first)."""

REFUSED_EXPIRED = "expired"
REFUSED_KEY_QUOTA = "key quota"
REFUSED_SIGNER_QUOTA = "signer quota"
REFUSED_STORE_FULL = "store full"

_SQLITE_MAGIC = b"SQLite format 3\x00"
_T = TypeVar("_T")

# Counters are kept by triggers in the same transaction as the row change, so they can never
# drift from the rows (a crash rolls both back); quotas and eviction read them in O(1).
# Every index costs each commit a page write (the WAL logs whole pages): an emit touches only
# the index of local rows, a network put only the eviction index of remote rows.
_PARTIAL_INDEXES = """
CREATE INDEX envelopes_source ON envelopes (source, timestamp_ms) WHERE local = 0;
CREATE INDEX envelopes_local ON envelopes (expires_ms) WHERE local = 1;
"""

_SCHEMA_SQL = """
CREATE TABLE envelopes (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    key BLOB NOT NULL,
    packet_id TEXT NOT NULL,
    kind INTEGER NOT NULL,
    signer BLOB NOT NULL,
    timestamp_ms INTEGER NOT NULL,
    expires_ms INTEGER NOT NULL,
    rows INTEGER NOT NULL,
    size INTEGER NOT NULL,
    local INTEGER NOT NULL,
    source TEXT NOT NULL,
    raw BLOB NOT NULL,
    UNIQUE (key, packet_id)
);
CREATE INDEX envelopes_key_seq ON envelopes (key, seq);
CREATE INDEX envelopes_expires ON envelopes (expires_ms);
CREATE INDEX envelopes_packet ON envelopes (packet_id);

{_PARTIAL_INDEXES}
CREATE TABLE key_usage (key BLOB PRIMARY KEY, packets INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE signer_key_usage (
    key BLOB NOT NULL, signer BLOB NOT NULL, packets INTEGER NOT NULL,
    PRIMARY KEY (key, signer)
) WITHOUT ROWID;
CREATE TABLE source_remote (source TEXT PRIMARY KEY, bytes INTEGER NOT NULL) WITHOUT ROWID;
CREATE INDEX source_remote_bytes ON source_remote (bytes);
CREATE TABLE totals (
    id INTEGER PRIMARY KEY CHECK (id = 0),
    packets INTEGER NOT NULL, bytes INTEGER NOT NULL,
    local_packets INTEGER NOT NULL, local_bytes INTEGER NOT NULL
);
INSERT INTO totals VALUES (0, 0, 0, 0, 0);
CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;

CREATE TRIGGER envelopes_ai AFTER INSERT ON envelopes BEGIN
    INSERT INTO key_usage VALUES (NEW.key, 1)
        ON CONFLICT (key) DO UPDATE SET packets = packets + 1;
    INSERT INTO signer_key_usage VALUES (NEW.key, NEW.signer, 1)
        ON CONFLICT (key, signer) DO UPDATE SET packets = packets + 1;
    INSERT INTO source_remote SELECT NEW.source, NEW.size WHERE NEW.local = 0
        ON CONFLICT (source) DO UPDATE SET bytes = bytes + excluded.bytes;
    UPDATE totals SET packets = packets + 1, bytes = bytes + NEW.size,
        local_packets = local_packets + NEW.local,
        local_bytes = local_bytes + NEW.local * NEW.size;
END;
CREATE TRIGGER envelopes_ad AFTER DELETE ON envelopes BEGIN
    UPDATE key_usage SET packets = packets - 1 WHERE key = OLD.key;
    DELETE FROM key_usage WHERE key = OLD.key AND packets <= 0;
    UPDATE signer_key_usage SET packets = packets - 1 WHERE key = OLD.key AND signer = OLD.signer;
    DELETE FROM signer_key_usage WHERE key = OLD.key AND signer = OLD.signer AND packets <= 0;
    UPDATE source_remote SET bytes = bytes - OLD.size WHERE OLD.local = 0 AND source = OLD.source;
    DELETE FROM source_remote WHERE source = OLD.source AND bytes <= 0;
    UPDATE totals SET packets = packets - 1, bytes = bytes - OLD.size,
        local_packets = local_packets - OLD.local,
        local_bytes = local_bytes - OLD.local * OLD.size;
END;
CREATE TRIGGER envelopes_au_local AFTER UPDATE OF local ON envelopes
WHEN OLD.local = 0 AND NEW.local = 1 BEGIN
    UPDATE source_remote SET bytes = bytes - OLD.size WHERE source = OLD.source;
    DELETE FROM source_remote WHERE source = OLD.source AND bytes <= 0;
    UPDATE totals SET local_packets = local_packets + 1, local_bytes = local_bytes + OLD.size;
END;
""".replace("{_PARTIAL_INDEXES}", _PARTIAL_INDEXES)

# Schema 1 -> 2: the unused signer index dropped, the local/remote indexes made partial.
_MIGRATE_1_TO_2 = f"""DROP INDEX envelopes_signer;
DROP INDEX envelopes_source;
DROP INDEX envelopes_local;
{_PARTIAL_INDEXES}
"""


@dataclass
class PutResult:
    """What :meth:`Store.put` did with each envelope, by packet id.

    ``refused`` reasons start with one of ``REFUSED_EXPIRED``, ``REFUSED_KEY_QUOTA``,
    ``REFUSED_SIGNER_QUOTA`` or ``REFUSED_STORE_FULL``, followed by details for a human.
    """

    accepted: list[str] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)
    refused: list[tuple[str, str]] = field(default_factory=list)
    evicted: int = 0
    """Remote envelopes deleted to make room under the global byte cap."""


def store_path(path_or_data_dir: str | os.PathLike[str]) -> Path:
    """The store file for a data directory, or the path itself if it is not a directory."""
    p = Path(path_or_data_dir)
    return p / STORE_FILE if p.is_dir() else p


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _check_header(path: Path) -> None:
    """Refuse, without opening it through SQLite, a file that is not a qisd store."""
    with open(path, "rb") as f:
        header = f.read(100)
    if len(header) < 100 or header[:16] != _SQLITE_MAGIC:
        raise StoreError(
            f"{path} is not a qisd store (not an SQLite database); it was left untouched: "
            "move it aside to start an empty store"
        )
    app_id = int.from_bytes(header[68:72], "big")
    if app_id != APPLICATION_ID:
        raise StoreError(
            f"{path} is an SQLite database of another program (application_id {app_id:#x}), "
            "not a qisd store; it was left untouched: point qisd at another data directory"
        )


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(
        path, isolation_level=None, check_same_thread=False, timeout=10.0, cached_statements=64
    )
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    # Keep the WAL file from staying huge after a burst of puts.
    conn.execute("PRAGMA journal_size_limit=67108864")
    # Checkpoint after ~4 MiB of WAL whatever the page size (SQLite counts pages, default 1000).
    page = conn.execute("PRAGMA page_size").fetchone()[0]
    conn.execute(f"PRAGMA wal_autocheckpoint={max(1000, (4 << 20) // page)}")
    return conn


def _create(path: Path) -> None:
    """Create an initialised store at ``path`` atomically (it appears complete or not at all)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    try:
        conn = sqlite3.connect(tmp, isolation_level=None)
        try:
            # Small pages: a commit writes every page it dirtied to the WAL (about a dozen for
            # one envelope), so 1 KiB pages quarter the bytes each emit writes and fsyncs.
            # Set before anything is written: the first write fixes the file's page size.
            conn.execute(f"PRAGMA page_size={PAGE_SIZE}")
            # application_id next, in rollback-journal mode, so it is in the main file's header.
            conn.execute(f"PRAGMA application_id={APPLICATION_ID}")
            conn.execute("PRAGMA journal_mode=WAL")
            conn.executescript(
                f"BEGIN;\n{_SCHEMA_SQL}\nPRAGMA user_version={SCHEMA_VERSION};\nCOMMIT;"
            )
        finally:
            conn.close()  # the last close checkpoints the WAL into the main file
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        # link, unlike rename, fails if another process created the store meanwhile.
        with contextlib.suppress(FileExistsError):
            os.link(tmp, path)
        _fsync_dir(path.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


class Store:
    """The node's envelopes in one SQLite file. Open with :meth:`Store.open`."""

    def __init__(
        self,
        conn: sqlite3.Connection,
        path: Path,
        limits: StoreLimits,
        ttl_ms: int,
        cache_bytes: int,
    ) -> None:
        self._conn = conn
        self.path = path
        self.limits = limits
        self.ttl_ms = ttl_ms
        self._lock = threading.RLock()
        self._cache: OrderedDict[bytes, tuple[pa.Table, int, int]] = OrderedDict()
        self._cache_bytes = cache_bytes
        self._cached_bytes = 0
        # Bumped whenever a key's rows change: a read that overlapped a change must not cache.
        self._generation: dict[bytes, int] = {}

    # ------------------------------------------------------------------ open / close

    @classmethod
    def open(
        cls,
        path_or_data_dir: str | os.PathLike[str],
        *,
        limits: StoreLimits,
        ttl_ms: int,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
    ) -> Store:
        """Open (creating if absent) the store in a data directory or at a file path.

        Raises :class:`StoreError` for a file that is not a qisd store, is corrupt, or was
        written by a newer qisd; such a file is left as it is.
        """
        if ttl_ms <= 0:
            raise StoreError(f"ttl_ms must be positive, not {ttl_ms}")
        path = store_path(path_or_data_dir)
        if not path.parent.is_dir():
            raise StoreError(f"{path.parent} does not exist (run qisd init)")
        try:
            wal = path.with_name(path.name + "-wal")
            if path.exists() and path.stat().st_size == 0 and not wal.exists():
                # Zero bytes and no WAL: nobody's data (we never create a store in place, so
                # this is a file someone touched); starting a store there loses nothing.
                path.unlink()
            if not path.exists():
                _create(path)
            _check_header(path)
            conn = _connect(path)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open the store {path}: {exc}") from None
        except OSError as exc:
            raise StoreError(f"cannot open the store {path}: {exc.strerror or exc}") from None
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"{path} was written by a newer qisd (store schema {version}, "
                    f"this one reads {SCHEMA_VERSION}); upgrade qisd"
                )
            if version < 1:
                raise StoreError(f"{path} is an incomplete qisd store (schema {version})")
            if version == 1:
                conn.executescript(
                    f"BEGIN IMMEDIATE;\n{_MIGRATE_1_TO_2}\nPRAGMA user_version=2;\nCOMMIT;"
                )
            # Touch every table we use: a damaged schema page fails here, not mid-put.
            for table in ("envelopes", "key_usage", "signer_key_usage", "source_remote", "meta"):
                conn.execute(f"SELECT 1 FROM {table} LIMIT 1").fetchall()
            if conn.execute("SELECT count(*) FROM totals").fetchone()[0] != 1:
                raise StoreError(f"{path} is a damaged qisd store (totals row missing)")
        except sqlite3.Error as exc:
            conn.close()
            raise StoreError(
                f"{path} is a damaged qisd store ({exc}); it was left untouched: "
                "move it aside to start an empty store"
            ) from None
        except StoreError:
            conn.close()
            raise
        return cls(conn, path, limits, ttl_ms, cache_bytes)

    def close(self) -> None:
        """Close the database (checkpointing the WAL). Further calls raise StoreError."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None  # type: ignore[assignment]
            self._cache.clear()
            self._cached_bytes = 0

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        """Run ``fn`` under the lock, turning SQLite failures into StoreError."""
        with self._lock:
            if self._conn is None:
                raise StoreError("the store is closed")
            try:
                return fn(self._conn)
            except sqlite3.Error as exc:
                if self._conn.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        self._conn.execute("ROLLBACK")
                raise StoreError(f"store {self.path}: {exc}") from None

    # ------------------------------------------------------------------ writes

    def put(
        self,
        envelopes: Sequence[Envelope],
        *,
        now_ms: int,
        local: bool = False,
        origin: str = "",
    ) -> PutResult:
        """Store verified envelopes in one transaction; returns after the COMMIT is durable.

        ``origin`` names the host that delivered remote envelopes (the DHT passes the
        sender's address): eviction under the byte cap takes from the heaviest *source*, the
        origin when known, else the signer, because keys are free to mint and hosts are not.

        Idempotent by ``(key, packet_id)``: a second put of the same envelope is a duplicate
        (a duplicate put with ``local=True`` marks the stored row local; a duplicate document
        has its expiry renewed, so a document lives as long as someone republishes it).
        """
        result = PutResult()
        if not envelopes:
            return result
        changed: set[bytes] = set()

        def tx(conn: sqlite3.Connection) -> None:
            conn.execute("BEGIN IMMEDIATE")
            floor = conn.execute("SELECT coalesce(max(seq), 0) FROM envelopes").fetchone()[0]
            purged_keys: set[bytes] = set()
            expired_purged = False
            for env in envelopes:
                pid = env.packet_id
                ts = env.timestamp_ms or now_ms
                expires = ts + self.ttl_ms
                row = conn.execute(
                    "SELECT seq, local, kind FROM envelopes WHERE key = ? AND packet_id = ?",
                    (env.key, pid),
                ).fetchone()
                if row is not None:
                    seq, was_local, kind = row
                    if local and not was_local:
                        conn.execute("UPDATE envelopes SET local = 1 WHERE seq = ?", (seq,))
                    if env.timestamp_ms == 0 and kind != KIND_PACKET:
                        conn.execute(
                            "UPDATE envelopes SET expires_ms = max(expires_ms, ?) WHERE seq = ?",
                            (expires, seq),
                        )
                    result.duplicates.append(pid)
                    continue
                if expires <= now_ms:
                    result.refused.append(
                        (pid, f"{REFUSED_EXPIRED}: timestamp {ts} + ttl is before now {now_ms}")
                    )
                    continue
                size = len(env.raw)
                if not local:
                    reason = self._quota_reason(conn, env, now_ms, purged_keys, changed)
                    if reason is not None:
                        result.refused.append((pid, reason))
                        continue
                total = conn.execute("SELECT bytes FROM totals").fetchone()[0]
                if total + size > self.limits.max_bytes:
                    if not expired_purged:
                        expired_purged = True
                        self._delete_expired(conn, now_ms, changed)
                        total = conn.execute("SELECT bytes FROM totals").fetchone()[0]
                    if total + size > self.limits.max_bytes:
                        result.evicted += self._evict(
                            conn, total + size - self.limits.max_bytes, floor, changed
                        )
                        total = conn.execute("SELECT bytes FROM totals").fetchone()[0]
                    if total + size > self.limits.max_bytes and not local:
                        result.refused.append(
                            (
                                pid,
                                f"{REFUSED_STORE_FULL}: {total} of {self.limits.max_bytes} "
                                "bytes held and no remote packet left to evict",
                            )
                        )
                        continue
                conn.execute(
                    "INSERT INTO envelopes (key, packet_id, kind, signer, timestamp_ms,"
                    " expires_ms, rows, size, local, source, raw)"
                    " VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                    (
                        env.key,
                        pid,
                        env.kind,
                        env.public_key,
                        ts,
                        expires,
                        env.rows,
                        size,
                        int(local),
                        f"host:{origin}" if origin else f"signer:{env.public_key.hex()}",
                        env.raw,
                    ),
                )
                changed.add(env.key)
                result.accepted.append(pid)
            conn.execute("COMMIT")

        try:
            self._run(tx)
        finally:
            # Even on failure: a rolled-back transaction may have been partly cached around.
            self._invalidate(changed)
        return result

    def _quota_reason(
        self,
        conn: sqlite3.Connection,
        env: Envelope,
        now_ms: int,
        purged_keys: set[bytes],
        changed: set[bytes],
    ) -> str | None:
        limits = self.limits
        for attempt in (0, 1):
            n_key = conn.execute(
                "SELECT packets FROM key_usage WHERE key = ?", (env.key,)
            ).fetchone()
            n_signer = conn.execute(
                "SELECT packets FROM signer_key_usage WHERE key = ? AND signer = ?",
                (env.key, env.public_key),
            ).fetchone()
            key_full = n_key is not None and n_key[0] >= limits.per_key
            signer_full = n_signer is not None and n_signer[0] >= limits.per_signer_per_key
            if not (key_full or signer_full):
                return None
            if attempt == 0 and env.key not in purged_keys:
                # Expired rows still count until expire() runs: purge this key's, then recheck.
                purged_keys.add(env.key)
                cur = conn.execute(
                    "DELETE FROM envelopes WHERE key = ? AND expires_ms <= ?", (env.key, now_ms)
                )
                if cur.rowcount:
                    changed.add(env.key)
                    continue
            if key_full:
                return f"{REFUSED_KEY_QUOTA}: {limits.per_key} packets already held under this key"
            return (
                f"{REFUSED_SIGNER_QUOTA}: this signer already holds "
                f"{limits.per_signer_per_key} packets under this key"
            )
        return None

    def _delete_expired(self, conn: sqlite3.Connection, now_ms: int, changed: set[bytes]) -> int:
        keys = conn.execute(
            "DELETE FROM envelopes WHERE expires_ms <= ? RETURNING key", (now_ms,)
        ).fetchall()
        changed.update(k for (k,) in keys)
        return len(keys)

    def _evict(self, conn: sqlite3.Connection, need: int, floor: int, changed: set[bytes]) -> int:
        """Delete remote rows (seq <= floor) until ``need`` bytes are freed; returns rows.

        The heaviest source (delivering host, else signer) goes first, oldest rows first."""
        evicted = 0
        exhausted: list[bytes] = []
        while need > 0:
            marks = ",".join("?" * len(exhausted))
            row = conn.execute(
                "SELECT source FROM source_remote"
                + (f" WHERE source NOT IN ({marks})" if exhausted else "")
                + " ORDER BY bytes DESC LIMIT 1",
                exhausted,
            ).fetchone()
            if row is None:
                break
            source = row[0]
            victims = conn.execute(
                "SELECT seq, key, size FROM envelopes WHERE source = ? AND local = 0"
                " AND seq <= ? ORDER BY timestamp_ms, seq LIMIT 64",
                (source, floor),
            ).fetchall()
            if not victims:
                exhausted.append(source)
                continue
            doomed = []
            for seq, key, size in victims:
                doomed.append((seq,))
                changed.add(key)
                need -= size
                if need <= 0:
                    break
            conn.executemany("DELETE FROM envelopes WHERE seq = ?", doomed)
            evicted += len(doomed)
        return evicted

    def expire(self, now_ms: int) -> int:
        """Delete every envelope whose expiry (timestamp + ttl) is at or before ``now_ms``.

        Works in bounded transactions so a large backlog does not hold the write lock long.
        Returns how many rows were deleted.
        """
        total = 0
        while True:
            changed: set[bytes] = set()

            def tx(conn: sqlite3.Connection, changed: set[bytes] = changed) -> int:
                conn.execute("BEGIN IMMEDIATE")
                keys = conn.execute(
                    "DELETE FROM envelopes WHERE seq IN (SELECT seq FROM envelopes"
                    " WHERE expires_ms <= ? LIMIT 5000) RETURNING key",
                    (now_ms,),
                ).fetchall()
                conn.execute("COMMIT")
                changed.update(k for (k,) in keys)
                return len(keys)

            n = self._run(tx)
            self._invalidate(changed)
            total += n
            if n < 5000:
                return total

    def set_meta(self, name: str, value: Any) -> None:
        """Store a small JSON-serialisable value under ``name`` (durable on return)."""
        text = json.dumps(value, separators=(",", ":"), allow_nan=False)

        def tx(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO meta VALUES (?, ?) ON CONFLICT (name) DO UPDATE SET value = ?",
                (name, text, text),
            )

        self._run(tx)

    def get_meta(self, name: str, default: Any = None) -> Any:
        """The value stored by :meth:`set_meta`, or ``default``."""
        row = self._run(
            lambda c: c.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()
        )
        return default if row is None else json.loads(row[0])

    # ------------------------------------------------------------------ reads

    def has(self, key: bytes, packet_id: str) -> bool:
        """True if the envelope ``packet_id`` is stored under ``key``."""
        row = self._run(
            lambda c: c.execute(
                "SELECT 1 FROM envelopes WHERE key = ? AND packet_id = ?", (key, packet_id)
            ).fetchone()
        )
        return row is not None

    def get(self, packet_id: str, key: bytes | None = None) -> bytes | None:
        """The raw envelope ``packet_id`` (under ``key`` if given, else its first stored)."""
        args: tuple[object, ...]
        if key is not None:
            sql = "SELECT raw FROM envelopes WHERE key = ? AND packet_id = ?"
            args = (key, packet_id)
        else:
            sql = "SELECT raw FROM envelopes WHERE packet_id = ? ORDER BY seq LIMIT 1"
            args = (packet_id,)
        row = self._run(lambda c: c.execute(sql, args).fetchone())
        return None if row is None else bytes(row[0])

    def index(self, key: bytes, *, now_ms: int) -> tuple[int, list[tuple[int, str]]]:
        """``(generation, [(timestamp_ms, packet_id), ...])`` of the unexpired envelopes under
        ``key``: what replica reconciliation summarises. The generation changes whenever the
        key's rows do, so a caller may keep the list until it does."""
        with self._lock:
            generation = self._generation.get(key, 0)
        rows = self._run(
            lambda c: c.execute(
                "SELECT timestamp_ms, packet_id FROM envelopes WHERE key = ? AND expires_ms > ?",
                (key, now_ms),
            ).fetchall()
        )
        return generation, [(int(ts), str(pid)) for ts, pid in rows]

    def generation(self, key: bytes) -> int:
        """A number that changes whenever the rows under ``key`` change."""
        with self._lock:
            return self._generation.get(key, 0)

    def page(
        self, key: bytes, *, since: int = 0, max_bytes: int, now_ms: int
    ) -> tuple[list[bytes], int, bool]:
        """Unexpired raw envelopes under ``key`` stored after cursor ``since``, in seq order.

        Returns ``(envelopes, next_cursor, more)``: their total size is at most ``max_bytes``
        except that one envelope is always returned if any is pending; ``next_cursor`` is the
        seq of the last one returned (``since`` if none); ``more`` says whether others remain.
        """

        def read(conn: sqlite3.Connection) -> tuple[list[bytes], int, bool]:
            out: list[bytes] = []
            used = 0
            cursor = since
            cur = conn.execute(
                "SELECT seq, size, raw FROM envelopes WHERE key = ? AND seq > ?"
                " AND expires_ms > ? ORDER BY seq",
                (key, since, now_ms),
            )
            try:
                for seq, size, raw in cur:
                    if out and used + size > max_bytes:
                        return out, cursor, True
                    out.append(bytes(raw))
                    used += size
                    cursor = seq
                return out, cursor, False
            finally:
                cur.close()

        return self._run(read)

    def _rows_after(
        self, key: bytes, since: int, now_ms: int, limit: int
    ) -> list[tuple[int, str, bytes, int]]:
        return self._run(
            lambda c: c.execute(
                "SELECT seq, packet_id, raw, expires_ms FROM envelopes WHERE key = ? AND seq > ?"
                " AND expires_ms > ? AND kind = ? ORDER BY seq LIMIT ?",
                (key, since, now_ms, KIND_PACKET, limit),
            ).fetchall()
        )

    @staticmethod
    def _assemble(rows: Iterable[tuple[int, str, bytes, int]]) -> pa.Table:
        """One-chunk ``RESULT_SCHEMA`` table of the packet rows of stored envelopes.

        Rows come from :func:`read_trusted` (verified before they were stored). The provenance
        columns are what :func:`with_provenance` adds, built for all envelopes at once: per
        envelope they cost more than decoding the rows.
        """
        batches: list[pa.RecordBatch] = []
        pids: list[str] = []
        signers: list[str] = []
        owner: list[int] = []
        for _seq, pid, raw, _exp in rows:
            env, batch = read_trusted(bytes(raw))
            if batch is None:
                continue
            owner.extend([len(pids)] * batch.num_rows)
            batches.append(batch)
            pids.append(pid)
            signers.append(env.public_key.hex())
        if not batches:
            return RESULT_SCHEMA.empty_table()
        base = pa.Table.from_batches(batches, schema=SCHEMA).combine_chunks()
        take = pa.array(owner, pa.int32())
        return pa.Table.from_arrays(
            [
                *base.columns,
                pa.array(pids, pa.string()).take(take),
                pa.array(signers, pa.string()).take(take),
            ],
            schema=RESULT_SCHEMA,
        )

    def table(self, key: bytes, *, now_ms: int) -> pa.Table:
        """Unexpired packet rows under ``key`` as one table (``RESULT_SCHEMA``), in seq order.

        Assembled from the stored IPC bytes and cached per key until the key changes or its
        first row expires, so repeated reads (Flight DoGet) do not decode again.
        """
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                table, built_at, valid_until = hit
                if built_at <= now_ms < valid_until:
                    self._cache.move_to_end(key)
                    return table
                self._drop(key)
            parts: list[pa.Table] = []
            valid_until = 2**63 - 1
            since = 0
            while True:
                rows = self._rows_after(key, since, now_ms, 4096)
                if not rows:
                    break
                parts.append(self._assemble(rows))
                valid_until = min(valid_until, min(r[3] for r in rows))
                since = rows[-1][0]
            table = pa.concat_tables(parts) if parts else RESULT_SCHEMA.empty_table()
            return self._remember(key, table, now_ms, valid_until)

    def batches(
        self, key: bytes, *, now_ms: int, max_rows: int = 65_536
    ) -> Iterator[pa.RecordBatch]:
        """The rows of :meth:`table` as record batches of at most ``max_rows`` rows each.

        Reads the store in chunks, so a huge key streams without one giant table in memory.
        A cached table is sliced instead, and a key read to the end whose table fits the cache
        is cached, so the next read (Flight DoGet) does not decode again. Rows stored while
        iterating may or may not appear.
        """
        if max_rows < 1:
            raise StoreError("max_rows must be at least 1")
        with self._lock:
            hit = self._cache.get(key)
            cached = hit[0] if hit is not None and hit[1] <= now_ms < hit[2] else None
        if cached is not None:
            yield from cached.to_batches(max_chunksize=max_rows)
            return
        with self._lock:
            generation = self._generation.get(key, 0)
        kept: list[pa.Table] | None = []
        kept_bytes = 0
        valid_until = 2**63 - 1
        pending: pa.Table | None = None
        since = 0
        while True:
            # An envelope holds 1..MAX_ROWS rows: read few enough envelopes that one step can
            # never hold more than max_rows rows (one envelope at the least).
            rows = self._rows_after(key, since, now_ms, min(4096, max(1, max_rows // MAX_ROWS)))
            if not rows:
                break
            since = rows[-1][0]
            part = self._assemble(rows)
            valid_until = min(valid_until, min(r[3] for r in rows))
            if kept is not None:
                kept_bytes += part.nbytes
                if kept_bytes <= self._cache_bytes:
                    kept.append(part)
                else:
                    kept = None  # too big to cache: stream without holding on to it
            pending = part if pending is None else pa.concat_tables([pending, part])
            if pending.num_rows >= max_rows:
                chunks = pending.combine_chunks().to_batches(max_chunksize=max_rows)
                full = [c for c in chunks if c.num_rows == max_rows]
                yield from full
                rest = chunks[len(full) :]
                pending = pa.Table.from_batches(rest, schema=RESULT_SCHEMA) if rest else None
        if kept is not None:
            with self._lock:
                if self._generation.get(key, 0) == generation and key not in self._cache:
                    table = pa.concat_tables(kept) if kept else RESULT_SCHEMA.empty_table()
                    self._remember(key, table, now_ms, valid_until)
        if pending is not None and pending.num_rows:
            yield from pending.combine_chunks().to_batches(max_chunksize=max_rows)

    def own_envelopes(self, *, now_ms: int) -> list[Envelope]:
        """Unexpired envelopes this node emitted (``local=True``), in seq order: to republish."""
        rows = self._run(
            lambda c: c.execute(
                "SELECT raw FROM envelopes WHERE local = 1 AND expires_ms > ? ORDER BY seq",
                (now_ms,),
            ).fetchall()
        )
        return [read_trusted(bytes(raw))[0] for (raw,) in rows]

    def keys(self) -> list[tuple[bytes, int]]:
        """Every key held, with its number of stored envelopes (expired ones until expire())."""
        return self._run(
            lambda c: [
                (bytes(k), n)
                for k, n in c.execute("SELECT key, packets FROM key_usage ORDER BY key")
            ]
        )

    def stats(self) -> dict[str, int]:
        """Counts: keys, packets, bytes, local_packets, local_bytes and file_bytes (on disk)."""

        def read(conn: sqlite3.Connection) -> dict[str, int]:
            packets, nbytes, lp, lb = conn.execute(
                "SELECT packets, bytes, local_packets, local_bytes FROM totals"
            ).fetchone()
            nkeys = conn.execute("SELECT count(*) FROM key_usage").fetchone()[0]
            return {
                "keys": nkeys,
                "packets": packets,
                "bytes": nbytes,
                "local_packets": lp,
                "local_bytes": lb,
            }

        out = self._run(read)
        out["file_bytes"] = sum(
            p.stat().st_size
            for p in (self.path, self.path.with_name(self.path.name + "-wal"))
            if p.exists()
        )
        return out

    def integrity_check(self) -> bool:
        """True if SQLite's integrity check passes and every counter matches the rows."""

        def check(conn: sqlite3.Connection) -> bool:
            if conn.execute("PRAGMA integrity_check").fetchall() != [("ok",)]:
                return False
            expect = conn.execute(
                "SELECT count(*), coalesce(sum(size), 0), coalesce(sum(local), 0),"
                " coalesce(sum(local * size), 0) FROM envelopes"
            ).fetchone()
            if (
                conn.execute(
                    "SELECT packets, bytes, local_packets, local_bytes FROM totals"
                ).fetchone()
                != expect
            ):
                return False
            mismatches = conn.execute(
                """
                SELECT count(*) FROM (
                    SELECT key, count(*) AS n FROM envelopes GROUP BY key
                    EXCEPT SELECT key, packets FROM key_usage
                ) UNION ALL SELECT count(*) FROM (
                    SELECT key, packets FROM key_usage
                    EXCEPT SELECT key, count(*) FROM envelopes GROUP BY key
                ) UNION ALL SELECT count(*) FROM (
                    SELECT key, signer, count(*) FROM envelopes GROUP BY key, signer
                    EXCEPT SELECT key, signer, packets FROM signer_key_usage
                ) UNION ALL SELECT count(*) FROM (
                    SELECT source, sum(size) FROM envelopes WHERE local = 0 GROUP BY source
                    EXCEPT SELECT source, bytes FROM source_remote
                )
                """
            ).fetchall()
            return all(n == 0 for (n,) in mismatches)

        return self._run(check)

    # ------------------------------------------------------------------ cache

    def _drop(self, key: bytes) -> None:
        hit = self._cache.pop(key, None)
        if hit is not None:
            self._cached_bytes -= hit[0].nbytes

    def _remember(self, key: bytes, table: pa.Table, built_at: int, valid_until: int) -> pa.Table:
        """Cache ``table`` for ``key`` if it fits, dropping the least recently used.

        Returns the table as cached: in one chunk, so every later slice into batches of N rows
        gives full batches but the last.
        """
        if table.nbytes > self._cache_bytes:
            return table
        table = table.combine_chunks()
        self._drop(key)
        self._cache[key] = (table, built_at, valid_until)
        self._cached_bytes += table.nbytes
        while self._cached_bytes > self._cache_bytes:
            self._drop(next(iter(self._cache)))
        return table

    def _invalidate(self, keys: Iterable[bytes]) -> None:
        with self._lock:
            for key in keys:
                self._generation[key] = self._generation.get(key, 0) + 1
                self._drop(key)
