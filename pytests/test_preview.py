"""`runner plan` before `runner capture` and `dbt build`, on a real server: what the swap would
do to each table, from the catalog, the YAML and one scan of each, changing nothing."""

from __future__ import annotations

import json

import psycopg
from conftest import Database, _create_database
from psycopg import sql
from test_references import LIKES


def test_the_plan_before_capture_and_build_says_what_the_swap_would_do(
        server, pg_env, tmp_path) -> None:
    _create_database(server, "not_yet_built", template="demo_source")
    database = Database({**pg_env, "PGDATABASE": "not_yet_built"}, tmp_path / "target")
    try:
        with database.connect() as conn:
            conn.execute(LIKES)
        result = database.runner("plan")
        assert result.exit_code == 0, result.output
        said = result.stdout.splitlines()
        assert said[0].startswith("-- before `runner capture` and `dbt build`: what `runner "
                                  "swap` would do")
        audited = {row["table"]: row for row in json.loads(
            database.runner("audit", "--format", "json").stdout)}
        photos = audited["breezeway.task_photos"]
        (head,) = [line for line in said if line.startswith("-- breezeway.task_photos: ")]
        assert head.startswith(f"-- breezeway.task_photos: {photos['total_rows']:,} rows, "
                               f"{photos['unique_rows']:,} kept, {photos['duplicate_rows']:,} "
                               "removed: swap, because 96.4% of its rows are duplicates, "
                               "more than 15%: copying the kept rows costs less than removing "
                               "the rest; every original row is kept, in the archive schema")
        assert ("--   the cut-over locks ACCESS EXCLUSIVE on breezeway.task_photos, "
                "public.photo_likes at once, for milliseconds") in said
        assert ("--   and SHARE ROW EXCLUSIVE on breezeway.tasks, whose writers wait the same "
                "moments") in said
        assert any(line.startswith("--   re-points ") and line.endswith(
            " rows of public.photo_likes (foreign key photo_likes_photo_fkey)") for line in said)
        tags = audited["breezeway.task_tags"]
        assert (f"-- breezeway.task_tags: {tags['total_rows']:,} rows, {tags['total_rows']:,} "
                "kept, 0 removed: nothing to do, its natural key is enforced by "
                "task_tags_task_pk_tag_pk_key") in said
        with database.connect() as conn:
            assert conn.execute("select to_regnamespace('dedup_archive')").fetchone()[0] is None
            assert conn.execute("select count(*) from pg_trigger where tgname like 'dedup_%'"
                                ).fetchone()[0] == 0
    finally:
        with psycopg.connect(autocommit=True, **server.conninfo) as admin:
            admin.execute(sql.SQL("drop database {} with (force)").format(
                sql.Identifier("not_yet_built")))
