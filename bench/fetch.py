"""Fetch benchmark: bytes and messages per read of one key, qisd against OpenDHT, same run.

    .venv/bin/python bench/fetch.py                          # M = 100, 1,000, 10,000; N = 50, 200
    .venv/bin/python bench/fetch.py --sizes 50 --counts 100,1000 --no-opendht
    .venv/bin/python bench/fetch.py --scenario restart       # a node holding 25,000 keys restarts
    .venv/bin/python bench/fetch.py --scenario bulk          # 150,000 rows to a two-daemon network

For each N and M, one worker process per implementation (one after another, so they do not
share the 2 cores) builds an N-node network on 127.0.0.1 and places M values at one key:

* **qisd**: M signed one-row packets (~280-byte envelopes) stored at the key's k closest
  nodes, as a converged network holds them. Then a node that holds none of them and is no
  replica of the key reads it (*fresh*), a node holding 99 % reads it (*missing 1 %*), and the
  fresh node reads it again (*repeat*). Periodic upkeep is held off (``upkeep_seconds``):
  it is what a read is measured against, not part of it.
  With ``--baseline`` the read before reconciliation (every page from every replica,
  ``DhtNode.fetch_full``) runs beside it. Bytes are the datagram bytes of the replies to the
  read's own requests (its meter: lookup, summaries, envelopes); messages the requests it sent.
  The full read has no meter: there the reader's socket counters are used.
* **OpenDHT**: M values of the same sizes ``put`` at one key from random nodes, then a fresh
  runner's ``get`` to completion. Bytes are what the reader's runner received, from the kernel:
  each worker runs in a network namespace of its own (``ip netns``, needs root; no route out),
  where only the reader's traffic is counted on the loopback interface while the others idle;
  without root, OpenDHT's bytes are not reported. Messages are OpenDHT's own counters.

Ratios are bytes received over the key's unique value bytes. The restart and bulk scenarios
print their times.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _store_dir() -> Path:
    return Path(
        tempfile.mkdtemp(
            prefix="qisd-fetch-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None
        )
    )


def _envelopes(
    m: int, now_ms: int, *, problem: str = "fetch", signers: int = 20, idents: Any = None
) -> list[Any]:
    from qisd.core import packet as P
    from qisd.core.crypto import Identity

    idents = idents or [Identity.generate() for _ in range(signers)]
    signers = len(idents)
    out = []
    for i in range(m):
        row = {
            "domain": "bench.fetch",
            "problem_type": problem,
            "metric_name": "val_auc",
            "metric_value": 0.8,
            "metric_delta": round(0.0001 * i, 6),
            "confidence": 0.9,
            "intervention_type": f"iv{i % 7}",
            "intervention_params": {"i": i},
            "outcome_decile": 1 + i % 10,
            "sample_count": i,
            "timestamp_utc": now_ms - i,
        }
        ident = idents[i % signers]
        rows = P.build_rows([row], ident, now_ms=now_ms)
        out.append(P.pack_rows(ident, rows, [("domain", "problem_type")])[0][0])
    return out


async def _network(n: int, root: Path, config: Any, rng: random.Random) -> list[Any]:
    from qisd.config import StoreLimits
    from qisd.core.crypto import Identity
    from qisd.net.dht import DhtNode
    from qisd.net.store import Store

    nodes: list[Any] = []
    for i in range(n):
        d = root / f"n{i}"
        d.mkdir()
        store = Store.open(d, limits=StoreLimits(), ttl_ms=86_400_000)
        node = DhtNode(Identity.generate(), store, config)
        await node.start("127.0.0.1", 0)
        if nodes:
            await node.bootstrap([rng.choice(nodes).address])
        nodes.append(node)
    while any(n.protocol._tasks for n in nodes):
        await asyncio.gather(*(t for n in nodes for t in n.protocol._tasks), return_exceptions=True)
    return nodes


async def _outsider(nodes: list[Any], key: bytes, root: Path, config: Any) -> Any:
    """A node that joins now and is farther from ``key`` than every node (no replica)."""
    from qisd.config import StoreLimits
    from qisd.core.crypto import Identity
    from qisd.net.dht import DhtNode
    from qisd.net.store import Store

    target = int.from_bytes(key, "big")
    farthest = max(int.from_bytes(n.node_id, "big") ^ target for n in nodes)
    while True:
        ident = Identity.generate()
        if int.from_bytes(ident.dht_id, "big") ^ target > farthest:
            break
    d = Path(tempfile.mkdtemp(dir=root))
    node = DhtNode(ident, Store.open(d, limits=StoreLimits(), ttl_ms=86_400_000), config)
    await node.start("127.0.0.1", 0)
    await node.bootstrap([nodes[0].address])
    return node


def run_qisd(args: argparse.Namespace) -> dict[str, Any]:
    from qisd.config import DhtConfig

    root = _store_dir()
    # Upkeep (liveness pings, periodic anti-entropy) is what a read is measured against, not
    # part of it: it is held off here so the reader's socket counts the read alone.
    config = DhtConfig(rpc_timeout=2.0, upkeep_seconds=3_600)
    now_ms = int(time.time() * 1000)

    async def main() -> dict[str, Any]:
        rng = random.Random(args.seed)
        nodes = await _network(args.n, root, config, rng)
        envs = _envelopes(args.m, now_ms)
        key = envs[0].key
        unique = sum(len(e.raw) for e in envs)
        target = int.from_bytes(key, "big")
        holders = sorted(nodes, key=lambda n: int.from_bytes(n.node_id, "big") ^ target)
        for node in holders[: config.ksize]:
            node.store.put(envs, now_ms=now_ms)
        out: dict[str, Any] = {"unique_bytes": unique, "m": args.m}

        report: list[Any] = []

        async def measure(reader: Any, read: Any) -> dict[str, Any]:
            """The read's bytes and requests: its own meter for a reconciled read (replies
            to its requests); the reader's socket counters for the full read (which has no
            meter: background work that overlaps it counts too)."""
            counters = reader.protocol.counters
            before = len(report)
            b0, m0 = (
                counters["bytes_received"],
                sum(v for k, v in counters.items() if k.startswith("sent.")),
            )
            t0 = time.perf_counter()
            got = await read()
            took = time.perf_counter() - t0
            sent = sum(v for k, v in counters.items() if k.startswith("sent.")) - m0
            received = counters["bytes_received"] - b0
            if len(report) > before:
                received, sent = report[-1].bytes_received, report[-1].messages
            return {
                "ms": took * 1000,
                "bytes": received,
                "ratio": received / unique,
                "messages": sent,
                "values": len(got),
            }

        fresh = await _outsider(nodes, key, root, config)

        async def reconciled() -> list[Any]:
            r = await fresh.fetch_report(key)
            report.append(r)
            return r.envelopes

        out["fresh"] = await measure(fresh, reconciled)
        out["fresh"]["complete"] = report[-1].complete
        fresh.store.put(report[-1].envelopes, now_ms=now_ms)
        out["repeat"] = await measure(fresh, reconciled)
        lookup = [0, 0]
        await fresh.server.crawl_nodes_counted(key, lookup)
        out["bare_lookup"] = {"bytes": lookup[0], "messages": lookup[1]}
        partial = await _outsider(nodes, key, root, config)
        keep = rng.sample(envs, len(envs) - max(1, len(envs) // 100))
        partial.store.put(keep, now_ms=now_ms)
        out["missing_1pct"] = await measure(partial, reconciled_of(partial, key, report))
        out["missing_1pct"]["downloaded"] = report[-1].downloaded
        if args.baseline:
            other = await _outsider(nodes, key, root, config)
            out["full_read"] = await measure(other, lambda: other.fetch_full(key))
        for node in [*nodes, fresh, partial]:
            await node.stop()
        return out

    try:
        return asyncio.run(main())
    finally:
        shutil.rmtree(root, ignore_errors=True)


def reconciled_of(node: Any, key: bytes, report: list[Any]) -> Any:
    async def read() -> list[Any]:
        r = await node.fetch_report(key)
        report.append(r)
        return r.envelopes

    return read


def _lo_rx() -> int:
    try:
        return int(Path("/sys/class/net/lo/statistics/rx_bytes").read_text())
    except OSError:
        return -1


def run_opendht(args: argparse.Namespace) -> dict[str, Any]:
    import opendht as dht

    rng = random.Random(args.seed)
    now_ms = int(time.time() * 1000)
    values = [e.raw for e in _envelopes(args.m, now_ms)]
    unique = sum(len(v) for v in values)
    cfg = dht.DhtConfig()
    cfg.setRateLimit(-1, -1)
    runners: list[Any] = []
    for _ in range(args.n):
        r = dht.DhtRunner()
        r.run(port=0, ipv4="127.0.0.1", config=cfg)
        if runners:
            r.bootstrap("127.0.0.1", str(rng.choice(runners).getBound().getPort()))
        runners.append(r)
    threading.Event().wait(min(30.0, 3.0 + args.n / 50))
    key = dht.InfoHash.get("bench.fetch")
    pending = threading.Semaphore(64)
    for v in values:
        pending.acquire()
        rng.choice(runners).put(key, dht.Value(v), lambda *_a: pending.release())
    for _ in range(64):
        pending.acquire(timeout=60)
    reader = dht.DhtRunner()
    reader.run(port=0, ipv4="127.0.0.1", config=cfg)
    reader.bootstrap("127.0.0.1", str(runners[0].getBound().getPort()))
    threading.Event().wait(3.0)
    found: set[bytes] = set()
    done = threading.Event()

    def got(v: Any) -> bool:
        found.add(bytes(v.data))
        return True

    threading.Event().wait(2.0)  # let the network go quiet: the loopback counter is shared
    reader.getNodeMessageStats()
    rx0 = _lo_rx()
    t0 = time.perf_counter()
    reader.get(key, got, lambda *_a: done.set())
    done.wait(120)
    took = time.perf_counter() - t0
    rx = _lo_rx() - rx0 if rx0 >= 0 else -1
    msgs = sum(reader.getNodeMessageStats())
    # Loopback counts each datagram once on receive: everything the network exchanged in the
    # get (requests and replies of every node; the reader's are nearly all of it).
    return {
        "unique_bytes": unique,
        "m": args.m,
        "fresh": {
            "ms": took * 1000,
            "bytes": rx,
            "ratio": rx / unique if rx >= 0 else float("nan"),
            "messages": msgs,
            "values": len(found & set(values)),
        },
    }


def worker(args: argparse.Namespace) -> None:
    result = {"qisd": run_qisd, "opendht": run_opendht}[args.worker](args)
    sys.stdout.write("RESULT " + json.dumps(result) + "\n")
    sys.stdout.flush()
    os._exit(0)  # OpenDHT's join() can deadlock on the GIL at shutdown (bench-notes)


def spawn(impl: str, n: int, m: int, args: argparse.Namespace) -> dict[str, Any] | None:
    cmd = [sys.executable, __file__, "--worker", impl, "--n", str(n), "--m", str(m)]
    cmd += ["--seed", str(args.seed)] + (["--baseline"] if args.baseline else [])
    ns = None
    if impl == "opendht" and os.geteuid() == 0 and shutil.which("ip"):
        ns = f"qisdbench{os.getpid()}"
        subprocess.run(["ip", "netns", "add", ns], check=True)
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        cmd = ["ip", "netns", "exec", ns, *cmd]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.worker_timeout)
    except subprocess.TimeoutExpired:
        print(f"  {impl} N={n} M={m}: timed out", file=sys.stderr)
        return None
    finally:
        if ns is not None:
            subprocess.run(["ip", "netns", "delete", ns], check=False)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    print(f"  {impl} N={n} M={m} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
    return None


def report(n: int, m: int, results: dict[str, Any]) -> None:
    print(f"\nN = {n}, M = {m}")
    print(
        f"{'impl':8} {'read':13} {'ms':>8} {'bytes':>10} {'x unique':>9} {'msgs':>6} {'values':>7}"
    )
    for impl, res in results.items():
        if res is None:
            print(f"{impl:8} (no result)")
            continue
        for phase in ("fresh", "missing_1pct", "repeat", "full_read"):
            s = res.get(phase)
            if s is None:
                continue
            print(
                f"{impl:8} {phase:13} {s['ms']:8.1f} {s['bytes']:10d} {s['ratio']:9.3f}"
                f" {s['messages']:6d} {s['values']:7d}"
            )
        if "bare_lookup" in res:
            b = res["bare_lookup"]
            print(f"{impl:8} {'bare lookup':13} {'':8} {b['bytes']:10d} {'':9} {b['messages']:6d}")
    ours, theirs = results.get("qisd"), results.get("opendht")
    if ours and theirs and theirs["fresh"]["bytes"] > 0:
        a, b = ours["fresh"], theirs["fresh"]
        print(
            f"qisd/opendht fresh read: bytes x{a['bytes'] / b['bytes']:.2f}, "
            f"messages x{a['messages'] / max(1, b['messages']):.2f}, time x{a['ms'] / b['ms']:.2f}"
            f" (OpenDHT returned {b['values']} of {m} values)"
        )


# --------------------------------------------------------------------------- scenarios


def scenario_restart(args: argparse.Namespace) -> None:
    """8 nodes hold 25,000 keys; one stops, 1,000 keys gain a packet while it is down, it
    restarts with its state: time to a full routing table, time until it holds every packet,
    and the rate limiting its peers applied."""
    from qisd.config import DhtConfig, StoreLimits
    from qisd.net.dht import DhtNode
    from qisd.net.store import Store

    root = _store_dir()
    config = DhtConfig(rpc_timeout=2.0)
    now_ms = int(time.time() * 1000)

    async def main() -> None:
        rng = random.Random(args.seed)
        t0 = time.perf_counter()
        from qisd.core.crypto import Identity

        signers = [Identity.generate() for _ in range(20)]

        def one(k: int, i: int) -> Any:
            return _envelopes(1, now_ms - i, problem=f"k{k}", idents=[signers[k % 20]])[0]

        envs = [one(k, 0) for k in range(args.keys)]
        later = [one(k, 1) for k in range(1_000)]
        print(f"  made {len(envs) + len(later)} packets in {time.perf_counter() - t0:.0f} s")
        nodes = await _network(8, root, config, rng)
        for node in nodes:
            node.store.put(envs, now_ms=now_ms)
        victim = nodes[3]
        ident, data = victim.identity, root / "n3"
        victim.state_path = data / "routing.json"
        await victim.stop()
        victim.store.close()
        for node in nodes:
            if node is not victim:
                node.store.put(later, now_ms=now_ms)
        limited0 = sum(n.stats()["rate_limited"] for n in nodes if n is not victim)
        t0 = time.perf_counter()
        store = Store.open(data, limits=StoreLimits(), ttl_ms=86_400_000)
        back = DhtNode(ident, store, config, state_path=data / "routing.json")
        await back.start("127.0.0.1", 0)
        await back.bootstrap([nodes[0].address])
        table = time.perf_counter() - t0
        peers = len(back.peers())
        key_ids = {(e.key, e.packet_id) for e in later}
        while True:
            have = sum(1 for k, p in key_ids if back.store.has(k, p))
            if have == len(key_ids) and back.protocol.sync.backlog() == 0:
                break
            if time.perf_counter() - t0 > args.worker_timeout:
                print(f"  gave up: {have} of {len(key_ids)} packets")
                break
            await asyncio.sleep(0.5)
        done = time.perf_counter() - t0
        limited = sum(n.stats()["rate_limited"] for n in nodes if n is not victim) - limited0
        c = back.protocol.counters
        print(
            f"restart with {args.keys} keys: {peers} peers {table:.1f} s after start; every "
            f"packet and no sync backlog after {done:.1f} s; {c['syncs']} reconciliations "
            f"({c['syncs_agreed']} agreed), {c['sync_pulled']} pulled; peers rate-limited "
            f"{limited} requests"
        )
        for node in [*nodes, back]:
            if node is not victim:
                await node.stop()

    try:
        asyncio.run(main())
    finally:
        shutil.rmtree(root, ignore_errors=True)


def scenario_bulk(args: argparse.Namespace) -> None:
    """Two real daemons; ``qisd emit --from`` 150,000 unique rows on one: time for the emit
    and until the other holds every envelope and the sender's publish backlog is empty."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    sys.path.insert(0, str(ROOT / "tests"))
    from test_cli import Daemon
    from test_e2e import ENV, _rows

    from qisd.client import Client

    root = _store_dir()

    def status(d: Any) -> dict[str, Any]:
        with Client(d.data_dir) as client:
            return client.status()

    try:
        src = root / "rows.parquet"
        pq.write_table(pa.Table.from_pylist(_rows(150_000, "bulk")), src)
        a = Daemon(root / "a", env=ENV)
        b = Daemon(root / "b", "--bootstrap", a.address, env=ENV)
        t0 = time.perf_counter()
        done = a.cli("emit", "--from", str(src), "--json")
        emitted = time.perf_counter() - t0
        assert done.returncode == 0, done.stderr
        total = status(a)["packets"]
        while status(b)["packets"] < total or status(a)["publish_backlog"]:
            time.sleep(0.2)
        held = time.perf_counter() - t0
        sa, sb = status(a), status(b)
        print(
            f"bulk emit of 150,000 rows ({total} envelopes): emit {emitted:.1f} s, at the peer "
            f"{held:.1f} s; sender timeouts {sa['dht']['timeouts']}, busy replies "
            f"{sb['dht']['busy_sent']}, peer rate-limited {sb['dht']['rate_limited']}"
        )
        a.terminate()
        b.terminate()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="50,200", help="network sizes N")
    ap.add_argument("--counts", default="100,1000,10000", help="packets at the key, M")
    ap.add_argument("--no-opendht", action="store_true")
    ap.add_argument("--baseline", action="store_true", help="also the full read (every page)")
    ap.add_argument("--scenario", choices=("fetch", "restart", "bulk"), default="fetch")
    ap.add_argument("--keys", type=int, default=25_000, help="keys held (restart scenario)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--worker-timeout", type=int, default=900)
    ap.add_argument("--worker", choices=("qisd", "opendht"), help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--m", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return 0
    if args.scenario == "restart":
        scenario_restart(args)
        return 0
    if args.scenario == "bulk":
        scenario_bulk(args)
        return 0
    t0 = time.perf_counter()
    for n in (int(x) for x in args.sizes.split(",")):
        for m in (int(x) for x in args.counts.split(",")):
            impls = ["qisd"] + ([] if args.no_opendht else ["opendht"])
            report(n, m, {impl: spawn(impl, n, m, args) for impl in impls})
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
