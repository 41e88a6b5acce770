"""Flight DoGet states how complete its network read is, in the schema's metadata."""

from __future__ import annotations

from pathlib import Path

import pyarrow.flight as flight
from flight_harness import Daemon, outcome_table
from test_flight import PATH, get, now_ms, put

from qisd.core import completeness


def test_doget_metadata_says_whether_the_read_reached_the_replicas(tmp_path: Path) -> None:
    with Daemon(tmp_path / "a", network=True) as a, Daemon(tmp_path / "b", network=True) as b:
        assert b.run(lambda: b.node.dht.bootstrap([a.node.address])) == 1
        with flight.connect(a.location) as client_a, flight.connect(b.location) as client_b:
            put(client_a, outcome_table(3, now_ms=now_ms()))
            table = get(client_b, PATH.encode())
            assert table.num_rows == 3
            report = completeness.read(table.schema)
            assert report is not None and report["complete"] is True
            assert report["replicas_answered"] == 1 and report["bytes_received"] > 0
            # A local read claims nothing about the network.
            assert completeness.read(get(client_b, b"local:" + PATH.encode()).schema) is None
            a.run(a.node.close)
            table = get(client_b, PATH.encode())
            assert table.num_rows == 3, "what the node holds is still streamed"
            report = completeness.read(table.schema)
            assert report is not None and report["complete"] is False
            assert report["replicas_answered"] == 0
