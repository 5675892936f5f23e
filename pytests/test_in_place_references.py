"""A table that other tables reference, deduplicated in place (#15): the rows that point at a
removed duplicate move to the kept row of its key before it leaves, every foreign key stays the
one it was (same OID, enforced throughout, whatever its ON DELETE says), and a rollback puts
back both the removed rows and where each moved row pointed."""

from __future__ import annotations

import random
import re
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from conftest import Database, project_of_ones_own, said
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg import sql
from test_in_place import kill_after_each_step_then_rerun, live_and_archived

from runner.errors import ConnectionLost, RunnerError
from runner.jobs import swap
from runner.statements import in_place

STAYS = '"Guest Book"."Stays"'
CHARGES = '"Guest Book".charges'
NOTES = '"Guest Book"."stay notes"'
# 240 stays (guest, night) loaded one to three times, later copies later; charges point at
# copies by id (ON DELETE CASCADE: a delete of a copy they point at would take them along),
# notes by a code of their own (ON DELETE SET NULL: it would cut them loose), both at copies
# that leave and copies that stay.
TABLES = f"""
create schema "Guest Book";
create table {STAYS} (
    id bigint generated always as identity primary key,
    guest text not null,
    night date not null,
    loaded_at timestamptz not null,
    code text not null unique
);
insert into {STAYS} (guest, night, loaded_at, code)
select 'guest ' || g, date '2025-03-01' + n, timestamptz '2025-04-01' + copy * interval '1 day',
       format('S-%s-%s-%s', g, n, copy)
from generate_series(1, 40) as g, generate_series(1, 6) as n,
     generate_series(1, 1 + (g * n) % 3) as copy
order by copy, g, n;
create table {CHARGES} (
    id integer primary key,
    stay_id bigint references {STAYS} (id) on delete cascade,
    amount integer not null
);
create index on {CHARGES} (stay_id);
insert into {CHARGES} select s.id, s.id, s.id * 10 from {STAYS} as s where s.id % 2 = 0;
create table {NOTES} (
    note_id integer primary key,
    stay_code text references {STAYS} (code) on delete set null,
    body text
);
create index on {NOTES} (stay_code);
insert into {NOTES} select s.id, s.code, 'note on ' || s.code from {STAYS} as s
where s.id % 3 = 0;
"""
ADD = ["add", "Guest Book.Stays", "--key", "guest,night", "--keep", "loaded_at:desc,id:desc",
       "--strategy", "in_place", "--name", "stays"]


def _rows(conn: psycopg.Connection, table: str) -> Counter:
    return Counter(row for (row,) in conn.execute(f"select row(t.*)::text from {table} as t"))


def _pointed(conn: psycopg.Connection) -> dict[str, tuple]:
    """Each charge and note, with the key (guest, night) of the stay it points at: what must
    not change, wherever it points."""
    return {
        **{f"charge {i}": key for i, *key in conn.execute(
            f"select c.id, s.guest, s.night from {CHARGES} as c join {STAYS} as s"
            " on s.id = c.stay_id")},
        **{f"note {i}": key for i, *key in conn.execute(
            f"select n.note_id, s.guest, s.night from {NOTES} as n join {STAYS} as s"
            " on s.code = n.stay_code")}}


def _kept(conn: psycopg.Connection) -> set[int]:
    """The id of each key's latest copy."""
    return {i for (i,) in conn.execute(f"select distinct on (guest, night) id from {STAYS}"
                                       " order by guest, night, loaded_at desc, id desc")}


def _foreign_keys(conn: psycopg.Connection) -> list[tuple]:
    return conn.execute("select oid, conname, convalidated from pg_constraint"
                        f" where confrelid = '{STAYS}'::regclass order by conname").fetchall()


def _leftovers(conn: psycopg.Connection) -> list[str]:
    """The in-place run's triggers: the guard's, and the redirects of the tables that point."""
    return [name for (name,) in conn.execute(
        "select tgname from pg_trigger where tgname like 'dedup\\_in\\_place\\_%' and tgrelid in"
        f" ('{STAYS}'::regclass, '{CHARGES}'::regclass, '{NOTES}'::regclass)")]


@pytest.fixture
def guests(server, tmp_path: Path, request) -> Iterator[tuple[Database, tuple[str, str]]]:
    with project_of_ones_own(server, tmp_path, f"guests_{request.node.name[-24:].lower()}",
                             TABLES, ADD) as (database, project):
        yield database, ("--project-dir", str(project))


def test_rows_that_point_at_removed_copies_follow_them_to_the_kept_row_and_come_back(
        guests) -> None:
    database, project = guests
    with database.connect() as conn:
        stays, charges, notes = (_rows(conn, t) for t in (STAYS, CHARGES, NOTES))
        pointed, kept, keys = _pointed(conn), _kept(conn), _foreign_keys(conn)
        oid = conn.execute(f"select '{STAYS}'::regclass::oid").fetchone()[0]
        pointing_at_copies = conn.execute(
            f"select count(*) from {CHARGES} where not stay_id = any(%s)", (list(kept),)
        ).fetchone()[0]
    assert pointing_at_copies > 50
    previewed = database.runner("plan", *project)
    assert previewed.exit_code == 0, previewed.output
    assert (f"--   re-points {pointing_at_copies:,} of the {sum(charges.values()):,} rows of "
            "Guest Book.charges (foreign key charges_stay_id_fkey)") in previewed.output

    built = database.runner("build", *project)
    assert built.exit_code == 0, built.output
    planned = database.runner("swap", "--dry-run", *project)
    assert planned.exit_code == 0, planned.output
    assert "-- Guest Book.Stays: in place, because its meta.dedup says strategy: in_place" in (
        planned.output)
    assert 'create trigger "dedup_in_place_redirect__charges_stay_id_fkey" before insert' in (
        planned.output)
    swapped = database.runner("swap", *project)
    assert swapped.exit_code == 0, swapped.output
    assert (f"Re-pointed {pointing_at_copies:,} rows of Guest Book.charges (foreign key "
            "charges_stay_id_fkey) at the kept rows of Guest Book.Stays") in swapped.output
    with database.connect() as conn:
        # Nothing of the referencing tables was lost, cut loose or replaced, and each row
        # points at the kept row of the key it pointed at.
        assert _foreign_keys(conn) == keys
        assert conn.execute(f"select '{STAYS}'::regclass::oid").fetchone()[0] == oid
        assert _pointed(conn) == pointed
        assert {i for (i,) in conn.execute(f"select id from {STAYS}")} == kept
        assert sum(_rows(conn, CHARGES).values()) == sum(charges.values())
        assert conn.execute(f"select count(*) from {NOTES} where stay_code is null"
                            ).fetchone()[0] == 0
        assert _rows(conn, NOTES).keys() != notes.keys()
        assert live_and_archived(conn, STAYS) == stays
        assert _leftovers(conn) == []
        # The archive, and the record of the charges and of the notes moved, with its date.
        assert sorted(re.sub(r"__\d{14}", "__<date>", name) for (name,) in conn.execute(
            "select relname from pg_class where relkind = 'r'"
            " and relnamespace = 'dedup_archive'::regnamespace and relname like 'Stays__%'")
        ) == ["Stays__<date>", "Stays__<date>__charges__charges_stay_id_fkey",
              "Stays__<date>__stay notes__stay notes_stay_code_fkey"]
    verified = database.runner("verify", "--format", "json", *project)
    assert verified.exit_code == 0, verified.output
    assert "where the rows it re-pointed pointed, which a rollback puts back" in verified.output

    rolled = database.runner("rollback", *project)
    assert rolled.exit_code == 0, rolled.output
    with database.connect() as conn:
        assert (_rows(conn, STAYS), _rows(conn, CHARGES), _rows(conn, NOTES)) == (
            stays, charges, notes)
        assert _foreign_keys(conn) == keys
    cleaned = database.runner("cleanup", "--older-than", "0s", *project)
    assert cleaned.exit_code == 0, cleaned.output
    with database.connect() as conn:
        assert conn.execute("select count(*) from pg_class where relname like 'Stays\\_\\_%'"
                            " and relnamespace = 'dedup_archive'::regnamespace").fetchone()[0] == 0


def test_without_its_record_a_rollback_is_refused_and_verify_says_why(guests) -> None:
    database, project = guests
    assert database.runner("build", *project).exit_code == 0
    swapped = database.runner("swap", *project)
    assert swapped.exit_code == 0, swapped.output
    with database.connect() as conn:
        (record,) = conn.execute(
            "select relname from pg_class where relnamespace = 'dedup_archive'::regnamespace"
            " and relname like 'Stays\\_\\_%%\\_\\_charges\\_\\_%%'").fetchone()
        conn.execute(sql.SQL("drop table {}").format(sql.Identifier("dedup_archive", record)))
        stays, charges = _rows(conn, STAYS), _rows(conn, CHARGES)
    verified = database.runner("verify", "--format", "json", *project)
    assert verified.exit_code == 1
    assert f"dedup_archive.{record} is missing, which recorded where the rows" in verified.output
    refused = database.runner("rollback", *project)
    assert refused.exit_code == 4, refused.output
    assert (f"cannot roll back Guest Book.Stays: nothing was changed; {record}, where the rows "
            "the run re-pointed pointed before it, is missing") in refused.output
    with database.connect() as conn:
        assert (_rows(conn, STAYS), _rows(conn, CHARGES)) == (stays, charges)


TAGS = '"Guest Book"."stay tags"'


def test_link_rows_keyed_by_what_they_point_at_move_or_say_which_would_collide(guests) -> None:
    """Tags keyed by (stay, tag): two copies of a stay tagged alike cannot both move to the
    kept one, and the batch says so, changing nothing; once one is deleted the run finishes,
    a tag the ETL writes on a removed copy lands on the kept one under the key it has there,
    and a rollback puts every tag back where it was written."""
    database, project = guests
    with database.connect() as conn:
        conn.execute(f"""create table {TAGS} (stay_id bigint references {STAYS} (id),
                     tag text, primary key (stay_id, tag));
                     insert into {TAGS} select id, 'late ' || id from {STAYS} where id % 5 = 0""")
        older, kept = conn.execute(
            f"select min(id), max(id) from {STAYS} group by guest, night having count(*) = 3"
            " order by 1 limit 1").fetchone()
        conn.execute(f"insert into {TAGS} values (%s, 'vip'), (%s, 'vip')", (older, kept))
        stays, tags = _rows(conn, STAYS), _rows(conn, TAGS)
    assert database.runner("build", *project).exit_code == 0
    refused = database.runner("swap", *project)
    assert refused.exit_code == 4, refused.output
    assert ("the rows that point at duplicates of Guest Book.Stays cannot all move to the kept "
            "rows: Guest Book.stay tags would hold two rows with one key (Key (stay_id, tag)="
            f"({kept}, vip) already exists: stay tags_pkey); nothing of this batch was "
            "changed") in refused.output
    with database.connect() as conn:
        assert live_and_archived(conn, STAYS) == stays
        assert _rows(conn, TAGS) == tags
        conn.execute(f"delete from {TAGS} where stay_id = %s and tag = 'vip'", (older,))
        tags = _rows(conn, TAGS)

    def tag_a_removed_copy(label: str) -> None:
        if label.startswith("concurrent index of"):
            with database.connect() as conn:
                conn.execute(f"insert into {TAGS} values (%s, 'written meanwhile')", (older,))

    options = swap.SwapOptions(target_dir=database.target_dir)
    with database.connect() as conn:
        swap.execute(conn, swap.make_plans(conn, options), options,
                     after_step=tag_a_removed_copy)
    with database.connect() as conn:
        assert conn.execute(f"select stay_id from {TAGS} where tag = 'written meanwhile'"
                            ).fetchall() == [(kept,)]
        assert conn.execute(f"select count(*) from {TAGS} as t where not exists (select from"
                            f" {STAYS} as s where s.id = t.stay_id)").fetchone()[0] == 0
    rolled = database.runner("rollback", *project)
    assert rolled.exit_code == 0, rolled.output
    with database.connect() as conn:
        assert _rows(conn, STAYS) == stays
        assert _rows(conn, TAGS) == tags + Counter({f"({older},\"written meanwhile\")": 1})


VISITS = '"Guest Book".visits'
# Visits partitioned by night, pointing at stays by id: the moves and the redirect go through
# the parent, the foreign key and its index are the partitions' too.
PARTITIONED_VISITS = f"""
create table {VISITS} (id integer, night date, stay_id bigint references {STAYS} (id),
    primary key (id, night)) partition by range (night);
create table "Guest Book".visits_early partition of {VISITS}
    for values from ('2025-03-01') to ('2025-03-04');
create table "Guest Book".visits_late partition of {VISITS}
    for values from ('2025-03-04') to ('2025-04-01');
create index on {VISITS} (stay_id);
insert into {VISITS} select s.id, s.night, s.id from {STAYS} as s where s.id % 4 = 1"""


def test_a_partitioned_table_that_points_at_it_is_followed_through_its_parent(
        guests) -> None:
    database, project = guests
    with database.connect() as conn:
        conn.execute(PARTITIONED_VISITS)
        older, kept, guest, night = conn.execute(
            f"select min(id), max(id), guest, night from {STAYS} group by guest, night"
            " having count(*) = 3 order by 1 limit 1").fetchone()
        visits = _rows(conn, VISITS)
        pointed = _visited(conn)
    assert database.runner("build", *project).exit_code == 0

    def visit_a_removed_copy(label: str) -> None:
        if label.startswith("concurrent index of"):
            with database.connect() as conn:
                conn.execute(f"insert into {VISITS} values (-1, %s, %s)", (night, older))

    options = swap.SwapOptions(target_dir=database.target_dir)
    with database.connect() as conn:
        swap.execute(conn, swap.make_plans(conn, options), options,
                     after_step=visit_a_removed_copy)
    with database.connect() as conn:
        assert _visited(conn) == {**pointed, -1: (guest, night)}
        assert conn.execute(f"select stay_id from {VISITS} where id = -1").fetchone() == (kept,)
        assert conn.execute(f"select count(*) from {VISITS} as v where not exists (select from"
                            f" {STAYS} as s where s.id = v.stay_id)").fetchone()[0] == 0
    rolled = database.runner("rollback", *project)
    assert rolled.exit_code == 0, rolled.output
    with database.connect() as conn:
        assert _rows(conn, VISITS) == visits + Counter({f"(-1,{night},{older})": 1})


def _visited(conn: psycopg.Connection) -> dict:
    return {i: (guest, night) for i, guest, night in conn.execute(
        f"select v.id, s.guest, s.night from {VISITS} as v join {STAYS} as s"
        " on s.id = v.stay_id")}


def test_what_the_etl_writes_meanwhile_points_at_the_kept_rows_and_nothing_is_lost(
        guests, monkeypatch: pytest.MonkeyPatch) -> None:
    """After every step the ETL sends a stay again as a later copy (ON CONFLICT DO NOTHING),
    with a charge on the copy it just wrote, which the guard takes away at once as a later copy
    wins, and a charge on an older copy whose id it read before the run. Until the guard goes
    every charge lands, on the key's kept row; once it is gone, a charge on a removed copy is
    refused by the foreign key, as after any deduplication."""
    database, project = guests
    monkeypatch.setattr(in_place, "BATCH_ROWS", 160)
    built = database.runner("build", *project)
    assert built.exit_code == 0, built.output
    with database.connect() as conn:
        stays = _rows(conn, STAYS)
        older = {(guest, str(night)): i for guest, night, i in conn.execute(
            f"select distinct on (guest, night) guest, night, id from {STAYS}"
            " order by guest, night, loaded_at, id")}
        charges_before = sum(_rows(conn, CHARGES).values())
    landed: list[tuple[int, str, str]] = []
    refused: list[str] = []
    guarded = True

    def write_meanwhile(label: str) -> None:
        nonlocal guarded
        guarded = guarded and not label.startswith("guard dropped")
        if label in ("lock", "cutover", "commit"):
            return
        n = len(landed) + len(refused) + 1
        guest, night = f"guest {n}", f"2025-03-0{2 + n % 6}"
        with database.connect() as conn:
            sent = conn.execute(
                f"insert into {STAYS} (guest, night, loaded_at, code) values"
                " (%s, %s, timestamptz '2025-06-01' + %s * interval '1 hour', %s)"
                " on conflict do nothing returning id",
                (guest, night, n, f"S-sent-{n}")).fetchone()
            if sent is not None:
                conn.execute(f"insert into {CHARGES} values (%s, %s, 1)", (100_000 + n, sent[0]))
            try:
                conn.execute(f"insert into {CHARGES} values (%s, %s, 2)",
                             (200_000 + n, older[guest, night]))
            except psycopg.errors.ForeignKeyViolation:
                assert not guarded, label
                refused.append(label)
                return
        landed.append((n, guest, night))

    options = swap.SwapOptions(target_dir=database.target_dir)
    with database.connect() as conn:
        swap.execute(conn, swap.make_plans(conn, options), options, after_step=write_meanwhile)
    assert len(landed) > 8
    assert refused
    with database.connect() as conn:
        sent_rows = _rows(conn, f"(select * from {STAYS} where code like 'S-sent-%')")
        sent_charges = conn.execute(f"select count(*) from {CHARGES} where id between 100000"
                                    " and 199999").fetchone()[0]
        assert conn.execute(f"select count(*) from {CHARGES}").fetchone()[0] == (
            charges_before + len(landed) + sent_charges)
        # Each key keeps its latest copy; every charge written points at it.
        for n, guest, night in landed:
            latest = conn.execute(f"select id from {STAYS} where guest = %s and night = %s",
                                  (guest, night)).fetchall()
            assert len(latest) == 1
            assert conn.execute(
                f"select distinct stay_id from {CHARGES} where id in (%s, %s)",
                (100_000 + n, 200_000 + n)).fetchall() == latest
        assert live_and_archived(conn, STAYS) == stays + sent_rows
        assert _leftovers(conn) == []


def test_a_writer_pointing_at_copies_while_batches_remove_them_never_fails_or_dangles(
        guests, monkeypatch: pytest.MonkeyPatch) -> None:
    """A writer of its own, from the guard until the unique index is valid, sends stays again
    and charges on them, and charges on copies by ids it read before the run, as the batches
    remove those copies (a few keys a batch): not one write fails, and every charge lands on
    the kept row of its key."""
    database, project = guests
    monkeypatch.setattr(in_place, "BATCH_ROWS", 96)
    built = database.runner("build", *project)
    assert built.exit_code == 0, built.output
    with database.connect() as conn:
        stays = conn.execute(f"select id, guest, night from {STAYS} order by id").fetchall()
        charges_before = conn.execute(f"select count(*) from {CHARGES}").fetchone()[0]
    intended: dict[int, tuple[str, object]] = {}
    failures: list[BaseException] = []
    writing, stop = threading.Event(), threading.Event()

    def write() -> None:
        chosen = random.Random(15)
        try:
            with database.connect() as conn:
                conn.autocommit = True
                writing.wait()
                while not stop.is_set():
                    n = 300_000 + len(intended)
                    stay_id, guest, night = chosen.choice(stays)
                    if n % 4 == 0:
                        sent = conn.execute(
                            f"insert into {STAYS} (guest, night, loaded_at, code) values"
                            " (%s, %s, timestamptz '2025-07-01' + %s * interval '1 second',"
                            " %s) on conflict do nothing returning id",
                            (guest, night, n, f"S-writer-{n}")).fetchone()
                        # None once the unique index holds the key: the charge goes to the
                        # id read before, which the redirect still takes to the kept row.
                        stay_id = sent[0] if sent else stay_id
                    conn.execute(f"insert into {CHARGES} values (%s, %s, 3)", (n, stay_id))
                    intended[n] = (guest, night)
        except BaseException as error:  # reported by the test, in its own thread
            failures.append(error)

    def pace(label: str) -> None:
        if label.startswith("guard of"):
            writing.set()
        if label.startswith("batch"):
            time.sleep(0.05)
        if label.startswith("concurrent index of"):
            stop.set()
            writer.join()

    writer = threading.Thread(target=write)
    writer.start()
    options = swap.SwapOptions(target_dir=database.target_dir)
    try:
        with database.connect() as conn:
            swap.execute(conn, swap.make_plans(conn, options), options, after_step=pace)
    finally:
        writing.set()
        stop.set()
        writer.join()
    assert failures == []
    assert len(intended) > 20
    with database.connect() as conn:
        assert conn.execute(f"select count(*) from {CHARGES}").fetchone()[0] == (
            charges_before + len(intended))
        landed = {i: (guest, night) for i, guest, night in conn.execute(
            f"select c.id, s.guest, s.night from {CHARGES} as c join {STAYS} as s"
            " on s.id = c.stay_id where c.id >= 300000")}
        assert landed == intended
        assert conn.execute(f"select count(*) from {STAYS}").fetchone()[0] == len(
            {(guest, night) for _, guest, night in stays})


def test_a_kill_after_any_step_leaves_every_row_pointing_at_its_key_and_a_rerun_finishes(
        server, guests, monkeypatch: pytest.MonkeyPatch) -> None:
    database, project = guests
    monkeypatch.setattr(in_place, "BATCH_ROWS", 480)
    built = database.runner("build", *project)
    assert built.exit_code == 0, built.output
    with database.connect() as conn:
        stays, pointed, kept = _rows(conn, STAYS), _pointed(conn), _kept(conn)

    def killed(conn: psycopg.Connection, label: str) -> None:
        assert live_and_archived(conn, STAYS) == stays, f"killed after {label!r}"
        assert _pointed(conn) == pointed, f"killed after {label!r}"

    def rerun(conn: psycopg.Connection, label: str) -> None:
        assert {i for (i,) in conn.execute(f"select id from {STAYS}")} == kept, label
        assert _pointed(conn) == pointed, f"rerun after {label!r}"
        assert _leftovers(conn) == []

    labels = kill_after_each_step_then_rerun(
        server, database, swap.SwapOptions(target_dir=database.target_dir), killed, rerun)
    assert len([label for label in labels if label.startswith("batch")]) > 1


def test_a_row_that_cannot_move_stops_the_batch_and_nothing_is_cut_loose(guests) -> None:
    """A trigger of the referencing table that keeps its rows from changing: the batch stops,
    says why, and no charge is deleted by the cascade."""
    database, project = guests
    with database.connect() as conn:
        conn.execute(f"""create function "Guest Book".frozen() returns trigger language plpgsql
                     as 'begin return null; end';
                     create trigger frozen before update on {CHARGES} for each row
                     execute function "Guest Book".frozen()""")
        charges = _rows(conn, CHARGES)
    built = database.runner("build", *project)
    assert built.exit_code == 0, built.output
    options = swap.SwapOptions(target_dir=database.target_dir)
    with database.connect() as conn, pytest.raises(RunnerError) as stopped:
        swap.execute(conn, swap.make_plans(conn, options), options)
    assert str(stopped.value).startswith(
        'check failed, nothing was changed: no row of "Guest Book".charges.charges_stay_id_fkey '

        "points at a duplicate of the batch still (a trigger or row security policy of Guest "
        "Book.charges would keep one from moving")
    with database.connect() as conn:
        assert _rows(conn, CHARGES) == charges


@pytest.mark.parametrize(("prepare", "refusal"), [
    ("drop index \"Guest Book\".charges_stay_id_idx",
     '"Guest Book".charges.charges_stay_id_fkey points at Guest Book.Stays, and no index of '

     "Guest Book.charges starts with (stay_id)"),
    (f"alter table {NOTES} drop constraint \"stay notes_pkey\"",
     '"Guest Book"."stay notes"."stay notes_stay_code_fkey" points at Guest Book.Stays, and '

     "Guest Book.stay notes has no primary key"),
], ids=["unindexed", "without_primary_key"])
def test_a_reference_that_cannot_be_followed_is_refused_before_anything_changes(
        guests, prepare: str, refusal: str) -> None:
    database, project = guests
    with database.connect() as conn:
        conn.execute(prepare)
        before = [_rows(conn, t) for t in (STAYS, CHARGES, NOTES)]
    built = database.runner("build", *project)
    assert built.exit_code == 0, built.output
    refused = database.runner("swap", *project)
    assert refused.exit_code == 4, refused.output
    assert refusal in refused.output
    with database.connect() as conn:
        assert [_rows(conn, t) for t in (STAYS, CHARGES, NOTES)] == before
        assert _leftovers(conn) == []


# What the ETL may do around any step of a run, and after which step: send a stay again later
# (it wins) or earlier (it loses at once) and charge it; charge, or move a charge to, a stay by an
# id read before the run; delete a charge; note a stay by its code.
WRITES = st.lists(st.tuples(
    st.sampled_from(["send later", "send earlier", "charge", "move charge", "delete charge",
                     "note"]),
    st.integers(0, 10_000), st.integers(0, 24)), min_size=4, max_size=30)


@settings(max_examples=12, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(writes=WRITES, kill_after=st.one_of(st.none(), st.integers(1, 24)))
def test_histories_of_writes_around_the_steps_leave_every_reference_on_its_key(
        server, guests, writes: list, kill_after: int | None) -> None:
    """Hypothesis draws the ETL's writes and the step after which each comes (one past the
    run's last step comes after it), and a step after which the run is killed and run again.
    Every write lands, or is refused by the foreign key only where the stay it names is gone
    and no redirect is in place; at the end each key has one stay, every stay ever written is
    live or archived, and each charge and note points at the key it was written for."""
    database, project = guests
    if not (database.target_dir / "manifest.json").exists():
        built = database.runner("build", *project)
        assert built.exit_code == 0, built.output
    copy = Database({**database.env, "PGDATABASE": f"{database.name}_history"},
                    database.target_dir)
    with psycopg.connect(autocommit=True, **server.conninfo) as admin:
        admin.execute(sql.SQL("drop database if exists {} with (force)").format(
            sql.Identifier(copy.name)))
        admin.execute(sql.SQL("create database {} template {}").format(
            sql.Identifier(copy.name), sql.Identifier(database.name)))
    history = _History(copy, writes)
    steps = 0

    def step_done(label: str) -> None:
        nonlocal steps
        steps += 1
        if label not in ("lock", "cutover", "commit"):
            history.write(up_to=steps)
        if steps == kill_after:
            with copy.connect() as other:
                other.execute("select pg_terminate_backend(pid) from pg_stat_activity"
                              " where application_name = 'runner-under-test'")

    options = swap.SwapOptions(target_dir=copy.target_dir)
    try:
        try:
            with copy.connect() as conn:
                conn.execute("set application_name = 'runner-under-test'")
                swap.execute(conn, swap.make_plans(conn, options), options, after_step=step_done)
        except (ConnectionLost, psycopg.OperationalError):
            assert kill_after is not None
            with copy.connect() as conn:
                swap.execute(conn, swap.make_plans(conn, options), options,
                             after_step=step_done)
        history.write(up_to=len(writes) + 100)
        history.check()
    finally:
        with psycopg.connect(autocommit=True, **server.conninfo) as admin:
            admin.execute(sql.SQL("drop database {} with (force)").format(
                sql.Identifier(copy.name)))


class _History:
    """The ETL's side of a history, and what it expects of the database."""

    def __init__(self, database: Database, writes: list) -> None:
        self.database = database
        self.waiting = list(enumerate(writes))
        with database.connect() as conn:
            self.stays = conn.execute(f"select id, guest, night::text, code from {STAYS}"
                                      " order by id").fetchall()
            self.written = _rows(conn, STAYS)
            self.charges = self._pointing_now(conn)[0]
            self.notes = self._pointing_now(conn)[1]

    def write(self, up_to: int) -> None:
        now = [(number, write) for number, write in self.waiting if write[2] <= up_to]
        self.waiting = [waiting for waiting in self.waiting if waiting not in now]
        with self.database.connect() as conn:
            for number, (what, pick, _) in now:
                self._one(conn, 900_000 + number, what, pick)

    def _one(self, conn: psycopg.Connection, n: int, what: str, pick: int) -> None:
        stay_id, guest, night, code = self.stays[pick % len(self.stays)]
        if what.startswith("send"):
            loaded = ("timestamptz '2025-08-01' + %s * interval '1 minute'" if what == "send later"
                      else "timestamptz '2025-01-01' - %s * interval '1 minute'")
            code = f"S-history-{n}"
            sent = conn.execute(
                f"insert into {STAYS} as s (guest, night, loaded_at, code) values (%s, %s,"
                f" {loaded}, %s) on conflict do nothing returning row(s.*)::text, id",
                (guest, night, n, code)).fetchone()
            if sent is None:
                return
            self.written[sent[0]] += 1
            stay_id = sent[1]
        key = (guest, night)
        if what in ("send later", "send earlier", "charge"):
            self._point(conn, stay_id, self.charges, n, key,
                        f"insert into {CHARGES} values (%s, %s, 4)", (n, stay_id))
        elif what == "move charge" and self.charges:
            charge = sorted(self.charges)[pick % len(self.charges)]
            self._point(conn, stay_id, self.charges, charge, key,
                        f"update {CHARGES} set stay_id = %s where id = %s", (stay_id, charge))
        elif what == "delete charge" and self.charges:
            charge = sorted(self.charges)[pick % len(self.charges)]
            conn.execute(f"delete from {CHARGES} where id = %s", (charge,))
            del self.charges[charge]
        elif what == "note":
            self._point(conn, stay_id, self.notes, n, key,
                        f"insert into {NOTES} values (%s, %s, 'history')", (n, code))

    @staticmethod
    def _point(conn: psycopg.Connection, stay_id: int, pointing: dict, row: int, key: tuple,
               statement: str, params: tuple) -> None:
        """A write that points at a stay: it lands, unless the stay is gone and nothing
        redirects it."""
        live = conn.execute(f"select count(*) from {STAYS} where id = %s", (stay_id,)
                            ).fetchone()[0] == 1
        redirecting = conn.execute(
            "select count(*) from pg_trigger where tgname like 'dedup\\_in\\_place\\_redirect%%'"
            f" and tgrelid = '{CHARGES}'::regclass").fetchone()[0] > 0
        try:
            with conn.transaction():
                conn.execute(statement, params)
        except psycopg.errors.ForeignKeyViolation:
            assert not (live or redirecting), (statement, params)
            return
        assert live or redirecting, (statement, params)
        pointing[row] = key

    @staticmethod
    def _pointing_now(conn: psycopg.Connection) -> tuple[dict, dict]:
        return ({i: (guest, night) for i, guest, night in conn.execute(
                    f"select c.id, s.guest, s.night::text from {CHARGES} as c join {STAYS} as s"
                    " on s.id = c.stay_id")},
                {i: (guest, night) for i, guest, night in conn.execute(
                    f"select n.note_id, s.guest, s.night::text from {NOTES} as n"
                    f" join {STAYS} as s on s.code = n.stay_code")})

    def check(self) -> None:
        with self.database.connect() as conn:
            assert live_and_archived(conn, STAYS) == self.written
            assert conn.execute(f"select count(*) from {STAYS}").fetchone()[0] == len(
                {(guest, night) for _, guest, night, _ in self.stays})
            assert self._pointing_now(conn) == (self.charges, self.notes)
            assert conn.execute(f"select count(*) from {CHARGES}").fetchone()[0] == len(
                self.charges)
            assert _leftovers(conn) == []


MINIBAR = '"Guest Book".minibar'


def _live_and_archived_ids(conn: psycopg.Connection, table: str) -> Counter:
    """The ids of the rows of "Guest Book".`table`, live and in its archive."""
    archive = conn.execute("select archive_table from dedup_archive.swap_log where"
                           " live_schema = 'Guest Book' and live_table = %s", (table,)
                           ).fetchone()[0]
    return Counter(i for (i,) in conn.execute(sql.SQL(
        "select id from {} union all select id from {}").format(
            sql.Identifier("Guest Book", table), sql.Identifier("dedup_archive", archive))))


def test_a_table_that_points_at_it_deduplicated_after_it_and_both_rolled_back(guests) -> None:
    """Minibar rows keyed by (stay, item), deduplicated in place too: in one run with the
    stays refused, after them it goes. A row that moved from a removed copy of a stay to the
    kept one can be a copy of a row there, which the minibar's own keep rule settles. Every
    row of both tables is live or archived, the stays are not rolled back alone, and a
    rollback of both puts back each row as it was, where it pointed."""
    database, project = guests
    with database.connect() as conn:
        conn.execute(f"""create table {MINIBAR} (id integer primary key,
                     stay_id bigint not null references {STAYS} (id), item text not null,
                     loaded_at timestamptz not null);
                     create index on {MINIBAR} (stay_id);
                     insert into {MINIBAR} select s.id * 10 + n, s.id, 'water', timestamptz
                         '2025-05-01' + s.id * interval '1 minute' + n * interval '1 day'
                     from {STAYS} as s, generate_series(0, (s.id % 2)::int) as n""")
        stays, minibar = _rows(conn, STAYS), _rows(conn, MINIBAR)
        waters = conn.execute(f"select count(distinct (s.guest, s.night)) from {MINIBAR} as m"
                              f" join {STAYS} as s on s.id = m.stay_id").fetchone()[0]
    added = database.runner("add", "Guest Book.minibar", "--key", "stay_id,item", "--keep",
                             "loaded_at:desc,id:desc", "--strategy", "in_place", *project)
    assert added.exit_code == 0, added.output
    built = database.runner("build", *project)
    assert built.exit_code == 0, built.output
    together = database.runner("swap", *project)
    assert together.exit_code == 4, together.output
    assert said(together)[-1] == (
        "Error: Guest Book.minibar is deduplicated in the same run as Guest Book.Stays, whose "
        "rows its foreign key minibar_stay_id_fkey re-points: swap Guest Book.Stays first, then "
        "Guest Book.minibar (--select)")
    for name in ("Stays", "minibar"):
        swapped = database.runner("swap", "--select", name, *project)
        assert swapped.exit_code == 0, swapped.output
    with database.connect() as conn:
        assert _live_and_archived_ids(conn, "Stays") == Counter(
            int(row[1:].split(",")[0]) for row in stays.elements())
        assert _live_and_archived_ids(conn, "minibar") == Counter(
            int(row[1:].split(",")[0]) for row in minibar.elements())
        assert conn.execute(f"select count(*), count(distinct stay_id) from {MINIBAR}"
                            ).fetchone() == (waters, waters)
        assert conn.execute(f"select count(*) from {MINIBAR} where stay_id <> all(%s)",
                            (list(_kept(conn)),)).fetchone()[0] == 0
    verified = database.runner("verify", *project)
    assert verified.exit_code == 0, verified.output
    alone = database.runner("rollback", "--select", "Stays", *project)
    assert alone.exit_code == 4, alone.output
    assert said(alone)[-1] == (
        "Error: cannot roll back Guest Book.Stays alone: Guest Book.minibar was deduplicated "
        "after it and may keep in its archive rows that Guest Book.Stays's run re-pointed; "
        "nothing was changed: roll back Guest Book.minibar first, or both together")
    rolled = database.runner("rollback", *project)
    assert rolled.exit_code == 0, rolled.output
    with database.connect() as conn:
        assert _rows(conn, STAYS) == stays
        assert _rows(conn, MINIBAR) == minibar
