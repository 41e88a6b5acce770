"""Spark jobs hand their distilled outcome rows to qisd, and read the swarm's back.

Spark works over a site's own records; qisd routes what the job distils from them. This module
(the ``[spark]`` extra: ``pip install 'qisd[spark]'``) is the seam between the two, over the
site's own daemon's Arrow Flight endpoint::

    from qisd.spark import read_outcomes, synthesis, write_outcomes

    result = write_outcomes(outcomes_df, "grpc://127.0.0.1:8815")   # DoPut, from the executors
    print(result.rows, result.new_packets, result.duplicates)
    rows = read_outcomes(spark, "grpc://127.0.0.1:8815", "clinical.oncology/treatment_response")
    best = synthesis(spark, "grpc://127.0.0.1:8815", "clinical.oncology/treatment_response",
                     as_dict=True)["best_intervention"]

What runs where:

* :func:`write_outcomes` checks the DataFrame's schema on the driver, then every partition is
  written by its own task (``mapInArrow``): its Arrow batches go, as Spark hands them over, into
  DoPut streams of at most :data:`~qisd.net.flight.MAX_PUT_ROWS` rows, one open stream per
  domain. No row becomes a Python object on the Spark side; the daemon validates, signs, commits
  and publishes each stream as one unit. The driver only collects one small report per stream.
* :func:`read_outcomes` is a one-partition DataFrame whose task runs the DoGet and yields its
  record batches (at most 16,384 rows each) straight to Spark: the rows never pass through
  the driver. Like any Spark source it is read again by each action; ``cache()`` it to read once.
* :func:`synthesis` is one DoAction from the driver.

Only the columns of the outcome packet leave the Spark job; every other column of the
DataFrame stays where it is. Errors a caller can fix raise :class:`~qisd.errors.QisdError`
subclasses with one line that says what to change.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.flight as flight
from pyspark import TaskContext
from pyspark.sql import functions as F
from pyspark.sql.pandas.types import from_arrow_schema, to_arrow_schema

from qisd import errors
from qisd.core.fingerprint import normalize_path
from qisd.core.packet import RESULT_SCHEMA
from qisd.errors import DaemonNotRunning, PacketError, QisdError, UsageError
from qisd.net.flight import MAX_PUT_ROWS, REQUIRED_COLUMNS, check_put_schema

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

CALL_TIMEOUT = 300.0
"""Seconds one Flight call from a Spark task or the driver may take."""
SENT_COLUMNS: tuple[str, ...] = (*REQUIRED_COLUMNS, "data_ref")
"""The DataFrame columns :func:`write_outcomes` sends (``raw_data_hash`` or ``data_ref``, or
both); any other column stays in Spark."""
MARKER = "[qisd] "
"""Starts the message of an error raised in a Spark task, so the driver can find it in the
exception Spark raises there and re-raise it as one line."""

_REPORT_SCHEMA = pa.schema(
    [
        ("partition", pa.int32()),
        ("stream", pa.int32()),
        ("path", pa.string()),
        ("first_row", pa.int64()),
        ("rows", pa.int64()),
        ("accepted", pa.int64()),
        ("packet_ids", pa.list_(pa.string())),
        ("duplicates", pa.list_(pa.string())),
        ("rejected", pa.string()),
        ("error", pa.string()),
    ]
)
"""One row per DoPut stream a write task made (what the driver collects)."""


class OutcomesRejected(PacketError):
    """The daemon refused rows of :func:`write_outcomes`: ``result`` holds what was stored."""

    def __init__(self, message: str, result: WriteResult) -> None:
        super().__init__(message)
        self.result = result


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class PartitionWrite:
    """What the daemon made of one partition's rows (over one or more DoPut streams)."""

    partition: int
    rows: int
    """Rows the partition sent."""
    accepted: int
    """Rows stored (now or by an earlier run: a duplicate packet's rows count as accepted)."""
    packet_ids: list[str]
    """Every packet the partition's rows are in, new or already held."""
    duplicates: list[str]
    """The packet ids of ``packet_ids`` the daemon already held (an earlier run sent them)."""
    rejected: list[tuple[int, str]] = field(default_factory=list)
    """``(row, reason)`` of the rows left out; rows count from 0 within the partition."""
    errors: list[str] = field(default_factory=list)
    """Streams the daemon refused whole (without ``partial``), one line each."""

    @property
    def new_packets(self) -> int:
        """Packets this write stored for the first time."""
        return len(self.packet_ids) - len(self.duplicates)


@dataclass(frozen=True)
class WriteResult:
    """What :func:`write_outcomes` stored, per partition."""

    partitions: list[PartitionWrite]

    @property
    def rows(self) -> int:
        """Rows sent."""
        return sum(p.rows for p in self.partitions)

    @property
    def accepted(self) -> int:
        """Rows stored, now or before."""
        return sum(p.accepted for p in self.partitions)

    @property
    def packet_ids(self) -> list[str]:
        """Every packet id, partition by partition."""
        return [pid for p in self.partitions for pid in p.packet_ids]

    @property
    def duplicates(self) -> int:
        """Packets the daemon already held: a re-run's packets are all duplicates."""
        return sum(len(p.duplicates) for p in self.partitions)

    @property
    def new_packets(self) -> int:
        """Packets stored for the first time by this write."""
        return sum(p.new_packets for p in self.partitions)

    @property
    def rejected(self) -> list[tuple[int, int, str]]:
        """``(partition, row, reason)`` of every row left out."""
        return [(p.partition, row, reason) for p in self.partitions for row, reason in p.rejected]


# --------------------------------------------------------------------------- connections


def _options(token: str | None) -> flight.FlightCallOptions:
    headers = [(b"authorization", b"Bearer " + token.encode())] if token else []
    return flight.FlightCallOptions(timeout=CALL_TIMEOUT, headers=headers)


def _connect(uri: str) -> flight.FlightClient:
    try:
        return flight.connect(uri)
    except (pa.ArrowInvalid, ValueError) as exc:
        raise UsageError(
            f"{uri!r} is not a Flight URI like grpc://127.0.0.1:8815 ({exc})"
        ) from None


def _unreachable(uri: str, exc: Exception) -> QisdError:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return DaemonNotRunning(
        f"cannot reach the qisd Flight endpoint at {uri} ({first}): start the daemon "
        "with --flight, or check the URI"
    )


def _transport_error(uri: str, exc: flight.FlightError) -> QisdError:
    """A Flight failure that is not the daemon's answer to the rows: what to fix."""
    if isinstance(exc, flight.FlightUnauthenticatedError):
        return UsageError(
            f"the qisd Flight endpoint at {uri} needs its token: pass token= "
            "(the daemon's flight_token)"
        )
    return _unreachable(uri, exc)


def _in_task(exc: QisdError) -> QisdError:
    """``exc`` as raised in a Spark task: marked, so the driver can raise it again as it was."""
    return type(exc)(f"{MARKER}{type(exc).__name__}: {exc}")


def _server_message(exc: flight.FlightError) -> str:
    """The daemon's one-line message, without gRPC's decoration."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return re.sub(r"\. Detail: .*$", "", text)


# --------------------------------------------------------------------------- writing


@dataclass(frozen=True)
class _WriteConfig:
    uri: str
    token: str | None
    partial: bool
    rows_per_put: int
    row_fields: tuple[str, ...]
    """Columns shown with a row the daemon refuses (where to find it)."""


class _Stream:
    """One open DoPut stream of one domain's rows of a partition."""

    def __init__(self, client: flight.FlightClient, config: _WriteConfig, domain: str) -> None:
        self.domain = domain
        self.rows = 0
        self.positions: list[pa.Array] = []  # partition row numbers of the rows sent
        self.samples: list[pa.RecordBatch] = []  # the rows themselves, to name a refused one
        command = json.dumps({"path": domain, "partial": config.partial}).encode()
        self._config = config
        self._client = client
        self._writer: Any = None
        self._reader: Any = None
        self._command = command
        self._refused = False
        self._error: flight.FlightServerError | None = None
        self._rows_map: np.ndarray[Any, Any] | None = None

    def write(self, batch: pa.RecordBatch, positions: pa.Array) -> None:
        self.rows += batch.num_rows
        self.positions.append(positions)
        self.samples.append(batch.select(list(self._config.row_fields)))
        self._rows_map = None
        if self._refused:
            return  # the daemon already refused this stream: finish() reads why
        try:
            if self._writer is None:
                descriptor = flight.FlightDescriptor.for_command(self._command)
                self._writer, self._reader = self._client.do_put(
                    descriptor, batch.schema, _options(self._config.token)
                )
            self._writer.write_batch(batch)
        except flight.FlightServerError as exc:
            self._refused = True
            self._error = exc

    def finish(self) -> dict[str, Any]:
        """Close the stream: the daemon's reply (raises the FlightServerError it sent)."""
        error = self._error
        reply = None
        if self._writer is not None:
            try:
                if error is None:
                    self._writer.done_writing()
                    reply = self._reader.read()
            except flight.FlightServerError as exc:
                error = exc
            finally:
                try:
                    self._writer.close()
                except flight.FlightServerError as exc:
                    error = error or exc
        if error is not None:
            raise error
        if reply is None:
            raise flight.FlightInternalError("the daemon sent no DoPut reply")
        result: dict[str, Any] = json.loads(reply.to_pybytes())
        return result

    def partition_row(self, row: int) -> int:
        """The partition row number of the stream's row ``row``."""
        if self._rows_map is None:
            self._rows_map = np.concatenate([p.to_numpy() for p in self.positions])
        return int(self._rows_map[row])

    def describe(self, row: int) -> str:
        """The refused row's identifying values, e.g. ``domain=..., intervention_type=...``."""
        table = pa.Table.from_batches(self.samples)
        values = table.slice(row, 1).to_pylist()[0]
        return ", ".join(f"{k}={v!r}" for k, v in values.items())


def _split_by_domain(batch: pa.RecordBatch) -> Iterator[tuple[str, pa.RecordBatch, pa.Array]]:
    """The batch's rows per domain, in order, with their row numbers within the batch."""
    domains = batch.column("domain")
    if pc.count_distinct(domains, mode="all").as_py() <= 1:
        value = domains[0].as_py() if batch.num_rows else None
        yield ("" if value is None else str(value)), batch, pa.array(np.arange(batch.num_rows))
        return
    for value in pc.unique(domains).to_pylist():
        if value is None:
            mask = pc.is_null(domains)
        else:
            mask = pc.fill_null(pc.equal(domains, pa.scalar(value, domains.type)), False)
        indices = pc.indices_nonzero(mask)
        yield ("" if value is None else str(value)), batch.take(indices), indices


def _report(
    partition: int,
    number: int,
    stream: _Stream,
    reply: dict[str, Any] | None,
    error: str | None,
    rejected: list[tuple[int, str]],
) -> dict[str, Any]:
    first = stream.partition_row(0) if stream.rows else 0
    return {
        "partition": partition,
        "stream": number,
        "path": stream.domain,
        "first_row": first,
        "rows": stream.rows,
        "accepted": 0 if reply is None else int(reply["accepted"]),
        "packet_ids": [] if reply is None else list(reply["packet_ids"]),
        "duplicates": [] if reply is None else list(reply.get("duplicates", [])),
        "rejected": json.dumps(rejected),
        "error": error,
    }


def _close_stream(partition: int, number: int, stream: _Stream) -> dict[str, Any]:
    """Finish a stream; the daemon's refusal becomes a report naming the partition's row."""
    try:
        reply = stream.finish()
    except flight.FlightServerError as exc:
        info: dict[str, Any] = {}
        try:
            info = json.loads(exc.extra_info or b"{}")
        except ValueError:
            info = {}
        refused = [(int(r["row"]), str(r["reason"])) for r in info.get("rejected", [])]
        rows = [(stream.partition_row(i), _rename_row(reason, stream, i)) for i, reason in refused]
        if rows:
            row, reason = rows[0]
            more = f" ({len(rows) - 1} more rows refused)" if len(rows) > 1 else ""
            reason = re.sub(r"^row \d+: ", "", reason)
            message = (
                f"partition {partition} row {row} ({stream.describe(refused[0][0])}): "
                f"{reason}{more}; nothing of this stream was stored (partial=True keeps the "
                "valid rows)"
            )
        else:
            message = f"partition {partition}: {_server_message(exc)}"
        return _report(partition, number, stream, None, message, rows)
    rejected = [
        (stream.partition_row(int(r["row"])), _rename_row(str(r["reason"]), stream, int(r["row"])))
        for r in reply.get("rejected", [])
    ]
    return _report(partition, number, stream, reply, None, rejected)


def _rename_row(reason: str, stream: _Stream, row: int) -> str:
    """The daemon's reason with its stream row number replaced by the partition's."""
    return re.sub(rf"^row {row}: ", f"row {stream.partition_row(row)}: ", reason)


def _write_partition(config: _WriteConfig, batches: Iterator[pa.RecordBatch]) -> Any:
    """A write task: the partition's batches into DoPut streams; yields one report batch."""
    context = TaskContext.get()
    partition = context.partitionId() if context is not None else 0
    reports: list[dict[str, Any]] = []
    open_streams: dict[str, _Stream] = {}
    numbers = iter(range(2**31 - 1))
    offset = 0
    refused = False
    try:
        client = flight.connect(config.uri)
    except (pa.ArrowException, OSError) as exc:
        raise _in_task(_unreachable(config.uri, exc)) from None
    try:
        for batch in batches:
            if refused and not config.partial:
                break  # the partition failed: send no more of it
            base = offset
            offset += batch.num_rows
            for domain, part, where in _split_by_domain(batch):
                positions = pc.add(where.cast(pa.int64()), base)
                start = 0
                while start < part.num_rows:
                    stream = open_streams.get(domain)
                    if stream is None:
                        stream = open_streams[domain] = _Stream(client, config, domain)
                    take = min(part.num_rows - start, config.rows_per_put - stream.rows)
                    stream.write(part.slice(start, take), positions.slice(start, take))
                    start += take
                    if stream.rows >= config.rows_per_put:
                        del open_streams[domain]
                        report = _close_stream(partition, next(numbers), stream)
                        refused = refused or report["error"] is not None
                        reports.append(report)
        for domain in list(open_streams):
            reports.append(_close_stream(partition, next(numbers), open_streams.pop(domain)))
    except flight.FlightServerError:
        raise
    except flight.FlightError as exc:
        raise _in_task(_transport_error(config.uri, exc)) from None
    finally:
        client.close()
    yield pa.RecordBatch.from_pylist(reports, schema=_REPORT_SCHEMA)


def _outcome_columns(df: DataFrame) -> DataFrame:
    """The DataFrame's packet columns, checked by the daemon's own DoPut schema rules."""
    names = df.columns
    sent = [c for c in SENT_COLUMNS if c in names]
    if "raw_data_hash" in names and "raw_data_hash" not in sent:
        sent.append("raw_data_hash")
    selected = df.select(*sent)
    arrow = to_arrow_schema(selected.schema, timezone="UTC")
    try:
        check_put_schema(arrow)
    except flight.FlightServerError as exc:
        message = _server_message(exc).removeprefix("DoPut batches must have the outcome ")
        left = sorted(set(names) - set(sent) - {"node_id"})
        hint = f"; columns not sent: {left}" if left else ""
        raise UsageError(
            f"the DataFrame cannot be written as outcome rows: it needs the outcome {message}{hint}"
        ) from None
    return selected


def write_outcomes(
    df: DataFrame,
    flight_uri: str,
    *,
    token: str | None = None,
    partial: bool = False,
    rows_per_put: int = MAX_PUT_ROWS,
) -> WriteResult:
    """Write a DataFrame of outcome rows to a daemon: each partition from its own task.

    The DataFrame holds the packet columns (``node_id`` is optional and ignored: the daemon
    signs as itself; ``data_ref`` may replace ``raw_data_hash``); other columns are not sent.
    Spark types map to the packet schema by kind: strings for text; any integer, float or
    decimal for the numbers; ``timestamp_utc`` a timestamp or int64 milliseconds. A missing or
    mistyped column raises :class:`UsageError` before any task starts.

    Each partition's rows go to DoPut streams of at most ``rows_per_put`` rows, one per domain
    at a time; each stream is stored whole or not at all. A row the daemon refuses fails the
    write (:class:`OutcomesRejected`, naming the partition, the row and the daemon's reason;
    its ``result`` says what the other streams stored), unless ``partial`` keeps the valid rows
    and lists the others in :attr:`WriteResult.rejected`.

    Re-running the same job stores nothing twice: the same rows in the same partitions are the
    same signed packets, which the daemon reports as duplicates (not new votes). That holds when
    the rows carry their own ``timestamp_utc`` and each partition's order is reproducible
    (``sortWithinPartitions`` when the source does not guarantee it), so a failed job can be
    fixed and run again.
    """
    if rows_per_put < 1 or rows_per_put > MAX_PUT_ROWS:
        raise UsageError(f"rows_per_put must be between 1 and {MAX_PUT_ROWS}")
    selected = _outcome_columns(df)
    fields = tuple(
        c
        for c in ("domain", "problem_type", "model_architecture", "intervention_type")
        if c in selected.columns
    )
    config = _WriteConfig(flight_uri, token, partial, rows_per_put, fields)
    reports_df = selected.mapInArrow(
        functools.partial(_write_partition, config), from_arrow_schema(_REPORT_SCHEMA)
    )
    try:
        reports = [row.asDict() for row in reports_df.collect()]
    except Exception as exc:
        raise _task_error(exc) from None
    result = _result(reports)
    errors = [e for p in result.partitions for e in p.errors]
    if errors:
        stored = result.accepted
        raise OutcomesRejected(
            f"{errors[0]}"
            + (f" ({len(errors) - 1} more streams refused)" if len(errors) > 1 else "")
            + f"; {stored} of {result.rows} rows are stored (a re-run adds no duplicates)",
            result,
        )
    return result


def _result(reports: list[dict[str, Any]]) -> WriteResult:
    by_partition: dict[int, list[dict[str, Any]]] = {}
    for report in reports:
        by_partition.setdefault(report["partition"], []).append(report)
    partitions = []
    for number in sorted(by_partition):
        streams = sorted(by_partition[number], key=lambda r: r["first_row"])
        rejected = sorted(
            (int(row), str(reason)) for s in streams for row, reason in json.loads(s["rejected"])
        )
        partitions.append(
            PartitionWrite(
                partition=number,
                rows=sum(s["rows"] for s in streams),
                accepted=sum(s["accepted"] for s in streams),
                packet_ids=[pid for s in streams for pid in s["packet_ids"]],
                duplicates=[pid for s in streams for pid in s["duplicates"]],
                rejected=rejected,
                errors=[s["error"] for s in streams if s["error"]],
            )
        )
    return WriteResult(partitions)


def _task_error(exc: Exception) -> QisdError:
    """The qisd error a failed Spark task raised (see :func:`_in_task`), else the Python error
    the task's traceback ends with, else Spark's first line."""
    text = str(exc)
    found = re.search(re.escape(MARKER) + r"(\w+): (.+)", text)
    if found:
        cls = getattr(errors, found.group(1), None)
        if not (isinstance(cls, type) and issubclass(cls, QisdError)):
            cls = QisdError
        return cls(found.group(2).strip())
    raised = re.search(r"^([A-Za-z_][\w.]*(?:Error|Exception): .+)$", text, re.MULTILINE)
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    line = raised.group(1).strip() if raised else first
    hint = ""
    if "No module named 'qisd'" in line:
        hint = (
            " (Spark's Python workers run another interpreter: set the environment variable"
            " PYSPARK_PYTHON to the one qisd is installed in before the SparkSession starts)"
        )
    return QisdError(f"the Spark job failed in a task: {line}{hint}")


# --------------------------------------------------------------------------- reading


def _read_path(
    uri: str, token: str | None, ticket: bytes, _batches: Iterator[pa.RecordBatch]
) -> Iterator[pa.RecordBatch]:
    """A read task: the DoGet stream's record batches, as they arrive."""
    try:
        client = flight.connect(uri)
    except (pa.ArrowException, OSError) as exc:
        raise _in_task(_unreachable(uri, exc)) from None
    try:
        for chunk in client.do_get(flight.Ticket(ticket), _options(token)):
            if chunk.data is not None and chunk.data.num_rows:
                # The stream's schema metadata (the read's completeness) has no Spark column.
                yield chunk.data.replace_schema_metadata(None)
    except flight.FlightServerError as exc:
        message = f"DoGet {ticket.decode()!r}: {_server_message(exc)}"
        raise _in_task(QisdError(message)) from None
    except flight.FlightError as exc:
        raise _in_task(_transport_error(uri, exc)) from None
    finally:
        client.close()


def read_outcomes(
    spark: SparkSession,
    flight_uri: str,
    path: str,
    *,
    token: str | None = None,
    local: bool = False,
) -> DataFrame:
    """A path's outcome rows (network and local store; ``local``: the store only) as a
    DataFrame of the result schema: the 15 packet columns plus ``packet_id`` and ``signer``.

    One Spark task reads the DoGet stream and hands its batches to Spark as they arrive.
    Lazy, like any source: each action reads the daemon again (``cache()`` to read once).
    """
    try:
        path = normalize_path(path)
    except QisdError as exc:
        raise UsageError(f"read_outcomes: {exc}") from None
    ticket = (("local:" if local else "") + path).encode()
    schema = from_arrow_schema(RESULT_SCHEMA)
    seed = spark.range(1, numPartitions=1)
    return seed.mapInArrow(functools.partial(_read_path, flight_uri, token, ticket), schema)


# --------------------------------------------------------------------------- synthesis


def synthesis_of(flight_uri: str, path: str, *, token: str | None = None) -> dict[str, Any]:
    """The daemon's synthesis of a path (DoAction ``synthesize``) as a dict."""
    try:
        path = normalize_path(path)
    except QisdError as exc:
        raise UsageError(f"synthesis: {exc}") from None
    client = _connect(flight_uri)
    try:
        action = flight.Action("synthesize", json.dumps({"path": path}).encode())
        results = list(client.do_action(action, _options(token)))
    except flight.FlightServerError as exc:
        raise QisdError(f"synthesis of {path!r}: {_server_message(exc)}") from None
    except flight.FlightError as exc:
        raise _transport_error(flight_uri, exc) from None
    except (pa.ArrowException, OSError) as exc:
        raise _unreachable(flight_uri, exc) from None
    finally:
        client.close()
    value: dict[str, Any] = json.loads(results[0].body.to_pybytes())
    return value


def synthesis(
    spark: SparkSession,
    flight_uri: str,
    path: str,
    *,
    token: str | None = None,
    as_dict: bool = False,
) -> Any:
    """The swarm's synthesis of a path: a one-row DataFrame (nested lists as arrays of
    structs), or with ``as_dict`` the plain dict (see :func:`synthesis_of`)."""
    value = synthesis_of(flight_uri, path, token=token)
    if as_dict:
        return value
    text = json.dumps(value)
    raw = spark.createDataFrame([(text,)], "synthesis string")
    inferred = raw.select(F.schema_of_json(F.lit(text))).first()
    assert inferred is not None  # one row in, one row out
    schema = inferred[0]
    return raw.select(F.from_json("synthesis", schema).alias("s")).select("s.*")


__all__ = [
    "OutcomesRejected",
    "PartitionWrite",
    "WriteResult",
    "read_outcomes",
    "synthesis",
    "synthesis_of",
    "write_outcomes",
]
