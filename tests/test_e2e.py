"""End to end: real ``qisd start --port 0`` processes on 127.0.0.1, driven by the real CLI.

Five daemons, each bootstrapped to the first: an emit on one is found from another, also after
the bootstrap peer is SIGKILLed; bulk emits from JSON lines and Parquet are found in full; a
follower is pushed a packet without querying; a daemon SIGTERMed during a bulk emit keeps every
packet the CLI reported as committed. Waits are on output lines with deadlines, never sleeps.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import LineReader
from test_cli import FLAGS, QISD, Daemon, one_line_error, qisd, watching

PATH = "clinical.oncology/treatment_response_classification"
# Short RPC timeouts: a dead peer costs a second, not the default two.
ENV = {"QISD_DHT_RPC_TIMEOUT": "1.0", "QISD_ELECTION_SECONDS": "3600", "QISD_LOG_LEVEL": "warning"}


@pytest.fixture(scope="module")
def five(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Daemon]]:
    root = tmp_path_factory.mktemp("e2e")
    daemons: list[Daemon] = []
    try:
        daemons.append(Daemon(root / "d1", env=ENV))
        for i in range(2, 6):
            daemons.append(Daemon(root / f"d{i}", "--bootstrap", daemons[0].address, env=ENV))
        yield daemons
    finally:
        # Every daemon still running (the seed is SIGKILLed by a test) stops cleanly.
        codes = [d.terminate() for d in daemons if d.proc.poll() is None]
        assert all(code == 0 for code in codes), codes


def query_json(d: Daemon, path: str, *extra: str) -> list[dict[str, Any]]:
    done = d.cli("query", path, "--json", *extra)
    assert done.returncode == 0, done.stderr
    read = json.loads(done.stdout)
    if "--local" not in extra:
        assert read["replicas_answered"] >= 1, read
    return read["rows"]


def test_emitted_on_three_found_on_five_then_on_four_after_the_seed_dies(
    five: list[Daemon],
) -> None:
    d1, d2, d3, d4, d5 = five
    now = int(time.time() * 1000)
    done = d3.cli(
        "emit",
        *FLAGS,
        "--training-phase=epoch_5_of_50",
        '--params={"schedule": "cosine_annealing", "T_max": 10}',
        "--samples=1240",
        "--data-ref=/data/site3/cohort.parquet",
        f"--timestamp={now}",
        "--wait=1",
        "--json",
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    (pid,) = result["packet_ids"]
    assert result["replicas"][pid] >= 1

    rows = query_json(d5, PATH)
    got = [r for r in rows if r["packet_id"] == pid]
    assert len(got) == 1
    row = got[0]
    assert row["node_id"] == d3.node_id
    expected = {
        "timestamp_utc": now,
        "domain": "clinical.oncology",
        "problem_type": "treatment_response_classification",
        "model_architecture": "transformer-256d",
        "training_phase": "epoch_5_of_50",
        "metric_name": "val_auc",
        "metric_value": 0.847,
        "metric_delta": 0.023,
        "confidence": 0.91,
        "intervention_type": "learning_rate_schedule",
        "intervention_params": '{"schedule":"cosine_annealing","T_max":10}',
        "outcome_decile": 8,
        "sample_count": 1240,
    }
    assert {k: row[k] for k in expected} == expected
    # The data reference never leaves the machine: only its keyed commitment does.
    assert re.fullmatch(r"[0-9a-f]{32}", row["raw_data_hash"])
    assert "cohort" not in json.dumps(rows)

    d1.kill()  # the bootstrap peer goes away without a word
    done = d2.cli("emit", *FLAGS, "--intervention=warmup", "--wait=1")
    assert done.returncode == 0, done.stderr
    (pid2,) = done.stdout.split()
    rows = query_json(d4, PATH)
    found = [r for r in rows if r["packet_id"] == pid2]
    assert len(found) == 1 and found[0]["node_id"] == d2.node_id
    status = json.loads(d4.cli("status", "--json").stdout)
    assert status["peers"] >= 2


def _rows(n: int, problem: str) -> list[dict[str, Any]]:
    return [
        {
            "domain": "clinical.oncology",
            "problem_type": problem,
            "model_architecture": f"arch-{i % 4}",
            "metric_name": "val_auc",
            "metric_value": 0.8,
            "metric_delta": round(0.0001 * i, 6),
            "confidence": 0.9,
            "intervention_type": f"iv-{i % 3}",
            "intervention_params": json.dumps({"i": i}),
            "outcome_decile": 1 + i % 10,
            "sample_count": i,
        }
        for i in range(n)
    ]


def test_a_thousand_rows_from_json_lines_and_parquet_are_all_found(
    five: list[Daemon], tmp_path: Path
) -> None:
    d2, d4, d5 = five[1], five[3], five[4]
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in _rows(1000, "bulk_jsonl")))
    parquet = tmp_path / "rows.parquet"
    pq.write_table(pa.Table.from_pylist(_rows(1000, "bulk_parquet")), parquet)

    done = d2.cli("emit", "--from", str(jsonl), "--wait=1", "--json")
    assert done.returncode == 0, done.stderr
    from_jsonl = json.loads(done.stdout)
    assert from_jsonl["rows"] == 1000
    done = d4.cli("emit", "--from", str(parquet), "--wait=1", "--json")
    assert done.returncode == 0, done.stderr
    from_parquet = json.loads(done.stdout)
    assert from_parquet["rows"] == 1000

    for problem, result in (("bulk_jsonl", from_jsonl), ("bulk_parquet", from_parquet)):
        rows = query_json(d5, f"clinical.oncology/{problem}")
        assert len(rows) == 1000
        assert {r["packet_id"] for r in rows} == set(result["packet_ids"])
        assert sorted(r["sample_count"] for r in rows) == list(range(1000))
        # A finer level of the same rows: one model architecture's quarter.
        fine = query_json(d5, f"clinical.oncology/{problem}/arch-1")
        assert len(fine) == 250


def test_a_follower_is_pushed_packets_without_querying(five: list[Daemon]) -> None:
    d2, d4 = five[1], five[3]
    path = "clinical.oncology/followed_problem"
    assert d4.cli("follow", path).returncode == 0
    with watching(path, d4.data_dir) as watch:
        done = d2.cli("emit", *FLAGS, "--problem-type=followed_problem", "--wait=1", "--json")
        assert done.returncode == 0, done.stderr
        (pid,) = json.loads(done.stdout)["packet_ids"]
        line = LineReader(watch.stdout).readline(timeout=30)
        assert line is not None
        pushed = json.loads(line)
        assert pushed["packet_id"] == pid and pushed["node_id"] == d2.node_id
        assert watch.wait(30) == 0
    # Stored on the follower by the push: a local read has it, with no network query made.
    local = query_json(d4, path, "--local")
    assert [r["packet_id"] for r in local] == [pid]
    status = json.loads(d4.cli("status", "--json").stdout)
    assert status["followed"] == [path]


def test_sigterm_during_a_bulk_emit_keeps_every_reported_packet(tmp_path: Path) -> None:
    data_dir = tmp_path / "bulk"
    daemon = Daemon(data_dir, env=ENV)
    source = tmp_path / "many.jsonl"
    # One packet per chunk: a distinct fingerprint per 20 rows.
    rows = _rows(4000, "sigterm")
    for i, r in enumerate(rows):
        r["model_architecture"] = f"arch-{i // 20}"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    emit = subprocess.Popen(
        [*QISD, "emit", "--from", str(source), "--chunk-rows", "20", "--data-dir", str(data_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={k: v for k, v in os.environ.items() if k != "QISD_DATA_DIR"},
    )
    reported: list[str] = []
    out = LineReader(emit.stdout)
    try:
        while len(reported) < 10:
            line = out.readline(timeout=60)
            assert line is not None, emit.stderr.read() if emit.stderr else ""
            reported.append(line)
        daemon.proc.send_signal(signal.SIGTERM)
        reported += [line for line in out.rest(timeout=60) if line]
        code = emit.wait(60)
        err = emit.stderr.read().decode() if emit.stderr else ""
    finally:
        if emit.poll() is None:
            emit.kill()
            emit.wait()
    assert daemon.terminate() == 0, daemon.lines
    assert len(reported) < 200, "the emit finished before the daemon was stopped"
    assert code == 3, err
    assert "committed before this" in err and "Traceback" not in err
    assert all(re.fullmatch(r"[0-9a-f]{32}", pid) for pid in reported)

    again = Daemon(data_dir, env=ENV)
    try:
        stored = {r["packet_id"] for r in query_json(again, "clinical.oncology/sigterm", "--local")}
        assert set(reported) <= stored
        assert len(stored) >= len(reported)
    finally:
        assert again.terminate() == 0


def test_stop_with_no_daemon_and_a_second_start_are_one_line_errors(tmp_path: Path) -> None:
    one_line_error(qisd("stop", "--data-dir", str(tmp_path / "none")), 3, "no qisd daemon")
