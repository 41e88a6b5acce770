"""qisd.spark against a real local SparkSession and a real node's Flight endpoint.

One SparkSession for the module (``local[2]``, 4 shuffle partitions, no UI); each test has its
own node (``flight_harness.Daemon``: temporary data directory, 127.0.0.1, port 0). Spark's
Python workers are separate processes that reach the endpoint over loopback, as on a site.
Skipped, with the reason, where pyspark or Java is missing.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("pyspark", reason="pyspark is not installed: pip install 'qisd[spark]'")
if shutil.which("java") is None:
    pytest.skip("Spark needs Java (17) on PATH, and there is none", allow_module_level=True)

from flight_harness import WAIT, Daemon  # noqa: E402
from pyspark.sql import DataFrame, SparkSession  # noqa: E402
from pyspark.sql import functions as F  # noqa: E402

from qisd.errors import DaemonNotRunning, UsageError  # noqa: E402
from qisd.spark import (  # noqa: E402
    OutcomesRejected,
    read_outcomes,
    synthesis,
    synthesis_of,
    write_outcomes,
)

pytestmark = pytest.mark.filterwarnings(
    # pyspark's own notice about pandas 3 (it does not use pandas on the paths tested here)
    "ignore:PySpark does not yet fully support pandas:FutureWarning"
)

PATH = "clinical.oncology/treatment_response"
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "spark_site.py"


@pytest.fixture(scope="module")
def spark():
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    session = (
        SparkSession.builder.master("local[2]")
        .appName("qisd-tests")
        .config("spark.sql.shuffle.partitions", "4")
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .getOrCreate()
    )
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()


@pytest.fixture
def daemon(tmp_path: Path):
    with Daemon(tmp_path / "node") as d:
        yield d


def outcome_frame(spark: SparkSession, rows: int, **columns: Any) -> DataFrame:
    """``rows`` valid outcome rows in 4 partitions (partition i holds ids i*rows/4 ...), with
    Spark's own types (long, double, int); ``columns`` replaces columns by Spark expression."""
    now = time.time_ns() // 1_000_000
    data = {
        "timestamp_utc": F.lit(now),
        "domain": F.lit("clinical.oncology"),
        "problem_type": F.lit("treatment_response"),
        "model_architecture": F.lit("gbm-500"),
        "training_phase": F.lit("final"),
        "metric_name": F.lit("val_auc"),
        "metric_delta": (F.col("id") % 1000) / 10_000,
        "metric_value": F.lit(0.84),
        "confidence": F.lit(0.9),
        "intervention_type": F.concat(F.lit("arm_"), (F.col("id") % 3).cast("string")),
        "intervention_params": F.lit('{"dose_mg": 50}'),
        "outcome_decile": F.lit(8),
        "sample_count": F.col("id").cast("int"),
        "data_ref": F.lit("/site/a/cohort-2026"),
        "patient_id": F.concat(F.lit("patient-"), F.col("id").cast("string")),
    }
    data.update(columns)
    frame = spark.range(rows, numPartitions=4)
    return frame.select(*[value.alias(name) for name, value in data.items()])


def stored(daemon: Daemon) -> int:
    return daemon.run(lambda: daemon.node.query(PATH, local_only=True)).num_rows


def test_importing_qisd_does_not_import_pyspark() -> None:
    code = (
        "import sys, qisd, qisd.client, qisd.net.flight, qisd.net.node\n"
        "assert 'pyspark' not in sys.modules, 'pyspark was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=WAIT)


def test_round_trip_of_100000_rows_over_4_partitions(spark, daemon) -> None:
    df = outcome_frame(spark, 100_000)
    result = write_outcomes(df, daemon.location)
    assert result.rows == result.accepted == 100_000
    assert [p.partition for p in result.partitions] == [0, 1, 2, 3]
    assert all(p.rows == 25_000 and p.packet_ids for p in result.partitions)
    assert result.duplicates == 0 and result.new_packets == len(set(result.packet_ids))

    back = read_outcomes(spark, daemon.location, PATH)
    assert "patient_id" not in back.columns  # only the packet's columns ever left Spark
    summary = back.agg(
        F.count("*").alias("rows"),
        F.sum("sample_count").alias("samples"),
        F.countDistinct("packet_id").alias("packets"),
        F.countDistinct("signer").alias("signers"),
        F.collect_set("node_id").alias("node_ids"),
        F.countDistinct("intervention_type").alias("interventions"),
    ).first()
    assert summary.rows == 100_000
    assert summary.samples == sum(range(100_000))
    assert summary.packets == result.new_packets
    assert summary.signers == 1 and summary.node_ids == [daemon.node.identity.node_id]
    assert summary.interventions == 3
    types = dict(back.dtypes)
    assert types["metric_delta"] == "float" and types["outcome_decile"] == "tinyint"
    assert types["timestamp_utc"] == "bigint" and types["sample_count"] == "int"


def test_a_bad_row_fails_the_job_naming_it(spark, daemon) -> None:
    confidence = F.when(F.col("id") == 2_600, F.lit(1.5)).otherwise(F.lit(0.9))
    df = outcome_frame(spark, 4_000, confidence=confidence)
    with pytest.raises(OutcomesRejected) as err:
        write_outcomes(df, daemon.location)
    message = str(err.value)
    assert "\n" not in message
    # Partition 2 holds ids 2000..2999: id 2600 is its row 600.
    assert message.startswith("partition 2 row 600 (")
    assert "confidence=1.5: must lie in [0, 1]" in message
    assert "intervention_type='arm_2'" in message
    # Each partition is its own stream: the others were stored, the refused one not at all.
    result = err.value.result
    assert [p.accepted for p in result.partitions] == [1_000, 1_000, 0, 1_000]
    assert stored(daemon) == 3_000


def test_partial_mode_keeps_valid_rows_and_lists_the_others(spark, daemon) -> None:
    decile = F.when(F.col("id").isin(2_600, 3_005), F.lit(11)).otherwise(F.lit(8))
    now = time.time_ns() // 1_000_000
    # A Spark timestamp is taken as what it is: epoch milliseconds in the packet.
    when = F.timestamp_millis(F.lit(now))
    df = outcome_frame(spark, 4_000, outcome_decile=decile, timestamp_utc=when)
    result = write_outcomes(df, daemon.location, partial=True)
    assert result.rows == 4_000 and result.accepted == 3_998
    assert [(p, r) for p, r, _ in result.rejected] == [(2, 600), (3, 5)]
    assert all("outcome_decile=11" in reason for _, _, reason in result.rejected)
    assert result.rejected[0][2].startswith("row 600: ")
    table = daemon.run(lambda: daemon.node.query(PATH, local_only=True))
    assert table.num_rows == 3_998
    assert set(table.column("timestamp_utc").to_pylist()) == {now}


def test_rows_of_several_domains_in_a_partition_go_to_their_own_paths(spark, daemon) -> None:
    domain = F.when(F.col("id") % 2 == 0, "clinical.oncology").otherwise("clinical.cardiology")
    confidence = F.when(F.col("id") == 1_501, F.lit(1.5)).otherwise(F.lit(0.9))
    df = outcome_frame(spark, 2_000, domain=domain, confidence=confidence)
    result = write_outcomes(df, daemon.location, partial=True)
    assert result.accepted == 1_999
    # Partition 3 holds ids 1500..1999: id 1501 is its row 1, a cardiology row.
    assert [(p, r) for p, r, _ in result.rejected] == [(3, 1)]
    assert stored(daemon) == 1_000
    cardiology = daemon.run(
        lambda: daemon.node.query("clinical.cardiology/treatment_response", local_only=True)
    )
    assert cardiology.num_rows == 999


def test_a_rerun_gives_duplicates_not_new_votes(spark, daemon) -> None:
    df = outcome_frame(spark, 2_000)
    first = write_outcomes(df, daemon.location)
    before = synthesis_of(daemon.location, PATH)
    again = write_outcomes(df, daemon.location)
    assert again.packet_ids == first.packet_ids
    assert again.new_packets == 0 and again.duplicates == len(first.packet_ids)
    assert all(p.duplicates == p.packet_ids for p in again.partitions)
    assert stored(daemon) == 2_000
    after = synthesis_of(daemon.location, PATH)
    assert after["packets_analyzed"] == before["packets_analyzed"] == 2_000
    assert after["interventions"] == before["interventions"]
    frame = synthesis(spark, daemon.location, PATH)
    row = frame.first()
    assert frame.count() == 1 and row.best_intervention == after["best_intervention"]


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ("drop", "missing columns ['confidence']"),
        ("text", "confidence is string (must be a number)"),
    ],
)
def test_a_missing_or_mistyped_column_is_named_before_any_task(
    spark, daemon, change, named
) -> None:
    df = outcome_frame(spark, 10)
    if change == "drop":
        df = df.drop("confidence").withColumn("confidance", F.lit(0.9))
    else:
        df = df.withColumn("confidence", F.lit("high"))
    with pytest.raises(UsageError) as err:
        write_outcomes(df, daemon.location)
    assert named in str(err.value)
    if change == "drop":
        assert "columns not sent: ['confidance', 'patient_id']" in str(err.value)
    assert stored(daemon) == 0


def test_an_unreachable_daemon_is_one_line(spark, tmp_path: Path) -> None:
    with Daemon(tmp_path / "gone") as gone:
        location = gone.location
    with pytest.raises(DaemonNotRunning, match="cannot reach the qisd Flight endpoint"):
        write_outcomes(outcome_frame(spark, 10), location)


def test_every_task_and_call_sends_the_token(spark, tmp_path: Path) -> None:
    with Daemon(tmp_path / "node", token="s3cret") as guarded:
        result = write_outcomes(outcome_frame(spark, 400), guarded.location, token="s3cret")
        assert result.accepted == 400
        assert read_outcomes(spark, guarded.location, PATH, token="s3cret").count() == 400
        assert synthesis_of(guarded.location, PATH, token="s3cret")["packets_analyzed"] == 400
        with pytest.raises(UsageError, match="needs its token: pass token="):
            write_outcomes(outcome_frame(spark, 10), guarded.location)
        with pytest.raises(UsageError, match="needs its token"):
            synthesis_of(guarded.location, PATH)


def test_the_example_job_runs_end_to_end(spark) -> None:
    spec = importlib.util.spec_from_file_location("spark_site", EXAMPLE)
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    lines: list[str] = []
    summary = example.run(spark, say=lines.append)
    text = "\n".join(lines)
    assert summary["signers_read"] == 3
    assert summary["synthesis"]["best_intervention"] == "drug_b"
    assert summary["synthesis"]["distinct_signers"] == 3
    assert "Recommendation: Try 'drug_b'" in text
    assert "patient records stay in its Spark job" in text
