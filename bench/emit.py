"""Emit throughput and latency through a running daemon in a 20-node local network.

    python bench/emit.py                 # 20 nodes, 5,000 packets per run, 15 latency runs
    python bench/emit.py --rows 2000 --nodes 10 --latency-runs 5

One real ``qisd start`` daemon (the one measured) joins 19 other real nodes, which run in one
helper process (real UDP sockets on 127.0.0.1, real SQLite stores, default DHT parameters:
k = 20, so every packet is stored on every other node). It prints:

* packets/s through ``qisd emit --from FILE`` (JSON lines, one packet per row: every row has
  its own fingerprint) and through the Python client (``Client.emit_rows``), each
  - as acknowledged (signed and committed to the daemon's store; publishing continues in the
    background), and
  - with ``--wait 1`` (also stored by at least one other node at every routable level);
* rows/s for the same when rows share a fingerprint (up to 128 rows per signed packet);
* the median and 90th percentile wall time of one ``qisd emit`` process, from exec to exit.

Runs do not overlap: after each one the daemon's publish backlog is drained first (the
``committed`` figures do not include that background publishing; ``--wait 1`` ones do).
Nothing here is a test: run it on a quiet machine and read the figures next to each other.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BIN = Path(sys.executable).parent / "qisd"
QISD = [str(BIN)] if BIN.exists() else [sys.executable, "-m", "qisd"]
READY = re.compile(r"^qisd listening on (\S+):(\d+) node=([0-9a-f]{32})$")


def rows(n: int, *, shared: bool, tag: str) -> list[dict[str, Any]]:
    """``n`` outcome rows: each with its own fingerprint, or all sharing one (``shared``)."""
    return [
        {
            "domain": "bench.emit",
            "problem_type": tag,
            "model_architecture": "shared" if shared else f"arch-{i}",
            "metric_name": "val_auc",
            "metric_value": 0.8,
            "metric_delta": round(0.0001 * (i % 1000), 6),
            "confidence": 0.9,
            "intervention_type": f"iv-{i % 7}",
            "intervention_params": {"i": i},
            "outcome_decile": 1 + i % 10,
            "sample_count": i,
        }
        for i in range(n)
    ]


# --------------------------------------------------------------------------- helper network


async def serve_network(count: int, root: Path) -> None:
    """Run ``count`` nodes in this process; print the first one's address; stop on stdin EOF."""
    from qisd.config import NodeConfig
    from qisd.net.datadir import init_identity
    from qisd.net.node import Node

    nodes: list[Node] = []
    try:
        for i in range(count):
            data_dir = root / f"n{i}"
            init_identity(data_dir)
            first = nodes[0].address if nodes else None
            nodes.append(
                await Node.open(
                    NodeConfig(
                        data_dir=str(data_dir),
                        host="127.0.0.1",
                        port=0,
                        bootstrap=(f"{first[0]}:{first[1]}",) if first else (),
                        bootstrap_file=os.devnull,
                        log_level="error",
                    )
                )
            )
        host, port = nodes[0].address  # type: ignore[misc]
        print(f"{host}:{port}", flush=True)
        await asyncio.to_thread(sys.stdin.read)
    finally:
        for node in reversed(nodes):
            await node.close()


# --------------------------------------------------------------------------- measuring


class Daemon:
    """The measured ``qisd start`` process."""

    def __init__(self, data_dir: Path, bootstrap: str) -> None:
        subprocess.run(
            [*QISD, "init", "--data-dir", str(data_dir)], check=True, capture_output=True
        )
        self.data_dir = data_dir
        self.proc = subprocess.Popen(
            [
                *QISD,
                "start",
                "--data-dir",
                str(data_dir),
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--bootstrap",
                bootstrap,
                "--bootstrap-file",
                os.devnull,
                "--log-level",
                "warning",
            ],
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
        )
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            if READY.match(raw.decode().strip()):
                break
        else:
            raise SystemExit("the daemon did not start")

    def stop(self) -> None:
        subprocess.run([*QISD, "stop", "--data-dir", str(self.data_dir)], capture_output=True)
        self.proc.wait(60)


def drain(data_dir: Path) -> None:
    """Wait until the daemon has published everything queued (runs must not overlap)."""
    from qisd.client import Client

    with Client(data_dir) as client:
        while client.status()["publish_backlog"]:
            time.sleep(0.2)


def cli_emit(data_dir: Path, source: Path, *extra: str) -> tuple[float, dict[str, Any]]:
    t0 = time.perf_counter()
    done = subprocess.run(
        [*QISD, "emit", "--from", str(source), "--json", "--data-dir", str(data_dir), *extra],
        capture_output=True,
    )
    elapsed = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(done.stderr.decode())
    return elapsed, json.loads(done.stdout)


def client_emit(data_dir: Path, batch: list[dict[str, Any]], wait: int) -> tuple[float, int]:
    from qisd.client import Client

    with Client(data_dir) as client:
        t0 = time.perf_counter()
        result = client.emit_rows(batch, wait=wait)
        return time.perf_counter() - t0, len(result["packet_ids"])


def single_emit_latency(data_dir: Path, runs: int) -> list[float]:
    flags = [
        "--domain=bench.emit",
        "--problem-type=latency",
        "--metric=val_auc=0.8",
        "--delta=0.01",
        "--confidence=0.9",
        "--intervention=warmup",
        "--decile=7",
    ]
    times = []
    for i in range(runs):
        t0 = time.perf_counter()
        done = subprocess.run(
            [*QISD, "emit", *flags, f"--samples={i}", "--data-dir", str(data_dir)],
            capture_output=True,
        )
        times.append(time.perf_counter() - t0)
        if done.returncode != 0:
            raise SystemExit(done.stderr.decode())
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=20, help="nodes in the network (>= 2)")
    parser.add_argument("--rows", type=int, default=5000, help="packets per throughput run")
    parser.add_argument("--latency-runs", type=int, default=15)
    parser.add_argument("--network", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.network is not None:
        import uvloop

        uvloop.run(serve_network(args.network, args.root))
        return

    with tempfile.TemporaryDirectory(prefix="qisd-bench-") as tmp:
        root = Path(tmp)
        (root / "net").mkdir()
        helper = subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--network",
                str(args.nodes - 1),
                "--root",
                str(root / "net"),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        assert helper.stdout is not None and helper.stdin is not None
        seed = helper.stdout.readline().decode().strip()
        daemon = Daemon(root / "daemon", seed)
        try:
            from qisd.client import Client

            with Client(daemon.data_dir) as c:
                peers = len(c.peers())
            print(
                f"qisd emit benchmark: 1 daemon + {args.nodes - 1} nodes on 127.0.0.1 "
                f"(the daemon knows {peers} peers), {args.rows} packets per run, "
                f"{os.cpu_count()} CPUs"
            )
            results = []
            for label, shared in (("one packet per row", False), ("rows sharing a packet", True)):
                for wait in (0, 1):
                    tag = f"{'s' if shared else 'p'}{wait}"
                    source = root / f"{tag}.jsonl"
                    source.write_text(
                        "".join(
                            json.dumps(r) + "\n" for r in rows(args.rows, shared=shared, tag=tag)
                        )
                    )
                    extra = ["--wait", "1"] if wait else []
                    elapsed, out = cli_emit(daemon.data_dir, source, *extra)
                    results.append(
                        ("qisd emit --from", label, wait, elapsed, len(out["packet_ids"]))
                    )
                    drain(daemon.data_dir)
                    batch = rows(args.rows, shared=shared, tag=tag + "c")
                    elapsed, packets = client_emit(daemon.data_dir, batch, wait)
                    results.append(("Client.emit_rows", label, wait, elapsed, packets))
                    drain(daemon.data_dir)
            print()
            print(
                f"{'path':<18} {'input':<22} {'acknowledged':<24} {'packets/s':>10} {'rows/s':>10}"
            )
            for path, label, wait, elapsed, packets in results:
                ack = "committed + 1 replica" if wait else "committed"
                print(
                    f"{path:<18} {label:<22} {ack:<24} {packets / elapsed:>10,.0f} "
                    f"{args.rows / elapsed:>10,.0f}"
                )
            times = sorted(single_emit_latency(daemon.data_dir, args.latency_runs))
            p90 = times[min(len(times) - 1, round(0.9 * (len(times) - 1)))]
            print()
            print(
                f"one `qisd emit` process (exec to exit, 1 packet, committed): median "
                f"{statistics.median(times) * 1000:.0f} ms, p90 {p90 * 1000:.0f} ms "
                f"over {len(times)} runs"
            )
        finally:
            daemon.stop()
            helper.stdin.close()
            helper.wait(60)


if __name__ == "__main__":
    main()
