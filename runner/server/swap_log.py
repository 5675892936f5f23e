"""The record of every swap, in the archive schema: what `runner swap` writes, and what rollback,
cleanup, report and verify read.

Each row is one table's swap, written in the swap's own transaction: the rows and bytes that
were true at its commit, where the original went, and what the original's archive had to give
up to constrain nothing (its foreign keys and the state of its triggers), for a rollback to
give them back.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone

import psycopg
from psycopg import sql

from runner.declaration import select
from runner.declaration.artifacts import Relation
from runner.server.catalog import Reference

SWAP_LOG = "swap_log"
# Where the archives, the swap log and the captures' logs are kept unless --archive-schema says.
DEFAULT_ARCHIVE_SCHEMA = "dedup_archive"


def table(archive_schema: str) -> sql.Composed:
    return sql.SQL(
        "create table if not exists {} ("
        "swapped_at timestamptz not null default now(),"
        " xid xid8 not null default pg_current_xact_id(), live_schema text not null,"
        " live_table text not null, action text not null, archive_table text,"
        " constraint_name text not null, rows_before bigint not null, rows_after bigint not null,"
        " bytes_before bigint not null, bytes_after bigint not null, tiebreaker text,"
        " backfilled text[] not null default '{{}}',"
        " archive_foreign_keys jsonb not null default '[]',"
        " archive_triggers jsonb not null default '[]',"
        " sequences_not_owned jsonb not null default '[]',"
        " repointed jsonb not null default '[]',"
        " rolled_back_at timestamptz, rolled_back_table text, cleaned_at timestamptz)"
    ).format(sql.Identifier(archive_schema, SWAP_LOG))


@dataclass(frozen=True)
class ArchivedForeignKey:
    name: str
    definition: str


def repointed_column(archive_schema: str) -> sql.Composed:
    """For a swap_log an earlier version made, without the record of re-pointed references."""
    return sql.SQL("alter table {} add column if not exists repointed jsonb not null"
                   " default '[]'").format(sql.Identifier(archive_schema, SWAP_LOG))


@dataclass(frozen=True)
class Repointed:
    """A foreign key whose rows a swap re-pointed, and where it recorded what they were."""

    reference: Reference
    record: str
    """The table in the archive schema with each moved row's primary key, the value it
    pointed at, and the one the swap gave it."""

    def as_json(self) -> dict:
        r = self.reference
        return {"constraint": r.constraint, "table": [r.table.schema, r.table.name],
                "columns": list(r.columns), "referenced": list(r.referenced), "shown": r.shown,
                "definition": r.definition, "validated": r.validated,
                "row_key": list(r.row_key), "record": self.record}

    @classmethod
    def from_json(cls, value: dict) -> Repointed:
        return cls(Reference(value["constraint"], Relation(*value["table"]),
                             tuple(value["columns"]), tuple(value["referenced"]), value["shown"],
                             value["definition"], value["validated"], tuple(value["row_key"]),
                             True), value["record"])


@dataclass(frozen=True)
class ArchivedTrigger:
    name: str
    enabled: str
    """pg_trigger.tgenabled as it was on the live table: O, D, R or A."""


@dataclass(frozen=True)
class LogEntry:
    """One row of swap_log."""

    swapped_at: datetime
    live: Relation
    action: str
    archive_table: str | None
    constraint_name: str
    rolled_back_at: datetime | None
    rolled_back_table: str | None
    cleaned_at: datetime | None
    rows_before: int
    rows_after: int
    bytes_before: int
    bytes_after: int
    tiebreaker: str | None = None
    backfilled: tuple[str, ...] = ()
    """Key columns whose NULLs the swap filled with uuids (nulls: backfill)."""
    archive_foreign_keys: tuple[ArchivedForeignKey, ...] = ()
    archive_triggers: tuple[ArchivedTrigger, ...] = ()
    sequences_not_owned: tuple[tuple[str, str | None], ...] = ()
    """Sequences numbering the table that none of its columns owned at the swap, with who
    owned them then (None: nobody)."""
    archive_schema: str = ""
    """The schema of this log, where the archive is."""
    repointed: tuple[Repointed, ...] = ()

    @property
    def archive(self) -> Relation | None:
        """Where the original table is kept."""
        return Relation(self.archive_schema, self.archive_table) if self.archive_table else None


def entry(*, archive_schema: str, live: Relation, action: str, archive: Relation | None,
          constraint: str, rows_before: sql.Composable, rows_after: sql.Composable,
          tiebreaker: str, backfilled: list[str], foreign_keys: list[ArchivedForeignKey],
          triggers: list[ArchivedTrigger],
          sequences_not_owned: list[tuple[str, str | None]],
          repointed: list[Repointed] | None = None,
          bytes_before: sql.Composable | None = None) -> sql.Composed:
    """The row a swap writes, under its lock, after its renames: the sizes are those of the
    relations as they are at commit (before: the archive's, which is the original table,
    unless `bytes_before` says otherwise)."""
    def size(relation: Relation) -> sql.Composed:
        return sql.SQL("pg_total_relation_size({}::regclass)").format(
            sql.Literal(sql.Identifier(relation.schema, relation.name).as_string()))

    return sql.SQL(
        "insert into {log} (live_schema, live_table, action, archive_table, constraint_name,"
        " rows_before, rows_after, bytes_before, bytes_after, tiebreaker, backfilled,"
        " archive_foreign_keys, archive_triggers, sequences_not_owned, repointed)"
        " values ({schema}, {table}, {action}, {archive}, {constraint}, {rows_before},"
        " {rows_after}, {bytes_before}, {bytes_after}, {tiebreaker}, {backfilled},"
        " {foreign_keys}, {triggers}, {sequences}, {repointed})"
    ).format(
        log=sql.Identifier(archive_schema, SWAP_LOG),
        schema=sql.Literal(live.schema), table=sql.Literal(live.name),
        action=sql.Literal(action), archive=sql.Literal(archive.name if archive else None),
        constraint=sql.Literal(constraint), rows_before=rows_before, rows_after=rows_after,
        bytes_before=bytes_before or size(archive or live), bytes_after=size(live),
        tiebreaker=sql.Literal(tiebreaker), backfilled=sql.Literal(backfilled),
        foreign_keys=sql.Literal(json.dumps([[k.name, k.definition] for k in foreign_keys])),
        triggers=sql.Literal(json.dumps([[t.name, t.enabled] for t in triggers])),
        sequences=sql.Literal(json.dumps([list(s) for s in sequences_not_owned])),
        repointed=sql.Literal(json.dumps([r.as_json() for r in repointed or []])),
    )


def mark_rolled_back(entry: LogEntry, archive_schema: str,
                     rolled_back: Relation | None) -> sql.Composed:
    return sql.SQL(
        "update {} set rolled_back_at = now(), rolled_back_table = {}"
        " where live_schema = {} and live_table = {} and swapped_at = {} and action = {}"
    ).format(sql.Identifier(archive_schema, SWAP_LOG),
             sql.Literal(rolled_back.name if rolled_back else None),
             sql.Literal(entry.live.schema), sql.Literal(entry.live.name),
             sql.Literal(entry.swapped_at), sql.Literal(entry.action))


def mark_cleaned(entry: LogEntry, archive_schema: str) -> sql.Composed:
    return sql.SQL(
        "update {} set cleaned_at = now() where live_schema = {} and live_table = {}"
        " and swapped_at = {} and action = {}"
    ).format(sql.Identifier(archive_schema, SWAP_LOG), sql.Literal(entry.live.schema),
             sql.Literal(entry.live.name), sql.Literal(entry.swapped_at),
             sql.Literal(entry.action))


_ROWS = """
select swapped_at, live_schema, live_table, action, archive_table, constraint_name,
       rolled_back_at, rolled_back_table, cleaned_at, rows_before, rows_after, bytes_before,
       bytes_after, tiebreaker, backfilled, archive_foreign_keys, archive_triggers,
       sequences_not_owned, repointed
from {log} as l
"""


def exists(conn: psycopg.Connection, archive_schema: str) -> bool:
    return conn.execute("select to_regclass(format('%%I.%%I', %s::text, %s::text)) is not null",
                        (archive_schema, SWAP_LOG)).fetchone()[0]


def _entries(rows: list[tuple], archive_schema: str) -> list[LogEntry]:
    return [LogEntry(*r[:1], Relation(r[1], r[2]), *r[3:13], tiebreaker=r[13],
                     backfilled=tuple(r[14]),
                     archive_foreign_keys=tuple(ArchivedForeignKey(*k) for k in r[15]),
                     archive_triggers=tuple(ArchivedTrigger(*t) for t in r[16]),
                     sequences_not_owned=tuple(tuple(s) for s in r[17]),
                     archive_schema=archive_schema,
                     repointed=tuple(Repointed.from_json(v) for v in r[18]))
            for r in rows]


def read(conn: psycopg.Connection, archive_schema: str, where: str = "",
         params: tuple = ()) -> list[LogEntry]:
    """swap_log's rows in the order they were written, optionally filtered by `where`."""
    if not exists(conn, archive_schema):
        return []
    query = sql.SQL(_ROWS + where + " order by swapped_at, live_schema, live_table").format(
        log=sql.Identifier(archive_schema, SWAP_LOG))
    return _entries(conn.execute(query, params).fetchall(), archive_schema)


def latest_swaps(conn: psycopg.Connection, archive_schema: str) -> list[LogEntry]:
    """The latest swap_log entry of every table ever swapped."""
    latest: dict[Relation, LogEntry] = {}
    for row in read(conn, archive_schema):
        latest[row.live] = row
    return list(latest.values())


def when(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def selected(entries: list[LogEntry], names: list[str] | None,
             archive_schema: str) -> list[LogEntry]:
    """The entries of the tables `--select` names (a live table or schema.table), or all."""
    return select.chosen(
        entries, names, lambda e: (e.live.name, str(e.live)),
        lambda name, known: f"--select {name}: {archive_schema}.{SWAP_LOG} records no swap of "
        f"that table; swapped: {', '.join(str(e.live) for e in known) or 'none'}")
