"""Crash safety: a writer killed with SIGKILL mid-stream loses no acknowledged packet."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from helpers import NOW, LineReader, assert_view_matches

from qisd.config import StoreLimits
from qisd.net.store import Store

WRITER = Path(__file__).resolve().parent / "crash_writer.py"


def run_and_kill(data_dir: Path, start: int, acks: int) -> list[tuple[str, bytes]]:
    """Start a writer, read ``acks`` acknowledgements, SIGKILL it; every id it acknowledged."""
    proc = subprocess.Popen(
        [sys.executable, str(WRITER), str(data_dir), str(start)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    reader = LineReader(proc.stdout)
    acked: list[tuple[str, bytes]] = []
    try:
        while len(acked) < acks:
            line = reader.readline(timeout=60)
            assert line is not None, proc.stderr.read().decode() if proc.stderr else ""
            pid, key = line.split()
            acked.append((pid, bytes.fromhex(key)))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    # Lines written before the kill were acknowledged too: they must all be there.
    for line in reader.rest(timeout=30):
        pid, _, key = line.partition(" ")
        if len(pid) == 32 and len(key) == 40:  # a line cut short by the kill acknowledges nothing
            acked.append((pid, bytes.fromhex(key)))
    assert proc.returncode == -signal.SIGKILL
    proc.stdout.close()
    proc.stderr.close()
    return acked


def test_sigkill_mid_stream_loses_no_acknowledged_packet(tmp_path: Path) -> None:
    all_acked: list[tuple[str, bytes]] = []
    # Twice: the second writer starts on the store the first one left behind.
    for round_no in range(2):
        all_acked += run_and_kill(tmp_path, start=round_no * 1_000_000, acks=257 + 6 * round_no)
        with Store.open(tmp_path, limits=StoreLimits(), ttl_ms=30 * 86_400_000) as store:
            assert store.integrity_check()
            missing = [(p, k.hex()) for p, k in all_acked if not store.has(k, p)]
            assert missing == []
            assert store.stats()["packets"] >= len(all_acked)
            # The columnar view lost its unwritten tail with the writer: repaired at open.
            assert assert_view_matches(store, NOW) >= len(all_acked)
