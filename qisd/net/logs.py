"""The daemon's logs: text or JSON lines on stderr, and INFO summaries of what it does.

``configure_logging`` sets the format and levels: qisd's own loggers at the configured level;
library loggers (kademlia, rpcudp, asyncio) at WARNING unless the level names them
(``--log-level debug,kademlia=info``), so ``--log-level debug`` shows qisd's own detail (one
emit followed from request to commit to publish, one fetch from lookup to verified rows) and
not kademlia's "creating spider" lines.

:class:`ActivityLog` runs beside the node and says at INFO what changes: joining the network,
losing every peer and regaining them, and, every ``log_summary_seconds``, what arrived, what
was emitted, which sources were rate-limited and which packets were rejected by reason, as one
line per period, never one per datagram.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import sys
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from qisd.net.settings import parse_log_level

log = logging.getLogger("qisd.activity")

LIBRARY_LOGGERS = ("kademlia", "rpcudp", "asyncio")
"""Loggers kept at WARNING unless the log level names them."""
PEER_CHECK_SECONDS = 1.0
"""How often the routing table is looked at for joined, lost and regained peers."""
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object a line: ``ts`` (UTC, ISO 8601), ``level``, ``logger``, ``message``,
    any ``extra`` fields of the record, and ``exception`` (its traceback) when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)


def configure_logging(level: str, fmt: str = "text") -> None:
    """Log records to stderr in ``fmt`` (text or json) at ``level`` (``LEVEL[,LOGGER=LEVEL]``)."""
    root_level, named = parse_log_level(level)
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(root_level.upper())
    for name in LIBRARY_LOGGERS:
        # kademlia logs every lookup at INFO: detail for debugging kademlia, not the daemon.
        logging.getLogger(name).setLevel(logging.WARNING)
    for name, lvl in named.items():
        logging.getLogger(name).setLevel(lvl.upper())


def ready_line(text: str, fmt: str, **fields: Any) -> str:
    """The readiness line as the log format has it (JSON: a record with ``event: ready``)."""
    if fmt != "json":
        return text
    record = {
        "ts": datetime.now(UTC).isoformat(timespec="milliseconds"),
        "level": "info",
        "logger": "qisd",
        "message": text,
        "event": "ready",
        **fields,
    }
    return json.dumps(record)


def _delta(now: Mapping[str, Any], before: Mapping[str, Any]) -> dict[str, int]:
    out = {}
    for key, value in now.items():
        if isinstance(value, int) and not isinstance(value, bool):
            change = value - int(before.get(key, 0) or 0)
            if change > 0:
                out[key] = change
    return out


def _listed(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))


class ActivityLog:
    """INFO lines about what the node does (see the module docstring). ``run()`` is a task."""

    def __init__(self, node: Any, every: float) -> None:
        self.node = node
        self.every = every
        self._peers: set[str] = set()
        self._had_peers = False
        self._lost_at: float | None = None
        self._limited: collections.Counter[str] = collections.Counter()
        self._before = self._figures()
        self._watch_limiter()

    def _watch_limiter(self) -> None:
        """Count refusals by source (the DHT counts only their total)."""
        dht = self.node.dht
        limiter = getattr(getattr(dht, "protocol", None), "limiter", None) if dht else None
        allow = getattr(limiter, "allow", None)
        if allow is None:
            return
        limited = self._limited

        def counted(source: object, cost: float = 1.0) -> bool:
            ok: bool = allow(source, cost)
            if not ok:
                limited[str(source)] += 1
            return ok

        limiter.allow = counted

    def _figures(self) -> dict[str, Any]:
        node = self.node
        dht = dict(node.dht.stats()) if node.dht is not None else {}
        return {
            "counters": dict(node.counters),
            "received": dict(node.received),
            "rejected": dict(dht.get("rejected") or {}),
            "malformed": dict(dht.get("malformed") or {}),
            "dht": {k: v for k, v in dht.items() if isinstance(v, int)},
            "sync": dict(dht.get("sync") or {}),
            "handoff_backlog": int(dht.get("handoff_backlog") or 0),
        }

    def check_peers(self) -> None:
        """Log joining, losing every peer and regaining them (at once, not per period)."""
        if self.node.dht is None:
            return
        peers = {p.get("dht_id") or "" for p in self.node.peers()}
        if peers and not self._had_peers:
            log.info("joined the network: %d peers in the routing table", len(peers))
        elif peers and not self._peers:
            gone = time.monotonic() - (self._lost_at or time.monotonic())
            log.info("regained peers: %d in the routing table after %.0f s alone", len(peers), gone)
        elif not peers and self._peers:
            self._lost_at = time.monotonic()
            log.warning(
                "lost every peer (had %d): serving local work; bootstrap peers and former "
                "contacts are retried in the background",
                len(self._peers),
            )
        self._had_peers = self._had_peers or bool(peers)
        self._peers = peers

    def summarise(self, seconds: float) -> None:
        """One INFO line for the period just ended, if anything happened in it."""
        now = self._figures()
        before, self._before = self._before, now
        parts = []
        received = _delta(now["received"], before["received"])
        if received:
            total = sum(received.values())
            parts.append(f"received {total} envelopes from peers ({_listed(received)})")
        emitted = _delta(now["counters"], before["counters"])
        if emitted.get("emits"):
            parts.append(
                f"{emitted['emits']} emits: {emitted.get('packets_emitted', 0)} new packets, "
                f"{emitted.get('duplicate_packets', 0)} duplicates, "
                f"{emitted.get('rows_emitted', 0)} rows"
            )
        # Progress, not the backlog gauge's rise: keys queued for joining nodes, envelopes the
        # reconciliations (hand-off and anti-entropy) moved, and what still waits.
        synced = _delta(now["sync"], before["sync"])
        queued = synced.get("hand_off_keys", 0)
        moved = synced.get("sync_pushed", 0) + synced.get("sync_pulled", 0)
        if queued or moved:
            parts.append(
                f"hand-off: {queued} keys queued for joining nodes, {synced.get('sync_pushed', 0)} "
                f"envelopes pushed and {synced.get('sync_pulled', 0)} pulled by replica sync, "
                f"{now['handoff_backlog']} keys waiting"
            )
        limited = dict(self._limited)
        self._limited.clear()
        if limited:
            parts.append(
                f"rate-limited {sum(limited.values())} requests from {len(limited)} sources "
                f"({_listed(dict(collections.Counter(limited).most_common(5)))})"
            )
        rejected = _delta(now["rejected"], before["rejected"])
        if rejected:
            parts.append(f"rejected {sum(rejected.values())} ({_listed(rejected)})")
        malformed = _delta(now["malformed"], before["malformed"])
        if malformed:
            parts.append(f"malformed {sum(malformed.values())} ({_listed(malformed)})")
        if parts:
            log.info(
                "in the last %.0f s: %s; %d peers",
                seconds,
                "; ".join(parts),
                len(self._peers),
                extra={
                    "received": received,
                    "rejected": rejected,
                    "malformed": malformed,
                    "rate_limited_sources": limited,
                },
            )

    async def run(self) -> None:
        """Check peers every second and summarise every ``every`` seconds, until cancelled."""
        last = time.monotonic()
        while True:
            await asyncio.sleep(min(PEER_CHECK_SECONDS, self.every))
            try:
                self.check_peers()
                now = time.monotonic()
                if now - last >= self.every:
                    self.summarise(now - last)
                    last = now
            except Exception:
                log.exception("the activity log failed")
