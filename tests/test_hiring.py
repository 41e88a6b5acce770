"""Hiring: template documents, endorsements, and the per-domain election."""

from __future__ import annotations

import json

import pytest

from qisd.core.fingerprint import DEFAULT_TEMPLATE, Template, key_for_path
from qisd.core.hiring import (
    DocumentError,
    Endorsement,
    TemplateDoc,
    decode_doc,
    default_template_doc,
    elect,
    templates_key,
    templates_path,
)
from qisd.errors import PacketError, UsageError

DOMAIN = "clinical.oncology"
NOW = 1_760_000_000_000

FINE = TemplateDoc(DOMAIN, ("domain", "problem_type", "training_phase"), (2, 3), NOW, "by phase")
COARSE = TemplateDoc(DOMAIN, ("domain", "model_architecture"), (2,), NOW + 1)
OTHER_DOMAIN = TemplateDoc("vision", ("domain", "problem_type"), (2,), NOW)


def _endorse(doc: TemplateDoc, *signers: str) -> list[tuple[str, Endorsement]]:
    return [(s, Endorsement(doc.template_id, doc.domain, NOW + 5)) for s in signers]


# --------------------------------------------------------------------------- documents


def test_template_doc_round_trips_and_its_id_is_the_hash_of_its_bytes() -> None:
    data = FINE.to_bytes()
    assert TemplateDoc.from_bytes(data) == FINE
    assert decode_doc(data) == FINE
    assert json.loads(data)["kind"] == "qisd.template"
    assert len(FINE.template_id) == 40 and FINE.template_id != COARSE.template_id
    assert FINE.template == Template(("domain", "problem_type", "training_phase"), (2, 3))
    # The id depends on every field, the note included.
    renoted = TemplateDoc(FINE.domain, FINE.fields, FINE.levels, FINE.created_ms, "other")
    assert renoted.template_id != FINE.template_id


def test_endorsement_round_trips() -> None:
    e = Endorsement(FINE.template_id, DOMAIN, NOW)
    assert Endorsement.from_bytes(e.to_bytes()) == e
    assert decode_doc(e.to_bytes()) == e


def _tampered(**changes: object) -> bytes:
    obj = json.loads(FINE.to_bytes())
    obj.update(changes)
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


@pytest.mark.parametrize(
    "data",
    [
        b"not json",
        b"\xff\xfe",
        b"[1, 2]",
        b"[" * 2000 + b"]" * 2000,
        _tampered(v=2),
        _tampered(kind="qisd.endorsement"),
        _tampered(fields=["problem_type", "domain"]),
        _tampered(fields=["domain", "patient_name"]),
        _tampered(levels=[3, 2]),
        _tampered(levels=[True]),
        _tampered(created_ms=-1),
        _tampered(domain="a/b"),
        _tampered(note="x" * 281),
        _tampered(extra=1),
        b'{"kind":"qisd.template","kind":"qisd.template"}',
        b" " + FINE.to_bytes(),
        json.dumps(json.loads(FINE.to_bytes()), indent=1).encode(),
        b"{" + b" " * 5000 + b"}",
    ],
)
def test_bad_template_documents_are_refused(data: bytes) -> None:
    with pytest.raises(DocumentError):
        TemplateDoc.from_bytes(data)


def test_bad_endorsements_and_kinds_are_refused() -> None:
    good = json.loads(Endorsement(FINE.template_id, DOMAIN, NOW).to_bytes())
    for change in ({"template_id": "ABC"}, {"template_id": "0" * 39}, {"created_ms": 1.5}):
        data = json.dumps({**good, **change}, sort_keys=True, separators=(",", ":")).encode()
        with pytest.raises(DocumentError):
            Endorsement.from_bytes(data)
    with pytest.raises(DocumentError):
        decode_doc(b'{"kind":"qisd.other","v":1}')
    # A bad document is a packet-level error: the network layer drops it like a bad packet.
    assert issubclass(DocumentError, PacketError)


def test_invalid_docs_cannot_be_constructed() -> None:
    with pytest.raises(DocumentError):
        TemplateDoc(DOMAIN, ("domain",), (2,), NOW)
    with pytest.raises(DocumentError):
        TemplateDoc("", ("domain",), (1,), NOW)


def test_templates_live_at_a_well_known_path_per_domain() -> None:
    assert templates_path(DOMAIN) == "qisd.templates/clinical.oncology"
    assert templates_key(DOMAIN) == key_for_path("qisd.templates/clinical.oncology")
    assert templates_key(DOMAIN) != templates_key("vision")
    with pytest.raises(UsageError):
        templates_path("a/b")


# --------------------------------------------------------------------------- the election


def test_distinct_signers_decide() -> None:
    templates = [("author1", FINE), ("author2", COARSE)]
    endorsements = _endorse(FINE, "s1", "s2") + _endorse(COARSE, "s3", "s4", "s5")
    hire = elect(DOMAIN, templates, endorsements, {})
    assert hire.reason == "endorsed" and hire.template_id == COARSE.template_id
    assert hire.template == COARSE.template and hire.endorsers == 4


def test_repeated_endorsements_from_one_signer_count_once() -> None:
    templates = [("author1", FINE), ("author2", COARSE)]
    flood = _endorse(COARSE, *(["spammer"] * 500))
    endorsements = _endorse(FINE, "s1", "s2") + flood
    hire = elect(DOMAIN, templates, endorsements, {})
    assert hire.template_id == FINE.template_id and hire.endorsers == 3
    # Republishing one's own template is not a second endorsement either.
    again = elect(DOMAIN, templates + [("author2", COARSE)] * 10, endorsements, {})
    assert again.template_id == FINE.template_id


def test_publishing_counts_as_the_authors_endorsement_but_one_backer_is_not_enough() -> None:
    lonely = elect(DOMAIN, [("author1", FINE)], [], {})
    assert lonely.reason == "default"
    backed = elect(DOMAIN, [("author1", FINE)], _endorse(FINE, "s1"), {})
    assert backed.reason == "endorsed" and backed.endorsers == 2
    assert elect(DOMAIN, [("author1", FINE)], [], {}, min_endorsers=1).reason == "endorsed"


def test_darwinism_weights_scale_endorsements() -> None:
    templates = [("author1", FINE), ("author2", COARSE)]
    endorsements = _endorse(FINE, "s1", "s2") + _endorse(COARSE, "s3", "s4", "s5")
    weights = {FINE.template_id: 0.8, COARSE.template_id: 0.2}
    hire = elect(DOMAIN, templates, endorsements, weights)
    assert hire.template_id == FINE.template_id and hire.score == pytest.approx(3 * 0.8)
    # A template Darwinism retired is no candidate, however endorsed.
    retired = elect(DOMAIN, templates, endorsements, {}, retired={COARSE.template_id})
    assert retired.template_id == FINE.template_id


def test_pinned_always_wins() -> None:
    templates = [("author1", FINE), ("author2", COARSE)]
    endorsements = _endorse(COARSE, *(f"s{k}" for k in range(50)))
    weights = {FINE.template_id: 0.0, COARSE.template_id: 1.0}
    hire = elect(
        DOMAIN, templates, endorsements, weights, FINE.template_id, retired={FINE.template_id}
    )
    assert hire.reason == "pinned" and hire.template_id == FINE.template_id
    assert elect(DOMAIN, [], [], {}, pinned=FINE).template_id == FINE.template_id
    default_id = default_template_doc(DOMAIN).template_id
    assert elect(DOMAIN, templates, endorsements, {}, default_id).template == DEFAULT_TEMPLATE
    with pytest.raises(UsageError):
        elect(DOMAIN, [], [], {}, pinned="0" * 40)
    with pytest.raises(UsageError):
        elect(DOMAIN, [], [], {}, pinned=OTHER_DOMAIN)


def test_no_candidate_means_the_default_template() -> None:
    hire = elect(DOMAIN, [("a", OTHER_DOMAIN)], _endorse(OTHER_DOMAIN, "s1", "s2"), {})
    assert hire.reason == "default" and hire.template == DEFAULT_TEMPLATE
    assert hire.template_id == default_template_doc(DOMAIN).template_id
    # Endorsements of a template whose document is unknown elect nothing.
    assert elect(DOMAIN, [], _endorse(FINE, "s1", "s2", "s3"), {}).reason == "default"


def test_ties_break_deterministically_in_any_order() -> None:
    templates = [("author1", FINE), ("author2", COARSE)]
    endorsements = _endorse(FINE, "s1") + _endorse(COARSE, "s2")
    a = elect(DOMAIN, templates, endorsements, {})
    b = elect(DOMAIN, templates[::-1], endorsements[::-1], {})
    # Equal score, endorsers and weight: the older document (FINE) wins.
    assert a == b and a.template_id == FINE.template_id
