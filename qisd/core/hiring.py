"""Hiring: similarity templates as documents, endorsements, and the per-domain election (pure).

A :class:`TemplateDoc` proposes, for one domain, the fingerprint fields and routable levels
(a :class:`~qisd.core.fingerprint.Template`). An :class:`Endorsement` vouches for a template by
id. Both encode to canonical JSON (sorted keys, no spaces, UTF-8); a template's id is a hash of
its canonical bytes, and decoding refuses any byte string that is not canonical, so one
document has exactly one id. Signing and transport are the envelope's job: the election takes
``(signer_node_id, doc)`` pairs that were already verified.

The election (:func:`elect`) for a domain:

1. A pinned template (config) always wins, even one Darwinism retired.
2. Otherwise the candidates are the domain's templates that Darwinism has not retired and that
   at least ``min_endorsers`` distinct signers back. A template's endorsers are the signers of
   its endorsements plus its publishers: publishing a template counts as its author's
   endorsement. A signer counts once per template however often it endorses or republishes.
3. Score = distinct endorsers x Darwinism weight (a template Darwinism does not track yet gets
   an equal share ``1 / K`` of the K candidates, what it would get on joining). Highest score
   wins; ties go to more endorsers, higher weight, the older document, the smaller id.
4. No candidate: :data:`~qisd.core.fingerprint.DEFAULT_TEMPLATE` (with a well-known id per
   domain, :func:`default_template_doc`, so Darwinism can score it like any other).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from qisd.core.fingerprint import DEFAULT_TEMPLATE, Template, key_for_path
from qisd.core.packet import MAX_DOC_BYTES, MAX_NAME_CHARS
from qisd.errors import PacketError, UsageError

DOC_VERSION = 1
"""Version written into, and required of, every document."""
KIND_TEMPLATE_DOC = "qisd.template"
KIND_ENDORSEMENT_DOC = "qisd.endorsement"
MAX_NOTE_CHARS = 280
"""A template's free-text note."""
TEMPLATES_PREFIX = "qisd.templates"
"""First segment of the well-known path where a domain's templates and endorsements live."""
TEMPLATE_ID_BYTES = 20
_ID_PERSON = b"qisd-template"
_TEMPLATE_ID = re.compile(r"[0-9a-f]{40}")
_BAD_NAME_CHARS = re.compile(r"[\x00-\x1f\x7f/]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class DocumentError(PacketError):
    """A template or endorsement document is malformed; the message says which rule it breaks."""


def _check_domain(domain: object) -> str:
    if not isinstance(domain, str) or not domain or domain != domain.strip():
        raise DocumentError(f"domain {domain!r} must be non-empty text with no surrounding spaces")
    if len(domain) > MAX_NAME_CHARS or _BAD_NAME_CHARS.search(domain):
        raise DocumentError(
            f"domain {domain!r} must be at most {MAX_NAME_CHARS} characters, "
            "without '/' or control characters"
        )
    return domain


def _check_ms(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise DocumentError(f"{what} {value!r} must be milliseconds since 1970 (>= 0)")
    return value


def _canonical(obj: Mapping[str, Any]) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


@dataclass(frozen=True)
class TemplateDoc:
    """A proposed similarity template for one domain, as a publishable document."""

    domain: str
    fields: tuple[str, ...]
    levels: tuple[int, ...]
    created_ms: int
    note: str = ""

    def __post_init__(self) -> None:
        _check_domain(self.domain)
        _check_ms(self.created_ms, "created_ms")
        if not isinstance(self.note, str) or len(self.note) > MAX_NOTE_CHARS:
            raise DocumentError(f"note must be text of at most {MAX_NOTE_CHARS} characters")
        if _CONTROL.search(self.note):
            raise DocumentError("note must not contain control characters")
        if not isinstance(self.fields, tuple) or not all(isinstance(f, str) for f in self.fields):
            raise DocumentError("fields must be a tuple of field names")
        if not isinstance(self.levels, tuple) or not all(
            isinstance(n, int) and not isinstance(n, bool) for n in self.levels
        ):
            raise DocumentError("levels must be a tuple of whole numbers")
        try:
            Template(self.fields, self.levels)
        except UsageError as exc:
            raise DocumentError(str(exc)) from None
        if len(self.to_bytes()) > MAX_DOC_BYTES:
            raise DocumentError(f"a template document must be at most {MAX_DOC_BYTES} bytes")

    @property
    def template(self) -> Template:
        """The routing template this document proposes."""
        return Template(self.fields, self.levels)

    @property
    def template_id(self) -> str:
        """Hex hash (160 bits) of the canonical bytes: the template's id."""
        return template_id_of(self.to_bytes())

    def to_bytes(self) -> bytes:
        """Canonical JSON bytes (what is signed, published and hashed)."""
        return _canonical(
            {
                "kind": KIND_TEMPLATE_DOC,
                "v": DOC_VERSION,
                "domain": self.domain,
                "fields": list(self.fields),
                "levels": list(self.levels),
                "created_ms": self.created_ms,
                "note": self.note,
            }
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> TemplateDoc:
        """Decode and validate canonical bytes; raises :class:`DocumentError`."""
        obj = _parse(data, KIND_TEMPLATE_DOC, {"domain", "fields", "levels", "created_ms", "note"})
        fields, levels = obj["fields"], obj["levels"]
        if not isinstance(fields, list) or not isinstance(levels, list):
            raise DocumentError("fields and levels must be lists")
        doc = cls(
            domain=obj["domain"],
            fields=tuple(fields),
            levels=tuple(levels),
            created_ms=obj["created_ms"],
            note=obj["note"],
        )
        _require_canonical(doc.to_bytes(), data)
        return doc


@dataclass(frozen=True)
class Endorsement:
    """A signer vouching for a template (by id) as the way to route a domain."""

    template_id: str
    domain: str
    created_ms: int

    def __post_init__(self) -> None:
        if not isinstance(self.template_id, str) or not _TEMPLATE_ID.fullmatch(self.template_id):
            raise DocumentError(f"template_id {self.template_id!r} must be 40 lowercase hex digits")
        _check_domain(self.domain)
        _check_ms(self.created_ms, "created_ms")

    def to_bytes(self) -> bytes:
        """Canonical JSON bytes (what is signed and published)."""
        return _canonical(
            {
                "kind": KIND_ENDORSEMENT_DOC,
                "v": DOC_VERSION,
                "template_id": self.template_id,
                "domain": self.domain,
                "created_ms": self.created_ms,
            }
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> Endorsement:
        """Decode and validate canonical bytes; raises :class:`DocumentError`."""
        obj = _parse(data, KIND_ENDORSEMENT_DOC, {"template_id", "domain", "created_ms"})
        doc = cls(
            template_id=obj["template_id"], domain=obj["domain"], created_ms=obj["created_ms"]
        )
        _require_canonical(doc.to_bytes(), data)
        return doc


def template_id_of(canonical_bytes: bytes) -> str:
    """The id of a template document given its canonical bytes."""
    return hashlib.blake2b(
        canonical_bytes, digest_size=TEMPLATE_ID_BYTES, person=_ID_PERSON
    ).hexdigest()


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise DocumentError(f"document repeats the key {key!r}")
        out[key] = value
    return out


def _parse(data: object, kind: str | None, keys: set[str] | None) -> dict[str, Any]:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise DocumentError("a document must be bytes")
    raw = bytes(data)
    if len(raw) > MAX_DOC_BYTES:
        raise DocumentError(f"a document must be at most {MAX_DOC_BYTES} bytes")
    try:
        obj = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise DocumentError("a document must be UTF-8 JSON") from None
    if not isinstance(obj, dict):
        raise DocumentError("a document must be a JSON object")
    if obj.get("v") != DOC_VERSION:
        raise DocumentError(f"document version {obj.get('v')!r} is not {DOC_VERSION}")
    if kind is not None and obj.get("kind") != kind:
        raise DocumentError(f"document kind {obj.get('kind')!r} is not {kind!r}")
    if keys is not None:
        expected = keys | {"kind", "v"}
        if set(obj) != expected:
            extra = sorted(set(obj) - expected)
            missing = sorted(expected - set(obj))
            raise DocumentError(f"document keys: unexpected {extra}, missing {missing}")
    return obj


def _require_canonical(expected: bytes, data: bytes) -> None:
    if expected != bytes(data):
        raise DocumentError("document is not in canonical form (sorted keys, no spaces, UTF-8)")


def decode_doc(data: bytes) -> TemplateDoc | Endorsement:
    """Decode either kind of document by its ``kind``; raises :class:`DocumentError`."""
    kind = _parse(data, None, None).get("kind")
    if kind == KIND_TEMPLATE_DOC:
        return TemplateDoc.from_bytes(data)
    if kind == KIND_ENDORSEMENT_DOC:
        return Endorsement.from_bytes(data)
    raise DocumentError(f"unknown document kind {kind!r}")


def templates_path(domain: str) -> str:
    """The well-known fingerprint path where ``domain``'s templates and endorsements live."""
    try:
        _check_domain(domain)
    except DocumentError as exc:
        raise UsageError(str(exc)) from None
    return f"{TEMPLATES_PREFIX}/{domain}"


def templates_key(domain: str) -> bytes:
    """The DHT key of :func:`templates_path`."""
    return key_for_path(templates_path(domain))


def default_template_doc(domain: str) -> TemplateDoc:
    """:data:`DEFAULT_TEMPLATE` as a document for ``domain`` (created_ms 0): a well-known id."""
    return TemplateDoc(
        domain=domain,
        fields=DEFAULT_TEMPLATE.fields,
        levels=DEFAULT_TEMPLATE.levels,
        created_ms=0,
        note="qisd default",
    )


# --------------------------------------------------------------------------- the election


@dataclass(frozen=True)
class Hire:
    """The result of a Hiring election for one domain."""

    domain: str
    template: Template
    template_id: str
    reason: str
    """'pinned', 'endorsed' or 'default'."""
    endorsers: int
    """Distinct signers backing the winner (0 for pinned or default when none)."""
    score: float
    """endorsers x Darwinism weight (0 for pinned and default)."""


def elect(
    domain: str,
    templates: Iterable[tuple[str, TemplateDoc]],
    endorsements: Iterable[tuple[str, Endorsement]],
    darwin_weights: Mapping[str, float],
    pinned: str | TemplateDoc | None = None,
    *,
    retired: Collection[str] = (),
    min_endorsers: int = 2,
) -> Hire:
    """Pick the template ``domain`` routes by (rules in the module docstring).

    ``templates`` and ``endorsements`` are ``(signer_node_id, doc)`` pairs whose signatures
    were verified; documents for other domains are ignored. ``pinned`` is a template id (it
    must be among ``templates`` or be the default's id) or a document. ``retired`` are ids
    Darwinism retired. Raises :class:`UsageError` for a pinned template that is unknown or
    belongs to another domain.
    """
    if min_endorsers < 1:
        raise UsageError("min_endorsers must be at least 1")
    default = default_template_doc(domain)
    docs: dict[str, TemplateDoc] = {default.template_id: default}
    endorsers: dict[str, set[str]] = {}
    for signer, doc in templates:
        if doc.domain != domain:
            continue
        tid = doc.template_id
        docs[tid] = doc
        endorsers.setdefault(tid, set()).add(signer)
    for signer, endorsement in endorsements:
        if endorsement.domain == domain:
            endorsers.setdefault(endorsement.template_id, set()).add(signer)

    if pinned is not None:
        pin = pinned if isinstance(pinned, TemplateDoc) else docs.get(pinned)
        if pin is None:
            raise UsageError(
                f"pinned template {pinned} for domain {domain!r} is not known yet: publish it "
                "or wait until its document is fetched"
            )
        if pin.domain != domain:
            raise UsageError(f"pinned template is for domain {pin.domain!r}, not {domain!r}")
        tid = pin.template_id
        return Hire(domain, pin.template, tid, "pinned", len(endorsers.get(tid, ())), 0.0)

    gone = set(retired)
    candidates = sorted(
        tid
        for tid, who in endorsers.items()
        if tid in docs and tid not in gone and len(who) >= min_endorsers
    )
    if not candidates:
        return Hire(domain, default.template, default.template_id, "default", 0, 0.0)
    neutral = 1.0 / len(candidates)

    def weight(tid: str) -> float:
        w = darwin_weights.get(tid, neutral)
        return w if w > 0 else 0.0

    def rank(tid: str) -> tuple[float, int, float, int, str]:
        n = len(endorsers[tid])
        return (-n * weight(tid), -n, -weight(tid), docs[tid].created_ms, tid)

    best = min(candidates, key=rank)
    n = len(endorsers[best])
    return Hire(domain, docs[best].template, best, "endorsed", n, n * weight(best))


__all__ = [
    "DocumentError",
    "Endorsement",
    "Hire",
    "TemplateDoc",
    "decode_doc",
    "default_template_doc",
    "elect",
    "template_id_of",
    "templates_key",
    "templates_path",
]
