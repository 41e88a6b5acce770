"""The node's data directory: identity files, the single-daemon lock and small JSON state.

Layout (the directory is mode 0700; every file qisd writes in it is 0600)::

    node.key            Ed25519 private key, PKCS#8 PEM (``openssl pkey -in node.key`` reads it)
    commitment.secret   32 random bytes keying the raw_data_hash commitments
    qisd.lock           flock()ed by the running daemon; holds its pid
    store.sqlite3       the envelope store (qisd.net.store), with its -wal and -shm files
    *.json              small state (routing table, ...) written by write_json_atomic

Every file is written to a temporary file in the same directory, fsynced, then moved into place
(and the directory fsynced), so a crash leaves the old file or the new one, never a torn one.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import stat
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    load_pem_private_key,
)

from qisd.core.crypto import SECRET_BYTES, Identity
from qisd.errors import DaemonRunningError, IdentityError, StoreError

KEY_FILE = "node.key"
"""The Ed25519 private key (PEM) inside the data directory."""
SECRET_FILE = "commitment.secret"
"""The 32-byte commitment secret inside the data directory."""
LOCK_FILE = "qisd.lock"
"""The daemon's single-instance lock file inside the data directory."""
ENV_DATA_DIR = "QISD_DATA_DIR"
"""Environment variable naming the data directory."""

_MAX_KEY_FILE_BYTES = 4096


def resolve_data_dir(arg: str | os.PathLike[str] | None) -> Path:
    """The data directory: ``arg``, else ``$QISD_DATA_DIR``, else ``$XDG_DATA_HOME/qisd``,
    else ``~/.local/share/qisd`` (an absolute path; nothing is created)."""
    if arg is not None and str(arg) != "":
        return Path(arg).expanduser().absolute()
    env = os.environ.get(ENV_DATA_DIR, "")
    if env:
        return Path(env).expanduser().absolute()
    xdg = os.environ.get("XDG_DATA_HOME", "")
    # The XDG spec says a relative XDG_DATA_HOME is invalid and must be ignored.
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".local" / "share"
    return (base / "qisd").absolute()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_private(path: Path, data: bytes, *, replace: bool) -> None:
    """Write ``data`` to ``path`` (mode 0600) atomically.

    The temporary file is created with O_EXCL (never through a planted file or symlink). With
    ``replace`` false the final step is ``link()``, which fails if ``path`` already exists, so a
    concurrent ``init`` can never overwrite an identity.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        try:
            os.fchmod(fd, 0o600)  # the umask cannot widen it, but be explicit
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        if replace:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise IdentityError(f"{path} already exists; pass --force to replace it") from None
        _fsync_dir(path.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def ensure_data_dir(data_dir: str | os.PathLike[str]) -> Path:
    """Create the data directory (and parents) if needed and make it owner-only (0700).

    An existing directory is tightened to 0700 too: it holds the key, the store and the control
    socket, and none of them is anyone else's business.
    """
    path = Path(data_dir)
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not path.is_dir():
            raise IdentityError(f"{path} exists and is not a directory")
        if stat.S_IMODE(path.stat().st_mode) != 0o700:
            os.chmod(path, 0o700)
    except OSError as exc:
        raise IdentityError(
            f"cannot create the data directory {path}: {exc.strerror or exc}"
        ) from None
    return path


def init_identity(data_dir: str | os.PathLike[str], *, force: bool = False) -> Identity:
    """Create the data directory and a new node identity in it; returns the identity.

    Refuses (IdentityError naming the file) if an identity file already exists, unless
    ``force``: then the old key is replaced and the old node id is gone for good. Refuses
    (DaemonRunningError) while a daemon holds the directory's lock.
    """
    path = ensure_data_dir(data_dir)
    key_path, secret_path = path / KEY_FILE, path / SECRET_FILE
    if not force and (key_path.exists() or key_path.is_symlink()):
        raise IdentityError(
            f"{key_path} already holds a node identity; pass --force to replace it "
            "(the old node id is lost)"
        )
    # A running daemon keeps signing with the key it loaded: replacing the files under it
    # would leave the directory and the daemon disagreeing about who this node is. A daemon
    # creates the lock file before anything else, so without one no daemon can be running.
    guard = acquire_lock(path) if (path / LOCK_FILE).exists() else contextlib.nullcontext()
    with guard:
        identity = Identity.generate()
        pem = identity.private_key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
        try:
            # Secret first, key last: the key file is what makes an identity exist. A crash
            # between the two leaves a secret with no key, which nothing was ever signed with,
            # so a rerun of init may replace it; the key is linked into place only if absent.
            _write_private(secret_path, identity.secret, replace=True)
            _write_private(key_path, pem, replace=force)
        except OSError as exc:
            raise IdentityError(
                f"cannot write the identity in {path}: {exc.strerror or exc}"
            ) from None
    return identity


def _read_private(path: Path, what: str) -> bytes:
    """Read an owner-only file, refusing one that group or others can access."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise IdentityError(
            f"no node identity in {path.parent} ({path.name} is missing): run qisd init"
        ) from None
    except OSError as exc:
        raise IdentityError(f"cannot read the {what} {path}: {exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)  # check the file we opened, not whatever the path names now
        if not stat.S_ISREG(st.st_mode):
            raise IdentityError(f"the {what} {path} is not a regular file")
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o077:
            raise IdentityError(
                f"the {what} {path} is accessible by other users (mode {mode:04o}); "
                f"fix it with: chmod 600 {path}"
            )
        if st.st_uid != os.geteuid():
            raise IdentityError(
                f"the {what} {path} belongs to uid {st.st_uid}, not to this user "
                f"(uid {os.geteuid()}); run qisd as its owner"
            )
        data = os.read(fd, _MAX_KEY_FILE_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) > _MAX_KEY_FILE_BYTES:
        raise IdentityError(f"the {what} {path} is too large to be one")
    return data


def load_identity(data_dir: str | os.PathLike[str]) -> Identity:
    """The identity stored by :func:`init_identity` (the same node id on every start).

    IdentityError if it is missing ("run qisd init"), readable by anyone but the owner (with
    the chmod command that fixes it), or damaged.
    """
    path = Path(data_dir)
    key_path, secret_path = path / KEY_FILE, path / SECRET_FILE
    pem = _read_private(key_path, "private key file")
    secret = _read_private(secret_path, "commitment secret file")
    try:
        key = load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise IdentityError(f"{key_path} is not a readable private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise IdentityError(f"{key_path} holds a {type(key).__name__}, not an Ed25519 key")
    if len(secret) != SECRET_BYTES:
        raise IdentityError(
            f"{secret_path} must hold {SECRET_BYTES} bytes, not {len(secret)}; "
            "it is damaged (qisd init --force makes a new identity)"
        )
    return Identity(key, secret)


class DataDirLock:
    """The daemon's hold on a data directory; released by :meth:`release` or process exit."""

    def __init__(self, fd: int, path: Path) -> None:
        self._fd: int | None = fd
        self.path = path

    def release(self) -> None:
        """Drop the lock (idempotent)."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None

    @property
    def held(self) -> bool:
        """True until released."""
        return self._fd is not None

    def __enter__(self) -> DataDirLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def acquire_lock(data_dir: str | os.PathLike[str]) -> DataDirLock:
    """Take the single-daemon lock of ``data_dir`` (flock on ``qisd.lock``) and record our pid.

    Raises :class:`DaemonRunningError` naming the directory and the holder's pid. The kernel
    drops the lock when the process dies, so a crashed daemon never leaves a stale lock.
    """
    path = Path(data_dir)
    lock_path = path / LOCK_FILE
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        raise IdentityError(
            f"cannot open the lock file {lock_path}: {exc.strerror or exc} (run qisd init?)"
        ) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        finally:
            os.close(fd)
        shown = f"pid {holder}" if holder.isdigit() else "pid unknown"
        raise DaemonRunningError(f"another qisd daemon is running on {path} ({shown})") from None
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return DataDirLock(fd, lock_path)


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as JSON to ``path`` (mode 0600): tmp file, fsync, rename, fsync dir.

    Readers see the old content or the new, never a torn file. NaN and infinities are refused
    (ValueError), as are objects JSON cannot express (TypeError): never pickle.
    """
    p = Path(path)
    data = json.dumps(obj, separators=(",", ":"), allow_nan=False).encode("utf-8")
    try:
        _write_private(p, data, replace=True)
    except OSError as exc:
        raise StoreError(f"cannot write {p}: {exc.strerror or exc}") from None


def read_json(path: str | os.PathLike[str], default: Any = None) -> Any:
    """The JSON value in ``path``, or ``default`` if the file does not exist.

    A file that exists but cannot be read or parsed raises StoreError naming it (never silently
    replaced by ``default``: the caller decides whether to start fresh).
    """
    p = Path(path)
    try:
        text = p.read_bytes()
    except FileNotFoundError:
        return default
    except OSError as exc:
        raise StoreError(f"cannot read {p}: {exc.strerror or exc}") from None
    try:
        return json.loads(text)
    except ValueError as exc:
        raise StoreError(f"{p} is not valid JSON ({exc}); move it aside to start fresh") from None
