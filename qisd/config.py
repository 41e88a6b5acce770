"""Frozen configuration of a qisd node, one docstring per field.

Defaults here are the documented defaults (README, "Configuration"). A TOML file, ``QISD_*``
environment variables and command-line flags override them, in that order of precedence
(lowest first); see :func:`qisd.net.settings.load_config`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

DAY_SECONDS = 86_400


DEFAULT_FLIGHT_URI = "grpc://127.0.0.1:8815"
"""Where the Flight endpoint serves when asked for with no URI (loopback, Flight's usual port)."""
DEFAULT_METRICS_ADDRESS = "127.0.0.1:8469"
"""Where metrics and the dashboard serve when asked for with no address (loopback, the port
after the DHT's)."""


@dataclass(frozen=True)
class DhtConfig:
    """Kademlia and RPC parameters."""

    ksize: int = 20
    """k: replicas per key, bucket size, and how many closest nodes a lookup converges on."""
    alpha: int = 3
    """Lookups keep this many RPCs in flight at once."""
    rpc_timeout: float = 2.0
    """Seconds to wait for one reply before the call counts as failed."""
    evict_after_failures: int = 3
    """A contact is dropped from the routing table after this many failures in a row."""
    ttl_seconds: int = 30 * DAY_SECONDS
    """A packet expires this long after its timestamp, on every node that holds it."""
    republish_seconds: int = 3_600
    """How often a node re-stores its own unexpired packets at the current k closest nodes."""
    rejoin_seconds: float = 15.0
    """How often a node re-contacts its bootstrap peers and its most recently evicted contacts
    that are missing from its routing table, so halves of a healed partition find each other."""
    listen_seconds: int = 300
    """A follower's registration with a key's holders lapses unless refreshed within this."""
    rate_limit_per_source: float = 500.0
    """Requests per second accepted from one source address (token bucket refill)."""
    rate_burst_per_source: int = 1_000
    """Token bucket size: requests one source may send in a burst."""
    max_datagram_bytes: int = 8_192
    """No request or reply is larger; replies are paged to fit."""
    upkeep_seconds: float = 5.0
    """How often stale contacts are pinged and a round of replica anti-entropy runs (a few
    dozen keys reconciled with one random co-holder each)."""
    keepalive_seconds: float = 20.0
    """A node that is not reachable from outside (behind NAT) pings the holders it listens on
    this often, so its NAT keeps the mapping their pushes come back through (home routers drop
    an idle UDP mapping after 30 s or more; checked on each upkeep tick)."""
    reachability_seconds: float = 300.0
    """How often a node checks again, by dial-back probes, whether peers can reach it."""


@dataclass(frozen=True)
class StoreLimits:
    """What the local store accepts from the network, and its size cap."""

    per_key: int = 100_000
    """Packets (envelopes) held under one key."""
    per_signer_per_key: int = 10_000
    """Packets one signer may hold under one key."""
    max_bytes: int = 1 << 30
    """Total envelope bytes held; past it, remote packets are evicted (README: eviction order)."""


@dataclass(frozen=True)
class NodeConfig:
    """Everything ``qisd start`` needs."""

    data_dir: str = ""
    """Identity, store and state live here ('' = $QISD_DATA_DIR or the XDG data home's qisd/)."""
    host: str = "0.0.0.0"
    """Address the UDP DHT socket binds."""
    port: int = 8468
    """UDP port of the DHT (0 picks a free one)."""
    bootstrap: tuple[str, ...] = ()
    """Extra bootstrap peers as HOST:PORT."""
    bootstrap_file: str = ""
    """File of bootstrap peers ('' = /etc/qisd/bootstrap-nodes.txt if present, else packaged)."""
    flight: str = ""
    """Arrow Flight endpoint URI ('' = off), e.g. grpc://127.0.0.1:8815."""
    flight_token: str = ""
    """Bearer token Flight clients must present; required for a non-loopback Flight address."""
    flight_tls_cert: str = ""
    """PEM certificate file: with ``flight_tls_key``, Flight serves grpc+tls:// ('' = plain)."""
    flight_tls_key: str = ""
    """PEM private key file of ``flight_tls_cert``."""
    metrics: str = ""
    """HOST:PORT of the HTTP server for Prometheus ``/metrics`` and the dashboard ('' = off)."""
    metrics_token: str = ""
    """Bearer token the metrics server requires; required for a non-loopback address."""
    log_level: str = "info"
    """Log level for stderr: debug, info, warning or error; ``,LOGGER=LEVEL`` pairs may follow
    (``debug,kademlia=info``): libraries log at WARNING and above unless named."""
    log_format: str = "text"
    """``text`` (one readable line a record) or ``json`` (one JSON object a line)."""
    log_summary_seconds: float = 60.0
    """How often INFO summarises traffic, rejections and rate limiting (never one line a
    datagram)."""
    election_seconds: float = 30.0
    """How often followed paths are caught up and the elections re-run."""
    pinned_templates: dict[str, str] = field(default_factory=dict)
    """domain -> template id that Hiring must use for that domain."""
    dht: DhtConfig = field(default_factory=DhtConfig)
    """DHT parameters."""
    store: StoreLimits = field(default_factory=StoreLimits)
    """Store quotas and size cap."""
