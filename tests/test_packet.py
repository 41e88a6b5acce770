"""Outcome rows and signed envelopes: round trips, size bounds, tampering, every field rule."""

from __future__ import annotations

import json
import os
import random
import string

import msgpack
import pyarrow as pa
import pytest
from helpers import BASE_ROW

from qisd.core import packet as P
from qisd.core.crypto import Identity, node_id_for
from qisd.core.fingerprint import DEFAULT_TEMPLATE, key_for_path
from qisd.errors import DecodeError, FieldError, KeyMismatchError, PacketError, SignatureError

NOW = 1_767_225_600_000  # 2026-01-01T00:00:00Z in ms
ROUTES = [DEFAULT_TEMPLATE.fields_at(level) for level in DEFAULT_TEMPLATE.levels]

# The row of the article's demo (seeds/000), as a caller would hand it to `qisd emit`.
ARTICLE_ROW = {
    **BASE_ROW,
    "intervention_params": {"schedule": "cosine_annealing", "T_max": 10, "eta_min": 1e-6},
    "data_ref": "/local/oncology_data/site_a/",
}


@pytest.fixture(scope="module")
def ident() -> Identity:
    return Identity.generate()


def seal_one(ident: Identity, record: dict, *, level: int = -1) -> P.Envelope:
    rows = P.build_rows([record], ident, now_ms=NOW)
    return P.pack_rows(ident, rows, ROUTES)[0][level]


def rows_for(n: int, **overrides: object) -> list[dict]:
    out = []
    for i in range(n):
        row = dict(ARTICLE_ROW, metric_delta=0.001 * i, timestamp_utc=NOW - i, **overrides)
        out.append(row)
    return out


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("n", [1, 10, P.MAX_ROWS])
def test_round_trip_dict_to_envelope_to_table(ident: Identity, n: int) -> None:
    records = rows_for(n)
    rows = P.build_rows(records, ident, now_ms=NOW)
    bodies = P.pack_rows(ident, rows, ROUTES)
    assert len(bodies) == 1, "rows of one fingerprint fit one body"
    assert [e.key for e in bodies[0]] == [
        key_for_path("clinical.oncology/treatment_response_classification"),
        key_for_path("clinical.oncology/treatment_response_classification/transformer-256d"),
    ]
    assert len({e.packet_id for e in bodies[0]}) == 1, "one body has one id at every level"
    for env in bodies[0]:
        opened = P.open_envelope(env.raw, now_ms=NOW, expected_key=env.key)
        assert opened.packet_id == env.packet_id
        assert opened.rows == n
        table = pa.Table.from_batches([opened.batch()])
        assert table.schema.equals(P.SCHEMA)
        got = table.to_pylist()
        for rec, row in zip(records, got, strict=True):
            assert row["node_id"] == ident.node_id
            assert row["timestamp_utc"] == rec["timestamp_utc"]
            assert row["intervention_params"] == json.dumps(
                rec["intervention_params"], separators=(",", ":")
            )
            assert row["raw_data_hash"] == ident.commit(rec["data_ref"])
            assert row["metric_delta"] == pytest.approx(rec["metric_delta"], abs=1e-7)
            for col in ("domain", "problem_type", "model_architecture", "metric_name"):
                assert row[col] == rec[col]


def test_more_rows_than_one_envelope_are_split_and_all_kept(ident: Identity) -> None:
    rows = P.build_rows(rows_for(3 * P.MAX_ROWS + 5), ident, now_ms=NOW)
    bodies = P.pack_rows(ident, rows, ROUTES)
    assert len(bodies) >= 4
    seen = [r for b in bodies for r in P.open_envelope(b[0].raw, now_ms=NOW).batch().to_pylist()]
    assert sorted(r["timestamp_utc"] for r in seen) == sorted(r["timestamp_utc"] for r in rows)


def test_rows_of_different_fingerprints_go_to_different_envelopes(ident: Identity) -> None:
    a = dict(ARTICLE_ROW)
    b = dict(ARTICLE_ROW, model_architecture="resnet50")
    bodies = P.pack_rows(ident, P.build_rows([a, b, a], ident, now_ms=NOW), ROUTES)
    assert len(bodies) == 2
    assert bodies[0][0].key == bodies[1][0].key, "same level-2 path"
    assert bodies[0][1].key != bodies[1][1].key, "different level-3 paths"


def test_inputs_json_lines_array_and_arrow_give_the_same_rows(ident: Identity) -> None:
    rec = {k: v for k, v in ARTICLE_ROW.items() if k != "data_ref"}
    rec["timestamp_utc"] = NOW
    as_lines = P.rows_from_json("\n".join(json.dumps(rec) for _ in range(3)))
    as_array = P.rows_from_json(json.dumps([rec, rec, rec]))
    table = P.rows_to_table(P.build_rows(as_lines, ident, now_ms=NOW))
    as_arrow = P.rows_from_arrow(table)
    built = [P.build_rows(x, ident, now_ms=NOW) for x in (as_lines, as_array, as_arrow)]
    assert built[0] == built[1] == built[2]
    with pytest.raises(PacketError, match="line 2"):
        P.rows_from_json(json.dumps(rec) + "\n{not json")
    with pytest.raises(PacketError, match=r"\['colour'\]"):
        P.rows_from_arrow(table.append_column("colour", pa.array(["red"] * 3)))


# --------------------------------------------------------------------------- sizes


def test_article_row_envelope_is_at_most_600_bytes(ident: Identity) -> None:
    env = seal_one(ident, ARTICLE_ROW)
    assert len(env.raw) <= 600, len(env.raw)


def _noise(n: int, alphabet: str = string.ascii_letters + string.digits + "._-") -> str:
    rng = random.Random(n)
    return "".join(rng.choice(alphabet) for _ in range(n))


def test_worst_case_one_row_envelope_fits_one_1400_byte_datagram(ident: Identity) -> None:
    rng = random.Random(7)
    name = P.MAX_NAME_CHARS
    params_value = _noise(P.MAX_PARAMS_BYTES - 8)
    worst = {
        "timestamp_utc": NOW,
        "domain": _noise(name),
        "problem_type": _noise(name),
        "model_architecture": _noise(name),
        "training_phase": _noise(name),
        "metric_name": _noise(name),
        "intervention_type": _noise(name),
        "intervention_params": json.dumps({"k": params_value}, separators=(",", ":")),
        "metric_delta": rng.uniform(-1e9, 1e9),
        "metric_value": rng.uniform(-1e9, 1e9),
        "confidence": rng.random(),
        "outcome_decile": 10,
        "sample_count": 2**31 - 1,
        "raw_data_hash": _noise(P.MAX_RAW_DATA_HASH_CHARS),
    }
    assert len(worst["intervention_params"]) == P.MAX_PARAMS_BYTES
    env = seal_one(ident, worst)
    assert len(env.raw) <= 1400, len(env.raw)


def test_envelope_bytes_per_row_shrink_with_batching(ident: Identity) -> None:
    per_row = {}
    for n in (1, 10, 100):
        bodies = P.pack_rows(ident, P.build_rows(rows_for(n), ident, now_ms=NOW), ROUTES)
        per_row[n] = sum(len(b[0].raw) for b in bodies) / n
    assert per_row[1] > per_row[10] > per_row[100]


# --------------------------------------------------------------------------- tampering


def _frame(env: P.Envelope) -> list:
    return msgpack.unpackb(env.raw)


def _reframe(items: list) -> bytes:
    return msgpack.packb(items)


def _flip(b: bytes, at: int = 0) -> bytes:
    return b[:at] + bytes([b[at] ^ 0x01]) + b[at + 1 :]


@pytest.mark.parametrize(
    ("index", "error"),
    [
        (6, SignatureError),  # signature
        (4, SignatureError),  # public key
        (2, SignatureError),  # key
        (5, SignatureError),  # compressed body
        (3, DecodeError),  # fingerprint fields: index 3 (domain->problem_type) is still valid?
    ],
    ids=["signature", "public_key", "key", "body", "fields"],
)
def test_tampering_with_any_region_is_rejected(
    ident: Identity, index: int, error: type[Exception]
) -> None:
    env = seal_one(ident, ARTICLE_ROW)
    items = _frame(env)
    if index == 3:
        items[3] = bytes([0]) + items[3][1:]  # 'node_id' is not a fingerprint field
    else:
        items[index] = _flip(items[index], len(items[index]) // 2)
    with pytest.raises(error):
        P.open_envelope(_reframe(items), now_ms=NOW)


def test_reordered_fields_break_the_signature(ident: Identity) -> None:
    env = seal_one(ident, ARTICLE_ROW)
    items = _frame(env)
    items[3] = items[3][:1] + items[3][1:][::-1]
    with pytest.raises(SignatureError):
        P.open_envelope(_reframe(items), now_ms=NOW)


@pytest.mark.parametrize(
    "mangle",
    [
        lambda raw: raw[:-1],
        lambda raw: raw[: len(raw) // 2],
        lambda raw: raw + b"\x00",
        lambda raw: b"\x93" + raw[1:],
        lambda raw: b"",
        lambda raw: os.urandom(len(raw)),
        lambda raw: msgpack.packb({"v": 1}),
        lambda raw: msgpack.packb([2, *msgpack.unpackb(raw)[1:]]),
        lambda raw: msgpack.packb([1, 9, *msgpack.unpackb(raw)[2:]]),
        lambda raw: msgpack.packb([1, 1, "k" * 20, *msgpack.unpackb(raw)[3:]]),
        lambda raw: b"\x00" * (P.MAX_ENVELOPE_BYTES + 1),
    ],
    ids=[
        "truncated-1",
        "truncated-half",
        "trailing-byte",
        "wrong-array-size",
        "empty",
        "random",
        "map",
        "version",
        "kind",
        "key-type",
        "oversized",
    ],
)
def test_malformed_framing_is_a_decode_error(ident: Identity, mangle) -> None:  # type: ignore[no-untyped-def]
    raw = mangle(seal_one(ident, ARTICLE_ROW).raw)
    with pytest.raises((DecodeError, SignatureError)) as info:
        P.open_envelope(raw, now_ms=NOW)
    assert str(info.value)


def test_decompression_bomb_is_rejected_even_when_signed(ident: Identity) -> None:
    bomb = P._deflate(b"\x00" * (P.MAX_BODY_BYTES * 4))
    assert len(bomb) < P.MAX_ENVELOPE_BYTES
    key = key_for_path("clinical.oncology/treatment_response_classification")
    env = P.seal(ident, P.KIND_PACKET, key, bomb, fields=ROUTES[0], timestamp_ms=NOW, rows=1)
    with pytest.raises(DecodeError, match="inflates past"):
        P.open_envelope(env.raw, now_ms=NOW)


def test_validly_signed_envelope_under_the_wrong_key_is_refused(ident: Identity) -> None:
    rows = P.build_rows([ARTICLE_ROW], ident, now_ms=NOW)
    wrong = key_for_path("clinical.cardiology/arrhythmia")
    env = P.seal(
        ident, P.KIND_PACKET, wrong, P.packet_body(rows), fields=ROUTES[0], timestamp_ms=NOW, rows=1
    )
    with pytest.raises(KeyMismatchError):
        P.open_envelope(env.raw, now_ms=NOW)
    good = seal_one(ident, ARTICLE_ROW, level=0)
    with pytest.raises(KeyMismatchError):
        P.open_envelope(good.raw, now_ms=NOW, expected_key=wrong)


def test_envelope_rows_must_carry_the_signers_node_id(ident: Identity) -> None:
    other = Identity.generate()
    rows = P.build_rows([ARTICLE_ROW], other, now_ms=NOW)  # node_id of `other`
    key = key_for_path(P.path_of(rows[0], ROUTES[0]))
    env = P.seal(
        ident, P.KIND_PACKET, key, P.packet_body(rows), fields=ROUTES[0], timestamp_ms=NOW, rows=1
    )
    with pytest.raises(FieldError, match="node_id"):
        P.open_envelope(env.raw, now_ms=NOW)


def test_receiver_rejects_rows_from_too_far_in_its_future(ident: Identity) -> None:
    env = seal_one(ident, dict(ARTICLE_ROW, timestamp_utc=NOW))
    P.open_envelope(env.raw, now_ms=NOW - P.MAX_FUTURE_MS)
    with pytest.raises(FieldError, match="timestamp_utc"):
        P.open_envelope(env.raw, now_ms=NOW - P.MAX_FUTURE_MS - 1)


def test_replay_has_the_same_packet_id(ident: Identity) -> None:
    env = seal_one(ident, ARTICLE_ROW)
    again = P.open_envelope(env.raw, now_ms=NOW)
    assert again.packet_id == env.packet_id
    other = seal_one(ident, dict(ARTICLE_ROW, metric_delta=0.5))
    assert other.packet_id != env.packet_id


# --------------------------------------------------------------------------- identity fields


def test_caller_node_id_is_replaced_by_the_signers(ident: Identity) -> None:
    row = P.build_rows([dict(ARTICLE_ROW, node_id="gpu-node-a")], ident, now_ms=NOW)[0]
    assert row["node_id"] == ident.node_id == node_id_for(ident.public_key)


def test_data_ref_becomes_a_keyed_commitment(ident: Identity) -> None:
    other = Identity.generate()
    mine = P.build_rows([ARTICLE_ROW], ident, now_ms=NOW)[0]["raw_data_hash"]
    again = P.build_rows([ARTICLE_ROW], ident, now_ms=NOW)[0]["raw_data_hash"]
    theirs = P.build_rows([ARTICLE_ROW], other, now_ms=NOW)[0]["raw_data_hash"]
    assert mine == again != theirs
    assert ARTICLE_ROW["data_ref"] not in mine
    import hashlib

    assert mine != hashlib.sha256(ARTICLE_ROW["data_ref"].encode()).hexdigest()[: len(mine)]


# --------------------------------------------------------------------------- field rules

BASE = {k: v for k, v in ARTICLE_ROW.items() if k != "data_ref"}

OK_AND_BAD = [
    # (field, value at the limit (accepted), value just past it (refused), rule fragment)
    ("confidence", 0.0, -1e-6, "[0, 1]"),
    ("confidence", 1.0, 1.000001, "[0, 1]"),
    ("outcome_decile", 1, 0, "1..10"),
    ("outcome_decile", 10, 11, "1..10"),
    ("sample_count", 0, -1, "0.."),
    ("sample_count", 2**31 - 1, 2**31, "0.."),
    ("timestamp_utc", NOW + P.MAX_FUTURE_MS, NOW + P.MAX_FUTURE_MS + 1, "future"),
    ("timestamp_utc", 0, -1, ">= 0"),
    ("metric_delta", P.MAX_METRIC_ABS, P.MAX_METRIC_ABS * 1.01, "within"),
    ("metric_value", -P.MAX_METRIC_ABS, -P.MAX_METRIC_ABS * 1.01, "within"),
    ("domain", "d" * P.MAX_NAME_CHARS, "d" * (P.MAX_NAME_CHARS + 1), "at most"),
    ("problem_type", "p" * P.MAX_NAME_CHARS, "p" * (P.MAX_NAME_CHARS + 1), "at most"),
    ("model_architecture", "m" * P.MAX_NAME_CHARS, "m" * (P.MAX_NAME_CHARS + 1), "at most"),
    ("training_phase", "t" * P.MAX_NAME_CHARS, "t" * (P.MAX_NAME_CHARS + 1), "at most"),
    ("metric_name", "n" * P.MAX_NAME_CHARS, "n" * (P.MAX_NAME_CHARS + 1), "at most"),
    ("intervention_type", "i" * P.MAX_NAME_CHARS, "i" * (P.MAX_NAME_CHARS + 1), "at most"),
    (
        "intervention_params",
        json.dumps({"k": "v" * (P.MAX_PARAMS_BYTES - 8)}, separators=(",", ":")),
        json.dumps({"k": "v" * (P.MAX_PARAMS_BYTES - 7)}, separators=(",", ":")),
        "bytes",
    ),
    (
        "raw_data_hash",
        "a" * P.MAX_RAW_DATA_HASH_CHARS,
        "a" * (P.MAX_RAW_DATA_HASH_CHARS + 1),
        "at most",
    ),
]


@pytest.mark.parametrize(("field", "ok", "bad", "rule"), OK_AND_BAD)
def test_each_limit_accepts_at_and_refuses_just_past(
    ident: Identity, field: str, ok: object, bad: object, rule: str
) -> None:
    row = P.build_rows([dict(BASE, **{field: ok})], ident, now_ms=NOW)[0]
    if field != "intervention_params":
        assert row[field] == pytest.approx(ok) if isinstance(ok, float) else row[field] == ok
    # a value at the limit also survives signing and a receiver's checks
    P.open_envelope(P.pack_rows(ident, [row], ROUTES)[0][0].raw, now_ms=NOW)
    with pytest.raises(FieldError) as info:
        P.build_rows([dict(BASE, **{field: bad})], ident, now_ms=NOW)
    assert info.value.field == field
    assert rule in str(info.value)
    assert field in str(info.value)


@pytest.mark.parametrize(
    ("field", "value", "rule"),
    [
        ("confidence", float("nan"), "finite"),
        ("metric_delta", float("inf"), "finite"),
        ("metric_value", "abc", "number"),
        ("metric_value", True, "number"),
        ("outcome_decile", 7.5, "whole number"),
        ("sample_count", "12x", "whole number"),
        ("domain", "", "non-empty"),
        ("domain", " padded", "surrounding"),
        ("domain", "a/b", "'/'"),
        ("domain", "qisd.templates", "reserved"),
        ("problem_type", "tab\there", "control"),
        ("problem_type", None, "required"),
        ("metric_name", 5, "text"),
        ("intervention_params", "[1, 2]", "JSON object"),
        ("intervention_params", "{not json", "JSON object"),
        ("intervention_params", {"x": float("nan")}, "NaN"),
        ("raw_data_hash", "has space", "spaces"),
        ("raw_data_hash", "é", "ASCII"),
        ("colour", "red", "not a column"),
    ],
)
def test_bad_values_name_field_value_and_rule(
    ident: Identity, field: str, value: object, rule: str
) -> None:
    with pytest.raises(FieldError) as info:
        P.build_rows([dict(BASE, **{field: value})], ident, now_ms=NOW)
    assert info.value.field == field
    assert rule in str(info.value)


@pytest.mark.parametrize(
    "field",
    [
        "metric_delta",
        "metric_value",
        "confidence",
        "outcome_decile",
        "domain",
        "problem_type",
        "metric_name",
        "intervention_type",
    ],
)
def test_required_fields(ident: Identity, field: str) -> None:
    row = {k: v for k, v in BASE.items() if k != field}
    with pytest.raises(FieldError, match=f"{field}=None: is required"):
        P.build_rows([row], ident, now_ms=NOW)


def test_optional_fields_take_documented_defaults(ident: Identity) -> None:
    row = {
        k: v
        for k, v in BASE.items()
        if k not in ("model_architecture", "training_phase", "intervention_params", "sample_count")
    }
    out = P.build_rows([row], ident, now_ms=NOW)[0]
    assert out["model_architecture"] == out["training_phase"] == "unspecified"
    assert out["intervention_params"] == "{}"
    assert out["sample_count"] == 0
    assert out["timestamp_utc"] == NOW
    assert out["raw_data_hash"] == ""


def test_csv_style_text_numbers_are_coerced(ident: Identity) -> None:
    text = {k: str(v) if isinstance(v, (int, float)) else v for k, v in BASE.items()}
    text["intervention_params"] = json.dumps(BASE["intervention_params"])
    out = P.build_rows([text], ident, now_ms=NOW)[0]
    assert out["outcome_decile"] == 8 and out["sample_count"] == 1240
    assert out["confidence"] == pytest.approx(0.91)


def test_error_names_the_row(ident: Identity) -> None:
    with pytest.raises(FieldError, match=r"row 2: confidence=1\.5"):
        P.build_rows([BASE, BASE, dict(BASE, confidence=1.5)], ident, now_ms=NOW)


# --------------------------------------------------------------------------- batched receive


def test_batched_open_agrees_with_single_open_on_good_and_hostile_input(ident: Identity) -> None:
    good = [seal_one(ident, dict(ARTICLE_ROW, metric_delta=0.01 * i)) for i in range(5)]
    multi = P.pack_rows(ident, P.build_rows(rows_for(7), ident, now_ms=NOW), ROUTES)[0][0]
    items = _frame(good[0])
    items[6] = _flip(items[6])
    forged = _reframe(items)
    future = seal_one(ident, dict(ARTICLE_ROW, timestamp_utc=NOW + P.MAX_FUTURE_MS)).raw
    wrong_key = P.seal(
        ident,
        P.KIND_PACKET,
        key_for_path("x/y"),
        P.packet_body(P.build_rows([ARTICLE_ROW], ident, now_ms=NOW)),
        fields=ROUTES[0],
        timestamp_ms=NOW,
        rows=1,
    ).raw
    doc = P.seal(
        ident, P.KIND_TEMPLATE, key_for_path("qisd.templates/x"), b"{}", timestamp_ms=NOW
    ).raw
    raws = [
        good[0].raw,
        forged,
        good[1].raw,
        b"junk",
        multi.raw,
        future,
        wrong_key,
        doc,
        *(g.raw for g in good[2:]),
    ]
    batched = P.open_envelopes(raws, now_ms=NOW - 1)
    assert len(batched) == len(raws)
    for raw, got in zip(raws, batched, strict=True):
        try:
            want: object = P.open_envelope(raw, now_ms=NOW - 1)
        except PacketError as exc:
            want = exc
        if isinstance(want, PacketError):
            assert type(got) is type(want) and str(got) == str(want)
        else:
            assert got == want
    assert sum(isinstance(x, P.Envelope) for x in batched) == 7  # 5 good + multi + doc


HOSTILE_ROWS = {
    "nan confidence": {"confidence": float("nan")},
    "confidence above 1": {"confidence": 1.5},
    "infinite delta": {"metric_delta": float("inf")},
    "huge value": {"metric_value": 3e9},
    "decile 0": {"outcome_decile": 0},
    "negative samples": {"sample_count": -5},
    "far future": {"timestamp_utc": NOW + P.MAX_FUTURE_MS + 1},
    "negative timestamp": {"timestamp_utc": -1},
    "slash in name": {"metric_name": "a/b"},
    "padded name": {"intervention_type": " warmup"},
    "empty name": {"training_phase": ""},
    "long name": {"metric_name": "m" * (P.MAX_NAME_CHARS + 1)},
    "reserved domain": {"domain": "qisd.templates"},
    "params not an object": {"intervention_params": "[1]"},
    "params not json": {"intervention_params": "{x"},
    "params too long": {"intervention_params": json.dumps({"k": "v" * 300})},
    "non-ascii hash": {"raw_data_hash": "é"},
    "hash with space": {"raw_data_hash": "a b"},
    "other signer's node_id": {"node_id": "0" * 32},
    "null column": {"problem_type": None},
}


@pytest.mark.parametrize("mutation", sorted(HOSTILE_ROWS), ids=str)
def test_batched_open_rejects_every_hostile_row_value_like_the_single_path(
    ident: Identity, mutation: str
) -> None:
    # A hostile peer signs rows that break one rule; the column-wise pass of open_envelopes
    # must never accept what the row-by-row rules refuse, and must give the same error.
    good = P.build_rows([BASE], ident, now_ms=NOW)[0]
    row = dict(good, **HOSTILE_ROWS[mutation])
    fields = ROUTES[0]
    # The key is the hostile rows' own fingerprint, so only the broken rule can refuse them.
    path = "/".join(str(row[f]) for f in fields)
    hostile = P.seal(
        ident,
        P.KIND_PACKET,
        key_for_path(path),
        P.packet_body([row, row]),
        fields=fields,
        timestamp_ms=NOW,
        rows=2,
    ).raw
    valid = [seal_one(ident, dict(BASE, metric_delta=0.01 * i), level=0).raw for i in range(5)]
    raws = [valid[0], valid[1], hostile, valid[2], valid[3], valid[4]]
    batched = P.open_envelopes(raws, now_ms=NOW)
    with pytest.raises(PacketError) as info:
        P.open_envelope(hostile, now_ms=NOW)
    assert type(batched[2]) is type(info.value) and str(batched[2]) == str(info.value)
    for raw, got in zip(raws, batched, strict=True):
        if raw != hostile:
            assert got == P.open_envelope(raw, now_ms=NOW)


def test_batched_open_checks_each_envelopes_fingerprint_and_signer(ident: Identity) -> None:
    good = P.build_rows([BASE], ident, now_ms=NOW)[0]
    fields = ROUTES[0]
    other = dict(good, problem_type="something_else")
    key = key_for_path("/".join(str(good[f]) for f in fields))
    mixed = P.seal(
        ident,
        P.KIND_PACKET,
        key,
        P.packet_body([good, other]),
        fields=fields,
        timestamp_ms=NOW,
        rows=2,
    ).raw
    stranger = Identity.generate()
    theirs = P.seal(
        stranger, P.KIND_PACKET, key, P.packet_body([good]), fields=fields, timestamp_ms=NOW, rows=1
    ).raw
    got = P.open_envelopes([mixed, theirs], now_ms=NOW)
    assert isinstance(got[0], KeyMismatchError)
    assert isinstance(got[1], FieldError) and got[1].field == "node_id"
