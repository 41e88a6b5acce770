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
        floor["fdatasync_us"] = statistics.median(r["fdatasync_us"] for r in rounds)
        a["batched_put_rows_per_s"] = median(
            lambda i: batched_put(locations["article"], args.batched, 0), args.repeat
        )
        q["batched_put_rows_per_s"] = median(
            lambda i: batched_put(locations["qisd"], args.batched, 10_000_000 * (i + 1)),
            args.repeat,
        )
    with server("article") as location:
        # Its store as single-row deposits leave it: one batch per row.
        batched_put(location, rows, 0, one_row_batches=True)
        a["get_rows_per_s"] = median(lambda i: get_rate(location, PATH.encode(), rows), args.repeat)
    with server("article") as location:
        batched_put(location, rows, 0)
        a["get_rows_per_s_one_batch"] = median(
            lambda i: get_rate(location, PATH.encode(), rows), args.repeat
        )
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="qisd-bench-", dir=args.tmp))
        location = stack.enter_context(server("qisd", str(Path(tmp) / "gets")))
        batched_put(location, rows, 0)
        q["get_rows_per_s_cold"] = get_rate(location, PATH.encode(), rows)
        q["get_rows_per_s"] = median(lambda i: get_rate(location, PATH.encode(), rows), args.repeat)
        q["get_rows_per_s_local"] = median(
            lambda i: get_rate(location, b"local:" + PATH.encode(), rows), args.repeat
        )
    return out


def report(result: dict[str, dict[str, float]], args: argparse.Namespace) -> str:
    a, q = result["article"], result["qisd"]
    lines = [
        f"rows: single {args.single} x{args.repeat}, batched {args.batched}, "
        f"DoGet of {args.get_rows} stored rows (medians of {args.repeat})",
        f"{'measure':44} {'article':>12} {'qisd':>12} {'ratio':>7} {'goal':>6}",
    ]

    def line(name: str, av: float, qv: float, goal: str = "") -> None:
        lines.append(f"{name:44} {av:12,.0f} {qv:12,.0f} {qv / av:6.2f}x {goal:>6}")

    floor = result["floor"]
    lines.append(
        f"{'single-row DoPut/s (stream per packet)':44} {a['single_put_per_s']:12,.0f} "
        f"{q['single_put_per_s']:12,.0f} {q['single_put_ratio']:6.2f}x {'>=1.0x':>6}"
    )
    us = {name: 1e6 / v["single_put_per_s"] for name, v in (("article", a), ("qisd", q))}
    lines.append(f"{'  us per single-row DoPut':44} {us['article']:12,.0f} {us['qisd']:12,.0f}")
    floor_us = 1e6 / floor["single_put_per_s"]
    lines.append(f"{'  us per DoPut that keeps nothing (floor)':44} {floor_us:12,.0f}")
    lines.append(f"{'  us per 1 KiB append + fdatasync here':44} {floor['fdatasync_us']:12,.0f}")
    # Read, sign once, one O_DSYNC write, reply: the ceiling of a server that acknowledges
    # only durable puts (see DurableFloorFlightServer), measured in the same rounds.
    durable = result["durable-floor"]
    lines.append(
        f"{'  durable floor (read, sign, O_DSYNC, reply)':44} {'':12} "
        f"{1e6 / durable['single_put_per_s']:12,.0f} {durable['single_put_ratio']:6.2f}x"
    )
    line("batched DoPut rows/s", a["batched_put_rows_per_s"], q["batched_put_rows_per_s"])
    line(
        "DoGet rows/s (warm; article: one-row batches)",
        a["get_rows_per_s"],
        q["get_rows_per_s"],
        ">=3x",
    )
    line("DoGet rows/s, local: ticket (warm)", a["get_rows_per_s"], q["get_rows_per_s_local"])
    line(
        "DoGet rows/s, cold (first read from SQLite)", a["get_rows_per_s"], q["get_rows_per_s_cold"]
    )
    line(
        "DoGet rows/s vs article holding one big batch",
        a["get_rows_per_s_one_batch"],
        q["get_rows_per_s"],
    )
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
