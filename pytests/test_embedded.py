"""The embedded PostgreSQL cluster, against real servers."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pwd
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from runner.errors import RunnerError
from runner.server.embedded import EmbeddedPostgres, default_data_dir, find_bindir

MakePg = Callable[..., EmbeddedPostgres]


@pytest.fixture
def base_dir() -> Iterator[Path]:
    """A directory every user can traverse.

    pytest's tmp_path sits under /tmp/pytest-of-<user>, mode 0700, which the unprivileged user
    the server runs as under root cannot enter: data dirs there would all take the fallback.
    """
    path = Path(tempfile.mkdtemp(prefix="runner-test-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


@pytest.fixture
def make_pg() -> Iterator[MakePg]:
    """EmbeddedPostgres objects whose servers are stopped and fallback dirs removed afterwards."""
    made: list[EmbeddedPostgres] = []

    def make(data_dir: Path, **kwargs: Any) -> EmbeddedPostgres:
        pg = EmbeddedPostgres(data_dir, **kwargs)
        made.append(pg)
        return pg

    yield make
    for pg in made:
        pg.stop(force=True)
        if pg.data_dir != pg.requested_data_dir:
            shutil.rmtree(pg.data_dir.parent, ignore_errors=True)


def pgserver_bindir() -> Path:
    spec = importlib.util.find_spec("pgserver")
    assert spec is not None and spec.origin is not None
    return Path(spec.origin).parent / "pginstall" / "bin"


def query(pg: EmbeddedPostgres, statement: str) -> object:
    with psycopg.connect(**pg.conninfo) as conn:
        row = conn.execute(statement).fetchone()
    assert row is not None
    return row[0]


def postmaster_pid(pg: EmbeddedPostgres) -> int:
    return int((pg.data_dir / "postmaster.pid").read_text().splitlines()[0])


def port_is_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def is_dead(pid: int) -> bool:
    """Gone, or a zombie: this sandbox's init does not reap orphans."""
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat_line.rpartition(") ")[2].startswith(("Z", "X"))


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rpartition(") ")[2].split()[1])
            except (FileNotFoundError, ProcessLookupError):
                continue
            if ppid == pid:
                found.append(int(entry.name))
    return found


def test_default_data_dir_is_in_the_ignored_runner_folder(tmp_path: Path) -> None:
    assert default_data_dir(tmp_path) == tmp_path / ".runner" / "pg"


def test_start_connect_stop(base_dir: Path, make_pg: MakePg) -> None:
    pg = make_pg(base_dir / "pg")
    pg.start()
    assert pg.is_running()
    assert pg.started_here
    assert query(pg, "select 1") == 1
    assert int(str(query(pg, "show server_version_num"))) >= 150000
    assert query(pg, "select current_database()") == "demo"
    assert query(pg, "show listen_addresses") == "127.0.0.1"
    assert query(pg, "show unix_socket_directories") == ""
    assert query(pg, "show fsync") == "on"
    assert query(pg, "show shared_buffers") == "1GB"
    assert pg.conninfo == {
        "host": "127.0.0.1",
        "port": pg.port,
        "user": "postgres",
        "dbname": "demo",
    }
    assert pg.environ() == {
        "PGHOST": "127.0.0.1",
        "PGPORT": str(pg.port),
        "PGUSER": "postgres",
        "PGDATABASE": "demo",
    }
    assert pg.log_file.read_text()
    port = pg.port
    pg.stop()
    assert not pg.is_running()
    assert not port_is_open(port)
    assert not (pg.data_dir / "postmaster.pid").exists()


def test_environ_reaches_libpq(
    base_dir: Path, make_pg: MakePg, monkeypatch: pytest.MonkeyPatch
) -> None:
    with make_pg(base_dir / "pg", dbname="other db") as pg:
        for name, value in pg.environ().items():
            monkeypatch.setenv(name, value)
        with psycopg.connect("") as conn:
            row = conn.execute("select current_database(), current_user").fetchone()
    assert row == ("other db", "postgres")
    assert not pg.is_running()


def test_start_twice_is_idempotent(base_dir: Path, make_pg: MakePg) -> None:
    pg = make_pg(base_dir / "pg")
    pg.start()
    port, pid = pg.port, postmaster_pid(pg)
    pg.start()
    assert (pg.port, postmaster_pid(pg)) == (port, pid)
    assert pg.started_here
    pg.stop()
    assert not port_is_open(port)


def test_a_second_object_reuses_the_server_and_only_force_stops_it(
    base_dir: Path, make_pg: MakePg
) -> None:
    data_dir = base_dir / "pg"
    with make_pg(data_dir, keep_running=True) as first:
        port, pid = first.port, postmaster_pid(first)
    assert first.is_running(), "keep_running leaves the server up"

    second = make_pg(data_dir)
    second.start()
    assert (second.port, postmaster_pid(second)) == (port, pid)
    assert not second.started_here
    second.stop()
    assert first.is_running()

    # As `runner db stop` does: a fresh object that never started, nor knows the port.
    make_pg(data_dir).stop(force=True)
    assert not first.is_running()
    assert not port_is_open(port)


def test_restart_keeps_data(base_dir: Path, make_pg: MakePg) -> None:
    pg = make_pg(base_dir / "pg")
    with pg, psycopg.connect(**pg.conninfo) as conn:
        conn.execute("create table kept (id int)")
        conn.execute("insert into kept values (42)")
    assert not pg.is_running()
    with pg:
        assert query(pg, "select id from kept") == 42


def test_a_restart_listens_on_the_same_port_unless_it_is_taken(
    base_dir: Path, make_pg: MakePg
) -> None:
    """dbt's partial parse lasts only while the port it connects to stays the same."""
    pg = make_pg(base_dir / "pg")
    with pg:
        first_port = pg.port
        assert query(pg, "select 1") == 1
    with pg:
        assert pg.port == first_port
    with socket.socket() as squatter:
        # The stopped server's socket may linger in TIME_WAIT; another process may even have
        # taken the port since: either way it is taken, which is what this part needs.
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        with contextlib.suppress(OSError):
            squatter.bind(("127.0.0.1", first_port))
            squatter.listen()
        with pg:
            assert pg.port != first_port
            assert query(pg, "select 1") == 1


def test_a_crashed_server_leaves_no_obstacle(base_dir: Path, make_pg: MakePg) -> None:
    pg = make_pg(base_dir / "pg")
    pg.start()
    with psycopg.connect(**pg.conninfo) as conn:
        conn.execute("create table survived as select 7 as id")
    pid = postmaster_pid(pg)
    processes = [pid, *children(pid)]
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while not all(is_dead(p) for p in processes):
        assert time.monotonic() < deadline, "the killed server's processes did not exit"
        time.sleep(0.05)
    assert (pg.data_dir / "postmaster.pid").exists()
    assert not pg.is_running()

    again = make_pg(pg.requested_data_dir)
    again.start()
    assert again.started_here
    assert query(again, "select id from survived") == 7


def test_a_pidfile_whose_pid_was_reused_does_not_block_start(
    base_dir: Path, make_pg: MakePg
) -> None:
    pg = make_pg(base_dir / "pg")
    pg.start()
    pidfile = pg.data_dir / "postmaster.pid"
    lines = pidfile.read_text().splitlines(keepends=True)
    pg.stop()
    # After a crash and a reboot the recorded pid can belong to any process, here this one.
    pidfile.write_text("".join([f"{os.getpid()}\n", *lines[1:]]))
    assert not pg.is_running()
    pg.start()
    assert query(pg, "select 1") == 1
    assert postmaster_pid(pg) != os.getpid()


def test_bindir_env_without_binaries_is_a_runner_error(
    base_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    empty = base_dir / "empty"
    empty.mkdir()
    monkeypatch.setenv("RUNNER_PG_BINDIR", str(empty))
    with pytest.raises(RunnerError, match="RUNNER_PG_BINDIR") as raised:
        find_bindir()
    assert "\n" not in str(raised.value)
    with pytest.raises(RunnerError, match="RUNNER_PG_BINDIR"):
        EmbeddedPostgres(base_dir / "pg")


def test_bindir_env_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNNER_PG_BINDIR", str(pgserver_bindir()))
    assert find_bindir() == pgserver_bindir()


def test_bindir_is_found_without_configuration(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RUNNER_PG_BINDIR", raising=False)
    bindir = find_bindir()
    assert all((bindir / name).is_file() for name in ("initdb", "pg_ctl", "postgres"))


def test_the_server_runs_as_an_unprivileged_user(base_dir: Path, make_pg: MakePg) -> None:
    pg = make_pg(base_dir / "pg")
    pg.start()
    server_uid = Path(f"/proc/{postmaster_pid(pg)}").stat().st_uid
    owners = {path.stat().st_uid for path in (pg.data_dir, pg.data_dir / "PG_VERSION", pg.log_file)}
    if os.geteuid() == 0:
        nobody = pwd.getpwnam("nobody").pw_uid
        assert server_uid == nobody
        assert owners == {nobody}
        assert pg.data_dir.stat().st_mode & 0o777 == 0o700
    else:
        assert server_uid == os.geteuid()
        assert owners == {os.geteuid()}


def test_a_data_dir_the_server_user_cannot_reach_falls_back_to_temp(
    base_dir: Path, make_pg: MakePg
) -> None:
    closed = base_dir / "closed"
    closed.mkdir(mode=0o700)
    closed.chmod(0o700)
    requested = closed / "pg"
    pg = make_pg(requested)
    pg.start()
    assert query(pg, "select 1") == 1
    assert query(pg, "show data_directory") == str(pg.data_dir)
    if os.geteuid() == 0:
        assert pg.data_dir != requested
        assert pg.data_dir.parent.parent == Path(tempfile.gettempdir())
        assert pg.data_dir.parent.name.startswith("runner-pg-")
        assert not requested.exists()
        # The same request finds the same cluster, as `runner db stop` must.
        assert make_pg(requested).data_dir == pg.data_dir
    else:
        # A normal user runs the server as themselves, who can reach their own directory.
        assert pg.data_dir == requested
    pg.stop()
    assert not pg.is_running()


def test_pgserver_bundled_binaries(base_dir: Path, make_pg: MakePg) -> None:
    with make_pg(base_dir / "pg", bindir=pgserver_bindir()) as pg:
        assert int(str(query(pg, "show server_version_num"))) // 10000 == 16


def test_an_initdb_failure_says_what_and_where_the_log_is(base_dir: Path, make_pg: MakePg) -> None:
    data_dir = base_dir / "pg"
    data_dir.mkdir()
    (data_dir / "stray").write_text("not a cluster")
    pg = make_pg(data_dir)
    with pytest.raises(RunnerError, match=r"^initdb failed for .*not empty.*; log: ") as raised:
        pg.start()
    message = str(raised.value)
    assert "\n" not in message
    assert message.endswith(str(pg.log_file))


def test_a_server_failure_says_what_and_where_the_log_is(base_dir: Path, make_pg: MakePg) -> None:
    pg = make_pg(base_dir / "pg")
    pg.start()
    pg.stop()
    with (pg.data_dir / "postgresql.conf").open("a") as conf:
        conf.write("no_such_setting = 1\n")
    with pytest.raises(RunnerError, match=r"^pg_ctl start failed for .*FATAL.*; log: ") as raised:
        pg.start()
    assert "\n" not in str(raised.value)
    assert not pg.is_running()
