"""The Python client of a running qisd daemon (the CLI is built on it).

::

    from qisd import Client

    with Client() as qisd:                       # $QISD_DATA_DIR or the XDG data home's qisd/
        ids = qisd.emit([{"domain": "clinical.oncology", ...}])["packet_ids"]
        table = qisd.query("clinical.oncology/treatment_response")   # a pyarrow.Table

It talks to the daemon's control socket in the data directory (see :mod:`qisd.net.control`),
synchronously, one request at a time per client. Errors arrive as the same
:class:`~qisd.errors.QisdError` subclasses the daemon raised (``FieldError`` for a bad row,
``DaemonNotRunning`` when no daemon answers), each with its ``exit_code``.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import io
import os
import socket
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from qisd import errors
from qisd.errors import DaemonNotRunning, PacketError, QisdError, UsageError
from qisd.net.control import (
    connect,
    encode_frame,
    ipc_to_table,
    recv_frame,
    socket_path,
    table_to_ipc,
)
from qisd.net.datadir import LOCK_FILE, resolve_data_dir

DEFAULT_CHUNK_ROWS = 1_000
"""Rows per emit request when emitting a file: each request is one commit, one reply."""
INPUT_FORMATS = ("jsonl", "json", "csv", "parquet", "arrow")
"""What ``emit_file`` reads (``None`` = decided from the file name or its first bytes)."""

if TYPE_CHECKING:
    import pyarrow as pa

# pyarrow and the packet core are imported where rows are handled, so that `qisd status` and
# other small commands start quickly.

ProgressCallback = Callable[[list[str], int, int], None]
"""``on_chunk(committed_packet_ids, rows_done, rows_total)`` after each committed chunk."""


class RemoteError(QisdError):
    """An error the daemon reported whose class is not one of :mod:`qisd.errors`."""

    def __init__(self, kind: str, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.kind = kind
        self.exit_code = exit_code


def _raise_remote(error: Any) -> None:
    if not isinstance(error, dict):
        raise RemoteError("ProtocolError", "the daemon sent a malformed error reply", 1)
    kind = str(error.get("type", "QisdError"))
    message = str(error.get("message", "error"))
    code = error.get("exit_code", 1)
    cls = getattr(errors, kind, None)
    if cls is errors.FieldError and isinstance(error.get("field"), str):
        row = error.get("row")
        raise errors.FieldError(
            error["field"],
            error.get("value"),
            str(error.get("rule", "")),
            row if isinstance(row, int) else None,
        )
    if isinstance(cls, type) and issubclass(cls, QisdError):
        exc = cls.__new__(cls)
        Exception.__init__(exc, message)
        raise exc
    raise RemoteError(kind, message, code if isinstance(code, int) else 1)


# --------------------------------------------------------------------------- reading input


def _sniff(head: bytes, name: str) -> str:
    lower = name.lower()
    for ext, fmt in (
        (".jsonl", "jsonl"),
        (".ndjson", "jsonl"),
        (".json", "json"),
        (".csv", "csv"),
        (".parquet", "parquet"),
        (".pq", "parquet"),
        (".arrow", "arrow"),
        (".feather", "arrow"),
        (".ipc", "arrow"),
        (".arrows", "arrow"),
    ):
        if lower.endswith(ext):
            return fmt
    if head.startswith(b"PAR1"):
        return "parquet"
    if head.startswith(b"ARROW1") or head.startswith(b"\xff\xff\xff\xff"):
        return "arrow"
    text = head.lstrip()
    if text[:1] in (b"{", b"["):
        return "json"
    return "csv"


def _read_arrow(data: bytes) -> pa.Table:
    import pyarrow as pa

    buf = pa.py_buffer(data)
    with contextlib.suppress(pa.ArrowInvalid, OSError):  # not the file format: try the stream
        return pa.ipc.open_file(buf).read_all()
    try:
        return pa.ipc.open_stream(buf).read_all()
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise PacketError(f"not an Arrow IPC file or stream ({exc})") from None


def _read_parquet(data: bytes) -> pa.Table:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_table(pa.BufferReader(data))
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise PacketError(f"not a readable Parquet file ({exc})") from None


def _read_csv(text: str) -> list[dict[str, Any]]:
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except StopIteration:
        return []
    except csv.Error as exc:
        raise PacketError(f"CSV line 1: {exc}") from None
    names = [h.strip() for h in header]
    if not any(names) or len(set(names)) != len(names) or "" in names:
        raise PacketError("CSV line 1 must name each column once (the packet column names)")
    from qisd.core.packet import check_columns

    try:
        check_columns(names)
    except PacketError as exc:
        raise PacketError(f"CSV line 1: {exc}") from None
    rows = []
    try:
        for row in reader:
            if not row or all(not cell.strip() for cell in row):
                continue
            if len(row) != len(names):
                raise PacketError(
                    f"CSV line {reader.line_num}: {len(row)} values for {len(names)} columns"
                )
            # An empty cell means "not given" (optional columns take their defaults).
            rows.append({n: v for n, v in zip(names, row, strict=True) if v != ""})
    except csv.Error as exc:
        raise PacketError(f"CSV line {reader.line_num}: {exc}") from None
    return rows


def read_input(
    source: str | os.PathLike[str] | BinaryIO, fmt: str | None = None
) -> list[dict[str, Any]] | pa.Table:
    """Rows of a file (or ``-`` / a binary stream for stdin): JSON lines, a JSON array or
    object, CSV with a header row, Parquet, or Arrow IPC (file or stream).

    Returns a list of row dicts (text formats) or a ``pyarrow.Table`` (Arrow formats).
    Raises :class:`PacketError` for input that cannot be read as the format.
    """
    if fmt is not None and fmt not in INPUT_FORMATS:
        raise UsageError(f"input format {fmt!r} must be one of {', '.join(INPUT_FORMATS)}")
    if isinstance(source, (str, os.PathLike)) and str(source) != "-":
        name = str(source)
        try:
            data = Path(source).read_bytes()
        except FileNotFoundError:
            raise UsageError(f"input file {name} does not exist") from None
        except IsADirectoryError:
            raise UsageError(f"input {name} is a directory, not a file") from None
        except OSError as exc:
            raise UsageError(f"cannot read {name}: {exc.strerror or exc}") from None
    else:
        stream = sys.stdin.buffer if not hasattr(source, "read") else source
        name = "-"
        data = stream.read()  # type: ignore[union-attr]
    fmt = fmt or _sniff(data[:64], name)
    if fmt == "parquet":
        return _read_parquet(data)
    if fmt == "arrow":
        return _read_arrow(data)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise PacketError(f"{name} is not UTF-8 text (nor Parquet or Arrow)") from None
    if fmt == "csv":
        return _read_csv(text)
    from qisd.core.packet import rows_from_json

    return rows_from_json(text)


def check_rows(rows: Sequence[Mapping[str, Any]] | pa.Table) -> int:
    """Validate every row by the daemon's rules before anything is sent (all or nothing).

    Returns the number of rows; raises :class:`FieldError` naming the first bad row's field.
    """
    import pyarrow as pa

    from qisd.core.crypto import Identity
    from qisd.core.packet import build_rows, build_table_rows

    # A throwaway identity: the rules do not depend on whose key signs.
    identity, now = Identity.generate(), _now_ms()
    if isinstance(rows, pa.Table):
        return len(build_table_rows(rows, identity, now_ms=now)[0])
    return len(build_rows(list(rows), identity, now_ms=now))


def _wait_args(wait: int, wait_timeout: float | None, **args: Any) -> dict[str, Any]:
    """The arguments of an emit request ("wait_timeout" only when given)."""
    args["wait"] = wait
    if wait_timeout is not None:
        args["wait_timeout"] = wait_timeout
    return args


def _now_ms() -> int:
    import time

    return time.time_ns() // 1_000_000


# --------------------------------------------------------------------------- the client


class Client:
    """A connection to the daemon of a data directory (``None``: the default one).

    Use as a context manager or call :meth:`close`. ``timeout`` bounds how long one request
    may take (a query waits for the network; an emit with ``wait`` for replicas).
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str] | None = None,
        *,
        timeout: float = 300.0,
        connect_timeout: float = 5.0,
    ) -> None:
        self.data_dir = resolve_data_dir(data_dir)
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self._sock: socket.socket | None = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection (a later call reconnects)."""
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None

    def _not_running(self) -> DaemonNotRunning:
        return DaemonNotRunning(
            f"no qisd daemon is running for {self.data_dir} "
            f"(start one with: qisd start --data-dir {self.data_dir})"
        )

    def _connect(self) -> socket.socket:
        if self._sock is not None:
            return self._sock
        path = socket_path(self.data_dir)
        try:
            sock = connect(path, self.connect_timeout)
        except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError):
            raise self._not_running() from None
        except PermissionError:
            raise UsageError(
                f"permission denied on {path}: run qisd as the user that owns the daemon"
            ) from None
        except OSError as exc:
            raise DaemonNotRunning(
                f"cannot reach the qisd daemon at {path}: {exc.strerror or exc}"
            ) from None
        sock.settimeout(self.timeout)
        self._sock = sock
        return sock

    def _send(self, op: str, args: dict[str, Any], blob: bytes = b"") -> socket.socket:
        sock = self._connect()
        try:
            sock.sendall(encode_frame({"op": op, "args": args}, blob))
        except OSError:
            self.close()
            raise DaemonNotRunning("the qisd daemon closed the connection (did it stop?)") from None
        return sock

    def _receive(self, sock: socket.socket) -> tuple[Any, bytes]:
        try:
            header, blob = recv_frame(sock)
        except TimeoutError:
            self.close()
            raise QisdError(f"the daemon did not answer within {self.timeout:g} s") from None
        except OSError:
            self.close()
            raise DaemonNotRunning("the qisd daemon closed the connection (did it stop?)") from None
        except QisdError:
            self.close()
            raise
        if header.get("ok") is True:
            return header.get("result"), blob
        if header.get("ok") is False:
            if (header.get("error") or {}).get("type") in ("ProtocolError", "ShuttingDown"):
                self.close()
            _raise_remote(header.get("error"))
        self.close()
        raise RemoteError("ProtocolError", "the daemon sent a malformed reply", 1)

    def call(self, op: str, args: dict[str, Any] | None = None, blob: bytes = b"") -> Any:
        """Send one request and return its result (raw protocol access)."""
        return self._call(op, args or {}, blob)[0]

    def _call(self, op: str, args: dict[str, Any], blob: bytes = b"") -> tuple[Any, bytes]:
        return self._receive(self._send(op, args, blob))

    # ------------------------------------------------------------------ operations

    def ping(self) -> dict[str, Any]:
        """The daemon's node id and version (DaemonNotRunning if none answers)."""
        return self.call("ping")

    def emit(
        self,
        records: Sequence[Mapping[str, Any]],
        *,
        wait: int = 0,
        wait_timeout: float | None = None,
        continues: bool = False,
    ) -> dict[str, Any]:
        """Emit rows in one commit; returns ``{packet_ids, rows, replicas, rejected,
        duplicates}`` (``duplicates``: ids the daemon already held, not stored again).

        ``wait`` > 0 waits until that many DHT replicas acknowledged each packet (see
        ``replicas`` in the result for how many did), for at most ``wait_timeout`` seconds
        when given. ``continues`` marks a later chunk of one bulk emit (the daemon counts
        one emit request for all of them).
        """
        rows = [dict(r) for r in records]
        args = _wait_args(wait, wait_timeout, rows=rows)
        if continues:
            args["continues"] = True
        return self.call("emit", args)

    def emit_table(
        self,
        table: pa.Table | pa.RecordBatch,
        *,
        wait: int = 0,
        wait_timeout: float | None = None,
        partial: bool = False,
        continues: bool = False,
    ) -> dict[str, Any]:
        """Emit the rows of an Arrow table in one commit (``partial``: keep the valid rows)."""
        import pyarrow as pa

        if isinstance(table, pa.RecordBatch):
            table = pa.Table.from_batches([table])
        args = _wait_args(wait, wait_timeout, partial=partial)
        if continues:
            args["continues"] = True
        return self.call("emit", args, table_to_ipc(table))

    def emit_rows(
        self,
        rows: Sequence[Mapping[str, Any]] | pa.Table,
        *,
        wait: int = 0,
        wait_timeout: float | None = None,
        chunk_rows: int = DEFAULT_CHUNK_ROWS,
        on_chunk: ProgressCallback | None = None,
        validate: bool = True,
    ) -> dict[str, Any]:
        """Emit many rows as a sequence of commits of ``chunk_rows`` rows each.

        Every row is validated before the first chunk is sent, so invalid input stores
        nothing. ``on_chunk`` is called after each commit with its packet ids. If the daemon
        goes away midway the error raised carries ``committed``: the ids stored before it.
        The result lists each packet id once; ``duplicates`` holds those the daemon held
        before this call (the same rows emitted again make the same packets), and
        ``duplicate_count`` how many of the packets the rows made were not new (those, and
        repeats within the input).
        """
        if chunk_rows < 1:
            raise UsageError("chunk_rows must be at least 1")
        total = check_rows(rows) if validate else len(rows)
        if isinstance(rows, (list, tuple)):
            pa = None  # plain rows travel as JSON: no need to load pyarrow here
        else:
            import pyarrow as pa
        if total == 0:
            raise UsageError("nothing to emit: the input has no rows")
        ids: dict[str, None] = {}
        new: set[str] = set()
        repeated = 0
        replicas: dict[str, int] = {}
        done = 0
        try:
            while done < total:
                if pa is not None and isinstance(rows, pa.Table):
                    chunk = rows.slice(done, chunk_rows)
                    result = self.emit_table(
                        chunk, wait=wait, wait_timeout=wait_timeout, continues=done > 0
                    )
                    n = chunk.num_rows
                else:
                    part = rows[done : done + chunk_rows]
                    result = self.emit(
                        part, wait=wait, wait_timeout=wait_timeout, continues=done > 0
                    )
                    n = len(part)
                done += n
                held = set(result.get("duplicates", ()))
                repeated += int(result.get("duplicate_count", len(held)))
                new.update(pid for pid in result["packet_ids"] if pid not in held)
                ids.update(dict.fromkeys(result["packet_ids"]))
                replicas.update(result.get("replicas", {}))
                if on_chunk is not None:
                    on_chunk(list(result["packet_ids"]), done, total)
        except QisdError as exc:
            exc.committed = list(ids)  # type: ignore[attr-defined]
            exc.rows_committed = done  # type: ignore[attr-defined]
            raise
        return {
            "packet_ids": list(ids),
            "rows": total,
            "replicas": replicas,
            "rejected": [],
            "duplicates": [pid for pid in ids if pid not in new],
            "duplicate_count": repeated,
        }

    def emit_file(
        self,
        source: str | os.PathLike[str] | BinaryIO,
        *,
        format: str | None = None,
        wait: int = 0,
        wait_timeout: float | None = None,
        chunk_rows: int = DEFAULT_CHUNK_ROWS,
        on_chunk: ProgressCallback | None = None,
    ) -> dict[str, Any]:
        """Emit every row of a file (``-`` for stdin); see :func:`read_input` for formats."""
        rows = read_input(source, format)
        return self.emit_rows(
            rows, wait=wait, wait_timeout=wait_timeout, chunk_rows=chunk_rows, on_chunk=on_chunk
        )

    def query(self, path: str, *, local: bool = False) -> pa.Table:
        """Every packet row under a fingerprint path, from the network and the local store."""
        _, blob = self._call("query", {"path": path, "local": local})
        return ipc_to_table(blob)

    def follow(self, path: str) -> list[str]:
        """Follow a fingerprint path (persistent); returns every followed path."""
        return self.call("follow", {"path": path})["followed"]

    def unfollow(self, path: str) -> list[str]:
        """Stop following a path; returns the paths still followed."""
        return self.call("unfollow", {"path": path})["followed"]

    def synthesize(self, path: str, *, local: bool = False) -> dict[str, Any]:
        """The elections' synthesis for a fingerprint path (ranked interventions)."""
        return self.call("synthesize", {"path": path, "local": local})

    def status(self, *, config: bool = False) -> dict[str, Any]:
        """Node id, address, uptime, peers, store counts, followed paths, counters."""
        return self.call("status", {"config": config})

    def peers(self) -> list[dict[str, Any]]:
        """The daemon's routing table."""
        return self.call("peers")

    def publish_template(self, document: Mapping[str, Any]) -> dict[str, Any]:
        """Publish a similarity template ``{domain, fields, levels, note?}``; returns its id."""
        return self.call("template_publish", {"document": dict(document)})

    def templates(self, domain: str) -> dict[str, Any]:
        """A domain's template candidates, their endorsements and weights, and the hire."""
        return self.call("template_list", {"domain": domain})

    def endorse_template(self, template_id: str, domain: str | None = None) -> dict[str, Any]:
        """Endorse a template by id (``domain`` when this node has not seen it yet)."""
        args: dict[str, Any] = {"template_id": template_id}
        if domain is not None:
            args["domain"] = domain
        return self.call("template_endorse", args)

    def watch(self, path: str) -> Watch:
        """New packets of a path as they arrive: an iterator of tables (blocks between them).

        The subscription is registered when this returns: every packet stored afterwards is
        delivered. Uses its own connection; ``close()`` it (or use ``with``) to stop.
        """
        return Watch(self.data_dir, path, self.connect_timeout)

    def stop(self, *, wait: bool = True, timeout: float = 60.0) -> dict[str, Any]:
        """Ask the daemon to shut down cleanly; with ``wait``, return once it has stopped."""
        result = self.call("stop")
        self.close()
        if wait and not _wait_unlocked(self.data_dir / LOCK_FILE, timeout):
            raise QisdError(f"the daemon did not stop within {timeout:g} s")
        return result


class Watch:
    """A live subscription to a path's new packets (see :meth:`Client.watch`)."""

    def __init__(self, data_dir: Path, path: str, connect_timeout: float) -> None:
        self._client = Client(data_dir, timeout=None, connect_timeout=connect_timeout)  # type: ignore[arg-type]
        self.path = path
        try:
            self._sock = self._client._send("watch", {"path": path})
            self._client._receive(self._sock)  # the acknowledgement: registered
        except BaseException:
            self._client.close()
            raise

    def __iter__(self) -> Watch:
        return self

    def __next__(self) -> pa.Table:
        _, blob = self._client._receive(self._sock)
        return ipc_to_table(blob)

    def close(self) -> None:
        """End the subscription."""
        self._client.close()

    def __enter__(self) -> Watch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _wait_unlocked(lock_path: Path, timeout: float) -> bool:
    """Block until no process holds the data directory's lock (the daemon has exited)."""
    try:
        fd = os.open(lock_path, os.O_RDONLY)
    except FileNotFoundError:
        return True
    done = threading.Event()

    def take() -> None:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_SH)  # blocks while the daemon holds LOCK_EX
            fcntl.flock(fd, fcntl.LOCK_UN)
        done.set()

    thread = threading.Thread(target=take, daemon=True)
    thread.start()
    stopped = done.wait(timeout)
    if stopped:
        os.close(fd)
    return stopped


__all__ = ["Client", "RemoteError", "Watch", "check_rows", "read_input"]
