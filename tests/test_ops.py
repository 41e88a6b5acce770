"""Operating qisd: metrics, logs and the rough edges a new user hits, through real daemons.

Two ``qisd start`` processes on 127.0.0.1 (B joins through A, both serve ``--metrics`` on a
free port, A also Arrow Flight): the Prometheus text is parsed with ``prometheus_client``'s
own parser and every family the README documents must be there and move as the daemons work.
Logs are read as the daemons write them; waits are on log lines with deadlines, never sleeps.
"""

from __future__ import annotations

import json
import os
import pty
import re
import select
import shlex
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import lone_daemon_argv
from test_cli import FLAGS, PATH, QISD, Daemon, one_line_error, qisd

from qisd.client import Client

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
METRICS_AT = re.compile(r".*metrics at (http://\S+/)metrics")
# Summaries every second; the node's own debug lines (election passes) to wait on.
ENV = {
    "QISD_LOG_SUMMARY_SECONDS": "1",
    "QISD_LOG_LEVEL": "info,qisd.net.node=debug",
    "QISD_ELECTION_SECONDS": "3600",
}


def metrics_url(d: Daemon) -> str:
    for line in d.lines:
        match = METRICS_AT.match(line)
        if match:
            return match[1]
    raise AssertionError(f"no metrics line: {d.lines[-10:]}")


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes, dict[str, str]]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status, reply.read(), dict(reply.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), dict(exc.headers)


def scrape(d: Daemon) -> dict[str, Any]:
    """Families by name, parsed by prometheus_client's own parser."""
    from prometheus_client.parser import text_string_to_metric_families

    status, body, _ = get(metrics_url(d) + "metrics")
    assert status == 200
    return {f.name: f for f in text_string_to_metric_families(body.decode())}


def value(families: dict[str, Any], name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` (a sample name) whose labels include ``labels``."""
    family = name
    for suffix in ("_total", "_count", "_sum", "_bucket", "_info"):
        if name.endswith(suffix) and name[: -len(suffix)] in families:
            family = name[: -len(suffix)]
    assert family in families, f"{family} not served"
    return sum(
        s.value
        for s in families[family].samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


def documented_families() -> list[str]:
    """The family names of the README's metrics table, as the parser names them."""
    start = README.index("### Metrics, logs and the dashboard")
    section = README[start : README.index("\n### ", start + 10)]
    names: list[str] = []
    for line in section.splitlines():
        if line.startswith("| `qisd_"):
            names += re.findall(r"`(qisd_[a-z_]+)`", line.split("|")[1])
    # Text exposition: a counter's family drops _total; info families are gauges named _info.
    return [name.removesuffix("_total") for name in names]


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Daemon, Daemon]]:
    root = tmp_path_factory.mktemp("ops")
    a = Daemon(root / "a", "--metrics", "127.0.0.1:0", "--flight", "grpc://127.0.0.1:0", env=ENV)
    try:
        b = Daemon(root / "b", "--bootstrap", a.address, "--metrics", "127.0.0.1:0", env=ENV)
    except BaseException:
        a.terminate()
        raise
    try:
        yield a, b
    finally:
        codes = [b.terminate(), a.terminate()]
        assert codes == [0, 0], codes


# --------------------------------------------------------------------------- metrics


def test_every_documented_family_is_served_and_moves_as_the_daemons_work(
    pair: tuple[Daemon, Daemon],
) -> None:
    import pyarrow.flight as flight

    a, b = pair
    documented = documented_families()
    assert len(documented) > 40
    before_a, before_b = scrape(a), scrape(b)
    for families in (before_a, before_b):
        missing = [name for name in documented if name not in families]
        assert not missing, f"documented but not served: {missing}"
        assert any(name.startswith("process_") for name in families)

    followed = b.cli("follow", PATH)
    assert followed.returncode == 0, followed.stderr
    done = a.cli("emit", *FLAGS, "--wait=1", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["replicas"]
    assert b.cli("query", PATH, "--json").returncode == 0
    # The election loop re-ran B's synthesis of the path once A's packet was stored there.
    b.wait_for_line(re.compile(rf".*election: {re.escape(PATH)} re-synthesized .* of 1 "), 30)
    uri = next(m[1] for line in a.lines if (m := re.search(r"Flight endpoint at (\S+)", line)))
    client = flight.connect(uri)
    list(client.do_action(flight.Action("status", b"")))
    list(client.list_flights())  # started after the first call's reply: that call has ended
    client.close()

    after_a, after_b = scrape(a), scrape(b)
    moved_a = {
        "qisd_emits_total": 1,
        "qisd_emit_commits_total": 1,
        "qisd_emitted_rows_total": 1,
        "qisd_emitted_packets_total": 1,
        "qisd_emit_commit_seconds_count": 1,
    }
    for name, delta in moved_a.items():
        assert value(after_a, name) - value(before_a, name) == delta, name
    assert (
        value(after_a, "qisd_store_envelopes", origin="local")
        - value(before_a, "qisd_store_envelopes", origin="local")
        == 2
    )  # one envelope per routable level
    assert value(after_a, "qisd_dht_rpcs_sent_total", rpc="store_packets") > value(
        before_a, "qisd_dht_rpcs_sent_total", rpc="store_packets"
    )
    assert value(after_a, "qisd_dht_rpc_round_trip_seconds_count", outcome="reply") > value(
        before_a, "qisd_dht_rpc_round_trip_seconds_count", outcome="reply"
    )
    assert value(after_a, "qisd_dht_lookup_seconds_count", kind="nodes") > value(
        before_a, "qisd_dht_lookup_seconds_count", kind="nodes"
    )
    assert value(after_a, "qisd_flight_calls_total", method="do_action", outcome="ok") == 1
    for traffic in ("qisd_dht_sent_bytes_total", "qisd_dht_received_bytes_total"):
        assert value(after_a, traffic) > value(before_a, traffic), traffic
    assert value(after_a, "qisd_routing_table_contacts") >= 1
    assert value(after_a, "qisd_peers", state="responsive") >= 1
    assert value(after_a, "qisd_node_info", node_id=a.node_id) == 1

    assert (
        value(after_b, "qisd_received_envelopes_total", via="stored_by_peers")
        - value(before_b, "qisd_received_envelopes_total", via="stored_by_peers")
        >= 2
    )
    assert value(after_b, "qisd_dht_stored_envelopes_total") >= 2
    assert value(after_b, "qisd_dht_rpcs_received_total", rpc="store_packets") >= 1
    assert value(after_b, "qisd_store_envelopes", origin="remote") >= 2
    assert value(after_b, "qisd_followed_paths") == 1
    assert value(after_b, "qisd_dht_followed_keys") >= 1
    assert value(after_b, "qisd_election_runs_total") > value(before_b, "qisd_election_runs_total")
    assert value(after_b, "qisd_fetch_seconds_count") > value(before_b, "qisd_fetch_seconds_count")
    assert value(after_b, "qisd_dht_lookup_seconds_count") > value(
        after_b, "qisd_dht_lookup_seconds_count", kind="nodes"
    )  # the query's lookup of the key's replicas (or packets)
    # Low cardinality: no label value is a peer id, a node id other than its own, or a key.
    for families in (after_a, after_b):
        for family in families.values():
            for sample in family.samples:
                for label, text in sample.labels.items():
                    if label == "node_id":
                        continue
                    assert not re.fullmatch(r"[0-9a-f]{32,}", text), (sample.name, label, text)
                    assert not re.search(r"\d+\.\d+\.\d+\.\d+|:\d{2,5}$", text), (
                        sample.name,
                        label,
                        text,
                    )  # nor a peer address
    assert b.cli("unfollow", PATH).returncode == 0


def test_the_other_families_move_with_what_moves_them(
    pair: tuple[Daemon, Daemon], tmp_path: Path
) -> None:
    """What the first test does not move: store growth, a peer's fetches, a watch stream,
    refused local work (a bad emit, a partial emit's bad row, the same rows again, an unknown
    control operation), a hostile peer's datagrams (undecodable, a request with bad
    arguments) and an outcome Darwinism scores, each family read before and after from
    /metrics. A handler bug stays 0."""
    import pyarrow as pa
    from test_cli import watching

    from qisd.errors import QisdError
    from qisd.net import wire

    a, b = pair
    before_a, before_b = scrape(a), scrape(b)
    now = int(time.time() * 1000)
    rows = [dict(r, timestamp_utc=now) for r in _rows(3, "moved")]  # the same packets again
    with Client(a.data_dir) as client:
        client.emit(rows, wait=1)
        again = client.emit(rows)  # the same rows: the same packets, not stored again
        assert len(again["duplicates"]) == 3
        bad = dict(rows[0], confidence=7.0)
        with pytest.raises(QisdError):
            client.emit([bad])
        good = dict(rows[0], problem_type="moved_partial")
        kept = client.emit_table(pa.Table.from_pylist([good, bad]), partial=True)
        assert len(kept["rejected"]) == 1
        with pytest.raises(QisdError):
            client.call("no_such_operation")
    with watching(PATH, b.data_dir):
        assert value(scrape(b), "qisd_watch_streams") == 1
    assert b.cli("query", f"{FLAG_ROW['domain']}/moved_0", "--json").returncode == 0
    # Darwinism: B is recommended warmup on a path two sites reported it for, then B reports
    # the outcome of doing it, which scores the templates.
    scored = dict(FLAG_ROW, problem_type="scored", intervention_type="warmup")
    for d, delta in ((a, 0.03), (b, 0.02)):
        with Client(d.data_dir) as client:
            client.emit([dict(scored, metric_delta=delta)], wait=1)
    with Client(b.data_dir) as client:
        recommended = client.call("synthesize", {"path": "clinical.oncology/scored"})
        assert recommended["best_intervention"] == "warmup"
        client.emit([dict(scored, metric_delta=0.025, sample_count=7)])
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as peer:
        peer.sendto(b"\x07" + bytes(40), (b.host, b.port))  # no such datagram kind
        peer.sendto(wire.encode_request(os.urandom(20), "ping", []), (b.host, b.port))
    after_a = scrape(a)
    after_b = _scrape_until(
        b,
        "the watch closed, the datagrams counted, the outcome scored",
        lambda f: (
            value(f, "qisd_watch_streams") == 0
            and value(f, "qisd_dht_rejected_total", reason="bad_args")
            > value(before_b, "qisd_dht_rejected_total", reason="bad_args")
            and value(f, "qisd_darwin_observations_total")
            > value(before_b, "qisd_darwin_observations_total")
        ),
        30,
    )

    def moved(after: dict[str, Any], before: dict[str, Any], name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved(after_a, before_a, "qisd_uptime_seconds") > 0
    assert moved(after_a, before_a, "qisd_store_keys") == 10  # 3 + 1 + 1 packets, 2 keys each
    assert moved(after_a, before_a, "qisd_store_envelopes", origin="local") == 10
    assert moved(after_a, before_a, "qisd_store_bytes", origin="local") > 10 * 100
    assert moved(after_a, before_a, "qisd_emit_duplicate_packets_total") == 3
    assert moved(after_a, before_a, "qisd_emit_rejected_total", what="emit") == 1
    assert moved(after_a, before_a, "qisd_emit_rejected_total", what="row") == 1
    assert moved(after_a, before_a, "qisd_control_rejected_requests_total") == 1
    assert moved(after_b, before_b, "qisd_dht_fetches_total") >= 1
    assert moved(after_b, before_b, "qisd_dht_fetch_messages_total") >= 1
    assert moved(after_b, before_b, "qisd_dht_malformed_total", reason="unknown_kind") == 1
    for families in (after_a, after_b):
        assert value(families, "qisd_dht_handler_errors_total") == 0
    # INFO summarises the hostile datagrams by reason, in one line a period.
    b.wait_for_line(re.compile(r".*INFO qisd.activity: .*rejected \d+ \([^)]*bad_args"), 30)
    malformed = re.compile(r".*INFO qisd.activity: .*malformed \d+ \([^)]*unknown_kind")
    if not any(malformed.match(line) for line in b.lines):  # the period after, maybe
        b.wait_for_line(malformed, 30)


def test_openmetrics_on_request_and_only_get(pair: tuple[Daemon, Daemon]) -> None:
    a, _ = pair
    status, body, headers = get(
        metrics_url(a) + "metrics", {"Accept": "application/openmetrics-text; version=1.0.0"}
    )
    assert status == 200 and headers["Content-Type"].startswith("application/openmetrics-text")
    assert body.rstrip().endswith(b"# EOF")
    with socket.create_connection((a.host, int(metrics_url(a).rsplit(":", 1)[1].strip("/")))) as s:
        s.sendall(b"POST /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.1 405")
    # A name other than loopback in Host (DNS rebinding) gets nothing without a token.
    status, _, _ = get(metrics_url(a) + "metrics", {"Host": "attacker.example:80"})
    assert status == 401


def test_metrics_are_off_unless_asked_and_asked_by_config_or_environment(tmp_path: Path) -> None:
    """No metrics server without --metrics, ``metrics =`` in the config file or QISD_METRICS;
    either of the last two serves it as the flag does."""
    config = tmp_path / "qisd.toml"
    config.write_text('metrics = "127.0.0.1:0"\n')
    plain = Daemon(tmp_path / "plain")
    by_config = Daemon(tmp_path / "config", "--config", str(config))
    by_env = Daemon(tmp_path / "env", env={"QISD_METRICS": "127.0.0.1:0"})
    try:
        assert not any(METRICS_AT.match(line) for line in plain.lines)
        for d in (by_config, by_env):
            assert value(scrape(d), "qisd_node_info", node_id=d.node_id) == 1
    finally:
        codes = [d.terminate() for d in (plain, by_config, by_env)]
        assert codes == [0, 0, 0], codes


def test_a_token_guards_the_metrics_server_and_off_loopback_needs_one(tmp_path: Path) -> None:
    qisd("init", "--data-dir", str(tmp_path / "t"))
    start = ["start", "--data-dir", str(tmp_path / "t"), "--port", "0", "--bootstrap-file"]
    refused = qisd(*start, os.devnull, "--metrics", "0.0.0.0:0")
    one_line_error(refused, 2, "metrics_token", "not loopback")
    d = Daemon(tmp_path / "t", "--metrics", "127.0.0.1:0", "--metrics-token", "s3cret")
    try:
        url = metrics_url(d)
        assert get(url + "metrics")[0] == 401
        assert get(url + "metrics", {"Authorization": "Bearer wrong"})[0] == 401
        assert get(url + "metrics", {"Authorization": "Bearer s3cret"})[0] == 200
        assert get(url + "api/dashboard?token=s3cret")[0] == 200
    finally:
        assert d.terminate() == 0


# --------------------------------------------------------------------------- logs


class JsonDaemon(Daemon):
    """A daemon started with ``--log-format json``: lines are matched on their message."""

    raw: list[str]

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        self.raw = []
        for data in self.proc.stderr:
            line = data.decode(errors="replace").rstrip("\n")
            self.raw.append(line)
            try:
                message = json.loads(line)["message"]
            except (ValueError, KeyError, TypeError):
                message = line
            self.lines.append(message)
            self._queue.put(message)
        self._queue.put(None)


def test_json_logs_follow_one_emit_and_one_fetch_without_library_noise(tmp_path: Path) -> None:
    d = JsonDaemon(tmp_path / "j", "--log-format", "json", "--log-level", "debug", env=ENV)
    try:
        pid = d.cli("emit", *FLAGS).stdout.strip()
        assert re.fullmatch(r"[0-9a-f]{32}", pid)
        d.wait_for_line(re.compile(r"published 2 envelopes under 2 keys"), 30)
        assert d.cli("query", PATH, "--json").returncode == 0
        d.wait_for_line(re.compile(r"fetch of key [0-9a-f]{40}: \d+ envelopes"), 30)
        assert d.cli("status").returncode == 0
        d.wait_for_line(re.compile(r"control: status answered"), 30)
    finally:
        assert d.terminate() == 0
    records = [json.loads(line) for line in d.raw]  # every line is one JSON object
    assert {"ts", "level", "logger", "message"} <= set(records[0])
    ready = [r for r in records if r.get("event") == "ready"]
    assert len(ready) == 1 and ready[0]["node_id"] == d.node_id and ready[0]["port"] == d.port
    debug = [r["message"] for r in records if r["level"] == "debug"]
    assert any(m.startswith("control: emit request") for m in debug)
    assert any(m.startswith("emit: 1 rows signed into 1 packets") and pid in m for m in debug)
    assert any(m.startswith("query " + PATH) for m in debug)
    assert not [r for r in records if r["logger"].startswith(("kademlia", "rpcudp"))]


def test_info_says_when_peers_join_and_summarises_what_arrived(
    pair: tuple[Daemon, Daemon],
) -> None:
    a, b = pair
    a.wait_for_line(re.compile(r".*joined the network: \d+ peers"), 30)
    done = a.cli("emit", *FLAGS, "--intervention=summary_test", "--wait=1")
    assert done.returncode == 0, done.stderr
    line = b.wait_for_line(
        re.compile(r".*INFO qisd.activity: in the last \d+ s: received (\d+) envelopes"), 30
    )
    assert int(line[1]) >= 2
    assert "stored_by_peers" in line.string


# --------------------------------------------------------------------------- rough edges


def test_status_counts_what_peers_sent_and_emit_requests_not_chunks(
    pair: tuple[Daemon, Daemon], tmp_path: Path
) -> None:
    a, b = pair
    with Client(b.data_dir) as client:
        before = client.status()
    assert a.cli("emit", *FLAGS, "--intervention=counted", "--wait=1").returncode == 0
    with Client(b.data_dir) as client:
        after = client.status()
    assert after["counters"]["received_envelopes"] - before["counters"]["received_envelopes"] >= 2
    assert after["received"]["stored_by_peers"] > before["received"]["stored_by_peers"]
    human = b.cli("status").stdout
    assert re.search(r"received  \d+ envelopes from peers \(stored here by peers \d+", human)

    rows = [dict(json.loads(json.dumps(FLAG_ROW)), problem_type=f"chunked_{i}") for i in range(30)]
    source = tmp_path / "rows.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with Client(a.data_dir) as client:
        before = client.status()["counters"]
    done = a.cli("emit", "--from", str(source), "--chunk-rows", "7")
    assert done.returncode == 0, done.stderr
    with Client(a.data_dir) as client:
        counters = client.status()["counters"]
    assert counters["emits"] - before["emits"] == 1  # one command, five commits
    assert counters["emit_commits"] - before["emit_commits"] == 5
    assert counters["packets_emitted"] - before["packets_emitted"] == 30


FLAG_ROW = {
    "domain": "clinical.oncology",
    "problem_type": "treatment_response_classification",
    "metric_name": "val_auc",
    "metric_value": 0.847,
    "metric_delta": 0.023,
    "confidence": 0.91,
    "intervention_type": "dedupe",
    "outcome_decile": 8,
}


def test_duplicates_are_reported_as_duplicates_with_their_count(
    pair: tuple[Daemon, Daemon], tmp_path: Path
) -> None:
    a, _ = pair
    now = int(time.time() * 1000)
    # Ten rows of one path make one packet; five copies of them make the same packet again.
    rows = [dict(FLAG_ROW, metric_delta=0.001 * i, timestamp_utc=now) for i in range(10)]
    source = tmp_path / "copies.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows * 5))
    with Client(a.data_dir) as client:
        stored_before = client.status()["packets"]
    done = a.cli("emit", "--from", str(source), "--chunk-rows", "10")
    assert done.returncode == 0, done.stderr
    (pid,) = done.stdout.split()  # each id once
    assert done.stderr.strip() == (
        "qisd: committed 1 new packet (50 rows); 4 duplicate packets (the same rows again) "
        "were not stored again"
    )
    again = a.cli("emit", "--from", str(source), "--chunk-rows", "10", "--json")
    result = json.loads(again.stdout)
    assert result["packet_ids"] == [pid] and result["duplicates"] == [pid]
    assert result["duplicate_count"] == 5
    with Client(a.data_dir) as client:
        status = client.status()
    assert status["packets"] == stored_before + 2  # one packet, two routable levels
    assert status["counters"]["duplicate_packets"] >= 9


def test_the_progress_bar_and_the_ids_never_share_a_line(
    pair: tuple[Daemon, Daemon], tmp_path: Path
) -> None:
    a, _ = pair
    rows = [dict(FLAG_ROW, problem_type=f"bar_{i}") for i in range(40)]
    source = tmp_path / "bar.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    primary, secondary = pty.openpty()  # stdout and stderr are one terminal, as in a shell
    proc = subprocess.Popen(
        [*QISD, "emit", "--from", str(source), "--chunk-rows", "10", "--data-dir", str(a.data_dir)],
        stdin=subprocess.DEVNULL,
        stdout=secondary,
        stderr=secondary,
    )
    os.close(secondary)
    out = b""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ready, _, _ = select.select([primary], [], [], deadline - time.monotonic())
        if not ready:
            break
        try:
            chunk = os.read(primary, 65536)
        except OSError:  # the terminal closed: the command has exited
            break
        if not chunk:
            break
        out += chunk
    os.close(primary)
    assert proc.wait(30) == 0
    text = out.decode()
    assert "emitting [" in text, "no progress bar on a terminal"
    # What a terminal shows: each line as its last carriage return left it, erasures applied.
    shown = [line.rstrip("\r").split("\r")[-1].replace("\x1b[K", "") for line in text.split("\n")]
    ids = [line for line in shown if re.fullmatch(r"[0-9a-f]{32}", line)]
    assert len(ids) == 40 and len(set(ids)) == 40
    for line in shown:
        if re.search(r"[0-9a-f]{32}", line):
            assert re.fullmatch(r"[0-9a-f]{32}", line), f"an id shares a line: {line!r}"


def _start_refused(data_dir: Path, *flags: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``qisd start`` with ``flags`` that must fail; the environment without QISD_ or GRPC_."""
    qisd("init", "--data-dir", str(data_dir))
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("QISD_", "GRPC_"))}
    return subprocess.run(
        [*QISD, *lone_daemon_argv(data_dir, *flags)],
        capture_output=True,
        text=True,
        timeout=60,
        env=clean | env,
    )


@pytest.mark.parametrize("which", ["flight", "metrics"])
def test_a_tcp_port_in_use_is_a_one_line_error(tmp_path: Path, which: str) -> None:
    """For Flight, gRPC's own bind is the only attempt (a probe before it left a window in
    which another process could take the port): its failure is what this test provokes, and
    the daemon, asking the kernel afterwards, must still say in one line that the port is in
    use, with none of gRPC's own lines."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        flag = ["--flight", f"grpc://127.0.0.1:{port}"] if which == "flight" else []
        done = _start_refused(tmp_path / "p", *(flag or ["--metrics", f"127.0.0.1:{port}"]))
        line = one_line_error(done, 2, f"127.0.0.1:{port}", "in use")
        assert ("Flight" in line) if which == "flight" else ("metrics" in line)
        if which == "flight":
            # gRPC's lines come back when an operator asks for them, the one-line error last.
            asked = _start_refused(tmp_path / "p", *flag, GRPC_VERBOSITY="error")
            assert asked.returncode == 2 and "add_port" in asked.stderr, asked.stderr
            assert asked.stderr.strip().splitlines()[-1] == line
    assert not (tmp_path / "p" / "control.sock").exists()


@pytest.mark.parametrize("pair", ["not_pem", "mismatched"])
def test_a_flight_tls_pair_gRPC_cannot_use_is_a_one_line_error(tmp_path: Path, pair: str) -> None:
    """gRPC refused these at bind time with three lines of its own and Flight's "Server did not
    start properly", which names neither file."""
    from test_flight import _self_signed

    cert, key = _self_signed(tmp_path)
    if pair == "not_pem":
        cert.write_text("not a certificate\n")
    else:
        other = tmp_path / "other"
        other.mkdir()
        key = _self_signed(other)[1]  # a key, but not the certificate's
    done = _start_refused(
        tmp_path / "t",
        "--flight",
        "grpc+tls://127.0.0.1:0",
        "--flight-tls-cert",
        str(cert),
        "--flight-tls-key",
        str(key),
    )
    one_line_error(done, 2, str(cert), str(key), "not a PEM certificate")
    assert not (tmp_path / "t" / "control.sock").exists()


def _block_after(heading: str, fence: str) -> str:
    start = README.index(heading)
    begin = README.index(f"```{fence}\n", start) + len(fence) + 4
    return README[begin : README.index("```", begin)]


def test_the_readme_config_example_works_as_written(tmp_path: Path) -> None:
    # The README's TOML as written; only where this test's node lives differs (flags win).
    config = tmp_path / "qisd.toml"
    config.write_text(_block_after("### Configuration", "toml"))
    data = tmp_path / "site"
    qisd("init", "--data-dir", str(data))
    d = Daemon(data, "--config", str(config), ready_timeout=60)
    try:
        status = json.loads(d.cli("status", "--json", "--data-dir", str(data)).stdout)
        assert status["data_dir"] == str(data)
        # The Quick start's emit and synthesize, word for word.
        quick = _block_after("## Quick start", "sh").split("To run a node for real")[0]
        real = _block_after("To run a node for real", "sh")
        emit = re.search(r"\.venv/bin/qisd (emit .*?--data-ref \S+)", real, re.S)
        assert emit is not None, quick
        done = d.cli(*shlex.split(emit[1].replace("\\\n", " ")))
        assert done.returncode == 0, done.stderr
        synth = re.search(r"\.venv/bin/qisd synthesize (\S+)", real)
        assert synth is not None
        shown = d.cli("synthesize", synth[1])
        assert shown.returncode == 0 and "learning_rate_schedule" in shown.stdout
    finally:
        assert d.terminate() == 0


# --------------------------------------------------------------------------- the dashboard


def _chromium() -> str | None:
    import shutil

    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def _browse(url: str, profile: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """Headless Chromium on ``url``; virtual time lets the page's fetch and drawing finish."""
    browser = _chromium()
    assert browser is not None
    return subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",  # tests may run as root, where the sandbox cannot start
            "--disable-gpu",
            "--no-first-run",
            f"--user-data-dir={profile}",
            "--enable-logging=stderr",
            "--v=0",
            "--virtual-time-budget=8000",
            "--window-size=1200,1800",
            *extra,
            url,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.skipif(
    _chromium() is None, reason="no chromium: apt-get install -y chromium (Debian's package)"
)
def test_the_dashboard_draws_the_followed_path_in_a_real_browser(
    pair: tuple[Daemon, Daemon], tmp_path: Path
) -> None:
    a, b = pair
    assert b.cli("follow", PATH).returncode == 0
    assert a.cli("emit", *FLAGS, "--intervention=warmup", "--wait=1").returncode == 0
    assert b.cli("emit", *FLAGS, "--intervention=cosine_annealing", "--delta=0.05").returncode == 0
    b.wait_for_line(re.compile(rf".*election: {re.escape(PATH)} re-synthesized .* of 2 "), 30)
    with Client(b.data_dir) as client:
        synthesis = client.status()["syntheses"][PATH]
    names = {i["intervention"] for i in synthesis["interventions"]}
    assert {"warmup", "cosine_annealing"} <= names

    url = metrics_url(b)
    dom = _browse(url + "?refresh=1", tmp_path / "profile", "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    console = [line for line in dom.stderr.splitlines() if ":CONSOLE" in line]
    assert not console, console  # no script error, CSP violation or failed request
    assert 'data-state="ready"' in dom.stdout
    refreshes = re.search(r'data-refreshes="(\d+)"', dom.stdout)
    assert refreshes is not None and int(refreshes[1]) >= 3  # it keeps itself up to date
    chart = re.search(
        rf'data-path="{re.escape(PATH)}".*?<svg[^>]*class="synthesis".*?</svg>', dom.stdout, re.S
    )
    assert chart is not None, dom.stdout[-3000:]
    drawn = set(re.findall(r'data-intervention="([^"]+)"', chart[0]))
    assert drawn == names
    assert chart[0].count('class="median"') == len(names)
    for i in synthesis["interventions"]:
        assert f'data-signers="{i["signers"]}"' in chart[0]
    assert b.node_id in dom.stdout and a.node_id in dom.stdout  # peers by node id

    artifacts = ROOT / "artifacts"
    artifacts.mkdir(exist_ok=True)
    shot = artifacts / "dashboard.png"
    picture = _browse(url, tmp_path / "profile", f"--screenshot={shot}")
    assert picture.returncode == 0, picture.stderr[-2000:]
    assert shot.stat().st_size > 10_000 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert b.cli("unfollow", PATH).returncode == 0


def test_peers_status_and_query_show_one_node_id_scheme(pair: tuple[Daemon, Daemon]) -> None:
    a, b = pair
    assert a.cli("emit", *FLAGS, "--intervention=ids", "--wait=1").returncode == 0
    peers = json.loads(b.cli("peers", "--json").stdout)
    assert [p["node_id"] for p in peers] == [a.node_id]  # the id of A's `node=` line
    assert len(peers[0]["dht_id"]) == 40
    human = b.cli("peers")
    assert human.returncode == 0 and a.node_id in human.stdout.splitlines()[1]
    assert json.loads(a.cli("status", "--json").stdout)["node_id"] == a.node_id
    assert a.node_id in a.cli("status").stdout.splitlines()[0]
    rows = json.loads(b.cli("query", PATH, "--json").stdout)["rows"]
    assert a.node_id in {r["node_id"] for r in rows}
    table = b.cli("query", PATH).stdout.splitlines()
    shown = {line.split()[2] for line in table[1:]}  # TIME is two words, then NODE
    assert a.node_id[:12] in shown  # the same id, shortened as git shortens hashes


def test_a_one_site_synthesis_says_so_and_recommends_nothing(tmp_path: Path) -> None:
    d = Daemon(tmp_path / "solo")
    try:
        rows = [dict(FLAG_ROW, intervention_type="warmup", metric_delta=0.023)] * 1
        source = tmp_path / "solo.jsonl"
        source.write_text(
            "".join(
                json.dumps(dict(r, metric_delta=0.02 + 0.001 * i)) + "\n"
                for i, r in enumerate(rows * 30)
            )
        )
        assert d.cli("emit", "--from", str(source)).returncode == 0
        shown = d.cli("synthesize", PATH, "--local")
        assert shown.returncode == 0, shown.stderr
        text = " ".join(shown.stdout.split())
        assert "Evidence from one site" in text and "one vote per signer" in text
        assert "Try '" not in text and "95% interval" not in text
        assert "- (one signer)" in shown.stdout  # no zero-width interval in the table
        data = json.loads(d.cli("synthesize", PATH, "--local", "--json").stdout)
        assert data["distinct_signers"] == 1  # the data still says what The Math found
    finally:
        assert d.terminate() == 0


def test_version_json_and_shell_completion() -> None:
    from qisd import __version__

    assert qisd("--version").stdout == f"qisd {__version__}\n"
    assert qisd("-V").returncode == 0
    data = json.loads(qisd("version", "--json").stdout)
    assert data["qisd"] == __version__ and data["envelope_version"] == 1
    # The named shell's script, whatever runs the command (typer's --show-completion takes
    # no name and detects the parent shell: a zsh user asking for bash got zsh).
    script = qisd("completion", "bash")
    assert script.returncode == 0 and "_QISD_COMPLETE=complete_bash" in script.stdout
    assert qisd("completion", "zsh").stdout.startswith("#compdef qisd")
    assert "complete_fish" in qisd("completion", "fish").stdout
    one_line_error(qisd("completion", "tcsh"), 2, "tcsh")
    words = qisd(
        env={"_QISD_COMPLETE": "complete_bash", "COMP_WORDS": "qisd sta", "COMP_CWORD": "1"}
    )
    assert set(words.stdout.split()) == {"start", "status"}
    flags = qisd(
        env={
            "_QISD_COMPLETE": "complete_bash",
            "COMP_WORDS": "qisd start --metr",
            "COMP_CWORD": "2",
        }
    )
    assert set(flags.stdout.split()) == {"--metrics", "--metrics-token"}


# --------------------------------------------------------------------------- docs and the unit


def _slug(heading: str) -> str:
    """A heading's anchor as GitHub makes it."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(markdown: str) -> set[str]:
    """Every heading's anchor; a repeated one gets -1, -2, ... as on GitHub."""
    prose = re.sub(r"```.*?```", "", markdown, flags=re.S)
    seen: dict[str, int] = {}
    out = set()
    for match in re.finditer(r"^#+ (.*)$", prose, re.M):
        slug = _slug(match[1])
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


@pytest.mark.parametrize("document", ["README.md", "docs/cli.md", "docs/DESIGN.md"])
def test_every_link_leads_somewhere(document: str) -> None:
    path = ROOT / document
    text = path.read_text(encoding="utf-8")
    # Code blocks hold shell and TOML, not links.
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    links = re.findall(r"\[[^\]]*\]\(([^)\s]+)\)", prose)
    assert links or document == "docs/DESIGN.md"
    for link in links:
        if link.startswith(("http://", "https://", "mailto:")):
            continue
        target, _, anchor = link.partition("#")
        file = (path.parent / target).resolve() if target else path
        assert file.exists(), f"{document}: {link} does not exist"
        if anchor and file.suffix == ".md":
            assert anchor in _anchors(file.read_text(encoding="utf-8")), f"{document}: {link}"
    # Files named in code spans of the prose (`docs/cli.md`, `DESIGN.md`) exist too.
    for name in re.findall(r"`([\w./-]+\.md)`", prose):
        found = [p for p in (path.parent / name, ROOT / name, ROOT / "docs" / name) if p.exists()]
        assert found, f"{document} names {name}, which is not in the repository"


def test_the_cli_reference_is_what_the_program_says() -> None:
    from qisd_cli.reference import reference

    assert (ROOT / "docs" / "cli.md").read_text(encoding="utf-8") == reference(), (
        "docs/cli.md is stale: python -m qisd_cli.reference > docs/cli.md"
    )


def _install_steps() -> list[str]:
    """The README's systemd install lines that put files in place (not pip, not systemctl)."""
    block = _block_after("### Running under systemd", "sh")
    steps = []
    for line in block.splitlines():
        command = line.split("#", 1)[0].strip()
        if command.startswith(("sudo install ", "sudo ln -s ")):
            steps.append(command.removeprefix("sudo "))
    assert len(steps) == 3, block
    return steps


def test_the_unit_verifies_after_the_readme_install_steps(tmp_path: Path) -> None:
    import shutil

    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("no systemd-analyze: apt-get install -y systemd")
    venv_qisd = Path(QISD[0]) if Path(QISD[0]).name == "qisd" else None
    if venv_qisd is None:
        pytest.skip("the qisd console script is not installed beside this Python")
    unit = (ROOT / "deploy/systemd/qisd.service").read_text(encoding="utf-8")
    docs = re.findall(r"file://(\S+)", re.search(r"^Documentation=(.*)$", unit, re.M)[1])
    assert docs
    steps = [s.replace("/opt/qisd/bin/qisd", str(venv_qisd)) for s in _install_steps()]
    script = " && ".join(
        [
            "set -e",
            "for d in /usr/local/bin /etc/systemd/system /usr/share/doc; do "
            "mkdir -p $d; mount -t tmpfs tmpfs $d; done",
            f"cd {shlex.quote(str(ROOT))}",
            *steps,
            f"{analyze} verify /etc/systemd/system/qisd.service",
            *(f"test -f {shlex.quote(d)}" for d in docs),
            "echo verified",
        ]
    )
    done = subprocess.run(
        ["unshare", "--mount", "sh", "-c", script], capture_output=True, text=True, timeout=120
    )
    if "verified" in done.stdout:
        assert done.returncode == 0 and not done.stderr.strip(), done.stderr
        return
    if "unshare" not in done.stderr and "mount" not in done.stderr:
        raise AssertionError(f"the unit does not verify after the install steps: {done.stderr}")
    # No private mount namespace here: verify a copy pointed at the virtualenv's qisd, and
    # check that what the install lines copy to Documentation= exists in the checkout.
    copy = tmp_path / "qisd.service"
    copy.write_text(unit.replace("/usr/local/bin/qisd", str(venv_qisd)))
    checked = subprocess.run([analyze, "verify", str(copy)], capture_output=True, text=True)
    assert checked.returncode == 0 and not checked.stderr.strip(), checked.stderr
    for doc in docs:
        assert (ROOT / ("docs/" if doc.endswith("cli.md") else "") / Path(doc).name).exists()


def test_the_grafana_dashboard_queries_only_documented_families() -> None:
    board = json.loads((ROOT / "deploy/grafana/qisd.json").read_text(encoding="utf-8"))
    documented = set(documented_families())
    exprs = [t["expr"] for p in board["panels"] for t in p["targets"]]
    assert len(exprs) > 20
    for expr in exprs:
        for name in re.findall(r"\b(qisd_[a-z_]+)", expr):
            family = re.sub(r"_(total|bucket|count|sum)$", "", name)
            assert family in documented, (name, expr)


def test_losing_and_regaining_every_peer_is_logged_once_each(tmp_path: Path) -> None:
    """A's only peer dies: its calls fail (port unreachable), the peer is evicted, and INFO says
    so once; the peer comes back from its data directory and A says it regained peers."""
    a = Daemon(tmp_path / "a", env=ENV)
    b = Daemon(tmp_path / "b", "--bootstrap", a.address, env=ENV)
    try:
        a.wait_for_line(re.compile(r".*joined the network: 1 peers"), 30)
        b.kill()
        # Publishing to the dead peer fails at once, call after call, until it is evicted.
        done = a.cli("emit", *FLAGS, "--intervention=alone", "--wait=1", "--wait-timeout=8")
        assert done.returncode == 5, done.stderr
        a.wait_for_line(re.compile(r".*lost every peer \(had 1\)"), 30)
        b = Daemon(tmp_path / "b", "--bootstrap", a.address, env=ENV)
        line = a.wait_for_line(re.compile(r".*regained peers: (\d+) in the routing table"), 30)
        assert int(line[1]) == 1
        assert sum("lost every peer" in text for text in a.lines) == 1
    finally:
        b.terminate()
        assert a.terminate() == 0


def test_busy_replies_and_rate_limits_move_their_families(tmp_path: Path) -> None:
    """A receiver allowing 100 requests a second (burst 20) gets 200 packets' publishes at
    once: its busy replies and rate limiting show in its metrics, and the busy replies the
    sender received in the sender's, while every packet still arrives. (Past 50 busy replies
    a second a source gets silence, so a few calls may still time out.)"""
    slow = ENV | {"QISD_DHT_RATE_LIMIT_PER_SOURCE": "100", "QISD_DHT_RATE_BURST_PER_SOURCE": "20"}
    b = Daemon(tmp_path / "b", "--metrics", "127.0.0.1:0", env=slow)
    a = Daemon(tmp_path / "a", "--bootstrap", b.address, "--metrics", "127.0.0.1:0", env=ENV)
    try:
        rows = [
            dict(
                domain="clinical.oncology",
                problem_type="treatment_response_classification",
                model_architecture=f"arch-{i}",
                metric_name="val_auc",
                metric_value=0.8,
                metric_delta=0.01,
                confidence=0.9,
                intervention_type="busy_test",
                outcome_decile=5,
                sample_count=i,
            )
            for i in range(200)
        ]
        with Client(a.data_dir) as client:
            emitted = client.emit(rows, wait=1, wait_timeout=60)
        assert min(emitted["replicas"].values()) >= 1
        after_a, after_b = scrape(a), scrape(b)
        assert value(after_b, "qisd_dht_busy_replies_total", direction="sent") > 0
        assert value(after_b, "qisd_dht_rate_limited_requests_total") > 0
        assert value(after_a, "qisd_dht_busy_replies_total", direction="received") > 0
    finally:
        assert a.terminate() == 0
        assert b.terminate() == 0


def _rows(n: int, tag: str) -> list[dict[str, Any]]:
    """``n`` rows of ``n`` distinct paths: each packet lives under two keys of its own."""
    return [dict(FLAG_ROW, problem_type=f"{tag}_{i}") for i in range(n)]


def _scrape_until(
    d: Daemon, what: str, done: Any, timeout: float, seen: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """Scrape ``d`` until ``done(families)`` holds, each scrape kept in ``seen``; the scrape
    that met it. Each scrape is a round trip to the daemon: the wait is on its figures."""
    deadline = time.monotonic() + timeout
    while True:
        families = scrape(d)
        if seen is not None:
            seen.append(families)
        if done(families):
            return families
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"


def test_backlogs_fill_and_drain_as_the_daemons_work(tmp_path: Path) -> None:
    """The work queues an operator watches, filled by real situations and drained by work
    done, read from /metrics:

    * a node restarts while a newcomer waits for it: the newcomer's unreachable bootstrap
      peer counts 1, then 0 once the node is back;
    * the node hands its 50 keys off to the newcomer, which allows 50 requests a second (so
      the work takes seconds): the hand-off and sync backlogs and the send queue rise, then
      fall to 0 with every envelope at the newcomer, which rate-limited some of them;
    * the node emits 10 new packets: the publish backlog holds their 20 envelopes until they
      are at the newcomer (those it refused as rate limited are published again), then reads 0;
    * the newcomer is stopped (SIGSTOP: its socket stays open, nothing answers): the next
      publish times out, the peer shows failing, the round counts as failed and its two
      envelopes stay in the backlog and are published again.
    """
    a_env = ENV | {"QISD_DHT_EVICT_AFTER_FAILURES": "100"}  # the stopped peer stays, failing
    a = Daemon(tmp_path / "a", "--metrics", "127.0.0.1:0", env=a_env)
    try:
        with Client(a.data_dir) as client:
            client.emit(_rows(25, "handed_off"), wait=0)
    finally:
        assert a.terminate() == 0
    port = a.port
    slow = ENV | {
        "QISD_DHT_RATE_LIMIT_PER_SOURCE": "50",
        "QISD_DHT_RATE_BURST_PER_SOURCE": "10",
        "QISD_STORE_MAX_BYTES": str(64 << 20),
    }
    c = Daemon(
        tmp_path / "c", "--bootstrap", f"127.0.0.1:{port}", "--metrics", "127.0.0.1:0", env=slow
    )
    stopped = False
    try:
        fresh = scrape(c)
        assert value(fresh, "qisd_bootstrap_unreachable_peers") == 1  # the node is down
        assert value(fresh, "qisd_store_max_bytes") == 64 << 20
        a = Daemon(tmp_path / "a", "--port", str(port), "--metrics", "127.0.0.1:0", env=a_env)
        seen: list[dict[str, Any]] = []
        _scrape_until(
            a, "hand-off queued", lambda f: value(f, "qisd_handoff_backlog") > 0, 30, seen
        )
        drained = _scrape_until(
            a,
            "hand-off done",
            lambda f: value(f, "qisd_handoff_backlog") == 0 and value(f, "qisd_sync_backlog") == 0,
            60,
            seen,
        )
        assert max(value(f, "qisd_handoff_backlog") for f in seen) >= 10
        assert all(value(f, "qisd_sync_backlog") >= value(f, "qisd_handoff_backlog") for f in seen)
        assert max(value(f, "qisd_dht_send_queue") for f in seen) > 0  # calls waited their turn
        assert max(value(f, "qisd_dht_peer_queues_entries") for f in seen) == 1  # one peer
        assert value(drained, "qisd_dht_busy_replies_total", direction="received") > 0
        joined = _scrape_until(
            c,
            "every key at the newcomer",
            lambda f: value(f, "qisd_received_envelopes_total", via="stored_by_peers") == 50,
            30,
        )
        assert value(joined, "qisd_store_keys") == 50
        assert value(joined, "qisd_store_envelopes", origin="remote") == 50
        assert value(joined, "qisd_store_bytes", origin="remote") > 50 * 100
        assert value(joined, "qisd_store_file_bytes") > value(fresh, "qisd_store_file_bytes")
        assert value(joined, "qisd_dht_rate_limited_envelopes_total") > 0
        # INFO says so, summarised: the hand-off's progress on the node, the newcomer's limit.
        a.wait_for_line(re.compile(r".*hand-off: \d+ keys queued for joining nodes, \d+ env"), 30)
        c.wait_for_line(re.compile(r".*rate-limited \d+ requests from 1 sources \(127"), 30)
        _scrape_until(
            c,
            "the node is no longer unreachable",
            lambda f: value(f, "qisd_bootstrap_unreachable_peers") == 0,
            30,
        )

        before = scrape(a)
        assert value(before, "qisd_publish_backlog_envelopes") == 0
        with Client(a.data_dir) as client:
            client.emit(_rows(10, "published"), wait=0)
        seen = []
        _scrape_until(
            a, "publish done", lambda f: value(f, "qisd_publish_backlog_envelopes") == 0, 60, seen
        )
        assert value(seen[0], "qisd_publish_backlog_envelopes") == 20  # all of them, at first
        _scrape_until(
            c,
            "every published envelope at the newcomer",
            lambda f: value(f, "qisd_received_envelopes_total", via="stored_by_peers") == 70,
            30,
        )

        os.kill(c.proc.pid, signal.SIGSTOP)
        stopped = True
        before = scrape(a)
        with Client(a.data_dir) as client:
            client.emit(_rows(1, "unanswered"), wait=0)
        failed = _scrape_until(
            a,
            "a publish that reached nobody, published again",
            lambda f: (
                value(f, "qisd_publish_retried_envelopes_total")
                >= value(before, "qisd_publish_retried_envelopes_total") + 2
            ),
            30,
        )
        assert value(failed, "qisd_publish_failures_total") > value(
            before, "qisd_publish_failures_total"
        )
        assert value(failed, "qisd_publish_backlog_envelopes") == 2  # retried, not dropped
        assert value(failed, "qisd_peers", state="failing") == 1
        assert value(failed, "qisd_dht_rpc_timeouts_total") > value(
            before, "qisd_dht_rpc_timeouts_total"
        )
        assert value(failed, "qisd_dht_rpc_round_trip_seconds_count", outcome="no_reply") > value(
            before, "qisd_dht_rpc_round_trip_seconds_count", outcome="no_reply"
        )
    finally:
        if stopped:
            os.kill(c.proc.pid, signal.SIGCONT)
        codes = [c.terminate(), a.terminate()]
        assert codes == [0, 0], codes
    queued = [re.search(r"hand-off: (\d+) keys queued", line) for line in a.lines]
    assert sum(int(m[1]) for m in queued if m) == 50  # each key once, none by the gauge's rise


def test_a_bootstrap_peer_that_is_back_is_no_longer_unreachable_once_rejoined(
    tmp_path: Path,
) -> None:
    """A bootstrap peer that comes back counts as reachable as soon as the node rejoins it
    (every rejoin_seconds, here 1 s), not when its own retry next fires (its delay starts at
    an RPC timeout, here 30 s, and doubles up to 5 minutes): until then the gauge said a peer
    in the routing table was unreachable."""
    a = Daemon(tmp_path / "a", env=ENV)
    port = a.port
    assert a.terminate() == 0
    patient = ENV | {"QISD_DHT_RPC_TIMEOUT": "30", "QISD_DHT_REJOIN_SECONDS": "1"}
    c = Daemon(
        tmp_path / "c", "--bootstrap", f"127.0.0.1:{port}", "--metrics", "127.0.0.1:0", env=patient
    )
    try:
        assert value(scrape(c), "qisd_bootstrap_unreachable_peers") == 1
        a = Daemon(tmp_path / "a", "--port", str(port), env=ENV)
        rejoined = _scrape_until(
            c, "rejoined", lambda f: value(f, "qisd_peers", state="responsive") == 1, 20
        )
        if value(rejoined, "qisd_bootstrap_unreachable_peers"):
            _scrape_until(
                c,
                "the peer no longer unreachable",
                lambda f: value(f, "qisd_bootstrap_unreachable_peers") == 0,
                10,
            )
    finally:
        codes = [c.terminate(), a.terminate()]
        assert codes == [0, 0], codes
