"""Crash soak: a real ``qisd start`` daemon SIGKILLed at random moments under a continuous emit
stream loses no packet the client was told is committed, and its store stays intact.

Each cycle starts the daemon (real subprocess, real control socket), emits rows through
:class:`qisd.Client` as fast as it answers, and SIGKILLs the daemon from a timer thread at a random
moment (so kills land mid-commit, mid-reply and between requests). After the kill, the store is
opened directly: SQLite's integrity check and every quota counter must pass, and every packet id an
emit returned must be present under each of its keys; after the restart the daemon's own query
must show them too. Full mode: 24 cycles; ``QISD_SLOW=ci``: 5 cycles; the default run: 2 cycles.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from helpers import LineReader, assert_view_matches, clean_env, lone_daemon_argv, outcome_row

from qisd import Client
from qisd.config import StoreLimits
from qisd.core.fingerprint import key_for_path
from qisd.core.packet import RESULT_SCHEMA
from qisd.errors import QisdError
from qisd.net.datadir import init_identity
from qisd.net.store import Store

QISD = Path(sys.executable).with_name("qisd")
PATH = "clinical.oncology/treatment_response_classification"


def start_daemon(
    data_dir: Path, *extra: str, seen: list[str] | None = None
) -> tuple[subprocess.Popen[bytes], LineReader]:
    """``qisd start`` on 127.0.0.1 (no bootstrap peers); returns once it printed readiness.

    The lines printed before readiness are appended to ``seen`` when given."""
    proc = subprocess.Popen(
        [str(QISD), *lone_daemon_argv(data_dir, "--log-level", "warning", *extra)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=clean_env(),
    )
    assert proc.stderr is not None
    reader = LineReader(proc.stderr)
    seen = [] if seen is None else seen
    while True:
        line = reader.readline(timeout=30)
        assert line is not None, f"daemon exited before readiness: {seen}"
        seen.append(line)
        if line.startswith("qisd listening on"):
            return proc, reader


def emit_until_killed(
    data_dir: Path, proc: subprocess.Popen[bytes], kill_after: float, serial: Iterator[int]
) -> tuple[list[str], int]:
    """Emit 1..8-row chunks until the daemon dies; (ids the client was told are committed, n).

    A timer thread SIGKILLs the daemon ``kill_after`` seconds in, whatever it is doing.
    """
    rng = random.Random(kill_after)
    timer = threading.Timer(kill_after, proc.send_signal, (signal.SIGKILL,))
    committed: list[str] = []
    failures = 0
    timer.start()
    try:
        with Client(data_dir, timeout=30, connect_timeout=5) as client:
            while proc.poll() is None:
                # No timestamp_utc: the daemon stamps its own clock.
                rows = [outcome_row(next(serial)) for _ in range(rng.randint(1, 8))]
                try:
                    result = client.emit(rows)
                except QisdError:
                    failures += 1  # the kill landed on this request: nothing was promised
                    break
                committed.extend(result["packet_ids"])
    finally:
        timer.cancel()
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    return committed, failures


def check_store(data_dir: Path, committed: list[str]) -> None:
    """Integrity and presence, read straight from the store file the killed daemon left."""
    with Store.open(data_dir, limits=StoreLimits(), ttl_ms=30 * 86_400_000) as store:
        assert store.integrity_check()
        missing = [pid for pid in committed if store.get(pid) is None]
        assert missing == [], f"{len(missing)} committed packets lost, e.g. {missing[:3]}"
        # Each packet is one envelope per routable level of the default template (2 levels).
        assert store.stats()["local_packets"] >= 2 * len(committed)
        # The columnar view, repaired at open, shows exactly what the envelopes hold.
        assert assert_view_matches(store, time.time_ns() // 1_000_000) >= len(committed)


def soak(tmp_path: Path, cycles: int, seed: int, earliest: float = 0.05) -> dict[str, float]:
    data_dir = tmp_path / "node"
    init_identity(data_dir)
    rng = random.Random(seed)
    serial = iter(range(10**9))
    committed: list[str] = []
    kills_mid_request = 0
    started = time.monotonic()
    for _cycle in range(cycles):
        proc, _reader = start_daemon(data_dir)
        ids, failed = emit_until_killed(data_dir, proc, rng.uniform(earliest, 1.5), serial)
        assert proc.returncode == -signal.SIGKILL
        committed += ids
        kills_mid_request += failed
        check_store(data_dir, committed)
    # A last restart: the daemon itself serves every committed packet, and exactly the
    # rows its envelopes hold (its columnar view, repaired after each kill).
    with Store.open(data_dir, limits=StoreLimits(), ttl_ms=30 * 86_400_000) as store:
        held = pa.Table.from_batches(
            list(store.decoded(key_for_path(PATH), now_ms=time.time_ns() // 1_000_000)),
            schema=RESULT_SCHEMA,
        )
    proc, _reader = start_daemon(data_dir)
    try:
        with Client(data_dir, timeout=60) as client:
            table = client.query(PATH, local=True)
            assert set(committed) <= set(table.column("packet_id").to_pylist())
            assert table.equals(held)
            client.stop(timeout=30)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    return {
        "cycles": cycles,
        "committed": len(committed),
        "kills_mid_request": kills_mid_request,
        "seconds": time.monotonic() - started,
    }


def test_two_sigkills_under_an_emit_stream_lose_nothing_committed(tmp_path: Path) -> None:
    figures = soak(tmp_path, cycles=2, seed=7, earliest=0.4)
    assert figures["committed"] > 0


@pytest.mark.slow
def test_crash_soak_random_sigkills_lose_nothing_committed(tmp_path: Path, qisd_slow: str) -> None:
    cycles = 24 if qisd_slow == "full" else 5
    figures = soak(tmp_path, cycles=cycles, seed=int.from_bytes(os.urandom(4), "big"))
    print(f"crash soak: {figures}")
    assert figures["committed"] > cycles


def flight_daemon(data_dir: Path) -> tuple[subprocess.Popen[bytes], str]:
    """``qisd start --flight`` on 127.0.0.1 port 0; the process and the endpoint's URI."""
    seen: list[str] = []
    flags = ("--flight", "grpc://127.0.0.1:0", "--log-level", "info")
    proc, _reader = start_daemon(data_dir, *flags, seen=seen)
    uri = next(line.rsplit(" ", 1)[-1] for line in seen if "Arrow Flight endpoint at" in line)
    return proc, uri


def one_row_batch(i: int) -> Any:
    """Row ``i`` as a one-row batch of the article's schema, stamped now."""
    import json

    import pyarrow as pa

    from qisd.core.packet import SCHEMA

    row = {name: outcome_row(i).get(name) for name in SCHEMA.names}
    row["intervention_params"] = json.dumps(row["intervention_params"])
    row["timestamp_utc"] = time.time_ns() // 1_000_000
    row["node_id"], row["raw_data_hash"] = "replaced by the daemon", "5f2b1c0d9e8a7b6c"
    return pa.RecordBatch.from_pylist([row], schema=SCHEMA)


def put_until_refused(client: Any, start: int, acked: list[str], first: threading.Event) -> int:
    """Single-row DoPuts (the article's pattern) until one fails; the failures (0 or 1).

    A put counts as acknowledged once its reply names its packet id and the call's status is
    OK (the daemon replies only after the commit)."""
    import json

    import pyarrow.flight as flight

    from qisd.core.packet import SCHEMA

    descriptor = flight.FlightDescriptor.for_path(*PATH.split("/"))
    for i in range(start, start + 100_000):
        try:
            writer, reader = client.do_put(descriptor, SCHEMA)
            writer.write_batch(one_row_batch(i))
            writer.done_writing()
            reply = reader.read()
            writer.close()
        except flight.FlightError:
            return 1  # the kill landed on this put: nothing was promised
        acked.extend(json.loads(reply.to_pybytes())["packet_ids"])
        first.set()
    return 0


def test_a_sigkill_under_single_row_flight_puts_loses_no_acknowledged_row(tmp_path: Path) -> None:
    # DoPut commits in the gRPC thread and replies after the commit: a put whose stream
    # closed cleanly (and whose reply named its packet id) survives the daemon being killed.
    import pyarrow.flight as flight

    data_dir = tmp_path / "node"
    init_identity(data_dir)
    proc, uri = flight_daemon(data_dir)
    first = threading.Event()
    timer = threading.Timer(0.8, proc.send_signal, (signal.SIGKILL,))
    acked: list[str] = []
    client = flight.connect(uri)
    try:
        first_put = threading.Thread(target=lambda: (first.wait(60), timer.start()))
        first_put.start()  # the kill lands 0.8 s into the stream of puts
        failures = put_until_refused(client, 0, acked, first)
        first_put.join(60)
    finally:
        timer.cancel()
        client.close()
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert len(acked) > 10, "the daemon died before a handful of puts"
    assert failures == 1
    check_store(data_dir, acked)


def test_a_sigkill_under_eight_concurrent_writers_loses_no_acknowledged_row(
    tmp_path: Path,
) -> None:
    # Eight clients put single rows at once: their puts share group commits. Each put is
    # acknowledged only after its group's COMMIT, so every acknowledged id survives the kill.
    import pyarrow.flight as flight

    data_dir = tmp_path / "node"
    init_identity(data_dir)
    proc, uri = flight_daemon(data_dir)
    first = threading.Event()
    acked: list[list[str]] = [[] for _ in range(8)]
    failures = [0] * 8
    clients = [flight.connect(uri) for _ in range(8)]

    def writer(w: int) -> None:
        failures[w] = put_until_refused(clients[w], 1_000_000 * w, acked[w], first)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(8)]
    timer = threading.Timer(1.0, proc.send_signal, (signal.SIGKILL,))
    try:
        for t in threads:
            t.start()
        assert first.wait(60), "no put was acknowledged"
        timer.start()
        for t in threads:
            t.join(120)
        assert not any(t.is_alive() for t in threads)
    finally:
        timer.cancel()
        for c in clients:
            c.close()
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    everyone = [pid for ids in acked for pid in ids]
    assert all(len(ids) > 0 for ids in acked), [len(ids) for ids in acked]
    assert sum(failures) == 8  # every writer was cut off by the kill, none by anything else
    check_store(data_dir, everyone)
