"""A daemon-shaped harness for the Flight tests: a real Node on its own uvloop thread.

The Flight endpoint answers on gRPC threads and waits on the node's event loop, so a test that
drives it with blocking ``pyarrow.flight`` clients must not run on that loop: like the daemon,
:class:`Daemon` runs the loop in a background thread, and the test's thread is the client.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa
import uvloop

from qisd.config import DhtConfig, NodeConfig, StoreLimits
from qisd.core import packet as P
from qisd.core.fingerprint import DEFAULT_TEMPLATE, key_for_path, path_of
from qisd.core.packet import SCHEMA, batch_rows
from qisd.net import datadir
from qisd.net.flight import FlightHandle, start_flight
from qisd.net.node import Node
from qisd.net.store import Store

_T = TypeVar("_T")
WAIT = 30.0
"""Seconds any wait in the Flight tests may take before the test fails."""


def node_config(
    data_dir: Path,
    *,
    bootstrap: Sequence[str] = (),
    init: bool = True,
    pinned_templates: dict[str, str] | None = None,
    **dht: Any,
) -> NodeConfig:
    """A config for a node on 127.0.0.1, port 0, bootstrapping only from ``bootstrap``."""
    if init:
        datadir.init_identity(data_dir)
    empty = data_dir / "bootstrap-nodes.txt"
    empty.write_text("# none: tests name their peers\n")
    return NodeConfig(
        data_dir=str(data_dir),
        host="127.0.0.1",
        port=0,
        bootstrap=tuple(bootstrap),
        bootstrap_file=str(empty),
        dht=DhtConfig(**({"rpc_timeout": 1.0} | dht)),
        pinned_templates=dict(pinned_templates or {}),
    )


class Daemon:
    """A Node and (optionally) its Flight endpoint, served from a loop in its own thread."""

    def __init__(
        self,
        data_dir: Path,
        *,
        network: bool = False,
        bootstrap: Sequence[str] = (),
        flight: bool = True,
        token: str = "",
        uri: str = "grpc://127.0.0.1:0",
        init: bool = True,
        tls_cert: str = "",
        tls_key: str = "",
        pinned_templates: dict[str, str] | None = None,
    ) -> None:
        self.config = node_config(
            data_dir, bootstrap=bootstrap, init=init, pinned_templates=pinned_templates
        )
        self._tls = (tls_cert, tls_key)
        self._network = network
        self._flight = flight
        self._token = token
        self._uri = uri
        self.loop = uvloop.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.node: Node = None  # type: ignore[assignment]
        self.handle: FlightHandle | None = None

    def __enter__(self) -> Daemon:
        self._thread.start()
        try:
            self.node = self.run(lambda: Node.open(self.config, network=self._network))
            if self._flight:
                self.handle = self.run(
                    lambda: start_flight(
                        self.node,
                        self._uri,
                        token=self._token,
                        tls_cert=self._tls[0],
                        tls_key=self._tls[1],
                    )
                )
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if self.handle is not None:
                self.run(self.handle.close)
            if self.node is not None:
                self.run(self.node.close)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(WAIT)
            self.loop.close()

    def run(self, make: Callable[[], Awaitable[_T]], timeout: float = WAIT) -> _T:
        """Run a coroutine on the daemon's loop and wait for its result."""

        async def call() -> _T:
            return await make()

        return asyncio.run_coroutine_threadsafe(call(), self.loop).result(timeout)

    @property
    def port(self) -> int:
        assert self.handle is not None
        return self.handle.port

    @property
    def location(self) -> str:
        return f"grpc://127.0.0.1:{self.port}"

    @property
    def dht_address(self) -> str:
        assert self.node.address is not None
        host, port = self.node.address
        return f"{host}:{port}"


# --------------------------------------------------------------------------- rows


def outcome_table(n: int, *, start: int = 0, now_ms: int, **columns: Any) -> pa.Table:
    """``n`` valid outcome rows as a table with the article's 15 columns (built columnwise).

    Rows differ by ``sample_count`` (``start + i``) and ``metric_delta``; ``columns`` replaces
    columns by name with a scalar (repeated) or a list.
    """
    index = np.arange(start, start + n)

    def text(value: str) -> pa.Array:
        return pa.array([value] * n, pa.string())

    data: dict[str, Any] = {
        "node_id": text("set-by-the-daemon"),
        "timestamp_utc": pa.array(np.full(n, now_ms, np.int64)),
        "domain": text("clinical.oncology"),
        "problem_type": text("treatment_response_classification"),
        "model_architecture": text("transformer-256d"),
        "training_phase": text("epoch_5_of_50"),
        "metric_name": text("val_auc"),
        "metric_delta": pa.array((index % 1000) / 10_000, pa.float32()),
        "metric_value": pa.array(np.full(n, 0.847, np.float32)),
        "confidence": pa.array(np.full(n, 0.91, np.float32)),
        "intervention_type": text("learning_rate_schedule"),
        "intervention_params": text('{"schedule":"cosine_annealing","T_max":10}'),
        "outcome_decile": pa.array(np.full(n, 8, np.int8)),
        "sample_count": pa.array(index.astype(np.int32)),
        "raw_data_hash": text("c0ffee"),
    }
    for name, value in columns.items():
        data[name] = value if isinstance(value, (list, pa.Array)) else [value] * n
    table = pa.table(data)
    if set(table.schema.names) == set(SCHEMA.names):
        table = table.select(SCHEMA.names).cast(SCHEMA)
    return table


def fill_store(data_dir: Path, rows: int, *, now_ms: int, per_envelope: int = 128) -> None:
    """Store ``rows`` rows signed by the data directory's identity as an emit stores them
    (envelopes of ``per_envelope`` rows, one per routable level of the default template),
    without a running node.

    Built columnwise from Arrow slices and not validated (the rows are valid by construction),
    so a million rows take seconds rather than the minute a validated emit of them takes.
    """
    identity = datadir.load_identity(data_dir)
    store = Store.open(data_dir, limits=StoreLimits(), ttl_ms=DhtConfig().ttl_seconds * 1000)
    routes = [DEFAULT_TEMPLATE.fields_at(level) for level in DEFAULT_TEMPLATE.levels]
    chunk = per_envelope * 100
    try:
        for start in range(0, rows, chunk):
            table = outcome_table(min(chunk, rows - start), start=start, now_ms=now_ms)
            table = table.set_column(0, "node_id", pa.array([identity.node_id] * table.num_rows))
            batch = table.combine_chunks().to_batches()[0]
            first = batch_rows(batch.slice(0, 1))[0]
            keys = [(fields, key_for_path(path_of(first, fields))) for fields in routes]
            envelopes = []
            for offset in range(0, batch.num_rows, per_envelope):
                part = batch.slice(offset, per_envelope)
                body = P._deflate(part.serialize().to_pybytes())
                for fields, key in keys:
                    envelopes.append(
                        P.seal(
                            identity,
                            P.KIND_PACKET,
                            key,
                            body,
                            fields=fields,
                            timestamp_ms=now_ms,
                            rows=part.num_rows,
                        )
                    )
            store.put(envelopes, now_ms=now_ms, local=True)
    finally:
        store.close()


# --------------------------------------------------------------------------- a daemon process


def _serve(data_dir: str) -> None:
    """``python tests/flight_harness.py DATA_DIR``: a daemon with Flight for RSS measurements.

    Prints one JSON line ``{"port", "rss_kb"}`` when ready, then on each line read from stdin
    prints ``{"rss_kb"}`` (the peak resident size so far); exits at end of input.
    """
    import json
    import resource
    import sys

    def peak() -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    with Daemon(Path(data_dir), init=False) as daemon:
        print(json.dumps({"port": daemon.port, "rss_kb": peak()}), flush=True)
        for _ in sys.stdin:
            print(json.dumps({"rss_kb": peak()}), flush=True)


if __name__ == "__main__":
    import sys

    _serve(sys.argv[1])
