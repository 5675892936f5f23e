"""Demo data in the shape of the incident: child tables that an ETL re-inserted on every run.

Run r of the ETL inserted every natural key once more, with a new id and a later last_sync_time,
so row i (0-based, id = i + 1) holds key i mod U from run i div U. Every count the audit should
report, and every id the keep rule should keep, follows from that formula: `expected_counts` and
`expected_kept_ids` state them for the tests and benchmarks.

Everything is generated in SQL with generate_series; nothing is inserted row by row.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import psycopg
from psycopg import sql

from runner import progress
from runner.errors import RunnerError

DEMO_SCHEMA = "breezeway"
# A step that takes longer than this is said on stderr; with -v every step is.
SLOW_STEP_S = 2.0
READER_ROLE = "breezeway_reader"

# Parents at scale 1.0; children spread their keys over them.
PROPERTIES = 200
RESERVATIONS = 1_500
TASKS = 5_000


@dataclass(frozen=True)
class ChildTable:
    """One child table: its size in the incident (scale 1.0) and how its rows are made."""

    name: str
    rows: int
    unique: int
    keep_latest: bool
    """True: the row of the last ETL run survives (seed 003); False: the first (seed 000)."""
    null_key_rows: int = 0
    """Rows whose key is NULL, each a distinct event (business_events' request_id)."""


CHILD_TABLES = (
    ChildTable("property_photos", 10_192_750, 16_113, keep_latest=True),
    ChildTable("task_requirements", 24_174_099, 26_580, keep_latest=True),
    ChildTable("reservation_guests", 1_763_359, 4_321, keep_latest=True),
    ChildTable("task_assignments", 1_485_262, 41_061, keep_latest=True),
    ChildTable("task_photos", 715_312, 26_063, keep_latest=True),
    ChildTable("task_tags", 2_921, 2_921, keep_latest=True),
    ChildTable("business_events", 500_000, 200_000, keep_latest=False, null_key_rows=5_000),
)


@dataclass(frozen=True)
class TableCounts:
    """What an audit of one table must report."""

    total: int
    unique: int
    """Rows left after deduplication: distinct keys, plus every NULL-key row where NULLs differ."""
    null_keys: int
    """Rows with a NULL in any natural-key column."""

    @property
    def duplicates(self) -> int:
        return self.total - self.unique


def _scaled(count: int, scale: float) -> int:
    return max(1, round(count * scale))


@dataclass(frozen=True)
class Layout:
    """The sizes of one demo table at one scale: the numbers every formula below uses."""

    table: ChildTable
    total: int
    keys: int
    null_rows: int
    properties: int
    reservations: int
    tasks: int

    @classmethod
    def at(cls, table: ChildTable, scale: float) -> Layout:
        keys = _scaled(table.unique, scale)
        null_rows = _scaled(table.null_key_rows, scale) if table.null_key_rows else 0
        total = max(keys + null_rows, round(table.rows * scale))
        return cls(
            table=table,
            total=total,
            keys=keys,
            null_rows=null_rows,
            properties=_scaled(PROPERTIES, scale),
            reservations=_scaled(RESERVATIONS, scale),
            tasks=_scaled(TASKS, scale),
        )

    def copies(self, key: int) -> int:
        """How many ETL runs inserted `key`: the first total mod keys keys got one run more."""
        keyed_rows = self.total - self.null_rows
        return (keyed_rows - 1 - key) // self.keys + 1

    def null_email_keys(self) -> list[int]:
        """reservation_guests keys whose guest has no email: every guest of each fifth
        reservation, several guests each, told apart by name (the alternative key)."""
        return [k for k in range(self.keys) if k % self.reservations % 5 == 0]


def expected_counts(scale: float) -> dict[str, TableCounts]:
    counts = {}
    for table in CHILD_TABLES:
        layout = Layout.at(table, scale)
        null_keys = layout.null_rows
        if table.name == "reservation_guests":
            null_keys = sum(layout.copies(k) for k in layout.null_email_keys())
        counts[table.name] = TableCounts(
            total=layout.total, unique=layout.keys + layout.null_rows, null_keys=null_keys
        )
    return counts


def expected_kept_ids(table_name: str, scale: float) -> set[int]:
    """The ids the keep rule must keep: the last run's row of each key, or the first run's."""
    table = next(t for t in CHILD_TABLES if t.name == table_name)
    layout = Layout.at(table, scale)
    null_ids = set(range(1, layout.null_rows + 1))
    if table.keep_latest:
        last_run = {k: layout.copies(k) - 1 for k in range(layout.keys)}
        return null_ids | {
            layout.null_rows + k + run * layout.keys + 1 for k, run in last_run.items()
        }
    return null_ids | {layout.null_rows + k + 1 for k in range(layout.keys)}


# Column definitions and the expression that fills each column from the row number i, the key
# number k and the ETL run number r. Written by us, never from user input, so they are SQL text.
_SYNC_TIME = "timestamptz '2025-01-01 00:00+00' + r * interval '1 hour'"

_CHILD_COLUMNS: dict[str, list[tuple[str, str, str]]] = {
    "property_photos": [
        ("property_pk", "bigint not null", "k % {properties} + 1"),
        ("photo_id", "text", "(571000000 + k)::text"),
        ("url", "text", "'https://photos.example.com/p/' || k || '/original.jpg'"),
        ("thumbnail_url", "text", "'https://photos.example.com/p/' || k || '/thumb.jpg'"),
        # Captions repeat, as people write them: the room, not the photo.
        ("caption", "text", "(array['Living room', 'Kitchen', 'Bedroom', 'Bathroom', 'Patio',"
                            " 'View'])[(k % 6 + 1)::int]"),
        ("sort_order", "integer", "(k % 80)::integer"),
        # The API's EXIF blob: makes a row ~900 bytes, as wide as the incident's rows.
        ("exif", "text", "repeat(md5(k::text), 24)"),
        ("last_sync_time", "timestamptz not null default now()", _SYNC_TIME),
    ],
    "task_requirements": [
        ("task_pk", "bigint not null", "k % {tasks} + 1"),
        ("requirement_id", "bigint", "k + 1"),
        ("description", "text", "'Requirement ' || k"),
        ("is_completed", "boolean", "k % 3 = 0"),
        ("last_sync_time", "timestamptz not null default now()", _SYNC_TIME),
    ],
    "reservation_guests": [
        ("reservation_pk", "bigint not null", "k % {reservations} + 1"),
        (
            "guest_email",
            "text",
            "case when k % {reservations} % 5 = 0 then null"
            " else 'guest' || k || '@example.com' end",
        ),
        # As in a real booking: one phone for the whole party, and now and then two guests
        # of one reservation with the same name (keys k and k + 2 * reservations), told
        # apart by their emails. The guests without email have names of their own.
        (
            "guest_name",
            "text",
            "'Guest ' || case when k % {reservations} % 5 = 0 then k"
            " else k % (2 * {reservations}) end",
        ),
        ("phone", "text", "'+1-555-' || lpad((k % {reservations} % 10000)::text, 4, '0')"),
        ("last_sync_time", "timestamptz not null default now()", _SYNC_TIME),
    ],
    "task_assignments": [
        ("task_pk", "bigint not null", "k % {tasks} + 1"),
        ("assignee_id", "bigint", "1000 + k"),
        ("assignee_name", "text", "'Cleaner ' || k"),
        ("status", "text", "(array['assigned','started','finished'])[(k % 3 + 1)::int]"),
        ("last_sync_time", "timestamptz not null default now()", _SYNC_TIME),
    ],
    "task_photos": [
        ("task_pk", "bigint not null", "k % {tasks} + 1"),
        ("photo_id", "text", "(900000000 + k)::text"),
        ("url", "text", "'https://photos.example.com/t/' || k || '.jpg'"),
        ("last_sync_time", "timestamptz not null default now()", _SYNC_TIME),
    ],
    "task_tags": [
        ("task_pk", "bigint not null", "k % {tasks} + 1"),
        ("tag_pk", "bigint not null", "k / {tasks} + 1"),
        ("last_sync_time", "timestamptz not null default now()", _SYNC_TIME),
    ],
    "business_events": [
        # NULL request ids are the first rows: distinct events that were never given one.
        ("request_id", "uuid", "case when k is null then null else md5('request' || k)::uuid end"),
        (
            "event_type",
            "text",
            "(array['booking','payment','review'])[(coalesce(k, i) % 3 + 1)::int]",
        ),
        ("ts", "timestamptz not null", "timestamptz '2025-01-01 00:00+00'"
         " + coalesce(r * interval '1 hour' + k * interval '1 millisecond',"
         " i * interval '1 second')"),
    ],
}

_PARENT_OF = {
    "property_photos": ("property_pk", "properties"),
    "task_requirements": ("task_pk", "tasks"),
    "reservation_guests": ("reservation_pk", "reservations"),
    "task_assignments": ("task_pk", "tasks"),
    "task_photos": ("task_pk", "tasks"),
    "task_tags": ("task_pk", "tasks"),
}


def _child_insert(schema: str, layout: Layout) -> sql.Composed:
    columns = _CHILD_COLUMNS[layout.table.name]
    sizes = {
        "properties": layout.properties,
        "reservations": layout.reservations,
        "tasks": layout.tasks,
    }
    expressions = [sql.SQL(expr.format(**sizes)) for _, _, expr in columns]
    return sql.SQL(
        "insert into {table} (id, {columns})\n"
        "select i + 1, {expressions}\n"
        "from generate_series(0, {last_row}) as g(i)\n"
        "cross join lateral (select case when i >= {null_rows}"
        " then (i - {null_rows}) % {keys} end as k,"
        " (i - {null_rows}) / {keys} as r) as run"
    ).format(
        table=sql.Identifier(schema, layout.table.name),
        columns=sql.SQL(", ").join(sql.Identifier(name) for name, _, _ in columns),
        expressions=sql.SQL(", ").join(expressions),
        last_row=sql.Literal(layout.total - 1),
        null_rows=sql.Literal(layout.null_rows),
        keys=sql.Literal(layout.keys),
    )


def _create_child(schema: str, name: str) -> sql.Composed:
    columns = [
        sql.SQL("{} {}").format(sql.Identifier(col), sql.SQL(definition))
        for col, definition, _ in _CHILD_COLUMNS[name]
    ]
    return sql.SQL("create table {} (id bigserial, {})").format(
        sql.Identifier(schema, name), sql.SQL(", ").join(columns)
    )


def _parents(schema: str, scale: float) -> list[sql.Composed]:
    s = sql.Identifier(schema)
    properties = sql.Literal(_scaled(PROPERTIES, scale))
    return [
        sql.SQL(
            "create table {}.properties (id bigint primary key, name text not null,"
            " city text, created_at timestamptz not null default now())"
        ).format(s),
        sql.SQL(
            "insert into {}.properties (id, name, city)"
            " select i, 'Property ' || i, (array['Nashville','Austin','Denver'])[(i % 3 + 1)::int]"
            " from generate_series(1, {}) as i"
        ).format(s, properties),
        sql.SQL(
            "create table {s}.reservations (id bigint primary key,"
            " property_pk bigint not null references {s}.properties (id),"
            " check_in date not null)"
        ).format(s=s),
        sql.SQL(
            "insert into {}.reservations (id, property_pk, check_in)"
            " select i, i % {} + 1, date '2025-01-01' + i % 365"
            " from generate_series(1, {}) as i"
        ).format(s, properties, sql.Literal(_scaled(RESERVATIONS, scale))),
        sql.SQL(
            "create table {s}.tasks (id bigint primary key,"
            " property_pk bigint not null references {s}.properties (id),"
            " title text not null)"
        ).format(s=s),
        sql.SQL(
            "insert into {}.tasks (id, property_pk, title)"
            " select i, i % {} + 1, 'Turnover clean ' || i"
            " from generate_series(1, {}) as i"
        ).format(s, properties, sql.Literal(_scaled(TASKS, scale))),
    ]


def _finish_child(schema: str, name: str) -> list[sql.Composed]:
    """What a real database has around a child table: keys, FKs, indexes, a synced sequence."""
    table = sql.Identifier(schema, name)
    statements = [
        sql.SQL("alter table {} add constraint {} primary key (id)").format(
            table, sql.Identifier(f"{name}_pkey")
        ),
        sql.SQL(
            "select setval(pg_get_serial_sequence(format('%I.%I', {}, {}), 'id'),"
            " coalesce(max(id), 0) + 1, false) from {}"
        ).format(sql.Literal(schema), sql.Literal(name), table),
    ]
    if name in _PARENT_OF:
        column, parent = _PARENT_OF[name]
        statements += [
            sql.SQL("alter table {} add constraint {} foreign key ({}) references {} (id)").format(
                table,
                sql.Identifier(f"{name}_{column}_fkey"),
                sql.Identifier(column),
                sql.Identifier(schema, parent),
            ),
            sql.SQL("create index {} on {} ({})").format(
                sql.Identifier(f"{name}_{column}_idx"), table, sql.Identifier(column)
            ),
        ]
    return statements


def child_tables(names: list[str] | None = None) -> list[ChildTable]:
    """The demo's child tables, or the named ones (benchmarks generate one table at scale)."""
    if not names:
        return list(CHILD_TABLES)
    known = {table.name: table for table in CHILD_TABLES}
    unknown = [name for name in names if name not in known]
    if unknown:
        raise RunnerError(f"no demo table named {', '.join(unknown)}; the demo tables are "
                          f"{', '.join(known)}")
    return [known[name] for name in names]


def demo_steps(scale: float, schema: str = DEMO_SCHEMA,
               tables: list[str] | None = None) -> list[tuple[str, list[sql.Composed]]]:
    """Every statement that builds the demo schema, in order, for one transaction, in named
    steps: the parents, each child table, what comes after."""
    if scale <= 0:
        raise RunnerError(f"--scale must be positive, got {scale}")
    s = sql.Identifier(schema)
    chosen = [table.name for table in child_tables(tables)]
    steps = [("the parent tables", [sql.SQL("create schema {}").format(s),
                                    *_parents(schema, scale)])]
    for table in child_tables(tables):
        steps.append((table.name, [
            _create_child(schema, table.name),
            _child_insert(schema, Layout.at(table, scale)),
            *_finish_child(schema, table.name),
        ]))
    statements = []
    if "task_tags" in chosen:
        # The one child table the ETL could not duplicate: it had its constraint from day one.
        statements.append(sql.SQL("alter table {} add constraint {} unique (task_pk, tag_pk)")
                          .format(sql.Identifier(schema, "task_tags"),
                                  sql.Identifier("task_tags_task_pk_tag_pk_key")))
    if "property_photos" in chosen:
        statements += [
            sql.SQL(
                "create view {s}.property_photo_counts as select property_pk, count(*) as photos"
                " from {s}.property_photos group by property_pk"
            ).format(s=s),
            sql.SQL("comment on table {} is {}").format(
                sql.Identifier(schema, "property_photos"),
                sql.Literal("Photos of each property, loaded hourly by the ETL."),
            ),
        ]
    statements += [
        sql.SQL("grant usage on schema {} to {}").format(s, sql.Identifier(READER_ROLE)),
        sql.SQL("grant select on all tables in schema {} to {}").format(
            s, sql.Identifier(READER_ROLE)
        ),
    ]
    return [*steps, ("constraints, views and grants", statements)]


def _took(step: str, seconds: float) -> None:
    """A step of the demo on stderr: those that take a while, or every one with -v."""
    progress.say("step", f"{step}: {seconds:.1f} s",
                 progress.NORMAL if seconds >= SLOW_STEP_S else progress.VERBOSE,
                 step=step, seconds=round(seconds, 3))


def generate(conn: psycopg.Connection, scale: float, *, replace: bool = False,
             schema: str = DEMO_SCHEMA, tables: list[str] | None = None) -> None:
    """Build the demo schema at `scale` (1.0 = the incident's 38 million child rows).

    Takes an autocommit connection: the build is one transaction, VACUUM runs outside it.
    """
    steps = demo_steps(scale, schema, tables)
    exists = conn.execute(
        "select 1 from pg_namespace where nspname = %s", (schema,)
    ).fetchone()
    if exists and not replace:
        raise RunnerError(
            f"schema {schema} already exists: pass --replace to drop and regenerate it"
        )
    with conn.transaction():
        if exists:
            conn.execute(sql.SQL("drop schema {} cascade").format(sql.Identifier(schema)))
        role_exists = conn.execute(
            "select 1 from pg_roles where rolname = %s", (READER_ROLE,)
        ).fetchone()
        if not role_exists:
            conn.execute(sql.SQL("create role {} nologin").format(sql.Identifier(READER_ROLE)))
        for label, statements in steps:
            started = time.perf_counter()
            for statement in statements:
                conn.execute(statement)
            _took(f"generate: {label}", time.perf_counter() - started)
    # Visibility map and statistics, as a long-lived table would have them.
    started = time.perf_counter()
    conn.execute(
        sql.SQL("vacuum (analyze) {}").format(
            sql.SQL(", ").join(sql.Identifier(schema, t.name) for t in child_tables(tables))
        )
    )
    _took("generate: vacuum and statistics", time.perf_counter() - started)
