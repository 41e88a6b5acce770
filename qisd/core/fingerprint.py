"""Semantic fingerprints: similarity templates, fingerprint paths and their DHT keys (pure).

A *template* names, for one domain, the ordered packet fields that make a fingerprint and the
levels that are routable. The fingerprint path at level ``n`` is the first ``n`` field values
joined by ``/`` (the same string a Flight descriptor path carries); its 160-bit DHT key is a
hash of the path with a qisd-specific prefix.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from qisd.errors import UsageError

KEY_BYTES = 20
"""DHT keys are 160 bits, like Kademlia node ids."""
MAX_PATH_CHARS = 512
"""A fingerprint path longer than this is refused."""

FINGERPRINT_FIELDS: tuple[str, ...] = (
    "domain",
    "problem_type",
    "model_architecture",
    "training_phase",
    "metric_name",
    "intervention_type",
)
"""Packet columns a template may route by (string columns that describe the problem)."""

_KEY_PERSON = b"qisd-fp-key-v1"


def key_for_path(path: str) -> bytes:
    """The DHT key of a fingerprint path such as ``clinical.oncology/treatment_response``."""
    return hashlib.blake2b(path.encode("utf-8"), digest_size=KEY_BYTES, person=_KEY_PERSON).digest()


def split_path(path: str) -> list[str]:
    """Split and check a fingerprint path given by a user (CLI argument, Flight ticket)."""
    if not isinstance(path, str) or not path.strip("/"):
        raise UsageError("a fingerprint path is needed, e.g. clinical.oncology/treatment_response")
    if len(path) > MAX_PATH_CHARS:
        raise UsageError(f"fingerprint path is longer than {MAX_PATH_CHARS} characters")
    parts = path.strip("/").split("/")
    for part in parts:
        if not part or part != part.strip() or any(ord(c) < 32 for c in part):
            raise UsageError(f"fingerprint path {path!r} has an empty or malformed segment")
    return parts


def normalize_path(path: str) -> str:
    """The canonical form of a fingerprint path (no leading or trailing slash)."""
    return "/".join(split_path(path))


@dataclass(frozen=True)
class Template:
    """An ordered choice of fingerprint fields for a domain, and its routable levels."""

    fields: tuple[str, ...]
    levels: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.fields or self.fields[0] != "domain":
            raise UsageError("a template's first field must be 'domain'")
        unknown = [f for f in self.fields if f not in FINGERPRINT_FIELDS]
        if unknown:
            raise UsageError(
                f"template fields {unknown} are not fingerprint fields {list(FINGERPRINT_FIELDS)}"
            )
        if len(set(self.fields)) != len(self.fields):
            raise UsageError("a template names each field once")
        if not self.levels or any(not 1 <= n <= len(self.fields) for n in self.levels):
            raise UsageError(f"template levels must lie in 1..{len(self.fields)}")
        if tuple(sorted(set(self.levels))) != self.levels:
            raise UsageError("template levels must be increasing and distinct")

    def fields_at(self, level: int) -> tuple[str, ...]:
        """The fields that make the path at ``level``."""
        return self.fields[:level]

    def path(self, row: Mapping[str, object], level: int) -> str:
        """The fingerprint path of ``row`` at ``level``."""
        return path_of(row, self.fields_at(level))

    def routes(self, row: Mapping[str, object]) -> list[tuple[tuple[str, ...], str, bytes]]:
        """(fields, path, key) for every routable level of ``row``, coarsest first."""
        out = []
        for level in self.levels:
            fields = self.fields_at(level)
            path = path_of(row, fields)
            out.append((fields, path, key_for_path(path)))
        return out


DEFAULT_TEMPLATE = Template(("domain", "problem_type", "model_architecture"), (2, 3))
"""Used for any domain whose Hiring election has no candidate."""


def path_of(row: Mapping[str, object], fields: Sequence[str]) -> str:
    """Join the values of ``fields`` in ``row`` with ``/``."""
    return "/".join([str(row[f]) for f in fields])
