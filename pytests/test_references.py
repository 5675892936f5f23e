"""Tables that other tables reference, on a real server: the swap moves every referencing row
that points at a removed duplicate to the kept row of the same key, in its own transaction,
adds the foreign key again against the new table, and a rollback puts every such row back."""

from __future__ import annotations

import json
import random
import threading
import time

import psycopg
import pytest
from conftest import Database, description, said

from runner.errors import RunnerError
from runner.jobs import swap

LIKES = """
create table public.photo_likes (
    id bigint generated always as identity primary key,
    photo bigint references breezeway.task_photos (id) on delete cascade deferrable,
    liked_by text not null);
create index photo_likes_photo on public.photo_likes (photo);
insert into public.photo_likes (photo, liked_by)
    select id, 'guest ' || (id % 7) from breezeway.task_photos where id % 3 = 0;
insert into public.photo_likes (photo, liked_by) values (null, 'nobody');
"""


def with_likes(database: Database) -> None:
    """The likes table, its rows, and the capture of what the ETL writes into it."""
    with database.connect() as conn:
        conn.execute(LIKES)
    result = database.runner("capture")
    assert result.exit_code == 0, result.output
# What each like pointed at, by the natural key of the photo.
LIKED_KEYS = """
select l.id, p.task_pk, p.photo_id from public.photo_likes as l
left join {photos} as p on p.id = l.photo order by l.id
"""
EXACTLY = "select id, photo, liked_by from public.photo_likes order by id"
FOREIGN_KEY = """
select pg_get_constraintdef(oid), convalidated, confrelid::regclass::text from pg_constraint
where conrelid = 'public.photo_likes'::regclass and contype = 'f'
"""


def liked_keys(conn: psycopg.Connection, photos: str = "breezeway.task_photos") -> list:
    return conn.execute(LIKED_KEYS.format(photos=photos)).fetchall()


def record_of(conn: psycopg.Connection, table: str) -> str:
    """Where the latest swap of `table` recorded the rows it re-pointed."""
    return conn.execute(
        "select format('%%I.%%I', 'dedup_archive', repointed->0->>'record')"
        " from dedup_archive.swap_log where live_table = %s order by swapped_at desc limit 1",
        (table,)).fetchone()[0]


def test_every_row_that_points_at_a_removed_duplicate_points_at_the_kept_row_of_its_key(
        fresh: Database) -> None:
    with fresh.connect() as conn:
        conn.execute(LIKES)
        likes_table = description(conn, "public.photo_likes")
    assert fresh.runner("capture").exit_code == 0
    with fresh.connect() as conn:
        before = liked_keys(conn)
        exactly_before = conn.execute(EXACTLY).fetchall()
        foreign_key = conn.execute(FOREIGN_KEY).fetchone()
        pointing_at_removed = conn.execute(
            "select count(*) from public.photo_likes as l where l.photo in (select id from"
            " (select id, row_number() over (partition by task_pk, photo_id order by id desc)"
            " as n from breezeway.task_photos) as ranked where n > 1)").fetchone()[0]
    assert pointing_at_removed > 0
    result = fresh.runner("swap", "--select", "task_photos", "--format", "json")
    assert result.exit_code == 0, result.output
    (repointed,) = json.loads(result.stdout)["tables"][0]["repointed"]
    assert repointed["table"] == "public.photo_likes"
    assert repointed["rows"] == pointing_at_removed
    with fresh.connect() as conn:
        # Every like points at a live photo with the key its photo had, the unset one at none.
        assert liked_keys(conn) == before
        assert conn.execute(
            "select count(*) from public.photo_likes as l where l.photo is not null and not"
            " exists (select from breezeway.task_photos as p where p.id = l.photo)"
        ).fetchone()[0] == 0
        # The same foreign key, against the new table, checked after the commit; the table
        # that has it is what it was to everything around it.
        assert conn.execute(FOREIGN_KEY).fetchone() == foreign_key
        assert description(conn, "public.photo_likes") == likes_table
        moved = conn.execute(f"select count(*) from {record_of(conn, 'task_photos')}"
                             ).fetchone()[0]
        assert moved == pointing_at_removed
        # Nothing of the re-pointing is left on the referencing table.
        assert conn.execute("select count(*) from pg_trigger where tgrelid ="
                            " 'public.photo_likes'::regclass and not tgisinternal"
                            ).fetchone()[0] == 0
    result = fresh.runner("rollback", "--select", "task_photos")
    assert result.exit_code == 0, result.output
    with fresh.connect() as conn:
        assert conn.execute(EXACTLY).fetchall() == exactly_before
        assert liked_keys(conn) == before
        assert conn.execute(FOREIGN_KEY).fetchone() == foreign_key
        assert description(conn, "public.photo_likes") == likes_table


REMOVED = """
select id from (select id, row_number() over (partition by task_pk, photo_id order by id desc)
as n from breezeway.task_photos) as ranked where n > 1 order by id
"""
KEPT_AND_LIKED = """
select p.id, p.task_pk, p.photo_id from breezeway.task_photos as p
where p.id not in (""" + REMOVED + """) and exists (select from public.photo_likes as l
where l.photo = p.id) order by p.id limit 2
"""


def test_references_the_etl_writes_during_the_swap_are_moved_too(fresh: Database) -> None:
    """Before the lock the ETL likes removed duplicates, re-points a like at one, and sends
    a new copy of a liked photo, which the keep rule (latest wins) keeps instead: every like
    ends on the kept row of its photo's key, the new copy's included."""
    with_likes(fresh)
    with fresh.connect() as conn:
        removed = [r[0] for r in conn.execute(REMOVED + " limit 3")]
        (replaced, task_pk, photo_id), (unmoved, _, _) = conn.execute(KEPT_AND_LIKED).fetchall()
        likes_of_its_key = {r[0] for r in conn.execute(
            "select l.id from public.photo_likes as l join breezeway.task_photos as p"
            " on p.id = l.photo where (p.task_pk, p.photo_id) = (%s, %s)", (task_pk, photo_id))}
        assert replaced in {r[0] for r in conn.execute(
            "select photo from public.photo_likes where id = any(%s)", (list(likes_of_its_key),))}
        unmoved_like = conn.execute("select id from public.photo_likes where photo = %s limit 1",
                                    (unmoved,)).fetchone()[0]
    written: dict[str, int] = {}

    def write_meanwhile(label: str) -> None:
        if not label.startswith("replay before the lock") or written:
            return
        with fresh.connect() as etl:
            written["new_like"] = etl.execute(
                "insert into public.photo_likes (photo, liked_by) values (%s, 'late')"
                " returning id", (removed[0],)).fetchone()[0]
            etl.execute("update public.photo_likes set photo = %s where id = %s",
                        (removed[1], unmoved_like))
            written["new_copy"] = etl.execute(
                "insert into breezeway.task_photos (task_pk, photo_id)"
                " values (%s, %s) returning id", (task_pk, photo_id)).fetchone()[0]
            written["liked_copy"] = etl.execute(
                "insert into public.photo_likes (photo, liked_by) values (%s, 'newest')"
                " returning id", (written["new_copy"],)).fetchone()[0]

    with fresh.connect() as conn:
        keys_of = {row_id: key for row_id, *key in conn.execute(
            "select id, task_pk, photo_id from breezeway.task_photos")}
    options = swap.SwapOptions(target_dir=fresh.target_dir, select=["task_photos"])
    with fresh.connect() as conn:
        conn.execute("set search_path = pg_catalog")
        swap.execute(conn, swap.make_plans(conn, options), options, after_step=write_meanwhile)
    assert written
    with fresh.connect() as conn:
        now = dict(conn.execute("select id, photo from public.photo_likes"
                                " where photo is not null").fetchall())
        live = {row_id: key for row_id, *key in conn.execute(
            "select id, task_pk, photo_id from breezeway.task_photos")}
    # Each like written meanwhile is on the kept row of the key it was written for.
    assert live[now[written["new_like"]]] == keys_of[removed[0]]
    assert live[now[unmoved_like]] == keys_of[removed[1]]
    # The new copy is the kept row of its key, and every like of the rows it replaced is its.
    assert now[written["liked_copy"]] == written["new_copy"]
    assert {like for like, photo in now.items() if photo == written["new_copy"]} == {
        *likes_of_its_key, written["liked_copy"]}
    assert set(now.values()) <= set(live)


def test_a_reference_made_after_the_capture_is_refused_until_it_is_captured_too(
        fresh: Database) -> None:
    with fresh.connect() as conn:
        conn.execute(LIKES)
        before = conn.execute(EXACTLY).fetchall()
    result = fresh.runner("swap", "--select", "task_photos")
    assert result.exit_code == 4, result.output
    assert said(result) == [
        "Error: the rows written into public.photo_likes.photo_likes_photo_fkey, which points at "
        "breezeway.task_photos, are not captured, so the swap could miss some to re-point: run "
        "`runner capture` (it captures the foreign keys that point at each table it captures), "
        "then `runner swap`"]
    assert fresh.runner("capture").exit_code == 0
    assert fresh.runner("swap", "--select", "task_photos").exit_code == 0
    with fresh.connect() as conn:
        assert conn.execute(EXACTLY).fetchall() != before


def test_the_plan_says_how_many_rows_each_reference_re_points(fresh: Database) -> None:
    with_likes(fresh)
    with fresh.connect() as conn:
        rows, pointing = conn.execute(
            "select count(*), count(*) filter (where photo in (" + REMOVED + "))"
            " from public.photo_likes").fetchone()
        before = conn.execute(EXACTLY).fetchall()
    result = fresh.runner("swap", "--select", "task_photos", "--dry-run")
    assert result.exit_code == 0, result.output
    assert (f"-- breezeway.task_photos: {pointing:,} of the {rows:,} rows of public.photo_likes "
            "point at a duplicate the swap removes (foreign key photo_likes_photo_fkey) and "
            "move to the kept row of its key") in result.stdout
    assert "-- with them public.photo_likes, whose foreign keys are added again" in result.stdout
    assert ('alter table "public"."photo_likes" add constraint "photo_likes_photo_fkey" FOREIGN '
            "KEY (photo) REFERENCES breezeway.task_photos(id) ON DELETE CASCADE DEFERRABLE not "
            "valid;") in result.stdout
    with fresh.connect() as conn:
        assert conn.execute(EXACTLY).fetchall() == before


def _etl_meanwhile(etl: psycopg.Connection, rng: random.Random, likes: dict[int, int | None],
                   writes: int) -> None:
    """Random writes of the ETL while the swap works, to both tables, `likes` kept as the ETL
    leaves it. It moves and deletes only likes of its own (the swap row-locks those it
    re-points until its commit) and deletes only photos nobody likes."""
    own: list[int] = []
    for _ in range(writes):
        photos = [r[0] for r in etl.execute("select id from breezeway.task_photos")]
        removed = [r[0] for r in etl.execute(REMOVED)]
        action = rng.choice(["like removed", "like any", "move own", "delete own", "new copy",
                             "re-key", "delete unliked"])
        if action in ("like removed", "like any"):
            photo = rng.choice(removed if action == "like removed" and removed else photos)
            own.append(etl.execute("insert into public.photo_likes (photo, liked_by)"
                                   " values (%s, 'etl') returning id", (photo,)).fetchone()[0])
            likes[own[-1]] = photo
        elif action == "move own" and own:
            like, photo = rng.choice(own), rng.choice(photos)
            etl.execute("update public.photo_likes set photo = %s where id = %s", (photo, like))
            likes[like] = photo
        elif action == "delete own" and own:
            like = own.pop(rng.randrange(len(own)))
            etl.execute("delete from public.photo_likes where id = %s", (like,))
            del likes[like]
        elif action == "new copy":
            etl.execute("insert into breezeway.task_photos (task_pk, photo_id) select task_pk,"
                        " photo_id from breezeway.task_photos where id = %s", (rng.choice(photos),))
        elif action == "re-key":
            etl.execute("update breezeway.task_photos set photo_id = %s where id = %s",
                        (rng.choice(photos), rng.choice(photos)))
        elif action == "delete unliked":
            etl.execute("delete from breezeway.task_photos where id = (select p.id from"
                        " breezeway.task_photos as p where not exists (select from"
                        " public.photo_likes as l where l.photo = p.id) order by p.id"
                        " offset %s limit 1)", (rng.randrange(50),))


@pytest.mark.parametrize("seed", list(range(1, 9)))
def test_random_writes_during_the_swap_end_on_the_kept_rows_and_come_back_on_rollback(
        fresh: Database, seed: int) -> None:
    with_likes(fresh)
    with fresh.connect() as conn:
        likes = dict(conn.execute("select id, photo from public.photo_likes").fetchall())
    rng = random.Random(seed)
    # Someone reads the likes as the swap begins: its first lock tries time out, and the ETL
    # writes between them too.
    holder = fresh.connect()
    holder.execute("begin")
    holder.execute("lock table public.photo_likes in access share mode")
    tries = []

    def write_meanwhile(label: str) -> None:
        if label.startswith("replay before the lock"):
            with fresh.connect() as etl:
                _etl_meanwhile(etl, rng, likes, 30)
        if label == "lock try timed out" and not tries:
            tries.append(label)
            with fresh.connect() as etl:
                _etl_meanwhile(etl, rng, likes, 15)
            holder.execute("rollback")

    options = swap.SwapOptions(target_dir=fresh.target_dir, select=["task_photos"],
                               lock_timeout_ms=50)
    with fresh.connect() as conn:
        conn.execute("set search_path = pg_catalog")
        swap.execute(conn, swap.make_plans(conn, options), options, after_step=write_meanwhile)
    holder.close()
    assert tries
    with fresh.connect() as conn:
        archive = conn.execute(
            "select format('%%I.%%I', 'dedup_archive', archive_table) from"
            " dedup_archive.swap_log where live_table = %s", ("task_photos",)).fetchone()[0]
        # Every like is where the ETL left it, or on the kept row of that row's key as the
        # original had it at the commit; the foreign key holds, validated.
        now = dict(conn.execute("select id, photo from public.photo_likes").fetchall())
        assert now.keys() == likes.keys()
        keys_then = {row_id: (task_pk, photo_id) for row_id, task_pk, photo_id in conn.execute(
            f"select id, task_pk, photo_id from {archive}")}
        keys_now = {row_id: (task_pk, photo_id) for row_id, task_pk, photo_id in conn.execute(
            "select id, task_pk, photo_id from breezeway.task_photos")}
        for like, photo in likes.items():
            if photo is not None:
                assert keys_now[now[like]] == keys_then[photo], like
        assert conn.execute(FOREIGN_KEY).fetchone()[1] is True
    result = fresh.runner("rollback", "--select", "task_photos")
    assert result.exit_code == 0, result.output
    with fresh.connect() as conn:
        assert dict(conn.execute("select id, photo from public.photo_likes").fetchall()) == likes


def test_a_writer_that_waits_for_a_re_pointed_row_makes_the_swap_give_up_at_once(
        fresh: Database) -> None:
    """The ETL updates a like the swap moved: it waits for the swap's commit, and its lock on
    the likes keeps the swap from theirs. The swap gives up at the first failed try, long
    before --lock-wait, and the writer goes on."""
    with_likes(fresh)
    with fresh.connect() as conn:
        moved_like = conn.execute("select id from public.photo_likes where photo in ("
                                  + REMOVED + ") order by id limit 1").fetchone()[0]
        before = conn.execute(EXACTLY).fetchall()
    writer = threading.Thread(target=lambda: fresh.scalar(
        "update public.photo_likes set liked_by = 'edited' where id = %s returning id",
        (moved_like,)))

    tries = []

    def update_meanwhile(label: str) -> None:
        if label == "lock try timed out":
            tries.append(label)
        if label.startswith("replay before the lock"):
            writer.start()
            with fresh.connect() as conn:
                while not conn.execute("select exists (select from pg_stat_activity where"
                                       " wait_event_type = 'Lock' and query like 'update public"
                                       ".photo_likes%')").fetchone()[0]:
                    time.sleep(0.01)

    options = swap.SwapOptions(target_dir=fresh.target_dir, select=["task_photos"])
    with fresh.connect() as conn, pytest.raises(RunnerError) as gave_up:
        swap.execute(conn, swap.make_plans(conn, options), options, after_step=update_meanwhile)
    writer.join(10)
    assert tries == ["lock try timed out"]
    assert str(gave_up.value).startswith("gave up, nothing was changed: pid ")
    assert "waits for rows the swap re-pointed" in str(gave_up.value)
    with fresh.connect() as conn:
        after = conn.execute(EXACTLY).fetchall()
        assert [row for row in after if row[0] != moved_like] == [
            row for row in before if row[0] != moved_like]
        assert dict((row[0], row[2]) for row in after)[moved_like] == "edited"
        assert conn.execute("select to_regclass('dedup_archive.swap_log')").fetchone()[0] is None


def test_a_trigger_that_keeps_a_row_from_moving_fails_the_swap_before_anything_changes(
        fresh: Database) -> None:
    with_likes(fresh)
    with fresh.connect() as conn:
        conn.execute("create function public.keep_likes() returns trigger language plpgsql as"
                     " $$ begin if new.liked_by = 'guest 3' then return null; end if;"
                     " return new; end $$;"
                     " create trigger keep_likes before update on public.photo_likes"
                     " for each row execute function public.keep_likes()")
        before = conn.execute(EXACTLY).fetchall()
    result = fresh.runner("swap", "--select", "task_photos")
    assert result.exit_code == 4, result.output
    assert said(result)[-1].startswith(
        "Error: check failed, nothing was changed: public.photo_likes.photo_likes_photo_fkey: "
        "every row that pointed at a row moved in this round points at its kept row (a trigger "
        "or a policy of public.photo_likes could have kept one from it) "
        "(rows_left_pointing_at_removed_rows=")
    with fresh.connect() as conn:
        assert conn.execute(EXACTLY).fetchall() == before


PARTITIONED_VIEWS = """
create table public.photo_views (id bigint generated always as identity, region int not null,
    photo bigint references breezeway.task_photos (id), primary key (id, region))
    partition by list (region);
create table public.photo_views_1 partition of public.photo_views for values in (1);
create table public.photo_views_2 partition of public.photo_views for values in (2);
create index on public.photo_views (photo);
insert into public.photo_views (region, photo)
    select 1 + id % 2, id from breezeway.task_photos where id % 5 = 0;
"""
# Each view by the natural key of the photo it points at.
VIEWED_KEYS = """
select v.id, p.task_pk, p.photo_id from public.photo_views as v
join breezeway.task_photos as p on p.id = v.photo order by v.id
"""


def test_a_partitioned_referencing_table_is_re_pointed_from_postgresql_18_refused_before(
        fresh: Database) -> None:
    """test_versions.py runs the re-pointing of one on every version from 18."""
    with fresh.connect() as conn:
        conn.execute(PARTITIONED_VIEWS)
        version = conn.info.server_version
        viewed = conn.execute(VIEWED_KEYS).fetchall()
    assert fresh.runner("capture").exit_code == 0
    result = fresh.runner("swap", "--select", "task_photos")
    if version >= 180000:
        assert result.exit_code == 0, result.output
        with fresh.connect() as conn:
            assert conn.execute(VIEWED_KEYS).fetchall() == viewed
        return
    assert result.exit_code == 4, result.output
    assert said(result) == [
        "Error: public.photo_views, whose foreign key photo_views_photo_fkey points at "
        "breezeway.task_photos, is partitioned, and before PostgreSQL 18 such a key cannot be "
        "added NOT VALID: the swap would check all its rows under the lock; re-point them by "
        "hand, or set references: refuse for breezeway.task_photos"]


def _reference_triggers(conn: psycopg.Connection) -> list[str]:
    return [r[0] for r in conn.execute(
        "select tgname from pg_trigger where tgrelid = 'public.photo_likes'::regclass"
        " and not tgisinternal")]


def test_capture_stop_removes_the_capture_of_the_references_too(fresh: Database) -> None:
    with_likes(fresh)
    with fresh.connect() as conn:
        assert _reference_triggers(conn) == ["dedup_references__photo_likes_photo_fkey"]
    status = fresh.runner("capture", "--status", "--format", "json")
    assert status.exit_code == 0, status.output
    (photos,) = [row for row in json.loads(status.stdout)
                 if row["table"] == "breezeway.task_photos"]
    assert photos["references"] == "public.photo_likes.photo_likes_photo_fkey"
    stopped = fresh.runner("capture", "--stop", "--select", "task_photos")
    assert stopped.exit_code == 0, stopped.output
    with fresh.connect() as conn:
        assert _reference_triggers(conn) == []
        assert conn.execute(
            "select count(*) from pg_class where relnamespace = 'dedup_archive'::regnamespace"
            " and relname like 'public__photo_likes%'").fetchone()[0] == 0


def test_cleanup_drops_the_record_of_the_re_pointed_rows_with_the_archive(
        fresh: Database) -> None:
    with_likes(fresh)
    assert fresh.runner("swap", "--select", "task_photos").exit_code == 0
    with fresh.connect() as conn:
        record = record_of(conn, "task_photos")
        assert conn.execute("select to_regclass(%s)", (record,)).fetchone()[0] is not None
    cleaned = fresh.runner("cleanup", "--older-than", "1ms")
    assert cleaned.exit_code == 0, cleaned.output
    with fresh.connect() as conn:
        assert conn.execute("select to_regclass(%s)", (record,)).fetchone()[0] is None
    # Without the archive and its record, a rollback says why it cannot.
    refused = fresh.runner("rollback", "--select", "task_photos")
    assert refused.exit_code == 4
