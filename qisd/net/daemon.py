"""``qisd start``: the node daemon in the foreground, on uvloop.

It opens the :class:`~qisd.net.node.Node` (identity, data-directory lock, store, DHT, background
bootstrap, publisher and election loop), serves the control socket, starts the Arrow Flight
endpoint when ``flight`` is configured, prints ``qisd listening on HOST:PORT node=ID`` to stderr
and sends ``READY=1`` to ``$NOTIFY_SOCKET`` when it is ready. SIGTERM, SIGINT or ``qisd stop``:
stop accepting control connections, let requests in progress finish (an emit being committed is
committed and answered), stop Flight, stop the DHT (which saves the routing state), close the
store, release the lock, return 0.

The Flight endpoint, when ``config.flight`` is set, is ``qisd.net.flight.start_flight(node,
config.flight, token=config.flight_token)``; its handle is closed at shutdown before the node.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable
from typing import Any

from qisd import __version__
from qisd.config import NodeConfig
from qisd.errors import UsageError
from qisd.net.control import ControlServer, Sender, ipc_to_table, socket_path, table_to_ipc
from qisd.net.logs import ActivityLog, configure_logging, ready_line
from qisd.net.node import MAX_EMIT_ROWS, Node
from qisd.net.settings import config_to_dict

log = logging.getLogger("qisd")


def sd_notify(message: str) -> bool:
    """Send ``message`` (e.g. ``READY=1``) to systemd's ``$NOTIFY_SOCKET``; False if unset."""
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address.startswith("@"):  # an abstract socket
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(message.encode("utf-8"))
    except OSError as exc:
        log.warning("cannot notify systemd at %s: %s", address, exc)
        return False
    return True


# --------------------------------------------------------------------------- argument checks


def _str(args: dict[str, Any], name: str) -> str:
    value = args.get(name)
    if not isinstance(value, str):
        raise UsageError(f"argument {name!r} must be text")
    return value


def _bool(args: dict[str, Any], name: str) -> bool:
    value = args.get(name, False)
    if not isinstance(value, bool):
        raise UsageError(f"argument {name!r} must be true or false")
    return value


def _int(args: dict[str, Any], name: str, default: int = 0) -> int:
    value = args.get(name, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise UsageError(f"argument {name!r} must be a whole number >= 0")
    return value


def control_handlers(
    node: Node, server: Callable[[], ControlServer | None], request_stop: Callable[[], None]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The control operations of a daemon: ``(handlers, stream handlers)``."""

    async def ping(args: dict[str, Any], blob: bytes) -> tuple[Any, bytes]:
        return {"node_id": node.identity.node_id, "version": __version__}, b""

    async def emit(args: dict[str, Any], blob: bytes) -> tuple[Any, bytes]:
        wait = _int(args, "wait")
        partial = _bool(args, "partial")
        continues = _bool(args, "continues")  # a later chunk of one bulk emit
        timeout = args.get("wait_timeout")  # checked by the node
        if blob:
            table = ipc_to_table(blob)
            result = await node.emit_table(
                table,
                partial=partial,
                wait_replicas=wait,
                wait_timeout=timeout,
                continues=continues,
            )
        else:
            rows = args.get("rows")
            if not isinstance(rows, list):
                raise UsageError("argument 'rows' must be a list of row objects")
            if len(rows) > MAX_EMIT_ROWS:
                raise UsageError(f"one request carries at most {MAX_EMIT_ROWS} rows")
            if partial:
                raise UsageError("partial emits take Arrow rows")
            result = await node.emit(
                rows, wait_replicas=wait, wait_timeout=timeout, continues=continues
            )
        return result.to_dict(), b""

    async def query(args: dict[str, Any], blob: bytes) -> tuple[Any, bytes]:
        table = await node.query(_str(args, "path"), local_only=_bool(args, "local"))
        return {"rows": table.num_rows}, table_to_ipc(table)

    async def follow(args: dict[str, Any], blob: bytes) -> tuple[Any, bytes]:
        await node.follow(_str(args, "path"))
        return {"followed": node.followed()}, b""

    async def unfollow(args: dict[str, Any], blob: bytes) -> tuple[Any, bytes]:
        await node.unfollow(_str(args, "path"))
        return {"followed": node.followed()}, b""

    async def synthesize(args: dict[str, Any], blob: bytes) -> tuple[Any, bytes]:
        return await node.synthesize(_str(args, "path"), local_only=_bool(args, "local")), b""

    async def status(args: dict[str, Any], blob: bytes) -> tuple[Any, bytes]:
        out = node.status()
        srv = server()
        out["counters"]["rejected_requests"] = srv.rejected if srv is not None else 0
        if _bool(args, "config"):
            out["config"] = config_to_dict(node.config)
        return out, b""

    async def peers(args: dict[str, Any], blob: bytes) -> tuple[Any, bytes]:
        return node.peers(), b""

    async def stop(args: dict[str, Any], blob: bytes) -> tuple[Any, bytes]:
        asyncio.get_running_loop().call_soon(request_stop)
        return {"stopping": True, "pid": os.getpid()}, b""

    async def watch(args: dict[str, Any], send: Sender) -> None:
        path = _str(args, "path")
        async with node.subscribe(path) as stream:  # registered before the acknowledgement
            await send({"watching": path}, b"")
            async for table in stream:
                await send({"rows": table.num_rows}, table_to_ipc(table))

    handlers = {
        "ping": ping,
        "emit": emit,
        "query": query,
        "follow": follow,
        "unfollow": unfollow,
        "synthesize": synthesize,
        "status": status,
        "peers": peers,
        "stop": stop,
    }
    handlers.update(_template_handlers(node))
    return handlers, {"watch": watch}


def _template_handlers(node: Node) -> dict[str, Any]:
    """Hiring operations: publish, list and endorse similarity templates."""

    async def publish(args: dict[str, Any], blob: bytes) -> tuple[Any, bytes]:
        document = args.get("document")
        if not isinstance(document, dict):
            raise UsageError("argument 'document' must be a template object")
        return await node.publish_template(document), b""

    async def listing(args: dict[str, Any], blob: bytes) -> tuple[Any, bytes]:
        return await node.templates(_str(args, "domain")), b""

    async def endorse(args: dict[str, Any], blob: bytes) -> tuple[Any, bytes]:
        domain = args.get("domain")
        if domain is not None and not isinstance(domain, str):
            raise UsageError("argument 'domain' must be text")
        return await node.endorse_template(_str(args, "template_id"), domain), b""

    return {"template_publish": publish, "template_list": listing, "template_endorse": endorse}


# --------------------------------------------------------------------------- the daemon


async def serve(config: NodeConfig, *, ready: Callable[[Node], None] | None = None) -> None:
    """Run a node until SIGTERM, SIGINT or a ``stop`` request, then shut it down cleanly."""
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    node = await Node.open(config)
    server: ControlServer | None = None
    flight: Any = None
    http: Any = None
    activity: asyncio.Task[None] | None = None
    installed: list[int] = []
    try:
        handlers, streams = control_handlers(node, lambda: server, stopping.set)
        server = ControlServer(socket_path(node.data_dir), handlers, streams)
        await server.start()
        if config.flight:
            from qisd.net.flight import start_flight

            flight = await start_flight(
                node,
                config.flight,
                token=config.flight_token,
                tls_cert=config.flight_tls_cert,
                tls_key=config.flight_tls_key,
            )
        if config.metrics:
            http = await _start_http(node, config, flight, lambda: server)
        activity = asyncio.create_task(
            ActivityLog(node, config.log_summary_seconds).run(), name="qisd-activity-log"
        )
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stopping.set)
                installed.append(sig)
        host, port = node.address if node.address else ("-", 0)
        text = f"qisd listening on {host}:{port} node={node.identity.node_id}"
        fields: dict[str, Any] = {"host": host, "port": port, "node_id": node.identity.node_id}
        if http is not None:
            fields["metrics"] = http.url + "metrics"
        print(ready_line(text, config.log_format, **fields), file=sys.stderr, flush=True)
        sd_notify(f"READY=1\nSTATUS=listening on {host}:{port}\nMAINPID={os.getpid()}")
        if ready is not None:
            ready(node)
        await stopping.wait()
        log.info("stopping")
        sd_notify("STOPPING=1")
    finally:
        # The signal handlers stay installed until everything is closed: a second SIGTERM
        # or Ctrl-C while in-flight commits finish only sets the (already set) stop event.
        try:
            if activity is not None:
                activity.cancel()
                await asyncio.gather(activity, return_exceptions=True)
            if server is not None:
                await server.close()
            if http is not None:
                await http.close()
            if flight is not None:
                try:
                    await flight.close()
                except Exception:
                    log.exception("stopping the flight endpoint failed")
            await node.close()
        finally:
            for sig in installed:
                loop.remove_signal_handler(sig)
                # The daemon is exiting: a late signal must not turn a clean exit into death
                # by signal while the loop and its worker threads wind down.
                signal.signal(sig, signal.SIG_IGN)
    log.info("stopped")


async def _start_http(
    node: Node, config: NodeConfig, flight: Any, server: Callable[[], ControlServer | None]
) -> Any:
    """The metrics and dashboard server (``--metrics``)."""
    from qisd.net.dashboard import HttpServer
    from qisd.net.metrics import Metrics
    from qisd.net.settings import parse_metrics_address

    def rejected() -> int:
        srv = server()
        return srv.rejected if srv is not None else 0

    metrics = Metrics(
        node, flight_calls=flight.calls if flight is not None else None, control_rejected=rejected
    )
    http = HttpServer(node, metrics, parse_metrics_address(config.metrics), config.metrics_token)
    await http.start()
    return http


def run(config: NodeConfig) -> int:
    """``qisd start``: configure logging, run :func:`serve` on uvloop, return the exit code.

    Errors a user can act on (identity missing, another daemon on the data directory, a bad
    store file) propagate as :class:`QisdError` for the CLI to print.
    """
    import uvloop

    configure_logging(config.log_level, config.log_format)
    # gRPC (under Arrow Flight) writes its own lines to stderr, past Python's logging: a
    # failed bind printed two of them before qisd's one-line error. Library noise stays
    # quiet unless asked, and GRPC_VERBOSITY=error (or debug) asks. Read at gRPC's first use.
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    uvloop.run(serve(config))
    return 0
