"""Interop examples for the Flight endpoint (docs/flight.md), each run against a real node.

pandas, Polars and DuckDB read a DoGet stream; pandas writes outcomes with DoPut; and the
article's client pattern (``FlightDescriptor.for_path(domain, problem_type)`` for DoPut,
``Ticket(b"domain/problem_type")`` for DoGet, all 15 columns including a ``node_id`` of its
own) works unchanged.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import duckdb
import pandas as pd
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.flight as flight
import pytest
from flight_harness import Daemon, outcome_table

from qisd.core.packet import SCHEMA

PATH = "clinical.oncology/treatment_response_classification"
TICKET = flight.Ticket(PATH.encode())


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@pytest.fixture
def location(tmp_path: Path):
    with Daemon(tmp_path / "node") as daemon:
        with flight.connect(daemon.location) as client:
            writer, reader = client.do_put(
                flight.FlightDescriptor.for_path(*PATH.split("/")), SCHEMA
            )
            with writer:
                writer.write_table(outcome_table(20, now_ms=now_ms()))
        yield daemon.location


def test_pandas_reads_a_doget_stream(location: str) -> None:
    client = flight.connect(location)
    df = client.do_get(TICKET).read_pandas()
    assert len(df) == 20
    best = df.groupby("intervention_type")["metric_delta"].mean()
    assert list(best.index) == ["learning_rate_schedule"]


def test_polars_reads_a_doget_stream(location: str) -> None:
    client = flight.connect(location)
    df = pl.from_arrow(client.do_get(TICKET).read_all())
    top = df.filter(pl.col("confidence") > 0.7).sort("metric_delta", descending=True).head(3)
    assert top.height == 3 and top["metric_delta"][0] == pytest.approx(0.0019, abs=1e-6)


def test_duckdb_queries_a_doget_stream(location: str) -> None:
    client = flight.connect(location)
    con = duckdb.connect()
    # A RecordBatchReader: DuckDB pulls batches from the stream as it scans.
    con.register("packets", client.do_get(TICKET).to_reader())
    rows = con.sql(
        "SELECT intervention_type, count(*) AS n, count(DISTINCT signer) AS signers "
        "FROM packets GROUP BY intervention_type"
    ).fetchall()
    assert rows == [("learning_rate_schedule", 20, 1)]


def test_pandas_writes_outcomes_with_doput(location: str) -> None:
    df = pd.DataFrame(
        {
            "timestamp_utc": [pd.Timestamp.now(tz="UTC")] * 2,
            "domain": "clinical.oncology",
            "problem_type": "treatment_response_classification",
            "model_architecture": "gbm-500",
            "training_phase": "final",
            "metric_name": "val_auc",
            "metric_delta": [0.031, 0.012],
            "metric_value": [0.861, 0.842],
            "confidence": [0.93, 0.88],
            "intervention_type": ["feature_selection", "class_weighting"],
            "intervention_params": [json.dumps({"k": 40}), json.dumps({"pos_weight": 3})],
            "outcome_decile": [9, 7],
            "sample_count": [1800, 950],
            "data_ref": ["/site/a/cohort-2024", "/site/a/cohort-2024"],
        }
    )
    client = flight.connect(location)
    table = pa.Table.from_pandas(df, preserve_index=False)
    descriptor = flight.FlightDescriptor.for_path(
        "clinical.oncology", "treatment_response_classification"
    )
    writer, reader = client.do_put(descriptor, table.schema)
    writer.write_table(table)
    writer.done_writing()
    reply = json.loads(reader.read().to_pybytes())
    writer.close()
    assert reply["accepted"] == 2 and len(reply["packet_ids"]) == 1
    fine = flight.Ticket(b"clinical.oncology/treatment_response_classification/gbm-500")
    back = client.do_get(fine).read_pandas()
    assert sorted(back["intervention_type"]) == ["class_weighting", "feature_selection"]


def test_the_articles_client_pattern_works_unchanged(location: str) -> None:
    """The article's node: a path descriptor of (domain, problem_type) for DoPut, one
    15-column row per stream with its own node_id, ``writer.close()`` without reading the
    reply; a ``Ticket(b"domain/problem_type")`` for DoGet; its synthesis over the result."""
    domain, problem_type = "clinical.oncology", "treatment_response_classification"
    client = flight.FlightClient(location)
    descriptor = flight.FlightDescriptor.for_path(domain, problem_type)
    ticket = flight.Ticket("/".join([domain, problem_type]).encode())

    for node_id, delta, intervention in [
        ("gpu-node-a", 0.023, "learning_rate_schedule"),
        ("gpu-node-b", 0.041, "dropout_tuning"),
    ]:
        packet = pa.record_batch(
            {
                "node_id": [node_id],
                "timestamp_utc": [int(time.time() * 1000)],
                "domain": [domain],
                "problem_type": [problem_type],
                "model_architecture": ["transformer-256d"],
                "training_phase": ["epoch_5_of_50"],
                "metric_name": ["val_auc"],
                "metric_delta": [delta],
                "metric_value": [0.847],
                "confidence": [0.91],
                "intervention_type": [intervention],
                "intervention_params": [json.dumps({"rate": 0.3})],
                "outcome_decile": [8],
                "sample_count": [1240],
                "raw_data_hash": [hashlib.sha256(b"/local/data").hexdigest()[:16]],
            },
            schema=SCHEMA,
        )
        writer, _ = client.do_put(descriptor, packet.schema)
        writer.write(packet)
        writer.close()

    packets = client.do_get(ticket).read_all()
    assert packets.num_rows == 22
    good = packets.filter(
        pc.and_(pc.greater(packets["confidence"], 0.7), pc.greater(packets["metric_delta"], 0.0))
    )
    deltas = good["metric_delta"].to_pylist()
    best = good["intervention_type"].to_pylist()[deltas.index(max(deltas))]
    assert best == "dropout_tuning"
    # The daemon signed both rows itself: their node_id is its own, not the client's.
    assert "gpu-node-a" not in set(packets["node_id"].to_pylist())
