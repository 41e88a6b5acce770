"""The columnar view of each key: its packet rows as Arrow IPC, memory-mapped for reads.

The signed envelopes in SQLite (:mod:`qisd.net.store`) are the source of truth; this is a copy
of their rows kept in the shape reads want, so a read streams mapped record batches instead of
decoding envelopes. :class:`~qisd.net.store.Store` keeps it behind its own API: every path
that stores or deletes envelopes maintains it without knowing it exists.

Layout. ``<data_dir>/view/<key hex>.arrows`` per key: an Arrow IPC *stream* (schema message,
then record batches, no end marker, so it is appended to in place and any Arrow reader opens it
with ``pyarrow.ipc.open_stream``). Its schema is ``RESULT_SCHEMA`` plus two columns readers
never see: ``_seq`` (the envelope's seq in the store) and ``_expires_ms``. Rows are in seq
order, strictly increasing from one envelope to the next.

Invariants (the store holds its lock around every call here):

1. Rows are added only after the COMMIT that stored their envelopes, so the view never shows a
   row whose envelope is not committed.
2. New rows go first to an in-memory *tail* per key; once it holds ``SEGMENT_ROWS`` rows it is
   written to the file as one batch (a *segment*) and fsynced, so files hold large batches
   whatever the size of the puts. The tails together hold at most ``TAIL_BUDGET_ROWS`` rows.
3. A deleted envelope (expiry, eviction, a quota's purge) is hidden at once (its seq is *dead*)
   and removed from the file by compaction once a quarter of the file is dead (or
   ``MAX_DEAD`` envelopes are): a new file written beside it and renamed over it, never a
   rewrite in place, so a reader mapping the old file keeps reading it unchanged.
4. So the file is, at any moment, the rows of a set of envelopes that were committed, in seq
   order, missing at most the newest (the tail) and holding at most some deleted ones.

After a crash (the tails are lost; a compaction may not have happened) the view is *repaired*
at open, not rebuilt: a file whose last message is torn is cut back to its last whole batch;
for each key, the view's packet count and highest seq are compared with the store's (one
index-only query), and only a key that differs is fixed: rows of deleted envelopes compacted
out, envelopes newer than the file's last row decoded from SQLite and appended. A file that
cannot be read at all, or one that holds a row the store has in a different order, is rebuilt
from its key's envelopes. A key whose envelopes are all gone loses its file.

Reads take a snapshot (the segment list, the tail, the dead seqs) under the store's lock and
stream it without the lock. Each snapshot maps the file once (the mapping keeps the inode alive
across a compaction's rename) and tells the kernel, after each segment, that its pages are not
needed (``MADV_DONTNEED``): they stay in the page cache for the next reader but leave this
process's resident set, so streaming a key of any size holds about one segment in memory.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import mmap
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from qisd.core.packet import RESULT_SCHEMA

log = logging.getLogger(__name__)

VIEW_DIR = "view"
"""Directory of the view files inside the data directory."""
SEGMENT_ROWS = 16_384
"""Rows a key's tail gathers before it is written to the key's file as one batch."""
TAIL_BUDGET_ROWS = 262_144
"""Rows all tails may hold in memory together; past it the largest tails are written out."""
MAX_DEAD = 65_536
"""Deleted envelopes a view may hide before its file is compacted whatever its size."""
SEQ = "_seq"
EXPIRES = "_expires_ms"
VIEW_SCHEMA = RESULT_SCHEMA.append(pa.field(SEQ, pa.int64())).append(pa.field(EXPIRES, pa.int64()))
"""What a view file holds: ``RESULT_SCHEMA`` and, hidden from readers, seq and expiry."""
_VISIBLE = len(RESULT_SCHEMA)
_SUFFIX = ".arrows"
_PAGE = mmap.PAGESIZE


class Rows(Protocol):
    """What the view needs of an envelope: its row count, and its rows (an :class:`Envelope`
    decodes them when asked; :class:`Decoded` has them already)."""

    @property
    def rows(self) -> int: ...

    def batch(self) -> pa.RecordBatch: ...


@dataclass(frozen=True)
class Decoded:
    """Rows decoded already (an envelope read back from the store)."""

    rows: int
    data: pa.RecordBatch

    def batch(self) -> pa.RecordBatch:
        return self.data


Pending = tuple[int, str, bytes, int, Rows]
"""A committed packet envelope of a key: ``(seq, packet_id, public_key, expires_ms, rows)``."""
Decode = Callable[[bytes, int], list[Pending]]
"""What the store gives the view to read envelopes: ``(key, after_seq)`` -> the key's packet
envelopes with seq > after_seq, in seq order (a bounded step; empty at the end)."""


def result_rows(data: pa.RecordBatch) -> pa.RecordBatch:
    """The ``RESULT_SCHEMA`` columns of a view batch (no copy)."""
    return pa.RecordBatch.from_arrays(data.columns[:_VISIBLE], schema=RESULT_SCHEMA)


def view_rows(items: Iterable[tuple[int, str, bytes, int, pa.RecordBatch]]) -> pa.RecordBatch:
    """One ``VIEW_SCHEMA`` batch of the rows of ``(seq, packet_id, public_key, expires_ms,
    rows)`` envelopes, given in seq order. Provenance columns are built for all at once (per
    envelope they would cost more than the rows)."""
    batches: list[pa.RecordBatch] = []
    counts: list[int] = []
    seqs: list[int] = []
    pids: list[str] = []
    signers: list[str] = []
    expires: list[int] = []
    for seq, pid, public_key, exp, batch in items:
        batches.append(batch)
        counts.append(batch.num_rows)
        seqs.append(seq)
        pids.append(pid)
        signers.append(public_key.hex())
        expires.append(exp)
    if not batches:
        return _empty()
    base = batches[0] if len(batches) == 1 else pa.concat_batches(batches)
    repeat = np.asarray(counts, np.int64)
    if len(batches) == 1:
        n = counts[0]
        extra = [
            pa.array([pids[0]] * n, pa.string()),
            pa.array([signers[0]] * n, pa.string()),
            pa.array(np.full(n, seqs[0], np.int64)),
            pa.array(np.full(n, expires[0], np.int64)),
        ]
    else:
        take = pa.array(np.repeat(np.arange(len(counts), dtype=np.int32), repeat))
        extra = [
            pa.array(pids, pa.string()).take(take),
            pa.array(signers, pa.string()).take(take),
            pa.array(np.repeat(np.asarray(seqs, np.int64), repeat)),
            pa.array(np.repeat(np.asarray(expires, np.int64), repeat)),
        ]
    return pa.RecordBatch.from_arrays([*base.columns, *extra], schema=VIEW_SCHEMA)


def _empty() -> pa.RecordBatch:
    return pa.RecordBatch.from_pylist([], schema=VIEW_SCHEMA)


def _packets_in(batch: pa.RecordBatch) -> int:
    """Distinct envelopes among a batch's rows (rows are grouped by seq)."""
    if batch.num_rows == 0:
        return 0
    return int(pc.count_distinct(batch.column(SEQ)).as_py())


@dataclass(frozen=True)
class _Segment:
    """One record batch of a view file: where it lies, and what the reads need to know."""

    offset: int
    length: int
    rows: int
    packets: int
    first_seq: int
    last_seq: int
    min_expires: int

    @classmethod
    def of(cls, data: pa.RecordBatch, offset: int, length: int) -> _Segment:
        """The segment a ``VIEW_SCHEMA`` batch makes at ``offset`` (``length`` bytes)."""
        seqs = data.column(SEQ)
        return cls(
            offset,
            length,
            data.num_rows,
            _packets_in(data),
            int(pc.min(seqs).as_py()),
            int(pc.max(seqs).as_py()),
            int(pc.min(data.column(EXPIRES)).as_py()),
        )


@dataclass
class _KeyView:
    path: Path
    segments: list[_Segment] = field(default_factory=list)
    end: int = 0
    """Bytes of the file that hold whole messages (the schema and every segment)."""
    tail: list[pa.RecordBatch] = field(default_factory=list)
    """Rows not yet in the file, as batches (at most one once :meth:`joined_tail` ran)."""
    pending: list[Pending] = field(default_factory=list)
    """Committed envelopes not yet turned into rows: a put only queues them (decoding and
    building the provenance columns wait for the next read or write-out, done for all)."""
    tail_rows: int = 0
    tail_packets: int = 0
    dead: set[int] = field(default_factory=set)
    """Seqs of deleted envelopes whose rows are still in the file."""

    @property
    def last_seq(self) -> int:
        if self.pending:
            return self.pending[-1][0]
        if self.tail:
            return int(self.tail[-1].column(SEQ)[-1].as_py())
        return self.segments[-1].last_seq if self.segments else 0

    def packets(self) -> int:
        return sum(s.packets for s in self.segments) - len(self.dead) + self.tail_packets

    def joined_tail(self) -> pa.RecordBatch | None:
        """The tail as one batch (the queued envelopes decoded now, all at once)."""
        if self.pending:
            self.tail.append(
                view_rows(
                    (seq, pid, pub, exp, env.batch()) for seq, pid, pub, exp, env in self.pending
                )
            )
            self.pending = []
        if not self.tail:
            return None
        if len(self.tail) > 1:
            self.tail = [pa.concat_batches(self.tail)]
        return self.tail[0]


class Snapshot:
    """A key's rows as of one moment: iterate :meth:`batches` without holding any lock."""

    def __init__(
        self,
        path: Path,
        segments: list[_Segment],
        end: int,
        tail: pa.RecordBatch | None,
        dead: frozenset[int],
        packets: int = 0,
    ) -> None:
        self._path = path
        self._segments = segments
        self._end = end
        # Opened now, under the store's lock: the file read later is this one even if a
        # compaction renames another over its name meanwhile.
        self._file = open(path, "rb") if segments else None  # noqa: SIM115
        self._tail = tail
        self._dead = dead
        self.packets = packets
        """Envelopes whose rows the snapshot holds, expired ones included."""
        self.min_expires = min(
            [s.min_expires for s in segments]
            + ([int(pc.min(tail.column(EXPIRES)).as_py())] if tail is not None else []),
            default=2**63 - 1,
        )
        """The earliest expiry of its rows: before it, every row is visible."""

    def batches(
        self, *, now_ms: int, max_rows: int, wanted: Mapping[str, str] | None = None
    ) -> Iterator[pa.RecordBatch]:
        """``RESULT_SCHEMA`` batches of at most ``max_rows`` rows: unexpired, not deleted, and
        (``wanted``) equal to each wanted field's value."""
        dead = pa.array(sorted(self._dead), pa.int64()) if self._dead else None
        if self._segments:
            yield from self._mapped(now_ms, max_rows, wanted, dead)
        if self._tail is not None:
            yield from _sliced(_visible(self._tail, now_ms, True, wanted, dead), max_rows)

    def _mapped(
        self,
        now_ms: int,
        max_rows: int,
        wanted: Mapping[str, str] | None,
        dead: pa.Array | None,
    ) -> Iterator[pa.RecordBatch]:
        for seg, data in self.segment_batches():
            expiring = seg.min_expires <= now_ms
            touched = dead is not None and _overlaps(dead, seg.first_seq, seg.last_seq)
            yield from _sliced(_visible(data, now_ms, expiring or touched, wanted, dead), max_rows)

    def segment_batches(self) -> Iterator[tuple[_Segment, pa.RecordBatch]]:
        """Each segment of the file as a mapped ``VIEW_SCHEMA`` batch (no copy), in order."""
        if self._file is None:
            return
        with self._file:
            mapped = mmap.mmap(self._file.fileno(), self._end, prot=mmap.PROT_READ)
        self._file = None
        buffer = pa.py_buffer(mapped)
        for seg in self._segments:
            message = pa.ipc.read_message(buffer.slice(seg.offset, seg.length))
            data = pa.ipc.read_record_batch(message, VIEW_SCHEMA)
            del message
            yield seg, data
            del data
            # Pages read are dropped from this process (they stay cached for other readers):
            # safe because a view file's bytes never change once written.
            start = seg.offset - seg.offset % _PAGE
            with contextlib.suppress(OSError, ValueError):
                mapped.madvise(mmap.MADV_DONTNEED, start, seg.offset + seg.length - start)


def _overlaps(dead: pa.Array, first: int, last: int) -> bool:
    mask = pc.and_(pc.greater_equal(dead, first), pc.less_equal(dead, last))
    return bool(pc.any(mask).as_py())


def _visible(
    data: pa.RecordBatch,
    now_ms: int,
    check_rows: bool,
    wanted: Mapping[str, str] | None,
    dead: pa.Array | None,
) -> pa.RecordBatch:
    mask = None
    if check_rows:
        mask = pc.greater(data.column(EXPIRES), pa.scalar(now_ms, pa.int64()))
        if dead is not None:
            mask = pc.and_(mask, pc.invert(pc.is_in(data.column(SEQ), value_set=dead)))
    for name, value in (wanted or {}).items():
        equal = pc.equal(data.column(name), pa.scalar(value, pa.string()))
        mask = equal if mask is None else pc.and_(mask, equal)
    rows = result_rows(data)
    if mask is None:
        return rows
    if pc.all(mask).as_py():
        return rows
    return rows.filter(mask)


def _sliced(data: pa.RecordBatch, max_rows: int) -> Iterator[pa.RecordBatch]:
    for offset in range(0, data.num_rows, max_rows):
        yield data.slice(offset, max_rows)


def _owner_only(path: Path, *, truncate: bool) -> BinaryIO:
    """``path`` opened for writing, created readable by the owner alone (as every file of the
    data directory is), emptied if ``truncate``."""
    flags = os.O_RDWR | os.O_CREAT | (os.O_TRUNC if truncate else 0)
    return os.fdopen(os.open(path, flags, 0o600), "r+b")


def _scan_file(path: Path) -> tuple[list[_Segment], int, bool]:
    """The whole segments of a view file, where they end, and whether the file was sound
    (False: unreadable from the start). Stops at the first torn or foreign message."""
    size = path.stat().st_size
    if size == 0:
        return [], 0, False
    segments: list[_Segment] = []
    with open(path, "rb") as f:
        # Not closed by hand: Arrow buffers may still point into it; dropped with them.
        mapped = mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ)
    buffer = pa.py_buffer(mapped)
    reader = pa.BufferReader(buffer)
    try:
        schema = pa.ipc.read_schema(pa.ipc.read_message(reader))
    except (pa.ArrowException, EOFError, OSError):
        return [], 0, False
    if not schema.equals(VIEW_SCHEMA):
        return [], 0, False
    end = reader.tell()
    last = 0
    while end < size:
        try:
            message = pa.ipc.read_message(reader)
            data = pa.ipc.read_record_batch(message, VIEW_SCHEMA)
            data.validate()
            if data.num_rows == 0:
                raise ValueError("an empty batch")
            segment = _Segment.of(data, end, reader.tell() - end)
            if segment.first_seq <= last:
                raise ValueError("rows out of seq order")
            segments.append(segment)
            del data, message
        except (pa.ArrowException, EOFError, OSError, ValueError):
            log.warning("view %s: cut back to %d bytes (a torn last batch)", path.name, end)
            break
        last = segments[-1].last_seq
        end = reader.tell()
    del buffer, reader
    return segments, end, True


def _seqs_of(path: Path, segments: list[_Segment], end: int) -> np.ndarray:
    """Every row's seq in a view file, in order (one int64 column read)."""
    if not segments:
        return np.empty(0, np.int64)
    with open(path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), end, prot=mmap.PROT_READ)
    buffer = pa.py_buffer(mapped)
    parts = []
    for seg in segments:
        message = pa.ipc.read_message(buffer.slice(seg.offset, seg.length))
        data = pa.ipc.read_record_batch(message, VIEW_SCHEMA)
        parts.append(data.column(SEQ).to_numpy().copy())
        del data, message
    del buffer
    return np.concatenate(parts)


class ViewSet:
    """The views of every key of one store. Made by :meth:`open`; the store serialises calls."""

    def __init__(self, directory: Path, lock_fd: int) -> None:
        self.directory = directory
        self._lock_fd = lock_fd
        self._views: dict[bytes, _KeyView] = {}
        self._tail_rows = 0
        self.repaired: dict[str, int] = {"cut": 0, "compacted": 0, "appended": 0, "rebuilt": 0}
        """What the last :meth:`sync` fixed (keys per kind of repair), for tests and logs."""

    @classmethod
    def open(cls, directory: Path) -> ViewSet | None:
        """The views in ``directory`` (created if absent), or None if another open store owns
        them (that store keeps them; the caller reads from SQLite)."""
        directory.mkdir(mode=0o700, exist_ok=True)
        fd = os.open(directory / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        views = cls(directory, fd)
        for leftover in directory.glob("*.tmp"):
            leftover.unlink()
        return views

    def close(self) -> None:
        """Write every tail to its file, then let another store own the views."""
        for key in list(self._views):
            self._flush(key)
        self._views.clear()
        with contextlib.suppress(OSError):
            os.close(self._lock_fd)

    def _path(self, key: bytes) -> Path:
        return self.directory / (key.hex() + _SUFFIX)

    # ------------------------------------------------------------------ sync with the store

    def sync(
        self,
        held: Mapping[bytes, tuple[int, int]],
        seqs: Callable[[bytes], list[int]],
        decode: Decode,
    ) -> None:
        """Make every view equal to the store's packets: ``held`` maps each packet key to the
        store's ``(envelopes, highest seq)``; ``seqs(key)`` lists a key's envelope seqs;
        ``decode`` reads envelopes. Loads the files not loaded yet (cutting torn tails)."""
        self.repaired = dict.fromkeys(self.repaired, 0)
        on_disk = {
            bytes.fromhex(p.name[: -len(_SUFFIX)]): p
            for p in self.directory.glob("*" + _SUFFIX)
            if len(p.name) == 40 + len(_SUFFIX)
        }
        for key, path in on_disk.items():
            if key not in self._views:
                self._load(key, path)
        for key in list(self._views):
            if key not in held:
                self._drop(key)
        for key, (count, top) in held.items():
            view = self._views.get(key)
            if view is None:
                view = self._views[key] = _KeyView(self._path(key))
            if view.packets() == count and view.last_seq == top:
                continue
            self._repair(key, view, seqs(key), decode)

    def _load(self, key: bytes, path: Path) -> None:
        segments, end, sound = _scan_file(path)
        if not sound:
            path.unlink()
            return
        if end < path.stat().st_size:
            with open(path, "r+b") as f:
                f.truncate(end)
                os.fsync(f.fileno())
            self.repaired["cut"] += 1
        self._views[key] = _KeyView(path, segments, end)

    def _drop(self, key: bytes) -> None:
        view = self._views.pop(key)
        self._tail_rows -= view.tail_rows
        with contextlib.suppress(FileNotFoundError):
            view.path.unlink()

    def _repair(self, key: bytes, view: _KeyView, stored: list[int], decode: Decode) -> None:
        in_file = _seqs_of(view.path, view.segments, view.end)
        tail = view.joined_tail()
        if tail is not None:
            in_file = np.concatenate([in_file, tail.column(SEQ).to_numpy()])
        held = np.unique(in_file)
        wanted = np.asarray(stored, np.int64)
        extra = np.setdiff1d(held, wanted, assume_unique=True)
        kept = np.setdiff1d(held, extra, assume_unique=True)
        newest = int(kept[-1]) if kept.size else 0
        missing = np.setdiff1d(wanted, kept, assume_unique=True)
        if missing.size and int(missing[0]) < newest:
            # A row the store holds earlier than the view's last: only a rebuild restores order.
            self._drop(key)
            self.repaired["rebuilt"] += 1
            newest, extra = 0, np.empty(0, np.int64)
        if extra.size:
            self.delete(key, (int(s) for s in extra))
            if key in self._views:
                self._compact(key)
            self.repaired["compacted"] += 1
        if missing.size:
            self.repaired["appended"] += 1
            self._flush(key)
            while True:
                rows = decode(key, newest)
                if not rows:
                    break
                self.append(key, rows)
                self._flush(key)
                newest = rows[-1][0]

    # ------------------------------------------------------------------ changes

    def append(self, key: bytes, items: list[Pending]) -> None:
        """Add committed packet envelopes of ``key`` (seqs above every row its view holds, in
        order). Only queued: their rows are built on the next read or write-out."""
        if not items:
            return
        view = self._views.get(key)
        if view is None:
            view = self._views[key] = _KeyView(self._path(key))
        rows = sum(env.rows for *_, env in items)
        view.pending.extend(items)
        view.tail_rows += rows
        view.tail_packets += len(items)
        self._tail_rows += rows
        if view.tail_rows >= SEGMENT_ROWS:
            self._flush(key)
        while self._tail_rows > TAIL_BUDGET_ROWS:
            self._flush(max(self._views, key=lambda k: self._views[k].tail_rows))

    def delete(self, key: bytes, seqs: Iterable[int]) -> None:
        """Hide the rows of deleted envelopes (committed deletes); compact when worth it."""
        view = self._views.get(key)
        if view is None:
            return
        gone = set(seqs)
        tail = view.joined_tail()
        if tail is not None:
            column = tail.column(SEQ)
            hit = pc.is_in(column, value_set=pa.array(sorted(gone), pa.int64()))
            if pc.any(hit).as_py():
                kept = tail.filter(pc.invert(hit))
                self._tail_rows -= view.tail_rows - kept.num_rows
                view.tail = [kept] if kept.num_rows else []
                view.tail_rows = kept.num_rows
                view.tail_packets = _packets_in(kept)
        for seg in view.segments:
            for seq in gone:
                if seg.first_seq <= seq <= seg.last_seq and seq not in view.dead:
                    view.dead.add(seq)
        if view.packets() <= 0 and not view.tail:
            self._drop(key)
            return
        # Rewriting costs the whole file: wait until a quarter of it is dead (reads skip the
        # dead rows meanwhile), or the dead seqs would grow past a bound.
        in_file = sum(seg.packets for seg in view.segments)
        if len(view.dead) * 4 >= max(1, in_file) or len(view.dead) >= MAX_DEAD:
            self._compact(key)

    # ------------------------------------------------------------------ files

    def _flush(self, key: bytes) -> None:
        """Write the key's tail to its file as one segment (fsynced)."""
        view = self._views.get(key)
        data = None if view is None else view.joined_tail()
        if view is None or data is None:
            return
        fresh = not view.path.exists() or view.end == 0
        with _owner_only(view.path, truncate=fresh) as f:
            if fresh:
                f.write(VIEW_SCHEMA.serialize())
                view.end = f.tell()
                view.segments = []
            f.seek(view.end)
            f.truncate()
            f.write(data.serialize())
            f.flush()
            os.fsync(f.fileno())
            end = f.tell()
        view.segments.append(_Segment.of(data, view.end, end - view.end))
        view.end = end
        self._tail_rows -= view.tail_rows
        view.tail, view.tail_rows, view.tail_packets = [], 0, 0

    def _compact(self, key: bytes) -> None:
        """Rewrite the key's file without the rows of deleted envelopes (new file, renamed)."""
        view = self._views[key]
        if not view.dead:
            return
        dead = pa.array(sorted(view.dead), pa.int64())
        tmp = view.path.with_name(view.path.name + ".tmp")
        snapshot = Snapshot(view.path, list(view.segments), view.end, None, frozenset())
        segments: list[_Segment] = []
        pending: list[pa.RecordBatch] = []
        pending_rows = 0
        with _owner_only(tmp, truncate=True) as f:
            f.write(VIEW_SCHEMA.serialize())

            def write() -> None:
                data = pending[0] if len(pending) == 1 else pa.concat_batches(pending)
                start = f.tell()
                f.write(data.serialize())
                segments.append(_Segment.of(data, start, f.tell() - start))

            for _seg, data in snapshot.segment_batches():
                kept = data.filter(pc.invert(pc.is_in(data.column(SEQ), value_set=dead)))
                if kept.num_rows == 0:
                    continue
                pending.append(kept)
                pending_rows += kept.num_rows
                if pending_rows >= SEGMENT_ROWS:
                    write()
                    pending, pending_rows = [], 0
            if pending:
                write()
            f.flush()
            os.fsync(f.fileno())
            end = f.tell()
        os.replace(tmp, view.path)
        view.segments, view.end = segments, end
        view.dead.clear()

    # ------------------------------------------------------------------ reads

    def snapshot(self, key: bytes) -> Snapshot | None:
        """The key's rows now, or None if the key has no view (no packets)."""
        view = self._views.get(key)
        if view is None:
            return None
        return Snapshot(
            view.path,
            list(view.segments),
            view.end,
            view.joined_tail(),
            frozenset(view.dead),
            view.packets(),
        )

    def packets(self, key: bytes) -> int:
        """Envelopes whose rows the key's view holds (expired ones until they are deleted)."""
        view = self._views.get(key)
        return 0 if view is None else view.packets()

    def keys(self) -> list[bytes]:
        return list(self._views)
