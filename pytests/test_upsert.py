"""runner upsert-sql: the statement that stops the ETL duplicating rows, on a real server."""

from __future__ import annotations

import re
from datetime import timedelta

import psycopg
import pytest
from conftest import TEST_SCALE, Database
from psycopg import sql
from psycopg.rows import dict_row

from runner import demo
from runner.declaration import artifacts
from runner.declaration.artifacts import Relation
from runner.errors import RunnerError
from runner.facts import upsert

PROPERTY_PHOTOS_UPSERT = (
    'insert into "breezeway"."property_photos" ("property_pk", "photo_id", "url", '
    '"thumbnail_url", "caption", "sort_order", "exif", "last_sync_time")\n'
    "values (%(property_pk)s, %(photo_id)s, %(url)s, %(thumbnail_url)s, %(caption)s, "
    "%(sort_order)s, %(exif)s, now())\n"
    'on conflict ("property_pk", "photo_id")\n'
    'do update set "url" = excluded."url", "thumbnail_url" = excluded."thumbnail_url", '
    '"caption" = excluded."caption", "sort_order" = excluded."sort_order", '
    '"exif" = excluded."exif", "last_sync_time" = now()\n'
)
NO_CONSTRAINT = "there is no unique or exclusion constraint matching the ON CONFLICT specification"


def _swapped(database: Database) -> None:
    result = database.runner("swap")
    assert result.exit_code == 0, result.output


def _count(conn: psycopg.Connection, schema: str, table: str) -> int:
    return conn.execute(sql.SQL("select count(*) from {}").format(
        sql.Identifier(schema, table))).fetchone()[0]


def _one_error_line(database: Database, *args: str) -> str:
    result = database.runner("upsert-sql", *args)
    assert result.exit_code == 4, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    return lines[0]


def test_prints_the_upsert_on_the_constraint_the_swap_added(fresh: Database) -> None:
    _swapped(fresh)
    result = fresh.runner("upsert-sql", "property_photos", "--touch", "last_sync_time")
    assert result.exit_code == 0, result.output
    # The id is the table's (a serial): not inserted, not updated.
    assert result.output == PROPERTY_PHOTOS_UPSERT
    as_schema_table = fresh.runner("upsert-sql", "breezeway.property_photos",
                                   "--touch", "last_sync_time")
    assert as_schema_table.output == PROPERTY_PHOTOS_UPSERT
    with fresh.connect() as conn:
        statement = upsert.manifest_upsert_statement(conn, fresh.target_dir, "property_photos",
                                                     touch=["last_sync_time"])
        assert statement.as_string(conn) + "\n" == PROPERTY_PHOTOS_UPSERT


def test_the_etl_rerun_with_the_upsert_adds_no_row(fresh: Database) -> None:
    """Each table's ETL, run twice with the printed statement: one row per key throughout."""
    _swapped(fresh)
    expected = demo.expected_counts(TEST_SCALE)
    with fresh.connect() as conn:
        started = conn.execute("select now()").fetchone()[0]
        for target in artifacts.load_targets(fresh.target_dir):
            live = target.live
            has_sync_time = conn.execute(
                "select count(*) = 1 from information_schema.columns where table_schema = %s"
                " and table_name = %s and column_name = 'last_sync_time'",
                (live.schema, live.name)).fetchone()[0]
            touch = ["--touch", "last_sync_time"] if has_sync_time else []
            printed = fresh.runner("upsert-sql", live.name, *touch)
            assert printed.exit_code == 0, printed.output
            # One statement, or for an alternative key one per shape of key, as printed.
            upserts = upsert.manifest_upserts(conn, fresh.target_dir, live.name, touch[1:])
            assert printed.output == (
                f"{upserts[0].statement.as_string(conn)}\n" if len(upserts) == 1 else "".join(
                    f"-- for {u.rows}:\n{u.statement.as_string(conn)};\n" for u in upserts))
            assert len(upserts) == (3 if target.spec.alternative_key else 1), live.name
            columns = re.findall(r"%\(([^)]+)\)s", upserts[0].statement.as_string(conn))
            # Rows whose key has a NULL that NULLs distinct make their own are new rows each
            # run, as that policy means; every other key exists once and must stay once.
            keyed = sql.SQL(" and ").join(
                sql.SQL("{} is not null").format(sql.Identifier(column))
                for column in target.spec.natural_key
            ) if target.spec.nulls == "distinct" else sql.SQL("true")
            rows = conn.cursor(row_factory=dict_row).execute(
                sql.SQL("select {} from {} where {}").format(
                    sql.SQL(", ").join(map(sql.Identifier, columns)),
                    sql.Identifier(live.schema, live.name), keyed)).fetchall()
            assert _count(conn, live.schema, live.name) == expected[live.name].unique
            for _ in range(2):
                for shaped in upserts:
                    conn.cursor().executemany(shaped.statement,
                                              [row for row in rows if shaped.takes(row)])
                assert _count(conn, live.schema, live.name) == expected[live.name].unique
            if has_sync_time:
                stale = conn.execute(sql.SQL("select count(*) from {} where last_sync_time < %s")
                                     .format(sql.Identifier(live.schema, live.name)),
                                     (started,)).fetchone()[0]
                assert stale == 0, live.name
        # A value the API changed is updated in place.
        statement = fresh.runner("upsert-sql", "property_photos",
                                 "--touch", "last_sync_time").output
        row = conn.cursor(row_factory=dict_row).execute(
            "select property_pk, photo_id, url, thumbnail_url, caption, sort_order, exif"
            " from breezeway.property_photos order by id limit 1").fetchone()
        conn.execute(statement, {**row, "caption": "changed by the API"})
        assert conn.execute(
            "select caption from breezeway.property_photos where property_pk = %s"
            " and photo_id = %s", (row["property_pk"], row["photo_id"])
        ).fetchall() == [("changed by the API",)]
        assert _count(conn, "breezeway", "property_photos") == expected["property_photos"].unique


ETL_DO_NOTHING = (
    "insert into breezeway.property_photos (property_pk, photo_id, url, thumbnail_url, caption,"
    " sort_order, exif) select property_pk, photo_id, url, thumbnail_url, caption, sort_order,"
    " exif from dedup.property_photos on conflict do nothing"
)


def test_an_earliest_wins_table_gets_an_upsert_that_keeps_the_earliest(fresh: Database) -> None:
    """business_events keeps the first event of a request (keep: ts, then id, ascending): a
    re-sent event replaces the kept one only if it is earlier, as the swap would choose."""
    _swapped(fresh)
    printed = fresh.runner("upsert-sql", "business_events")
    assert printed.exit_code == 0, printed.output
    assert printed.stdout.endswith(
        'where ((excluded."ts" < "business_events"."ts" or (excluded."ts" is not null and'
        ' "business_events"."ts" is null)) or excluded."ts" is not distinct from'
        ' "business_events"."ts" and (excluded."id" < "business_events"."id" or (excluded."id"'
        ' is not null and "business_events"."id" is null)))\n')
    with fresh.connect() as conn:
        kept = conn.cursor(row_factory=dict_row).execute(
            "select request_id, event_type, ts from breezeway.business_events"
            " where request_id is not null order by id limit 1").fetchone()
        later = {**kept, "event_type": "sent again, later", "ts": kept["ts"] + timedelta(days=1)}
        conn.execute(printed.stdout, later)
        row = ("select event_type, ts from breezeway.business_events where request_id = %s")
        assert conn.execute(row, (kept["request_id"],)).fetchall() == [
            (kept["event_type"], kept["ts"])]
        earlier = {**kept, "event_type": "sent again, earlier",
                   "ts": kept["ts"] - timedelta(days=1)}
        conn.execute(printed.stdout, earlier)
        assert conn.execute(row, (kept["request_id"],)).fetchall() == [
            ("sent again, earlier", earlier["ts"])]


def test_the_etl_statement_duplicated_before_the_swap_and_adds_nothing_after(
        fresh: Database) -> None:
    unique = demo.expected_counts(TEST_SCALE)["property_photos"].unique
    with fresh.connect() as conn, conn.transaction(force_rollback=True):
        assert conn.execute(ETL_DO_NOTHING).rowcount == unique
    _swapped(fresh)
    with fresh.connect() as conn:
        assert conn.execute(ETL_DO_NOTHING).rowcount == 0
        assert _count(conn, "breezeway", "property_photos") == unique


PARTIAL_AND_EXPRESSION = """
create schema upsert_cases;
create table upsert_cases.subscriptions (
    id serial primary key, account int not null, plan text not null, status text not null,
    price numeric, synced_at timestamptz);
-- One live subscription per account and plan; cancelled ones are history.
create unique index subscriptions_live on upsert_cases.subscriptions (account, plan)
    where status not like 'cancel%';
create table upsert_cases.accounts (
    id bigint generated always as identity, tenant int not null, email text not null,
    name text, domain text generated always as (split_part(email, '@', 2)) stored);
create unique index accounts_email on upsert_cases.accounts (tenant, lower(email));
insert into upsert_cases.subscriptions (account, plan, status, price) values
    (1, 'basic', 'active', 10), (1, 'pro', 'trial', 20), (2, 'basic', 'active', 10),
    (2, 'basic', 'cancelled', 8);
insert into upsert_cases.accounts (tenant, email, name) values
    (1, 'Ann@example.com', 'Ann'), (1, 'bob@example.com', 'Bob'), (2, 'ann@example.com', 'Ann');
"""


def test_partial_and_expression_indexes_get_their_inference_clause(fresh: Database) -> None:
    with fresh.connect() as conn:
        conn.execute(PARTIAL_AND_EXPRESSION)
        subscriptions = upsert.upsert_statement(conn, "upsert_cases", "subscriptions",
                                                ["account", "plan"], touch=["synced_at"])
        assert subscriptions.as_string(conn) == (
            'insert into "upsert_cases"."subscriptions" ("account", "plan", "status", "price", '
            '"synced_at")\n'
            "values (%(account)s, %(plan)s, %(status)s, %(price)s, now())\n"
            "on conflict (\"account\", \"plan\") where status !~~ 'cancel%%'::text\n"
            'do update set "status" = excluded."status", "price" = excluded."price", '
            '"synced_at" = now()'
        )
        live = [{"account": 1, "plan": "basic", "status": "active", "price": 12},
                {"account": 1, "plan": "pro", "status": "active", "price": 25},
                {"account": 2, "plan": "basic", "status": "active", "price": 11}]
        for _ in range(2):
            conn.cursor().executemany(subscriptions, live)
            assert conn.execute(
                "select account, plan, status, price, synced_at is not null"
                " from upsert_cases.subscriptions order by id").fetchall() == [
                (1, "basic", "active", 12, True), (1, "pro", "active", 25, True),
                (2, "basic", "active", 11, True), (2, "basic", "cancelled", 8, False)]
        # Without the index's predicate PostgreSQL finds no arbiter: the clause is what works.
        without_predicate = subscriptions.as_string(conn).replace(
            " where status !~~ 'cancel%%'::text", "")
        with pytest.raises(psycopg.errors.InvalidColumnReference, match=NO_CONSTRAINT):
            conn.execute(without_predicate, live[0])

        accounts = upsert.upsert_statement(conn, "upsert_cases", "accounts",
                                           ["tenant", "email"])
        assert accounts.as_string(conn) == (
            'insert into "upsert_cases"."accounts" ("tenant", "email", "name")\n'
            "values (%(tenant)s, %(email)s, %(name)s)\n"
            'on conflict ("tenant", (lower(email)))\n'
            'do update set "name" = excluded."name"'
        )
        renamed = [{"tenant": 1, "email": "ANN@example.com", "name": "Ann Lee"},
                   {"tenant": 2, "email": "Ann@Example.com", "name": "Ann Ray"}]
        for _ in range(2):
            conn.cursor().executemany(accounts, renamed)
            assert conn.execute(
                "select tenant, email, name, domain from upsert_cases.accounts order by id"
            ).fetchall() == [(1, "Ann@example.com", "Ann Lee", "example.com"),
                             (1, "bob@example.com", "Bob", "example.com"),
                             (2, "ann@example.com", "Ann Ray", "example.com")]
        plain_columns = accounts.as_string(conn).replace('(lower(email))', '"email"')
        with pytest.raises(psycopg.errors.InvalidColumnReference, match=NO_CONSTRAINT):
            conn.execute(plain_columns, renamed[0])


SCHEMA = 'Upsert "Cases" Ü'
TABLE = "Guest's \"List\""
KEY = ["Reservation", 'e-mail "primary"']


def test_names_that_need_quoting(fresh: Database) -> None:
    with fresh.connect() as conn:
        conn.execute(sql.SQL(
            "create schema {schema}; create table {table} ({row_id} bigserial,"
            " {reservation} bigint not null, {email} text, {name} text, {share} numeric,"
            " {synced_at} timestamptz, unique nulls not distinct ({reservation}, {email}))"
        ).format(
            schema=sql.Identifier(SCHEMA), table=sql.Identifier(SCHEMA, TABLE),
            row_id=sql.Identifier("Row Id"), reservation=sql.Identifier(KEY[0]),
            email=sql.Identifier(KEY[1]), name=sql.Identifier("Full Name"),
            share=sql.Identifier("Share %"), synced_at=sql.Identifier("Synced At"),
        ))
        statement = upsert.upsert_statement(conn, SCHEMA, TABLE, KEY, touch=["Synced At"])
        # A % in a name is doubled: psycopg reads each % of a parameterized statement.
        assert statement.as_string(conn) == (
            'insert into "Upsert ""Cases"" Ü"."Guest\'s ""List""" ("Reservation", '
            '"e-mail ""primary""", "Full Name", "Share %%", "Synced At")\n'
            'values (%(Reservation)s, %(e-mail "primary")s, %(Full Name)s, %(Share %)s, now())\n'
            'on conflict ("Reservation", "e-mail ""primary""")\n'
            'do update set "Full Name" = excluded."Full Name", '
            '"Share %%" = excluded."Share %%", "Synced At" = now()'
        )
        for name in ("Ann", "Ann Lee"):
            conn.cursor().executemany(statement, [
                {"Reservation": 1, 'e-mail "primary"': "ann@example.com", "Full Name": name,
                 "Share %": 50},
                {"Reservation": 1, 'e-mail "primary"': None, "Full Name": name, "Share %": 50},
            ])
        rows = conn.execute(sql.SQL("select {}, {} from {} order by 1").format(
            sql.Identifier("Row Id"), sql.Identifier("Full Name"),
            sql.Identifier(SCHEMA, TABLE))).fetchall()
        assert rows == [(1, "Ann Lee"), (2, "Ann Lee")]


def test_refuses_a_table_whose_key_nothing_enforces_yet(built: Database) -> None:
    assert _one_error_line(built, "property_photos") == (
        "Error: no unique constraint or index on breezeway.property_photos enforces its natural"
        " key (property_pk, photo_id) yet, so ON CONFLICT has nothing to match: run `runner"
        " swap` first"
    )


def test_a_table_that_always_had_its_constraint_needs_no_swap(built: Database) -> None:
    result = built.runner("upsert-sql", "task_tags")
    assert result.exit_code == 0, result.output
    assert result.output == (
        'insert into "breezeway"."task_tags" ("task_pk", "tag_pk", "last_sync_time")\n'
        'values (%(task_pk)s, %(tag_pk)s, %(last_sync_time)s)\n'
        'on conflict ("task_pk", "tag_pk")\n'
        'do update set "last_sync_time" = excluded."last_sync_time"\n'
    )


def test_refuses_unknown_tables_and_touch_columns(built: Database) -> None:
    known = ", ".join(t.live.name for t in artifacts.load_targets(built.target_dir))
    assert _one_error_line(built, "property_photo") == (
        "Error: property_photo: no deduplicated table of that name in dbt's manifest; known: "
        f"{known}"
    )
    assert _one_error_line(built, "task_tags", "--touch", "synced") == (
        "Error: --touch synced: breezeway.task_tags has no such column; its columns: id, "
        "task_pk, tag_pk, last_sync_time"
    )
    assert _one_error_line(built, "task_tags", "--touch", "id") == (
        "Error: --touch id: breezeway.task_tags fills that column itself (identity, serial or"
        " generated): touch a column the ETL writes"
    )
    assert _one_error_line(built, "task_tags", "--touch", "tag_pk") == (
        "Error: --touch tag_pk: that column is in the natural key, which an upsert never"
        " changes: touch another column"
    )


def test_refuses_a_deferrable_constraint(fresh: Database) -> None:
    with fresh.connect() as conn:
        name = conn.execute("select conname from pg_constraint where contype = 'u'"
                            " and conrelid = 'breezeway.task_tags'::regclass").fetchone()[0]
        conn.execute(sql.SQL("alter table breezeway.task_tags drop constraint {name},"
                             " add constraint {name} unique (task_pk, tag_pk) deferrable")
                     .format(name=sql.Identifier(name)))
    assert _one_error_line(fresh, "task_tags") == (
        f"Error: {name} on breezeway.task_tags is deferrable, and ON CONFLICT cannot arbitrate"
        " on a deferrable constraint: make it NOT DEFERRABLE"
    )


def test_placeholders_for_the_common_drivers_load_the_same_rows(fresh: Database) -> None:
    """Numbered $1 (asyncpg, node-postgres, pgx), loaded here with PREPARE and EXECUTE, which
    read them as those drivers do; JDBC's ? and :name as the same statement with the same
    parameters in the same order; every form one row per key, re-sent twice."""
    _swapped(fresh)
    printed = {style: fresh.runner("upsert-sql", "task_photos", "--touch", "last_sync_time",
                                   "--placeholders", style)
               for style in ("psycopg", "numbered", "jdbc", "named")}
    for style, result in printed.items():
        assert result.exit_code == 0, (style, result.output)
    order = ["task_pk", "photo_id", "url"]
    numbered = printed["numbered"].output
    assert numbered.startswith("-- parameters, in order: $1 task_pk, $2 photo_id, $3 url\n")
    statement = numbered.split("\n", 1)[1]
    jdbc = printed["jdbc"].output
    assert jdbc.startswith("-- parameters, in order: task_pk, photo_id, url\n")
    assert jdbc.split("\n", 1)[1] == re.sub(r"\$\d+", "?", statement)
    assert printed["named"].output == re.sub(
        r"\$(\d+)", lambda m: f":{order[int(m.group(1)) - 1]}", statement)
    assert printed["psycopg"].output == re.sub(
        r"\$(\d+)", lambda m: f"%({order[int(m.group(1)) - 1]})s", statement)
    with fresh.connect() as conn:
        rows = conn.execute("select task_pk, photo_id, url from breezeway.task_photos").fetchall()
        conn.execute(f"prepare load_photo as {statement}")
        for _ in range(2):
            for row in rows:
                conn.execute(sql.SQL("execute load_photo ({})").format(
                    sql.SQL(", ").join(map(sql.Literal, row))))
        assert _count(conn, "breezeway", "task_photos") == len(rows)


def test_a_column_no_named_parameter_can_name_is_refused_in_that_style_alone() -> None:
    relation = Relation("upsert_cases", "quoted")
    with pytest.raises(RunnerError) as refused:
        upsert._Style("named").parameter(relation, "Synced At", 1)
    assert str(refused.value) == ("column 'Synced At' of upsert_cases.quoted cannot be a :name "
                                  "parameter: use --placeholders numbered or jdbc")
    assert upsert._Style("numbered").parameter(relation, "Synced At", 3).as_string() == "$3"
