"""Spark produces, qisd routes: three hospitals' Spark jobs feed the swarm; a fourth reads it.

    python examples/spark_site.py            # needs the [spark] extra and Java 17; ~1 minute

The example starts a small qisd network on 127.0.0.1 (five real nodes in this process, each
with its own temporary data directory, UDP DHT port and Arrow Flight endpoint on port 0) and
one local SparkSession. Then, for each of three sites:

1. Spark generates the site's raw per-patient records (age, stage, treatment arm, response
   score at baseline and at week 12). They are the site's own data: they stay in its Spark job.
2. Spark SQL distils them into outcome rows: per treatment arm, the mean improvement in the
   response score against the site's standard-of-care arm (``metric_delta``), with a
   confidence that grows with the arm's sample size.
3. :func:`qisd.spark.write_outcomes` hands those few rows to the site's own daemon, which signs
   them and routes them over the DHT. Only these rows leave the job.

A fourth site, whose daemon never saw any of it, reads the swarm's rows back into Spark
(:func:`qisd.spark.read_outcomes`) and asks for the synthesis
(:func:`qisd.spark.synthesis`): the treatment that works across sites, with its evidence.
Everything is removed afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import uvloop
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from qisd.config import DhtConfig, NodeConfig
from qisd.net.datadir import init_identity
from qisd.net.flight import FlightHandle, start_flight
from qisd.net.node import Node
from qisd.spark import read_outcomes, synthesis, write_outcomes

DOMAIN = "clinical.oncology"
PROBLEM = "treatment_response"
PATH = f"{DOMAIN}/{PROBLEM}"
"""The fingerprint every site's outcome rows are filed under (and the asker asks about)."""

ARMS: dict[str, tuple[float, dict[str, Any]]] = {
    "standard_of_care": (0.0, {}),
    "drug_a": (0.030, {"dose_mg": 200, "schedule": "daily"}),
    "drug_b": (0.055, {"dose_mg": 50, "schedule": "weekly"}),
    "dose_escalation": (-0.010, {"step_mg": 25}),
}
"""Treatment arms: the true mean effect on the response score (unknown to every site; each
sees it through its own patients and noise), and the parameters a site reports."""

SITES: dict[str, tuple[int, int]] = {
    "site A (Nairobi)": (12_000, 11),
    "site B (Lyon)": (30_000, 22),
    "site C (Osaka)": (20_000, 33),
}
"""Each site's number of patient records and the seed of its synthetic data."""


def as_of_ms() -> int:
    """When the sites' jobs report their outcomes: the start of today (UTC), so a re-run the
    same day makes the same signed packets (duplicates, not new votes)."""
    day = 86_400_000
    return time.time_ns() // 1_000_000 // day * day


_T = TypeVar("_T")


# --------------------------------------------------------------------------- the network


class LocalNetwork:
    """Real qisd nodes on 127.0.0.1 on one event loop in a background thread.

    The first node is the bootstrap peer; every other one joins through it and serves Arrow
    Flight (``uris``) as ``qisd start --flight`` does. Spark's Python workers are other
    processes: they reach the endpoints over loopback like any client.
    """

    def __init__(self, names: list[str]) -> None:
        self.names = names
        self.uris: dict[str, str] = {}
        self.nodes: dict[str, Node] = {}
        self._handles: list[FlightHandle] = []
        self._root = tempfile.TemporaryDirectory(prefix="qisd-spark-")
        self._loop = uvloop.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def run(self, make: Callable[[], Awaitable[_T]], timeout: float = 60.0) -> _T:
        """Run a coroutine on the network's loop and wait for it."""

        async def call() -> _T:
            return await make()

        return asyncio.run_coroutine_threadsafe(call(), self._loop).result(timeout)

    async def _open(self) -> None:
        bootstrap: tuple[str, ...] = ()
        for i, name in enumerate(["bootstrap", *self.names]):
            data_dir = Path(self._root.name) / f"node{i}"
            init_identity(data_dir)
            config = NodeConfig(
                data_dir=str(data_dir),
                host="127.0.0.1",
                port=0,
                bootstrap=bootstrap,
                bootstrap_file=os.devnull,
                dht=DhtConfig(rpc_timeout=1.0),
                election_seconds=3600,
            )
            node = await Node.open(config)
            self.nodes[name] = node
            if not bootstrap:
                assert node.address is not None
                bootstrap = (f"{node.address[0]}:{node.address[1]}",)
                continue
            handle = await start_flight(node, "grpc://127.0.0.1:0")
            self._handles.append(handle)
            self.uris[name] = handle.uri

    async def _close(self) -> None:
        for handle in self._handles:
            with contextlib.suppress(Exception):
                await handle.close()
        for node in reversed(list(self.nodes.values())):
            with contextlib.suppress(Exception):
                await node.close()

    def __enter__(self) -> LocalNetwork:
        self._thread.start()
        try:
            self.run(self._open)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.run(self._close)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(60)
            self._loop.close()
            self._root.cleanup()


# --------------------------------------------------------------------------- a site's job


def raw_records(spark: SparkSession, patients: int, seed: int) -> DataFrame:
    """A site's synthetic per-patient records: they never leave its Spark job."""
    arms = list(ARMS)
    effect = F.element_at(F.array(*[F.lit(ARMS[a][0]) for a in arms]), F.col("arm_index") + 1)
    return (
        spark.range(patients, numPartitions=4)
        .withColumn("arm_index", (F.rand(seed) * len(arms)).cast("int"))
        .select(
            F.concat(F.lit(f"p{seed}-"), F.col("id").cast("string")).alias("patient_id"),
            (35 + F.rand(seed + 1) * 45).cast("int").alias("age"),
            F.when(F.rand(seed + 2) < 0.4, "III").otherwise("II").alias("stage"),
            F.element_at(F.array(*[F.lit(a) for a in arms]), F.col("arm_index") + 1).alias("arm"),
            (0.40 + F.randn(seed + 3) * 0.05).alias("baseline_score"),
            effect.alias("effect"),
        )
        .withColumn(
            "week12_score",
            F.col("baseline_score") + 0.02 + F.col("effect") + F.randn(seed + 4) * 0.08,
        )
        .drop("effect")
    )


DISTIL_SQL = """
WITH by_arm AS (
    SELECT arm,
           count(*)                             AS patients,
           avg(week12_score - baseline_score)   AS improvement,
           avg(week12_score)                    AS week12
    FROM records
    GROUP BY arm
),
control AS (SELECT improvement AS control_improvement FROM by_arm WHERE arm = 'standard_of_care')
SELECT CAST({as_of} AS BIGINT)                                   AS timestamp_utc,
       '{domain}'                                                AS domain,
       '{problem}'                                               AS problem_type,
       'response-score-v1'                                       AS model_architecture,
       'week_12'                                                 AS training_phase,
       'response_score'                                          AS metric_name,
       CAST(improvement - control_improvement AS FLOAT)          AS metric_delta,
       CAST(week12 AS FLOAT)                                     AS metric_value,
       CAST(LEAST(0.99, 1 - 1 / SQRT(patients)) AS FLOAT)        AS confidence,
       by_arm.arm                                                AS intervention_type,
       params.params_json                                        AS intervention_params,
       CAST(LEAST(10, GREATEST(1, 5 + ROUND((improvement - control_improvement) * 100)))
            AS TINYINT)                                          AS outcome_decile,
       CAST(patients AS INT)                                     AS sample_count,
       '{site}/oncology-cohort'                                  AS data_ref
FROM by_arm CROSS JOIN control JOIN params ON params.arm = by_arm.arm
WHERE by_arm.arm <> 'standard_of_care'
ORDER BY intervention_type
"""
"""Outcome rows from the records: one per treatment arm, its delta against standard of care,
confidence from the sample size (1 - 1/sqrt(n)); ``data_ref`` becomes the daemon's keyed
commitment (the reference itself is never sent on)."""


def distil(spark: SparkSession, records: DataFrame, site: str) -> DataFrame:
    """The site's outcome rows, with Spark SQL over its records."""
    records.createOrReplaceTempView("records")
    spark.createDataFrame(
        [(arm, json.dumps(params, sort_keys=True)) for arm, (_, params) in ARMS.items()],
        "arm string, params_json string",
    ).createOrReplaceTempView("params")
    sql = DISTIL_SQL.format(as_of=as_of_ms(), domain=DOMAIN, problem=PROBLEM, site=site.split()[1])
    return spark.sql(sql).coalesce(1)


# --------------------------------------------------------------------------- the run


def local_spark() -> SparkSession:
    """A small local SparkSession (2 cores, few shuffle partitions, no UI)."""
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)  # workers need qisd installed
    spark = (
        SparkSession.builder.master("local[2]")
        .appName("qisd-spark-site")
        .config("spark.sql.shuffle.partitions", "4")
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .getOrCreate()
    )
    spark.sparkContext.setLogLevel("ERROR")
    return spark


def run(spark: SparkSession, say: Callable[[str], None] = print) -> dict[str, Any]:
    """The whole example on ``spark``; returns what the asking site got."""
    started = time.monotonic()
    asker = "site D (Lima)"
    with LocalNetwork([*SITES, asker]) as network:
        say(f"A qisd network of {len(network.nodes)} nodes on 127.0.0.1; Flight endpoints:")
        for name, uri in network.uris.items():
            say(f"  {name:<18} {uri}")
        say("")
        emitted: dict[str, Any] = {}
        for site, (patients, seed) in SITES.items():
            records = raw_records(spark, patients, seed)
            outcomes = distil(spark, records, site)
            result = write_outcomes(outcomes, network.uris[site])
            emitted[site] = result
            kept = records.count()
            say(
                f"{site}: {kept:,} patient records stay in its Spark job; "
                f"{result.rows} outcome rows leave it, as {result.new_packets} signed packet(s)"
            )
            for row in outcomes.orderBy(F.desc("metric_delta")).collect():
                say(
                    f"    {row.intervention_type:<16} delta {row.metric_delta:+.4f}  "
                    f"confidence {row.confidence:.3f}  n={row.sample_count:,}"
                )
        say("")
        uri = network.uris[asker]
        say(f"{asker} emitted nothing. Its Spark job reads the swarm's rows for {PATH}:")
        rows = read_outcomes(spark, uri, PATH).cache()
        rows.createOrReplaceTempView("swarm")
        evidence = spark.sql(
            "SELECT intervention_type, count(DISTINCT signer) AS sites, "
            "round(avg(metric_delta), 4) AS mean_delta, sum(sample_count) AS patients "
            "FROM swarm GROUP BY intervention_type ORDER BY mean_delta DESC"
        ).collect()
        for row in evidence:
            say(
                f"    {row.intervention_type:<16} from {row.sites} sites, mean delta "
                f"{row.mean_delta:+.4f}, {row.patients:,} patients"
            )
        signers = rows.select("signer").distinct().count()
        result = synthesis(spark, uri, PATH, as_dict=True)
        rows.unpersist()
        say("")
        say(f"The swarm's synthesis ({result['status']}, {result['distinct_signers']} signers):")
        for item in result["interventions"]:
            say(
                f"    {item['intervention']:<16} median {item['median_delta']:+.4f}  "
                f"interval [{item['ci_low']:+.4f}, {item['ci_high']:+.4f}]  "
                f"signers {item['kept_signers']}/{item['signers']}"
            )
        say(f"Recommendation: {result['recommendation']}")
        say("")
        say(f"Done in {time.monotonic() - started:.1f} s; the network and its data are gone.")
        return {
            "emitted": {site: r.rows for site, r in emitted.items()},
            "signers_read": signers,
            "synthesis": result,
        }


def main() -> None:
    """Run the example on a local SparkSession."""
    spark = local_spark()
    try:
        run(spark)
    finally:
        spark.stop()


if __name__ == "__main__":
    main()
