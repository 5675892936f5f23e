"""A private PostgreSQL cluster, for when the user has not configured a database of their own.

The server listens on 127.0.0.1 only, with unix sockets off, and trusts every local connection:
it holds throwaway demo and benchmark data, nothing else. It listens on the port it had last
time when that port is free (a new free one otherwise): dbt keeps its partial parse only while
the connection settings stay the same, and a full parse costs about two seconds per command.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import pwd
import re
import shutil
import socket
import stat
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Any

import psycopg
from psycopg import sql

from runner.errors import RunnerError

BINARIES = ("initdb", "pg_ctl", "postgres")
BINDIR_ENV = "RUNNER_PG_BINDIR"
HOST = "127.0.0.1"
SUPERUSER = "postgres"
# initdb, pg_ctl and postgres refuse to run as root; as root they run as this user instead.
UNPRIVILEGED_USER = "nobody"
# Tuned for benchmarks on a 2-core, 24 GiB machine. fsync stays on so that timings are those of
# a durable database, not of one that may lose committed work.
SERVER_SETTINGS = {
    "shared_buffers": "1GB",
    "work_mem": "64MB",
    "maintenance_work_mem": "1GB",
    "max_wal_size": "8GB",
    "checkpoint_timeout": "30min",
    "max_parallel_workers_per_gather": "2",
    "fsync": "on",
}
_PROBLEM_LINE = re.compile(r"\b(FATAL|PANIC|ERROR|error):")


DATA_DIR_ENV = "RUNNER_DATA_DIR"


def default_data_dir(project_dir: Path) -> Path:
    """Where the project's own cluster lives: $RUNNER_DATA_DIR, or the git-ignored `.runner/`."""
    configured = os.environ.get(DATA_DIR_ENV)
    return Path(configured) if configured else project_dir / ".runner" / "pg"


def _has_binaries(directory: Path) -> bool:
    return all((directory / name).is_file() for name in BINARIES)


def _pgserver_bindir() -> Path | None:
    # find_spec locates the package without importing it: only its bundled binaries are wanted.
    spec = importlib.util.find_spec("pgserver")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def _pg_config_bindir() -> Path | None:
    pg_config = shutil.which("pg_config")
    if pg_config is None:
        return None
    try:
        result = subprocess.run(
            [pg_config, "--bindir"], capture_output=True, text=True, check=True, timeout=30
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return Path(result.stdout.strip())


def find_bindir() -> Path:
    """The directory holding initdb, pg_ctl and postgres.

    Searched in order: $RUNNER_PG_BINDIR, `pg_config --bindir`, the directory of initdb on PATH,
    then the binaries bundled with the pgserver package.
    """
    configured = os.environ.get(BINDIR_ENV)
    if configured:
        bindir = Path(configured).expanduser()
        if not _has_binaries(bindir):
            raise RunnerError(
                f"{BINDIR_ENV}={configured} does not contain {', '.join(BINARIES)}: "
                "point it at a PostgreSQL server's bin directory, or unset it"
            )
        return bindir
    initdb = shutil.which("initdb")
    candidates = (
        _pg_config_bindir(),
        Path(initdb).parent if initdb else None,
        _pgserver_bindir(),
    )
    for bindir in candidates:
        if bindir is not None and _has_binaries(bindir):
            return bindir
    raise RunnerError(
        "no PostgreSQL server binaries found: install PostgreSQL "
        "(Debian: apt-get install postgresql) or `pip install pgserver`, "
        f"or set {BINDIR_ENV}"
    )


def _unprivileged_user() -> pwd.struct_passwd | None:
    """The user to run the server as, or None to run it as ourselves."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(UNPRIVILEGED_USER)
    except KeyError:
        raise RunnerError(
            f"running as root, but there is no user {UNPRIVILEGED_USER!r} to run PostgreSQL "
            "as: create it, or run as a normal user"
        ) from None


def _traversable(path: Path, user: pwd.struct_passwd) -> bool:
    """Whether user may pass through path and all its parents (plain mode bits; no ACLs)."""
    for directory in (path, *path.parents):
        try:
            st = directory.stat()
        except FileNotFoundError:
            # Missing directories are created by us, traversable by everyone.
            continue
        if st.st_uid == user.pw_uid:
            bit = stat.S_IXUSR
        elif st.st_gid == user.pw_gid:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not st.st_mode & bit:
            return False
    return True


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _make_parents(path: Path) -> None:
    """Create path's missing parents with mode 0755 whatever the umask, so others can pass."""
    for directory in reversed(path.parents):
        if not directory.exists():
            directory.mkdir()
            directory.chmod(0o755)


def _check_own_dir(path: Path) -> None:
    """Refuse a directory in a shared place (the temp dir) that someone else could have planted."""
    st = path.lstat()
    if (
        not stat.S_ISDIR(st.st_mode)
        or st.st_uid != os.geteuid()
        or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    ):
        raise RunnerError(
            f"refusing to use {path}: it is not a directory owned and writable only by this "
            "user; remove it and retry"
        )


def _runnable_bindir(bindir: Path, user: pwd.struct_passwd | None) -> Path:
    """bindir, or a copy of its installation that user can execute.

    pip installs pgserver's binaries under the installing user's home, which root's (/root,
    mode 0700) is closed to everyone else.
    """
    if user is None or _traversable(bindir, user):
        return bindir
    prefix = bindir.parent
    version = (bindir / "postgres").stat().st_mtime_ns
    copy = Path(tempfile.gettempdir()) / f"runner-pginstall-{_digest(f'{bindir}:{version}')}"
    # The copy keeps the package/prefix layout: binaries of wheels repaired by auditwheel, as
    # pgserver's are, find their libraries in <package>.libs through an RPATH relative to them.
    copied_prefix = Path(prefix.parent.name) / prefix.name
    if not copy.exists():
        staging = Path(tempfile.mkdtemp(prefix=f"{copy.name}-", dir=copy.parent))
        shutil.copytree(prefix, staging / copied_prefix, symlinks=True)
        libs = prefix.parent.parent / f"{prefix.parent.name}.libs"
        if libs.is_dir():
            shutil.copytree(libs, staging / libs.name, symlinks=True)
        staging.chmod(0o755)
        try:
            staging.rename(copy)
        except OSError:
            # Another process made the same copy meanwhile: use theirs.
            shutil.rmtree(staging)
    _check_own_dir(copy)
    return copy / copied_prefix / bindir.name


def _usable_data_dir(requested: Path, user: pwd.struct_passwd | None) -> Path:
    """requested, or a directory in the temp dir when user could not reach requested."""
    if user is None or _traversable(requested.parent, user):
        return requested
    fallback = Path(tempfile.gettempdir()) / f"runner-pg-{_digest(str(requested))}"
    if not _traversable(fallback.parent, user):
        raise RunnerError(
            f"user {user.pw_name} who runs PostgreSQL can reach neither {requested} nor "
            f"{fallback}: use a data directory outside private home directories, or run as a "
            "normal user"
        )
    return fallback / requested.name


def _free_port(preferred: int | None = None) -> int:
    """preferred if nothing listens on it now, else any free port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # As postgres itself does: connections of the last server still in TIME_WAIT do not
        # keep its port from being listened on again.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, preferred or 0))
        except OSError:
            sock.bind((HOST, 0))
        return sock.getsockname()[1]


def _accepts_connections(port: int) -> bool:
    try:
        with psycopg.connect(
            host=HOST, port=port, user=SUPERUSER, dbname="postgres", connect_timeout=3
        ):
            return True
    except psycopg.OperationalError:
        return False


def _is_postgres(pid: int) -> bool | None:
    """Whether pid is a live postgres process; None when pid is no process at all."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        # Our servers run as us (or, as root, as a user we may signal): this one is not ours.
        return False
    if not Path("/proc/self").is_dir():
        # Without procfs a live pid is all there is to go on.
        return True
    try:
        stat_line = (Path("/proc") / str(pid) / "stat").read_text()
    except FileNotFoundError:
        return None
    # "pid (name) state ...", where name may itself hold spaces and parentheses.
    name, _, rest = stat_line.partition(" (")[2].rpartition(") ")
    # A zombie is dead yet keeps its pid until reaped, which some containers' init never does;
    # postgres would take it for a live server.
    return name == "postgres" and not rest.startswith(("Z", "X"))


class EmbeddedPostgres:
    """A PostgreSQL cluster in data_dir, started on demand and stopped by whoever started it.

    Use it as a context manager, or call start() and stop(). With keep_running set, leaving the
    context leaves the server up, for a later object on the same data_dir to reuse or stop.
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        dbname: str = "demo",
        bindir: Path | None = None,
        keep_running: bool = False,
    ) -> None:
        self.requested_data_dir = Path(data_dir).resolve()
        self.dbname = dbname
        self.bindir = Path(bindir).resolve() if bindir is not None else find_bindir()
        if not _has_binaries(self.bindir):
            raise RunnerError(f"{self.bindir} does not contain {', '.join(BINARIES)}")
        self.keep_running = keep_running
        self._user = _unprivileged_user()
        # Differs from requested_data_dir when the unprivileged user could not reach it.
        self.data_dir = _usable_data_dir(self.requested_data_dir, self._user)
        self.log_file = self.data_dir.with_name(f"{self.data_dir.name}.log")
        self.port_file = self.data_dir.with_name(f"{self.data_dir.name}.port")
        self._runnable: Path | None = None
        self._port: int | None = None
        self._started = False

    def __enter__(self) -> EmbeddedPostgres:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if not self.keep_running:
            self.stop()

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError(f"the PostgreSQL server in {self.data_dir} is not started")
        return self._port

    @property
    def started_here(self) -> bool:
        """Whether this object started the server (and so stop() stops it)."""
        return self._started

    @property
    def conninfo(self) -> dict[str, Any]:
        return {"host": HOST, "port": self.port, "user": SUPERUSER, "dbname": self.dbname}

    def environ(self) -> dict[str, str]:
        """libpq's variables, read by psycopg and by dbt's profiles.yml through env_var()."""
        return {
            "PGHOST": HOST,
            "PGPORT": str(self.port),
            "PGUSER": SUPERUSER,
            "PGDATABASE": self.dbname,
        }

    def is_running(self) -> bool:
        lock = self._read_pidfile()
        return lock is not None and _is_postgres(lock[0]) is True and _accepts_connections(lock[1])

    def start(self) -> None:
        """Start the server, or reuse the one already serving data_dir; create the database."""
        lock = self._read_pidfile()
        state = _is_postgres(lock[0]) if lock is not None else None
        if lock is not None and state:
            pid, port = lock
            if not _accepts_connections(port):
                raise RunnerError(
                    f"PostgreSQL (pid {pid}) holds {self.data_dir} but does not accept "
                    f"connections on port {port}: wait for it, or run `runner db stop`"
                )
            self._port = port
        else:
            if state is False:
                # After a crash the pid was reused by an unrelated process, which postgres
                # would take for a live server. A pid that is gone is left to postgres, which
                # also checks that no orphaned backend still uses the old shared memory.
                (self.data_dir / "postmaster.pid").unlink()
            self._prepare_dirs()
            if not (self.data_dir / "PG_VERSION").exists():
                self._run_tool(
                    "initdb",
                    [
                        *("-D", str(self.data_dir), "-U", SUPERUSER),
                        *("--auth=trust", "-E", "UTF8", "--locale=C"),
                    ],
                )
            self._launch()
        self._create_database()

    def stop(self, *, force: bool = False) -> None:
        """Stop the server if this object started it, or whoever did when force is set."""
        if not (self._started or force):
            return
        lock = self._read_pidfile()
        if lock is not None and _is_postgres(lock[0]):
            self._run_tool("pg_ctl stop", ["stop", "-D", str(self.data_dir), "-m", "fast", "-w"])
        self._started = False
        self._port = None

    def _read_pidfile(self) -> tuple[int, int] | None:
        """(pid, port) from postmaster.pid, whose first line is the pid and fourth the port."""
        path = self.data_dir / "postmaster.pid"
        try:
            lines = path.read_text().splitlines()
            return int(lines[0]), int(lines[3])
        except FileNotFoundError:
            return None
        except (IndexError, ValueError):
            # Being written by a starting server, or left half-written by a crash.
            return None
        except PermissionError:
            raise RunnerError(
                f"cannot read {path}: the cluster belongs to another user; run as that user "
                "or use another data directory"
            ) from None

    def _prepare_dirs(self) -> None:
        if self._user is None:
            # initdb creates the data directory itself, with the mode it wants.
            self.data_dir.parent.mkdir(parents=True, exist_ok=True)
            return
        _make_parents(self.data_dir)
        if self.data_dir != self.requested_data_dir:
            _check_own_dir(self.data_dir.parent)
        uid, gid = self._user.pw_uid, self._user.pw_gid
        if not (self.data_dir / "PG_VERSION").exists():
            self.data_dir.mkdir(mode=0o700, exist_ok=True)
            os.chown(self.data_dir, uid, gid)
            self.data_dir.chmod(0o700)
        # pg_ctl opens the log as the unprivileged user, who may not create files beside it.
        self.log_file.touch()
        os.chown(self.log_file, uid, gid)

    def _last_port(self) -> int | None:
        try:
            return int(self.port_file.read_text())
        except (FileNotFoundError, ValueError):
            return None

    def _launch(self) -> None:
        port = _free_port(self._last_port())
        settings = {
            "listen_addresses": HOST,
            "port": str(port),
            # pg_ctl passes -o through sh, which turns '' into the empty value.
            "unix_socket_directories": "''",
            **SERVER_SETTINGS,
        }
        options = " ".join(f"-c {name}={value}" for name, value in settings.items())
        self._run_tool(
            "pg_ctl start",
            ["start", "-w", "-D", str(self.data_dir), "-l", str(self.log_file), "-o", options],
        )
        self._port = port
        self._started = True
        self.port_file.write_text(f"{port}\n")

    def _run_tool(self, what: str, args: list[str]) -> None:
        """Run initdb or pg_ctl (first word of what), as the unprivileged user when root."""
        if self._runnable is None:
            self._runnable = _runnable_bindir(self.bindir, self._user)
        command = [str(self._runnable / what.split()[0]), *args]
        as_user: dict[str, Any] = {}
        if self._user is not None:
            as_user = {"user": self._user.pw_uid, "group": self._user.pw_gid, "extra_groups": []}
        with self.log_file.open("a") as log:
            offset = log.tell()
            try:
                # cwd=/ because the tools fail when they cannot read the current directory.
                result = subprocess.run(
                    command,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd="/",
                    check=False,
                    **as_user,
                )
            except OSError as error:
                raise RunnerError(f"could not run {command[0]}: {error}") from None
        if result.returncode != 0:
            raise RunnerError(
                f"{what} failed for {self.data_dir}{self._problem_since(offset)}; "
                f"log: {self.log_file}"
            )

    def _problem_since(self, offset: int) -> str:
        """': <last error line>' the log gained after offset, to say why in one line."""
        with self.log_file.open(errors="replace") as log:
            log.seek(offset)
            problems = [line.strip() for line in log if _PROBLEM_LINE.search(line)]
        return f": {problems[-1]}" if problems else ""

    def _create_database(self) -> None:
        with psycopg.connect(**{**self.conninfo, "dbname": "postgres"}, autocommit=True) as conn:
            exists = conn.execute(
                "select 1 from pg_database where datname = %s", (self.dbname,)
            ).fetchone()
            if exists is None:
                conn.execute(sql.SQL("create database {}").format(sql.Identifier(self.dbname)))
