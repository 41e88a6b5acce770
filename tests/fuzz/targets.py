"""Fuzz targets: each takes untrusted bytes and must never fail except as documented.

A target returns normally for input it accepts or refuses the documented way (a PacketError
subclass for envelopes, an error reply for RPCs). Any other exception is a finding: atheris
saves the input, and the input is then added to ``corpus/<target>/`` so that
``tests/test_fuzz.py`` replays it as a regression test forever after.
"""

from __future__ import annotations

from collections.abc import Callable

from qisd.core import packet
from qisd.core.crypto import Identity
from qisd.core.fingerprint import key_for_path
from qisd.errors import PacketError

NOW_MS = 1_767_225_600_000
"""Fixed receiver clock, so a corpus input means the same thing on every run."""


def envelope(data: bytes) -> None:
    """The envelope decoder, single and batched, must agree and only raise PacketError."""
    try:
        single: object = packet.open_envelope(data, now_ms=NOW_MS)
    except PacketError as exc:
        single = exc
    half = len(data) // 2
    batched = packet.open_envelopes([data, data[:half]], now_ms=NOW_MS)
    first = batched[0]
    if isinstance(single, PacketError):
        if type(first) is not type(single):
            raise AssertionError(f"batched decode disagrees: {first!r} vs {single!r}")
    elif first != single:
        raise AssertionError("batched decode returned a different envelope")


_SIGNER = Identity.from_bytes(bytes(range(32)), bytes(32))
_KEY = key_for_path("clinical.oncology/treatment_response")
_FIELDS = ("domain", "problem_type")


def _signed(body: bytes) -> bytes:
    return packet.seal(
        _SIGNER, packet.KIND_PACKET, _KEY, body, fields=_FIELDS, timestamp_ms=NOW_MS
    ).raw


def signed_body(data: bytes) -> None:
    """A hostile peer signs whatever body it likes with its own key: zlib stream as given."""
    if len(data) > packet.MAX_ENVELOPE_BYTES - 200:
        return
    envelope(_signed(data))


def signed_ipc(data: bytes) -> None:
    """Hostile Arrow IPC bytes, compressed the proper way and signed: reaches the IPC reader
    and row validation."""
    body = packet._deflate(data)
    if len(body) > packet.MAX_ENVELOPE_BYTES - 200:
        return
    envelope(_signed(body))


TARGETS: dict[str, Callable[[bytes], None]] = {
    "envelope": envelope,
    "signed_body": signed_body,
    "signed_ipc": signed_ipc,
}
