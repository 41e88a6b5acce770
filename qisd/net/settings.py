"""Loading a :class:`~qisd.config.NodeConfig` from TOML, ``QISD_*`` variables and flags.

Precedence, lowest first: the defaults in :mod:`qisd.config`, the TOML file (``--config`` or
``$QISD_CONFIG``), ``QISD_*`` environment variables, command-line flags. Every key of the TOML
file is a field of ``NodeConfig``; ``[dht]`` and ``[store]`` hold the fields of ``DhtConfig`` and
``StoreLimits`` and ``[pinned_templates]`` maps a domain to a template id::

    data_dir = "/var/lib/qisd"
    port = 8468
    bootstrap = ["seed.example.org:8468"]

    [dht]
    ksize = 20

    [store]
    max_bytes = 1073741824

The environment variable of a key is ``QISD_`` plus its name in capitals (``QISD_PORT``), and
``QISD_DHT_KSIZE`` / ``QISD_STORE_MAX_BYTES`` for the sections; ``QISD_BOOTSTRAP`` is a
comma-separated list. An unknown key, a wrong type or an out-of-range value raises
:class:`ConfigError` naming where the value came from.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import tomllib
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from qisd.config import DhtConfig, NodeConfig, StoreLimits
from qisd.errors import ConfigError

ENV_PREFIX = "QISD_"
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")
_SECTIONS: dict[str, type] = {"dht": DhtConfig, "store": StoreLimits}
# Environment variables that are not config keys (read by other parts of qisd).
_NOT_KEYS = {"QISD_CONFIG", "QISD_SLOW"}


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, hint: Any, where: str, *, from_text: bool) -> Any:
    """``value`` as type ``hint``; text from the environment is parsed, TOML is checked."""
    origin = typing.get_origin(hint)
    if hint is bool:
        if from_text and isinstance(value, str):
            low = value.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: {value!r} must be true or false")
    if hint is int:
        if from_text and isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                raise ConfigError(f"{where}: {value!r} must be a whole number") from None
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: {value!r} must be a whole number")
    if hint is float:
        if from_text and isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                raise ConfigError(f"{where}: {value!r} must be a number") from None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{where}: {value!r} must be a number")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: {value!r} must be text")
    if origin is tuple:
        if from_text and isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return tuple(value)
        raise ConfigError(f"{where}: {value!r} must be a list of text values")
    if origin is dict:
        if from_text and isinstance(value, str):
            pairs = [p.strip() for p in value.split(",") if p.strip()]
            out = {}
            for pair in pairs:
                name, sep, val = pair.partition("=")
                if not sep or not name.strip() or not val.strip():
                    raise ConfigError(f"{where}: {pair!r} must be DOMAIN=TEMPLATE_ID")
                out[name.strip()] = val.strip()
            return out
        if isinstance(value, Mapping) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()
        ):
            return dict(value)
        raise ConfigError(f"{where}: {value!r} must be a table of text values")
    raise ConfigError(f"{where}: unsupported setting type {hint!r}")  # pragma: no cover


def _apply(base: Any, values: Mapping[str, Any], where: str, *, from_text: bool) -> dict[str, Any]:
    """Changes of ``values`` against dataclass ``base``; unknown keys are errors."""
    hints = _hints(type(base))
    changes: dict[str, Any] = {}
    for name, value in values.items():
        if name not in hints:
            known = ", ".join(sorted(hints))
            raise ConfigError(f"{where}: unknown setting {name!r} (known: {known})")
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, Mapping):
                raise ConfigError(f"{where}: [{name}] must be a table")
            sub = _apply(getattr(base, name), value, f"{where} [{name}]", from_text=from_text)
            changes[name] = dataclasses.replace(getattr(base, name), **sub)
        else:
            changes[name] = _coerce(value, hint, f"{where}: {name}", from_text=from_text)
    return changes


def read_toml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The settings of a TOML config file (ConfigError if unreadable or not TOML)."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None


def env_settings(env: Mapping[str, str]) -> dict[str, Any]:
    """``QISD_*`` variables as a nested settings mapping (text values, parsed later)."""
    top = _hints(NodeConfig)
    out: dict[str, Any] = {}
    for var, value in env.items():
        if not var.startswith(ENV_PREFIX) or var in _NOT_KEYS:
            continue
        name = var[len(ENV_PREFIX) :].lower()
        for section in _SECTIONS:
            if name.startswith(section + "_"):
                field = name[len(section) + 1 :]
                if field in _hints(_SECTIONS[section]):
                    out.setdefault(section, {})[field] = value
                    break
        else:
            if name in top and not dataclasses.is_dataclass(top[name]):
                out[name] = value
        # Other QISD_* variables belong to other tools; they are ignored, not errors.
    return out


def check(config: NodeConfig) -> NodeConfig:
    """Range checks across fields; returns ``config`` or raises ConfigError."""
    if not 0 <= config.port <= 65535:
        raise ConfigError(f"port {config.port} must lie in 0..65535")
    parse_log_level(config.log_level)
    if config.log_format not in LOG_FORMATS:
        raise ConfigError(
            f"log_format {config.log_format!r} must be one of {', '.join(LOG_FORMATS)}"
        )
    if not config.log_summary_seconds > 0:
        raise ConfigError(f"log_summary_seconds {config.log_summary_seconds} must be positive")
    if config.metrics:
        host, _port = parse_metrics_address(config.metrics)
        if not _is_loopback(host) and not config.metrics_token:
            raise ConfigError(
                f"metrics address {host} is not loopback: set metrics_token "
                "(QISD_METRICS_TOKEN) so that scrapers and browsers must authenticate"
            )
    if not config.election_seconds > 0:
        raise ConfigError(f"election_seconds {config.election_seconds} must be positive")
    for peer in config.bootstrap:
        parse_peer(peer)
    d = config.dht
    for name in ("ksize", "alpha", "evict_after_failures", "ttl_seconds", "republish_seconds"):
        if getattr(d, name) < 1:
            raise ConfigError(f"dht.{name} must be at least 1")
    if (
        d.rpc_timeout <= 0
        or d.listen_seconds <= 0
        or d.rate_limit_per_source <= 0
        or d.rejoin_seconds <= 0
        or d.upkeep_seconds <= 0
        or d.keepalive_seconds <= 0
        or d.reachability_seconds <= 0
    ):
        raise ConfigError(
            "dht.rpc_timeout, listen_seconds, rate_limit_per_source, rejoin_seconds, "
            "upkeep_seconds, keepalive_seconds and reachability_seconds must be > 0"
        )
    s = config.store
    if s.per_key < 1 or s.per_signer_per_key < 1 or s.max_bytes < 1:
        raise ConfigError("store.per_key, per_signer_per_key and max_bytes must be at least 1")
    if config.flight:
        # The Flight endpoint also takes a bare HOST:PORT (gRPC); it checks the rest itself.
        parts = urlsplit(config.flight if "://" in config.flight else f"grpc://{config.flight}")
        if parts.scheme not in ("grpc", "grpc+tcp", "grpc+tls") or not parts.hostname:
            raise ConfigError(f"flight {config.flight!r} must be a URI like grpc://127.0.0.1:8815")
        if not _is_loopback(parts.hostname) and not config.flight_token:
            raise ConfigError(
                f"flight address {parts.hostname} is not loopback: set flight_token "
                "(QISD_FLIGHT_TOKEN) so clients must authenticate"
            )
    return config


def parse_log_level(text: str) -> tuple[str, dict[str, str]]:
    """``LEVEL[,LOGGER=LEVEL...]`` as (root level, {logger: level}); ConfigError if bad."""
    parts = [p.strip() for p in text.lower().split(",") if p.strip()]
    known = ", ".join(LOG_LEVELS)
    if not parts or "=" in parts[0] or parts[0] not in LOG_LEVELS:
        raise ConfigError(f"log_level {text!r} must be one of {known} (then LOGGER=LEVEL pairs)")
    loggers: dict[str, str] = {}
    for part in parts[1:]:
        name, sep, level = part.partition("=")
        if not sep or not name.strip() or level.strip() not in LOG_LEVELS:
            raise ConfigError(f"log_level {text!r}: {part!r} must be LOGGER=LEVEL ({known})")
        loggers[name.strip()] = level.strip()
    return parts[0], loggers


def parse_metrics_address(text: str) -> tuple[str, int]:
    """The metrics server's ``HOST:PORT`` (``[v6]:PORT``; port 0 picks a free one)."""
    value = text.strip()
    if "://" in value:
        parts = urlsplit(value)
        if parts.scheme != "http" or not parts.hostname or parts.path not in ("", "/"):
            raise ConfigError(f"metrics {text!r} must be HOST:PORT, e.g. 127.0.0.1:8469")
        value = parts.netloc
    host, sep, port = value.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"metrics {text!r} must be HOST:PORT, e.g. 127.0.0.1:8469")
    return host, int(port)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_peer(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6) as ``(host, port)``; ConfigError if malformed."""
    value = text.strip()
    host, sep, port = value.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ConfigError(f"bootstrap peer {text!r} must be HOST:PORT with a port in 1..65535")
    return host, int(port)


def load_config(
    config_file: str | os.PathLike[str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
) -> NodeConfig:
    """The node configuration: defaults < TOML file < ``QISD_*`` environment < flags.

    ``config_file`` defaults to ``$QISD_CONFIG`` when set. ``flags`` holds already-typed
    values; a ``None`` value means "not given" and is skipped.
    """
    env = os.environ if env is None else env
    config = NodeConfig()
    path = config_file if config_file else env.get("QISD_CONFIG") or None
    if path:
        changes = _apply(config, read_toml(path), f"config file {path}", from_text=False)
        config = dataclasses.replace(config, **changes)
    changes = _apply(config, env_settings(env), "environment", from_text=True)
    config = dataclasses.replace(config, **changes)
    if flags:
        given = {k: v for k, v in flags.items() if v is not None and v != ()}
        changes = _apply(config, given, "command line", from_text=False)
        config = dataclasses.replace(config, **changes)
    config = dataclasses.replace(
        config, log_level=config.log_level.lower(), log_format=config.log_format.lower()
    )
    return check(config)


def config_to_dict(config: NodeConfig) -> dict[str, Any]:
    """The configuration as plain data (for ``qisd status --json`` and docs)."""
    out = dataclasses.asdict(config)
    out["bootstrap"] = list(config.bootstrap)
    for secret in ("flight_token", "metrics_token"):
        if out.get(secret):
            out[secret] = "***"
    return out


def default_bootstrap_file() -> Path:
    """``/etc/qisd/bootstrap-nodes.txt`` where present, else the packaged list."""
    etc = Path("/etc/qisd/bootstrap-nodes.txt")
    if etc.is_file():
        return etc
    return Path(__file__).resolve().parent.parent / "bootstrap-nodes.txt"


def read_bootstrap_file(path: str | os.PathLike[str]) -> list[tuple[str, int]]:
    """Peers of a bootstrap file: ``HOST:PORT`` lines, ``#`` comments, blank lines ignored."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read bootstrap file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"bootstrap file {path} is not UTF-8 text") from None
    peers = []
    for n, line in enumerate(text.splitlines(), 1):
        entry = line.split("#", 1)[0].strip()
        if not entry:
            continue
        try:
            peers.append(parse_peer(entry))
        except ConfigError as exc:
            raise ConfigError(f"{path} line {n}: {exc}") from None
    return peers


def bootstrap_peers(config: NodeConfig) -> list[tuple[str, int]]:
    """Every bootstrap peer of a configuration: its file's, then ``bootstrap``, deduplicated."""
    path = Path(config.bootstrap_file) if config.bootstrap_file else default_bootstrap_file()
    peers = read_bootstrap_file(path) if (config.bootstrap_file or path.is_file()) else []
    peers += [parse_peer(p) for p in config.bootstrap]
    seen: set[tuple[str, int]] = set()
    out = []
    for peer in peers:
        if peer not in seen:
            seen.add(peer)
            out.append(peer)
    return out
