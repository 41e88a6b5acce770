"""Shared test helpers: outcome rows and signed envelopes made the way a node makes them.

Import from any test (``from tests.helpers import make_envelopes`` or ``from helpers import ...``
when tests/ is on sys.path). Every helper takes time as a parameter (``now_ms``) and never reads
the clock, so tests are deterministic.
"""

from __future__ import annotations

import os
import select
import time
from collections.abc import Sequence
from typing import Any

from qisd.core import packet as P
from qisd.core.crypto import Identity
from qisd.core.fingerprint import key_for_path

NOW = 1_767_225_600_000
"""2026-01-01T00:00:00Z in ms: a fixed "now" for tests."""

ROUTES: list[tuple[str, ...]] = [
    ("domain", "problem_type"),
    ("domain", "problem_type", "model_architecture"),
]
"""Two routable levels: coarse (domain/problem_type) and fine (+ model_architecture)."""

BASE_ROW: dict[str, Any] = {
    "domain": "clinical.oncology",
    "problem_type": "treatment_response_classification",
    "model_architecture": "transformer-256d",
    "training_phase": "epoch_5_of_50",
    "metric_name": "val_auc",
    "metric_value": 0.847,
    "metric_delta": 0.023,
    "confidence": 0.91,
    "intervention_type": "learning_rate_schedule",
    "intervention_params": {"schedule": "cosine_annealing", "T_max": 10},
    "outcome_decile": 8,
    "sample_count": 1240,
}
"""The article's example row (without a data_ref)."""


def outcome_row(i: int = 0, **overrides: Any) -> dict[str, Any]:
    """``BASE_ROW`` made distinct by ``i`` (metric_delta), with fields overridden."""
    row = dict(BASE_ROW, metric_delta=round(0.001 * i, 6))
    row.update(overrides)
    return row


def path_key(*values: str) -> bytes:
    """The DHT key of the fingerprint path made of ``values`` (e.g. domain, problem_type)."""
    return key_for_path("/".join(values))


def coarse_key(**overrides: Any) -> bytes:
    """Key of level 0 of ``ROUTES`` (domain/problem_type) for ``BASE_ROW`` with overrides."""
    row = dict(BASE_ROW, **overrides)
    return path_key(row["domain"], row["problem_type"])


def make_packets(
    n: int,
    ident: Identity | None = None,
    *,
    now_ms: int = NOW,
    rows_per_packet: int = 1,
    timestamps: Sequence[int] | None = None,
    routes: Sequence[Sequence[str]] = ROUTES,
    start: int = 0,
    **overrides: Any,
) -> list[list[P.Envelope]]:
    """``n`` distinct packets signed by ``ident`` (a fresh identity if None).

    Each item is one packet (one packet id) as its envelopes at every level of ``routes``.
    Packet ``j`` carries rows ``start + j * rows_per_packet + r`` of :func:`outcome_row`, with
    timestamp ``timestamps[j]`` (default ``now_ms``). ``overrides`` apply to every row.
    """
    ident = ident or Identity.generate()
    out: list[list[P.Envelope]] = []
    for j in range(n):
        ts = now_ms if timestamps is None else timestamps[j]
        records = [
            outcome_row(start + j * rows_per_packet + r, timestamp_utc=ts, **overrides)
            for r in range(rows_per_packet)
        ]
        rows = P.build_rows(records, ident, now_ms=now_ms)
        sealed = P.pack_rows(ident, rows, routes)
        assert len(sealed) == 1, "rows_per_packet too large for one envelope"
        out.append(sealed[0])
    return out


def make_envelopes(
    n: int, ident: Identity | None = None, *, level: int = 0, **kwargs: Any
) -> list[P.Envelope]:
    """``n`` distinct envelopes under one key: level ``level`` of each of :func:`make_packets`.

    With the defaults all share the key ``coarse_key()``; pass e.g. ``problem_type="x"`` for
    another key. Other keyword arguments go to :func:`make_packets`.
    """
    return [envs[level] for envs in make_packets(n, ident, **kwargs)]


def lone_daemon_argv(data_dir: Any, *extra: str) -> list[str]:
    """The arguments of ``qisd start`` for a daemon alone on 127.0.0.1 (any free port, no
    bootstrap peers), as the end-to-end tests run it; prepend the qisd executable."""
    return [
        "start",
        "--data-dir",
        str(data_dir),
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--bootstrap-file",
        os.devnull,
        *extra,
    ]


def clean_env() -> dict[str, str]:
    """This process's environment without ``QISD_*`` settings (they would override flags)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("QISD_")}


class LineReader:
    """Read lines from a subprocess pipe with a deadline (never blocks forever, never sleeps).

    ``LineReader(proc.stdout).readline(timeout=10)`` returns the next line without its newline,
    or raises ``TimeoutError``; it returns None at end of stream.
    """

    def __init__(self, stream: Any) -> None:
        self._fd = stream.fileno()
        self._buf = b""
        self._eof = False

    def readline(self, timeout: float) -> str | None:
        """The next line (str, no newline), None at EOF, TimeoutError after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            if self._eof:
                if self._buf:
                    line, self._buf = self._buf, b""
                    return line.decode()
                return None
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no complete line within {timeout} s (have {self._buf!r})")
            ready, _, _ = select.select([self._fd], [], [], left)
            if ready:
                chunk = os.read(self._fd, 65536)
                if chunk:
                    self._buf += chunk
                else:
                    self._eof = True
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode()

    def rest(self, timeout: float) -> list[str]:
        """Every remaining line until end of stream (the writer must have exited or closed)."""
        out = []
        while (line := self.readline(timeout)) is not None:
            out.append(line)
        return out


def assert_view_matches(store: Any, now_ms: int) -> int:
    """Every packet key's columnar view (``store.scan``) equals a decode of its envelopes
    (``store.decoded``), row for row; returns the rows compared."""
    import pyarrow as pa

    rows = 0
    for key in dict(store.keys()):
        viewed = pa.Table.from_batches(list(store.scan(key, now_ms=now_ms)), schema=P.RESULT_SCHEMA)
        decoded = pa.Table.from_batches(
            list(store.decoded(key, now_ms=now_ms)), schema=P.RESULT_SCHEMA
        )
        assert viewed.num_rows == decoded.num_rows, (key.hex(), viewed.num_rows, decoded.num_rows)
        assert viewed.equals(decoded), key.hex()
        rows += viewed.num_rows
    return rows
