"""The ``qisd`` command line (typer; installed as ``qisd_cli``).

Commands are thin: each parses its options and hands off to :class:`qisd.Client` (or, for
``init``, ``start`` and ``demo``, to the module that does the work). Logic raises
:class:`~qisd.errors.QisdError`; :func:`main` is the only place that catches it, prints one line
``qisd: error: ...`` on stderr and exits with the error's documented code:

    0 ok, 1 invalid packet or input, 2 usage or configuration, 3 no daemon running,
    4 store, 5 network (bootstrap, replicas not reached).
"""

from __future__ import annotations

import csv
import enum
import json
import os
import struct
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer

from qisd import __version__
from qisd.config import DEFAULT_FLIGHT_URI, DEFAULT_METRICS_ADDRESS
from qisd.errors import FieldError, PacketError, QisdError, UsageError

app = typer.Typer(
    name="qisd",
    help="qisd: a peer-to-peer DHT node for signed Arrow outcome packets (the QIS loop).",
    add_completion=True,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)
template_app = typer.Typer(
    help="Similarity templates (Hiring): publish, list, endorse.",
    no_args_is_help=True,
    rich_markup_mode=None,
)
app.add_typer(template_app, name="template")


def _print_version(value: bool) -> None:
    if value:
        sys.stdout.write(f"qisd {__version__}\n")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            "-V",
            callback=_print_version,
            is_eager=True,
            help="Print the version and exit.",
        ),
    ] = False,
) -> None:
    """qisd: a peer-to-peer DHT node for signed Arrow outcome packets (the QIS loop)."""


# --------------------------------------------------------------------------- shared options

DataDir = Annotated[
    str | None,
    typer.Option(
        "--data-dir",
        "-d",
        help="Data directory (default: $QISD_DATA_DIR, else the XDG data home's qisd/).",
        envvar="QISD_DATA_DIR",
        show_default=False,
    ),
]
Json = Annotated[bool, typer.Option("--json", help="Machine-readable JSON on stdout.")]
Path_ = Annotated[
    str,
    typer.Argument(
        help="Fingerprint path, e.g. clinical.oncology/treatment_response_classification.",
        show_default=False,
    ),
]


def _data_dir(data_dir: str | None) -> str | None:
    """``--data-dir`` / ``$QISD_DATA_DIR``, else the ``data_dir`` of ``$QISD_CONFIG``'s file:
    the daemon started with that file is the one every other command must reach."""
    if data_dir or not os.environ.get("QISD_CONFIG"):
        return data_dir
    from qisd.net.settings import load_config

    return load_config().data_dir or None


def _client(data_dir: str | None) -> Any:
    from qisd.client import Client

    return Client(_data_dir(data_dir))


def _print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2, sort_keys=False, allow_nan=False) + "\n")


def _err(text: str) -> None:
    sys.stderr.write(text + "\n")


# --------------------------------------------------------------------------- init / start / stop


@app.command()
def init(
    data_dir: DataDir = None,
    force: Annotated[
        bool, typer.Option("--force", help="Replace an existing identity (its node id is lost).")
    ] = False,
    as_json: Json = False,
) -> None:
    """Create the data directory and this node's identity (Ed25519 key, commitment secret)."""
    from qisd.net.datadir import init_identity, resolve_data_dir

    path = resolve_data_dir(_data_dir(data_dir))
    identity = init_identity(path, force=force)
    if as_json:
        _print_json({"node_id": identity.node_id, "data_dir": str(path)})
    else:
        sys.stdout.write(identity.node_id + "\n")
        _err(f"qisd: new node identity in {path}")


@app.command()
def start(
    host: Annotated[
        str | None,
        typer.Option(
            help="Address the UDP DHT socket binds [default: 0.0.0.0].", envvar="QISD_HOST"
        ),
    ] = None,
    port: Annotated[
        int | None,
        typer.Option(
            help="UDP port of the DHT; 0 picks a free one [default: 8468].", envvar="QISD_PORT"
        ),
    ] = None,
    bootstrap: Annotated[
        list[str] | None,
        typer.Option(
            "--bootstrap",
            "-b",
            metavar="HOST:PORT",
            help="A peer to join the network through (repeatable; QISD_BOOTSTRAP: comma list).",
        ),
    ] = None,
    bootstrap_file: Annotated[
        str | None,
        typer.Option(
            help="File of HOST:PORT peers [default: /etc/qisd/bootstrap-nodes.txt if present, "
            "else the packaged list].",
            envvar="QISD_BOOTSTRAP_FILE",
        ),
    ] = None,
    config: Annotated[
        str | None,
        typer.Option(
            "--config",
            "-c",
            help="TOML config file; flags and QISD_* override it.",
            envvar="QISD_CONFIG",
        ),
    ] = None,
    data_dir: DataDir = None,
    flight: Annotated[
        str | None,
        typer.Option(
            metavar="[URI]",
            help=f"Serve Arrow Flight at URI (given alone: {DEFAULT_FLIGHT_URI}).",
            envvar="QISD_FLIGHT",
        ),
    ] = None,
    flight_token: Annotated[
        str | None,
        typer.Option(help="Token Flight clients must present.", envvar="QISD_FLIGHT_TOKEN"),
    ] = None,
    flight_tls_cert: Annotated[
        str | None,
        typer.Option(
            help="PEM certificate: Flight serves grpc+tls:// (with --flight-tls-key).",
            envvar="QISD_FLIGHT_TLS_CERT",
        ),
    ] = None,
    flight_tls_key: Annotated[
        str | None,
        typer.Option(help="PEM private key of --flight-tls-cert.", envvar="QISD_FLIGHT_TLS_KEY"),
    ] = None,
    metrics: Annotated[
        str | None,
        typer.Option(
            metavar="[HOST:PORT]",
            help="Serve Prometheus /metrics and the dashboard at / (given alone: "
            f"{DEFAULT_METRICS_ADDRESS}).",
            envvar="QISD_METRICS",
        ),
    ] = None,
    metrics_token: Annotated[
        str | None,
        typer.Option(
            help="Token the metrics server requires (needed off loopback).",
            envvar="QISD_METRICS_TOKEN",
        ),
    ] = None,
    log_level: Annotated[
        str | None,
        typer.Option(
            help="debug, info, warning or error [default: info]; LOGGER=LEVEL pairs may "
            "follow (debug,kademlia=info).",
            envvar="QISD_LOG_LEVEL",
        ),
    ] = None,
    log_format: Annotated[
        str | None,
        typer.Option(
            metavar="text|json",
            help="Log lines as text or as JSON objects [default: text].",
            envvar="QISD_LOG_FORMAT",
        ),
    ] = None,
    election_seconds: Annotated[
        float | None,
        typer.Option(
            help="How often followed paths are caught up and re-elected [default: 30].",
            envvar="QISD_ELECTION_SECONDS",
        ),
    ] = None,
) -> None:
    """Run the node in the foreground until SIGTERM, SIGINT or `qisd stop`."""
    from qisd.net.daemon import run
    from qisd.net.settings import load_config

    peers = [p.strip() for value in bootstrap or () for p in value.split(",") if p.strip()]
    cfg = load_config(
        config,
        flags={
            "host": host,
            "port": port,
            "bootstrap": tuple(peers) if peers else None,
            "bootstrap_file": bootstrap_file,
            "data_dir": data_dir,
            "flight": flight,
            "flight_token": flight_token,
            "flight_tls_cert": flight_tls_cert,
            "flight_tls_key": flight_tls_key,
            "metrics": metrics,
            "metrics_token": metrics_token,
            "log_level": log_level,
            "log_format": log_format,
            "election_seconds": election_seconds,
        },
    )
    raise typer.Exit(run(cfg))


@app.command()
def stop(data_dir: DataDir = None, as_json: Json = False) -> None:
    """Ask the running daemon to shut down cleanly; returns once it has stopped."""
    result = _client(data_dir).stop()
    if as_json:
        _print_json(result)
    else:
        _err(f"qisd: daemon (pid {result.get('pid')}) stopped")


# --------------------------------------------------------------------------- emit


_FLAG_OF = {
    "domain": "--domain",
    "problem_type": "--problem-type",
    "model_architecture": "--model-architecture",
    "training_phase": "--training-phase",
    "metric_name": "--metric",
    "metric_value": "--metric",
    "metric_delta": "--delta",
    "confidence": "--confidence",
    "intervention_type": "--intervention",
    "intervention_params": "--params",
    "outcome_decile": "--decile",
    "sample_count": "--samples",
    "data_ref": "--data-ref",
    "timestamp_utc": "--timestamp",
}


_REQUIRED_FLAGS = (
    ("--domain", "domain"),
    ("--problem-type", "problem_type"),
    ("--metric", "metric_name"),
    ("--delta", "metric_delta"),
    ("--confidence", "confidence"),
    ("--intervention", "intervention_type"),
    ("--decile", "outcome_decile"),
)
"""The options one packet from flags needs, and the column each gives."""


class _Progress:
    """A progress line on stderr that never shares a line with stdout.

    Before ids are written to stdout, :meth:`clear` erases the line (when stdout and stderr
    are the same terminal the ids would otherwise land on the bar's line); the next
    :meth:`update` draws it again below them.
    """

    def __init__(self, total: int, label: str) -> None:
        self.total = total
        self.label = label
        self.done = 0
        self._shown = False

    def update(self, done: int) -> None:
        self.done = done
        share = done / self.total if self.total else 1.0
        width = 30
        fill = int(share * width)
        sys.stderr.write(
            f"\r\x1b[K{self.label} [{'#' * fill}{'-' * (width - fill)}] {share:4.0%} "
            f"{done}/{self.total} rows"
        )
        sys.stderr.flush()
        self._shown = True

    def clear(self) -> None:
        if self._shown:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()
            self._shown = False

    def finish(self) -> None:
        self.clear()


def _metric(value: str) -> tuple[str, str]:
    name, sep, number = value.partition("=")
    if not sep or not name.strip() or not number.strip():
        raise FieldError("--metric", value, "must be NAME=VALUE, e.g. val_auc=0.847")
    return name.strip(), number.strip()


@app.command()
def emit(
    domain: Annotated[
        str | None, typer.Option(help="Domain, e.g. clinical.oncology. [required unless --from]")
    ] = None,
    problem_type: Annotated[
        str | None, typer.Option(help="Problem type. [required unless --from]")
    ] = None,
    model_architecture: Annotated[
        str | None, typer.Option(help="Model architecture [default: unspecified].")
    ] = None,
    training_phase: Annotated[
        str | None, typer.Option(help="Training phase [default: unspecified].")
    ] = None,
    metric: Annotated[
        str | None,
        typer.Option(
            metavar="NAME=VALUE", help="Metric name and its value. [required unless --from]"
        ),
    ] = None,
    delta: Annotated[
        str | None,
        typer.Option(
            metavar="NUMBER", help="metric_delta: the change observed. [required unless --from]"
        ),
    ] = None,
    confidence: Annotated[
        str | None,
        typer.Option(metavar="NUMBER", help="Confidence in [0, 1]. [required unless --from]"),
    ] = None,
    intervention: Annotated[
        str | None,
        typer.Option(help="intervention_type: what was done. [required unless --from]"),
    ] = None,
    params: Annotated[
        str | None, typer.Option(metavar="JSON", help="intervention_params as a JSON object.")
    ] = None,
    decile: Annotated[
        str | None,
        typer.Option(metavar="1..10", help="outcome_decile. [required unless --from]"),
    ] = None,
    samples: Annotated[
        str | None, typer.Option(metavar="N", help="sample_count [default: 0].")
    ] = None,
    data_ref: Annotated[
        str | None,
        typer.Option(
            help="Local reference to the data (never leaves this machine; a keyed commitment "
            "of it is sent)."
        ),
    ] = None,
    timestamp: Annotated[
        str | None, typer.Option(metavar="MS", help="timestamp_utc in ms [default: now].")
    ] = None,
    from_: Annotated[
        str | None,
        typer.Option(
            "--from",
            metavar="FILE|-",
            help="Emit every row of a file (- = stdin): JSON lines, JSON, CSV, Parquet or Arrow.",
        ),
    ] = None,
    fmt: Annotated[
        str | None,
        typer.Option(
            "--format", help="Input format of --from: jsonl, json, csv, parquet or arrow."
        ),
    ] = None,
    wait: Annotated[
        int, typer.Option(min=0, help="Wait until N DHT replicas acknowledged each packet.")
    ] = 0,
    wait_timeout: Annotated[
        float | None,
        typer.Option(
            metavar="SECONDS",
            min=0.001,
            max=3600,
            help="With --wait: give up waiting for replicas after this long (the packets "
            "stay committed; exit 5 if short).",
        ),
    ] = None,
    data_dir: DataDir = None,
    as_json: Json = False,
    chunk_rows: Annotated[
        int, typer.Option(min=1, help="Rows per commit when emitting a file.")
    ] = 1000,
) -> None:
    """Sign and publish outcome packets; prints each committed packet id.

    Exits 0 only once the daemon has committed every packet to its store.
    """
    single = {
        "domain": domain,
        "problem_type": problem_type,
        "model_architecture": model_architecture,
        "training_phase": training_phase,
        "metric_delta": delta,
        "confidence": confidence,
        "intervention_type": intervention,
        "intervention_params": params,
        "outcome_decile": decile,
        "sample_count": samples,
        "data_ref": data_ref,
        "timestamp_utc": timestamp,
    }
    if metric is not None:
        single["metric_name"], single["metric_value"] = _metric(metric)
    given = {k: v for k, v in single.items() if v is not None}
    if from_ is not None and given:
        raise UsageError("give either --from FILE or the field options, not both")
    if from_ is None:
        missing = [flag for flag, column in _REQUIRED_FLAGS if column not in given]
        if missing:
            raise UsageError(
                f"missing option{'s' * (len(missing) > 1)} {', '.join(missing)} "
                "(required unless --from FILE; see: qisd emit --help)"
            )
    if from_ is None and fmt is not None:
        raise UsageError("--format applies to --from")
    if wait_timeout is not None and not wait:
        raise UsageError("--wait-timeout applies to --wait N")
    from qisd.client import check_rows, read_input

    # A file is checked whole before anything is sent (all or nothing); one row from flags is
    # checked by the daemon in the same way, which saves this process loading pyarrow.
    rows = read_input(from_, fmt) if from_ is not None else [given]
    total = check_rows(rows) if from_ is not None else 1
    if total == 0:
        raise PacketError(f"nothing to emit: {from_} has no rows")
    client = _client(data_dir)
    if wait_timeout is not None:  # the request outlives the wait it asks for
        client.timeout = max(client.timeout, wait_timeout + 30)
    client.ping()  # no daemon: exit 3 before any output
    bar = None
    if from_ is not None and not as_json and sys.stderr.isatty() and total > chunk_rows:
        bar = _Progress(total, "emitting")
        bar.update(0)
    done = 0
    printed: set[str] = set()

    def on_chunk(ids: list[str], rows_done: int, rows_total: int) -> None:
        nonlocal done
        if not as_json:
            fresh = [i for i in dict.fromkeys(ids) if i not in printed]
            printed.update(fresh)
            if bar is not None:
                bar.clear()  # the ids go on lines of their own, above the bar
            sys.stdout.write("".join(i + "\n" for i in fresh))
            sys.stdout.flush()
        if bar is not None:
            bar.update(rows_done)
        done = rows_done

    try:
        result = client.emit_rows(
            rows,
            wait=wait,
            wait_timeout=wait_timeout,
            chunk_rows=chunk_rows,
            on_chunk=on_chunk,
            validate=False,
        )
    except FieldError as exc:
        if from_ is None and exc.field in _FLAG_OF:
            # One row from flags: name the flag the user typed, not the row.
            raise FieldError(f"{_FLAG_OF[exc.field]} ({exc.field})", exc.value, exc.rule) from None
        raise
    except QisdError as exc:
        committed = getattr(exc, "committed", [])
        if committed:
            if as_json:
                _print_json({"packet_ids": committed, "rows": done, "error": str(exc)})
            exc.args = (
                f"{exc} ({len(committed)} packets, {done} rows, were committed before this: "
                "their ids are printed above)",
            )
        raise
    finally:
        if bar is not None:
            bar.finish()
    short = [pid for pid, n in result["replicas"].items() if n < wait] if wait else []
    if as_json:
        _print_json(result)
    else:
        _err(_committed_line(result))
    if short:
        worst = min(result["replicas"][p] for p in short)
        raise _ReplicasShort(
            f"committed locally, but {len(short)} packet(s) reached only {worst} of the "
            f"{wait} replicas asked for with --wait"
        )


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' * (n != 1)}"


def _committed_line(result: dict[str, Any]) -> str:
    """``qisd: committed ...``: new packets, and the duplicates that were not stored again."""
    packets = len(result["packet_ids"])
    repeated = int(result.get("duplicate_count") or 0)
    rows = _plural(result["rows"], "row")
    if not repeated:
        return f"qisd: committed {_plural(packets, 'packet')} ({rows})"
    new = packets - len(result.get("duplicates") or ())
    return (
        f"qisd: committed {_plural(new, 'new packet')} ({rows}); "
        f"{_plural(repeated, 'duplicate packet')} (the same rows again) "
        f"{'were' if repeated != 1 else 'was'} not stored again"
    )


class _ReplicasShort(QisdError):
    exit_code = 5


class _Incomplete(QisdError):
    exit_code = 5


# --------------------------------------------------------------------------- query / follow


def _f32(value: Any) -> Any:
    """A float32 column value as the shortest decimal that is the same float32."""
    if not isinstance(value, float):
        return value
    packed = struct.pack("<f", value)
    for digits in range(1, 10):
        text = f"{value:.{digits}g}"
        if struct.pack("<f", float(text)) == packed:
            return float(text)
    return value


_F32_COLUMNS = ("metric_delta", "metric_value", "confidence")


def _json_rows(table: Any) -> list[dict[str, Any]]:
    rows = table.to_pylist()
    for row in rows:
        for name in _F32_COLUMNS:
            if name in row:
                row[name] = _f32(row[name])
    return rows


def _human_table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> str:
    cells = [[title for _, title in columns]]
    for row in rows:
        cells.append([_cell(row.get(name)) for name, _ in columns])
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells
    )


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{_f32(value):g}"
    return str(value)


@app.command()
def query(
    path: Path_,
    local: Annotated[bool, typer.Option("--local", help="Only this node's store.")] = False,
    as_json: Json = False,
    as_csv: Annotated[bool, typer.Option("--csv", help="CSV on stdout.")] = False,
    arrow: Annotated[
        str | None, typer.Option("--arrow", metavar="FILE", help="Write an Arrow IPC file.")
    ] = None,
    strict: Annotated[
        bool,
        typer.Option("--strict", help="Exit 5 if the network read may be incomplete."),
    ] = False,
    data_dir: DataDir = None,
) -> None:
    """Every packet under a fingerprint path, from the network and the local store."""
    from qisd.core import completeness

    if sum((as_json, as_csv, arrow is not None)) > 1:
        raise UsageError("choose one of --json, --csv and --arrow")
    if strict and local:
        raise UsageError("--strict judges a network read: drop --local")
    table = _client(data_dir).query(path, local=local)
    report = completeness.read(table.schema)
    warning = completeness.warning(report, path)
    if warning is not None:
        _err(warning)
    if arrow is not None:
        _write_arrow(table, arrow)
        _err(f"qisd: {table.num_rows} row{'s' * (table.num_rows != 1)} written to {arrow}")
    elif as_json:
        _print_json({"path": path, "rows": _json_rows(table), **(report or {"complete": None})})
    elif as_csv:
        rows = _json_rows(table)
        writer = csv.DictWriter(sys.stdout, fieldnames=table.schema.names, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    else:
        rows = _json_rows(table)
        for row in rows:
            row["when"] = datetime.fromtimestamp(row["timestamp_utc"] / 1000, UTC).strftime(
                "%Y-%m-%d %H:%M:%S"
            )
            row["node"] = row["node_id"][:12]
        columns = [
            ("when", "TIME (UTC)"),
            ("node", "NODE"),
            ("model_architecture", "MODEL"),
            ("metric_name", "METRIC"),
            ("metric_value", "VALUE"),
            ("metric_delta", "DELTA"),
            ("confidence", "CONF"),
            ("intervention_type", "INTERVENTION"),
            ("outcome_decile", "DECILE"),
            ("sample_count", "SAMPLES"),
        ]
        if rows:
            sys.stdout.write(_human_table(rows, columns) + "\n")
        _err(f"qisd: {table.num_rows} row{'s' * (table.num_rows != 1)} under {path}")
    if strict and warning is not None:
        raise _Incomplete(f"the read of {path} may be incomplete (--strict)")


def _write_arrow(table: Any, target: str) -> None:
    import pyarrow as pa

    try:
        with pa.OSFile(target, "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)
    except OSError as exc:
        raise UsageError(f"cannot write {target}: {exc}") from None


@app.command()
def follow(path: Path_, data_dir: DataDir = None, as_json: Json = False) -> None:
    """Follow a fingerprint path: its new packets are pushed here and kept fresh."""
    followed = _client(data_dir).follow(path)
    if as_json:
        _print_json({"followed": followed})
    else:
        _err(f"qisd: following {path} ({len(followed)} paths followed)")


@app.command()
def unfollow(path: Path_, data_dir: DataDir = None, as_json: Json = False) -> None:
    """Stop following a fingerprint path."""
    followed = _client(data_dir).unfollow(path)
    if as_json:
        _print_json({"followed": followed})
    else:
        _err(f"qisd: no longer following {path}")


@app.command()
def watch(
    path: Path_,
    count: Annotated[
        int, typer.Option(min=0, help="Exit after this many packets (0 = until interrupted).")
    ] = 0,
    data_dir: DataDir = None,
    as_json: Json = False,
) -> None:
    """Print new packets of a path as they arrive (JSON lines with --json)."""
    seen = 0
    stream = _client(data_dir).watch(path)
    _err(f"qisd: watching {path} (Ctrl-C to stop)")
    try:
        for table in stream:
            for row in _json_rows(table):
                if as_json:
                    sys.stdout.write(json.dumps(row, allow_nan=False) + "\n")
                else:
                    sys.stdout.write(
                        f"{row['packet_id']}  {row['node_id'][:12]}  "
                        f"{row['intervention_type']}  delta={_cell(row['metric_delta'])}\n"
                    )
                seen += 1
            sys.stdout.flush()
            if count and seen >= count:
                return
    finally:
        stream.close()


# --------------------------------------------------------------------------- elections


def one_site(result: dict[str, Any]) -> bool:
    """True if a synthesis rests on one signer: its packets, however many, are one vote."""
    return result.get("distinct_signers") == 1


def one_backer(result: dict[str, Any]) -> bool:
    """True if the best intervention is backed by one signer (its interval has no width)."""
    return result.get("best_signers") == 1


ONE_SITE_NOTE = (
    "Evidence from one site: all {packets} packets come from one signer, and The Math keeps one "
    "vote per signer (its latest, so that a site cannot outvote others by emitting more). One "
    "vote has no spread, so there is no interval and no recommendation yet; it needs other "
    "sites' outcomes on this path."
)


def _interval(i: dict[str, Any]) -> str:
    if i.get("signers", 0) <= 1 or i.get("ci_low") == i.get("ci_high"):
        return "- (one signer)"
    return f"[{_cell(i['ci_low'])}, {_cell(i['ci_high'])}]"


def _print_synthesis(result: dict[str, Any]) -> None:
    lines = [f"{result.get('path')}: {result.get('status')}"]
    lines.append(
        f"  packets analyzed {result.get('packets_analyzed')}, distinct signers "
        f"{result.get('distinct_signers')}, template {str(result.get('template_id'))[:12]}"
    )
    if one_site(result):
        lines.append("  " + ONE_SITE_NOTE.format(packets=result.get("packets_analyzed")))
        if result.get("best_intervention"):
            lines.append(
                f"  That site reported '{result['best_intervention']}' with median delta "
                f"{_cell(result.get('best_delta'))}."
            )
    elif one_backer(result):
        lines.append(
            f"  Only one site backs '{result['best_intervention']}' (median delta "
            f"{_cell(result.get('best_delta'))}): one signer is one vote, and one vote has no "
            "interval, so this is not a recommendation yet."
        )
    elif result.get("recommendation"):
        lines.append(f"  {result['recommendation']}")
    elif result.get("reason"):
        lines.append(f"  {result['reason']}")
    interventions = result.get("interventions") or []
    if interventions:
        rows = [
            {
                "intervention": i["intervention"],
                "median": i["median_delta"],
                "ci": _interval(i),
                "signers": f"{i['kept_signers']}/{i['signers']}",
                "eligible": "yes" if i["eligible"] else "no",
            }
            for i in interventions
        ]
        table = _human_table(
            rows,
            [
                ("intervention", "INTERVENTION"),
                ("median", "MEDIAN DELTA"),
                ("ci", "INTERVAL"),
                ("signers", "SIGNERS KEPT/ALL"),
                ("eligible", "ELIGIBLE"),
            ],
        )
        lines.extend("  " + line for line in table.splitlines())
    sys.stdout.write("\n".join(lines) + "\n")


@app.command()
def synthesize(
    path: Path_,
    local: Annotated[bool, typer.Option("--local", help="Only this node's store.")] = False,
    data_dir: DataDir = None,
    as_json: Json = False,
) -> None:
    """What is working on a fingerprint path: The Math's ranked interventions."""
    result = _client(data_dir).synthesize(path, local=local)
    if as_json:
        _print_json(result)
    else:
        _print_synthesis(result)


# --------------------------------------------------------------------------- status / peers


@app.command()
def status(data_dir: DataDir = None, as_json: Json = False) -> None:
    """Node id, address (bound; as peers see it, and whether they can reach it), uptime, peers,
    store, followed paths, rejected-input counters."""
    s = _client(data_dir).status()
    if as_json:
        _print_json(s)
        return
    counters = s.get("counters", {})
    received = s.get("received", {})
    dht = s.get("dht", {})
    rejected = {k: v for k, v in counters.items() if "reject" in k and v}
    network = {
        "rejected": sum((dht.get("rejected") or {}).values()),
        "malformed": sum((dht.get("malformed") or {}).values()),
        "rate limited": dht.get("rate_limited", 0),
    }
    lines = [
        f"node      {s['node_id']}",
        f"dht id    {s.get('dht_id') or '-'}",
        f"address   {s.get('address') or '-'} (bound); "
        + _reach_line(s.get("reachability"), s.get("public_address")),
        f"data dir  {s['data_dir']}",
        f"uptime    {s['uptime_seconds']:.0f} s",
        f"peers     {s['peers']}",
        f"store     {s['packets']} envelopes ({s['local_packets']} emitted here) under "
        f"{s['keys']} keys, {s['store_bytes']} bytes",
        f"emitted   {_plural(counters.get('emits', 0), 'emit request')} "
        f"({_plural(counters.get('emit_commits', 0), 'commit')}): "
        f"{_plural(counters.get('packets_emitted', 0), 'new packet')}, "
        f"{counters.get('duplicate_packets', 0)} duplicates, "
        f"{_plural(counters.get('rows_emitted', 0), 'row')}; "
        f"publish backlog {s.get('publish_backlog', 0)} envelopes",
        f"received  {_plural(counters.get('received_envelopes', 0), 'envelope')} from peers "
        f"(stored here by peers {received.get('stored_by_peers', 0)}, through follows "
        f"{received.get('followed', 0)}, by fetches {received.get('fetched', 0)})",
        f"traffic   {dht.get('bytes_sent', 0)} bytes sent, {dht.get('bytes_received', 0)} "
        f"received; busy replies {dht.get('busy_sent', 0)} sent, {dht.get('busy_received', 0)} "
        f"received; sync backlog {dht.get('sync_backlog', 0)} keys, send queue "
        f"{dht.get('send_queue', 0)} requests",
        "rejected  "
        + (", ".join(f"{k} {v}" for k, v in sorted(rejected.items())) if rejected else "none")
        + " (local); network: "
        + ", ".join(f"{k} {v}" for k, v in network.items()),
        "followed  " + (", ".join(s["followed"]) if s["followed"] else "none"),
    ]
    for domain, hire in (s.get("templates") or {}).items():
        lines.append(
            f"template  {domain}: {hire['hired']} ({hire['reason']}; "
            f"{'/'.join(hire['fields'])} at levels {','.join(str(n) for n in hire['levels'])})"
        )
    for path, syn in (s.get("syntheses") or {}).items():
        best = syn.get("best_intervention")
        shown = f"best {best} ({_cell(syn.get('best_delta'))})" if best else syn.get("status")
        if one_site(syn) or one_backer(syn):
            shown = "one site only, no recommendation" + (f" (it reported {best})" if best else "")
        lines.append(f"  {path}: {shown}, {syn.get('packets_analyzed')} packets")
    sys.stdout.write("\n".join(lines) + "\n")


def _reach_line(reachability: str | None, public: str | None) -> str:
    """What ``status`` says of how peers reach this node."""
    seen = public or "not learned yet"
    if reachability == "public":
        return f"reachable at {seen}"
    if reachability == "unreachable":
        return f"seen as {seen}, not reachable from outside (NAT or firewall): client mode"
    return f"reachability not checked yet (seen as {seen}): client mode until it is"


@app.command()
def peers(data_dir: DataDir = None, as_json: Json = False) -> None:
    """The daemon's routing table."""
    table = _client(data_dir).peers()
    if as_json:
        _print_json(table)
        return
    if table:
        now = time.time()
        rows = [
            {
                "node_id": p.get("node_id") or "-",
                "host": p["host"],
                "port": p["port"],
                "last_seen": f"{max(0.0, now - p['last_seen']):.0f} s ago"
                if p.get("last_seen")
                else "never",
                "failures": p["failures"],
            }
            for p in table
        ]
        columns = [(k, k.upper().replace("_", " ")) for k in rows[0]]
        sys.stdout.write(_human_table(rows, columns) + "\n")
    _err(
        f"qisd: {_plural(len(table), 'peer')} (node ids as in status and query; "
        "--json also gives each 160-bit dht_id)"
    )


# --------------------------------------------------------------------------- templates


@template_app.command("publish")
def template_publish(
    file: Annotated[
        str,
        typer.Argument(
            metavar="FILE|-",
            help='JSON: {"domain": D, "fields": [...], "levels": [...], "note": "..."}.',
        ),
    ],
    data_dir: DataDir = None,
    as_json: Json = False,
) -> None:
    """Sign and publish a similarity template for a domain (a Hiring candidate)."""
    try:
        text = sys.stdin.read() if file == "-" else Path(file).read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot read {file}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise UsageError(f"{file} is not UTF-8 text") from None
    try:
        document = json.loads(text)
    except ValueError as exc:
        raise UsageError(f"{file} is not JSON ({exc})") from None
    if not isinstance(document, dict):
        raise UsageError(f"{file} must hold one JSON object")
    result = _client(data_dir).publish_template(document)
    if as_json:
        _print_json(result)
    else:
        sys.stdout.write(result["template_id"] + "\n")
        _err(f"qisd: published a template for {result['domain']} ({result['replicas']} replicas)")


@template_app.command("list")
def template_list(
    domain: Annotated[str, typer.Argument(help="Domain, e.g. clinical.oncology.")],
    data_dir: DataDir = None,
    as_json: Json = False,
) -> None:
    """The domain's candidate templates, their endorsers and weights, and which is hired."""
    result = _client(data_dir).templates(domain)
    if as_json:
        _print_json(result)
        return
    rows = [
        {
            "hired": "*" if t["hired"] else "",
            "id": t["template_id"],
            "fields": "/".join(t["fields"]),
            "levels": ",".join(str(n) for n in t["levels"]),
            "endorsers": t["endorsers"],
            "weight": "-" if t["weight"] is None else f"{t['weight']:.3f}",
            "state": "retired" if t["retired"] else "active",
            "note": t["note"],
        }
        for t in result["templates"]
    ]
    columns = [(k, k.upper()) for k in rows[0]] if rows else []
    sys.stdout.write(_human_table(rows, columns) + "\n")
    _err(f"qisd: {domain} routes by {result['hired']} ({result['reason']})")


@template_app.command("endorse")
def template_endorse(
    template_id: Annotated[str, typer.Argument(metavar="ID", help="Template id (40 hex).")],
    domain: Annotated[
        str | None, typer.Option(help="Its domain, if this node has not listed it yet.")
    ] = None,
    data_dir: DataDir = None,
    as_json: Json = False,
) -> None:
    """Sign and publish an endorsement of a template."""
    result = _client(data_dir).endorse_template(template_id, domain)
    if as_json:
        _print_json(result)
    else:
        _err(f"qisd: endorsed {template_id} for {result['domain']}")


@app.command()
def demo(
    nodes: Annotated[int, typer.Option(min=5, max=50, help="Nodes in the demo network.")] = 8,
    as_json: Json = False,
) -> None:
    """A local network on 127.0.0.1: three sites emit, a fourth finds them and synthesizes."""
    import logging

    from qisd.net.demo import main as run_demo

    logging.basicConfig(level=logging.ERROR)
    summary = run_demo(nodes, quiet=as_json)
    if as_json:
        _print_json(summary)


@app.command()
def version(as_json: Json = False) -> None:
    """Print the qisd version (also: qisd --version)."""
    if as_json:
        import platform

        import pyarrow

        from qisd.core.packet import WIRE_VERSION

        _print_json(
            {
                "qisd": __version__,
                "python": platform.python_version(),
                "pyarrow": pyarrow.__version__,
                "envelope_version": WIRE_VERSION,
            }
        )
    else:
        sys.stdout.write(f"qisd {__version__}\n")


class Shell(enum.StrEnum):
    """The shells typer writes completion scripts for."""

    bash = "bash"
    zsh = "zsh"
    fish = "fish"


@app.command()
def completion(
    shell: Annotated[Shell, typer.Argument(help="bash, zsh or fish.", case_sensitive=False)],
) -> None:
    """Print the completion script of SHELL (--show-completion picks the shell it runs in)."""
    from typer.completion import get_completion_script

    # typer's --show-completion takes no shell name: from zsh, `--show-completion bash`
    # printed a zsh script, and without a shell parent (a script, cron) nothing usable.
    script = get_completion_script(
        prog_name="qisd", complete_var="_QISD_COMPLETE", shell=shell.value
    )
    sys.stdout.write(script + "\n")


# --------------------------------------------------------------------------- entry point


def main(argv: list[str] | None = None) -> None:
    """The ``qisd`` console script: run a command; any error becomes one line and an exit code."""
    command = typer.main.get_command(app)
    args = _with_flight_default(sys.argv[1:] if argv is None else list(argv))
    try:
        code = command.main(args=args, prog_name="qisd", standalone_mode=False)
    except QisdError as exc:
        _err(f"qisd: error: {_one_line(str(exc))}")
        raise SystemExit(exc.exit_code) from None
    except typer.TyperException as exc:
        ctx = getattr(exc, "ctx", None)
        if type(exc).__name__ == "NoArgsIsHelpError":
            sys.stdout.write(exc.format_message() + "\n")
            raise SystemExit(0) from None
        hint = f" (see: {ctx.command_path} --help)" if ctx is not None else ""
        _err(f"qisd: error: {_one_line(exc.format_message())}{hint}")
        raise SystemExit(exc.exit_code) from None
    except typer.Abort:
        _err("qisd: aborted")
        raise SystemExit(130) from None
    except KeyboardInterrupt:
        _err("qisd: interrupted")
        raise SystemExit(130) from None
    except BrokenPipeError:
        sys.stderr.close()
        raise SystemExit(1) from None
    raise SystemExit(code if isinstance(code, int) else 0)


_OPTIONAL_VALUES = {"--flight": DEFAULT_FLIGHT_URI, "--metrics": DEFAULT_METRICS_ADDRESS}
"""Options of ``start`` whose value may be left out, and the value that then means."""


def _with_flight_default(args: list[str]) -> list[str]:
    """``qisd start --flight`` (or ``--metrics``) with no value after it means the default.

    The option parser only knows options that always or never take a value; these take an
    optional one, so a bare ``--flight`` (last, or followed by another option) gets the
    default filled in here.
    """
    if not args or args[0] != "start":
        return args
    out = list(args)
    i = 0
    while i < len(out):
        arg = out[i]
        if arg == "--":
            break
        if arg in _OPTIONAL_VALUES and (i + 1 == len(out) or out[i + 1].startswith("-")):
            out.insert(i + 1, _OPTIONAL_VALUES[arg])
        i += 1
    return out


def _one_line(text: str) -> str:
    return " ".join(text.split())


if __name__ == "__main__":
    main()
