"""A link table whose duplicates are whole-row copies and which has no unique column to break
their ties (#14's film_actor after its primary key was lost), declared `keep: any` in a
project of one's own: the copies leave in place, any one of each key staying; a key whose
copies differ stops the build, and nothing changes."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import yaml
from conftest import Database, project_of_ones_own, said
from test_in_place import kill_after_each_step_then_rerun, live_and_archived

from runner.errors import RunnerError
from runner.jobs import swap
from runner.statements import in_place

LINKS = '"Film Links"."film actor"'
# 400 actor-film pairs, each loaded one to four times, every copy equal in every column; a
# jsonb column, whose type has no equality operator, and a column named as the copies' alias.
TABLE = f"""
create schema "Film Links";
create table {LINKS} (
    actor_id integer not null,
    film_id integer not null,
    last_update timestamptz not null,
    details jsonb,
    copies text
);
insert into {LINKS}
select a, f, timestamptz '2025-01-01' + a * interval '1 hour',
       jsonb_build_object('role', 'lead ' || f, 'billing', a % 3), 'same'
from generate_series(1, 20) as a, generate_series(1, 20) as f,
     generate_series(1, 1 + (a * f) % 4) as copy
"""
ADD = ["add", "Film Links.film actor", "--key", "actor_id,film_id", "--keep", "any"]


def _rows(conn: psycopg.Connection, table: str = LINKS) -> Counter:
    return Counter(row for (row,) in conn.execute(f"select row(t.*)::text from {table} as t"))


@pytest.fixture
def links(server, tmp_path: Path, request) -> Iterator[tuple[Database, tuple[str, str]]]:
    """A database with the link table, and a project of its own that declares it."""
    with project_of_ones_own(server, tmp_path, f"links_{request.node.name[-24:].lower()}",
                             TABLE, ADD) as (database, project):
        yield database, ("--project-dir", str(project))


def test_equal_copies_leave_in_place_one_of_each_stays_and_a_rollback_puts_them_back(
        links) -> None:
    database, project = links
    declared = yaml.safe_load(Path(project[1], "models/staging/film_links/"
                                   "_film_links__sources.yml").read_text())
    assert declared["sources"][0]["tables"][0]["config"]["meta"]["dedup"] == {
        "natural_key": ["actor_id", "film_id"], "keep": "any"}
    with database.connect() as conn:
        before = _rows(conn)
        oid = conn.execute(f"select '{LINKS}'::regclass::oid").fetchone()[0]
    assert (sum(before.values()), len(before)) == (800, 400)

    built = database.runner("build", *project)
    assert built.exit_code == 0, built.output
    with database.connect() as conn:
        # The kept rows are a view over the live table: the build copied nothing.
        assert conn.execute("select relkind from pg_class where relname = 'film_actor'"
                            " and relnamespace = 'dedup'::regnamespace").fetchone()[0] == "v"
    planned = database.runner("swap", "--dry-run", *project)
    assert planned.exit_code == 0, planned.output
    assert ("-- Film Links.film actor: in place, because its meta.dedup says keep: any"
            in planned.output)
    audited = database.runner("audit", "--format", "json", *project)
    assert audited.exit_code == 0, audited.output
    assert [(row["table"], row["duplicate_rows"]) for row in json.loads(audited.stdout)] == [
        ("Film Links.film actor", 400), ("TOTAL", 400)]
    swapped = database.runner("swap", "--format", "json", *project)
    assert swapped.exit_code == 0, swapped.output
    with database.connect() as conn:
        after = _rows(conn)
        archive = conn.execute("select format('%I.%I', 'dedup_archive', archive_table)"
                               " from dedup_archive.swap_log").fetchone()[0]
        removed = _rows(conn, archive)
        assert conn.execute(f"select '{LINKS}'::regclass::oid").fetchone()[0] == oid
        assert conn.execute(
            "select pg_get_constraintdef(oid) from pg_constraint"
            f" where conrelid = '{LINKS}'::regclass and contype = 'u'").fetchone()[0] == (
            "UNIQUE (actor_id, film_id)")
        sent_again = conn.execute(f"insert into {LINKS} select * from {LINKS} limit 1"
                                  " on conflict do nothing")
        assert sent_again.rowcount == 0
    # One copy of each key stays, equal to every copy that left; together they are the rows
    # there were, each as many times as it was there.
    assert after == Counter(set(before))
    assert after + removed == before
    assert json.loads(swapped.stdout)["tables"][0]["rows_after"] == len(before)
    verified = database.runner("verify", *project)
    assert verified.exit_code == 0, verified.output

    rolled = database.runner("rollback", *project)
    assert rolled.exit_code == 0, rolled.output
    with database.connect() as conn:
        assert _rows(conn) == before
        assert conn.execute(f"select count(*) from pg_constraint where conrelid = '{LINKS}'"
                            "::regclass").fetchone()[0] == 0


def test_a_copy_that_differs_stops_the_build_and_the_swap_changes_nothing(links) -> None:
    database, project = links
    with database.connect() as conn:
        conn.execute(f"update {LINKS} set details = details || '{{\"role\": \"cameo\"}}'"
                     " where ctid = (select min(ctid) from " + LINKS + " where actor_id = 3"
                     " and film_id = 1)")
        before = _rows(conn)
    built = database.runner("build", *project)
    assert built.exit_code != 0
    assert "dedup_tiebreaker_unique" in built.output
    with database.connect() as conn:
        problem = conn.execute(
            "select problem, copies, different_copies from ("
            + _copies_differ_sql(database) + ") as failures").fetchall()
    assert problem == [("keep: any, and copies of this key differ: end keep in a unique "
                        "tie-breaker instead", 4, 2)]
    refused = database.runner("swap", *project)
    assert refused.exit_code == 4
    assert said(refused)[-1].startswith("Error: ")
    assert "dedup_tiebreaker_unique" in said(refused)[-1]
    with database.connect() as conn:
        assert _rows(conn) == before
        assert conn.execute("select to_regclass('dedup_archive.swap_log')").fetchone()[0] is None


def _copies_differ_sql(database: Database) -> str:
    """The compiled SQL of the failing test, as dbt wrote it."""
    compiled = sorted(Path(database.target_dir, "compiled").rglob(
        "*dedup_tiebreaker_unique*.sql"))
    assert len(compiled) == 1, compiled
    return compiled[0].read_text()


def test_a_copy_the_etl_writes_meanwhile_is_removed_and_one_that_differs_stops_the_index(
        links) -> None:
    """Between the steps of the run, the ETL sends copies again: an equal one leaves at once
    (the guard); one that differs stays, and the unique index cannot be built until the user
    settles which copy is right."""
    database, project = links
    built = database.runner("build", *project)
    assert built.exit_code == 0, built.output
    resend = (f"insert into {LINKS} select * from {LINKS} where actor_id = %s and film_id = %s"
              " limit 1")

    def write_meanwhile(label: str) -> None:
        if label.startswith("guard of "):
            with database.connect() as conn:
                conn.execute(resend, (5, 5))
                conn.execute(resend, (5, 5))
                conn.execute(f"insert into {LINKS} select actor_id, film_id, last_update,"
                             " details || '{\"role\": \"extra\"}', copies from " + LINKS
                             + " where actor_id = 6 and film_id = 6 limit 1")

    options = swap.SwapOptions(target_dir=database.target_dir)
    with database.connect() as conn:
        before_run = _rows(conn)
        plans = swap.make_plans(conn, options)
        assert [plan.action for plan in plans] == ["in_place"]
        with pytest.raises(RunnerError) as refused:
            swap.execute(conn, plans, options, after_step=write_meanwhile)
    assert str(refused.value) == (
        "the unique index of Film Links.film actor cannot be built: rows that share a natural "
        "key were written since dbt read the table (Key (actor_id, film_id)=(6, 6) is "
        "duplicated); keep: any removes only copies equal to the one it keeps, and these "
        "differ: delete the wrong ones, then run `runner swap` again")
    with database.connect() as conn:
        # The equal copies sent again left as they landed; the one that differs is live.
        assert conn.execute(f"select count(*) from {LINKS} where actor_id = 5 and film_id = 5"
                            ).fetchone()[0] == 1
        sent_again = conn.execute(f"select row(t.*)::text from {LINKS} as t where actor_id = 5"
                                  " and film_id = 5").fetchone()[0]
        extra = conn.execute(f"delete from {LINKS} as t where details ->> 'role' = 'extra'"
                             " returning row(t.*)::text").fetchone()[0]
    finished = database.runner("swap", *project)
    assert finished.exit_code == 0, finished.output
    with database.connect() as conn:
        archive = conn.execute("select format('%I.%I', 'dedup_archive', archive_table)"
                               " from dedup_archive.swap_log").fetchone()[0]
        live, removed = _rows(conn), _rows(conn, archive)
    assert extra not in live + removed
    assert live == Counter(set(before_run))
    assert live + removed == before_run + Counter({sent_again: 2})


def test_a_kill_after_any_step_loses_no_copy_and_a_rerun_finishes(
        server, links, monkeypatch: pytest.MonkeyPatch) -> None:
    database, project = links
    monkeypatch.setattr(in_place, "BATCH_ROWS", 200)
    built = database.runner("build", *project)
    assert built.exit_code == 0, built.output
    with database.connect() as conn:
        before = _rows(conn)

    def killed(conn: psycopg.Connection, label: str) -> None:
        assert live_and_archived(conn, LINKS) == before, f"killed after {label!r}"

    def rerun(conn: psycopg.Connection, label: str) -> None:
        assert _rows(conn) == Counter(set(before)), f"rerun after {label!r}"
        assert live_and_archived(conn, LINKS) == before

    labels = kill_after_each_step_then_rerun(
        server, database, swap.SwapOptions(target_dir=database.target_dir), killed, rerun)
    assert len([label for label in labels if label.startswith("batch")]) > 1


def test_suggest_keys_finds_the_pair_and_says_keep_any(links) -> None:
    database, _ = links
    result = database.runner("suggest-keys", "Film Links.film actor")
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[-6:] == [
        "  config:",
        "    meta:",
        "      dedup:",
        '        natural_key: ["actor_id", "film_id"]',
        "        keep: any   # no column breaks ties, and copies are equal in every column",
        "or declared in a project of yours (runner init): runner add 'Film Links.film actor' "
        "--key actor_id,film_id --keep any"]
