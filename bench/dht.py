"""DHT benchmark: stock kademlia, OpenDHT and qisd side by side on loopback.

    .venv/bin/python bench/dht.py                       # N = 50, 200, 500 (~4 minutes)
    .venv/bin/python bench/dht.py --sizes 50 --fetches 20 --churn-fetches 5

For each N and each implementation, one worker process (run one after another, so they do not
share the 2 cores) builds an N-node network on 127.0.0.1, publishes one value at each of
``--keys`` keys from random nodes, then runs ``--fetches`` fetches of random keys from random
nodes, one at a time; then stops 20% of the nodes (not gracefully; never the publishers) and
runs ``--churn-fetches`` more. Reported per phase: latency p50/p95/p99, success (the value
published at the key was returned; for qisd, every packet published there, verified), and
messages per operation (RPCs sent by all nodes during the operation, background work included).
Ratios qisd/peer are printed for the same N in the same run.

Values: 1,300 random bytes for kademlia and OpenDHT; for qisd one signed outcome packet
(an envelope of ~450 bytes) per key. Parameters: k = 20, alpha = 3 everywhere; qisd's RPC
timeout 2 s; stock kademlia's is its fixed 5 s; OpenDHT's per-IP rate limit is disabled
(all nodes share 127.0.0.1). OpenDHT's get is timed to completion and to its first value.
qisd's stores live in a tmpfs directory when /dev/shm exists (the benchmark measures the
network, not fsync).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

IMPLS = ("kademlia", "opendht", "qisd")
VALUE_BYTES = 1_300


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def summarize(lat: list[float], ok: list[bool], msgs: list[int]) -> dict[str, float]:
    return {
        "p50_ms": pct(lat, 50) * 1000,
        "p95_ms": pct(lat, 95) * 1000,
        "p99_ms": pct(lat, 99) * 1000,
        "success": sum(ok) / len(ok) if ok else float("nan"),
        "msgs": statistics.mean(msgs) if msgs else float("nan"),
        "count": len(lat),
    }


# --------------------------------------------------------------------------- stock kademlia


def run_kademlia(args: argparse.Namespace) -> dict[str, Any]:
    from kademlia.network import Server
    from kademlia.protocol import KademliaProtocol

    sent = [0]

    class Counting(KademliaProtocol):
        async def call_find_node(self, *a: Any) -> Any:
            sent[0] += 1
            return await super().call_find_node(*a)

        async def call_find_value(self, *a: Any) -> Any:
            sent[0] += 1
            return await super().call_find_value(*a)

        async def call_ping(self, *a: Any) -> Any:
            sent[0] += 1
            return await super().call_ping(*a)

        async def call_store(self, *a: Any) -> Any:
            sent[0] += 1
            return await super().call_store(*a)

    class CountingServer(Server):
        protocol_class = Counting

    async def main() -> dict[str, Any]:
        rng = random.Random(args.seed)
        servers: list[Any] = []
        for _ in range(args.n):
            s = CountingServer(ksize=20, alpha=3)
            await s.listen(0, "127.0.0.1")
            if servers:
                peer = rng.choice(servers)
                await s.bootstrap([("127.0.0.1", peer.transport.get_extra_info("sockname")[1])])
            servers.append(s)
        values = {f"key{k}": os.urandom(VALUE_BYTES) for k in range(args.keys)}
        publishers = set()
        pub_lat, pub_ok, pub_msgs = [], [], []
        for key, value in values.items():
            s = rng.choice(servers)
            publishers.add(id(s))
            before, t0 = sent[0], time.perf_counter()
            ok = await s.set(key, value)
            pub_lat.append(time.perf_counter() - t0)
            pub_ok.append(bool(ok))
            pub_msgs.append(sent[0] - before)

        async def fetches(count: int, live: list[Any]) -> dict[str, float]:
            lat, oks, msgs = [], [], []
            for _ in range(count):
                key = rng.choice(list(values))
                s = rng.choice(live)
                before, t0 = sent[0], time.perf_counter()
                got = await s.get(key)
                lat.append(time.perf_counter() - t0)
                oks.append(got == values[key])
                msgs.append(sent[0] - before)
            return summarize(lat, oks, msgs)

        out = {"publish": summarize(pub_lat, pub_ok, pub_msgs)}
        out["fetch"] = await fetches(args.fetches, servers)
        victims = rng.sample([s for s in servers if id(s) not in publishers], args.n // 5)
        for v in victims:
            v.transport.close()
            v.stop()
        live = [s for s in servers if s not in victims]
        out["churn_fetch"] = await fetches(args.churn_fetches, live)
        return out

    return asyncio.run(main())


# --------------------------------------------------------------------------- OpenDHT


def run_opendht(args: argparse.Namespace) -> dict[str, Any]:
    import opendht as dht

    rng = random.Random(args.seed)
    cfg = dht.DhtConfig()
    cfg.setRateLimit(-1, -1)
    runners: list[Any] = []
    for _ in range(args.n):
        r = dht.DhtRunner()
        r.run(port=0, ipv4="127.0.0.1", config=cfg)
        if runners:
            peer = rng.choice(runners)
            r.bootstrap("127.0.0.1", str(peer.getBound().getPort()))
        runners.append(r)
    # Let routing tables fill (OpenDHT joins asynchronously in its own threads).
    settle = threading.Event()
    settle.wait(min(30.0, 3.0 + args.n / 50))

    alive = list(runners)  # a stopped runner's getNodeMessageStats blocks forever

    def total_msgs() -> int:
        return sum(sum(r.getNodeMessageStats()) for r in alive)

    values = {f"key{k}": os.urandom(VALUE_BYTES) for k in range(args.keys)}
    publishers = set()
    total_msgs()
    pub_lat, pub_ok, pub_msgs = [], [], []
    for key, value in values.items():
        r = rng.choice(runners)
        publishers.add(id(r))
        done = threading.Event()
        result = [False]

        def put_done(ok: bool, _nodes: Any, result: list = result, done: threading.Event = done):
            result[0] = ok
            done.set()

        total_msgs()
        t0 = time.perf_counter()
        r.put(dht.InfoHash.get(key), dht.Value(value), put_done)
        done.wait(30)
        pub_lat.append(time.perf_counter() - t0)
        pub_ok.append(result[0])
        pub_msgs.append(total_msgs())

    def fetches(count: int, live: list[Any]) -> tuple[dict[str, float], dict[str, float]]:
        lat, first, oks, msgs = [], [], [], []
        for _ in range(count):
            key = rng.choice(list(values))
            r = rng.choice(live)
            done = threading.Event()
            found: list[bytes] = []
            first_at: list[float] = []

            def get_cb(v: Any, found: list = found, first_at: list = first_at) -> bool:
                if not first_at:
                    first_at.append(time.perf_counter())
                found.append(bytes(v.data))
                return True

            def get_done(_ok: bool, _nodes: Any, done: threading.Event = done) -> None:
                done.set()

            total_msgs()
            t0 = time.perf_counter()
            r.get(dht.InfoHash.get(key), get_cb, get_done)
            done.wait(30)
            lat.append(time.perf_counter() - t0)
            first.append((first_at[0] if first_at else time.perf_counter()) - t0)
            oks.append(values[key] in found)
            msgs.append(total_msgs())
        return summarize(lat, oks, msgs), summarize(first, oks, msgs)

    out: dict[str, Any] = {"publish": summarize(pub_lat, pub_ok, pub_msgs)}
    out["fetch"], out["fetch_first_value"] = fetches(args.fetches, runners)
    victims = rng.sample([r for r in runners if id(r) not in publishers], args.n // 5)
    alive[:] = [r for r in runners if r not in victims]
    total_msgs()
    for v in victims:
        v.shutdown()
    live = list(alive)
    out["churn_fetch"], out["churn_fetch_first_value"] = fetches(args.churn_fetches, live)
    return out


# --------------------------------------------------------------------------- qisd


def run_qisd(args: argparse.Namespace) -> dict[str, Any]:
    from qisd.config import DhtConfig, StoreLimits
    from qisd.core import packet as P
    from qisd.core.crypto import Identity
    from qisd.net.dht import DhtNode
    from qisd.net.store import Store

    root = Path(
        tempfile.mkdtemp(
            prefix="qisd-bench-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None
        )
    )
    now_ms = int(time.time() * 1000)
    config = DhtConfig(rpc_timeout=2.0)
    routes = [("domain", "problem_type")]

    def sent_total(nodes: list[Any]) -> int:
        return sum(
            sum(n.protocol.counters[k] for k in n.protocol.counters if k.startswith("sent."))
            for n in nodes
        )

    async def main() -> dict[str, Any]:
        rng = random.Random(args.seed)
        nodes: list[Any] = []
        for i in range(args.n):
            d = root / f"n{i}"
            d.mkdir()
            store = Store.open(d, limits=StoreLimits(), ttl_ms=86_400_000)
            node = DhtNode(Identity.generate(), store, config)
            await node.start("127.0.0.1", 0)
            if nodes:
                await node.bootstrap([rng.choice(nodes).address])
            nodes.append(node)
        # Let contact verification triggered by the joins finish.
        while any(n.protocol._tasks for n in nodes):
            await asyncio.gather(
                *(t for n in nodes for t in n.protocol._tasks), return_exceptions=True
            )
        published: dict[bytes, str] = {}
        publishers = set()
        pub_lat, pub_ok, pub_msgs = [], [], []
        for k in range(args.keys):
            node = rng.choice(nodes)
            publishers.add(id(node))
            row = {
                "domain": "bench.dht",
                "problem_type": f"key{k}",
                "metric_name": "val_auc",
                "metric_value": 0.8,
                "metric_delta": 0.01,
                "confidence": 0.9,
                "intervention_type": "lr_schedule",
                "intervention_params": {"blob": os.urandom(60).hex()},
                "outcome_decile": 7,
                "sample_count": 100,
                "timestamp_utc": now_ms,
            }
            rows = P.build_rows([row], node.identity, now_ms=now_ms)
            env = P.pack_rows(node.identity, rows, routes)[0][0]
            node.store.put([env], now_ms=now_ms, local=True)
            before, t0 = sent_total(nodes), time.perf_counter()
            result = await node.publish([env])
            pub_lat.append(time.perf_counter() - t0)
            pub_ok.append(result.replicas[env.packet_id] > 0)
            pub_msgs.append(sent_total(nodes) - before)
            published[env.key] = env.packet_id

        async def fetches(count: int, live: list[Any]) -> dict[str, float]:
            lat, oks, msgs = [], [], []
            for _ in range(count):
                key = rng.choice(list(published))
                node = rng.choice(live)
                before, t0 = sent_total(nodes), time.perf_counter()
                got = await node.fetch(key)
                lat.append(time.perf_counter() - t0)
                oks.append([e.packet_id for e in got] == [published[key]])
                msgs.append(sent_total(nodes) - before)
            return summarize(lat, oks, msgs)

        out = {"publish": summarize(pub_lat, pub_ok, pub_msgs)}
        out["fetch"] = await fetches(args.fetches, nodes)
        victims = rng.sample([n for n in nodes if id(n) not in publishers], args.n // 5)
        for v in victims:  # not gracefully: the socket just goes away
            v.protocol.closed = True
            v.server.transport.abort()
        live = [n for n in nodes if n not in victims]
        out["churn_fetch"] = await fetches(args.churn_fetches, live)
        return out

    try:
        return asyncio.run(main())
    finally:
        shutil.rmtree(root, ignore_errors=True)


# --------------------------------------------------------------------------- driver


def worker(args: argparse.Namespace) -> None:
    runner = {"kademlia": run_kademlia, "opendht": run_opendht, "qisd": run_qisd}[args.worker]
    t0 = time.perf_counter()
    result = runner(args)
    result["wall_s"] = time.perf_counter() - t0
    sys.stdout.write("RESULT " + json.dumps(result) + "\n")
    sys.stdout.flush()
    os._exit(0)  # OpenDHT's join() can deadlock on the GIL at shutdown (bench-notes)


def spawn(impl: str, n: int, args: argparse.Namespace) -> dict[str, Any] | None:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        impl,
        "--n",
        str(n),
        "--keys",
        str(args.keys),
        "--fetches",
        str(args.fetches),
        "--churn-fetches",
        str(args.churn_fetches),
        "--seed",
        str(args.seed),
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.worker_timeout)
    except subprocess.TimeoutExpired:
        print(f"  {impl} N={n}: timed out after {args.worker_timeout} s", file=sys.stderr)
        return None
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    print(f"  {impl} N={n} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
    return None


def report(n: int, results: dict[str, dict[str, Any] | None]) -> None:
    print(f"\nN = {n}")
    phases = ("publish", "fetch", "churn_fetch")
    cols = ("p50 ms", "p95 ms", "p99 ms")
    print(f"{'impl':9} {'phase':22} " + " ".join(f"{c:>9}" for c in cols) + "  success  msgs/op")
    for impl, res in results.items():
        if res is None:
            print(f"{impl:9} (no result)")
            continue
        for phase in (*phases, "fetch_first_value", "churn_fetch_first_value"):
            s = res.get(phase)
            if s is None:
                continue
            print(
                f"{impl:9} {phase:22} {s['p50_ms']:9.1f} {s['p95_ms']:9.1f} {s['p99_ms']:9.1f}"
                f" {s['success'] * 100:7.0f}% {s['msgs']:8.1f}"
            )
    ours = results.get("qisd")
    if ours is None:
        return
    for peer in ("kademlia", "opendht"):
        theirs = results.get(peer)
        if theirs is None:
            continue
        for phase in phases:
            a, b = ours[phase], theirs[phase]
            r50 = a["p50_ms"] / b["p50_ms"] if b["p50_ms"] else float("nan")
            r99 = a["p99_ms"] / b["p99_ms"] if b["p99_ms"] else float("nan")
            rm = a["msgs"] / b["msgs"] if b["msgs"] else float("nan")
            print(f"qisd/{peer:8} {phase:13} p50 x{r50:6.2f}  p99 x{r99:6.2f}  msgs/op x{rm:5.2f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="50,200,500", help="comma-separated network sizes")
    ap.add_argument("--impls", default=",".join(IMPLS), help="which implementations to run")
    ap.add_argument("--keys", type=int, default=20, help="keys published (one value each)")
    ap.add_argument("--fetches", type=int, default=100, help="fetches before churn")
    ap.add_argument("--churn-fetches", type=int, default=20, help="fetches with 20%% stopped")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--worker-timeout", type=int, default=600)
    ap.add_argument("--worker", choices=IMPLS, help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return 0
    t0 = time.perf_counter()
    for n in (int(x) for x in args.sizes.split(",")):
        results = {}
        for impl in args.impls.split(","):
            results[impl] = spawn(impl, n, args)
            wall = results[impl]["wall_s"] if results[impl] else float("nan")
            print(f"  ran {impl} at N={n} in {wall:.0f} s", file=sys.stderr)
        report(n, results)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
