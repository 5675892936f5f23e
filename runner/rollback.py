"""Undo a swap, and drop what swaps and rollbacks kept once nobody can want it back.

A rollback puts each swapped table's original back in place, duplicates and all, and carries
over what the ETL wrote to the deduplicated table since the swap. The table of tie-breakers the
swap kept is what tells the writes apart from the swap's own removals: a live row whose
tie-breaker the swap did not keep was inserted after it; a kept one that differs from its
archived row was updated; a kept tie-breaker missing from the live table was deleted.

The archive's kept rows are copied aside before the lock, so that under it the diff only
compares the deduplicated table with that small copy, and touches the large archive only by its
tie-breaker's unique index for the rows that changed. Nothing is dropped: the deduplicated
table moves to the archive schema. `runner cleanup` drops what is kept, past a retention age.

Statements are built from facts alone, so that --dry-run prints exactly what runs.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

import psycopg
from psycopg import sql

from runner import capture, catalog, swap
from runner.artifacts import Relation
from runner.catalog import Index, LiveTable
from runner.errors import RunnerError
from runner.names import pg_name
from runner.plan import SWAP_LOG, Step, kept_rows_name, lock_timeout, recreate_view

ROLLED_BACK = "rolled_back"


@dataclass(frozen=True)
class RollbackOptions:
    select: list[str] | None = None
    archive_schema: str = swap.DEFAULT_ARCHIVE_SCHEMA
    lock_timeout_ms: int = 100
    """How long one attempt waits for the lock: the longest anyone queues behind the runner."""
    lock_wait_s: float = 60.0
    """How long all attempts together may take before the runner gives up."""


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


@dataclass
class TableRollback:
    entry: LogEntry
    rolled_back: Relation | None = None
    """Where the deduplicated table is kept after the rollback."""
    before_lock: list[Step] = field(default_factory=list)
    diff: list[Step] = field(default_factory=list)
    """Under the lock: which rows the ETL inserted, updated and deleted since the swap."""
    counts: sql.Composed | None = None
    """Under the lock, after `diff`: (inserted, updated, deleted)."""
    cutover: list[Step] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class RollbackResult:
    plans: list[TableRollback]
    lock_ms: float
    """How long the tables were held under ACCESS EXCLUSIVE, until the commit."""
    attempts: int
    carried: dict[Relation, tuple[int, int, int]]
    """Rows inserted, updated and deleted since the swap, carried over to the original."""


def _log(archive_schema: str) -> sql.Identifier:
    return sql.Identifier(archive_schema, SWAP_LOG)


def _id(relation: Relation) -> sql.Identifier:
    return sql.Identifier(relation.schema, relation.name)


def _regclass(relation: Relation) -> sql.Composed:
    return sql.SQL("{}::regclass").format(sql.Literal(_id(relation).as_string()))


_LOG_ROWS = """
select swapped_at, live_schema, live_table, action, archive_table, constraint_name,
       rolled_back_at, rolled_back_table, cleaned_at, rows_before, rows_after, bytes_before,
       bytes_after
from {log} as l
"""


def _log_exists(conn: psycopg.Connection, archive_schema: str) -> bool:
    return conn.execute("select to_regclass(format('%%I.%%I', %s::text, %s::text)) is not null",
                        (archive_schema, SWAP_LOG)).fetchone()[0]


def _entries(rows: list[tuple]) -> list[LogEntry]:
    return [LogEntry(r[0], Relation(r[1], r[2]), *r[3:]) for r in rows]


def latest_swaps(conn: psycopg.Connection, archive_schema: str) -> list[LogEntry]:
    """The latest swap_log entry of every table ever swapped."""
    if not _log_exists(conn, archive_schema):
        return []
    query = sql.SQL(_LOG_ROWS + " order by live_schema, live_table, swapped_at").format(
        log=_log(archive_schema))
    latest: dict[Relation, LogEntry] = {}
    for entry in _entries(conn.execute(query).fetchall()):
        latest[entry.live] = entry
    return list(latest.values())


def _when(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def choose(entries: list[LogEntry], select: list[str] | None,
           archive_schema: str) -> list[LogEntry]:
    """The entries to roll back: the named tables', or every one not rolled back yet."""
    log = f"{archive_schema}.{SWAP_LOG}"
    if not select:
        chosen = [e for e in entries if e.rolled_back_at is None]
        if not entries:
            raise RunnerError(f"nothing to roll back: {log} records no swap")
        if not chosen:
            raise RunnerError(f"nothing to roll back: every swap in {log} was rolled back "
                              "already")
        return chosen
    chosen = []
    for name in select:
        matches = [e for e in entries if name in (e.live.name, str(e.live))]
        if not matches:
            known = ", ".join(str(e.live) for e in entries) or "none"
            raise RunnerError(f"--select {name}: {log} records no swap of that table; "
                              f"swapped: {known}")
        chosen += [e for e in matches if e not in chosen]
    for entry in chosen:
        if entry.rolled_back_at is not None:
            raise RunnerError(f"nothing to roll back for {entry.live}: its latest swap, at "
                              f"{_when(entry.swapped_at)}, was rolled back at "
                              f"{_when(entry.rolled_back_at)}")
    return chosen


def _signature(index: Index) -> tuple:
    return (index.unique, index.method, index.constraint is not None, index.constraint_definition)


def match_indexes(live: LiveTable, archive: LiveTable, natural_key: str
                  ) -> tuple[list[tuple[Index, Index]], list[Index], list[Index]]:
    """Pairs (archive index, live index) of the same definition, then the unmatched of each.

    The swap gave the archive's index at position p the name pg_name(archive, p), p counting
    the original names in order, and gave the new table the original names: pairing same
    definitions in those two orders returns each name to its index, even for duplicate indexes.
    """
    positions = {pg_name(archive.relation.name, str(p)): p
                 for p in range(len(archive.indexes) + len(live.indexes))}
    archived = sorted(archive.indexes, key=lambda i: (positions.get(i.name, len(positions)),
                                                      i.name))
    candidates = [i for i in live.indexes if i.constraint != natural_key]
    pairs, unmatched = [], []
    for index in archived:
        match = next((c for c in candidates if _signature(c) == _signature(index)), None)
        if match is None:
            unmatched.append(index)
        else:
            candidates.remove(match)
            pairs.append((index, match))
    return pairs, unmatched, candidates


def _rename_index(table: sql.Identifier, schema: str, index: Index, new: str) -> sql.Composed:
    # A constraint and its index share the name; renaming the constraint renames both.
    if index.constraint:
        return sql.SQL("alter table {} rename constraint {} to {}").format(
            table, sql.Identifier(index.constraint), sql.Identifier(new))
    return sql.SQL("alter index {} rename to {}").format(
        sql.Identifier(schema, index.name), sql.Identifier(new))


def _mark(entry: LogEntry, archive_schema: str, rolled_back: Relation | None) -> Step:
    return Step(
        f"record the rollback of {entry.live}",
        sql.SQL("update {} set rolled_back_at = now(), rolled_back_table = {}"
                " where live_schema = {} and live_table = {} and swapped_at = {}"
                " and action = {}").format(
            _log(archive_schema), sql.Literal(rolled_back.name if rolled_back else None),
            sql.Literal(entry.live.schema), sql.Literal(entry.live.name),
            sql.Literal(entry.swapped_at), sql.Literal(entry.action)))


def _column_list(relation: Relation) -> sql.Composed:
    return sql.SQL(
        "array(select format('%I %s%s%s', a.attname, format_type(a.atttypid, a.atttypmod),"
        " case when a.attgenerated <> '' then ' generated' else '' end,"
        " case when a.attidentity <> '' then ' identity ' || a.attidentity::text else '' end)"
        " from pg_attribute as a where a.attrelid = {} and a.attnum > 0 and not a.attisdropped"
        " order by a.attnum)").format(_regclass(relation))


def _columns(table: LiveTable) -> list[tuple]:
    return [(c.name, c.type, c.generated, c.identity) for c in table.columns]


def plan_constraint(entry: LogEntry, archive_schema: str) -> TableRollback:
    """The swap only added the natural key's constraint: drop it."""
    return TableRollback(entry, cutover=[
        Step("the table was never replaced; only its natural key's constraint was added",
             sql.SQL("alter table {} drop constraint if exists {}").format(
                 _id(entry.live), sql.Identifier(entry.constraint_name))),
        _mark(entry, archive_schema, None),
    ])


def plan_table(position: int, entry: LogEntry, live: LiveTable, archive: LiveTable,
               tiebreaker: str, stamp: datetime, archive_schema: str,
               backfilled: tuple[str, ...] = ()) -> TableRollback:
    """The rollback of one swapped table; `position` keeps its temporary tables apart.

    `backfilled`: key columns whose NULLs the swap filled with uuids, recorded with the kept
    rows; a row is unchanged since the swap when it equals its original so filled, and then the
    original, NULL and all, is what comes back."""
    if _columns(live) != _columns(archive):
        raise RunnerError(f"the columns of {entry.live} changed since the swap, so its rows no "
                          f"longer fit the original table {archive.relation}: roll it back by "
                          "hand, or leave it out with --select")
    if live.referenced_by:
        raise RunnerError(f"foreign keys now point at {entry.live} "
                          f"({', '.join(live.referenced_by)}) and would keep pointing at the "
                          "deduplicated table: drop them, roll back, then create them again")
    schema, name = entry.live.schema, entry.live.name
    L, A = _id(entry.live), _id(archive.relation)
    K = sql.Identifier(archive_schema, kept_rows_name(archive.relation.name))
    t = sql.Identifier(tiebreaker)
    kept, diff, gone = (sql.Identifier(f"rollback_{what}_{position}")
                        for what in ("kept", "diff", "gone"))
    tmp_kept, tmp_diff, tmp_gone = (sql.Identifier("pg_temp", f"rollback_{what}_{position}")
                                    for what in ("kept", "diff", "gone"))
    columns = [c.name for c in live.columns if not c.generated]
    cols = sql.SQL(", ").join(sql.Identifier(c) for c in columns)
    live_cols = sql.SQL(", ").join(sql.SQL("l.{}").format(sql.Identifier(c)) for c in columns)
    # GENERATED ALWAYS identity columns cannot be set by an update; the check after the
    # writes catches the one way the ETL could have changed them (SET ... = DEFAULT).
    updatable = [c.name for c in live.columns if not c.generated and c.identity != "a"]
    overriding = sql.SQL(" overriding system value" if live.identity_sequences else "")
    rolled_back = Relation(archive_schema,
                           pg_name(name, stamp.strftime("%Y%m%d%H%M%S"), ROLLED_BACK))
    moved = sql.Identifier(schema, rolled_back.name)
    plan = TableRollback(entry, rolled_back=rolled_back)

    # row(x.*)::text, not x::text: a column named like the alias would win over the row.
    as_swapped = sql.SQL("row(a.*)") if not backfilled else sql.SQL("row({})").format(
        sql.SQL(", ").join(
            sql.SQL("coalesce(a.{c}, k.{c})" if c.name in backfilled else "a.{c}").format(
                c=sql.Identifier(c.name))
            for c in archive.columns))
    plan.before_lock = [
        Step(f"the version of every row the swap kept in {entry.live} as the swap wrote it, "
             "read before the lock, so that under it the diff never scans the archive",
             sql.SQL("create temp table {kept} on commit drop as"
                     " select a.{t} as tiebreaker, {as_swapped}::text as content from {A} as a"
                     " join {K} as k on k.{t} = a.{t}").format(
                 kept=kept, t=t, A=A, K=K, as_swapped=as_swapped)),
        Step("", sql.SQL("analyze {}").format(tmp_kept)),
        Step(f"the archive {archive.relation} still holds every row the swap kept",
             sql.SQL("select count(*) = (select count(*) from {K}), count(*) as kept_in_archive,"
                     " (select count(*) from {K}) as kept_by_the_swap from {kept}").format(
                 K=K, kept=tmp_kept), check=True),
    ]
    plan.diff = [
        Step(f"{entry.live} still has the columns of {archive.relation}",
             sql.SQL("select l = a, l::text as live_columns, a::text as archive_columns"
                     " from (select {} as l, {} as a) as c").format(
                 _column_list(entry.live), _column_list(archive.relation)), check=True),
        Step("rows inserted (tie-breaker not kept by the swap) or updated (differs from its "
             "archived version) since the swap",
             sql.SQL("create temp table {diff} on commit drop as"
                     " select l.{t} as tiebreaker, k.tiebreaker is null as inserted"
                     " from {L} as l left join {kept} as k on k.tiebreaker = l.{t}"
                     " where k.content is distinct from row(l.*)::text").format(
                 diff=diff, t=t, L=L, kept=tmp_kept)),
        Step("rows the swap kept and the ETL deleted since",
             sql.SQL("create temp table {gone} on commit drop as select k.tiebreaker"
                     " from {kept} as k where not exists"
                     " (select from {L} as l where l.{t} = k.tiebreaker)").format(
                 gone=gone, kept=tmp_kept, L=L, t=t)),
        Step("", sql.SQL("analyze {}, {}").format(tmp_diff, tmp_gone)),
    ]
    plan.counts = sql.SQL(
        "select count(*) filter (where inserted), count(*) filter (where not inserted),"
        " (select count(*) from {gone}) from {diff}").format(gone=tmp_gone, diff=tmp_diff)

    # The ETL's writes already fired the deduplicated table's copies of these triggers.
    firing = [trigger for trigger in archive.triggers if trigger.enabled != "D"]
    enable = {"O": "enable trigger", "R": "enable replica trigger", "A": "enable always trigger"}
    plan.cutover = [
        Step(f"no row inserted into {entry.live} since the swap reuses the tie-breaker of a row "
             "the swap removed",
             sql.SQL("select count(*) = 0, count(*) as reused_tiebreakers from {diff} as d"
                     " where d.inserted and exists (select from {A} as a"
                     " where a.{t} = d.tiebreaker)").format(diff=tmp_diff, A=A, t=t),
             check=True),
        *(Step(f"trigger {trigger.name} already fired for these writes",
               sql.SQL("alter table {} disable trigger {}").format(
                   A, sql.Identifier(trigger.name)))
          for trigger in firing),
        Step("the original loses the rows deleted since the swap",
             sql.SQL("delete from {A} as a using {gone} as g where a.{t} = g.tiebreaker").format(
                 A=A, gone=tmp_gone, t=t)),
        Step("and takes the updates",
             sql.SQL("update {A} as a set ({cols}) = row({live_cols}) from {L} as l, {diff} as d"
                     " where not d.inserted and l.{t} = d.tiebreaker and a.{t} = d.tiebreaker")
             .format(A=A, cols=sql.SQL(", ").join(sql.Identifier(c) for c in updatable),
                     live_cols=sql.SQL(", ").join(
                         sql.SQL("l.{}").format(sql.Identifier(c)) for c in updatable),
                     L=L, diff=tmp_diff, t=t)),
        Step("and the inserts",
             sql.SQL("insert into {A} ({cols}){overriding} select {live_cols} from {L} as l"
                     " join {diff} as d on d.tiebreaker = l.{t} where d.inserted").format(
                 A=A, cols=cols, overriding=overriding, live_cols=live_cols, L=L,
                 diff=tmp_diff, t=t)),
        *(Step(f"trigger {trigger.name} as it was",
               sql.SQL("alter table {} {} {}").format(
                   A, sql.SQL(enable[trigger.enabled]), sql.Identifier(trigger.name)))
          for trigger in firing),
        Step(f"every row written since the swap is now in {archive.relation} as "
             f"{entry.live} has it",
             sql.SQL("select count(*) = 0 and (select count(*) from {A} as a join {gone} as g"
                     " on a.{t} = g.tiebreaker) = 0, count(*) as rows_differing,"
                     " (select count(*) from {A} as a join {gone} as g on a.{t} = g.tiebreaker)"
                     " as deleted_rows_left from {L} as l join {diff} as d on d.tiebreaker = l.{t}"
                     " where not exists (select from {A} as a where a.{t} = l.{t}"
                     " and row(a.*)::text = row(l.*)::text)").format(
                 A=A, gone=tmp_gone, t=t, L=L, diff=tmp_diff), check=True),
    ]
    if any(trigger.name == capture.TRIGGER for trigger in live.triggers):
        plan.cutover += [
            Step("a change capture started for the next swap watched the deduplicated table: "
                 "it ends here; run `runner capture` again", statement)
            for statement in capture.remove(capture.Capture.of(entry.live, archive_schema))]
    plan.cutover += [
        Step(f"publication {publication} stops publishing the deduplicated table",
             sql.SQL("alter publication {} drop table {}").format(
                 sql.Identifier(publication), L))
        for publication in live.publications
    ]
    plan.cutover += [
        Step(f"free the name {index.name} in {schema}",
             _rename_index(L, schema, index, pg_name(rolled_back.name, str(p))))
        for p, index in enumerate(live.indexes)
    ]
    aside = {s.column: pg_name(rolled_back.name, s.column, "seq")
             for s in live.identity_sequences}
    plan.cutover += [
        Step(f"free the name of identity sequence {s.name}",
             sql.SQL("alter sequence {} rename to {}").format(
                 sql.Identifier(s.schema, s.name), sql.Identifier(aside[s.column])))
        for s in live.identity_sequences
    ]
    plan.cutover += [
        Step("the deduplicated table steps aside, renamed first so that no name in the archive "
             "schema can be in its way",
             sql.SQL("alter table {} rename to {}").format(L, sql.Identifier(rolled_back.name))),
        Step("the original table comes back to the live schema, with its own owner, grants, "
             "comment, policies and triggers",
             sql.SQL("alter table {} set schema {}").format(A, sql.Identifier(schema))),
        Step("under its own name",
             sql.SQL("alter table {} rename to {}").format(
                 sql.Identifier(schema, archive.relation.name), sql.Identifier(name))),
    ]
    pairs, unmatched, left = match_indexes(live, archive, entry.constraint_name)
    plan.cutover += [
        Step(f"{original.name} gets its name back",
             _rename_index(L, schema, archived, original.name))
        for archived, original in pairs
    ]
    plan.notes += [f"index {i.name} of {entry.live} has no counterpart on the deduplicated "
                   "table, so it keeps its archive name" for i in unmatched]
    plan.notes += [f"index {i.name}, created on the deduplicated {entry.live} after the swap, "
                   f"stays with it in {rolled_back}" for i in left]
    for s in live.identity_sequences:
        original = next((a for a in archive.identity_sequences if a.column == s.column), None)
        if original is None:
            raise RunnerError(f"identity column {s.column} of {entry.live} has no sequence on "
                              f"{archive.relation}: roll it back by hand")
        plan.cutover += [
            Step(f"identity sequence {s.name} gets its name back",
                 sql.SQL("alter sequence {} rename to {}").format(
                     sql.Identifier(schema, original.name), sql.Identifier(s.name))),
            Step("and goes on from where the deduplicated table's left off",
                 sql.SQL("select setval({}::regclass, s.last_value, s.is_called) from {} as s")
                 .format(sql.Literal(sql.Identifier(schema, s.name).as_string()),
                         sql.Identifier(s.schema, aside[s.column]))),
        ]
    plan.cutover += [
        Step(f"sequence {seq} numbers the original table again",
             sql.SQL("alter sequence {} owned by {}.{}").format(
                 sql.Identifier(seq_schema, seq), L, sql.Identifier(column)))
        for seq_schema, seq, column, identity in live.owned_sequences if not identity
    ]
    plan.cutover.append(Step(
        "the deduplicated table is kept in the archive schema, never dropped by a rollback",
        sql.SQL("alter table {} set schema {}").format(moved, sql.Identifier(archive_schema))))
    plan.cutover += [
        Step(f"publication {publication} publishes the original table again",
             sql.SQL("alter publication {} add table {}").format(sql.Identifier(publication), L))
        for publication in live.publications
    ]
    plan.cutover += [
        recreate_view(view, f"view {view.relation} reads the original table again")
        for view in live.views
    ]
    plan.cutover.append(_mark(entry, archive_schema, rolled_back))
    return plan


def _exists(conn: psycopg.Connection, relation: Relation) -> bool:
    return conn.execute("select to_regclass(format('%%I.%%I', %s::text, %s::text)) is not null",
                        (relation.schema, relation.name)).fetchone()[0]


def make_plans(conn: psycopg.Connection, options: RollbackOptions,
               stamp: datetime | None = None) -> list[TableRollback]:
    """Read swap_log and the catalog, refuse what cannot be rolled back, plan every table."""
    stamp = stamp or datetime.now(timezone.utc)
    entries = choose(latest_swaps(conn, options.archive_schema), options.select,
                     options.archive_schema)
    plans = []
    for position, entry in enumerate(entries):
        if not _exists(conn, entry.live):
            raise RunnerError(f"cannot roll back {entry.live}: the table does not exist any "
                              "more; nothing was changed; leave it out with --select")
        if entry.action == "constraint":
            plans.append(plan_constraint(entry, options.archive_schema))
            continue
        archive = Relation(options.archive_schema, entry.archive_table or "")
        if entry.cleaned_at is not None:
            raise RunnerError(f"cannot roll back {entry.live}: runner cleanup dropped its "
                              f"archive {archive} at {_when(entry.cleaned_at)}, so the original "
                              "rows are gone; leave it out with --select")
        kept = Relation(options.archive_schema, kept_rows_name(archive.name))
        for what, relation in (("archive", archive), ("table of kept rows", kept)):
            if not entry.archive_table or not _exists(conn, relation):
                raise RunnerError(f"cannot roll back {entry.live}: its {what} {relation} is "
                                  "missing (dropped by hand?); nothing was changed; restore it "
                                  "or leave the table out with --select")
        live = catalog.read_live_table(conn, entry.live)
        kept_columns = [name for name, _ in catalog.relation_columns(conn, kept)]
        # The tie-breaker, then any key columns the swap backfilled (nulls: backfill).
        if not kept_columns or not set(kept_columns[1:]) <= set(live.column_names()):
            raise RunnerError(f"{kept} should hold the tie-breaker and backfilled key columns of "
                              f"{entry.live}, and has {kept_columns}: restore it or roll back "
                              "by hand")
        plans.append(plan_table(
            position, entry, live, catalog.read_live_table(conn, archive), kept_columns[0],
            stamp, options.archive_schema, backfilled=tuple(kept_columns[1:])))
    return plans


def _locked(plans: list[TableRollback], archive_schema: str) -> list[Relation]:
    tables = []
    for plan in plans:
        tables.append(plan.entry.live)
        if plan.rolled_back:
            tables.append(Relation(archive_schema, plan.entry.archive_table))
    return tables


def _phases(plans: list[TableRollback], options: RollbackOptions
            ) -> tuple[list[Step], list[Step]]:
    before = []
    for plan in plans:
        before += plan.before_lock
    locking = [
        Step("wait at most this long for the lock, so no session queues behind the runner for "
             "longer; on timeout, try again",
             lock_timeout(options.lock_timeout_ms)),
        Step("the live tables and their archives, all at once",
             sql.SQL("lock table {} in access exclusive mode").format(sql.SQL(", ").join(
                 _id(t) for t in _locked(plans, options.archive_schema)))),
    ]
    return before, locking


def render(conn: psycopg.Connection, plans: list[TableRollback],
           options: RollbackOptions) -> str:
    """The exact SQL `execute` would run, in order, with why each statement is there."""
    lines = []

    def add(step: Step) -> None:
        if step.why:
            lines.append(f"-- {step.why}{' (must be true)' if step.check else ''}")
        lines.append(step.statement.as_string(conn) + ";")

    for plan in plans:
        lines += [f"-- note: {note}" for note in plan.notes]
    before, locking = _phases(plans, options)
    lines.append("begin;")
    for step in before:
        add(step)
    lines.append("savepoint cutover;")
    for step in locking:
        add(step)
    for plan in plans:
        for step in plan.diff:
            add(step)
        if plan.counts is not None:
            lines.append("-- rows inserted, updated and deleted since the swap, for the report")
            lines.append(plan.counts.as_string(conn) + ";")
    for plan in plans:
        for step in plan.cutover:
            add(step)
    lines += ["release savepoint cutover;", "commit;"]
    return "\n".join(lines)


def _advisory_lock(conn: psycopg.Connection) -> None:
    if not conn.execute("select pg_try_advisory_lock(%s)",
                        (swap.ADVISORY_LOCK_KEY,)).fetchone()[0]:
        raise RunnerError("another runner swap, rollback or cleanup is working on this "
                          "database: wait for it to finish, then run again")


def _with_lock(conn: psycopg.Connection, locking: list[Step], work: Callable[[], None],
               tables: list[Relation], timeout_ms: int, wait_s: float) -> int:
    """Run `work` under `locking` in a savepoint, tried again with backoff on lock timeouts;
    returns the number of tries."""
    deadline = time.monotonic() + wait_s
    backoff = 0.05
    attempts = 0
    while True:
        attempts += 1
        try:
            with conn.transaction():
                swap.run_steps(conn, locking)
                work()
            return attempts
        except psycopg.errors.LockNotAvailable as error:
            if time.monotonic() > deadline:
                raise RunnerError(
                    f"could not lock {', '.join(str(t) for t in tables)} in {attempts} tries of "
                    f"{timeout_ms} ms over {wait_s:g} s, nothing was changed; held by "
                    f"{swap.lock_holders(conn, tables)}: retry when they finish, or raise "
                    "--lock-wait") from error
            time.sleep(backoff)
            backoff = min(backoff * 2, 1.0)


def execute(conn: psycopg.Connection, plans: list[TableRollback],
            options: RollbackOptions) -> RollbackResult:
    """Roll every planned table back in one transaction; any failed check changes nothing."""
    _advisory_lock(conn)
    try:
        before, locking = _phases(plans, options)
        carried: dict[Relation, tuple[int, int, int]] = {}
        locked_at = 0.0

        def under_lock() -> None:
            nonlocal locked_at
            locked_at = time.perf_counter()
            for plan in plans:
                swap.run_steps(conn, plan.diff)
                if plan.counts is not None:
                    carried[plan.entry.live] = tuple(conn.execute(plan.counts).fetchone())
            for plan in plans:
                swap.run_steps(conn, plan.cutover)

        with conn.transaction():
            swap.run_steps(conn, before)
            attempts = _with_lock(conn, locking, under_lock,
                                  _locked(plans, options.archive_schema),
                                  options.lock_timeout_ms, options.lock_wait_s)
        lock_ms = (time.perf_counter() - locked_at) * 1000
        return RollbackResult(plans, lock_ms, attempts, carried)
    finally:
        conn.execute("select pg_advisory_unlock(%s)", (swap.ADVISORY_LOCK_KEY,))


def report(result: RollbackResult) -> list[str]:
    """What the rollback did, one line per table, for the command's output."""
    lines = []
    for plan in result.plans:
        entry = plan.entry
        if plan.rolled_back is None:
            lines.append(f"{entry.live}: dropped the constraint {entry.constraint_name}.")
            continue
        inserted, updated, deleted = result.carried.get(entry.live, (0, 0, 0))
        lines.append(f"{entry.live}: the original table is live again, with the writes made "
                     f"since the swap ({inserted:,} inserted, {updated:,} updated, {deleted:,} "
                     f"deleted rows); the deduplicated table is kept as {plan.rolled_back}.")
        lines += [f"  note: {note}" for note in plan.notes]
    lines.append(f"Live tables locked for {result.lock_ms:.0f} ms ({result.attempts} "
                 f"{'try' if result.attempts == 1 else 'tries'}).")
    if any(p.rolled_back for p in result.plans):
        lines.append("To swap again: `runner capture`, `dbt build`, then `runner swap`.")
    return lines


# Cleanup.

_AGE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(s|min|h|d)\s*")
_AGE_UNITS = {"s": 1, "min": 60, "h": 3600, "d": 86400}


def parse_age(text: str) -> timedelta:
    match = _AGE.fullmatch(text)
    if not match:
        raise RunnerError(f"--older-than {text!r} is not an age such as 7d, 12h, 30min or 0s")
    return timedelta(seconds=float(match.group(1)) * _AGE_UNITS[match.group(2)])


@dataclass(frozen=True)
class CleanupItem:
    entry: LogEntry
    drop: tuple[Relation, ...]
    """What the swap and its rollback kept, as far as it still exists."""


@dataclass(frozen=True)
class CleanupResult:
    items: list[CleanupItem]
    freed: list[tuple[Relation, int]]
    """Each dropped table with its total size, indexes and TOAST included."""


def kept_by(entry: LogEntry, archive_schema: str) -> list[Relation]:
    """What a swap left in the archive schema; after a rollback its archive is the live table
    again, and what is kept instead is the deduplicated table."""
    if entry.action != "swap" or not entry.archive_table:
        return []
    kept = [Relation(archive_schema, kept_rows_name(entry.archive_table))]
    if entry.rolled_back_at is None:
        return [Relation(archive_schema, entry.archive_table), *kept]
    if entry.rolled_back_table:
        return [Relation(archive_schema, entry.rolled_back_table), *kept]
    return kept


def plan_cleanup(conn: psycopg.Connection, archive_schema: str,
                 older_than: timedelta) -> list[CleanupItem]:
    """Every swap older than the age whose leftovers were not cleaned up yet."""
    if not _log_exists(conn, archive_schema):
        return []
    query = sql.SQL(_LOG_ROWS + " where action = 'swap' and cleaned_at is null"
                    " and swapped_at < now() - %s::interval"
                    " order by swapped_at, live_schema, live_table").format(
        log=_log(archive_schema))
    items = []
    for entry in _entries(conn.execute(query, (older_than,)).fetchall()):
        drop = tuple(r for r in kept_by(entry, archive_schema) if _exists(conn, r))
        items.append(CleanupItem(entry, drop))
    return items


def cleanup_steps(items: list[CleanupItem], archive_schema: str) -> list[Step]:
    steps = []
    for item in items:
        entry = item.entry
        # No cascade: a view someone built on an archive must stop the cleanup, not vanish.
        steps += [Step(f"drop {relation}, kept by the swap of {entry.live} at "
                       f"{_when(entry.swapped_at)}",
                       sql.SQL("drop table {}").format(_id(relation)))
                  for relation in item.drop]
        steps.append(Step(
            "so that a rollback says the archive was cleaned up",
            sql.SQL("update {} set cleaned_at = now() where live_schema = {} and live_table = {}"
                    " and swapped_at = {} and action = {}").format(
                _log(archive_schema), sql.Literal(entry.live.schema),
                sql.Literal(entry.live.name), sql.Literal(entry.swapped_at),
                sql.Literal(entry.action))))
    return steps


def _cleanup_phases(items: list[CleanupItem], options: RollbackOptions
                    ) -> tuple[list[Step], list[Step], list[Step]]:
    dropped = [r for item in items for r in item.drop]
    before: list[Step] = []
    # DROP also locks the parents its foreign keys reference, which the ETL writes: the
    # timeout keeps it from making the ETL queue, as for the swap.
    locking = [Step("wait at most this long for each lock, here and in each drop",
                    lock_timeout(options.lock_timeout_ms))]
    if dropped:
        locking.append(Step("the tables to drop, all at once",
                            sql.SQL("lock table {} in access exclusive mode").format(
                                sql.SQL(", ").join(_id(r) for r in dropped))))
    return before, locking, cleanup_steps(items, options.archive_schema)


def sizes(relations: list[Relation]) -> sql.Composed:
    return sql.SQL("select array[{}]::bigint[]").format(sql.SQL(", ").join(
        sql.SQL("pg_total_relation_size({})").format(_regclass(r)) for r in relations))


def render_cleanup(conn: psycopg.Connection, items: list[CleanupItem],
                   options: RollbackOptions) -> str:
    before, locking, steps = _cleanup_phases(items, options)
    lines = ["begin;"]
    for step in [*before, *locking, *steps]:
        if step.why:
            lines.append(f"-- {step.why}")
        lines.append(step.statement.as_string(conn) + ";")
    lines.append("commit;")
    return "\n".join(lines)


def execute_cleanup(conn: psycopg.Connection, items: list[CleanupItem],
                    options: RollbackOptions) -> CleanupResult:
    """Drop everything the items name and mark their swap_log rows, in one transaction."""
    _advisory_lock(conn)
    try:
        before, locking, steps = _cleanup_phases(items, options)
        dropped = [r for item in items for r in item.drop]
        freed: list[tuple[Relation, int]] = []

        def drop() -> None:
            freed.clear()
            if dropped:
                freed.extend(zip(dropped, conn.execute(sizes(dropped)).fetchone()[0],
                                 strict=True))
            try:
                swap.run_steps(conn, steps)
            except psycopg.errors.DependentObjectsStillExist as error:
                detail = (error.diag.message_detail or "").splitlines()
                raise RunnerError(f"nothing was dropped: {error.diag.message_primary} "
                                  f"({'; '.join(detail)}); drop or move those objects first"
                                  ) from error

        with conn.transaction():
            swap.run_steps(conn, before)
            _with_lock(conn, locking, drop, dropped, options.lock_timeout_ms,
                       options.lock_wait_s)
        return CleanupResult(items, freed)
    finally:
        conn.execute("select pg_advisory_unlock(%s)", (swap.ADVISORY_LOCK_KEY,))
