"""The node's HTTP server (``qisd start --metrics``): Prometheus ``/metrics`` and a dashboard.

Read-only, GET and HEAD only, one request per connection, on the daemon's event loop:

- ``/metrics``: the Prometheus exposition of :class:`qisd.net.metrics.Metrics` (OpenMetrics
  when the scraper asks for it);
- ``/``: a self-contained page (inline script and SVG, no assets fetched from anywhere, no
  build step) that polls ``/api/dashboard`` and draws peers, store use against its caps,
  backlogs, followed paths with their synthesis as a chart, and recent packets;
- ``/api/dashboard``: the page's data as JSON.

Loopback by default. A token (``metrics_token``) is required for any other address, as for
Flight: ``Authorization: Bearer TOKEN`` (Prometheus' ``authorization`` setting), or
``?token=TOKEN`` in the page's address (the page passes it on to its data requests). Without
a token only requests naming a loopback host are answered, so a web page elsewhere cannot read
the server through DNS rebinding.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import logging
import math
import secrets
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from qisd.errors import ConfigError
from qisd.net.metrics import Metrics

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 16_384
"""Request line and headers; a longer request is refused."""
REQUEST_TIMEOUT = 10.0
"""Seconds a client has to send its request."""
LARGEST_KEYS = 10
"""Keys listed by size on the dashboard."""
PAGE = Path(__file__).with_name("dashboard.html")


def _loopback(host: str) -> bool:
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _host_of(header: str) -> str:
    value = header.strip()
    if value.startswith("["):
        return value[1 : value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


def _finite(value: Any) -> Any:
    """JSON has no NaN or infinity: those become None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def dashboard_data(node: Any) -> dict[str, Any]:
    """What the dashboard shows, as plain data (also ``GET /api/dashboard``)."""
    status = node.status()
    limits = node.config.store
    now = time.time()
    peers = []
    for p in node.peers():
        seen = p.get("last_seen") or 0
        peers.append(
            {
                "node_id": p.get("node_id"),
                "dht_id": p.get("dht_id"),
                "address": f"{p.get('host')}:{p.get('port')}",
                "last_seen_seconds": round(max(0.0, now - seen), 1) if seen else None,
                "failures": p.get("failures", 0),
            }
        )
    dht = status.get("dht") or {}
    proto = getattr(node.dht, "protocol", None) if node.dht is not None else None
    reachability = {
        "address": status.get("address"),
        "own_addresses": sorted(getattr(proto, "own_sources", ()) or ()),
        "bootstrap_unreachable": dht.get("bootstrap_unreachable") or {},
        **{k: v for k, v in dht.items() if "reach" in k or k == "nat"},
    }
    keys = sorted(node.store.keys(), key=lambda kv: -kv[1])[:LARGEST_KEYS]
    backlogs = {"publish": status.get("publish_backlog", 0)}
    backlogs.update({k: v for k, v in dht.items() if "backlog" in k and isinstance(v, int)})
    followed = []
    for path in status.get("followed") or []:
        syn = (status.get("syntheses") or {}).get(path)
        followed.append({"path": path, "synthesis": syn})
    recent = []
    for item in reversed(node.recent):
        env = item["envelope"]
        row: dict[str, Any] = {}
        with contextlib.suppress(Exception):
            row = env.batch().slice(0, 1).to_pylist()[0]
        recent.append(
            {
                "at": item["at"],
                "source": item["source"],
                "packet_id": env.packet_id,
                "node_id": env.signer,
                "rows": env.rows,
                "path": "/".join(str(row.get(f, "")) for f in env.fields) if row else None,
                "intervention": row.get("intervention_type"),
                "metric_delta": row.get("metric_delta"),
            }
        )
    return _finite(
        {
            "node": {
                "node_id": status["node_id"],
                "dht_id": status.get("dht_id"),
                "version": status.get("version"),
                "address": status.get("address"),
                "data_dir": status.get("data_dir"),
                "uptime_seconds": status.get("uptime_seconds"),
            },
            "reachability": reachability,
            "peers": peers,
            "store": {
                "envelopes": status["packets"],
                "local_envelopes": status["local_packets"],
                "bytes": status["store_bytes"],
                "max_bytes": limits.max_bytes,
                "keys": status["keys"],
                "per_key": limits.per_key,
                "largest_keys": [{"key": k.hex(), "envelopes": n} for k, n in keys],
            },
            "backlogs": backlogs,
            "counters": status.get("counters", {}),
            "received": status.get("received", {}),
            "network": {
                "rate_limited": dht.get("rate_limited", 0),
                "rejected": dht.get("rejected", {}),
                "malformed": dht.get("malformed", {}),
                "timeouts": dht.get("timeouts", 0),
            },
            "followed": followed,
            "recent": recent,
        }
    )


class HttpServer:
    """Serves ``/metrics``, ``/`` and ``/api/dashboard`` for one node."""

    def __init__(self, node: Any, metrics: Metrics, address: tuple[str, int], token: str = ""):
        self.node = node
        self.metrics = metrics
        self.host, self.port = address
        self._token = token.encode("utf-8")
        self._server: asyncio.base_events.Server | None = None
        self._page = PAGE.read_text(encoding="utf-8")
        self.requests = 0

    @property
    def url(self) -> str:
        """The server's base address (``http://HOST:PORT/``)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    async def start(self) -> None:
        """Bind and serve (ConfigError naming the address if it cannot be bound)."""
        try:
            self._server = await asyncio.start_server(
                self._serve, self.host, self.port, limit=MAX_REQUEST_BYTES
            )
        except OSError as exc:
            raise ConfigError(
                f"cannot serve metrics at {self.host}:{self.port}: "
                f"{exc.strerror or exc} (choose another with --metrics HOST:PORT)"
            ) from None
        sock = self._server.sockets[0].getsockname()
        self.port = sock[1]
        log.info(
            "metrics at %smetrics and the dashboard at %s%s",
            self.url,
            self.url,
            " (token required)" if self._token else "",
        )

    async def close(self) -> None:
        """Stop serving."""
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()

    def _authorized(self, headers: dict[str, str], query: dict[str, list[str]]) -> bool:
        if not self._token:
            return _loopback(_host_of(headers.get("host", "")))
        scheme, _, credential = headers.get("authorization", "").partition(" ")
        candidates = [credential.strip()] if scheme.lower() == "bearer" else []
        candidates += query.get("token", [])
        return any(hmac.compare_digest(c.encode("utf-8"), self._token) for c in candidates)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
            status, ctype, body, extra = self._respond(head)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
            status, ctype, body, extra = 400, "text/plain", b"bad request\n", {}
        except Exception:  # never let one request take the daemon down
            log.exception("metrics request failed")
            status, ctype, body, extra = 500, "text/plain", b"internal error\n", {}
        method = head.split(b" ", 1)[0] if "head" in locals() else b""
        reason = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found"}.get(
            status, "Error"
        )
        lines = [
            f"HTTP/1.1 {status} {reason}",
            f"Content-Type: {ctype}",
            f"Content-Length: {len(body)}",
            "Cache-Control: no-store",
            "X-Content-Type-Options: nosniff",
            "Connection: close",
            *(f"{k}: {v}" for k, v in extra.items()),
        ]
        try:
            writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
            if method != b"HEAD":
                writer.write(body)
            await writer.drain()
        except ConnectionError:
            log.debug("dashboard client went away before its reply was sent")
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    def _respond(self, head: bytes) -> tuple[int, str, bytes, dict[str, str]]:
        self.requests += 1
        text = head.decode("latin-1")
        request_line, _, rest = text.partition("\r\n")
        parts = request_line.split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            return 400, "text/plain", b"bad request\n", {}
        method, target, _ = parts
        headers: dict[str, str] = {}
        for line in rest.split("\r\n"):
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        if method not in ("GET", "HEAD"):
            return 405, "text/plain", b"read-only: GET or HEAD\n", {"Allow": "GET, HEAD"}
        url = urlsplit(target)
        query = parse_qs(url.query)
        if not self._authorized(headers, query):
            return (
                401,
                "text/plain",
                b"this qisd metrics server needs its token: 'Authorization: Bearer TOKEN' "
                b"or ?token=TOKEN\n",
                {"WWW-Authenticate": 'Bearer realm="qisd"'},
            )
        if url.path == "/metrics":
            body, ctype = self.metrics.exposition(headers.get("accept", ""))
            return 200, ctype, body, {}
        if url.path == "/api/dashboard":
            data = json.dumps(dashboard_data(self.node), allow_nan=False).encode()
            return 200, "application/json", data, {}
        if url.path in ("/", "/index.html"):
            nonce = secrets.token_urlsafe(16)
            page = self._page.replace("{{NONCE}}", nonce).encode("utf-8")
            csp = (
                f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; "
                "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; "
                "frame-ancestors 'none'"
            )
            return 200, "text/html; charset=utf-8", page, {"Content-Security-Policy": csp}
        if url.path == "/healthz":
            return 200, "text/plain", b"ok\n", {}
        return 404, "text/plain", b"not found: /, /metrics, /api/dashboard\n", {}
