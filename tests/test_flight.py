"""The embedded Arrow Flight endpoint, driven by real ``pyarrow.flight`` clients.

Each test runs a real Node (temp data directory, 127.0.0.1, port 0) with its Flight endpoint on
the node's own event-loop thread (``flight_harness.Daemon``), as the daemon does; the test's
thread is the client. Every wait has a timeout (Flight call options or a future's result).
"""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.flight as flight
import pytest
from flight_harness import WAIT, Daemon, fill_store, outcome_table

from qisd.core.packet import RESULT_SCHEMA
from qisd.errors import ConfigError
from qisd.net import datadir
from qisd.net.flight import BATCH_ROWS, MAX_PUT_ROWS, start_flight

PATH = "clinical.oncology/treatment_response_classification"
FINE = PATH + "/transformer-256d"
DESCRIPTOR = flight.FlightDescriptor.for_path(
    "clinical.oncology", "treatment_response_classification"
)
OPTIONS = flight.FlightCallOptions(timeout=WAIT)
BY_PHASE = {
    "domain": "clinical.oncology",
    "fields": ["domain", "problem_type", "model_architecture", "training_phase"],
    "levels": [2, 3],
}
"""A template with a field it does not file by: a 4-segment path is deeper than every key."""
EARLY = FINE + "/epoch_5_of_50"


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def put(
    client: flight.FlightClient,
    table: pa.Table,
    descriptor: flight.FlightDescriptor = DESCRIPTOR,
    options: flight.FlightCallOptions = OPTIONS,
) -> dict:
    """DoPut ``table``; the reply's app_metadata as JSON."""
    writer, reader = client.do_put(descriptor, table.schema, options)
    with writer:
        writer.write_table(table)
        writer.done_writing()
        reply = reader.read()
    assert reply is not None
    return json.loads(reply.to_pybytes())


def get(client: flight.FlightClient, ticket: bytes) -> pa.Table:
    return client.do_get(flight.Ticket(ticket), OPTIONS).read_all()


def error_info(exc: flight.FlightServerError) -> dict:
    return json.loads(exc.extra_info)


@pytest.fixture
def daemon(tmp_path: Path):
    with Daemon(tmp_path / "node") as d:
        yield d


@pytest.fixture
def client(daemon: Daemon):
    with flight.connect(daemon.location) as c:
        yield c


@pytest.fixture
def phase_daemon(tmp_path: Path):
    """A daemon with ``BY_PHASE`` pinned for clinical.oncology."""
    with Daemon(tmp_path / "node", flight=False) as d:
        tid = d.run(lambda: d.node.publish_template(BY_PHASE))["template_id"]
    pinned = {"clinical.oncology": tid}
    with Daemon(tmp_path / "node", init=False, pinned_templates=pinned) as d:
        yield d


# --------------------------------------------------------------------------- DoPut / DoGet


def test_put_signs_stores_and_get_returns_rows_with_provenance(daemon, client) -> None:
    table = outcome_table(3, now_ms=now_ms())
    reply = put(client, table)
    assert reply["rows"] == 3 and reply["accepted"] == 3 and reply["rejected"] == []
    assert len(reply["packet_ids"]) == 1 and reply["path"] == PATH

    got = get(client, PATH.encode())
    assert got.schema == RESULT_SCHEMA
    assert got.num_rows == 3
    # node_id is the daemon's, whatever the client sent; the signer is the node's key.
    assert set(got["node_id"].to_pylist()) == {daemon.node.identity.node_id}
    assert set(got["signer"].to_pylist()) == {daemon.node.identity.public_key.hex()}
    assert set(got["packet_id"].to_pylist()) == set(reply["packet_ids"])
    assert sorted(got["sample_count"].to_pylist()) == [0, 1, 2]
    # Stored exactly as `qisd query` sees it, at every routable level.
    assert daemon.run(lambda: daemon.node.query(FINE, local_only=True)).num_rows == 3
    assert get(client, b"local:" + FINE.encode()).num_rows == 3


def test_a_replayed_put_is_reported_as_duplicates_and_stored_once(client) -> None:
    table = outcome_table(300, now_ms=now_ms())
    first = put(client, table)
    assert len(first["packet_ids"]) == 3 and first["duplicates"] == []
    again = put(client, table)
    assert again["packet_ids"] == first["packet_ids"]
    assert again["duplicates"] == first["packet_ids"]
    assert get(client, b"local:" + PATH.encode()).num_rows == 300
    # One new row among old ones: only its packet is new.
    grown = pa.concat_tables([table.slice(0, 128), outcome_table(1, start=999, now_ms=now_ms())])
    mixed = put(client, grown)
    assert mixed["duplicates"] == [first["packet_ids"][0]] and len(mixed["packet_ids"]) == 2


def test_put_without_node_id_and_with_data_ref_commits_it(daemon, client) -> None:
    table = outcome_table(1, now_ms=now_ms()).drop_columns(["node_id"])
    table = table.append_column("data_ref", pa.array(["/site/a/data"]))
    put(client, table)
    got = get(client, b"local:" + PATH.encode())
    assert got["raw_data_hash"].to_pylist() == [daemon.node.identity.commit("/site/a/data")]


def test_put_pandas_types_are_accepted(client) -> None:
    """float64/int64 columns and a datetime timestamp, as pandas makes them."""
    when = dt.datetime.now(dt.UTC).replace(tzinfo=None)
    table = outcome_table(2, now_ms=now_ms())
    table = pa.table(
        {
            **{n: table[n] for n in table.schema.names},
            "timestamp_utc": pa.array([when, when], pa.timestamp("us")),
            "confidence": pa.array([0.5, 0.75], pa.float64()),
            "outcome_decile": pa.array([3, 9], pa.int64()),
        }
    )
    reply = put(client, table)
    assert reply["accepted"] == 2
    got = get(client, b"local:" + PATH.encode())
    millis = int(when.replace(tzinfo=dt.UTC).timestamp() * 1000)
    assert got["timestamp_utc"].to_pylist() == [millis, millis]
    assert sorted(got["outcome_decile"].to_pylist()) == [3, 9]


def test_put_names_missing_and_extra_columns(client) -> None:
    table = outcome_table(1, now_ms=now_ms()).drop_columns(["confidence", "sample_count"])
    table = table.append_column("confidance", pa.array([0.9]))
    with pytest.raises(flight.FlightServerError) as err:
        put(client, table)
    message = str(err.value)
    assert "confidence" in message and "sample_count" in message and "confidance" in message
    info = error_info(err.value)
    assert info["code"] == "schema"
    assert info["missing"] == ["confidence", "sample_count"] and info["unknown"] == ["confidance"]
    assert get(client, b"local:" + PATH.encode()).num_rows == 0


def test_put_names_a_column_of_the_wrong_type(client) -> None:
    table = outcome_table(1, now_ms=now_ms())
    table = table.set_column(9, "confidence", pa.array(["high"]))
    with pytest.raises(flight.FlightServerError, match=r"confidence is string \(must be a number"):
        put(client, table)


def test_put_bad_value_refuses_the_whole_stream(client) -> None:
    table = outcome_table(3, now_ms=now_ms(), confidence=pa.array([0.9, 1.5, 0.8], pa.float32()))
    with pytest.raises(
        flight.FlightServerError, match=r"row 1: confidence=1.5: must lie in \[0, 1\]"
    ):
        put(client, table)
    assert get(client, b"local:" + PATH.encode()).num_rows == 0


@pytest.mark.parametrize("how", ["command", "header"])
def test_partial_put_keeps_valid_rows_and_lists_rejections(client, how) -> None:
    table = outcome_table(
        4,
        now_ms=now_ms(),
        confidence=pa.array([0.9, 1.5, 0.8, 0.7], pa.float32()),
        outcome_decile=pa.array([8, 8, 8, 11], pa.int8()),
    )
    if how == "command":
        descriptor = flight.FlightDescriptor.for_command(
            json.dumps({"path": PATH, "partial": True}).encode()
        )
        options = OPTIONS
    else:
        descriptor = DESCRIPTOR
        options = flight.FlightCallOptions(timeout=WAIT, headers=[(b"x-qisd-partial", b"true")])
    reply = put(client, table, descriptor, options)
    assert reply["partial"] is True and reply["rows"] == 4 and reply["accepted"] == 2
    assert [r["row"] for r in reply["rejected"]] == [1, 3]
    assert "confidence" in reply["rejected"][0]["reason"]
    assert "outcome_decile" in reply["rejected"][1]["reason"]
    assert sorted(get(client, b"local:" + PATH.encode())["sample_count"].to_pylist()) == [0, 2]


def test_put_rows_must_belong_to_the_descriptor_path(client) -> None:
    problems = [
        "treatment_response_classification",
        "survival",
        "treatment_response_classification",
    ]
    table = outcome_table(3, now_ms=now_ms(), problem_type=problems)
    with pytest.raises(flight.FlightServerError, match="is not the descriptor path") as err:
        put(client, table)
    assert [r["row"] for r in error_info(err.value)["rejected"]] == [1]
    partial = flight.FlightDescriptor.for_command(
        json.dumps({"path": PATH, "partial": True}).encode()
    )
    reply = put(client, table, partial)
    assert reply["accepted"] == 2 and [r["row"] for r in reply["rejected"]] == [1]
    # A path deeper than the template's fields cannot be a fingerprint.
    deep = flight.FlightDescriptor.for_path(*FINE.split("/"), "epoch_5_of_50")
    with pytest.raises(flight.FlightServerError, match="template routes by 3 fields"):
        put(client, outcome_table(1, now_ms=now_ms()), deep)


def test_put_of_more_rows_than_the_limit_is_refused(client) -> None:
    table = outcome_table(MAX_PUT_ROWS + 1, now_ms=now_ms())
    with pytest.raises(flight.FlightServerError, match=f"at most {MAX_PUT_ROWS} rows") as err:
        put(client, table)
    assert error_info(err.value)["code"] == "too_large"
    assert get(client, b"local:" + PATH.encode()).num_rows == 0


@pytest.mark.parametrize(
    "descriptor",
    [
        flight.FlightDescriptor.for_path(""),
        flight.FlightDescriptor.for_path("a", "", "b"),
        flight.FlightDescriptor.for_command(b"not json"),
        flight.FlightDescriptor.for_command(b'{"path": "a/b", "partial": "yes"}'),
        flight.FlightDescriptor.for_command(b'{"path": "a/b", "mode": 1}'),
    ],
)
def test_malformed_descriptors_are_refused(client, descriptor) -> None:
    with pytest.raises(flight.FlightServerError):
        put(client, outcome_table(1, now_ms=now_ms()), descriptor)


def test_get_of_an_unknown_path_is_an_empty_stream(client) -> None:
    got = get(client, b"nobody/asked/this")
    assert got.schema == RESULT_SCHEMA and got.num_rows == 0


@pytest.mark.parametrize("ticket", [b"", b"/", b"a//b", b"\xff\xfe", b"local:"])
def test_malformed_tickets_are_refused(client, ticket) -> None:
    with pytest.raises(flight.FlightServerError, match="path|ticket"):
        get(client, ticket)


@pytest.mark.parametrize(
    "ticket, reason",
    [(b"clinical.oncology", "too coarse"), (PATH.encode() + b"/transformer-256d/x", "3 fields")],
)
def test_a_ticket_no_key_can_answer_is_refused_with_the_reason(client, ticket, reason) -> None:
    # Not an empty stream: no packet is ever filed under these paths (the default template
    # files by domain/problem_type and domain/problem_type/model_architecture only).
    with pytest.raises(flight.FlightServerError, match=reason):
        get(client, ticket)


# --------------------------------------------------------------------------- DoExchange


def test_exchange_follower_receives_new_packets_until_it_closes(daemon, client) -> None:
    writer, reader = client.do_exchange(DESCRIPTOR, OPTIONS)
    first = reader.read_chunk()
    assert first.data is None and json.loads(first.app_metadata.to_pybytes()) == {"following": PATH}
    assert PATH in daemon.node.followed()  # followed while the exchange lasts
    reply = put(client, outcome_table(2, now_ms=now_ms()))
    chunk = reader.read_chunk()
    assert chunk.data.schema == RESULT_SCHEMA
    assert chunk.data.column("packet_id").to_pylist() == reply["packet_ids"] * 2
    writer.done_writing()
    with pytest.raises(StopIteration):
        reader.read_chunk()
    writer.close()
    assert daemon.run(lambda: _followed(daemon)) == []


async def _followed(daemon: Daemon) -> list[str]:
    return daemon.node.followed()


def test_exchange_keeps_a_path_followed_before_it(daemon, client) -> None:
    list(client.do_action(flight.Action("follow", PATH.encode()), OPTIONS))
    writer, reader = client.do_exchange(DESCRIPTOR, OPTIONS)
    reader.read_chunk()
    writer.done_writing()
    with pytest.raises(StopIteration):
        reader.read_chunk()
    writer.close()
    assert daemon.run(lambda: _followed(daemon)) == [PATH]


def test_exchange_follower_of_a_deeper_path_receives_only_its_rows(phase_daemon) -> None:
    descriptor = flight.FlightDescriptor.for_path(*EARLY.split("/"))
    with flight.connect(phase_daemon.location) as client:
        writer, reader = client.do_exchange(descriptor, OPTIONS)
        first = reader.read_chunk()
        assert json.loads(first.app_metadata.to_pybytes()) == {"following": EARLY}
        # Filed under the key the follower listens on, but of another phase: not sent.
        put(client, outcome_table(1, now_ms=now_ms(), training_phase="epoch_9_of_50"))
        phases = ["epoch_5_of_50", "epoch_9_of_50"]
        reply = put(client, outcome_table(2, now_ms=now_ms(), training_phase=phases))
        chunk = reader.read_chunk()
        assert chunk.data.column("training_phase").to_pylist() == ["epoch_5_of_50"]
        assert chunk.data.column("packet_id").to_pylist() == reply["packet_ids"]
        listed = [json.loads(i.app_metadata) for i in client.list_flights(b"", OPTIONS)]
        # Counted as its packets with a row of its own phase: one, of the two under the key.
        assert {"path": EARLY, "packets": 1, "followed": True} in listed
        early_info = client.get_flight_info(descriptor, OPTIONS)
        assert json.loads(early_info.app_metadata)["packets"] == 1
        writer.done_writing()
        with pytest.raises(StopIteration):
            reader.read_chunk()
        writer.close()
    assert phase_daemon.run(lambda: _followed(phase_daemon)) == []


def test_exchange_of_a_path_no_key_answers_is_refused(daemon, client) -> None:
    descriptor = flight.FlightDescriptor.for_path("clinical.oncology")
    writer, reader = client.do_exchange(descriptor, OPTIONS)
    with pytest.raises(flight.FlightServerError, match="too coarse"):
        reader.read_chunk()
    with pytest.raises(flight.FlightServerError, match="too coarse"):
        writer.close()  # closing reports the call's status again
    assert daemon.run(lambda: _followed(daemon)) == []


# --------------------------------------------------------------------------- flights


def test_list_flights_and_flight_info_report_paths_and_counts(client) -> None:
    put(client, outcome_table(3, now_ms=now_ms()))
    list(client.do_action(flight.Action("follow", b"other.domain/problem"), OPTIONS))
    infos = {
        json.loads(i.app_metadata)["path"]: json.loads(i.app_metadata)
        for i in client.list_flights(b"", OPTIONS)
    }
    assert infos[PATH] == {"path": PATH, "packets": 1, "followed": False}
    assert infos[FINE]["packets"] == 1
    assert infos["other.domain/problem"] == {
        "path": "other.domain/problem",
        "packets": 0,
        "followed": True,
    }
    only = [json.loads(i.app_metadata)["path"] for i in client.list_flights(b"other.domain")]
    assert only == ["other.domain/problem"]

    info = client.get_flight_info(DESCRIPTOR, OPTIONS)
    assert info.schema == RESULT_SCHEMA
    assert json.loads(info.app_metadata)["packets"] == 1
    ticket = info.endpoints[0].ticket
    assert client.do_get(ticket, OPTIONS).read_all().num_rows == 3
    assert client.get_schema(DESCRIPTOR, OPTIONS).schema == RESULT_SCHEMA


# --------------------------------------------------------------------------- actions


def action(client: flight.FlightClient, kind: str, body: bytes = b"") -> dict:
    results = list(client.do_action(flight.Action(kind, body), OPTIONS))
    assert len(results) == 1
    return json.loads(results[0].body.to_pybytes())


def test_actions_status_synthesize_follow_unfollow(daemon, client) -> None:
    assert {a.type for a in client.list_actions(OPTIONS)} == {
        "synthesize",
        "status",
        "follow",
        "unfollow",
    }
    put(client, outcome_table(5, now_ms=now_ms()))
    status = action(client, "status")
    assert status["node_id"] == daemon.node.identity.node_id and status["packets"] == 2
    result = action(client, "synthesize", json.dumps({"path": PATH}).encode())
    assert result["status"] == "synthesized" and result["packets_analyzed"] >= 1
    assert result["best_intervention"] == "learning_rate_schedule"
    assert action(client, "follow", PATH.encode()) == {"followed": [PATH]}
    assert action(client, "unfollow", json.dumps({"path": PATH}).encode()) == {"followed": []}


@pytest.mark.parametrize(
    ("kind", "body", "match"),
    [
        ("launch", b"", "unknown action"),
        ("synthesize", b"", "fingerprint path"),
        ("follow", b"{not json", "not valid JSON"),
        ("follow", b"clinical.oncology", "too coarse"),
        ("unfollow", b"never/followed", "is not followed"),
    ],
)
def test_action_errors(client, kind, body, match) -> None:
    with pytest.raises(flight.FlightServerError, match=match):
        action(client, kind, body)


# --------------------------------------------------------------------------- security


def test_token_is_required_on_every_call(tmp_path: Path) -> None:
    with Daemon(tmp_path / "node", token="s3cret") as daemon:
        with flight.connect(daemon.location) as anonymous:
            calls = [
                lambda: list(anonymous.list_flights(b"", OPTIONS)),
                lambda: get(anonymous, PATH.encode()),
                lambda: put(anonymous, outcome_table(1, now_ms=now_ms())),
                lambda: action(anonymous, "status"),
                lambda: anonymous.get_flight_info(DESCRIPTOR, OPTIONS),
            ]
            for call in calls:
                with pytest.raises(flight.FlightUnauthenticatedError):
                    call()
            wrong = flight.FlightCallOptions(
                timeout=WAIT, headers=[(b"authorization", b"Bearer guess")]
            )
            with pytest.raises(flight.FlightUnauthenticatedError):
                list(anonymous.list_flights(b"", wrong))
        bearer = flight.FlightCallOptions(
            timeout=WAIT, headers=[(b"authorization", b"Bearer s3cret")]
        )
        with flight.connect(daemon.location) as authed:
            assert put(authed, outcome_table(1, now_ms=now_ms()), options=bearer)["accepted"] == 1
            # Flight's basic-auth handshake: any user name, the token as password.
            header = authed.authenticate_basic_token(b"pipeline", b"s3cret", OPTIONS)
            basic = flight.FlightCallOptions(timeout=WAIT, headers=[header])
            assert authed.do_get(flight.Ticket(PATH.encode()), basic).read_all().num_rows == 1
            with pytest.raises(flight.FlightUnauthenticatedError):
                authed.authenticate_basic_token(b"pipeline", b"guess", OPTIONS)


@pytest.mark.parametrize(
    ("uri", "kwargs", "match"),
    [
        ("grpc://0.0.0.0:0", {}, "not loopback: set a token"),
        ("grpc://[::]:0", {}, "not loopback"),
        ("grpc://example.org:8815", {}, "not loopback"),
        ("grpc+tls://127.0.0.1:0", {}, "give a certificate and key"),
        ("grpc://127.0.0.1:0", {"tls_cert": "cert.pem"}, "both a certificate and its key"),
        ("http://127.0.0.1:0", {}, "must look like grpc://"),
        ("grpc://127.0.0.1:0/x", {}, "only scheme://host:port"),
        ("grpc://127.0.0.1:0", {"tls_cert": "/nonexistent", "tls_key": "/nonexistent"}, "read"),
    ],
)
def test_start_flight_refuses_unsafe_or_malformed_configuration(
    tmp_path: Path, uri: str, kwargs: dict, match: str
) -> None:
    with Daemon(tmp_path / "node", flight=False) as daemon, pytest.raises(ConfigError, match=match):
        daemon.run(lambda: start_flight(daemon.node, uri, **kwargs))


def _self_signed(directory: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    start = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.IPAddress(__import__("ipaddress").ip_address("127.0.0.1")),
                ]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def test_tls_when_a_certificate_is_given(tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    with Daemon(tmp_path / "node", tls_cert=str(cert), tls_key=str(key)) as daemon:
        assert daemon.handle is not None and daemon.handle.uri.startswith("grpc+tls://")
        location = f"grpc+tls://127.0.0.1:{daemon.port}"
        with flight.connect(location, tls_root_certs=cert.read_bytes()) as client:
            assert put(client, outcome_table(1, now_ms=now_ms()))["accepted"] == 1
        with flight.connect(daemon.location) as plaintext, pytest.raises(flight.FlightError):
            list(plaintext.list_flights(b"", flight.FlightCallOptions(timeout=5)))


# --------------------------------------------------------------------------- a network


def test_put_on_one_node_is_found_by_get_and_followed_on_others(tmp_path: Path) -> None:
    """DoPut on A; DoGet on B finds it; a DoExchange follower on C receives A's next emit."""
    with (
        Daemon(tmp_path / "a", network=True) as a,
        Daemon(tmp_path / "b", network=True) as b,
        Daemon(tmp_path / "c", network=True) as c,
    ):
        peer = a.node.address
        for other in (b, c):
            assert other.run(lambda other=other: other.node.dht.bootstrap([peer])) == 1
        if True:
            with (
                flight.connect(a.location) as client_a,
                flight.connect(b.location) as client_b,
                flight.connect(c.location) as client_c,
            ):
                reply = put(client_a, outcome_table(2, now_ms=now_ms()))
                found = get(client_b, PATH.encode())
                assert set(found["packet_id"].to_pylist()) == set(reply["packet_ids"])
                assert set(found["node_id"].to_pylist()) == {a.node.identity.node_id}
                # Fetched rows are kept: B now holds them locally too.
                assert get(client_b, b"local:" + PATH.encode()).num_rows == 2

                writer, reader = client_c.do_exchange(DESCRIPTOR, OPTIONS)
                assert json.loads(reader.read_chunk().app_metadata.to_pybytes())["following"]
                emitted = a.run(
                    lambda: a.node.emit(
                        [dict(outcome_table(1, now_ms=now_ms(), sample_count=99).to_pylist()[0])]
                    )
                )
                chunk = reader.read_chunk()
                assert chunk.data.column("packet_id").to_pylist() == emitted.packet_ids
                assert chunk.data.column("sample_count").to_pylist() == [99]
                writer.done_writing()
                writer.close()


# --------------------------------------------------------------------------- memory


def test_a_million_stored_rows_stream_with_bounded_memory(tmp_path: Path) -> None:
    """DoGet of 1,000,000 stored rows: peak RSS of the daemon process grows by less than the
    size of the rows as one Arrow table (what any full materialisation needs)."""
    rows = 1_000_000
    data_dir = tmp_path / "node"
    datadir.init_identity(data_dir)
    fill_store(data_dir, rows, now_ms=now_ms())
    harness = Path(__file__).with_name("flight_harness.py")
    proc = subprocess.Popen(
        [sys.executable, str(harness), str(data_dir)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        ready = json.loads(proc.stdout.readline())
        received = 0
        table_bytes = 0
        largest = 0
        with flight.connect(f"grpc://127.0.0.1:{ready['port']}") as client:
            options = flight.FlightCallOptions(timeout=120)
            for ticket in (PATH, "local:" + PATH):
                for chunk in client.do_get(flight.Ticket(ticket.encode()), options):
                    received += chunk.data.num_rows
                    table_bytes += chunk.data.nbytes if ticket == PATH else 0
                    largest = max(largest, chunk.data.num_rows)
        proc.stdin.write("peak\n")
        proc.stdin.flush()
        peak = json.loads(proc.stdout.readline())
    finally:
        proc.stdin.close()
        proc.wait(WAIT)
    assert received == 2 * rows
    assert largest <= BATCH_ROWS
    grown = (peak["rss_kb"] - ready["rss_kb"]) * 1024
    assert table_bytes > 300 * 2**20  # the rows as one table: ~340 MB
    assert grown < table_bytes, (grown >> 20, table_bytes >> 20)
