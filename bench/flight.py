"""qisd's Flight endpoint against the article's in-memory Flight server, side by side, one run.

    python bench/flight.py                  # ~2 minutes on 2 cores
    python bench/flight.py --single 500 --repeat 1   # a quick look

Each server runs in its own process (the client in this one), on 127.0.0.1, port 0:

* **article**: the Flight server of ``seeds/000_3434fe7aac620327.txt``, rebuilt here from its
  description (not product code): a dict of record batches per descriptor path under a lock, a
  schema check per DoPut batch, one print per deposit (to /dev/null here), ``concat_tables`` of
  the stored batches on DoGet, streamed batch by batch (``GeneratorStream``: the article's
  ``RecordBatchStream(schema, iterator)`` raises TypeError in pyarrow).
* **qisd**: a real Node (data directory on disk, SQLite with fsync per commit, a lone DHT node)
  with :func:`qisd.net.flight.start_flight`; every row is validated, signed and stored durably.
* **floor**: a DoPut that reads the stream and keeps nothing (what the Flight call costs), and
  **durable floor**: read, one signature, one O_DSYNC write, a reply (the ceiling for any
  server that acknowledges only durable puts). Both take part in the single-row rounds only.

Measured, median of ``--repeat`` runs:

1. single-row DoPut/s: one stream per packet, the article's client pattern (``do_put``, write
   one row, ``close``), one client, sequential;
2. batched DoPut rows/s: one stream of ``--batched`` rows;
3. DoGet rows/s of ``--get-rows`` stored rows. The article's store is filled the way its
   single-row deposits leave it (one batch per row; it then streams one-row batches) and, for
   reference, with one big batch. qisd's store is filled by one batched DoPut; its first read
   decodes from SQLite ("cold"), later reads come from the per-key table cache ("warm").
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.flight as flight

from qisd.core.packet import SCHEMA

DOMAIN, PROBLEM = "clinical.oncology", "treatment_response_classification"
PATH = f"{DOMAIN}/{PROBLEM}"


# --------------------------------------------------------------------------- the article's server


class ArticleFlightServer(flight.FlightServerBase):
    """The article's QIS Flight server as it describes it: in memory, no signing, no disk."""

    def __init__(self, location: str) -> None:
        super().__init__(location)
        self._store: dict[str, list[pa.RecordBatch]] = defaultdict(list)
        self._lock = threading.Lock()
        self._deposits = 0

    @staticmethod
    def _key(descriptor: flight.FlightDescriptor) -> str:
        if descriptor.descriptor_type == flight.DescriptorType.PATH:
            return "/".join(p.decode() for p in descriptor.path)
        return descriptor.command.decode()

    def do_put(self, context, descriptor, reader, writer):  # noqa: ANN001
        key = self._key(descriptor)
        received = []
        for chunk in reader:
            if not chunk.data.schema.equals(SCHEMA):
                raise flight.FlightServerError("Schema mismatch: not the OutcomePacket schema")
            received.append(chunk.data)
        with self._lock:
            self._store[key].extend(received)
            self._deposits += len(received)
        print(f"deposited {len(received)} batch(es) at {key!r}; total {self._deposits}")

    def do_get(self, context, ticket):  # noqa: ANN001
        key = ticket.ticket.decode()
        with self._lock:
            stored = list(self._store.get(key, []))
        if not stored:
            return flight.RecordBatchStream(pa.Table.from_batches([], schema=SCHEMA))
        combined = pa.concat_tables([pa.Table.from_batches([b]) for b in stored]).to_batches()
        # The article writes RecordBatchStream(schema, iterator), which pyarrow refuses
        # (TypeError); GeneratorStream(schema, iterator) is the call that does what it means.
        return flight.GeneratorStream(SCHEMA, iter(combined))


class FloorFlightServer(flight.FlightServerBase):
    """A DoPut that reads the stream and keeps nothing: what the Flight call itself costs."""

    def do_put(self, context, descriptor, reader, writer):  # noqa: ANN001
        for _ in reader:
            pass


class DurableFloorFlightServer(flight.FlightServerBase):
    """The least a server can do and still keep this endpoint's promise for a put: read the
    stream, sign what it got (one Ed25519 signature), write it durably (one ``O_DSYNC`` write
    into a preallocated file, the cheapest durable write this disk offers; no B-tree, no
    validation), then acknowledge with a reply naming the packet. Its ratio to the article's
    server is the ceiling for any server that acknowledges only durable puts, here, now."""

    SLOTS = 4096

    def __init__(self, location: str, directory: str) -> None:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        super().__init__(location)
        self._key = Ed25519PrivateKey.generate()
        path = Path(directory) / "durable-floor.log"
        # Zeros written and synced up front: a write into merely fallocated (unwritten) extents
        # would make every O_DSYNC write a metadata commit too.
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        os.write(self._fd, bytes(self.SLOTS * 4096))
        os.fsync(self._fd)
        os.close(self._fd)
        self._fd = os.open(path, os.O_RDWR | os.O_DSYNC)
        self._slot = 0
        self._lock = threading.Lock()

    def do_put(self, context, descriptor, reader, writer):  # noqa: ANN001
        data = reader.read_all()
        body = b"".join(b.serialize().to_pybytes() for b in data.to_batches())[:3968]
        record = body + self._key.sign(body)
        with self._lock:
            os.pwrite(self._fd, record, (self._slot % self.SLOTS) * 4096)
            self._slot += 1
        writer.write(pa.py_buffer(json.dumps({"packet_ids": [record[-16:].hex()]}).encode()))


# --------------------------------------------------------------------------- server processes


def _serve_article(kind: str = "article", *args: str) -> None:
    sys.stdout.flush()
    real_stdout = os.dup(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)  # the per-deposit print goes nowhere, as fast as it can
    if kind == "durable-floor":
        server: flight.FlightServerBase = DurableFloorFlightServer("grpc://127.0.0.1:0", *args)
    else:
        make = FloorFlightServer if kind == "floor" else ArticleFlightServer
        server = make("grpc://127.0.0.1:0")
    os.write(real_stdout, (json.dumps({"port": server.port}) + "\n").encode())
    sys.stdin.read()
    server.shutdown()


def _serve_qisd(data_dir: str) -> None:
    import uvloop

    from qisd.config import NodeConfig
    from qisd.net import datadir
    from qisd.net.flight import start_flight
    from qisd.net.node import Node

    if not (Path(data_dir) / datadir.KEY_FILE).exists():  # a restart keeps its identity
        datadir.init_identity(data_dir)
    empty = Path(data_dir) / "no-peers.txt"
    empty.write_text("# a lone node\n")
    config = NodeConfig(data_dir=data_dir, host="127.0.0.1", port=0, bootstrap_file=str(empty))

    async def main() -> None:
        node = await Node.open(config)
        handle = await start_flight(node, "grpc://127.0.0.1:0")
        print(json.dumps({"port": handle.port}), flush=True)
        await asyncio.to_thread(sys.stdin.read)
        await handle.close()
        await node.close()

    uvloop.run(main())


@contextlib.contextmanager
def server(kind: str, *args: str):
    proc = subprocess.Popen(
        [sys.executable, __file__, f"serve-{kind}", *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        if not line:
            raise SystemExit(f"the {kind} server did not start")
        yield f"grpc://127.0.0.1:{json.loads(line)['port']}"
    finally:
        proc.stdin.close()
        proc.wait(60)


# --------------------------------------------------------------------------- workloads


def rows_table(n: int, start: int = 0) -> pa.Table:
    """``n`` distinct valid outcome rows with the article's 15 columns."""
    index = np.arange(start, start + n)
    now = time.time_ns() // 1_000_000

    def text(value: str) -> pa.Array:
        return pa.array([value] * n, pa.string())

    return pa.table(
        {
            "node_id": text("bench-client"),
            "timestamp_utc": pa.array(np.full(n, now, np.int64)),
            "domain": text(DOMAIN),
            "problem_type": text(PROBLEM),
            "model_architecture": text("transformer-256d"),
            "training_phase": text("epoch_5_of_50"),
            "metric_name": text("val_auc"),
            "metric_delta": pa.array((index % 1000) / 10_000, pa.float32()),
            "metric_value": pa.array(np.full(n, 0.847, np.float32)),
            "confidence": pa.array(np.full(n, 0.91, np.float32)),
            "intervention_type": text("learning_rate_schedule"),
            "intervention_params": text('{"schedule":"cosine_annealing","T_max":10}'),
            "outcome_decile": pa.array(np.full(n, 8, np.int8)),
            "sample_count": pa.array(index.astype(np.int32)),
            "raw_data_hash": text("5f2b1c0d9e8a7b6c"),
        },
        schema=SCHEMA,
    )


DESCRIPTOR = flight.FlightDescriptor.for_path(DOMAIN, PROBLEM)


def single_puts(location: str, n: int, start: int) -> float:
    """Single-row DoPut/s: a new stream per packet, as the article's node deposits."""
    client = flight.FlightClient(location)
    packets = rows_table(n, start).to_batches(max_chunksize=1)
    t0 = time.perf_counter()
    for packet in packets:
        writer, _ = client.do_put(DESCRIPTOR, packet.schema)
        writer.write(packet)
        writer.close()
    elapsed = time.perf_counter() - t0
    client.close()
    return n / elapsed


def batched_put(location: str, n: int, start: int, *, one_row_batches: bool = False) -> float:
    """Rows/s of one DoPut stream of ``n`` rows."""
    client = flight.FlightClient(location)
    table = rows_table(n, start)
    batches = table.to_batches(max_chunksize=1 if one_row_batches else n)
    t0 = time.perf_counter()
    writer, _ = client.do_put(DESCRIPTOR, table.schema)
    for batch in batches:
        writer.write_batch(batch)
    writer.close()
    elapsed = time.perf_counter() - t0
    client.close()
    return n / elapsed


def get_rate(location: str, ticket: bytes, expect: int) -> float:
    client = flight.FlightClient(location)
    t0 = time.perf_counter()
    rows = 0
    for chunk in client.do_get(flight.Ticket(ticket)):
        rows += chunk.data.num_rows
    elapsed = time.perf_counter() - t0
    client.close()
    if rows != expect:
        raise SystemExit(f"DoGet returned {rows} rows, expected {expect}")
    return rows / elapsed


def fdatasync_us(directory: str, n: int = 300) -> float:
    """Median microseconds of one 1 KiB append + fdatasync in ``directory`` (the disk's floor
    for an acknowledged durable write)."""
    path = Path(directory) / "sync-probe"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    times = []
    try:
        for _ in range(n):
            t0 = time.perf_counter()
            os.write(fd, b"x" * 1024)
            os.fdatasync(fd)
            times.append(time.perf_counter() - t0)
    finally:
        os.close(fd)
    return statistics.median(times) * 1e6


def median(fn: Callable[[int], float], repeat: int) -> float:
    return statistics.median(fn(i) for i in range(repeat))


def concurrent_puts(location: str, writers: int, n: int, start: int) -> float:
    """Single-row DoPut/s of ``writers`` clients putting ``n`` rows each at once (one thread
    and one connection per client, the article's pattern in each)."""
    barrier = threading.Barrier(writers + 1)
    done: list[float] = []

    def one(w: int) -> None:
        client = flight.FlightClient(location)
        packets = rows_table(n, start + w * n).to_batches(max_chunksize=1)
        barrier.wait()
        for packet in packets:
            writer, _ = client.do_put(DESCRIPTOR, packet.schema)
            writer.write(packet)
            writer.close()
        done.append(time.perf_counter())
        client.close()

    threads = [threading.Thread(target=one, args=(w,)) for w in range(writers)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    return writers * n / (max(done) - t0)


def fill_article(location: str, rows: int, *, one_row_batches: bool) -> None:
    """The article's store holding ``rows`` rows: one batch per single-row deposit, or one."""
    client = flight.FlightClient(location)
    table = rows_table(rows)
    writer, _ = client.do_put(DESCRIPTOR, table.schema)
    for batch in table.to_batches(max_chunksize=1 if one_row_batches else rows):
        writer.write_batch(batch)
    writer.close()
    client.close()


def fill_qisd(location: str, rows: int, start: int = 0) -> None:
    """``rows`` rows put into qisd in DoPuts of at most 100,000 rows (its per-stream limit)."""
    for offset in range(0, rows, 100_000):
        batched_put(location, min(100_000, rows - offset), start + offset)


def signed_by_many(data_dir: str, rows: int, signers: int) -> None:
    """A store holding ``rows`` one-row packets of ``signers`` other nodes under one key, as
    a DHT holder gets them (remote puts of verified envelopes), built without a daemon."""
    from qisd.config import StoreLimits
    from qisd.core import packet as P
    from qisd.core.crypto import Identity
    from qisd.core.fingerprint import DEFAULT_TEMPLATE, key_for_path
    from qisd.net import datadir
    from qisd.net.store import Store

    datadir.init_identity(data_dir)
    fields = DEFAULT_TEMPLATE.fields_at(DEFAULT_TEMPLATE.levels[0])
    key = key_for_path(PATH)
    table = rows_table(rows)
    identities = [Identity.generate() for _ in range(signers)]
    store = Store.open(data_dir, limits=StoreLimits(), ttl_ms=30 * 86_400_000)
    now = time.time_ns() // 1_000_000
    try:
        batch: list[P.Envelope] = []
        for i in range(rows):
            ident = identities[i % signers]
            one = table.slice(i, 1).set_column(0, "node_id", pa.array([ident.node_id]))
            body = P._deflate(one.combine_chunks().to_batches()[0].serialize().to_pybytes())
            batch.append(
                P.seal(ident, P.KIND_PACKET, key, body, fields=fields, timestamp_ms=now, rows=1)
            )
            if len(batch) == 1000 or i == rows - 1:
                result = store.put(batch, now_ms=now, origin=f"10.0.0.{i % signers}:9000")
                assert not result.refused, result.refused[:1]
                batch = []
    finally:
        store.close()


def batched_steps(directory: str, n: int) -> dict[str, float]:
    """Seconds per step of a ``n``-row emit, the steps ``Node._commit`` runs, timed in this
    process on a store of its own: validation, sealing (IPC, zlib, signatures), the durable
    put (one transaction), the view's first read (the queued rows built), and a full scan."""
    from qisd.config import StoreLimits
    from qisd.core import packet as P
    from qisd.core.fingerprint import DEFAULT_TEMPLATE, key_for_path
    from qisd.net import datadir
    from qisd.net.store import Store

    datadir.init_identity(directory)
    ident = datadir.load_identity(directory)
    routes = [DEFAULT_TEMPLATE.fields_at(level) for level in DEFAULT_TEMPLATE.levels]
    table = rows_table(n, 50_000_000).drop_columns(["node_id"])
    store = Store.open(directory, limits=StoreLimits(), ttl_ms=30 * 86_400_000)
    try:
        now = time.time_ns() // 1_000_000
        t0 = time.perf_counter()
        rows, _ = P.build_table_rows(table, ident, now_ms=now, lifetime_ms=30 * 86_400_000)
        t1 = time.perf_counter()
        groups = P.pack_rows(ident, rows, routes)
        t2 = time.perf_counter()
        store.put([e for g in groups for e in g], now_ms=now, local=True)
        t3 = time.perf_counter()
        key = key_for_path(PATH)
        first = sum(b.num_rows for b in store.scan(key, now_ms=now))
        t4 = time.perf_counter()
        again = sum(b.num_rows for b in store.scan(key, now_ms=now))
        t5 = time.perf_counter()
        assert first == again == n
    finally:
        store.close()
    return {
        "validate_s": t1 - t0,
        "seal_s": t2 - t1,
        "commit_s": t3 - t2,
        "view_build_s": t4 - t3,
        "scan_s": t5 - t4,
    }


def single_steps(directory: str, n: int) -> dict[str, float]:
    """Median microseconds per step of a one-row emit (as a single-row DoPut runs it, minus
    Flight), timed in this process: validation, sealing (two signatures), the durable put."""
    from qisd.config import StoreLimits
    from qisd.core import packet as P
    from qisd.core.fingerprint import DEFAULT_TEMPLATE
    from qisd.net import datadir
    from qisd.net.store import Store

    datadir.init_identity(directory)
    ident = datadir.load_identity(directory)
    routes = [DEFAULT_TEMPLATE.fields_at(level) for level in DEFAULT_TEMPLATE.levels]
    tables = [rows_table(1, 60_000_000 + i).drop_columns(["node_id"]) for i in range(n)]
    steps: dict[str, list[float]] = {"validate_us": [], "seal_us": [], "put_us": []}
    store = Store.open(directory, limits=StoreLimits(), ttl_ms=30 * 86_400_000)
    try:
        for table in tables:
            now = time.time_ns() // 1_000_000
            t0 = time.perf_counter()
            rows, _ = P.build_table_rows(table, ident, now_ms=now, lifetime_ms=30 * 86_400_000)
            t1 = time.perf_counter()
            groups = P.pack_rows(ident, rows, routes)
            t2 = time.perf_counter()
            store.put([e for g in groups for e in g], now_ms=now, local=True)
            t3 = time.perf_counter()
            for name, dt in zip(steps, (t1 - t0, t2 - t1, t3 - t2), strict=True):
                steps[name].append(dt * 1e6)
    finally:
        store.close()
    return {name: statistics.median(v) for name, v in steps.items()}


def run(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {"article": {}, "qisd": {}, "floor": {}, "durable-floor": {}}
    a, q, floor = out["article"], out["qisd"], out["floor"]
    rows = args.get_rows
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="qisd-bench-", dir=args.tmp))
        locations = {
            "floor": stack.enter_context(server("floor")),
            "durable-floor": stack.enter_context(server("durable-floor", tmp)),
            "article": stack.enter_context(server("article")),
            "qisd": stack.enter_context(server("qisd", str(Path(tmp) / "puts"))),
        }
        # Single-row puts: the servers in turn within each round, so a slow spell of
        # this shared machine hits all of them; the ratio is the median of per-round ratios.
        rounds = []
        for i in range(args.repeat):
            rounds.append(
                {
                    name: single_puts(location, args.single, i * args.single)
                    for name, location in locations.items()
                }
            )
            rounds[-1]["fdatasync_us"] = fdatasync_us(tmp)
        for name in locations:
            out[name]["single_put_per_s"] = statistics.median(r[name] for r in rounds)
            out[name]["single_put_ratio"] = statistics.median(
                r[name] / r["article"] for r in rounds
            )
        q["single_put_vs_durable"] = statistics.median(
            r["qisd"] / r["durable-floor"] for r in rounds
        )
        floor["fdatasync_us"] = statistics.median(r["fdatasync_us"] for r in rounds)
        # Eight writers at once, in turn within each round as above.
        per = max(1, args.single // 8)
        crowd = [
            {
                name: concurrent_puts(locations[name], 8, per, 20_000_000 + i * 8 * per)
                for name in ("article", "durable-floor", "qisd")
            }
            for i in range(args.repeat)
        ]
        for name in ("article", "durable-floor", "qisd"):
            out[name]["put8_per_s"] = statistics.median(r[name] for r in crowd)
        q["put8_ratio"] = statistics.median(r["qisd"] / r["article"] for r in crowd)
        a["batched_put_rows_per_s"] = median(
            lambda i: batched_put(locations["article"], args.batched, 0), args.repeat
        )
        q["batched_put_rows_per_s"] = median(
            lambda i: batched_put(locations["qisd"], args.batched, 10_000_000 * (i + 1)),
            args.repeat,
        )
    with tempfile.TemporaryDirectory(prefix="qisd-bench-", dir=args.tmp) as tmp:
        q.update(batched_steps(str(Path(tmp) / "steps"), args.batched))
        q.update(single_steps(str(Path(tmp) / "single"), min(args.single, 1000)))
    # DoGet. The article's server as its single-row deposits leave it (one batch per put), and
    # holding one batch (the best case of its DoGet); qisd read live, cold, and as a holder.
    for n in sorted({rows, *args.cold_rows}):
        with server("article") as location:
            fill_article(location, n, one_row_batches=False)
            a[f"get_one_batch_{n}"] = median(
                lambda i, loc=location, n=n: get_rate(loc, PATH.encode(), n), args.repeat
            )
    with server("article") as location:
        fill_article(location, rows, one_row_batches=True)
        a["get_one_row_batches"] = median(
            lambda i: get_rate(location, PATH.encode(), rows), args.repeat
        )
    with tempfile.TemporaryDirectory(prefix="qisd-bench-", dir=args.tmp) as tmp:
        data = str(Path(tmp) / "live")
        with server("qisd", data) as location:
            fill_qisd(location, rows)
            live = []
            for i in range(args.repeat):
                single_puts(location, 1, 30_000_000 + i)  # the key changes, then is read
                live.append(get_rate(location, PATH.encode(), rows + i + 1))
            q["get_live"] = statistics.median(live)
            q["get_warm"] = get_rate(location, PATH.encode(), rows + args.repeat)
        with server("qisd", data) as location:  # qisd stop, qisd start: a cold read
            q[f"get_cold_{rows}"] = get_rate(location, PATH.encode(), rows + args.repeat)
    for n in args.cold_rows:
        if n == rows:
            continue
        with tempfile.TemporaryDirectory(prefix="qisd-bench-", dir=args.tmp) as tmp:
            data = str(Path(tmp) / "cold")
            with server("qisd", data) as location:
                fill_qisd(location, n)
            with server("qisd", data) as location:
                q[f"get_cold_{n}"] = get_rate(location, PATH.encode(), n)
    with tempfile.TemporaryDirectory(prefix="qisd-bench-", dir=args.tmp) as tmp:
        data = str(Path(tmp) / "holder")
        signed_by_many(data, rows, 20)
        with server("qisd", data) as location:
            q["get_holder_cold"] = get_rate(location, PATH.encode(), rows)
            q["get_holder"] = median(lambda i: get_rate(location, PATH.encode(), rows), args.repeat)
    return out


def report(result: dict[str, dict[str, float]], args: argparse.Namespace) -> str:
    a, q = result["article"], result["qisd"]
    floor, durable = result["floor"], result["durable-floor"]
    rows = args.get_rows
    lines = [
        f"single-row puts {args.single} x{args.repeat}; 8 writers x {max(1, args.single // 8)};"
        f" batched {args.batched}; DoGet of {rows} rows (cold also {list(args.cold_rows)});"
        f" medians of {args.repeat}",
        "",
        f"{'pattern (qisd against)':62} {'against':>11} {'qisd':>11} {'ratio':>7} {'goal':>7}",
    ]

    def line(name: str, base: float, qv: float, goal: str, ratio: float | None = None) -> None:
        r = qv / base if ratio is None else ratio
        lines.append(f"{name:62} {base:11,.0f} {qv:11,.0f} {r:6.2f}x {goal:>7}")

    one = a[f"get_one_batch_{rows}"]
    line(
        f"DoGet rows/s, live key, {rows:,} rows (article: one batch)", one, q["get_live"], ">=1.0x"
    )
    for n in sorted({rows, *args.cold_rows}):
        line(
            f"DoGet rows/s, cold after stop/start, {n:,} rows (one batch)",
            a[f"get_one_batch_{n}"],
            q[f"get_cold_{n}"],
            ">=1.0x",
        )
    line(
        f"DoGet rows/s, {rows:,} one-row packets of 20 signers (one/put)",
        a["get_one_row_batches"],
        q["get_holder"],
        ">=1.0x",
    )
    line("  the same against the article holding one batch", one, q["get_holder"], ">=0.5x")
    line(
        "single-row DoPut/s, one writer, against the durable floor",
        durable["single_put_per_s"],
        q["single_put_per_s"],
        ">=0.8x",
        q["single_put_vs_durable"],
    )
    line(
        "single-row DoPut/s, 8 concurrent writers (article: 8 writers)",
        a["put8_per_s"],
        q["put8_per_s"],
        ">=1.0x",
        q["put8_ratio"],
    )
    line(
        "batched DoPut rows/s, one stream",
        a["batched_put_rows_per_s"],
        q["batched_put_rows_per_s"],
        "state",
    )
    lines += [
        "",
        "reference figures:",
        f"  single-row DoPut/s: article {a['single_put_per_s']:,.0f}, qisd "
        f"{q['single_put_per_s']:,.0f} ({q['single_put_ratio']:.2f}x), durable floor "
        f"{durable['single_put_per_s']:,.0f} ({durable['single_put_ratio']:.2f}x), floor "
        f"{floor['single_put_per_s']:,.0f}",
        f"  us per single-row DoPut: article {1e6 / a['single_put_per_s']:,.0f}, qisd "
        f"{1e6 / q['single_put_per_s']:,.0f}, durable floor "
        f"{1e6 / durable['single_put_per_s']:,.0f}, floor {1e6 / floor['single_put_per_s']:,.0f};"
        f" 1 KiB append + fdatasync {floor['fdatasync_us']:,.0f}",
        f"  one-row emit in process, us: validate {q['validate_us']:,.0f}, seal (IPC, zlib, two"
        f" signatures) {q['seal_us']:,.0f}, durable put {q['put_us']:,.0f}",
        f"  8 writers, DoPut/s: durable floor {durable['put8_per_s']:,.0f}",
        f"  batched emit of {args.batched:,} rows in process, s: validate "
        f"{q['validate_s']:.2f}, seal {q['seal_s']:.2f}, commit {q['commit_s']:.2f}, view "
        f"rows built on first read {q['view_build_s']:.2f}, a second full scan "
        f"{q['scan_s']:.3f}",
        f"  DoGet rows/s: qisd warm {q['get_warm']:,.0f}; holder's first read after start "
        f"{q['get_holder_cold']:,.0f}",
    ]
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in ("serve-article", "serve-floor", "serve-durable-floor"):
        return _serve_article(sys.argv[1].removeprefix("serve-"), *sys.argv[2:])
    if len(sys.argv) > 1 and sys.argv[1] == "serve-qisd":
        return _serve_qisd(sys.argv[2])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--single", type=int, default=2000, help="single-row DoPuts per run")
    parser.add_argument("--batched", type=int, default=100_000, help="rows in the batched DoPut")
    parser.add_argument("--get-rows", type=int, default=100_000, help="stored rows to DoGet")
    parser.add_argument(
        "--cold-rows",
        type=int,
        nargs="*",
        default=[100_000, 1_000_000],
        help="stored rows for the cold DoGet after a restart",
    )
    parser.add_argument("--repeat", type=int, default=3, help="runs per measure (median)")
    parser.add_argument("--tmp", default=None, help="where qisd's data directories go")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON too")
    args = parser.parse_args()
    result = run(args)
    print(report(result, args))
    if args.json:
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
