"""Resource figures of a node holding many packets: store bytes, RSS, sockets, read speed.

    .venv/bin/python bench/resources.py                  # 1,000,000 packets (several minutes)
    .venv/bin/python bench/resources.py --packets 100000 --keep /tmp/qisd-bench

Fills a store directly with ``Store.put`` in batches (remote packets from ``--signers`` signers
spread over ``--keys`` keys, the way a DHT holder fills up), then measures, and prints:

* store file bytes per packet (main file + WAL) and envelope bytes per packet;
* fill rate, ``table()`` cold/cached and ``page()`` speed on one key;
* RSS of this process after the fill, and of a fresh process that opens the store and reads;
* a real ``qisd start`` daemon on that data directory: start time, RSS, open sockets and
  descriptors, and one local query through the client.

Envelopes are built fast (one Arrow table sliced per packet, sealed with the signer's key), so
making a million is minutes, not hours; each is a valid packet of one row.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa

from qisd.config import StoreLimits
from qisd.core import packet as P
from qisd.core.crypto import Identity
from qisd.core.fingerprint import key_for_path
from qisd.net.datadir import init_identity
from qisd.net.store import Store

NOW = time.time_ns() // 1_000_000
"""Packets are stamped now, so the daemon started on the store (real clock) sees them."""
TTL_MS = 30 * 86_400_000
FIELDS = ("domain", "problem_type")


def rss(pid: int | str = "self") -> int:
    """Resident set size in bytes from /proc."""
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def descriptors(pid: int) -> tuple[int, int]:
    """(open descriptors, of which sockets) of a process."""
    fds = os.listdir(f"/proc/{pid}/fd")
    sockets = 0
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:"):
                sockets += 1
        except OSError:
            pass
    return len(fds), sockets


def signer_rows(ident: Identity, n: int, problem: str) -> pa.Table:
    base = {
        "domain": "clinical.oncology",
        "problem_type": problem,
        "model_architecture": "transformer-256d",
        "training_phase": "epoch_5_of_50",
        "metric_name": "val_auc",
        "metric_value": 0.847,
        "metric_delta": 0.0,
        "confidence": 0.91,
        "intervention_type": "learning_rate_schedule",
        "intervention_params": {"schedule": "cosine_annealing", "T_max": 10},
        "outcome_decile": 8,
        "sample_count": 1240,
        "timestamp_utc": NOW,
    }
    records = [dict(base, metric_delta=round(i * 1e-6, 7)) for i in range(n)]
    return pa.Table.from_pylist(P.build_rows(records, ident, now_ms=NOW), schema=P.SCHEMA)


def envelopes(ident: Identity, problem: str, n: int) -> list[P.Envelope]:
    """``n`` one-row packets of ``ident`` under the key of ``clinical.oncology/<problem>``."""
    table = signer_rows(ident, n, problem).combine_chunks()
    key = key_for_path(f"clinical.oncology/{problem}")
    out = []
    for batch in table.to_batches(max_chunksize=1):
        body = P._deflate(batch.serialize().to_pybytes())
        out.append(P.seal(ident, P.KIND_PACKET, key, body, fields=FIELDS, timestamp_ms=NOW, rows=1))
    return out


def _make(job: tuple[bytes, str, int, int]) -> list[P.Envelope]:
    private, problem, n, now = job
    global NOW
    NOW = now
    return envelopes(Identity.from_bytes(private, bytes(32)), problem, n)


def fill(store: Store, packets: int, keys: int, signers: int) -> tuple[float, int]:
    """Envelopes are made in worker processes (zlib level 9 dominates); puts of 1,000."""
    privates = [Identity.generate().private_bytes() for _ in range(signers)]
    per_cell = max(1, packets // (keys * signers))
    jobs = []
    planned, k = 0, 0
    while planned < packets:
        for private in privates:
            n = min(per_cell, packets - planned)
            if n <= 0:
                break
            jobs.append((private, f"bench_{k % keys}", n, NOW))
            planned += n
        k += 1
    done = env_bytes = 0
    t0 = last = time.perf_counter()
    with concurrent.futures.ProcessPoolExecutor() as pool:
        for envs in pool.map(_make, jobs, chunksize=1):
            for i in range(0, len(envs), 1000):
                store.put(envs[i : i + 1000], now_ms=NOW)
            done += len(envs)
            env_bytes += sum(len(e.raw) for e in envs)
            if time.perf_counter() - last > 10:
                last = time.perf_counter()
                rate = done / (last - t0)
                print(f"  {done:,} packets, {rate:,.0f}/s", file=sys.stderr, flush=True)
    return time.perf_counter() - t0, env_bytes


def read_figures(store: Store, key: bytes) -> dict[str, float]:
    t0 = time.perf_counter()
    table = store.table(key, now_ms=NOW)
    cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    store.table(key, now_ms=NOW)
    cached = time.perf_counter() - t0
    t0 = time.perf_counter()
    cursor, pages, got = 0, 0, 0
    while True:
        raws, cursor, more = store.page(key, since=cursor, max_bytes=7_000, now_ms=NOW)
        pages += 1
        got += len(raws)
        if not more:
            break
    paged = time.perf_counter() - t0
    return {
        "rows": table.num_rows,
        "table_cold_s": cold,
        "table_cached_s": cached,
        "page_envelopes_per_s": got / paged if paged else 0.0,
        "pages": pages,
    }


FRESH = """
import sys, time
from qisd.config import StoreLimits
from qisd.net.store import Store
from qisd.core.fingerprint import key_for_path
sys.path.insert(0, {bench!r})
from resources import rss
t0 = time.perf_counter()
s = Store.open({path!r}, limits=StoreLimits(max_bytes=1 << 40), ttl_ms={ttl})
opened = time.perf_counter() - t0
before = rss()
t0 = time.perf_counter()
n = s.table(key_for_path("clinical.oncology/bench_0"), now_ms={now}).num_rows
print(opened, time.perf_counter() - t0, before, rss(), n)
"""


def daemon_figures(data_dir: Path) -> dict[str, float]:
    qisd = Path(sys.executable).with_name("qisd")
    env = {k: v for k, v in os.environ.items() if not k.startswith("QISD_")}
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [
            str(qisd),
            "start",
            "--data-dir",
            str(data_dir),
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--bootstrap-file",
            os.devnull,
            "--log-level",
            "warning",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
    )
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline().decode()
        started = time.perf_counter() - t0
        assert line.startswith("qisd listening"), line
        from qisd import Client

        with Client(data_dir, timeout=600) as client:
            t0 = time.perf_counter()
            rows = client.query("clinical.oncology/bench_0", local=True).num_rows
            query = time.perf_counter() - t0
            status = client.status()
        fds, socks = descriptors(proc.pid)
        return {
            "start_s": started,
            "rss": rss(proc.pid),
            "descriptors": fds,
            "sockets": socks,
            "query_rows": rows,
            "query_s": query,
            "status_packets": status.get("packets", -1),
        }
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--packets", type=int, default=1_000_000)
    ap.add_argument("--keys", type=int, default=1_000)
    ap.add_argument("--signers", type=int, default=20)
    ap.add_argument("--keep", help="data directory to fill and keep (default: a temporary one)")
    ap.add_argument("--no-daemon", action="store_true", help="skip the qisd start figures")
    args = ap.parse_args()
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="qisd-bench-"))
    data_dir = root / "node"
    try:
        init_identity(data_dir)
        rss0 = rss()
        store = Store.open(data_dir, limits=StoreLimits(max_bytes=1 << 40), ttl_ms=TTL_MS)
        print(
            f"filling {args.packets:,} packets over {args.keys} keys from {args.signers} "
            f"signers into {data_dir}",
            file=sys.stderr,
        )
        seconds, env_bytes = fill(store, args.packets, args.keys, args.signers)
        stats = store.stats()
        reads = read_figures(store, key_for_path("clinical.oncology/bench_0"))
        rss_fill = rss()
        store.close()
        file_bytes = sum(
            p.stat().st_size for p in data_dir.iterdir() if p.name.startswith("store.sqlite3")
        )
        fresh = subprocess.run(
            [
                sys.executable,
                "-c",
                FRESH.format(
                    bench=str(Path(__file__).parent), path=str(data_dir), ttl=TTL_MS, now=NOW
                ),
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        n = stats["packets"]
        print(f"\nqisd resources at {n:,} stored packets ({stats['keys']} keys)")
        print(f"  fill: {seconds:.0f} s, {n / seconds:,.0f} packets/s (1,000 per put)")
        print(f"  envelope bytes/packet:        {env_bytes / n:,.0f}")
        print(
            f"  store file bytes/packet:      {file_bytes / n:,.0f}  ({file_bytes / 1e6:,.0f} MB)"
        )
        print(
            f"  RSS of the filling process:   {rss_fill / 1e6:,.0f} MB "
            f"(+{(rss_fill - rss0) / 1e6:,.0f} MB, {(rss_fill - rss0) / n:,.1f} B/packet)"
        )
        print(
            f"  fresh process: open {float(fresh[0]) * 1e3:,.0f} ms, RSS "
            f"{int(fresh[2]) / 1e6:,.0f} MB, after a {fresh[4]}-row table() "
            f"{int(fresh[3]) / 1e6:,.0f} MB ({float(fresh[1]) * 1e3:,.0f} ms)"
        )
        print(
            f"  one key ({reads['rows']:,} rows): table() cold {reads['table_cold_s'] * 1e3:,.1f} "
            f"ms, cached {reads['table_cached_s'] * 1e6:,.0f} us; page() "
            f"{reads['page_envelopes_per_s']:,.0f} envelopes/s in {reads['pages']} pages"
        )
        if not args.no_daemon:
            d = daemon_figures(data_dir)
            print(
                f"  qisd start: ready in {d['start_s']:.2f} s, RSS {d['rss'] / 1e6:,.0f} MB, "
                f"{d['descriptors']} descriptors of which {d['sockets']} sockets"
            )
            print(
                f"  client query (local) of {d['query_rows']:,} rows: {d['query_s'] * 1e3:,.0f} ms;"
                f" status reports {d['status_packets']:,} packets"
            )
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
