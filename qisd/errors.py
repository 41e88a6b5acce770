"""The exceptions qisd raises for local misuse.

Bad data from the network never raises across the I/O boundary (it is counted, logged and
dropped); everything a local caller can get wrong raises a subclass of :class:`QisdError` with a
message a user can act on. The CLI turns these into a one-line error and an exit code.
"""

from __future__ import annotations


class QisdError(Exception):
    """Base of every error qisd raises on purpose; ``exit_code`` is what the CLI exits with."""

    exit_code = 1


class UsageError(QisdError):
    """The caller asked for something that cannot be done as asked."""

    exit_code = 2


class ConfigError(QisdError):
    """A configuration file, flag or environment variable is invalid."""

    exit_code = 2


class IdentityError(QisdError):
    """The node identity (key files in the data directory) is missing, unsafe or unreadable."""

    exit_code = 2


class PacketError(QisdError):
    """An outcome packet or envelope is invalid."""

    exit_code = 1


class FieldError(PacketError):
    """One field of an outcome row breaks a rule; the message names field, value and rule."""

    def __init__(self, field: str, value: object, rule: str, row: int | None = None) -> None:
        shown = repr(value)
        if len(shown) > 80:
            shown = shown[:77] + "..."
        where = f"row {row}: " if row is not None else ""
        super().__init__(f"{where}{field}={shown}: {rule}")
        self.field = field
        self.value = value
        self.rule = rule
        self.row = row


class DecodeError(PacketError):
    """The bytes are not a well-formed qisd envelope (framing, compression, Arrow IPC)."""


class SignatureError(PacketError):
    """The envelope's Ed25519 signature does not verify for its public key and content."""


class KeyMismatchError(PacketError):
    """The envelope's DHT key is not the key of the fingerprint its rows carry."""


class StoreError(QisdError):
    """The local store cannot be opened or used (corrupt, foreign or locked database)."""

    exit_code = 4


class QuotaError(StoreError):
    """A put was refused by a per-key, per-signer or global quota."""

    exit_code = 1


class DaemonNotRunning(QisdError):
    """No daemon answers on the control socket of the data directory."""

    exit_code = 3


class DaemonRunningError(QisdError):
    """Another qisd daemon holds the data directory's lock."""

    exit_code = 1


class BootstrapError(QisdError):
    """None of the bootstrap peers could be reached or resolved."""

    exit_code = 5
