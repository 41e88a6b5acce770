"""The emit side's column-wise pass against the row-by-row rules it shortcuts.

An Arrow table handed to the daemon (Flight DoPut, ``emit_table``, ``emit --from x.arrow``)
is validated by ``build_rows_from_columns``, which returns the rows or None; on None the
caller runs ``build_rows(rows_from_arrow(table))``, the reference, which names the first bad
row. These tests hold the pass to: never return rows for a table the reference refuses, and
return exactly the reference's rows for tables it accepts (so a pass that declined everything,
or normalised a value differently, fails here).
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa
import pytest
from helpers import BASE_ROW, NOW
from hypothesis import given, settings
from hypothesis import strategies as st
from test_packet_decode import EDGE_VALID, NUMBER_RULES, TEXT_RULES

from qisd.core import packet as P
from qisd.core.crypto import Identity
from qisd.errors import PacketError

# What a caller writes: params as JSON text (Arrow has no dict column here), no node_id.
CALLER_ROW = dict(BASE_ROW, intervention_params=json.dumps(BASE_ROW["intervention_params"]))


@pytest.fixture(scope="module")
def ident() -> Identity:
    return Identity.generate()


def _row(i: int, **overrides: Any) -> dict[str, Any]:
    return {**CALLER_ROW, "metric_delta": 0.001 * i, **overrides}


def _table_of(rows: list[dict[str, Any]]) -> pa.Table:
    """Rows as a caller's table: every key any row has is a column (nulls where absent)."""
    names = list(dict.fromkeys(k for r in rows for k in r))
    return pa.table({n: [r.get(n) for r in rows] for n in names})


def _exactly(rows: object) -> object:
    """Rows compared to the letter: key order, value types and the sign of zero count
    (``==`` alone takes 1 for 1.0 and -0.0 for 0.0)."""
    assert isinstance(rows, list)
    return [[(k, type(v).__name__, repr(v)) for k, v in r.items()] for r in rows]


def _both(table: pa.Table, ident: Identity) -> tuple[object, object]:
    """(column-wise answer, reference answer) for the same table."""
    fast = P.build_rows_from_columns(table, ident, now_ms=NOW)
    try:
        slow: object = P.build_rows(P.rows_from_arrow(table), ident, now_ms=NOW)
    except PacketError as exc:
        slow = exc
    return fast, slow


# The decode tests' rules, less the one a local emit does not have (node_id is replaced).
REFUSED = {
    **NUMBER_RULES,
    **{k: v for k, v in TEXT_RULES.items() if "node_id" not in v},
    "samples past int32": {"sample_count": 2**31},
    "timestamp before 1970": {"timestamp_utc": -5},
    "null confidence": {"confidence": None},
    "null metric_value": {"metric_value": None},
    "null decile": {"outcome_decile": None},
    "null domain": {"domain": None},
    "null metric_name": {"metric_name": None},
}


@pytest.mark.parametrize("mutation", sorted(REFUSED), ids=str)
def test_column_pass_never_returns_rows_the_row_rules_refuse(
    ident: Identity, mutation: str
) -> None:
    for rows in (
        [_row(1), _row(2, **REFUSED[mutation]), _row(3)],
        [_row(1, **REFUSED[mutation])],
    ):
        fast, slow = _both(_table_of(rows), ident)
        assert isinstance(slow, PacketError), "the reference refuses the broken row"
        assert fast is None, f"column pass returned rows the row rules refuse ({mutation})"


CALLER_EDGES = {
    **EDGE_VALID,
    "params re-spaced to compact JSON": {"intervention_params": '{ "b" : [1, 2],  "a": "x" }'},
    "null params": {"intervention_params": None},
    "null optional names": {"model_architecture": None, "training_phase": None},
    "null samples, hash and timestamp": {
        "sample_count": None,
        "raw_data_hash": None,
        "timestamp_utc": None,
    },
    "a node_id of the caller's": {"node_id": "not-mine"},
    "delta not exact in float32": {"metric_delta": 0.1, "metric_value": 1 / 3},
}


@pytest.mark.parametrize("case", sorted(CALLER_EDGES), ids=str)
def test_column_pass_returns_the_row_rules_rows(ident: Identity, case: str) -> None:
    rows = [_row(1), _row(2, **CALLER_EDGES[case]), _row(3)]
    fast, slow = _both(_table_of(rows), ident)
    assert isinstance(slow, list), slow
    assert _exactly(fast) == _exactly(slow)


def _table(columns: dict[str, pa.Array]) -> pa.Table:
    return pa.table(columns)


def test_column_pass_reads_the_column_kinds_pipelines_send(ident: Identity) -> None:
    """float32 metrics, small and unsigned integers, large strings, whole-number metrics,
    missing optional columns and a data_ref column: all the reference's rows, no fallback."""
    n = 4
    table = _table(
        {
            "domain": pa.array([CALLER_ROW["domain"]] * n, pa.large_string()),
            "problem_type": pa.array([CALLER_ROW["problem_type"]] * n),
            "metric_name": pa.array(["val_auc"] * n),
            "metric_delta": pa.array([0.1, -0.2, 0.3, 0.25], pa.float32()),
            "metric_value": pa.array([1, 2, 3, 4], pa.int16()),
            "confidence": pa.array([0.5, 0.9, 1.0, 0.0], pa.float64()),
            "intervention_type": pa.array(["lr"] * n),
            "outcome_decile": pa.array([1, 5, 10, 3], pa.uint8()),
            "sample_count": pa.array([None, 7, 0, 2**31 - 1], pa.int64()),
            "data_ref": pa.array(["s3://bucket/a", None, "", "s3://bucket/a"]),
            "raw_data_hash": pa.array(["abc", "def", None, "ghi"]),
        }
    )
    fast, slow = _both(table, ident)
    assert isinstance(slow, list)
    assert _exactly(fast) == _exactly(slow)
    assert fast[0]["raw_data_hash"] == ident.commit("s3://bucket/a") == fast[3]["raw_data_hash"]
    assert fast[1]["raw_data_hash"] == "def" and fast[2]["raw_data_hash"] == ""
    assert fast[0]["model_architecture"] == "unspecified"
    assert fast[0]["timestamp_utc"] == NOW and fast[0]["sample_count"] == 0


@pytest.mark.parametrize(
    ("name", "column", "reference_reads_it"),
    [
        ("timestamp_utc", pa.array([float(NOW), float(NOW)]), True),
        ("outcome_decile", pa.array(["8", "9"]), True),
        ("domain", pa.array(["clinical.oncology"] * 2).dictionary_encode(), True),
        ("metric_value", pa.array([True, False]), False),  # booleans are not numbers here
    ],
    ids=["whole floats as timestamps", "numbers as text", "dictionary text", "bool metric"],
)
def test_column_pass_leaves_other_column_kinds_to_the_row_rules(
    ident: Identity, name: str, column: pa.Array, reference_reads_it: bool
) -> None:
    table = _table_of([_row(1), _row(2)])
    if name in table.schema.names:
        table = table.set_column(table.schema.get_field_index(name), name, column)
    else:
        table = table.append_column(name, column)
    fast, slow = _both(table, ident)
    assert fast is None
    assert isinstance(slow, list) == reference_reads_it


def test_column_pass_refuses_unknown_columns_by_name(ident: Identity) -> None:
    table = _table_of([_row(1, metric_nmae="typo")])
    with pytest.raises(PacketError, match="metric_nmae"):
        P.build_rows_from_columns(table, ident, now_ms=NOW)


def test_column_pass_of_no_rows_is_no_rows(ident: Identity) -> None:
    assert P.build_rows_from_columns(_table_of([_row(1)]).slice(0, 0), ident, now_ms=NOW) == []


@pytest.mark.parametrize("n", [1, 3, 4, 9])
def test_build_table_rows_gives_the_row_rules_answer_at_any_size(ident: Identity, n: int) -> None:
    good = _table_of([_row(i) for i in range(n)])
    assert P.build_table_rows(good, ident, now_ms=NOW) == (
        P.build_rows(P.rows_from_arrow(good), ident, now_ms=NOW),
        [],
    )
    rows = [_row(i) for i in range(n)]
    rows[n // 2] = _row(n // 2, confidence=1.5)
    bad = _table_of(rows)
    with pytest.raises(PacketError, match=rf"row {n // 2}\b.*confidence"):
        P.build_table_rows(bad, ident, now_ms=NOW)
    kept, rejected = P.build_table_rows(bad, ident, now_ms=NOW, partial=True)
    assert len(kept) == n - 1
    assert [i for i, _ in rejected] == [n // 2] and "confidence" in rejected[0][1]


# Values each column may take in a generated table: valid ones, values at and past each limit,
# and the kinds only the row rules read; None is a null.
_TEXT_VALUES = [
    "clinical.oncology",
    "qisd.templates",
    "a/b",
    " padded",
    "",
    "é" * P.MAX_NAME_CHARS,
    "m" * (P.MAX_NAME_CHARS + 1),
    "x\u3000",
    None,
]
_COLUMN_VALUES: dict[str, list[Any]] = {
    "domain": _TEXT_VALUES,
    "problem_type": _TEXT_VALUES,
    "model_architecture": _TEXT_VALUES,
    "training_phase": _TEXT_VALUES,
    "metric_name": _TEXT_VALUES,
    "intervention_type": _TEXT_VALUES,
    "metric_delta": [0.1, -0.2, 1e9, -1e9, 1e9 + 1, float("nan"), float("inf"), 3, None],
    "metric_value": [0.847, 0.0, -0.0, 1 / 3, 2e9, float("-inf"), 7, None],
    "confidence": [0.0, 1.0, 0.5, 1.0000001, -0.0, -1e-9, float("nan"), 1, None],
    "intervention_params": ['{"a": 1}', "{}", "[1]", '{"a":NaN}', "{x", " {} ", None],
    "outcome_decile": [1, 10, 0, 11, 5, None],
    "sample_count": [0, 2**31 - 1, 2**31, -1, None],
    "timestamp_utc": [NOW, 0, -1, NOW + P.MAX_FUTURE_MS, NOW + P.MAX_FUTURE_MS + 1, None],
    "raw_data_hash": ["abc", "", "a b", "é", "~" * 64, "a" * 65, None],
    "data_ref": ["/site/a", "", None],
    "node_id": ["anything", None],
}


@settings(max_examples=600, deadline=None)
@given(data=st.data())
def test_column_pass_on_generated_tables_matches_the_row_rules(data: Any) -> None:
    """Random tables of 1-6 rows over random column subsets: the pass returns exactly the
    reference's rows, or None where the reference refuses (or reads a kind it does not)."""
    ident = _IDENT
    required = ["domain", "problem_type", "metric_name", "metric_delta", "metric_value"]
    required += ["confidence", "intervention_type", "outcome_decile"]
    optional = sorted(set(_COLUMN_VALUES) - set(required))
    names = required + data.draw(st.lists(st.sampled_from(optional), unique=True))
    n = data.draw(st.integers(1, 6))
    good = dict(CALLER_ROW, timestamp_utc=NOW, raw_data_hash="abc", data_ref="/site/a")
    good["node_id"] = "anything"
    # One or two columns drawn from the hostile values, the rest valid: one rule decides.
    drawn = data.draw(st.lists(st.sampled_from(names), min_size=1, max_size=2, unique=True))
    columns = {name: [good[name]] * n for name in names}
    for name in drawn:
        columns[name] = data.draw(
            st.lists(st.sampled_from(_COLUMN_VALUES[name]), min_size=n, max_size=n)
        )
    try:
        table = pa.table(columns)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return  # mixed Python kinds Arrow cannot hold in one column
    fast, slow = _both(table, ident)
    if isinstance(slow, PacketError):
        assert fast is None, (columns, slow)
    elif fast is not None:
        assert _exactly(fast) == _exactly(slow), columns


_IDENT = Identity.generate()


def test_column_pass_holds_rows_to_the_packet_lifetime(ident: Identity) -> None:
    day = 86_400_000
    rows = [_row(i, timestamp_utc=NOW - day + 1) for i in range(5)]
    fresh = _table_of(rows)
    want = P.build_rows(P.rows_from_arrow(fresh), ident, now_ms=NOW, lifetime_ms=day)
    assert _exactly(P.build_rows_from_columns(fresh, ident, now_ms=NOW, lifetime_ms=day)) == (
        _exactly(want)
    )
    rows[3] = _row(3, timestamp_utc=NOW - day)  # expires as it is stored
    stale = _table_of(rows)
    assert P.build_rows_from_columns(stale, ident, now_ms=NOW, lifetime_ms=day) is None
    kept, rejected = P.build_table_rows(stale, ident, now_ms=NOW, partial=True, lifetime_ms=day)
    assert len(kept) == 4 and [i for i, _ in rejected] == [3]
    assert "older than the packet lifetime (86400 s)" in rejected[0][1]
