"""The control socket: how the CLI and :class:`qisd.Client` talk to a running daemon.

A Unix stream socket, ``<data_dir>/control.sock``, mode 0600 in a 0700 directory: only the
daemon's user can connect. Messages in both directions are frames::

    u32 header_len | u32 blob_len | header (UTF-8 JSON object) | blob (bytes, may be empty)

(lengths big-endian). A request header is ``{"op": NAME, "args": {...}}``; the blob carries
Arrow IPC stream bytes where an operation moves rows (``emit`` in, ``query`` out). A reply header
is ``{"ok": true, "result": ...}`` or ``{"ok": false, "error": {"type", "message",
"exit_code"}}``. Requests on one connection are answered in order, one reply each (``watch``
answers with a stream of replies until the client hangs up).

A bulk emit is a sequence of ``emit`` requests of up to a few thousand rows; each reply lists the
packet ids committed by that request, so a client killed midway knows exactly what is stored.

Hostile input (a frame past the size bounds, bytes that are not JSON, wrong argument types, an
unknown operation) gets an error reply and, when the stream cannot be trusted any more, the
connection is closed; it never takes the daemon down.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qisd.errors import ConfigError, DaemonNotRunning, FieldError, QisdError, UsageError

if TYPE_CHECKING:
    import pyarrow as pa

log = logging.getLogger(__name__)

SOCKET_FILE = "control.sock"
"""Name of the control socket inside the data directory."""
MAX_HEADER_BYTES = 32 << 20
"""Largest JSON header accepted (a bulk emit chunk travels as JSON rows)."""
MAX_BLOB_BYTES = 256 << 20
"""Largest binary part accepted (Arrow IPC rows)."""
_PREFIX = struct.Struct(">II")
_SUN_PATH_MAX = 107


class ProtocolError(QisdError):
    """A frame on the control socket is malformed or too large."""

    exit_code = 1


class ShuttingDown(DaemonNotRunning):
    """The daemon is stopping and takes no new requests."""


def socket_path(data_dir: str | os.PathLike[str]) -> Path:
    """The control socket of a data directory."""
    return Path(data_dir) / SOCKET_FILE


def encode_frame(header: dict[str, Any], blob: bytes = b"") -> bytes:
    """One frame: the two lengths, the JSON header, the blob."""
    text = json.dumps(header, separators=(",", ":"), allow_nan=False).encode("utf-8")
    return _PREFIX.pack(len(text), len(blob)) + text + blob


def decode_header(data: bytes) -> dict[str, Any]:
    """Parse a frame's JSON header (ProtocolError unless it is one JSON object)."""
    try:
        value = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise ProtocolError("frame header is not UTF-8 JSON") from None
    if not isinstance(value, dict):
        raise ProtocolError("frame header must be a JSON object")
    return value


def check_lengths(header_len: int, blob_len: int) -> None:
    """Refuse frame lengths past the bounds before reading any of the body."""
    if header_len > MAX_HEADER_BYTES:
        raise ProtocolError(f"frame header of {header_len} bytes exceeds {MAX_HEADER_BYTES}")
    if blob_len > MAX_BLOB_BYTES:
        raise ProtocolError(f"frame blob of {blob_len} bytes exceeds {MAX_BLOB_BYTES}")


def error_header(exc: BaseException) -> dict[str, Any]:
    """The reply header of a failed request."""
    if isinstance(exc, QisdError):
        kind, code, message = type(exc).__name__, exc.exit_code, str(exc)
    else:
        kind, code, message = "InternalError", 1, f"internal error ({type(exc).__name__})"
    error: dict[str, Any] = {"type": kind, "message": message, "exit_code": code}
    if isinstance(exc, FieldError):
        value = exc.value
        if not (value is None or isinstance(value, (str, int, float, bool))):
            value = repr(value)
        if isinstance(value, float) and not math.isfinite(value):
            value = repr(value)
        error.update(field=exc.field, value=value, rule=exc.rule, row=exc.row)
    return {"ok": False, "error": error}


def table_to_ipc(table: pa.Table) -> bytes:
    """Arrow IPC stream bytes of a table."""
    import pyarrow as pa

    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def ipc_to_table(blob: bytes) -> pa.Table:
    """The table in Arrow IPC stream bytes (UsageError if they are not one)."""
    import pyarrow as pa

    try:
        return pa.ipc.open_stream(pa.py_buffer(blob)).read_all()
    except (pa.ArrowException, ValueError, OSError) as exc:
        raise UsageError(f"rows are not an Arrow IPC stream ({exc})") from None


def short_path_for(path: Path) -> tuple[str, int | None]:
    """A path the kernel accepts for a Unix socket, and a directory fd to close afterwards.

    ``sun_path`` holds 107 bytes; a longer path is reached through ``/proc/self/fd`` of an open
    descriptor of its directory (Linux), so deep data directories work.
    """
    text = os.fsencode(path)
    if len(text) <= _SUN_PATH_MAX:
        return str(path), None
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    return f"/proc/self/fd/{fd}/{path.name}", fd


# --------------------------------------------------------------------------- server

Handler = Callable[[dict[str, Any], bytes], Awaitable[tuple[Any, bytes]]]
Sender = Callable[[Any, bytes], Awaitable[None]]
StreamHandler = Callable[[dict[str, Any], Sender], Awaitable[None]]


class ControlServer:
    """Serves the control socket: dispatches requests to ``handlers`` by operation name.

    ``handlers[op](args, blob)`` returns ``(result, blob)``; ``streams[op](args, send)``
    sends any number of replies until it returns or the client goes away. A handler raises a
    :class:`QisdError` for a refused request; anything else is logged and answered as an
    internal error.
    """

    def __init__(
        self,
        path: Path,
        handlers: dict[str, Handler],
        streams: dict[str, StreamHandler] | None = None,
    ) -> None:
        self.path = path
        self._handlers = handlers
        self._streams = streams or {}
        self._server: asyncio.base_events.Server | None = None
        self._idle: dict[asyncio.Task[None], bool] = {}
        self._closing = False
        self._closed = asyncio.Event()
        self.rejected = 0
        """Requests refused because they were malformed (counted for ``status``)."""

    async def start(self) -> None:
        """Bind the socket (replacing a stale one: the caller holds the data-directory lock)."""
        with contextlib.suppress(FileNotFoundError):
            if self.path.is_socket() or self.path.is_symlink():
                self.path.unlink()
        bind_path, dir_fd = short_path_for(self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(bind_path)
            os.chmod(bind_path, 0o600)
        except OSError as exc:
            sock.close()
            raise ConfigError(
                f"cannot create the control socket {self.path}: {exc.strerror or exc}"
            ) from None
        finally:
            if dir_fd is not None:
                os.close(dir_fd)
        self._server = await asyncio.start_unix_server(self._serve, sock=sock, limit=1 << 16)

    async def close(self) -> None:
        """Stop accepting; requests in progress finish and reply; idle connections are dropped.

        Watch streams are ended too. Returns when no connection is left.
        """
        self._closing = True
        self._closed.set()
        if self._server is not None:
            self._server.close()
        for task, idle in list(self._idle.items()):
            if idle:
                task.cancel()
        if self._idle:
            await asyncio.gather(*list(self._idle), return_exceptions=True)
        with contextlib.suppress(OSError):
            self.path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if self._closing:
            writer.close()
            return
        self._idle[task] = True
        try:
            await self._connection(task, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            log.debug("control connection closed by its client or by shutdown")
        except Exception:  # never let one connection take the daemon down
            log.exception("control connection failed")
        finally:
            self._idle.pop(task, None)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _reply(
        self, writer: asyncio.StreamWriter, header: dict[str, Any], blob: bytes = b""
    ) -> None:
        writer.write(encode_frame(header, blob))
        await writer.drain()

    async def _connection(
        self, task: asyncio.Task[None], reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        while not self._closing:
            self._idle[task] = True
            try:
                prefix = await reader.readexactly(_PREFIX.size)
            except asyncio.IncompleteReadError:
                return
            header_len, blob_len = _PREFIX.unpack(prefix)
            try:
                check_lengths(header_len, blob_len)
                header = decode_header(await reader.readexactly(header_len))
            except ProtocolError as exc:
                # The rest of the stream cannot be framed any more: answer and hang up.
                self.rejected += 1
                await self._reply(writer, error_header(exc))
                return
            blob = await reader.readexactly(blob_len) if blob_len else b""
            self._idle[task] = False
            if self._closing:
                await self._reply(writer, error_header(ShuttingDown("the daemon is shutting down")))
                return
            op, args = header.get("op"), header.get("args", {})
            if not isinstance(op, str) or not isinstance(args, dict):
                self.rejected += 1
                await self._reply(
                    writer, error_header(ProtocolError("a request is {'op': NAME, 'args': {...}}"))
                )
                continue
            if op in self._streams:
                await self._stream(op, args, reader, writer)
                return
            await self._request(op, args, blob, writer)

    async def _request(
        self, op: str, args: dict[str, Any], blob: bytes, writer: asyncio.StreamWriter
    ) -> None:
        handler = self._handlers.get(op)
        if handler is None:
            self.rejected += 1
            await self._reply(writer, error_header(UsageError(f"unknown operation {op!r}")))
            return
        started = time.perf_counter()
        log.debug("control: %s request (%d bytes of rows)", op, len(blob))
        try:
            result, out_blob = await handler(args, blob)
        except QisdError as exc:
            if isinstance(exc, UsageError):
                self.rejected += 1
            log.debug("control: %s refused: %s: %s", op, type(exc).__name__, exc)
            await self._reply(writer, error_header(exc))
            return
        except Exception as exc:
            log.exception("control operation %s failed", op)
            await self._reply(writer, error_header(exc))
            return
        log.debug("control: %s answered in %.1f ms", op, (time.perf_counter() - started) * 1000)
        await self._reply(writer, {"ok": True, "result": result}, out_blob)

    async def _stream(
        self,
        op: str,
        args: dict[str, Any],
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        """Run a streaming operation until it ends, the client hangs up or the server closes."""

        async def send(result: Any, blob: bytes = b"") -> None:
            await self._reply(writer, {"ok": True, "result": result}, blob)

        work = asyncio.ensure_future(self._streams[op](args, send))
        hangup = asyncio.ensure_future(reader.read(1))
        closed = asyncio.ensure_future(self._closed.wait())
        try:
            await asyncio.wait({work, hangup, closed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for fut in (hangup, closed):
                fut.cancel()
            if not work.done():
                work.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                try:
                    await work
                except QisdError as exc:
                    await self._reply(writer, error_header(exc))


# --------------------------------------------------------------------------- client side


def connect(path: Path, timeout: float) -> socket.socket:
    """A connected blocking socket to the control socket at ``path`` (OSError if none)."""
    target, dir_fd = short_path_for(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(target)
    except BaseException:
        sock.close()
        raise
    finally:
        if dir_fd is not None:
            os.close(dir_fd)
    return sock


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise ConnectionResetError("the daemon closed the connection")
        buf += chunk
    return bytes(buf)


def recv_frame(sock: socket.socket) -> tuple[dict[str, Any], bytes]:
    """Read one frame from a blocking socket."""
    header_len, blob_len = _PREFIX.unpack(_recv_exactly(sock, _PREFIX.size))
    check_lengths(header_len, blob_len)
    header = decode_header(_recv_exactly(sock, header_len))
    blob = _recv_exactly(sock, blob_len) if blob_len else b""
    return header, blob
