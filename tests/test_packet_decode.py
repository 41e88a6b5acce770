"""The batched receive path's column-wise pass against the row-by-row rules it shortcuts.

``open_envelopes`` accepts an envelope from the column-wise pass (``_accept_columns``) or,
where that pass declines, from the row-by-row rules (``_check_rows`` -> ``validate_row``),
which are the reference. These tests feed the same signed hostile and edge-case rows to both
and hold the pass to: never accept what the reference refuses, and accept valid envelopes
(so a pass that silently declined everything, or that skipped a rule, fails here).
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa
import pytest
from helpers import BASE_ROW, NOW

from qisd.core import packet as P
from qisd.core.crypto import Identity
from qisd.core.fingerprint import key_for_path
from qisd.errors import PacketError

FIELDS = ("domain", "problem_type")
INT32_MAX = 2**31 - 1


@pytest.fixture(scope="module")
def ident() -> Identity:
    return Identity.generate()


def _good(ident: Identity, i: int = 0) -> dict[str, Any]:
    return P.build_rows([dict(BASE_ROW, metric_delta=0.001 * i)], ident, now_ms=NOW)[0]


def _sealed(ident: Identity, rows: list[dict[str, Any]], path_row: dict[str, Any]) -> bytes:
    """Rows signed as they are (no caller-side validation), under ``path_row``'s key."""
    path = "/".join(str(path_row[f]) for f in FIELDS)
    return P.seal(
        ident,
        P.KIND_PACKET,
        key_for_path(path),
        P.packet_body(rows),
        fields=FIELDS,
        timestamp_ms=NOW,
        rows=len(rows),
    ).raw


def _both(raws: list[bytes], now_ms: int) -> tuple[list[object], list[object]]:
    """(column-wise verdicts, row-by-row verdicts) for the same envelopes."""
    frames = [P._open_frame(raw, None) for raw in raws]
    batches = [P._frame_batch(frame) for frame in frames]
    spans = [(f, b.num_rows) for f, b in zip(frames, batches, strict=True)]
    fast: list[object] = list(P._accept_columns(pa.concat_batches(batches), spans, now_ms))
    slow: list[object] = []
    for frame, batch in zip(frames, batches, strict=True):
        try:
            slow.append(P._check_rows(frame, P.batch_rows(batch), now_ms))
        except PacketError as exc:
            slow.append(exc)
    return fast, slow


# Each breaks exactly one rule of validate_row; text ones include the cases where Python's
# str semantics (strip of any Unicode space, length in characters) differ from byte-wise ones.
NUMBER_RULES = {
    "nan confidence": {"confidence": float("nan")},
    "confidence above 1": {"confidence": 1.5},
    "negative confidence": {"confidence": -0.01},
    "infinite delta": {"metric_delta": float("inf")},
    "nan delta": {"metric_delta": float("nan")},
    "minus infinite value": {"metric_value": float("-inf")},
    "huge value": {"metric_value": 3e9},
    "huge negative delta": {"metric_delta": -3e9},
    "decile 0": {"outcome_decile": 0},
    "decile 11": {"outcome_decile": 11},
    "negative samples": {"sample_count": -5},
    "far future": {"timestamp_utc": NOW + P.MAX_FUTURE_MS + 1},
    "negative timestamp": {"timestamp_utc": -1},
}
TEXT_RULES = {
    "slash in name": {"metric_name": "a/b"},
    "control character in name": {"metric_name": "a\x01b"},
    "DEL in name": {"intervention_type": "a\x7fb"},
    "padded name": {"intervention_type": " warmup"},
    "tab-ended name": {"training_phase": "epoch\t"},
    "no-break-space-padded name": {"metric_name": "\u00a0val_auc"},
    "next-line-ended name": {"training_phase": "epoch\x85"},
    "ideographic-space-ended name": {"model_architecture": "x\u3000"},
    "empty name": {"training_phase": ""},
    "long name": {"metric_name": "m" * (P.MAX_NAME_CHARS + 1)},
    "long multibyte name": {"metric_name": "é" * (P.MAX_NAME_CHARS + 1)},
    "reserved domain": {"domain": "qisd.templates"},
    "params not an object": {"intervention_params": "[1]"},
    "params null": {"intervention_params": "null"},
    "params not json": {"intervention_params": "{x"},
    "params trailing text": {"intervention_params": "{} x"},
    "params too long": {"intervention_params": json.dumps({"k": "v" * 300})},
    "params one char too long": {"intervention_params": '{"k":"' + "v" * 249 + '"}'},
    # Received params are held to what build_rows lets a local emit sign: 256 UTF-8 bytes
    # (not characters) and JSON values only (Python's json reads NaN and Infinity).
    "params 248 characters, 488 bytes": {"intervention_params": '{"k":"' + "é" * 240 + '"}'},
    "params with NaN": {"intervention_params": '{"a":NaN}'},
    "params with -Infinity": {"intervention_params": '{"a":[1,-Infinity]}'},
    "non-ascii hash": {"raw_data_hash": "é"},
    "hash with space": {"raw_data_hash": "a b"},
    "hash with tab": {"raw_data_hash": "a\tb"},
    "hash with DEL": {"raw_data_hash": "a\x7f"},
    "long hash": {"raw_data_hash": "a" * (P.MAX_RAW_DATA_HASH_CHARS + 1)},
    "other signer's node_id": {"node_id": "0" * 32},
}
NULLS = {
    f"null {name}": {name: None}
    for name in ("problem_type", "confidence", "timestamp_utc", "intervention_params")
}
HOSTILE = {**NUMBER_RULES, **TEXT_RULES, **NULLS}


@pytest.mark.parametrize("mutation", sorted(HOSTILE), ids=str)
def test_column_pass_never_accepts_a_row_the_row_rules_refuse(
    ident: Identity, mutation: str
) -> None:
    good = _good(ident)
    bad = dict(good, **HOSTILE[mutation])
    raws = [
        _sealed(ident, [_good(ident, 1)], good),
        _sealed(ident, [bad, bad], bad),  # its own fingerprint's key: only the rule refuses
        _sealed(ident, [_good(ident, 2)], good),
        _sealed(ident, [good, bad], good),  # the bad row second, after a good one
        _sealed(ident, [bad], bad),
        _sealed(ident, [_good(ident, 3), _good(ident, 4)], good),
    ]
    fast, slow = _both(raws, NOW)
    for i in (1, 3, 4):
        assert isinstance(slow[i], PacketError), "the reference refuses the broken row"
        assert fast[i] is None, f"column pass accepted envelope {i} the row rules refuse"
    for i in (0, 2, 5):
        assert isinstance(slow[i], P.Envelope)
        assert fast[i] is None or fast[i] == slow[i]
        if mutation in TEXT_RULES:
            # A text rule refuses only the rows holding the bad value: the rest pass.
            assert fast[i] == slow[i], f"column pass declined valid envelope {i}"
    # And open_envelopes gives exactly open_envelope's answers (error type and text too).
    for raw, got in zip(raws, P.open_envelopes(raws, now_ms=NOW), strict=True):
        try:
            want: object = P.open_envelope(raw, now_ms=NOW)
        except PacketError as exc:
            assert type(got) is type(exc) and str(got) == str(exc)
        else:
            assert got == want


# Values at or just inside a limit, or legal in a way a byte-wise or ASCII-minded check would
# get wrong: the row rules accept them, and so must the column pass (with the same envelope).
EDGE_VALID = {
    "64 two-byte characters": {"metric_name": "é" * P.MAX_NAME_CHARS},
    "inner spaces": {"intervention_type": "warm up  slowly"},
    "reserved prefix outside domain": {"problem_type": "qisd.templates"},
    "params at 256 bytes, 128 of them in two-byte characters": {
        "intervention_params": '{"k":"' + "é" * 64 + "v" * 120 + '"}'
    },
    "params spaced": {"intervention_params": ' { "a" : 1 } '},
    "params at 256 characters": {"intervention_params": '{"k":"' + "v" * 248 + '"}'},
    "hash of 64 characters": {"raw_data_hash": "~" * P.MAX_RAW_DATA_HASH_CHARS},
    "extreme numbers": {
        "metric_value": P.MAX_METRIC_ABS,
        "metric_delta": -P.MAX_METRIC_ABS,
        "confidence": 0.0,
        "outcome_decile": 10,
        "sample_count": INT32_MAX,
    },
    "other extremes": {"confidence": 1.0, "outcome_decile": 1, "sample_count": 0},
    "clock edge": {"timestamp_utc": NOW + P.MAX_FUTURE_MS},
    "epoch": {"timestamp_utc": 0},
}


@pytest.mark.parametrize("case", sorted(EDGE_VALID), ids=str)
def test_column_pass_accepts_what_the_row_rules_accept(ident: Identity, case: str) -> None:
    edge = dict(_good(ident), **EDGE_VALID[case])
    raws = [
        _sealed(ident, [_good(ident, 1)], _good(ident)),
        _sealed(ident, [edge], edge),
        _sealed(ident, [edge, dict(edge, metric_delta=0.5)], edge),
    ]
    fast, slow = _both(raws, NOW)
    assert all(isinstance(s, P.Envelope) for s in slow), slow
    assert fast == slow


def test_column_pass_checks_each_envelopes_signer_and_fingerprint(ident: Identity) -> None:
    stranger = Identity.generate()
    good = _good(ident)
    theirs = P.build_rows([BASE_ROW], stranger, now_ms=NOW)[0]
    other_path = dict(good, problem_type="something_else")
    raws = [
        _sealed(ident, [good], good),
        _sealed(stranger, [good], good),  # rows name another signer
        _sealed(stranger, [theirs], theirs),  # fine: its own signer
        _sealed(ident, [good, other_path], good),  # two fingerprints in one envelope
        _sealed(ident, [other_path], good),  # key of another fingerprint
        _sealed(ident, [good, dict(good, node_id=theirs["node_id"])], good),
    ]
    fast, slow = _both(raws, NOW)
    assert [isinstance(s, P.Envelope) for s in slow] == [True, False, True, False, False, False]
    assert fast == [slow[0], None, slow[2], None, None, None]
