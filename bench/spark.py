"""A Spark job's outcome rows into qisd, against qisd's own batched DoPut from pandas, one run.

    python bench/spark.py                   # 1,000,000 rows, 3 rounds; ~5 minutes on 2 cores
    python bench/spark.py --rows 200000 --repeat 1    # a quick look

Each writer gets a fresh qisd daemon of its own (a real Node in its own process: data
directory on disk, SQLite with fsync per commit, a lone DHT node, Flight on 127.0.0.1, port 0;
``bench/flight.py``'s server), and the same number of rows:

* **pandas**: one client holding a pandas DataFrame sends it as Arrow in DoPut streams of
  100,000 rows (the most one stream carries), one after the other: qisd's own batched DoPut.
* **spark**: a cached 4-partition DataFrame (``local[2]``) written with
  :func:`qisd.spark.write_outcomes`: four tasks, each its own DoPut streams, at once.

Then both read the rows back: ``read_pandas()`` of a DoGet, and :func:`qisd.spark.read_outcomes`
counted by Spark. The two take turns, ``--repeat`` rounds in alternating order; figures are
medians of rows/s, and the ratio (Spark's over pandas', goal >= 0.8x) the median of the
rounds' ratios.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
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


def pandas_round(tmp: str, rows: int) -> dict[str, float]:
    with bench_flight.server("qisd", tmp) as location:
        return {"put": pandas_put(location, rows), "get": pandas_get(location, rows)}


def spark_round(spark: Any, frame: Any, tmp: str, rows: int) -> dict[str, float]:
    from qisd.spark import read_outcomes, write_outcomes

    with bench_flight.server("qisd", tmp) as location:
        t0 = time.perf_counter()
        result = write_outcomes(frame, location)
        put = rows / (time.perf_counter() - t0)
        if result.accepted != rows:
            raise SystemExit(f"write_outcomes stored {result.accepted} rows")
        t0 = time.perf_counter()
        got = read_outcomes(spark, location, PATH).count()
        get = rows / (time.perf_counter() - t0)
        if got != rows:
            raise SystemExit(f"read_outcomes returned {got} rows")
        return {"put": put, "get": get, "packets": len(result.packet_ids)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    from pyspark.sql import SparkSession

    from qisd.spark import write_outcomes

    spark = (
        SparkSession.builder.master("local[2]")
        .config("spark.sql.shuffle.partitions", "4")
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .getOrCreate()
    )
    spark.sparkContext.setLogLevel("ERROR")
    rounds: list[dict[str, dict[str, float]]] = []
    try:
        frame = spark_frame(spark, args.rows)
        with tempfile.TemporaryDirectory(prefix="qisd-bench-spark-", dir=args.tmp) as tmp:
            with bench_flight.server("qisd", str(Path(tmp) / "warm")) as location:
                # Start Spark's Python workers (and their imports) before anything is timed.
                write_outcomes(spark_frame(spark, 400), location)
            # The two writers take turns, in alternating order: this shared machine's speed
            # drifts within minutes, and a block per writer would measure the drift.
            for i in range(args.repeat):
                one: dict[str, dict[str, float]] = {}
                for who in ("pandas", "spark") if i % 2 == 0 else ("spark", "pandas"):
                    where = str(Path(tmp) / f"{who}-{i}")
                    if who == "pandas":
                        one[who] = pandas_round(where, args.rows)
                    else:
                        one[who] = spark_round(spark, frame, where, args.rows)
                rounds.append(one)
    finally:
        spark.stop()
    out: dict[str, Any] = {"rows": args.rows, "repeat": args.repeat, "rounds": rounds}
    for key in ("put", "get"):
        for who in ("pandas", "spark"):
            out[f"{who}_{key}"] = statistics.median(r[who][key] for r in rounds)
        ratios = [r["spark"][key] / r["pandas"][key] for r in rounds]
        out[f"ratio_{key}"] = statistics.median(ratios)
        out[f"ratios_{key}"] = ratios
    out["packets"] = rounds[0]["spark"]["packets"]
    return out


def report(out: dict[str, Any]) -> str:
    lines = [
        f"{out['rows']:,} outcome rows; Spark: 4 partitions on local[2]; pandas: one client; "
        f"medians of {out['repeat']} alternating rounds",
        f"{'measure':28} {'pandas':>10} {'spark':>10} {'ratio':>7} {'goal':>6}  rounds",
    ]
    for name, key, goal in (
        ("DoPut rows/s (write)", "put", ">=0.8x"),
        ("DoGet rows/s (read back)", "get", ""),
    ):
        p, s = out[f"pandas_{key}"], out[f"spark_{key}"]
        each = " ".join(f"{r:.2f}x" for r in out[f"ratios_{key}"])
        lines.append(
            f"{name:28} {p:10,.0f} {s:10,.0f} {out[f'ratio_{key}']:6.2f}x {goal:>6}  {each}"
        )
    lines.append(f"packets signed for each Spark write: {out['packets']:,}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows each writer sends")
    parser.add_argument("--repeat", type=int, default=3, help="rounds per writer (median)")
    parser.add_argument("--tmp", default=None, help="where the daemons' data directories go")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON too")
    args = parser.parse_args()
    out = run(args)
    print(report(out))
    if args.json:
        print(json.dumps(out))


if __name__ == "__main__":
    main()
