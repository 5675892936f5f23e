"""A partitioned table declared once, at its parent, in a project of one's own: its duplicates
leave in place, partition by partition, while the ETL writes through the parent; the parent
and every partition with rows get the natural key's constraint; a rollback puts all back. A
natural key without the partition key, or `strategy: swap`, is refused in one line."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from conftest import Database, project_of_ones_own, said
from test_in_place import kill_after_each_step_then_rerun, live_and_archived

from runner.jobs import swap
from runner.statements import in_place

VIEWS = "events.page_views"
# Ranges by month; February hashed again by visitor, two levels deep; the rest in a default
# partition. 3,000 views, each loaded one to three times, an hour apart.
TABLE = f"""
create schema events;
create table {VIEWS} (
    id bigint generated always as identity,
    viewed_on date not null,
    visitor text not null,
    page text not null,
    loaded_at timestamptz not null
) partition by range (viewed_on);
create table events.page_views_2025_01 partition of {VIEWS}
    for values from ('2025-01-01') to ('2025-02-01');
create table events.page_views_2025_02 partition of {VIEWS}
    for values from ('2025-02-01') to ('2025-03-01') partition by hash (visitor);
create table events.page_views_2025_02_a partition of events.page_views_2025_02
    for values with (modulus 2, remainder 0);
create table events.page_views_2025_02_b partition of events.page_views_2025_02
    for values with (modulus 2, remainder 1);
create table events.page_views_rest partition of {VIEWS} default;
create index on {VIEWS} (id);
insert into {VIEWS} (viewed_on, visitor, page, loaded_at)
select date '2025-01-01' + v % 75, 'visitor ' || v % 40, '/page/' || v % 7,
       timestamptz '2025-06-01' + copy * interval '1 hour'
from generate_series(1, 3000) as v, generate_series(1, 1 + v % 3) as copy;
"""
ADD = ["add", "events.page_views", "--key", "viewed_on,visitor,page",
       "--keep", "loaded_at:desc,id:desc"]
LEAVES = ("page_views_2025_01", "page_views_2025_02_a", "page_views_2025_02_b",
          "page_views_rest")
# The row each key keeps, said differently from the keep rule's order: no row of its key is
# loaded later, or as late with a greater id.
KEPT = f"""
select v.* from {VIEWS} as v where not exists (
    select from {VIEWS} as other
    where (other.viewed_on, other.visitor, other.page) = (v.viewed_on, v.visitor, v.page)
        and (other.loaded_at, other.id) > (v.loaded_at, v.id))
"""


def _rows(conn: psycopg.Connection, table: str = VIEWS) -> Counter:
    return Counter(row for (row,) in conn.execute(f"select row(t.*)::text from {table} as t"))


def _constraints(conn: psycopg.Connection) -> dict[str, str]:
    return dict(conn.execute(
        "select c.conrelid::regclass::text, pg_get_constraintdef(c.oid) from pg_constraint as c"
        " where c.connamespace = 'events'::regnamespace and c.contype = 'u'").fetchall())


def _oids(conn: psycopg.Connection) -> list:
    return conn.execute("select relname, oid from pg_class where relnamespace ="
                        " 'events'::regnamespace and relkind in ('r', 'p') order by 1").fetchall()


@pytest.fixture
def views(server, tmp_path: Path, request) -> Iterator[tuple[Database, Path]]:
    """A database with the partitioned table, and a project of its own that declares it."""
    with project_of_ones_own(server, tmp_path, f"parts_{request.node.name[-24:].lower()}",
                             TABLE, ADD) as made:
        yield made


def test_a_partitioned_table_is_deduplicated_in_place_and_constrained_at_every_level(
        views) -> None:
    database, project = views
    in_project = ("--project-dir", str(project))
    with database.connect() as conn:
        before, kept = _rows(conn), _rows(conn, f"({KEPT})")
        oids = _oids(conn)
    assert (sum(before.values()), sum(kept.values())) == (6000, 3000)
    built = database.runner("build", *in_project)
    assert built.exit_code == 0, built.output
    assert ("events.page_views: deduplicated in place, because it is partitioned, which only "
            "in place keeps as it is: its kept rows are a view, not a copy") in built.output
    planned = database.runner("swap", "--dry-run", *in_project)
    assert planned.exit_code == 0, planned.output
    assert "-- events.page_views: in place, because it is partitioned" in planned.output
    swapped = database.runner("swap", *in_project)
    assert swapped.exit_code == 0, swapped.output
    with database.connect() as conn:
        after = _rows(conn)
        archive = conn.execute("select format('%I.%I', 'dedup_archive', archive_table)"
                               " from dedup_archive.swap_log").fetchone()[0]
        removed = _rows(conn, archive)
        assert _oids(conn) == oids
        key = "UNIQUE (viewed_on, visitor, page)"
        assert _constraints(conn) == {
            VIEWS: key, "events.page_views_2025_02": key,
            **{f"events.{leaf}": key for leaf in LEAVES}}
        # A view of February sent again: its hash partition's constraint refuses it.
        send_again = (f"insert into {VIEWS} (viewed_on, visitor, page, loaded_at)"
                      f" select viewed_on, visitor, page, now() from {VIEWS}"
                      " where viewed_on = '2025-02-10' limit 1")
        with pytest.raises(psycopg.errors.UniqueViolation):
            conn.execute(send_again)
        assert conn.execute(send_again + " on conflict do nothing").rowcount == 0
    assert after == kept
    assert after + removed == before
    verified = database.runner("verify", *in_project)
    assert verified.exit_code == 0, verified.output

    rolled = database.runner("rollback", *in_project)
    assert rolled.exit_code == 0, rolled.output
    with database.connect() as conn:
        assert _rows(conn) == before
        assert _constraints(conn) == {}
        assert _oids(conn) == oids


@pytest.mark.parametrize(("declared", "refusal"), [
    (["--key", "visitor,page", "--keep", "loaded_at:desc,id:desc"],
     "Error: events.page_views is partitioned by (viewed_on, visitor), and PostgreSQL's unique "
     "constraint on a partitioned table must hold every column it is partitioned by: add "
     "viewed_on to natural_key, or declare each partition as a table of its own"),
    ([*ADD[2:], "--strategy", "swap"],
     "Error: events.page_views: it is partitioned, and a swap would put a plain table in its "
     "place; set strategy: in_place or auto, which deduplicate it where it is"),
])
def test_what_a_partitioned_table_cannot_have_is_refused_in_one_line(views, declared,
                                                                     refusal) -> None:
    database, project = views
    in_project = ("--project-dir", str(project))
    (project / "models/staging/events/_events__sources.yml").unlink()
    added = database.runner("add", VIEWS, *declared, *in_project)
    assert added.exit_code == 0, added.output
    with database.connect() as conn:
        before = _rows(conn)
    # Refused by the build's capture, before anything is captured or built.
    refused = database.runner("build", *in_project)
    assert refused.exit_code == 4, refused.output
    assert said(refused)[-1] == refusal
    with database.connect() as conn:
        assert _rows(conn) == before
        assert _constraints(conn) == {}
        assert conn.execute("select count(*) from pg_trigger where tgrelid = %s::regclass",
                            (VIEWS,)).fetchone()[0] == 0


def test_copies_the_etl_sends_through_the_parent_meanwhile_leave_or_are_refused(
        server, views, monkeypatch: pytest.MonkeyPatch) -> None:
    """After every step of the run the ETL sends views again through the parent, to every
    partition, as the incident's ETL does (ON CONFLICT DO NOTHING: refused once the unique
    indexes hold the key)."""
    database, project = views
    monkeypatch.setattr(in_place, "BATCH_ROWS", 1000)
    built = database.runner("build", "--project-dir", str(project))
    assert built.exit_code == 0, built.output
    options = swap.SwapOptions(target_dir=database.target_dir)
    send_again = (f"insert into {VIEWS} (viewed_on, visitor, page, loaded_at)"
                  f" select viewed_on, visitor, page, loaded_at + interval '1 day' from {VIEWS}"
                  " where id %% 97 = %s on conflict do nothing")
    labels: list[str] = []
    inserted: list[int] = []

    def write_meanwhile(label: str) -> None:
        labels.append(label)
        if label not in ("lock", "cutover", "commit"):
            with database.connect() as conn:
                inserted.append(conn.execute(send_again, (len(labels),)).rowcount)

    with database.connect() as conn:
        swap.execute(conn, swap.make_plans(conn, options), options, after_step=write_meanwhile)
    assert len([label for label in labels if label.startswith("batch")]) > 1
    with database.connect() as conn:
        archive = conn.execute("select format('%I.%I', 'dedup_archive', archive_table)"
                               " from dedup_archive.swap_log").fetchone()[0]
        everything = _rows(conn) + _rows(conn, archive)
        # Every key keeps its latest copy of all, live or archived, and nothing is both.
        assert _rows(conn) == Counter(set(_rows(conn, f"""(
            select v.* from (select * from {VIEWS} union all select * from {archive}) as v
            where not exists (
                select from (select * from {VIEWS} union all select * from {archive}) as o
                where (o.viewed_on, o.visitor, o.page) = (v.viewed_on, v.visitor, v.page)
                    and (o.loaded_at, o.id) > (v.loaded_at, v.id)))""")))
        assert conn.execute(f"select count(*) from {VIEWS} as v join {archive} as a"
                            " using (id)").fetchone()[0] == 0
        # The run's own deletes were left out of the capture's log; its counts are still
        # those of the table: what was there and sent, and what is left.
        assert conn.execute("select rows_before, rows_after from dedup_archive.swap_log"
                            ).fetchone() == (6000 + sum(inserted), sum(_rows(conn).values()))
    # Every row there was and every one the ETL got in is live or archived, once.
    assert sum(inserted) > 0 and set(everything.values()) == {1}
    assert sum(everything.values()) == 6000 + sum(inserted)


def test_a_kill_after_any_step_of_a_partitioned_run_loses_nothing_and_a_rerun_finishes(
        server, views, monkeypatch: pytest.MonkeyPatch) -> None:
    database, project = views
    monkeypatch.setattr(in_place, "BATCH_ROWS", 1000)
    built = database.runner("build", "--project-dir", str(project))
    assert built.exit_code == 0, built.output
    with database.connect() as conn:
        before, kept = _rows(conn), _rows(conn, f"({KEPT})")

    def killed(conn: psycopg.Connection, label: str) -> None:
        assert live_and_archived(conn, VIEWS) == before, f"killed after {label!r}"

    def rerun(conn: psycopg.Connection, label: str) -> None:
        assert _rows(conn) == kept, f"rerun after {label!r}"
        assert live_and_archived(conn, VIEWS) == before

    labels = kill_after_each_step_then_rerun(
        server, database, swap.SwapOptions(target_dir=database.target_dir), killed, rerun)
    assert "lookup index of events.page_views" in labels


def test_a_partition_declared_alone_is_deduplicated_in_place_and_stays_a_partition(
        views) -> None:
    database, project = views
    in_project = ("--project-dir", str(project))
    (project / "models/staging/events/_events__sources.yml").unlink()
    january = "events.page_views_2025_01"
    added = database.runner("add", january, *ADD[2:], *in_project)
    assert added.exit_code == 0, added.output
    with database.connect() as conn:
        before, others = _rows(conn, january), _rows(conn, f"(select * from {VIEWS}"
                                                           " where viewed_on >= '2025-02-01')")
        kept = _rows(conn, f"(select * from ({KEPT}) as k where viewed_on < '2025-02-01')")
        oids = _oids(conn)
    built = database.runner("build", *in_project)
    assert built.exit_code == 0, built.output
    swapped = database.runner("swap", *in_project)
    assert swapped.exit_code == 0, swapped.output
    with database.connect() as conn:
        assert _rows(conn, january) == kept != before
        assert _rows(conn, f"(select * from {VIEWS} where viewed_on >= '2025-02-01')") == others
        assert _oids(conn) == oids
        assert _constraints(conn) == {january: "UNIQUE (viewed_on, visitor, page)"}
        assert conn.execute(f"select {january!r}::regclass in (select inhrelid from"
                            " pg_inherits)").fetchone()[0]
