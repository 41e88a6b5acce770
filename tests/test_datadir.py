"""The data directory: identity files and their modes, the single-daemon lock, JSON state."""

from __future__ import annotations

import math
import os
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import LineReader

from qisd.errors import IdentityError, QisdError, StoreError
from qisd.net.datadir import (
    KEY_FILE,
    LOCK_FILE,
    SECRET_FILE,
    DaemonRunningError,
    acquire_lock,
    init_identity,
    load_identity,
    read_json,
    resolve_data_dir,
    write_json_atomic,
)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def open_umask() -> Iterator[None]:
    """A umask that would leave files world-readable: the modes must not depend on it."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def test_resolve_data_dir_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("QISD_DATA_DIR", raising=False)
    monkeypatch.delenv("XDG_DATA_HOME", raising=False)
    assert resolve_data_dir(None) == tmp_path / "home" / ".local" / "share" / "qisd"
    monkeypatch.setenv("XDG_DATA_HOME", "relative/ignored")
    assert resolve_data_dir(None) == tmp_path / "home" / ".local" / "share" / "qisd"
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert resolve_data_dir(None) == tmp_path / "xdg" / "qisd"
    monkeypatch.setenv("QISD_DATA_DIR", str(tmp_path / "env"))
    assert resolve_data_dir("") == tmp_path / "env"
    assert resolve_data_dir(str(tmp_path / "arg")) == tmp_path / "arg"
    assert resolve_data_dir("~/x") == tmp_path / "home" / "x"
    assert not (tmp_path / "env").exists()  # resolving creates nothing


def test_init_creates_owner_only_dir_and_files(tmp_path: Path, open_umask: None) -> None:
    data_dir = tmp_path / "a" / "qisd"
    ident = init_identity(data_dir)
    assert mode(data_dir) == 0o700
    assert sorted(p.name for p in data_dir.iterdir()) == [SECRET_FILE, KEY_FILE]
    assert mode(data_dir / KEY_FILE) == 0o600
    assert mode(data_dir / SECRET_FILE) == 0o600
    assert (data_dir / SECRET_FILE).read_bytes() == ident.secret
    assert (data_dir / KEY_FILE).read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")


def test_init_tightens_an_existing_directory(tmp_path: Path) -> None:
    data_dir = tmp_path / "existing"
    data_dir.mkdir(mode=0o755)
    os.chmod(data_dir, 0o755)
    init_identity(data_dir)
    assert mode(data_dir) == 0o700


def test_init_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    first = init_identity(tmp_path)
    key_bytes = (tmp_path / KEY_FILE).read_bytes()
    with pytest.raises(IdentityError, match="--force") as info:
        init_identity(tmp_path)
    assert str(tmp_path / KEY_FILE) in str(info.value)
    assert (tmp_path / KEY_FILE).read_bytes() == key_bytes
    assert load_identity(tmp_path).node_id == first.node_id

    # An init interrupted before the key was written (a secret, no key) can simply be rerun.
    other = tmp_path / "other"
    init_identity(other)
    (other / KEY_FILE).unlink()
    rerun = init_identity(other)
    assert load_identity(other).secret == rerun.secret

    replaced = init_identity(tmp_path, force=True)
    assert replaced.node_id != first.node_id
    assert load_identity(tmp_path).node_id == replaced.node_id
    assert mode(tmp_path / KEY_FILE) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([KEY_FILE, SECRET_FILE, "other"])


def test_node_id_is_stable_across_restarts(tmp_path: Path) -> None:
    made = init_identity(tmp_path)
    code = (
        "import sys; from qisd.net.datadir import load_identity;"
        "i = load_identity(sys.argv[1]); print(i.node_id, i.commit('/data/x'))"
    )
    runs = [
        subprocess.run(
            [sys.executable, "-c", code, str(tmp_path)],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout.split()
        for _ in range(2)
    ]
    assert runs[0] == runs[1] == [made.node_id, made.commit("/data/x")]
    loaded = load_identity(tmp_path)
    assert loaded.public_key == made.public_key and loaded.dht_id == made.dht_id


def test_missing_identity_says_run_init(tmp_path: Path) -> None:
    with pytest.raises(IdentityError, match="run qisd init"):
        load_identity(tmp_path)
    with pytest.raises(IdentityError, match="run qisd init"):
        load_identity(tmp_path / "nowhere")


@pytest.mark.parametrize("name", [KEY_FILE, SECRET_FILE])
@pytest.mark.parametrize("bad_mode", [0o640, 0o604, 0o660])
def test_a_key_file_others_can_read_is_refused(tmp_path: Path, name: str, bad_mode: int) -> None:
    init_identity(tmp_path)
    path = tmp_path / name
    os.chmod(path, bad_mode)
    with pytest.raises(IdentityError) as info:
        load_identity(tmp_path)
    assert f"chmod 600 {path}" in str(info.value)
    assert f"{bad_mode:04o}" in str(info.value)
    os.chmod(path, 0o600)
    load_identity(tmp_path)  # fixed as the message says


def test_damaged_identity_files_are_refused(tmp_path: Path) -> None:
    init_identity(tmp_path)
    (tmp_path / SECRET_FILE).write_bytes(b"short")
    with pytest.raises(IdentityError, match="32 bytes"):
        load_identity(tmp_path)
    init_identity(tmp_path, force=True)
    (tmp_path / KEY_FILE).write_bytes(b"not a key")
    with pytest.raises(IdentityError, match="not a readable private key"):
        load_identity(tmp_path)
    (tmp_path / KEY_FILE).unlink()
    os.symlink(tmp_path / SECRET_FILE, tmp_path / KEY_FILE)
    with pytest.raises(IdentityError):
        load_identity(tmp_path)


# --------------------------------------------------------------------------- lock

HOLDER = (
    "import sys; from qisd.net.datadir import acquire_lock;"
    "lock = acquire_lock(sys.argv[1]); print('locked', flush=True); sys.stdin.read()"
)


def start_holder(data_dir: Path) -> tuple[subprocess.Popen[bytes], LineReader]:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(data_dir)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    reader = LineReader(proc.stdout)
    assert reader.readline(timeout=60) == "locked"
    return proc, reader


def test_lock_refuses_a_second_daemon(tmp_path: Path) -> None:
    init_identity(tmp_path)
    proc, _ = start_holder(tmp_path)
    try:
        with pytest.raises(DaemonRunningError) as info:
            acquire_lock(tmp_path)
        assert isinstance(info.value, QisdError)
        assert str(info.value) == (f"another qisd daemon is running on {tmp_path} (pid {proc.pid})")
    finally:
        assert proc.stdin is not None
        proc.stdin.close()  # the holder exits cleanly, which releases the lock
        assert proc.wait(timeout=60) == 0
        assert proc.stdout is not None
        proc.stdout.close()
    with acquire_lock(tmp_path) as lock:
        assert lock.held
        assert (tmp_path / LOCK_FILE).read_text().strip() == str(os.getpid())
        assert mode(tmp_path / LOCK_FILE) == 0o600
        with pytest.raises(DaemonRunningError, match=f"pid {os.getpid()}"):
            acquire_lock(tmp_path)
    assert not lock.held
    acquire_lock(tmp_path).release()


def test_init_force_refuses_while_a_daemon_runs(tmp_path: Path) -> None:
    # The daemon keeps signing with the key it loaded: replacing it underneath would leave
    # the directory naming one node and the running daemon another.
    first = init_identity(tmp_path)
    before = (tmp_path / KEY_FILE).read_bytes()
    proc, _ = start_holder(tmp_path)
    try:
        with pytest.raises(DaemonRunningError, match="another qisd daemon is running"):
            init_identity(tmp_path, force=True)
        assert (tmp_path / KEY_FILE).read_bytes() == before
        assert load_identity(tmp_path).node_id == first.node_id
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        assert proc.wait(timeout=60) == 0
        assert proc.stdout is not None
        proc.stdout.close()
    assert init_identity(tmp_path, force=True).node_id != first.node_id


def test_a_killed_daemon_leaves_no_stale_lock(tmp_path: Path) -> None:
    proc, _ = start_holder(tmp_path)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    for stream in (proc.stdin, proc.stdout):
        assert stream is not None
        stream.close()
    with acquire_lock(tmp_path) as lock:
        assert lock.held


# --------------------------------------------------------------------------- JSON state


def test_json_state_round_trip(tmp_path: Path, open_umask: None) -> None:
    path = tmp_path / "routing.json"
    assert read_json(path, {"empty": True}) == {"empty": True}
    state = {"contacts": [["127.0.0.1", 8468, "ab" * 20]], "version": 1}
    write_json_atomic(path, state)
    write_json_atomic(path, {**state, "version": 2})
    assert read_json(path) == {**state, "version": 2}
    assert mode(path) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["routing.json"]  # no temp files left


def test_json_state_refuses_what_json_cannot_hold(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    write_json_atomic(path, [1])
    with pytest.raises(ValueError):
        write_json_atomic(path, {"x": math.nan})
    with pytest.raises(TypeError):
        write_json_atomic(path, {"x": object()})
    assert read_json(path) == [1]  # a failed write leaves the old content
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_damaged_json_state_is_an_error_not_a_silent_default(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.write_text('{"half": ')
    with pytest.raises(StoreError, match="not valid JSON"):
        read_json(path, {})
    assert path.read_text() == '{"half": '
