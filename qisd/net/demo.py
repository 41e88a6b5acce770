"""``qisd demo``: the QIS loop on one machine, in a few seconds.

A small network of real nodes (UDP on 127.0.0.1, SQLite stores in temporary data directories,
one process): three sites emit what worked for the same problem, a fourth site that has never
seen them finds their packets over the DHT, verifies every signature and prints the synthesis.
Everything is removed afterwards.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qisd.config import DhtConfig, NodeConfig
from qisd.errors import UsageError
from qisd.net.datadir import init_identity
from qisd.net.node import Node

PATH = "clinical.oncology/treatment_response_classification"
"""The problem every site in the demo works on."""

# What each site saw (intervention, params, metric delta, confidence, samples, decile).
SITES: dict[str, list[tuple[str, dict[str, Any], float, float, int, int]]] = {
    "site A (Boston)": [
        ("cosine_annealing", {"T_max": 10}, 0.031, 0.92, 1240, 9),
        ("label_smoothing", {"eps": 0.1}, 0.012, 0.85, 1240, 7),
        ("dropout_increase", {"p": 0.3}, -0.004, 0.80, 1240, 4),
    ],
    "site B (Lyon)": [
        ("cosine_annealing", {"T_max": 12}, 0.027, 0.90, 860, 8),
        ("label_smoothing", {"eps": 0.05}, 0.015, 0.88, 860, 7),
        ("dropout_increase", {"p": 0.25}, 0.001, 0.75, 860, 5),
    ],
    "site C (Osaka)": [
        ("cosine_annealing", {"T_max": 10}, 0.034, 0.95, 2100, 9),
        ("label_smoothing", {"eps": 0.1}, 0.009, 0.90, 2100, 6),
        ("dropout_increase", {"p": 0.3}, -0.006, 0.82, 2100, 3),
    ],
}


def _rows(site: list[tuple[str, dict[str, Any], float, float, int, int]]) -> list[dict[str, Any]]:
    return [
        {
            "domain": "clinical.oncology",
            "problem_type": "treatment_response_classification",
            "model_architecture": "transformer-256d",
            "training_phase": "epoch_5_of_50",
            "metric_name": "val_auc",
            "metric_value": 0.84 + delta,
            "metric_delta": delta,
            "confidence": confidence,
            "intervention_type": intervention,
            "intervention_params": params,
            "outcome_decile": decile,
            "sample_count": samples,
        }
        for intervention, params, delta, confidence, samples, decile in site
    ]


async def run_demo(nodes: int = 8, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the demo network and return a summary (``synthesis`` is what the asker got)."""
    if not 5 <= nodes <= 50:
        raise UsageError("the demo needs between 5 and 50 nodes")
    started = time.monotonic()
    # k = 3 replicas per key, so most nodes do not hold a given key: finding it is the DHT's job.
    dht = DhtConfig(ksize=3, rpc_timeout=1.0)
    with tempfile.TemporaryDirectory(prefix="qisd-demo-") as root:
        opened: list[Node] = []
        try:
            for i in range(nodes):
                data_dir = Path(root) / f"node{i + 1}"
                init_identity(data_dir)
                peers = (f"{opened[0].address[0]}:{opened[0].address[1]}",) if opened else ()
                config = NodeConfig(
                    data_dir=str(data_dir),
                    host="127.0.0.1",
                    port=0,
                    bootstrap=peers,
                    bootstrap_file=os.devnull,
                    dht=dht,
                    election_seconds=3600,
                )
                opened.append(await Node.open(config))
            say(f"qisd demo: {nodes} nodes on 127.0.0.1, each in its own temporary data directory")
            for i, node in enumerate(opened):
                host, port = node.address or ("-", 0)
                role = "bootstrap peer" if i == 0 else "joined through node 1"
                say(f"  node {i + 1}  {host}:{port}  id {node.identity.node_id[:12]}  ({role})")

            say("")
            say(f"Three sites emit signed outcome packets for {PATH}:")
            emitters = opened[1:4]
            for (name, site), node in zip(SITES.items(), emitters, strict=True):
                result = await node.emit(_rows(site), wait_replicas=1)
                best = max(site, key=lambda s: s[2])
                say(
                    f"  {name}, node {opened.index(node) + 1}: {len(site)} rows, 1 signed packet "
                    f"stored on {min(result.replicas.values())} other nodes; its best: "
                    f"{best[0]} ({best[2]:+.3f} val_auc)"
                )

            # The asker: a node that emitted nothing and, if possible, holds none of it.
            others = [n for n in opened if n not in emitters]
            held = {id(n): (await n.query(PATH, local_only=True)).num_rows for n in others}
            asker = min(reversed(others), key=lambda n: held[id(n)])
            number = opened.index(asker) + 1
            say("")
            say(
                f"Node {number} emitted nothing and holds {held[id(asker)]} of these rows. "
                f"It asks the DHT for {PATH}, verifies every signature, and runs the elections:"
            )
            t0 = time.monotonic()
            table = await asker.query(PATH)
            fetched_ms = (time.monotonic() - t0) * 1000
            signers = sorted(set(table.column("node_id").to_pylist()))
            say(
                f"  found {table.num_rows} rows from {len(signers)} distinct signers in "
                f"{fetched_ms:.0f} ms"
            )
            synthesis = await asker.synthesize(PATH, local_only=True)
            say(f"  status: {synthesis['status']}")
            for item in synthesis["interventions"]:
                say(
                    f"    {item['intervention']:<18} median {item['median_delta']:+.4f}  "
                    f"interval [{item['ci_low']:+.4f}, {item['ci_high']:+.4f}]  "
                    f"signers {item['kept_signers']}/{item['signers']}"
                )
            if synthesis.get("recommendation"):
                say(f"  {synthesis['recommendation']}")
            elapsed = time.monotonic() - started
            say("")
            say(f"Done in {elapsed:.1f} s; the demo network and its data are gone.")
            return {
                "nodes": [
                    {
                        "node_id": n.identity.node_id,
                        "address": f"{n.address[0]}:{n.address[1]}" if n.address else None,
                    }
                    for n in opened
                ],
                "path": PATH,
                "asker_held_before": held[id(asker)],
                "rows_found": table.num_rows,
                "signers": signers,
                "synthesis": synthesis,
                "seconds": round(elapsed, 3),
            }
        finally:
            for node in reversed(opened):
                with contextlib.suppress(Exception):
                    await node.close()


def main(nodes: int = 8, *, quiet: bool = False) -> dict[str, Any]:
    """Run the demo on uvloop (``quiet``: print nothing, return the summary)."""
    import uvloop

    return uvloop.run(run_demo(nodes, (lambda _text: None) if quiet else print))


__all__ = ["PATH", "SITES", "main", "run_demo"]
