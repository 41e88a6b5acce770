"""Real ``qisd start`` processes on distinct addresses in a lab of network namespaces.

Six public hosts on 198.18.0.0/24 and two home hosts behind a masquerading NAT router; the lab
is checked to have no route out before any daemon starts, and every namespace is removed at the
end. Bytes are the kernel's interface counters inside the reader's namespace. Skipped, with the
reason, where namespaces cannot be made (not root, no iproute2 or nftables).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import BASE_ROW, LineReader, clean_env
from netlab import NAT_UDP_TIMEOUT, Host, Lab, data_dir, unavailable

from qisd.client import Client
from qisd.core.fingerprint import key_for_path

WHY = unavailable()
pytestmark = pytest.mark.skipif(WHY is not None, reason=f"no network lab here: {WHY}")

BIN = Path(sys.executable).parent / "qisd"
QISD = [str(BIN)] if BIN.exists() else [sys.executable, "-m", "qisd"]
PORT = 8468
PUBLIC_HOSTS = 8
PATH = "clinical.oncology/lab_volume"
FRESH = "clinical.oncology/lab_fresh"
# k = 3 on 8 hosts: most hosts are no replica of a key, so a read really crosses the lab.
ENV = {
    "QISD_DHT_RPC_TIMEOUT": "1.0",
    "QISD_LOG_LEVEL": "info",
    "QISD_DHT_KSIZE": "3",
    # The lab's NATs drop a mapping after NAT_UDP_TIMEOUT s idle: keep alive well inside it.
    "QISD_DHT_KEEPALIVE_SECONDS": "3",
    "QISD_DHT_UPKEEP_SECONDS": "2",
}


class LabDaemon:
    """``qisd start`` inside a host's namespace, bound to 0.0.0.0:8468."""

    def __init__(self, host: Host, root: Path, bootstrap: str | None) -> None:
        self.host = host
        self.dir = data_dir(root, host)
        init = subprocess.run(
            [*QISD, "init", "--data-dir", str(self.dir)], capture_output=True, text=True
        )
        assert init.returncode == 0, init.stderr
        self.bootstrap = bootstrap
        self.start()

    def start(self) -> None:
        """``qisd start`` in the host's namespace (again, after :meth:`kill`: same data)."""
        argv = ["start", "--data-dir", str(self.dir), "--host", "0.0.0.0", "--port", str(PORT)]
        argv += ["--bootstrap-file", os.devnull]
        if self.bootstrap is not None:
            argv += ["--bootstrap", self.bootstrap]
        env = clean_env() | ENV
        self.proc = subprocess.Popen(
            self.host.argv(*QISD, *argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=env,
        )
        self.err = LineReader(self.proc.stderr)
        while True:
            line = self.err.readline(timeout=30)
            assert line is not None, "the daemon exited before it was ready"
            if line.startswith("qisd listening on "):
                break
        # Drain its log for good: a pipe nobody reads fills (64 kB) and the daemon's next log
        # line blocks its event loop, which its peers would see as a dead host.
        self.log: deque[str] = deque(maxlen=50)
        threading.Thread(target=self._drain, args=(self.err, self.log), daemon=True).start()

    @staticmethod
    def _drain(err: LineReader, log: deque[str]) -> None:
        with contextlib.suppress(OSError, ValueError):
            while (line := err.readline(timeout=3600)) is not None:
                log.append(line)

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*QISD, *args, "--data-dir", str(self.dir)],
            capture_output=True,
            text=True,
            env=clean_env(),
            timeout=120,
        )

    def client(self) -> Client:
        return Client(self.dir)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(30)

    def kill(self) -> None:
        """SIGKILL: no clean shutdown, as a power cut."""
        self.proc.kill()
        self.proc.wait(30)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Lab, list[LabDaemon]]]:
    root = tmp_path_factory.mktemp("lab")
    with Lab() as built:
        public = [built.public_host() for _ in range(PUBLIC_HOSTS)]
        homes = built.nat(1, 2) + built.nat(2, 2)
        built.check_isolated()
        daemons: list[LabDaemon] = []
        try:
            seed = f"{public[0].address}:{PORT}"
            daemons.append(LabDaemon(public[0], root, None))
            for host in public[1:] + homes:
                daemons.append(LabDaemon(host, root, seed))
            yield built, daemons
        finally:
            codes = [d.stop() for d in daemons]
            assert all(code == 0 for code in codes), codes


def _row(i: int, **extra: Any) -> dict[str, Any]:
    row = dict(BASE_ROW, problem_type="lab_volume", metric_delta=round(0.0001 * i, 6))
    row.update(extra)
    return row


def emit(author: LabDaemon, rows: list[dict[str, Any]], **wait: Any) -> list[str]:
    """Emit ``rows`` on ``author`` (one commit); their packet ids."""
    with author.client() as client:
        return list(client.emit(rows, **wait)["packet_ids"])


def found_within(
    reader: LabDaemon, packet_ids: list[str], seconds: float, path: str = PATH
) -> float:
    """Query until every id is in the read (each query a real CLI round trip); the time."""
    t0 = time.monotonic()
    while True:
        done = reader.cli("query", path, "--json")
        assert done.returncode == 0, done.stderr
        if set(packet_ids) <= {r["packet_id"] for r in json.loads(done.stdout)["rows"]}:
            return time.monotonic() - t0
        rows = json.loads(done.stdout)
        assert time.monotonic() - t0 < seconds, (
            f"{reader.host.name}: not found within {seconds} s: "
            f"{len(set(packet_ids) - {r['packet_id'] for r in rows['rows']})} of {len(packet_ids)} "
            f"missing; { ({k: v for k, v in rows.items() if k != 'rows'}) }; {_health(reader)}"
        )


def held(d: LabDaemon, key: bytes) -> tuple[int, int]:
    """(envelopes, bytes) ``d``'s store holds of ``key``."""
    with sqlite3.connect(d.dir / "store.sqlite3") as db:
        count, size = db.execute(
            "SELECT count(*), coalesce(sum(size), 0) FROM envelopes WHERE key = ?", (key,)
        ).fetchone()
    return int(count), int(size)


def settled(daemons: list[LabDaemon], seconds: float) -> None:
    """Until no daemon has packets to publish or reconciliations queued (status round trips)."""
    t0 = time.monotonic()
    while True:
        left = {}
        for d in daemons:
            with d.client() as client:
                status = client.status()
            dht = status.get("dht", {})
            left[d.host.name] = status["publish_backlog"] + dht.get("sync_backlog", 0)
        if not any(left.values()):
            return
        assert time.monotonic() - t0 < seconds, f"not settled within {seconds} s: {left}"


def _health(d: LabDaemon) -> str:
    """What a host's routing looks like (said when a read fails)."""
    with d.client() as client:
        status = client.status()
    dht = status["dht"]
    return (
        f"{status['reachability']} at {status['public_address']}, peers {status['peers']}, "
        f"timeouts {dht.get('timeouts')}, {dht.get('send_failures')}, "
        f"rejected {dht.get('rejected')}, bootstrap {dht.get('bootstrap_unreachable')}; "
        f"last log lines {list(d.log)[-25:]}; udp "
        + " ".join(
            line
            for line in subprocess.run(
                d.host.argv("cat", "/proc/net/snmp"), capture_output=True, text=True
            ).stdout.splitlines()
            if line.startswith("Udp:")
        )
    )


def _spread(daemons: list[LabDaemon], key: bytes) -> str:
    """Who holds the key, by distance, and what each did to place it (said on a failure)."""
    lines = []
    for d in sorted(daemons, key=lambda d: _distance(d, key)):
        stats = _dht_stats(d)
        moved = {
            k: v
            for k, v in stats.items()
            if k.startswith(("hand_off", "anti_entropy", "entry_corr", "pushed", "rpcs_sent.store"))
        }
        lines.append(f"{d.host.name} holds {held(d, key)[0]} {moved}")
    return "; ".join(lines)


def _distance(d: LabDaemon, key: bytes) -> int:
    with d.client() as client:
        return int(client.status()["dht_id"], 16) ^ int.from_bytes(key, "big")


def _dht_stats(d: LabDaemon) -> dict[str, int]:
    with d.client() as client:
        dht = client.status()["dht"]
    out = {}
    for name, value in dht.items():
        if isinstance(value, dict):
            out.update({f"{name}.{k}": v for k, v in value.items() if isinstance(v, int)})
        elif isinstance(value, int) and not isinstance(value, bool):
            out[name] = value
    return out


def _moved(before: dict[str, int], after: dict[str, int]) -> str:
    """The reader's DHT counters that moved during the read (said when the bytes are over)."""
    return ", ".join(
        f"{k} +{after[k] - before.get(k, 0)}" for k in sorted(after) if after[k] != before.get(k, 0)
    )


def test_an_emit_behind_nat_is_found_from_a_public_host(lab: tuple[Lab, list[LabDaemon]]) -> None:
    _lab, daemons = lab
    home, public = daemons[-1], daemons[2]
    took = found_within(public, emit(home, [_row(0, intervention_type="nat_home")], wait=1), 15)
    print(f"\nemit behind NAT read from a public host {took:.2f} s after the emit returned")
    # And the other way: a home host behind the NAT reads what a public host emitted.
    took = found_within(
        daemons[-2], emit(public, [_row(1, intervention_type="public")], wait=1), 15
    )
    print(f"public emit read behind the NAT {took:.2f} s after the emit returned")


def test_a_fresh_hosts_read_costs_about_the_keys_bytes_on_the_wire(
    lab: tuple[Lab, list[LabDaemon]],
) -> None:
    """300 one-row packets emitted on one public host; the host farthest from the key (no
    replica, it never read the key) queries it: its interface receives at most 1.3x the
    key's envelope bytes plus the lookup (the kernel's counter inside its namespace), and a
    repeat read receives a few kilobytes."""
    _lab, daemons = lab
    key = key_for_path(FRESH)
    author = daemons[1]

    # A key no earlier test wrote: nobody holds it, and the reader is the public host farthest
    # from it (no replica of it).
    reader = max(
        (d for d in daemons if d is not author and d.host.behind is None),
        key=lambda d: _distance(d, key),
    )
    assert all(held(d, key) == (0, 0) for d in daemons)
    for i in range(300):
        emit(author, [_row(i + 1, problem_type="lab_fresh")])
    # The read is measured alone: once the author's publisher has pushed every packet and no
    # host has a reconciliation queued (a push still under way is not the read's cost).
    settled(daemons, 60)
    assert held(reader, key) == (0, 0), f"the reader became a replica: {_spread(daemons, key)}"
    _count, unique = held(author, key)
    stats0 = _dht_stats(reader)
    before = reader.host.counter()
    done = reader.cli("query", FRESH, "--json")
    assert done.returncode == 0, done.stderr
    wire = reader.host.counter() - before
    read = json.loads(done.stdout)
    assert len(read["rows"]) >= 300 and read["complete"], done.stdout[-300:]
    print(f"\nfresh read of {unique} B of envelopes: {wire} B on the wire ({wire / unique:.2f}x)")
    assert wire <= 1.3 * unique + 40_000, _moved(stats0, _dht_stats(reader))
    before = reader.host.counter()
    again = reader.cli("query", FRESH, "--json")
    assert again.returncode == 0, again.stderr
    repeat = reader.host.counter() - before
    print(f"repeat read: {repeat} B on the wire")
    assert repeat <= 40_000


def statuses(daemons: list[LabDaemon]) -> list[dict[str, Any]]:
    out = []
    for d in daemons:
        with d.client() as client:
            out.append(client.status())
    return out


def test_each_host_learns_whether_peers_can_reach_it(lab: tuple[Lab, list[LabDaemon]]) -> None:
    """Dial-back probes: a public host is reachable at its lab address (bound to 0.0.0.0, it
    says so), a home host is seen as its NAT router's address and runs as a client, and no
    public host's routing table holds a home host (so no lookup can wait on one)."""
    built, daemons = lab
    t0 = time.monotonic()
    while True:
        seen = statuses(daemons)
        if all(s["reachability"] != "unknown" for s in seen):
            break
        assert time.monotonic() - t0 < 30, [s["reachability"] for s in seen]
    homes = set()
    for d, status in zip(daemons, seen, strict=True):
        if d.host.behind is None:
            assert status["reachability"] == "public", status["dht"]["address_checks"]
            assert status["public_address"] == f"{d.host.address}:{PORT}"
            assert status["address"] == f"0.0.0.0:{PORT}"
        else:
            assert status["reachability"] == "unreachable", status["dht"]["address_checks"]
            router = built.router_address(d.host)
            assert status["public_address"].startswith(f"{router}:"), status["public_address"]
            homes.add(status["dht_id"])
    for d in daemons:
        if d.host.behind is None:
            with d.client() as client:
                table = {p["dht_id"] for p in client.peers()}
            assert not table & homes, f"{d.host.name} holds a NAT'd host in its routing table"


def test_a_follower_behind_nat_is_pushed_to_after_its_mapping_would_have_lapsed(
    lab: tuple[Lab, list[LabDaemon]],
) -> None:
    """A home host watches a path; each time after more than its NAT's idle timeout with
    nothing pushed, a public host emits: the push arrives within 1 s (keep-alive pings hold
    the mapping the holders push through)."""
    _lab, daemons = lab
    home, author = daemons[-1], daemons[3]
    path = "clinical.oncology/lab_push"
    arrived: list[tuple[float, set[str]]] = []
    got = threading.Event()

    with home.client() as client:
        listens = client.status()["dht"]["rpcs_sent"].get("listen", 0)
    watch = home.client().watch(path)

    def read() -> None:
        try:
            for table in watch:
                arrived.append((time.monotonic(), set(table.column("packet_id").to_pylist())))
                got.set()
        except Exception:
            return  # closed

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        t0 = time.monotonic()
        while True:  # registered with the key's holders (status round trips)
            with home.client() as client:
                if client.status()["dht"]["rpcs_sent"].get("listen", 0) > listens:
                    break
            assert time.monotonic() - t0 < 15, "the watch never registered with a holder"
        took = []
        for i in range(3):
            # Nothing is pushed for longer than the NAT keeps an idle mapping.
            assert not got.wait(NAT_UDP_TIMEOUT + 1), "a push came unasked"
            sent = time.monotonic()
            emitted = emit(author, [_row(i, problem_type="lab_push")], wait=1)
            assert got.wait(10), "the push never arrived"
            got.clear()
            when, ids = arrived[-1]
            assert set(emitted) <= ids
            took.append(when - sent)
        shown = ", ".join(f"{t:.3f}" for t in took)
        print(f"\npushes behind NAT after {NAT_UDP_TIMEOUT + 1} s idle: {shown} s")
        assert max(took) < 1.0, took
        with home.client() as client:
            assert client.status()["dht"]["address_checks"]["keepalive_pings"] > 0
    finally:
        watch.close()
