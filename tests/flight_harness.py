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

import uvloop

from qisd.config import DhtConfig, NodeConfig
from qisd.net import datadir
from qisd.net.flight import FlightHandle, start_flight
from qisd.net.node import Node

_T = TypeVar("_T")
WAIT = 30.0
"""Seconds any wait in the Flight tests may take before the test fails."""


def node_config(data_dir: Path, *, bootstrap: Sequence[str] = (), **dht: Any) -> NodeConfig:
    """A config for a node on 127.0.0.1, port 0, bootstrapping only from ``bootstrap``."""
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
    ) -> None:
        self.config = node_config(data_dir, bootstrap=bootstrap)
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
                    lambda: start_flight(self.node, self._uri, token=self._token)
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
