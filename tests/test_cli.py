"""The ``qisd`` command line, run as a real program: every error path a user can hit.

Each error must be one line on stderr (``qisd: error: ...``, no traceback), exit with the
documented code (1 invalid packet or input, 2 usage or configuration, 3 no daemon, 4 store,
5 network), and store nothing. A real daemon (``qisd start --port 0``) serves the tests that
need one; waits read its readiness line with a deadline and never sleep.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import BASE_ROW, LineReader, lone_daemon_argv

from qisd.client import Client
from qisd.net.datadir import DaemonRunningError

BIN = Path(sys.executable).parent / "qisd"
QISD = [str(BIN)] if BIN.exists() else [sys.executable, "-m", "qisd"]
READY = re.compile(r"^qisd listening on (\S+):(\d+) node=([0-9a-f]{32})$")
PATH = "clinical.oncology/treatment_response_classification"

ROW: dict[str, Any] = BASE_ROW
FLAGS = [
    "--domain=clinical.oncology",
    "--problem-type=treatment_response_classification",
    "--model-architecture=transformer-256d",
    "--metric=val_auc=0.847",
    "--delta=0.023",
    "--confidence=0.91",
    "--intervention=learning_rate_schedule",
    "--decile=8",
]


def qisd(
    *args: str, input: bytes | None = None, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run the CLI; returns the finished process (text stdout/stderr)."""
    full_env = dict(os.environ)
    full_env.pop("QISD_DATA_DIR", None)
    full_env.update(env or {})
    proc = subprocess.run(
        [*QISD, *args],
        input=input,
        capture_output=True,
        env=full_env,
        timeout=timeout,
    )
    return subprocess.CompletedProcess(
        proc.args, proc.returncode, proc.stdout.decode(), proc.stderr.decode()
    )


def one_line_error(proc: subprocess.CompletedProcess[str], code: int, *needles: str) -> str:
    """Assert ``proc`` failed with ``code`` and exactly one ``qisd: error:`` line."""
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("qisd: error: "), lines[0]
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@contextlib.contextmanager
def watching(path: str, data_dir: Path) -> Iterator[subprocess.Popen[bytes]]:
    """``qisd watch PATH --count 1 --json`` running once it says the daemon registered the
    subscription; killed on the way out if it has not ended by then."""
    watch = subprocess.Popen(
        [*QISD, "watch", path, "--count", "1", "--json", "--data-dir", str(data_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        ready = LineReader(watch.stderr).readline(timeout=30)
        assert ready is not None and ready.startswith("qisd: watching"), ready
        yield watch
    finally:
        if watch.poll() is None:
            watch.kill()
            watch.wait()


class Daemon:
    """``qisd start`` as a subprocess; stderr is drained by a thread so it can never block."""

    def __init__(
        self,
        data_dir: Path,
        *extra: str,
        env: dict[str, str] | None = None,
        init: bool = True,
        ready_timeout: float = 30.0,
    ) -> None:
        self.data_dir = data_dir
        if init and not (data_dir / "node.key").exists():
            done = qisd("init", "--data-dir", str(data_dir))
            assert done.returncode == 0, done.stderr
        full_env = dict(os.environ)
        full_env.pop("QISD_DATA_DIR", None)
        full_env.update(env or {})
        self.proc = subprocess.Popen(
            [*QISD, *lone_daemon_argv(data_dir, *extra)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=full_env,
        )
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._thread = threading.Thread(target=self._drain, daemon=True)
        self._thread.start()
        match = self.wait_for_line(READY, ready_timeout)
        self.host, self.port, self.node_id = match[1], int(match[2]), match[3]

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            line = raw.decode(errors="replace").rstrip("\n")
            self.lines.append(line)
            self._queue.put(line)
        self._queue.put(None)

    def wait_for_line(self, pattern: re.Pattern[str], timeout: float) -> re.Match[str]:
        """The first stderr line (from now on) matching ``pattern``, within ``timeout`` s."""
        import time

        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no line matching {pattern.pattern}: {self.lines[-20:]}")
            try:
                line = self._queue.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                raise AssertionError(f"daemon exited ({self.proc.wait()}): {self.lines[-20:]}")
            match = pattern.match(line)
            if match:
                return match

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def cli(self, *args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        """Run ``qisd ARGS --data-dir <this daemon's>``."""
        return qisd(*args, "--data-dir", str(self.data_dir), **kwargs)

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait for the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout)
        self._thread.join(timeout)
        return code

    def kill(self) -> None:
        """SIGKILL: nothing is saved or said."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)
        self._thread.join(30)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = Daemon(tmp_path_factory.mktemp("cli") / "node")
    try:
        yield d
    finally:
        assert d.terminate() == 0


def stored(d: Daemon) -> int:
    """Envelopes the daemon's store holds (asked through the Python client: fast)."""
    with Client(d.data_dir) as client:
        return int(client.status()["packets"])


# --------------------------------------------------------------------------- no daemon


@pytest.mark.parametrize(
    "args",
    [
        ["status"],
        ["query", PATH],
        ["emit", *FLAGS],
        ["follow", PATH],
        ["peers"],
        ["stop"],
        ["synthesize", PATH],
    ],
)
def test_no_daemon_exits_3_with_a_hint(tmp_path: Path, args: list[str]) -> None:
    line = one_line_error(
        qisd(*args, "--data-dir", str(tmp_path / "none")), 3, "no qisd daemon is running"
    )
    assert "qisd start" in line


def test_data_dir_comes_from_the_environment(tmp_path: Path) -> None:
    one_line_error(
        qisd("status", env={"QISD_DATA_DIR": str(tmp_path / "env")}), 3, str(tmp_path / "env")
    )


# --------------------------------------------------------------------------- usage errors


@pytest.mark.parametrize(
    "args, needle",
    [
        (["emit", "--bogus"], "No such option"),
        (["frobnicate"], "No such command"),
        (["query"], "Missing argument"),
        (["emit", "--wait", "-1"], "--wait"),
        (["start", "--port", "seventy"], "--port"),
        (["template"], None),
    ],
)
def test_usage_errors_exit_2_in_one_line(args: list[str], needle: str | None) -> None:
    done = qisd(*args)
    if needle is None:  # a command group without a subcommand shows its help
        assert done.returncode == 0 and "publish" in done.stdout
        return
    one_line_error(done, 2, needle)


def test_no_arguments_prints_help() -> None:
    done = qisd()
    assert done.returncode == 0
    assert "emit" in done.stdout and "query" in done.stdout


def test_init_refuses_to_overwrite_an_identity(tmp_path: Path) -> None:
    first = qisd("init", "--data-dir", str(tmp_path / "id"))
    assert first.returncode == 0 and re.fullmatch(r"[0-9a-f]{32}\n", first.stdout)
    one_line_error(qisd("init", "--data-dir", str(tmp_path / "id")), 2, "--force")
    again = qisd("init", "--data-dir", str(tmp_path / "id"), "--force", "--json")
    assert again.returncode == 0
    assert json.loads(again.stdout)["node_id"] != first.stdout.strip()
    assert (tmp_path / "id").stat().st_mode & 0o777 == 0o700
    assert (tmp_path / "id" / "node.key").stat().st_mode & 0o777 == 0o600


def test_start_without_an_identity_says_run_init(tmp_path: Path) -> None:
    done = qisd("start", "--data-dir", str(tmp_path / "fresh"), "--port", "0")
    one_line_error(done, 2, "qisd init")


@pytest.mark.parametrize(
    "toml, needle",
    [
        ("port = ", "not valid TOML"),
        ("colour = 'blue'", "unknown setting 'colour'"),
        ("port = 'x'", "must be a whole number"),
        ("[dht]\nksize = 0", "dht.ksize"),
        ("[dht]\nrejoin_seconds = 0", "rejoin_seconds"),
        ("bootstrap = ['nohost']", "HOST:PORT"),
        ("flight = 'grpc://0.0.0.0:8815'", "flight_token"),
        ("metrics = '0.0.0.0:8469'", "metrics_token"),
        ("metrics = 'nohost'", "HOST:PORT"),
        ("log_format = 'xml'", "log_format"),
        ("log_level = 'debug,kademlia'", "LOGGER=LEVEL"),
    ],
)
def test_bad_config_exits_2(tmp_path: Path, toml: str, needle: str) -> None:
    qisd("init", "--data-dir", str(tmp_path / "d"))
    conf = tmp_path / "qisd.toml"
    conf.write_text(toml + "\n")
    done = qisd("start", "--config", str(conf), "--data-dir", str(tmp_path / "d"), "--port", "0")
    one_line_error(done, 2, needle)


def test_bad_environment_value_exits_2(tmp_path: Path) -> None:
    qisd("init", "--data-dir", str(tmp_path / "d"))
    one_line_error(qisd("start", "--data-dir", str(tmp_path / "d"), "--port", "70000"), 2, "65535")
    done = qisd("start", "--data-dir", str(tmp_path / "d"), env={"QISD_ELECTION_SECONDS": "-1"})
    one_line_error(done, 2, "election_seconds")
    done = qisd("start", "--data-dir", str(tmp_path / "d"), env={"QISD_DHT_KSIZE": "many"})
    one_line_error(done, 2, "ksize")


# --------------------------------------------------------------------------- with a daemon


def test_emit_prints_the_committed_packet_id_and_query_finds_it(daemon: Daemon) -> None:
    done = daemon.cli("emit", *FLAGS, "--params", '{"schedule": "cosine"}', "--samples", "12")
    assert done.returncode == 0, done.stderr
    (pid,) = done.stdout.split()
    assert re.fullmatch(r"[0-9a-f]{32}", pid)
    read = json.loads(daemon.cli("query", PATH, "--json", "--local").stdout)
    assert read["path"] == PATH and read["complete"] is None  # a local read claims nothing
    mine = [r for r in read["rows"] if r["packet_id"] == pid]
    assert len(mine) == 1
    assert mine[0]["node_id"] == daemon.node_id
    assert mine[0]["metric_delta"] == 0.023 and mine[0]["confidence"] == 0.91
    assert mine[0]["intervention_params"] == '{"schedule":"cosine"}'
    assert mine[0]["sample_count"] == 12


def test_query_output_formats(daemon: Daemon, tmp_path: Path) -> None:
    assert daemon.cli("emit", *FLAGS).returncode == 0
    as_csv = daemon.cli("query", PATH, "--csv", "--local")
    assert as_csv.returncode == 0
    header = as_csv.stdout.splitlines()[0].split(",")
    assert header[:2] == ["node_id", "timestamp_utc"] and header[-2:] == ["packet_id", "signer"]
    target = tmp_path / "out.arrow"
    assert daemon.cli("query", PATH, "--arrow", str(target), "--local").returncode == 0
    table = pa.ipc.open_file(pa.memory_map(str(target))).read_all()
    assert table.num_rows == len(as_csv.stdout.splitlines()) - 1
    human = daemon.cli("query", PATH, "--local")
    assert human.returncode == 0 and "INTERVENTION" in human.stdout
    one_line_error(daemon.cli("query", PATH, "--json", "--csv"), 2, "choose one")
    one_line_error(daemon.cli("query", "/"), 2, "fingerprint path")


def test_wait_for_replicas_a_lone_node_cannot_have_ends_at_the_wait_timeout(
    daemon: Daemon,
) -> None:
    # No peer can store a replica; without --wait-timeout the daemon would keep trying for
    # ten RPC timeouts. The packet is committed all the same, and exit 5 says it is short.
    before = stored(daemon)
    started = time.monotonic()
    done = daemon.cli("emit", *FLAGS, "--intervention=wait_test", "--wait=2", "--wait-timeout=0.5")
    elapsed = time.monotonic() - started
    assert done.returncode == 5, done.stderr
    committed, error = done.stderr.strip().splitlines()
    assert committed == "qisd: committed 1 packet (1 row)"
    assert error.startswith("qisd: error:") and "only 0 of the 2 replicas" in error
    assert len(done.stdout.split()) == 1  # the committed packet id
    assert stored(daemon) == before + 2  # one envelope per routable level
    assert elapsed < 4.5, f"--wait-timeout 0.5 returned after {elapsed:.1f} s"
    one_line_error(daemon.cli("emit", *FLAGS, "--wait-timeout=1"), 2, "--wait N")


@pytest.mark.parametrize(
    "flag, value, names",
    [
        ("--confidence", "1.5", "confidence"),
        ("--confidence", "high", "confidence"),
        ("--decile", "11", "outcome_decile"),
        ("--delta", "abc", "metric_delta"),
        ("--delta", "nan", "metric_delta"),
        ("--params", "[1, 2]", "intervention_params"),
        ("--params", "{not json", "intervention_params"),
        ("--samples", "-3", "sample_count"),
        ("--metric", "val_auc", "--metric"),
        ("--domain", "a/b", "domain"),
        ("--timestamp", "99999999999999", "timestamp_utc"),
    ],
)
def test_bad_field_values_exit_1_naming_the_field(
    daemon: Daemon, flag: str, value: str, names: str
) -> None:
    before = stored(daemon)
    args = [f for f in FLAGS if not f.startswith(flag + "=")]
    done = daemon.cli("emit", *args, f"{flag}={value}")
    one_line_error(done, 1, names)
    assert stored(daemon) == before


def test_missing_required_flag_is_a_usage_error_naming_it(daemon: Daemon) -> None:
    args = [f for f in FLAGS if not f.startswith("--intervention=")]
    before = stored(daemon)
    one_line_error(daemon.cli("emit", *args), 2, "--intervention", "required unless --from")
    assert stored(daemon) == before
    # --help marks every option one packet from flags needs.
    shown = " ".join(qisd("emit", "--help").stdout.split())
    for flag in ("--domain", "--problem-type", "--metric", "--delta", "--confidence"):
        assert re.search(re.escape(flag) + r" .{0,80}?\[required unless --from\]", shown), flag
    assert shown.count("[required unless --from]") == 7


def test_flags_and_from_together_are_refused(daemon: Daemon, tmp_path: Path) -> None:
    one_line_error(daemon.cli("emit", "--from", "-", *FLAGS), 2, "either --from")
    one_line_error(daemon.cli("emit", "--from", str(tmp_path / "missing.jsonl")), 2, "exist")
    one_line_error(daemon.cli("emit", "--from", str(tmp_path)), 2, "directory")
    one_line_error(daemon.cli("emit", "--from", "-", "--format", "xml"), 2, "format")


@pytest.mark.parametrize(
    "name, content, needle",
    [
        ("bad.jsonl", json.dumps(ROW) + "\n{not json\n", "line 2"),
        ("list.jsonl", json.dumps(ROW) + "\n[1, 2]\n", "line 2"),
        ("array.json", json.dumps([ROW, 3]), "only objects"),
        ("extra.jsonl", json.dumps(dict(ROW, colour="blue")), "colour"),
        (
            "late.jsonl",
            "\n".join([json.dumps(ROW)] * 5 + [json.dumps(dict(ROW, confidence=9))]),
            "row 5",
        ),
        ("short.csv", "domain,problem_type,metric_delta\nclinical,x\n", "CSV line 2"),
        ("dupe.csv", "domain,domain\na,b\n", "each column once"),
        ("binary.jsonl", "\udcff", "UTF-8"),
        ("empty.jsonl", "\n\n", "no rows"),
        ("junk.bin", "\x00\x01 not a table", "not in the packet schema"),
        ("header.csv", "domain,colour\nclinical,blue\n", "colour"),
    ],
)
def test_malformed_files_exit_1_and_store_nothing(
    daemon: Daemon, tmp_path: Path, name: str, content: str, needle: str
) -> None:
    before = stored(daemon)
    path = tmp_path / name
    path.write_bytes(content.encode("utf-8", "surrogateescape"))
    done = daemon.cli("emit", "--from", str(path))
    one_line_error(done, 1, needle)
    assert stored(daemon) == before


def test_broken_parquet_and_arrow_exit_1(daemon: Daemon, tmp_path: Path) -> None:
    good = tmp_path / "rows.parquet"
    pq.write_table(pa.Table.from_pylist([dict(ROW, intervention_params="{}")]), good)
    data = good.read_bytes()
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(data[: len(data) // 2])
    one_line_error(daemon.cli("emit", "--from", str(broken)), 1, "Parquet")
    arrow = tmp_path / "broken.arrow"
    arrow.write_bytes(b"ARROW1\x00\x00garbage")
    one_line_error(daemon.cli("emit", "--from", str(arrow)), 1, "Arrow")
    wrong = tmp_path / "wrong.parquet"
    pq.write_table(pa.table({"domain": ["x"], "weight": [1.0]}), wrong)
    one_line_error(daemon.cli("emit", "--from", str(wrong)), 1, "weight")


def test_emit_from_stdin_csv_and_json(daemon: Daemon) -> None:
    csv_text = (
        "domain,problem_type,metric_name,metric_value,metric_delta,confidence,"
        "intervention_type,outcome_decile,intervention_params\n"
        "clinical.oncology,treatment_response_classification,auc,0.8,0.01,0.9,warmup,7,"
        '"{""a"": 1}"\n'
        "clinical.oncology,treatment_response_classification,auc,0.8,0.02,0.9,warmup,7,\n"
    )
    done = daemon.cli("emit", "--from", "-", "--format", "csv", input=csv_text.encode())
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.split()) == 1  # two rows of one fingerprint: one packet
    sniffed = daemon.cli("emit", "--from", "-", "--json", input=json.dumps([ROW, ROW]).encode())
    assert sniffed.returncode == 0, sniffed.stderr
    assert json.loads(sniffed.stdout)["rows"] == 2


def test_follow_unfollow_status_and_peers(daemon: Daemon) -> None:
    followed = daemon.cli("follow", PATH, "--json")
    assert followed.returncode == 0 and json.loads(followed.stdout)["followed"] == [PATH]
    status = json.loads(daemon.cli("status", "--json").stdout)
    assert status["node_id"] == daemon.node_id
    assert status["address"] == daemon.address
    assert status["followed"] == [PATH]
    domain = PATH.split("/")[0]
    assert status["templates"][domain]["reason"] == "default"  # a followed path's domain
    assert len(status["dht_id"]) == 40
    human = daemon.cli("status")
    assert human.returncode == 0 and daemon.node_id in human.stdout
    for shown in ("publish backlog", "received", "network: rejected", f"template  {domain}: "):
        assert shown in human.stdout, shown
    assert daemon.cli("unfollow", PATH).returncode == 0
    one_line_error(daemon.cli("unfollow", PATH), 2, "not followed")
    peers = daemon.cli("peers", "--json")
    assert peers.returncode == 0 and json.loads(peers.stdout) == []


def test_watch_and_follow_of_a_deeper_path_and_of_a_too_coarse_one(tmp_path: Path) -> None:
    # A template that files by three of its four fields: a path naming the training phase is
    # deeper than every key, and its watch must print that phase's rows only.
    by_phase = {
        "domain": "clinical.oncology",
        "fields": ["domain", "problem_type", "model_architecture", "training_phase"],
        "levels": [2, 3],
    }
    first = Daemon(tmp_path / "node")
    try:
        published = first.cli(
            "template", "publish", "-", "--json", input=json.dumps(by_phase).encode()
        )
        assert published.returncode == 0, published.stderr
        tid = json.loads(published.stdout)["template_id"]
    finally:
        assert first.terminate() == 0
    pinned = {"QISD_PINNED_TEMPLATES": f"clinical.oncology={tid}"}
    d = Daemon(tmp_path / "node", env=pinned)
    early = PATH + "/transformer-256d/epoch_5_of_50"
    try:
        with watching(early, d.data_dir) as watch:
            other = d.cli("emit", *FLAGS, "--training-phase=epoch_9_of_50", "--json")
            assert other.returncode == 0, other.stderr
            mine = d.cli("emit", *FLAGS, "--training-phase=epoch_5_of_50", "--json")
            assert mine.returncode == 0, mine.stderr
            line = LineReader(watch.stdout).readline(timeout=30)
            assert line is not None
            printed = json.loads(line)
            assert printed["packet_id"] == json.loads(mine.stdout)["packet_ids"][0]
            assert printed["training_phase"] == "epoch_5_of_50"
            assert watch.wait(30) == 0

        followed = d.cli("follow", early, "--json")
        assert followed.returncode == 0 and json.loads(followed.stdout)["followed"] == [early]
        # No key answers the domain alone: refused like a query of it, not silently empty.
        one_line_error(d.cli("watch", "clinical.oncology"), 2, "too coarse", "problem_type")
        one_line_error(d.cli("follow", "clinical.oncology"), 2, "too coarse", "problem_type")
        status = json.loads(d.cli("status", "--json").stdout)
        assert status["followed"] == [early]
    finally:
        assert d.terminate() == 0


def test_a_second_daemon_on_one_data_directory_is_refused(daemon: Daemon) -> None:
    done = daemon.cli("start", "--port", "0", "--bootstrap-file", os.devnull)
    one_line_error(done, DaemonRunningError.exit_code, "another qisd daemon", str(daemon.proc.pid))
    assert daemon.proc.poll() is None
    assert daemon.cli("status").returncode == 0


def _raw_exchange(path: Path, payload: bytes) -> dict[str, Any] | None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(30)
        sock.connect(str(path))
        sock.sendall(payload)
        head = b""
        while len(head) < 8:
            chunk = sock.recv(8 - len(head))
            if not chunk:
                return None
            head += chunk
        hlen, blen = struct.unpack(">II", head)
        body = b""
        while len(body) < hlen + blen:
            chunk = sock.recv(hlen + blen - len(body))
            if not chunk:
                break
            body += chunk
        return json.loads(body[:hlen])


def _frame(obj: Any, blob: bytes = b"") -> bytes:
    text = json.dumps(obj).encode()
    return struct.pack(">II", len(text), len(blob)) + text + blob


@pytest.mark.parametrize(
    "payload, kind",
    [
        (struct.pack(">II", 1 << 31, 0), "ProtocolError"),
        (struct.pack(">II", 5, 0) + b"{{{{{", "ProtocolError"),
        (struct.pack(">II", 2, 0) + b"[]", "ProtocolError"),
        (_frame({"op": 7}), "ProtocolError"),
        (_frame({"op": "launch"}), "UsageError"),
        (_frame({"op": "emit", "args": {"rows": "lots"}}), "UsageError"),
        (_frame({"op": "emit", "args": {"rows": [1, 2]}}), "PacketError"),
        (_frame({"op": "emit", "args": {"rows": [ROW], "wait": "yes"}}), "UsageError"),
        (_frame({"op": "emit", "args": {}}, b"not arrow"), "UsageError"),
        (_frame({"op": "query", "args": {"path": 5}}), "UsageError"),
        (_frame({"op": "query", "args": {"path": "x" * 5000}}), "UsageError"),
        (_frame({"op": "follow", "args": {"path": ""}}), "UsageError"),
    ],
)
def test_hostile_control_input_gets_an_error_and_the_daemon_lives(
    daemon: Daemon, payload: bytes, kind: str
) -> None:
    before = stored(daemon)
    reply = _raw_exchange(daemon.data_dir / "control.sock", payload)
    assert reply is not None and reply["ok"] is False
    assert reply["error"]["type"] == kind, reply
    assert daemon.proc.poll() is None
    assert stored(daemon) == before


def test_control_socket_is_owner_only(daemon: Daemon) -> None:
    sock = daemon.data_dir / "control.sock"
    assert sock.is_socket()
    assert sock.stat().st_mode & 0o777 == 0o600
    assert daemon.data_dir.stat().st_mode & 0o777 == 0o700


def test_stop_shuts_the_daemon_down_cleanly(tmp_path: Path) -> None:
    d = Daemon(tmp_path / "stopme")
    assert d.cli("emit", *FLAGS).returncode == 0
    done = d.cli("stop", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["pid"] == d.proc.pid
    assert d.proc.wait(30) == 0  # stop returns once the daemon has gone
    assert not (tmp_path / "stopme" / "control.sock").exists()
    one_line_error(d.cli("status"), 3, "no qisd daemon")


def test_demo_finds_three_sites_over_the_dht_and_cleans_up() -> None:
    import tempfile

    before = set(Path(tempfile.gettempdir()).glob("qisd-demo-*"))
    done = qisd("demo", "--json")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["rows_found"] == 9 and len(summary["signers"]) == 3
    assert summary["asker_held_before"] == 0, "the asker must find the rows, not hold them"
    assert summary["synthesis"]["status"] == "synthesized"
    assert summary["synthesis"]["best_intervention"] == "cosine_annealing"
    assert set(Path(tempfile.gettempdir()).glob("qisd-demo-*")) == before
    human = qisd("demo")
    assert human.returncode == 0 and "Try 'cosine_annealing'" in human.stdout


def test_systemd_readiness_is_notified(tmp_path: Path) -> None:
    notify = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(str(notify))
        listener.settimeout(30)
        d = Daemon(tmp_path / "sd", env={"NOTIFY_SOCKET": str(notify)})
        try:
            message = listener.recv(4096).decode()
            assert "READY=1" in message.splitlines()
            assert f"MAINPID={d.proc.pid}" in message
        finally:
            assert d.terminate() == 0
        assert "STOPPING=1" in listener.recv(4096).decode()


def test_the_flight_endpoint_starts_beside_the_daemon(tmp_path: Path) -> None:
    import pyarrow.flight as flight

    d = Daemon(tmp_path / "fl", "--flight", "grpc://127.0.0.1:0")
    try:
        # Logged when it is serving; the readiness line comes after it.
        uri = next(
            m[1]
            for line in d.lines
            if (m := re.search(r"Arrow Flight endpoint at (\S+)", line)) is not None
        )
        client = flight.connect(uri)
        (result,) = list(client.do_action(flight.Action("status", b"")))
        assert json.loads(result.body.to_pybytes())["node_id"] == d.node_id
        client.close()
    finally:
        assert d.terminate() == 0


def test_the_flight_endpoint_serves_tls_from_start_flags(tmp_path: Path) -> None:
    import pyarrow.flight as flight
    from test_flight import _self_signed

    cert, key = _self_signed(tmp_path)
    d = Daemon(
        tmp_path / "tls",
        "--flight",
        "grpc+tls://127.0.0.1:0",
        "--flight-tls-cert",
        str(cert),
        "--flight-tls-key",
        str(key),
    )
    try:
        uri = next(
            m[1]
            for line in d.lines
            if (m := re.search(r"Arrow Flight endpoint at (\S+)", line)) is not None
        )
        assert uri.startswith("grpc+tls://")
        client = flight.connect(uri, tls_root_certs=cert.read_bytes())
        (result,) = list(client.do_action(flight.Action("status", b"")))
        assert json.loads(result.body.to_pybytes())["node_id"] == d.node_id
        client.close()
    finally:
        assert d.terminate() == 0
    # Half a pair is a one-line configuration error.
    qisd("init", "--data-dir", str(tmp_path / "half"))
    done = qisd(
        "start",
        "--data-dir",
        str(tmp_path / "half"),
        "--port",
        "0",
        "--flight",
        "grpc://127.0.0.1:0",
        "--flight-tls-cert",
        str(cert),
    )
    one_line_error(done, 2, "certificate")


def test_a_udp_port_in_use_is_a_one_line_error(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        qisd("init", "--data-dir", str(tmp_path / "u"))
        done = qisd(
            "start",
            "--data-dir",
            str(tmp_path / "u"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--bootstrap-file",
            os.devnull,
        )
        one_line_error(done, 2, f"127.0.0.1:{port}", "in use")
    assert not (tmp_path / "u" / "control.sock").exists()


def test_every_command_finds_the_daemon_of_the_qisd_config_file(tmp_path: Path) -> None:
    # A site that keeps its settings in one file sets QISD_CONFIG once; init, start, emit,
    # status and stop must all use that file's data_dir, not the default one.
    data_dir = tmp_path / "site"
    config = tmp_path / "qisd.toml"
    config.write_text(
        f'data_dir = "{data_dir}"\nhost = "127.0.0.1"\nport = 0\nbootstrap_file = "{os.devnull}"\n'
    )
    env = {"QISD_CONFIG": str(config), "XDG_DATA_HOME": str(tmp_path / "elsewhere")}
    assert qisd("init", env=env).returncode == 0
    assert (data_dir / "node.key").exists()
    full_env = {k: v for k, v in os.environ.items() if k != "QISD_DATA_DIR"} | env
    proc = subprocess.Popen(
        [*QISD, "start"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=full_env
    )
    try:
        assert proc.stderr is not None
        reader = LineReader(proc.stderr)
        while not (line := reader.readline(timeout=30) or "").startswith("qisd listening on"):
            assert line, "the daemon exited before it was ready"
        status = qisd("status", "--json", env=env)
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)["data_dir"] == str(data_dir)
        emitted = qisd("emit", *FLAGS, env=env)
        assert emitted.returncode == 0, emitted.stderr
        assert qisd("stop", env=env).returncode == 0
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["start", "--flight"], ["start", "--flight", "grpc://127.0.0.1:8815"]),
        (
            ["start", "--flight", "--port", "0"],
            ["start", "--flight", "grpc://127.0.0.1:8815", "--port", "0"],
        ),
        (["start", "--flight", "grpc://[::1]:9000"], ["start", "--flight", "grpc://[::1]:9000"]),
        (["start", "--flight=grpc://h:1"], ["start", "--flight=grpc://h:1"]),
        (
            ["start", "--metrics", "--flight"],
            ["start", "--metrics", "127.0.0.1:8469", "--flight", "grpc://127.0.0.1:8815"],
        ),
        (["start", "--metrics", "[::1]:9"], ["start", "--metrics", "[::1]:9"]),
        (["emit", "--flight"], ["emit", "--flight"]),  # only start has the option
        (["start", "--", "--flight"], ["start", "--", "--flight"]),
    ],
)
def test_a_bare_flight_flag_means_the_default_uri(argv: list[str], expected: list[str]) -> None:
    from qisd_cli.app import _with_flight_default

    assert _with_flight_default(argv) == expected
