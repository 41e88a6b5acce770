"""Outcome packets: the Arrow schema, row validation and the signed envelope (pure: no I/O).

An *outcome row* is one distilled result with the 15 columns of ``SCHEMA`` (the names and types
of the article's OutcomePacket schema, so clients written for it work unchanged). An *envelope*
carries 1..MAX_ROWS rows of one signer and one fingerprint as one Arrow IPC record-batch message,
compressed with zlib, signed with Ed25519, framed with msgpack::

    [version, kind, key, fields, public_key, body, signature]

``fields`` names (as column indices) the fingerprint fields the ``key`` was derived from, so any
receiver can check that the key is the hash of the rows' own fingerprint path without knowing
the sender's template. The signature covers a domain-separation tag, the version, the kind, the
key, the fields and the body. The packet id hashes the signer and the body but not the key, so
one emitted batch stored under several routable levels has one id, and a replay is a duplicate.

Validation happens once, here: a row or envelope that breaks a rule cannot be built, and the
error names the field, the value and the rule.
"""

from __future__ import annotations

import hashlib
import json
import math
import operator
import re
import struct
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import msgpack
import pyarrow as pa

from qisd.core._zdict import ZDICT_V1
from qisd.core.crypto import (
    PUBLIC_KEY_BYTES,
    SIGNATURE_BYTES,
    Identity,
    node_id_for,
    verify,
)
from qisd.core.fingerprint import FINGERPRINT_FIELDS, KEY_BYTES, key_for_path, path_of
from qisd.errors import DecodeError, FieldError, KeyMismatchError, PacketError, SignatureError

SCHEMA = pa.schema(
    [
        pa.field("node_id", pa.string()),
        pa.field("timestamp_utc", pa.int64()),
        pa.field("domain", pa.string()),
        pa.field("problem_type", pa.string()),
        pa.field("model_architecture", pa.string()),
        pa.field("training_phase", pa.string()),
        pa.field("metric_name", pa.string()),
        pa.field("metric_delta", pa.float32()),
        pa.field("metric_value", pa.float32()),
        pa.field("confidence", pa.float32()),
        pa.field("intervention_type", pa.string()),
        pa.field("intervention_params", pa.string()),
        pa.field("outcome_decile", pa.int8()),
        pa.field("sample_count", pa.int32()),
        pa.field("raw_data_hash", pa.string()),
    ]
)
"""The OutcomePacket schema, wire version 1."""

COLUMNS: tuple[str, ...] = tuple(SCHEMA.names)
_ROW_STRUCT = pa.struct(list(SCHEMA))

WIRE_VERSION = 1
KIND_PACKET = 1
"""An envelope of outcome rows."""
KIND_TEMPLATE = 2
"""An envelope carrying a similarity-template document (Hiring)."""
KIND_ENDORSEMENT = 3
"""An envelope carrying an endorsement of a template (Hiring)."""
KINDS = (KIND_PACKET, KIND_TEMPLATE, KIND_ENDORSEMENT)

# Limits. Chosen so that a valid one-row envelope with every string at its maximum and
# incompressible content still fits one 1,400-byte UDP datagram (tests/test_packet.py shows it).
MAX_NAME_CHARS = 64
"""domain, problem_type, model_architecture, training_phase, metric_name, intervention_type."""
MAX_PARAMS_BYTES = 256
"""intervention_params: a JSON object of at most this many UTF-8 bytes."""
MAX_RAW_DATA_HASH_CHARS = 64
"""raw_data_hash when the caller supplies its own commitment."""
MAX_ROWS = 128
"""Rows in one envelope."""
MAX_ENVELOPE_BYTES = 7_168
"""One envelope, framed; a store request of one envelope stays under rpcudp's 8,192 bytes."""
MAX_BODY_BYTES = 256 * 1024
"""Decompressed Arrow IPC bytes of one envelope: the bound that stops a decompression bomb."""
MAX_DOC_BYTES = 4_096
"""Body of a template or endorsement document."""
MAX_FUTURE_MS = 5 * 60 * 1000
"""A row's timestamp may be at most this far ahead of the receiver's clock."""
RESERVED_DOMAIN_PREFIX = "qisd."
"""Domains qisd uses for its own documents (Hiring templates); packets may not use them."""
MAX_METRIC_ABS = 1e9
"""metric_delta and metric_value must be finite and within +-this."""

_TAG = b"qisd/envelope\x00"
_ID_PERSON = b"qisd-packet-id"
_NAME_FIELDS = (
    "domain",
    "problem_type",
    "model_architecture",
    "training_phase",
    "metric_name",
    "intervention_type",
)
_OPTIONAL_NAMES = {"model_architecture": "unspecified", "training_phase": "unspecified"}
_F32 = struct.Struct("<f")
_BAD_NAME_CHARS = re.compile(r"[\x00-\x1f\x7f/]")
_BAD_HASH_CHARS = re.compile(r"[\x00-\x20\x7f]")
_FIELD_INDEX = {name: i for i, name in enumerate(COLUMNS)}
_INT32_MAX = 2**31 - 1


# --------------------------------------------------------------------------- rows


def _check_name(field: str, value: object, row: int | None) -> str:
    if not isinstance(value, str):
        raise FieldError(field, value, "must be text", row)
    if not value or value != value.strip():
        raise FieldError(field, value, "must be non-empty with no surrounding spaces", row)
    if len(value) > MAX_NAME_CHARS:
        raise FieldError(field, value, f"must be at most {MAX_NAME_CHARS} characters", row)
    if _BAD_NAME_CHARS.search(value):
        raise FieldError(field, value, "must not contain '/' or control characters", row)
    return value


def _to_float(field: str, value: object, row: int | None) -> float:
    if type(value) is float:
        if not math.isfinite(value):
            raise FieldError(field, value, "must be finite", row)
        return value
    if isinstance(value, bool) or value is None:
        raise FieldError(field, value, "must be a number", row)
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise FieldError(field, value, "must be a number", row) from None
    if not isinstance(value, (int, float)):
        raise FieldError(field, value, "must be a number", row)
    out = float(value)
    if not math.isfinite(out):
        raise FieldError(field, value, "must be finite", row)
    return out


def _float32(value: float) -> float:
    """``value`` rounded to float32, as the schema stores it (so callers see what is signed)."""
    return float(_F32.unpack(_F32.pack(value))[0])


def _to_int(field: str, value: object, row: int | None) -> int:
    if type(value) is int:
        return value
    if isinstance(value, bool) or value is None:
        raise FieldError(field, value, "must be a whole number", row)
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise FieldError(field, value, "must be a whole number", row) from None
    if isinstance(value, float):
        if not value.is_integer():
            raise FieldError(field, value, "must be a whole number", row)
        value = int(value)
    if not isinstance(value, int):
        raise FieldError(field, value, "must be a whole number", row)
    return value


class _NotFinite(ValueError):
    """NaN or Infinity in JSON text (Python's json reads them; JSON has no such values)."""


def _not_finite(name: str) -> Any:
    raise _NotFinite(name)


def _params_text(value: object, row: int | None, canonical: bool = False) -> str:
    """intervention_params as compact JSON text; ``canonical`` keeps received text as signed."""
    if value is None:
        return "{}"
    if isinstance(value, str):
        if len(value) > MAX_PARAMS_BYTES:  # characters <= bytes: refuse before parsing
            raise FieldError(
                "intervention_params",
                value,
                f"must be at most {MAX_PARAMS_BYTES} bytes as JSON",
                row,
            )
        try:
            parsed = json.loads(value, parse_constant=_not_finite)
        except _NotFinite:
            raise FieldError(
                "intervention_params", value, "must hold only JSON values (no NaN)", row
            ) from None
        except ValueError:
            raise FieldError("intervention_params", value, "must be a JSON object", row) from None
        if isinstance(parsed, dict) and canonical:
            # Received text is kept as signed, so it is held to the same byte bound here.
            if len(value.encode("utf-8")) > MAX_PARAMS_BYTES:
                raise FieldError(
                    "intervention_params",
                    value,
                    f"must be at most {MAX_PARAMS_BYTES} bytes as JSON",
                    row,
                )
            return value
    else:
        parsed = value
    if not isinstance(parsed, dict):
        raise FieldError("intervention_params", value, "must be a JSON object", row)
    try:
        text = json.dumps(parsed, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError):
        raise FieldError(
            "intervention_params", value, "must hold only JSON values (no NaN)", row
        ) from None
    if len(text.encode("utf-8")) > MAX_PARAMS_BYTES:
        raise FieldError(
            "intervention_params", value, f"must be at most {MAX_PARAMS_BYTES} bytes as JSON", row
        )
    return text


def validate_row(
    record: Mapping[str, Any],
    *,
    node_id: str,
    now_ms: int,
    row: int | None = None,
    data_ref_commitment: str | None = None,
    strict_node_id: bool = False,
    lifetime_ms: int | None = None,
) -> dict[str, Any]:
    """Check one outcome row and return it normalised to the schema's Python types.

    ``node_id`` is the signer's id: it replaces whatever the caller put there, unless
    ``strict_node_id`` (a received packet), where a different value is an error.
    ``data_ref_commitment`` (the keyed commitment of a caller's data reference) replaces
    ``raw_data_hash``. With ``lifetime_ms`` a timestamp that old or older is refused (it would
    expire before it is stored). Raises :class:`FieldError` naming the field, the value and the
    rule.
    """
    # A received row's keys are the schema's own; only caller input can carry others.
    unknown = (
        () if strict_node_id else [k for k in record if k not in _FIELD_INDEX and k != "data_ref"]
    )
    if unknown:
        raise FieldError(
            unknown[0], record[unknown[0]], "is not a column of the packet schema", row
        )
    out: dict[str, Any] = {}
    given_id = record.get("node_id")
    if strict_node_id and given_id != node_id:
        raise FieldError("node_id", given_id, "must be the hash of the signer's public key", row)
    out["node_id"] = node_id

    ts = record.get("timestamp_utc")
    ts = now_ms if ts is None else _to_int("timestamp_utc", ts, row)
    if ts < 0:
        raise FieldError("timestamp_utc", ts, "must be milliseconds since 1970 (>= 0)", row)
    if ts > now_ms + MAX_FUTURE_MS:
        raise FieldError(
            "timestamp_utc",
            ts,
            f"must be at most {MAX_FUTURE_MS // 60000} minutes in the future",
            row,
        )
    if lifetime_ms is not None and ts + lifetime_ms <= now_ms:
        raise FieldError(
            "timestamp_utc", ts, f"is older than the packet lifetime ({lifetime_ms // 1000} s)", row
        )
    out["timestamp_utc"] = ts

    for field in _NAME_FIELDS:
        value = record.get(field)
        if value is None and field in _OPTIONAL_NAMES:
            value = _OPTIONAL_NAMES[field]
        if value is None:
            raise FieldError(field, value, "is required", row)
        out[field] = _check_name(field, value, row)
    if out["domain"].startswith(RESERVED_DOMAIN_PREFIX):
        # Template documents live at "qisd.templates/<domain>": packets must not share keys.
        raise FieldError(
            "domain",
            out["domain"],
            f"must not start with {RESERVED_DOMAIN_PREFIX!r} (reserved)",
            row,
        )

    for field in ("metric_delta", "metric_value"):
        if record.get(field) is None:
            raise FieldError(field, None, "is required", row)
        value = _to_float(field, record[field], row)
        if abs(value) > MAX_METRIC_ABS:
            raise FieldError(field, value, f"must lie within +-{MAX_METRIC_ABS:g}", row)
        out[field] = _float32(value)

    if record.get("confidence") is None:
        raise FieldError("confidence", None, "is required", row)
    confidence = _to_float("confidence", record["confidence"], row)
    if not 0.0 <= confidence <= 1.0:
        raise FieldError("confidence", confidence, "must lie in [0, 1]", row)
    out["confidence"] = _float32(confidence)

    out["intervention_params"] = _params_text(
        record.get("intervention_params"), row, canonical=strict_node_id
    )

    if record.get("outcome_decile") is None:
        raise FieldError("outcome_decile", None, "is required", row)
    decile = _to_int("outcome_decile", record["outcome_decile"], row)
    if not 1 <= decile <= 10:
        raise FieldError("outcome_decile", decile, "must be a whole number in 1..10", row)
    out["outcome_decile"] = decile

    samples = record.get("sample_count")
    samples = 0 if samples is None else _to_int("sample_count", samples, row)
    if not 0 <= samples <= _INT32_MAX:
        raise FieldError("sample_count", samples, f"must be a whole number in 0..{_INT32_MAX}", row)
    out["sample_count"] = samples

    if data_ref_commitment is not None:
        out["raw_data_hash"] = data_ref_commitment
    else:
        rdh = record.get("raw_data_hash")
        rdh = "" if rdh is None else rdh
        if not isinstance(rdh, str) or len(rdh) > MAX_RAW_DATA_HASH_CHARS or not rdh.isascii():
            raise FieldError(
                "raw_data_hash",
                rdh,
                f"must be ASCII text of at most {MAX_RAW_DATA_HASH_CHARS} characters",
                row,
            )
        if _BAD_HASH_CHARS.search(rdh):
            raise FieldError(
                "raw_data_hash", rdh, "must not contain spaces or control characters", row
            )
        out["raw_data_hash"] = rdh
    return out


def build_row(
    record: Mapping[str, Any],
    identity: Identity,
    *,
    now_ms: int,
    row: int | None = None,
    lifetime_ms: int | None = None,
) -> dict[str, Any]:
    """One caller row validated for signing by ``identity`` (see :func:`build_rows`)."""
    if not isinstance(record, Mapping):
        raise PacketError(f"row {row}: must be an object with the packet columns")
    data_ref = record.get("data_ref")
    if data_ref is not None and not isinstance(data_ref, str):
        raise FieldError("data_ref", data_ref, "must be text", row)
    commitment = identity.commit(data_ref) if data_ref else None
    return validate_row(
        record,
        node_id=identity.node_id,
        now_ms=now_ms,
        row=row,
        data_ref_commitment=commitment,
        lifetime_ms=lifetime_ms,
    )


def build_rows(
    records: Iterable[Mapping[str, Any]],
    identity: Identity,
    *,
    now_ms: int,
    lifetime_ms: int | None = None,
) -> list[dict[str, Any]]:
    """Validate caller rows for signing by ``identity``.

    ``node_id`` is always the identity's; a row's ``data_ref`` (a local reference that never
    leaves the machine) becomes the keyed commitment in ``raw_data_hash``; with
    ``lifetime_ms`` a row that would expire before it is stored is refused.
    """
    return [
        build_row(r, identity, now_ms=now_ms, row=i, lifetime_ms=lifetime_ms)
        for i, r in enumerate(records)
    ]


_COLUMN_PASS_MIN_ROWS = 4


def build_table_rows(
    data: pa.Table | pa.RecordBatch,
    identity: Identity,
    *,
    now_ms: int,
    partial: bool = False,
    lifetime_ms: int | None = None,
) -> tuple[list[dict[str, Any]], list[tuple[int, str]]]:
    """The rows of an Arrow table validated for signing, and with ``partial`` the
    ``(row_index, reason)`` of each row left out; without it the first bad row raises.

    Column by column when every value passes (:func:`build_rows_from_columns`), else row by
    row, which names each bad row. A table of a few rows goes row by row at once: the column
    pass has a fixed cost (~0.1 ms) that only pays from about four rows on.
    """
    if data.num_rows >= _COLUMN_PASS_MIN_ROWS:
        rows = build_rows_from_columns(data, identity, now_ms=now_ms, lifetime_ms=lifetime_ms)
        if rows is not None:
            return rows, []
    records = rows_from_arrow(data)
    if not partial:
        return build_rows(records, identity, now_ms=now_ms, lifetime_ms=lifetime_ms), []
    good: list[dict[str, Any]] = []
    rejected: list[tuple[int, str]] = []
    for i, record in enumerate(records):
        try:
            good.append(build_row(record, identity, now_ms=now_ms, row=i, lifetime_ms=lifetime_ms))
        except PacketError as exc:
            rejected.append((i, str(exc)))
    return good, rejected


_ROW_ORDER = (
    "node_id",
    "timestamp_utc",
    *_NAME_FIELDS,
    "metric_delta",
    "metric_value",
    "confidence",
    "intervention_params",
    "outcome_decile",
    "sample_count",
    "raw_data_hash",
)
"""The key order of :func:`validate_row`'s rows."""


def is_text_type(t: pa.DataType) -> bool:
    """Whether an Arrow column of type ``t`` holds text (any of Arrow's string layouts)."""
    return bool(pa.types.is_string(t) or pa.types.is_large_string(t) or _is_string_view(t))


def _is_string_view(t: pa.DataType) -> bool:
    # string_view arrived in pyarrow 16; older releases (pyproject allows >= 14) have none.
    test = getattr(pa.types, "is_string_view", None)
    return bool(test is not None and test(t))


def build_rows_from_columns(
    data: pa.Table | pa.RecordBatch,
    identity: Identity,
    *,
    now_ms: int,
    lifetime_ms: int | None = None,
) -> list[dict[str, Any]] | None:
    """:func:`build_rows` of ``rows_from_arrow(data)`` checked column by column, or None when
    a value breaks a rule or a column is of a kind only the row-by-row rules read (strings
    of numbers, whole floats as integers...): the caller then runs :func:`build_rows`, which
    names the first bad row.

    The same rows as the row-by-row path whenever it returns rows (tests compare the two on
    hostile tables). Each text rule runs once per distinct value, and numbers are bounded by
    min and max, so a batched emit costs a few microseconds a row instead of ~30.
    """
    check_columns(data.schema.names)
    n = data.num_rows
    if n == 0:
        return []
    given = {f.name: (f.type, c) for f, c in zip(data.schema, data.columns, strict=True)}

    def column(name: str, kind: Callable[[pa.DataType], bool], default: Any) -> list[Any] | None:
        """Values of a column of ``kind`` (nulls, or no column, as ``default``), else None."""
        t, c = given.get(name, (pa.null(), None))
        if c is None or pa.types.is_null(t):
            return None if default is None else [default] * n
        if not kind(t) or (c.null_count and default is None):
            return None
        values: list[Any] = c.to_pylist()
        if c.null_count:
            values = [default if v is None else v for v in values]
        return values

    out: dict[str, list[Any]] = {"node_id": [identity.node_id] * n}
    integers = (("timestamp_utc", now_ms), ("outcome_decile", None), ("sample_count", 0))
    for name, default in integers:
        whole = column(name, pa.types.is_integer, default)
        if whole is None:
            return None
        out[name] = whole
    for name, _, _ in _FLOAT_BOUNDS:
        floats = column(name, _is_number_type, None)
        if floats is None:
            return None
        out[name] = [float(v) for v in floats]
    if not _numbers_ok(out, now_ms, 0 if lifetime_ms is None else now_ms - lifetime_ms + 1):
        return None
    rounding = struct.Struct(f"<{n}f")
    for name, _, _ in _FLOAT_BOUNDS:
        # Rounded to float32 as the schema stores it (C's double-to-float cast, as _float32).
        out[name] = list(rounding.unpack(rounding.pack(*out[name])))
    for name in _NAME_FIELDS:
        names = column(name, is_text_type, _OPTIONAL_NAMES.get(name))
        if names is None or not all(_name_ok(v) for v in set(names)):
            return None
        out[name] = names
    if any(v.startswith(RESERVED_DOMAIN_PREFIX) for v in set(out["domain"])):
        return None
    params = column("intervention_params", is_text_type, "{}")
    if params is None:
        return None
    canonical: dict[str, str] = {}
    for v in set(params):
        try:
            canonical[v] = _params_text(v, None)
        except PacketError:
            return None
    out["intervention_params"] = [canonical[v] for v in params]
    hashes = column("raw_data_hash", is_text_type, "")
    if hashes is None or not all(_hash_ok(v) for v in set(hashes)):
        return None
    if "data_ref" in given:
        refs = column("data_ref", is_text_type, "")
        if refs is None:
            return None
        commitments = {v: identity.commit(v) for v in set(refs) if v}
        hashes = [commitments[r] if r else h for r, h in zip(refs, hashes, strict=True)]
    out["raw_data_hash"] = hashes
    columns = [out[name] for name in _ROW_ORDER]
    return [dict(zip(_ROW_ORDER, row, strict=True)) for row in zip(*columns, strict=True)]


def _is_number_type(t: pa.DataType) -> bool:
    return bool(pa.types.is_floating(t) or pa.types.is_integer(t))


def rows_from_json(text: str) -> list[dict[str, Any]]:
    """Rows from a JSON object, a JSON array of objects, or JSON lines."""
    text = text.strip()
    if not text:
        return []
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if isinstance(value, dict):
        return [value]
    if isinstance(value, list):
        if not all(isinstance(v, dict) for v in value):
            raise PacketError("a JSON array of packets must hold only objects")
        return value
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except ValueError as exc:
            raise PacketError(f"line {n}: not valid JSON ({exc})") from None
        if not isinstance(item, dict):
            raise PacketError(f"line {n}: each JSON line must be an object")
        rows.append(item)
    return rows


def rows_from_arrow(data: pa.Table | pa.RecordBatch) -> list[dict[str, Any]]:
    """Rows from an Arrow table or record batch whose columns are packet columns.

    Extra columns are refused by name (so a typo never silently drops data); missing optional
    columns take their defaults at validation.
    """
    check_columns(data.schema.names)
    return batch_rows(data)


def check_columns(names: Sequence[str]) -> None:
    """Refuse, by name, columns of tabular input that are not packet columns (or data_ref)."""
    extra = [n for n in names if n not in _FIELD_INDEX and n != "data_ref"]
    if extra:
        raise PacketError(f"columns {extra} are not in the packet schema {list(COLUMNS)}")


def batch_rows(batch: pa.RecordBatch | pa.Table) -> list[dict[str, Any]]:
    """Rows of a batch as dicts (column-wise conversion: faster than ``to_pylist``)."""
    names = batch.schema.names
    columns = [c.to_pylist() for c in batch.columns]
    return [dict(zip(names, vals, strict=True)) for vals in zip(*columns, strict=True)]


def rows_to_table(rows: Sequence[Mapping[str, Any]]) -> pa.Table:
    """An Arrow table with ``SCHEMA`` from validated rows."""
    return pa.Table.from_pylist(list(rows), schema=SCHEMA)


def fingerprint_groups(
    rows: Sequence[Mapping[str, Any]], fields: Sequence[str]
) -> dict[str, list[Mapping[str, Any]]]:
    """Rows grouped by their fingerprint path over ``fields``, in first-seen order."""
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for row in rows:
        groups.setdefault(path_of(row, fields), []).append(row)
    return groups


# --------------------------------------------------------------------------- envelope


class Envelope(NamedTuple):
    """A signed, verified envelope. Built only by :func:`seal` or :func:`open_envelope`.

    Immutable (a named tuple: several times cheaper to build than a frozen dataclass, which
    counts on the receive path where every datagram yields dozens of envelopes)."""

    kind: int
    key: bytes
    fields: tuple[str, ...]
    public_key: bytes
    body: bytes
    signature: bytes
    raw: bytes
    packet_id: str
    timestamp_ms: int
    rows: int

    @property
    def signer(self) -> str:
        """The signer's ``node_id``."""
        return node_id_for(self.public_key)

    @property
    def path(self) -> str | None:
        """The fingerprint path of a packet envelope (None for documents)."""
        if self.kind != KIND_PACKET:
            return None
        return path_of(self.batch().slice(0, 1).to_pylist()[0], self.fields)

    def batch(self) -> pa.RecordBatch:
        """The rows as an Arrow record batch (packets only)."""
        if self.kind != KIND_PACKET:
            raise PacketError("only packet envelopes carry rows")
        return _read_batch(_inflate(self.body))


def _fields_bytes(fields: Sequence[str]) -> bytes:
    try:
        return bytes(_FIELD_INDEX[f] for f in fields)
    except KeyError as exc:
        raise PacketError(f"{exc.args[0]!r} is not a packet column") from None


def _signed_message(kind: int, key: bytes, fields: bytes, body: bytes) -> bytes:
    return b"".join((_TAG, bytes((WIRE_VERSION, kind, len(fields))), key, fields, body))


_ID_HASHES = {k: hashlib.blake2b(bytes((k,)), digest_size=16, person=_ID_PERSON) for k in KINDS}
"""BLAKE2b states that have absorbed each kind byte: copying one costs a third of a new hash
(computed for every received envelope)."""


def packet_id_of(kind: int, public_key: bytes, body: bytes) -> str:
    """The id of an envelope: a hash of its kind, signer and body (not its key)."""
    base = _ID_HASHES.get(kind)
    if base is None:
        base = hashlib.blake2b(bytes((kind,)), digest_size=16, person=_ID_PERSON)
    h = base.copy()
    h.update(public_key)
    h.update(body)
    return h.hexdigest()


_DEFLATE_PRIMED = zlib.compressobj(6, zlib.DEFLATED, 15, 8, zlib.Z_DEFAULT_STRATEGY, ZDICT_V1)
"""A compressor that has absorbed the dictionary: copying it costs less than priming a new one
(a quarter of zlib's time on a one-row body). Level 6: level 9 costs five times the CPU for
~5 bytes on a one-row body."""


def _deflate(ipc: bytes) -> bytes:
    c = _DEFLATE_PRIMED.copy()
    return c.compress(ipc) + c.flush()


def _inflate(body: bytes) -> bytes:
    d = zlib.decompressobj(15, ZDICT_V1)
    try:
        out = d.decompress(body, MAX_BODY_BYTES)
    except zlib.error as exc:
        raise DecodeError(f"body is not zlib data ({exc})") from None
    if d.unconsumed_tail:
        raise DecodeError(f"body inflates past {MAX_BODY_BYTES} bytes")
    if not d.eof or d.unused_data:
        raise DecodeError("body is truncated or has trailing bytes")
    return out


def _read_batch(ipc: bytes) -> pa.RecordBatch:
    try:
        batch = pa.ipc.read_record_batch(pa.py_buffer(ipc), SCHEMA)
        # The reader trusts offsets and lengths; hostile ones would read out of bounds later.
        batch.validate(full=True)
        return batch
    except Exception as exc:  # pyarrow raises many types on hostile bytes (EOFError, OSError...)
        raise DecodeError(
            f"body is not an Arrow record batch of the packet schema ({exc})"
        ) from None


def seal(
    identity: Identity,
    kind: int,
    key: bytes,
    body: bytes,
    *,
    fields: Sequence[str] = (),
    timestamp_ms: int,
    rows: int = 0,
) -> Envelope:
    """Sign ``body`` under ``key`` and frame it. ``body`` is already in wire form."""
    if kind not in KINDS:
        raise PacketError(f"unknown envelope kind {kind}")
    if len(key) != KEY_BYTES:
        raise PacketError(f"a DHT key is {KEY_BYTES} bytes")
    fb = _fields_bytes(fields)
    sig = identity.sign(_signed_message(kind, key, fb, body))
    raw = msgpack.packb([WIRE_VERSION, kind, key, fb, identity.public_key, body, sig])
    if len(raw) > MAX_ENVELOPE_BYTES:
        raise PacketError(f"envelope of {len(raw)} bytes exceeds {MAX_ENVELOPE_BYTES}")
    return Envelope(
        kind,
        key,
        tuple(fields),
        identity.public_key,
        body,
        sig,
        raw,
        packet_id_of(kind, identity.public_key, body),
        timestamp_ms,
        rows,
    )


def packet_body(rows: Sequence[Mapping[str, Any]]) -> bytes:
    """The compressed IPC body for validated rows."""
    # One conversion of the rows as structs: a third of the cost of from_pylist, which
    # converts column by column (an emit of one row spends more on that than on signing).
    batch = pa.RecordBatch.from_struct_array(pa.array(list(rows), _ROW_STRUCT))
    return _deflate(batch.serialize().to_pybytes())


def seal_packets(
    identity: Identity,
    rows: Sequence[Mapping[str, Any]],
    routes: Sequence[Sequence[str]],
) -> list[Envelope]:
    """Envelopes for validated rows of ONE finest fingerprint, one per routable level.

    ``routes`` lists the field tuples of each routable level. Every envelope carries the same
    body (so the same packet id) under its own level's key. Raises if the rows do not share
    the fingerprint or do not fit one envelope (use :func:`pack_rows` to split).
    """
    if not 1 <= len(rows) <= MAX_ROWS:
        raise PacketError(f"an envelope carries 1..{MAX_ROWS} rows, not {len(rows)}")
    node_id = identity.node_id
    if any(r["node_id"] != node_id for r in rows):
        raise PacketError("rows must carry the signer's node_id (use build_rows)")
    body = packet_body(rows)
    ts = max(int(r["timestamp_utc"]) for r in rows)
    out = []
    for fields in routes:
        values = operator.itemgetter(*fields)
        first = values(rows[0])
        if any(values(r) != first for r in rows):
            paths = sorted({path_of(r, fields) for r in rows})
            raise PacketError(f"rows of one envelope must share one fingerprint, got {paths}")
        out.append(
            seal(
                identity,
                KIND_PACKET,
                key_for_path(path_of(rows[0], fields)),
                body,
                fields=fields,
                timestamp_ms=ts,
                rows=len(rows),
            )
        )
    return out


def pack_rows(
    identity: Identity,
    rows: Sequence[Mapping[str, Any]],
    routes: Sequence[Sequence[str]],
) -> list[list[Envelope]]:
    """Seal validated rows: grouped by finest fingerprint, split to fit, one list per body.

    Each inner list holds the envelopes of one body (one packet id) at every routable level.
    """
    finest = max(routes, key=len)
    out: list[list[Envelope]] = []
    for group in fingerprint_groups(rows, finest).values():
        pending = [group[i : i + MAX_ROWS] for i in range(0, len(group), MAX_ROWS)]
        while pending:
            chunk = pending.pop(0)
            try:
                out.append(seal_packets(identity, chunk, routes))
            except PacketError:
                if len(chunk) == 1:
                    raise
                half = len(chunk) // 2
                pending[:0] = [chunk[:half], chunk[half:]]
    return out


class _Frame(NamedTuple):
    """An envelope whose framing was checked (and, once :func:`_open_frame` returns it, its
    signature and key binding); rows not yet read.

    A named tuple, not a frozen dataclass: built once per received envelope, ~1 us cheaper."""

    raw: bytes
    kind: int
    key: bytes
    fields: tuple[str, ...]
    public_key: bytes
    body: bytes
    signature: bytes
    signed: bytes
    """The message the signature covers (:func:`_signed_message`)."""

    def envelope(self, timestamp_ms: int, rows: int) -> Envelope:
        return Envelope(
            self.kind,
            self.key,
            self.fields,
            self.public_key,
            self.body,
            self.signature,
            self.raw,
            packet_id_of(self.kind, self.public_key, self.body),
            timestamp_ms,
            rows,
        )


_FRAME_FIELDS: dict[bytes, tuple[str, ...]] = {}
"""Checked ``fields`` bytes -> column names. Only valid ones are kept, and there are at most
1,957 (ordered selections of the 6 fingerprint fields), so hostile input cannot grow it."""


def _frame_fields(fb: bytes) -> tuple[str, ...]:
    """The fingerprint fields an envelope's ``fields`` bytes name, or DecodeError."""
    fields = _FRAME_FIELDS.get(fb)
    if fields is not None:
        return fields
    if len(fb) > len(FINGERPRINT_FIELDS) or len(set(fb)) != len(fb):
        raise DecodeError("envelope names too many or repeated fingerprint fields")
    try:
        fields = tuple(COLUMNS[i] for i in fb)
    except IndexError:
        raise DecodeError("envelope names a field that is not a packet column") from None
    if any(f not in FINGERPRINT_FIELDS for f in fields):
        raise DecodeError("envelope names a field that is not a fingerprint field")
    _FRAME_FIELDS[fb] = fields
    return fields


def _unframe(raw: bytes) -> _Frame:
    """Check the framing and sizes of untrusted bytes; the signature is NOT checked yet."""
    if not isinstance(raw, (bytes, bytearray, memoryview)):
        raise DecodeError("an envelope is bytes")
    raw = bytes(raw)
    if len(raw) > MAX_ENVELOPE_BYTES:
        raise DecodeError(f"envelope of {len(raw)} bytes exceeds {MAX_ENVELOPE_BYTES}")
    try:
        frame = msgpack.unpackb(
            raw,
            use_list=True,
            raw=False,
            strict_map_key=True,
            max_bin_len=MAX_ENVELOPE_BYTES,
            max_str_len=256,
            max_array_len=16,
            max_map_len=16,
            max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises several unrelated types on bad input
        raise DecodeError(f"envelope framing is not msgpack ({type(exc).__name__})") from None
    if not isinstance(frame, list) or len(frame) != 7:
        raise DecodeError("envelope frame must be a 7-item array")
    version, kind, key, fb, pub, body, sig = frame
    if version != WIRE_VERSION or isinstance(version, bool):
        raise DecodeError(f"unsupported envelope version {version!r}")
    if kind not in KINDS or isinstance(kind, bool):
        raise DecodeError(f"unknown envelope kind {kind!r}")
    if not isinstance(key, bytes) or len(key) != KEY_BYTES:
        raise DecodeError(f"envelope key must be {KEY_BYTES} bytes")
    if not isinstance(pub, bytes) or len(pub) != PUBLIC_KEY_BYTES:
        raise DecodeError(f"envelope public key must be {PUBLIC_KEY_BYTES} bytes")
    if not isinstance(sig, bytes) or len(sig) != SIGNATURE_BYTES:
        raise DecodeError(f"envelope signature must be {SIGNATURE_BYTES} bytes")
    if not isinstance(fb, bytes) or not isinstance(body, bytes):
        raise DecodeError("envelope fields and body must be bytes")
    fields = _frame_fields(fb)
    return _Frame(raw, kind, key, fields, pub, body, sig, _signed_message(kind, key, fb, body))


def _admit(frame: _Frame, expected_key: bytes | None) -> None:
    """The checks that follow a good signature: the key it was sent under, the kind's rules."""
    if expected_key is not None and frame.key != expected_key:
        raise KeyMismatchError("envelope was sent under a different key than it was signed for")
    if frame.kind == KIND_PACKET:
        if not frame.fields or frame.fields[0] != "domain":
            raise DecodeError("a packet envelope's fingerprint starts with 'domain'")
    else:
        if frame.fields:
            raise DecodeError("a document envelope names no fingerprint fields")
        if len(frame.body) > MAX_DOC_BYTES:
            raise DecodeError(f"document body exceeds {MAX_DOC_BYTES} bytes")


def _open_frame(raw: bytes, expected_key: bytes | None) -> _Frame:
    """Check framing, sizes, the signature and the key binding of untrusted bytes."""
    frame = _unframe(raw)
    if not verify(frame.public_key, frame.signature, frame.signed):
        raise SignatureError("envelope signature does not verify")
    _admit(frame, expected_key)
    return frame


def _frame_batch(frame: _Frame) -> pa.RecordBatch:
    return _rows_batch(_inflate(frame.body))


def _rows_batch(ipc: bytes) -> pa.RecordBatch:
    """The validated batch of an inflated packet body, which must hold 1..MAX_ROWS rows."""
    batch = _read_batch(ipc)
    if not 1 <= batch.num_rows <= MAX_ROWS:
        raise DecodeError(f"an envelope carries 1..{MAX_ROWS} rows, not {batch.num_rows}")
    return batch


def _check_rows(frame: _Frame, rows: Sequence[dict[str, Any]], now_ms: int) -> Envelope:
    """Every row valid, signed by the frame's signer, and of the fingerprint its key names."""
    signer = node_id_for(frame.public_key)
    path = None
    for i, row in enumerate(rows):
        # A received row has every column (validate_row would fill defaults for a caller);
        # with no nulls, values read from the schema's Arrow types are already canonical.
        for name, value in row.items():
            if value is None:
                raise FieldError(name, None, "is null; a signed row carries every column", i)
        validate_row(row, node_id=signer, now_ms=now_ms, row=i, strict_node_id=True)
        row_path = path_of(row, frame.fields)
        if path is None:
            path = row_path
        elif row_path != path:
            raise KeyMismatchError("rows of one envelope carry different fingerprints")
    if path is None or key_for_path(path) != frame.key:
        raise KeyMismatchError(f"key is not the hash of the rows' fingerprint {path!r}")
    return frame.envelope(max(r["timestamp_utc"] for r in rows), len(rows))


def open_envelope(
    raw: bytes,
    *,
    now_ms: int,
    expected_key: bytes | None = None,
) -> Envelope:
    """Decode and verify an envelope from untrusted bytes.

    Checks framing, sizes, the signature, that the key is the hash of the rows' fingerprint
    path (or ``expected_key`` when given), and every row (signer's node_id, ranges, clock).
    Raises a :class:`PacketError` subclass with the reason.
    """
    frame = _open_frame(raw, expected_key)
    if frame.kind != KIND_PACKET:
        return frame.envelope(0, 0)
    return _check_rows(frame, batch_rows(_frame_batch(frame)), now_ms)


_PENDING = DecodeError("pending")
"""Placeholder in open_envelopes' results; every one is replaced before it returns."""


def open_envelopes(
    raws: Sequence[bytes],
    *,
    now_ms: int,
    expected_key: bytes | None = None,
) -> list[Envelope | PacketError]:
    """:func:`open_envelope` for many envelopes at once (an RPC's worth), same checks.

    Returns, in order, each envelope or the error that refused it. The rows of all envelopes
    are converted from Arrow in one pass, which costs a fraction of converting each envelope's
    batch alone; that is what keeps decoding cheap next to signature verification.
    """
    results: list[Envelope | PacketError] = [_PENDING] * len(raws)
    frames: list[tuple[int, _Frame]] = []
    for i, raw in enumerate(raws):
        try:
            frames.append((i, _unframe(raw)))
        except PacketError as exc:
            results[i] = exc
    # Every signature back to back, then every body inflated, then every batch read: running
    # the Ed25519, zlib and Arrow code each in a tight loop instead of interleaved keeps each
    # hot in the CPU's caches. Each envelope still meets its checks in the order
    # open_envelope applies them, so its first error is the same.
    good = [verify(f.public_key, f.signature, f.signed) for _, f in frames]
    bodies: list[tuple[int, _Frame, bytes]] = []
    for (i, frame), signed in zip(frames, good, strict=True):
        try:
            if not signed:
                raise SignatureError("envelope signature does not verify")
            _admit(frame, expected_key)
            if frame.kind == KIND_PACKET:
                bodies.append((i, frame, _inflate(frame.body)))
            else:
                results[i] = frame.envelope(0, 0)
        except PacketError as exc:
            results[i] = exc
    pending: list[tuple[int, _Frame, pa.RecordBatch]] = []
    for i, frame, ipc in bodies:
        try:
            pending.append((i, frame, _rows_batch(ipc)))
        except PacketError as exc:
            results[i] = exc
    if not pending:
        return results
    big = pa.concat_batches([b for _, _, b in pending])
    accepted = _accept_columns(big, [(f, b.num_rows) for _, f, b in pending], now_ms)
    start = 0
    for (i, frame, batch), env in zip(pending, accepted, strict=True):
        n = batch.num_rows
        if env is not None:
            results[i] = env
        else:
            # Not accepted by the column-wise pass: the row-by-row rules give the verdict
            # and the exact error (the pass only ever accepts what they accept).
            try:
                results[i] = _check_rows(frame, batch_rows(big.slice(start, n)), now_ms)
            except PacketError as exc:
                results[i] = exc
        start += n
    return results


def _name_ok(value: str) -> bool:
    """:func:`_check_name`'s rules for a received (non-null, text) value, as a verdict."""
    return (
        bool(value)
        and len(value) <= MAX_NAME_CHARS
        and value == value.strip()
        and not _BAD_NAME_CHARS.search(value)
    )


def _params_ok(value: str) -> bool:
    """:func:`_params_text`'s rules for received (canonical) text, as a verdict."""
    if len(value) > MAX_PARAMS_BYTES or len(value.encode("utf-8")) > MAX_PARAMS_BYTES:
        return False
    try:
        return isinstance(json.loads(value, parse_constant=_not_finite), dict)
    except Exception:  # _params_text lets only ValueError through as a FieldError: fall back
        return False


def _hash_ok(value: str) -> bool:
    """The ``raw_data_hash`` rules of :func:`validate_row` for a received value, as a verdict."""
    return (
        len(value) <= MAX_RAW_DATA_HASH_CHARS
        and value.isascii()
        and not _BAD_HASH_CHARS.search(value)
    )


_FLOAT_BOUNDS = (
    ("metric_delta", -MAX_METRIC_ABS, MAX_METRIC_ABS),
    ("metric_value", -MAX_METRIC_ABS, MAX_METRIC_ABS),
    ("confidence", 0.0, 1.0),
)


def _numbers_ok(col: Mapping[str, Sequence[Any]], now_ms: int, oldest_ms: int) -> bool:
    """:func:`validate_row`'s number rules over whole columns (both column passes): every
    timestamp in ``[oldest_ms, now_ms + MAX_FUTURE_MS]``, metrics and confidence finite and in
    bounds, deciles in 1..10, sample counts in 0..int32."""
    stamps = col["timestamp_utc"]
    if min(stamps) < oldest_ms or max(stamps) > now_ms + MAX_FUTURE_MS:
        return False
    for name, low, high in _FLOAT_BOUNDS:
        values = col[name]
        # Finite first: min and max do not see a NaN reliably.
        if not all(map(math.isfinite, values)) or min(values) < low or max(values) > high:
            return False
    deciles, samples = col["outcome_decile"], col["sample_count"]
    return bool(
        1 <= min(deciles) <= max(deciles) <= 10 and 0 <= min(samples) <= max(samples) <= _INT32_MAX
    )


def _accept_columns(
    batch: pa.RecordBatch, spans: Sequence[tuple[_Frame, int]], now_ms: int
) -> list[Envelope | None]:
    """The row rules of :func:`validate_row` (strict) checked column by column over the rows
    of many envelopes, with each envelope's signer and key: an Envelope for each envelope
    whose rows all pass, None where the row-by-row check must decide.

    Never more lenient than :func:`_check_rows` (tests and the fuzz targets compare the two);
    where it is stricter it only costs the fallback. Each text rule is a pure function of one
    value, so it is applied once per distinct value (the rows of an RPC share most of their
    text: one fingerprint, few signers); a value that breaks a rule marks every row holding it.
    """
    refused: list[Envelope | None] = [None] * len(spans)
    if any(c.null_count for c in batch.columns):
        return refused
    col = dict(zip(batch.schema.names, (c.to_pylist() for c in batch.columns), strict=True))
    # Numbers: one value out of range anywhere sends every envelope the row-by-row way.
    if not _numbers_ok(col, now_ms, 0):
        return refused
    stamps = col["timestamp_utc"]
    # Text: each rule once per distinct value.
    names: set[str] = set()
    for name in _NAME_FIELDS:
        names.update(col[name])
    bad_names = {v for v in names if not _name_ok(v)}
    bad_domains = {v for v in set(col["domain"]) if v.startswith(RESERVED_DOMAIN_PREFIX)}
    bad_params = {v for v in set(col["intervention_params"]) if not _params_ok(v)}
    bad_hashes = {v for v in set(col["raw_data_hash"]) if not _hash_ok(v)}
    bad: bytearray | None = None  # 1 at the rows that break a rule
    if bad_names or bad_domains or bad_params or bad_hashes:
        bad = bytearray(batch.num_rows)
        marks = [(name, bad_names) for name in _NAME_FIELDS]
        marks += [
            ("domain", bad_domains),
            ("intervention_params", bad_params),
            ("raw_data_hash", bad_hashes),
        ]
        for name, values in marks:
            if values:
                for j, v in enumerate(col[name]):
                    if v in values:
                        bad[j] = 1
    # Per envelope: its signer's node_id in every row, one fingerprint path, the key its hash.
    out: list[Envelope | None] = []
    signers: dict[bytes, str] = {}
    keys: dict[str, bytes] = {}
    by_fields: dict[tuple[str, ...], list[list[str]]] = {}
    ids = col["node_id"]
    start = 0
    for frame, n in spans:
        end = start + n
        env = None
        signer = signers.get(frame.public_key)
        if signer is None:
            signer = signers[frame.public_key] = node_id_for(frame.public_key)
        if (bad is None or not any(bad[start:end])) and ids[start:end].count(signer) == n:
            fields = by_fields.get(frame.fields)
            if fields is None:
                fields = by_fields[frame.fields] = [col[f] for f in frame.fields]
            path = "/".join([c[start] for c in fields])
            if n == 1 or all(
                "/".join([c[j] for c in fields]) == path for j in range(start + 1, end)
            ):
                key = keys.get(path)
                if key is None:
                    key = keys[path] = key_for_path(path)
                if key == frame.key:
                    env = frame.envelope(max(stamps[start:end]), n)
        out.append(env)
        start = end
    return out


RESULT_SCHEMA = SCHEMA.append(pa.field("packet_id", pa.string())).append(
    pa.field("signer", pa.string())
)
"""What queries return: the packet columns plus the packet id and the signer's public key (hex)."""


def read_trusted(raw: bytes) -> tuple[Envelope, pa.RecordBatch | None]:
    """Unframe an envelope this node verified before it stored it (no signature check).

    Returns the envelope and, for packets, its rows; used to rebuild query results from the
    local store without paying for verification twice.
    """
    version, kind, key, fb, pub, body, sig = msgpack.unpackb(raw)
    fields = tuple(COLUMNS[i] for i in fb)
    if kind != KIND_PACKET:
        return Envelope(
            kind, key, (), pub, body, sig, raw, packet_id_of(kind, pub, body), 0, 0
        ), None
    batch = _read_batch(_inflate(body))
    ts = max(batch.column("timestamp_utc").to_pylist())
    env = Envelope(
        kind, key, fields, pub, body, sig, raw, packet_id_of(kind, pub, body), ts, batch.num_rows
    )
    return env, batch


def with_provenance(batch: pa.RecordBatch, packet_id: str, public_key: bytes) -> pa.RecordBatch:
    """``batch`` with the ``packet_id`` and ``signer`` columns of ``RESULT_SCHEMA`` added."""
    n = batch.num_rows
    return pa.RecordBatch.from_arrays(
        [
            *batch.columns,
            pa.array([packet_id] * n, pa.string()),
            pa.array([public_key.hex()] * n, pa.string()),
        ],
        schema=RESULT_SCHEMA,
    )
