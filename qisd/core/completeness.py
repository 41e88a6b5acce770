"""How complete a read of the network is, carried with the rows it returned.

A read from the DHT (``qisd query``, Flight DoGet, ``synthesize``) says how many of the key's
closest replicas answered, whether their summaries agreed with what was merged, and whether
the read can be called complete. The same few fields travel as Arrow schema metadata, so every
door that passes a table along (the control socket's IPC, Flight DoGet, the Python client)
carries them without a side channel: ``qisd.complete``, ``qisd.replicas_expected``,
``qisd.replicas_answered``, ``qisd.replicas_agreeing``, ``qisd.bytes_received``. A local-only
read carries none of them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pyarrow as pa

FIELDS = (
    "complete",
    "replicas_expected",
    "replicas_answered",
    "replicas_agreeing",
    "bytes_received",
)
_PREFIX = "qisd."


def to_metadata(report: Mapping[str, Any]) -> dict[bytes, bytes]:
    """Schema metadata entries of a read report."""
    out: dict[bytes, bytes] = {}
    for name in FIELDS:
        value = report[name]
        text = ("true" if value else "false") if name == "complete" else str(int(value))
        out[(_PREFIX + name).encode()] = text.encode()
    return out


def attach(schema: pa.Schema, report: Mapping[str, Any] | None) -> pa.Schema:
    """``schema`` with the read report in its metadata (unchanged for a local read)."""
    if report is None:
        return schema
    metadata = dict(schema.metadata or {})
    metadata.update(to_metadata(report))
    return schema.with_metadata(metadata)


def attach_table(table: pa.Table, report: Mapping[str, Any] | None) -> pa.Table:
    """``table`` with the read report in its schema metadata."""
    if report is None:
        return table
    return table.replace_schema_metadata(attach(table.schema, report).metadata)


def read(schema: pa.Schema) -> dict[str, Any] | None:
    """The read report in ``schema``'s metadata, or None (a local read, or an older daemon)."""
    metadata = schema.metadata or {}
    if (_PREFIX + "complete").encode() not in metadata:
        return None
    out: dict[str, Any] = {}
    for name in FIELDS:
        raw = metadata.get((_PREFIX + name).encode(), b"")
        if name == "complete":
            out[name] = raw == b"true"
        else:
            try:
                out[name] = int(raw)
            except ValueError:
                out[name] = 0
    return out


def warning(report: Mapping[str, Any] | None, path: str) -> str | None:
    """The one-line warning a reader is shown when a read may be incomplete, else None."""
    if report is None or report["complete"]:
        return None
    return (
        f"qisd: warning: the read of {path} may be incomplete: "
        f"{report['replicas_answered']} of {report['replicas_expected']} closest replicas "
        f"answered, {report['replicas_agreeing']} agreed with what was merged"
    )
