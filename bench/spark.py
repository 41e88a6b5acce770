"""A Spark job's outcome rows into qisd, against qisd's own batched DoPut from pandas, one run.

    python bench/spark.py                   # 1,000,000 rows each way; ~2 minutes on 2 cores
    python bench/spark.py --rows 200000     # a quick look

Each writer gets a fresh qisd daemon of its own (a real Node in its own process: data
directory on disk, SQLite with fsync per commit, a lone DHT node, Flight on 127.0.0.1, port 0;
``bench/flight.py``'s server), and the same number of rows:

* **pandas**: one client holding a pandas DataFrame sends it as Arrow in DoPut streams of
  100,000 rows (the most one stream carries), one after the other: qisd's own batched DoPut.
* **spark**: a cached 4-partition DataFrame (``local[2]``) written with
  :func:`qisd.spark.write_outcomes`: four tasks, each its own DoPut streams, at once.

Then both read the rows back: ``read_pandas()`` of a DoGet, and :func:`qisd.spark.read_outcomes`
counted by Spark. Figures are rows/s; the ratio is Spark's over pandas' (goal >= 0.8x).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.flight as flight

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("bench_flight", HERE / "flight.py")
assert _spec is not None and _spec.loader is not None
bench_flight = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_flight)

PATH = bench_flight.PATH
PUT_ROWS = 100_000
"""Rows per DoPut stream (the daemon's limit) for the pandas client."""


def pandas_put(location: str, rows: int) -> float:
    """Rows/s of one pandas client's batched DoPuts of ``rows`` rows."""
    frame = bench_flight.rows_table(rows).to_pandas()
    descriptor = flight.FlightDescriptor.for_path(*PATH.split("/"))
    client = flight.connect(location)
    t0 = time.perf_counter()
    for start in range(0, rows, PUT_ROWS):
        table = pa.Table.from_pandas(frame.iloc[start : start + PUT_ROWS], preserve_index=False)
        writer, reader = client.do_put(descriptor, table.schema)
        writer.write_table(table)
        writer.done_writing()
        reply = json.loads(reader.read().to_pybytes())
        writer.close()
        if reply["accepted"] != table.num_rows:
            raise SystemExit(f"pandas DoPut stored {reply['accepted']} of {table.num_rows} rows")
    elapsed = time.perf_counter() - t0
    client.close()
    return rows / elapsed


def pandas_get(location: str, rows: int) -> float:
    client = flight.connect(location)
    t0 = time.perf_counter()
    frame = client.do_get(flight.Ticket(PATH.encode())).read_pandas()
    elapsed = time.perf_counter() - t0
    client.close()
    if len(frame) != rows:
        raise SystemExit(f"DoGet returned {len(frame)} rows, expected {rows}")
    return rows / elapsed


def spark_frame(spark: Any, rows: int) -> Any:
    """The bench's rows as a cached 4-partition Spark DataFrame (Spark's own types)."""
    from pyspark.sql import functions as F

    now = time.time_ns() // 1_000_000
    domain, problem = PATH.split("/")
    frame = spark.range(rows, numPartitions=4).select(
        F.lit(now).alias("timestamp_utc"),
        F.lit(domain).alias("domain"),
        F.lit(problem).alias("problem_type"),
        F.lit("transformer-256d").alias("model_architecture"),
        F.lit("epoch_5_of_50").alias("training_phase"),
        F.lit("val_auc").alias("metric_name"),
        ((F.col("id") % 1000) / 10_000).cast("float").alias("metric_delta"),
        F.lit(0.847).cast("float").alias("metric_value"),
        F.lit(0.91).cast("float").alias("confidence"),
        F.lit("learning_rate_schedule").alias("intervention_type"),
        F.lit('{"schedule":"cosine_annealing","T_max":10}').alias("intervention_params"),
        F.lit(8).cast("tinyint").alias("outcome_decile"),
        F.col("id").cast("int").alias("sample_count"),
        F.lit("5f2b1c0d9e8a7b6c").alias("raw_data_hash"),
    )
    frame = frame.cache()
    frame.count()
    return frame


def run(args: argparse.Namespace) -> dict[str, float]:
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    from pyspark.sql import SparkSession

    from qisd.spark import read_outcomes, write_outcomes

    spark = (
        SparkSession.builder.master("local[2]")
        .config("spark.sql.shuffle.partitions", "4")
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .getOrCreate()
    )
    spark.sparkContext.setLogLevel("ERROR")
    out: dict[str, float] = {"rows": args.rows}
    try:
        frame = spark_frame(spark, args.rows)
        with tempfile.TemporaryDirectory(prefix="qisd-bench-spark-", dir=args.tmp) as tmp:
            with bench_flight.server("qisd", str(Path(tmp) / "warm")) as location:
                # Start Spark's Python workers (and their imports) before anything is timed.
                write_outcomes(spark_frame(spark, 400), location)
            with bench_flight.server("qisd", str(Path(tmp) / "pandas")) as location:
                out["pandas_put"] = pandas_put(location, args.rows)
                out["pandas_get"] = pandas_get(location, args.rows)
            with bench_flight.server("qisd", str(Path(tmp) / "spark")) as location:
                t0 = time.perf_counter()
                result = write_outcomes(frame, location)
                out["spark_put"] = args.rows / (time.perf_counter() - t0)
                if result.accepted != args.rows:
                    raise SystemExit(f"write_outcomes stored {result.accepted} rows")
                out["packets"] = len(result.packet_ids)
                t0 = time.perf_counter()
                got = read_outcomes(spark, location, PATH).count()
                out["spark_get"] = args.rows / (time.perf_counter() - t0)
                if got != args.rows:
                    raise SystemExit(f"read_outcomes returned {got} rows")
    finally:
        spark.stop()
    return out


def report(out: dict[str, float]) -> str:
    lines = [
        f"{out['rows']:,.0f} outcome rows; Spark: 4 partitions on local[2]; pandas: one client",
        f"{'measure':36} {'pandas':>10} {'spark':>10} {'ratio':>7} {'goal':>6}",
    ]
    for name, key, goal in (
        ("DoPut rows/s (write)", "put", ">=0.8x"),
        ("DoGet rows/s (read back)", "get", ""),
    ):
        p, s = out[f"pandas_{key}"], out[f"spark_{key}"]
        lines.append(f"{name:36} {p:10,.0f} {s:10,.0f} {s / p:6.2f}x {goal:>6}")
    lines.append(f"packets signed for the Spark write: {out['packets']:,.0f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows each writer sends")
    parser.add_argument("--tmp", default=None, help="where the daemons' data directories go")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON too")
    args = parser.parse_args()
    out = run(args)
    print(report(out))
    if args.json:
        print(json.dumps(out))


if __name__ == "__main__":
    main()
