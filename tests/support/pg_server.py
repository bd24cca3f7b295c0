"""Throwaway PostgreSQL clusters for the test suite.

``ThrowawayPostgres`` runs ``initdb`` + ``pg_ctl start`` from the machine's PostgreSQL
binaries into a fresh temporary directory, listens on 127.0.0.1 on a free port with
``trust`` authentication and ``fsync=off``, and hands out SQLAlchemy URLs of the form
``postgresql+psycopg://imeisync@127.0.0.1:PORT/DBNAME``::

    pg = ThrowawayPostgres()
    try:
        admin_url = pg.start()            # URL of the "postgres" maintenance database
        url = pg.create_database("demo")  # URL of a new, empty database
        ...
    finally:
        pg.stop()                         # pg_ctl stop -m immediate + remove the temp dir

PostgreSQL refuses to run as root. When the effective uid is 0 the cluster runs as the
``postgres`` system user if it exists, otherwise as ``imeisync-test`` (created with
``useradd --system --no-create-home``), via ``setpriv`` (or ``runuser``).

A watchdog process stops the server if the owning process dies without calling
``stop()`` (SIGKILL, OOM, CI timeout), so no postmaster outlives the test run.

``SharedPostgres`` lets several processes (pytest-xdist workers) share one lazily
started server: the first process that needs it starts it under a file lock and
publishes its coordinates in a state directory; the owning process (the xdist
controller) stops it at the end.

Only the standard library is needed to start/stop the server; ``psycopg`` is needed
to create databases.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import json
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "PostgresError",
    "PostgresStartError",
    "PostgresUnavailable",
    "SharedPostgres",
    "ThrowawayPostgres",
    "default_parent_dir",
    "find_pg_bindir",
    "pg_required",
]

FALLBACK_USER = "imeisync-test"
DEFAULT_SUPERUSER = "imeisync"
_DB_NAME_RE = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
_REQUIRED_BINARIES = ("initdb", "pg_ctl", "postgres")


class PostgresError(RuntimeError):
    """Base class for throwaway-server problems."""


class PostgresUnavailable(PostgresError):
    """This machine cannot run PostgreSQL tests (binaries or driver missing).

    Tests may skip on this locally; they must fail in CI (see ``pg_required``).
    """


class PostgresStartError(PostgresError):
    """The binaries are there but the cluster could not be created or started."""


def pg_required() -> bool:
    """True when a missing PostgreSQL must fail the tests instead of skipping them."""
    if os.environ.get("IMEISYNC_REQUIRE_PG", "").strip().lower() in {"1", "true", "yes"}:
        return True
    ci = os.environ.get("CI", "").strip().lower()
    return ci not in {"", "0", "false", "no"}


def _has_binaries(path: Path) -> bool:
    return all(os.access(path / name, os.X_OK) for name in _REQUIRED_BINARIES)


def find_pg_bindir() -> Path:
    """Locate the directory holding initdb, pg_ctl and postgres.

    Search order: $IMEISYNC_PG_BINDIR, PATH, ``pg_config --bindir``,
    /usr/lib/postgresql/<newest>/bin, /usr/local/pgsql/bin.
    """
    tried: list[str] = []

    explicit = os.environ.get("IMEISYNC_PG_BINDIR")
    if explicit:
        if _has_binaries(Path(explicit)):
            return Path(explicit)
        raise PostgresUnavailable(
            f"IMEISYNC_PG_BINDIR={explicit!r} does not contain {', '.join(_REQUIRED_BINARIES)}"
        )

    initdb = shutil.which("initdb")
    if initdb:
        # /usr/local/bin/initdb may be a symlink into /usr/lib/postgresql/NN/bin; pg_ctl
        # finds "postgres" next to its own real path, so resolve it.
        real = Path(initdb).resolve().parent
        if _has_binaries(real):
            return real
        if _has_binaries(Path(initdb).parent):
            return Path(initdb).parent
    tried.append("PATH")

    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True
            ).stdout.strip()
            if out and _has_binaries(Path(out)):
                return Path(out)
        tried.append(f"{pg_config} --bindir")

    def _version_key(p: str) -> tuple[int, ...]:
        ver = Path(p).parent.name
        return tuple(int(x) for x in re.findall(r"\d+", ver)) or (0,)

    for candidate in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_version_key, reverse=True):
        if _has_binaries(Path(candidate)):
            return Path(candidate)
    tried.append("/usr/lib/postgresql/*/bin")
    if _has_binaries(Path("/usr/local/pgsql/bin")):
        return Path("/usr/local/pgsql/bin")
    tried.append("/usr/local/pgsql/bin")

    raise PostgresUnavailable(
        "PostgreSQL server binaries (initdb, pg_ctl, postgres) not found; searched "
        + ", ".join(tried)
        + ". Install them (Debian/Ubuntu: apt-get install postgresql-15) or set "
        "IMEISYNC_PG_BINDIR to the directory containing them."
    )


@dataclass(frozen=True)
class RunAs:
    """Unprivileged account the cluster runs as when we are root."""

    name: str
    uid: int
    gid: int

    def wrap(self, cmd: list[str]) -> list[str]:
        setpriv = shutil.which("setpriv")
        if setpriv:
            return [
                setpriv,
                f"--reuid={self.uid}",
                f"--regid={self.gid}",
                "--init-groups",
                "--",
                *cmd,
            ]
        runuser = shutil.which("runuser")
        if runuser:
            return [runuser, "-u", self.name, "--", *cmd]
        raise PostgresUnavailable(
            "running as root but neither setpriv nor runuser is available to drop privileges "
            "for PostgreSQL (which refuses to run as root)"
        )


def _resolve_run_as() -> RunAs | None:
    """None when not root; otherwise the unprivileged user to run PostgreSQL as."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", FALLBACK_USER):
        with contextlib.suppress(KeyError):
            pw = pwd.getpwnam(name)
            return RunAs(pw.pw_name, pw.pw_uid, pw.pw_gid)
    useradd = shutil.which("useradd")
    if not useradd:
        raise PostgresUnavailable(
            f"running as root, no 'postgres' user exists and useradd is missing, so the "
            f"unprivileged user {FALLBACK_USER!r} cannot be created"
        )
    proc = subprocess.run(
        [useradd, "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", FALLBACK_USER],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    try:
        pw = pwd.getpwnam(FALLBACK_USER)
    except KeyError:
        raise PostgresStartError(
            f"useradd {FALLBACK_USER} failed (exit {proc.returncode}): {proc.stderr.strip()}"
        ) from None
    return RunAs(pw.pw_name, pw.pw_uid, pw.pw_gid)


def _check_traversable(path: Path, run_as: RunAs) -> None:
    """Every ancestor of path must be searchable by run_as (e.g. not under /root)."""
    for p in [path, *path.parents]:
        st = p.stat()
        if st.st_uid == run_as.uid:
            ok = st.st_mode & stat.S_IXUSR
        elif st.st_gid == run_as.gid:
            ok = st.st_mode & stat.S_IXGRP
        else:
            ok = st.st_mode & stat.S_IXOTH
        if not ok:
            raise PostgresStartError(
                f"{p} is not traversable by user {run_as.name!r} "
                f"(mode {stat.filemode(st.st_mode)}); use e.g. /tmp or IMEISYNC_PG_TMPDIR"
            )


def default_parent_dir() -> Path:
    """Where clusters go: $IMEISYNC_PG_TMPDIR, else /dev/shm if it is a roomy tmpfs, else /tmp.

    tmpfs matters: CREATE DATABASE takes ~10 ms there versus ~200 ms on a slow disk, and
    every PostgreSQL test creates one. /dev/shm and /tmp are world-traversable, which the
    unprivileged server user needs (never use a directory under /root).
    """
    explicit = os.environ.get("IMEISYNC_PG_TMPDIR")
    if explicit:
        return Path(explicit)
    shm = Path("/dev/shm")
    with contextlib.suppress(OSError):
        st = os.statvfs(shm)
        if (
            shm.is_dir()
            and os.access(shm, os.W_OK | os.X_OK)
            and st.f_bavail * st.f_frsize >= 1 << 30
        ):
            return shm
    return Path("/tmp") if os.path.isdir("/tmp") else Path(tempfile.gettempdir())


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"<could not read {path}: {exc}>"
    return "\n".join(text.splitlines()[-lines:])


def _clean_env() -> dict[str, str]:
    # Stray PGDATA/PGPORT/PGHOST/... from the caller must not leak into initdb/pg_ctl.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = "C"
    env["LANG"] = "C"
    return env


# Runs detached; stops the cluster when the owner process disappears without stop().
_WATCHDOG = r"""
import os, shutil, subprocess, sys, time
owner, base_dir, pidfile, cmd = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4:]
while os.path.exists(pidfile):
    try:
        os.kill(owner, 0)
    except ProcessLookupError:
        subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, timeout=60)
        shutil.rmtree(base_dir, ignore_errors=True)
        break
    except PermissionError:
        pass
    time.sleep(0.5)
"""


class ThrowawayPostgres:
    """A private PostgreSQL cluster in a temporary directory, for tests.

    :param parent_dir: where to create the cluster's temp dir (default: see
        ``default_parent_dir``). When running as root it must be traversable by the
        unprivileged user.
    :param owner_pid: process whose death triggers the watchdog (default: this process).
    :param watchdog: start the watchdog process (default True).
    """

    def __init__(
        self,
        parent_dir: str | os.PathLike[str] | None = None,
        *,
        superuser: str = DEFAULT_SUPERUSER,
        owner_pid: int | None = None,
        watchdog: bool = True,
        start_timeout: float = 60.0,
    ) -> None:
        self.parent_dir = Path(parent_dir) if parent_dir else None
        self.superuser = superuser
        self.owner_pid = owner_pid if owner_pid is not None else os.getpid()
        self.watchdog = watchdog
        self.start_timeout = start_timeout
        self.bindir: Path | None = None
        self.run_as: RunAs | None = None
        self.base_dir: Path | None = None
        self.port: int | None = None
        self._watchdog_proc: subprocess.Popen[bytes] | None = None
        self.startup_seconds: float | None = None
        self._admin_conn: Any = None

    # -- paths & URLs -------------------------------------------------------------------

    @property
    def data_dir(self) -> Path:
        assert self.base_dir is not None, "server not started"
        return self.base_dir / "data"

    @property
    def log_path(self) -> Path:
        assert self.base_dir is not None, "server not started"
        return self.base_dir / "postgres.log"

    @property
    def running(self) -> bool:
        return self.base_dir is not None and (self.data_dir / "postmaster.pid").exists()

    def url(self, dbname: str = "postgres") -> str:
        if self.port is None:
            raise PostgresError("server not started")
        return f"postgresql+psycopg://{self.superuser}@127.0.0.1:{self.port}/{dbname}"

    def _cmd(self, name: str, *args: str) -> list[str]:
        assert self.bindir is not None
        cmd = [str(self.bindir / name), *args]
        return self.run_as.wrap(cmd) if self.run_as else cmd

    def _run(self, cmd: list[str], log: Path, timeout: float) -> subprocess.CompletedProcess[str]:
        with open(log, "a") as out:
            return subprocess.run(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.base_dir,
                env=_clean_env(),
                timeout=timeout,
                start_new_session=True,  # a Ctrl-C in the terminal must not hit the server
                text=True,
            )

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> str:
        """Create and start the cluster; return the URL of its ``postgres`` database."""
        if self.running:
            return self.url()
        t0 = time.monotonic()
        try:
            import psycopg  # noqa: F401
        except ImportError as exc:
            raise PostgresUnavailable(
                f"the psycopg driver is not installed ({exc}); pip install -e '.[test]'"
            ) from exc
        self.bindir = find_pg_bindir()
        self.run_as = _resolve_run_as()

        parent = (self.parent_dir or default_parent_dir()).resolve()
        if self.run_as:
            _check_traversable(parent, self.run_as)
        self.base_dir = Path(tempfile.mkdtemp(prefix="imeisync-pg-", dir=parent))
        os.chmod(self.base_dir, 0o755)
        if self.run_as:
            os.chown(self.base_dir, self.run_as.uid, self.run_as.gid)

        try:
            self._initdb()
            self._pg_ctl_start()
            if self.watchdog:
                self._start_watchdog()
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - t0
        return self.url()

    def _initdb(self) -> None:
        log = self.base_dir / "initdb.log"
        cmd = self._cmd(
            "initdb",
            "-D", str(self.data_dir),
            "-U", self.superuser,
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
        )  # fmt: skip
        try:
            proc = self._run(cmd, log, timeout=self.start_timeout)
        except subprocess.TimeoutExpired:
            raise PostgresStartError(
                f"initdb timed out after {self.start_timeout}s; {log}:\n{_tail(log)}"
            ) from None
        if proc.returncode != 0:
            raise PostgresStartError(
                f"initdb failed (exit {proc.returncode}): {' '.join(cmd)}\n"
                f"--- {log} ---\n{_tail(log)}"
            )
        settings = {
            "listen_addresses": "'127.0.0.1'",
            "unix_socket_directories": f"'{self.base_dir}'",
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "max_connections": "200",
            "shared_buffers": "32MB",
            "timezone": "'UTC'",
            "log_timezone": "'UTC'",
            "logging_collector": "off",
            "log_min_messages": "warning",
        }
        with open(self.data_dir / "postgresql.conf", "a") as conf:
            conf.write("\n# imeisync throwaway test cluster\n")
            conf.writelines(f"{k} = {v}\n" for k, v in settings.items())

    def _pg_ctl_start(self) -> None:
        ctl_log = self.base_dir / "pg_ctl.log"
        last_error = ""
        for _attempt in range(5):
            self.port = _free_port()
            log_size = self.log_path.stat().st_size if self.log_path.exists() else 0
            cmd = self._cmd(
                "pg_ctl", "start",
                "-D", str(self.data_dir),
                "-l", str(self.log_path),
                "-o", f"-p {self.port}",
                "-w", "-t", str(int(self.start_timeout)),
            )  # fmt: skip
            try:
                proc = self._run(cmd, ctl_log, timeout=self.start_timeout + 10)
            except subprocess.TimeoutExpired:
                proc = None
            if proc is not None and proc.returncode == 0:
                return
            with contextlib.suppress(OSError), open(self.log_path, errors="replace") as f:
                f.seek(log_size)
                last_error = f.read()
            if "could not bind" in last_error or "Address already in use" in last_error:
                self._kill_postmaster()
                continue  # lost the race for the port; pick another
            break
        rc = "timeout" if proc is None else f"exit {proc.returncode}"
        raise PostgresStartError(
            f"pg_ctl start failed ({rc}) on 127.0.0.1:{self.port}\n"
            f"--- {ctl_log} ---\n{_tail(ctl_log, 10)}\n"
            f"--- {self.log_path} (tail) ---\n{_tail(self.log_path)}"
        )

    def _start_watchdog(self) -> None:
        stop_cmd = self._cmd("pg_ctl", "stop", "-D", str(self.data_dir), "-m", "immediate", "-w")
        self._watchdog_proc = subprocess.Popen(
            [sys.executable, "-c", _WATCHDOG, str(self.owner_pid), str(self.base_dir),
             str(self.data_dir / "postmaster.pid"), *stop_cmd],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=self.base_dir,
            env=_clean_env(),
            start_new_session=True,
            close_fds=True,
        )  # fmt: skip
        # It exits by itself once postmaster.pid is gone (normal stop, from any process).

    def _postmaster_pid(self) -> int | None:
        try:
            return int((self.data_dir / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return None

    def _kill_postmaster(self) -> None:
        pid = self._postmaster_pid()
        if pid is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGQUIT)  # "immediate shutdown" for the postmaster
            for _ in range(50):
                os.kill(pid, 0)
                time.sleep(0.1)
            os.kill(pid, signal.SIGKILL)

    def stop(self) -> None:
        """Stop the server (``pg_ctl stop -m immediate``) and delete its directory.

        Idempotent and safe to call from a different process than the one that started
        it (see ``from_state``).
        """
        if self._admin_conn is not None:
            with contextlib.suppress(Exception):
                self._admin_conn.close()
            self._admin_conn = None
        if self.base_dir is None:
            return
        if self.running and self.bindir is not None:
            cmd = self._cmd("pg_ctl", "stop", "-D", str(self.data_dir), "-m", "immediate", "-w")
            try:
                proc = self._run(cmd, self.base_dir / "pg_ctl.log", timeout=60)
                failed = proc.returncode != 0
            except (OSError, subprocess.SubprocessError, PostgresError):
                failed = True
            if failed:
                self._kill_postmaster()
        if self._watchdog_proc is not None:  # only set in the process that started it
            self._watchdog_proc.terminate()  # our own child: safe to signal by Popen
            self._watchdog_proc.wait(timeout=10)
            self._watchdog_proc = None
        shutil.rmtree(self.base_dir, ignore_errors=True)
        self.base_dir = None
        self.port = None

    def __enter__(self) -> ThrowawayPostgres:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- databases ----------------------------------------------------------------------

    def _admin(self) -> Any:
        import psycopg

        if self._admin_conn is None or self._admin_conn.closed:
            if self.port is None:
                raise PostgresError("server not started")
            self._admin_conn = psycopg.connect(
                host="127.0.0.1",
                port=self.port,
                user=self.superuser,
                dbname="postgres",
                autocommit=True,
                connect_timeout=10,
            )
        return self._admin_conn

    def create_database(self, name: str | None = None) -> str:
        """Create a new empty database and return its SQLAlchemy URL.

        ``name`` must be a lowercase identifier; by default a unique one is generated.
        """
        from psycopg import sql

        name = name or f"db_{uuid.uuid4().hex[:16]}"
        if not _DB_NAME_RE.match(name):
            raise ValueError(f"invalid database name {name!r}: use [a-z_][a-z0-9_]*, <= 63 chars")
        self._admin().execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.url(name)

    def drop_database(self, name: str) -> None:
        """Drop a database, disconnecting any remaining sessions."""
        from psycopg import sql

        self._admin().execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )

    # -- sharing between processes ------------------------------------------------------

    def to_state(self) -> dict[str, Any]:
        return {
            "superuser": self.superuser,
            "owner_pid": self.owner_pid,
            "bindir": str(self.bindir),
            "run_as": asdict(self.run_as) if self.run_as else None,
            "base_dir": str(self.base_dir),
            "port": self.port,
            "startup_seconds": self.startup_seconds,
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> ThrowawayPostgres:
        """Attach to a server started by another process (does not start anything)."""
        pg = cls(superuser=state["superuser"], owner_pid=state["owner_pid"], watchdog=False)
        pg.bindir = Path(state["bindir"])
        pg.run_as = RunAs(**state["run_as"]) if state["run_as"] else None
        pg.base_dir = Path(state["base_dir"])
        pg.port = state["port"]
        pg.startup_seconds = state["startup_seconds"]
        return pg


class SharedPostgres:
    """One lazily started ``ThrowawayPostgres`` shared by cooperating processes.

    All processes get the same ``state_dir`` (created by the owner, e.g. the pytest-xdist
    controller). ``get()`` starts the server on first use under an exclusive ``flock`` and
    records it in ``state_dir/server.json``; a start failure is recorded too so that other
    processes fail fast with the same message. Only the owner calls ``shutdown()``.
    """

    def __init__(self, state_dir: str | os.PathLike[str], owner_pid: int) -> None:
        self.state_dir = Path(state_dir)
        self.owner_pid = owner_pid
        self._server: ThrowawayPostgres | None = None

    @contextlib.contextmanager
    def _locked(self):
        with open(self.state_dir / "lock", "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    @property
    def _state_file(self) -> Path:
        return self.state_dir / "server.json"

    @property
    def _error_file(self) -> Path:
        return self.state_dir / "error.json"

    def get(self) -> ThrowawayPostgres:
        if self._server is not None:
            return self._server
        with self._locked():
            if self._state_file.exists():
                self._server = ThrowawayPostgres.from_state(
                    json.loads(self._state_file.read_text())
                )
                return self._server
            if self._error_file.exists():
                err = json.loads(self._error_file.read_text())
                kind = PostgresUnavailable if err["kind"] == "unavailable" else PostgresStartError
                raise kind(err["message"])
            server = ThrowawayPostgres(owner_pid=self.owner_pid)
            try:
                server.start()
            except PostgresError as exc:
                kind = "unavailable" if isinstance(exc, PostgresUnavailable) else "start"
                self._error_file.write_text(json.dumps({"kind": kind, "message": str(exc)}))
                raise
            tmp = self._state_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(server.to_state()))
            tmp.replace(self._state_file)
            self._server = server
            return server

    def shutdown(self) -> None:
        """Stop the server if anyone started it. Call from the owner process only."""
        if self._server is not None:
            self._server.stop()
        with self._locked():
            if self._state_file.exists() and self._server is None:
                with contextlib.suppress(OSError, ValueError, KeyError):
                    ThrowawayPostgres.from_state(json.loads(self._state_file.read_text())).stop()
            self._state_file.unlink(missing_ok=True)
            self._server = None


def _selftest() -> None:  # pragma: no cover - manual check: python tests/support/pg_server.py
    pg = ThrowawayPostgres()
    try:
        print("admin url:", pg.start())
        print(f"startup: {pg.startup_seconds:.2f}s")
        t0 = time.monotonic()
        print("db url:", pg.create_database())
        print(f"create database: {time.monotonic() - t0:.3f}s")
    finally:
        pg.stop()


if __name__ == "__main__":  # pragma: no cover
    _selftest()
