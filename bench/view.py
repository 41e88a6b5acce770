"""The envelope store and its columnar view, in process, one run: what the README's Storage
figures are.

    python bench/view.py                 # 100,000 one-row packets of 20 signers; ~1 minute
    python bench/view.py --rows 20000    # a quick look

Measured on a store in a temporary directory (``--tmp`` to choose the disk):

1. ``put`` of one packet (its two envelopes) per call, and of 100 packets per call;
2. a key of ``--rows`` one-row packets of 20 signers (a DHT holder's shape): ``scan`` of the
   view right after the puts, after a reopen (the file mapped cold), and the same rows decoded
   from the envelopes (``decoded``, what every read did before the view);
3. a reopen after a crash that lost the view's in-memory tail (repaired from the envelopes).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from flight import PATH, rows_table  # noqa: E402

from qisd.config import StoreLimits  # noqa: E402
from qisd.core import packet as P  # noqa: E402
from qisd.core.crypto import Identity  # noqa: E402
from qisd.core.fingerprint import DEFAULT_TEMPLATE, key_for_path  # noqa: E402
from qisd.net.store import Store  # noqa: E402

TTL = 30 * 86_400_000


def packets(n: int, signers: int, now: int) -> list[P.Envelope]:
    """``n`` one-row packets under the coarse key, signed by ``signers`` identities."""
    fields = DEFAULT_TEMPLATE.fields_at(DEFAULT_TEMPLATE.levels[0])
    key = key_for_path(PATH)
    table = rows_table(n).combine_chunks()
    identities = [Identity.generate() for _ in range(signers)]
    out = []
    for i in range(n):
        ident = identities[i % signers]
        body = P._deflate(table.slice(i, 1).to_batches()[0].serialize().to_pybytes())
        out.append(P.seal(ident, P.KIND_PACKET, key, body, fields=fields, timestamp_ms=now, rows=1))
    return out


def rate(rows: int, fn) -> float:  # noqa: ANN001
    t0 = time.perf_counter()
    got = fn()
    elapsed = time.perf_counter() - t0
    assert got == rows, (got, rows)
    return rows / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=100_000, help="one-row packets in the key")
    parser.add_argument("--tmp", default=None, help="where the store goes")
    args = parser.parse_args()
    now = time.time_ns() // 1_000_000
    limits = StoreLimits(per_key=10**7, per_signer_per_key=10**7, max_bytes=1 << 40)
    key = key_for_path(PATH)
    with tempfile.TemporaryDirectory(prefix="qisd-view-", dir=args.tmp) as tmp:
        single = Path(tmp) / "single"
        single.mkdir()
        ident = Identity.generate()
        routes = [DEFAULT_TEMPLATE.fields_at(level) for level in DEFAULT_TEMPLATE.levels]
        pairs = []
        for i in range(600):
            table = rows_table(1, i).drop_columns(["node_id"])
            rows, _ = P.build_table_rows(table, ident, now_ms=now, lifetime_ms=TTL)
            pairs.append([e for g in P.pack_rows(ident, rows, routes) for e in g])
        with Store.open(single, limits=limits, ttl_ms=TTL) as store:
            times = []
            for pair in pairs[:300]:
                t0 = time.perf_counter()
                store.put(pair, now_ms=now, local=True)
                times.append(time.perf_counter() - t0)
            one_per_call = 1 / statistics.median(times)
            t0 = time.perf_counter()
            for start in range(300, 600, 100):
                store.put([e for p in pairs[start : start + 100] for e in p], now_ms=now)
            hundred_per_call = 300 / (time.perf_counter() - t0)
        holder = Path(tmp) / "holder"
        holder.mkdir()
        envs = packets(args.rows, 20, now)
        n = args.rows

        def scanned(store: Store) -> int:
            return sum(b.num_rows for b in store.scan(key, now_ms=now))

        with Store.open(holder, limits=limits, ttl_ms=TTL) as store:
            for start in range(0, n, 1000):
                store.put(envs[start : start + 1000], now_ms=now, origin=f"10.0.0.{start % 7}")
            live_first = rate(n, lambda: scanned(store))
            live = rate(n, lambda: scanned(store))
            decoded = rate(n, lambda: sum(b.num_rows for b in store.decoded(key, now_ms=now)))
        t0 = time.perf_counter()
        store = Store.open(holder, limits=limits, ttl_ms=TTL)
        open_s = time.perf_counter() - t0
        cold = rate(n, lambda: scanned(store))
        # A crash: the next puts' rows only in the tail, which is lost (never written out).
        store.put(packets(5_000, 3, now), now_ms=now)
        assert store._views is not None
        os.close(store._views._lock_fd)
        store._views = None
        store.close()
        t0 = time.perf_counter()
        with Store.open(holder, limits=limits, ttl_ms=TTL) as store:
            repair_s = time.perf_counter() - t0
            assert scanned(store) == n + 5_000
    print(f"store and view, {n:,} one-row packets of 20 signers under one key")
    print(f"  put, one packet (2 envelopes) per call     {one_per_call:12,.0f} puts/s")
    print(f"  put, 100 packets (200 envelopes) per call  {hundred_per_call:12,.0f} packets/s")
    print(f"  scan right after the puts (rows built)     {live_first:12,.0f} rows/s")
    print(f"  scan again                                 {live:12,.0f} rows/s")
    print(f"  open (view checked) {open_s * 1000:,.0f} ms; first scan {cold:,.0f} rows/s")
    print(f"  the same rows decoded from the envelopes   {decoded:12,.0f} rows/s")
    print(f"  open after a crash lost 5,000 rows' tail   {repair_s * 1000:12,.0f} ms (repaired)")


if __name__ == "__main__":
    main()
