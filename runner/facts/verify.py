"""The checks after a swap, as one report: whether each live table holds one row per natural key
and will keep doing so. Reads only, except the idempotency check, whose insert is always rolled
back.

Per table: duplicates on the natural key and NULL keys (one scan), the unique constraint that
enforces the key and the validity of every index, foreign keys validated, the sequences that
number it ahead of its rows, its size against the swap's record, and the ETL's own statement
replayed on a sample of its rows, which must insert nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import psycopg
from psycopg import sql

from runner.declaration.artifacts import DedupSpec, DedupTarget, Relation
from runner.errors import RunnerError
from runner.execution.locking import lock_timeout
from runner.server import catalog
from runner.server.captures import Registered, registered_captures
from runner.server.catalog import LiveTable, NumberingSequence
from runner.server.swap_log import SWAP_LOG, LogEntry, latest_swaps, when
from runner.statements.keys import NULLS_EQUAL, KeyCounts, count_keys
from runner.units import size_text

# The policies under which a NULL in the key is data. Any other (forbidden; backfill, whose
# NULLs were to be filled in) leaves none in the live table, so one found there is a failure.
NULL_KEYS_ALLOWED = ("not_distinct", "distinct")


@dataclass(frozen=True)
class VerifyOptions:
    archive_schema: str
    sample: int = 100
    """Rows replayed through the ETL's statement."""
    lock_timeout_ms: int = 100
    """How long the replay waits for a lock before it gives up, so it never queues for long."""


@dataclass(frozen=True)
class CheckResult:
    table: str
    check: str
    ok: bool
    detail: str

    def as_row(self) -> dict:
        return {"table": self.table, "check": self.check, "result": "ok" if self.ok else "FAIL",
                "detail": self.detail}


def _table(relation: Relation) -> sql.Identifier:
    return sql.Identifier(relation.schema, relation.name)


def _any_null(columns: tuple[str, ...]) -> sql.Composed:
    return sql.SQL(" or ").join(
        sql.SQL("{} is null").format(sql.Identifier(column)) for column in columns)


def sequence_position_query(sequence: NumberingSequence, relation: Relation) -> sql.Composed:
    """The sequence's state and the extremes of the column it numbers."""
    column = sql.Identifier(sequence.column)
    return sql.SQL(
        "select s.last_value, s.is_called, (select max({column}) from {table}),"
        " (select min({column}) from {table}) from {sequence} as s"
    ).format(column=column, table=_table(relation),
             sequence=sql.Identifier(sequence.schema, sequence.name))


def replay_statement(relation: Relation, spec: DedupSpec, columns: list[str],
                     sample: int) -> sql.Composed:
    """The ETL's statement fed `sample` of the table's own rows, up to half of them with a NULL
    in the key (where NULLs are not equal, those are what a constraint lets through); returns
    how many rows it was fed and how many it inserted, and of those how many with a NULL key."""
    names = sql.SQL(", ").join(sql.Identifier(column) for column in columns)
    any_null = _any_null(spec.natural_key)
    return sql.SQL(
        "with replayed as (select {names} from ("
        "(select 0 as part, {names} from {table} where {any_null} limit {half})"
        " union all (select 1, {names} from {table} where not ({any_null}) limit {sample})"
        ") as sampled order by part limit {sample}),"
        " inserted as (insert into {table} ({names}) select {names} from replayed"
        " on conflict do nothing returning {any_null} as null_key)"
        " select (select count(*) from replayed), (select count(*) from inserted),"
        " (select count(*) filter (where null_key) from inserted)"
    ).format(table=_table(relation), names=names, any_null=any_null,
             sample=sql.Literal(sample), half=sql.Literal((sample + 1) // 2))


def _qualified(relation: Relation) -> str:
    """The table's name as regclass input reads it."""
    return _table(relation).as_string()


def read_table(conn: psycopg.Connection, target: DedupTarget) -> LiveTable:
    """The live table's catalog facts; refuses a table or natural-key column that is missing."""
    live = catalog.read_live_table(conn, target.live)
    for what, columns in (("natural_key", target.spec.natural_key),
                          ("alternative_key", target.spec.alternative_key)):
        missing = [c for c in columns if c not in live.column_names()]
        if missing:
            raise RunnerError(f"{what.replace('_', ' ')} column(s) {missing} of {target.source} "
                              f"are not columns of {live.relation}: fix {what} in the dbt YAML")
    return live


def key_counts(conn: psycopg.Connection, target: DedupTarget) -> KeyCounts:
    return KeyCounts(*conn.execute(count_keys(target.live, target.spec)).fetchone())


def check_duplicates(counts: KeyCounts) -> tuple[bool, str]:
    if counts.duplicated_keys == 0:
        return True, f"{counts.total_rows:,} rows, one per key"
    return False, (f"{counts.total_rows:,} rows for {counts.unique_rows:,} keys; keys with "
                   f"copies: {counts.duplicated_keys:,}, rows too many: "
                   f"{counts.duplicate_rows:,} "
                   f"(e.g. key {counts.example}); deduplicate: runner capture, dbt build, "
                   "runner swap")


def check_null_keys(counts: KeyCounts, spec: DedupSpec) -> tuple[bool, str]:
    policy = f"nulls: {spec.nulls}"
    if counts.null_key_rows == 0:
        return True, f"no NULL in the key ({policy})"
    if spec.nulls not in NULL_KEYS_ALLOWED:
        return False, (f"NULL in the key: {counts.null_key_rows:,} rows, which {policy} does "
                       "not allow: fill them in or delete them, then add NOT NULL")
    if spec.alternative_key:
        return True, (f"NULL in the key: {counts.null_key_rows:,} rows, keyed by the alternative "
                      f"key ({', '.join(spec.alternative_key)})")
    meaning = "equal to each other" if spec.nulls == NULLS_EQUAL else "each its own key"
    return True, f"NULL in the key: {counts.null_key_rows:,} rows, {meaning} ({policy})"


def _nullable_key(live: LiveTable, spec: DedupSpec) -> bool:
    not_null = {column.name for column in live.columns if column.not_null}
    return not set(spec.natural_key) <= not_null


def _why_not_enforcing(live: LiveTable, spec: DedupSpec) -> str:
    """Why no index enforces the key: the closest index on the key columns, or none."""
    on_key = [index for index in live.indexes
              if index.unique and set(index.key_columns) == set(spec.natural_key)]
    columns = ", ".join(spec.natural_key)
    for index in on_key:
        if not index.valid:
            return (f"unique index {index.name} on ({columns}) is INVALID, left by a failed "
                    "CREATE UNIQUE INDEX CONCURRENTLY: drop it and build it again")
        if index.partial:
            return f"unique index {index.name} on ({columns}) is partial: it covers some rows"
        if spec.alternative_key and index.nulls_not_distinct:
            return (f"unique index {index.name} on ({columns}) treats NULLs as equal, which "
                    "makes one key of the rows that alternative_key tells apart: rebuild it "
                    "without NULLS NOT DISTINCT and run runner swap, which adds their key")
        if spec.alternative_key:
            return (f"unique index {index.name} on ({columns}) holds the keys without a NULL; "
                    f"nothing holds the alternative key ({', '.join(spec.alternative_key)}) of "
                    "the rest: run runner swap, which adds it")
        if spec.nulls == NULLS_EQUAL:
            return (f"unique index {index.name} on ({columns}) treats NULLs as distinct; "
                    f"nulls: {spec.nulls} needs UNIQUE NULLS NOT DISTINCT")
    return f"no unique constraint or index on ({columns}): run runner swap, which adds it"


def check_constraint(live: LiveTable, spec: DedupSpec) -> tuple[bool, str]:
    index = live.enforcing_index(spec)
    if index is None:
        return False, _why_not_enforcing(live, spec)
    if not _nullable_key(live, spec):
        nulls = "key columns NOT NULL"
    elif index.nulls_not_distinct:
        if spec.nulls == "distinct":
            return False, (f"{index.name} treats NULLs as equal, but under nulls: distinct every "
                           "NULL-key row is its own: the ETL's ON CONFLICT DO NOTHING drops "
                           "them; rebuild it without NULLS NOT DISTINCT")
        nulls = "NULLS NOT DISTINCT"
    elif spec.nulls == NULLS_EQUAL:
        partial = live.null_key_indexes(spec)
        held = (f"the alternative key ({', '.join(spec.alternative_key)}) where it has a NULL"
                if spec.alternative_key else "NULLs equal")
        nulls = (f"{held} by {len(partial)} partial unique index"
                 f"{'es' if len(partial) > 1 else ''} ({', '.join(i.name for i in partial)})")
    else:
        nulls = "NULLs distinct"
    kind = "constraint" if index.constraint else "unique index"
    return True, f"{kind} {index.name} on ({', '.join(index.key_columns)}), {nulls}, valid"


def check_indexes(live: LiveTable) -> tuple[bool, str]:
    invalid = [index.name for index in live.indexes if not index.valid]
    if invalid:
        return False, (f"INVALID: {', '.join(invalid)} (a failed CREATE INDEX CONCURRENTLY, "
                       "or one still running): DROP INDEX CONCURRENTLY and build it again")
    return True, f"{len(live.indexes)} indexes, all valid"


def check_foreign_keys(conn: psycopg.Connection, live: LiveTable) -> tuple[bool, str]:
    rows = conn.execute(
        "select conname, convalidated from pg_constraint"
        " where conrelid = %s::regclass and contype = 'f' order by conname",
        (_qualified(live.relation),)).fetchall()
    if not rows:
        return True, "no foreign keys"
    not_valid = [name for name, validated in rows if not validated]
    if not_valid:
        validate = "; ".join(f"ALTER TABLE {live.relation} VALIDATE CONSTRAINT {name}"
                             for name in not_valid)
        return False, (f"NOT VALID: {', '.join(not_valid)}: the rows it had when it was added "
                       f"were never checked; {validate}")
    return True, f"{len(rows)} validated: {', '.join(name for name, _ in rows)}"


def _sequence_problem(conn: psycopg.Connection, sequence: NumberingSequence,
                      relation: Relation,
                      before_swap: dict[str, str | None] | None) -> tuple[str | None, str]:
    """(what is wrong or None, what it is) of one sequence. `before_swap`: the sequences no
    column of the table owned when the swap in effect ran, with who owned them then."""
    name = f"{sequence.schema}.{sequence.name}"
    notes = []
    if not sequence.owned_here:
        fix = f"ALTER SEQUENCE {name} OWNED BY {relation}.{sequence.column}"
        owner = "no column" if sequence.owner is None else sequence.owner
        if before_swap is not None and name in before_swap and before_swap[name] == (
                sequence.owner):
            notes.append(f"{owner} owns it, as before the swap (not the swap's doing); to tie "
                         f"it to the table: {fix}")
        elif sequence.owner is None:
            return f"{name} numbers {sequence.column} but no column owns it: {fix}", name
        else:
            return (f"{name} numbers {sequence.column} but {sequence.owner} owns it, so "
                    f"dropping that table drops it: {fix}"), name
    last_value, is_called, highest, lowest = conn.execute(
        sequence_position_query(sequence, relation)).fetchone()
    upcoming = last_value + sequence.increment if is_called else last_value
    used = highest if sequence.increment > 0 else lowest
    limit = "max" if sequence.increment > 0 else "min"
    shown = "none" if used is None else f"{used:,}"
    state = "; ".join([f"{name}: next {upcoming:,}, {limit}({sequence.column}) {shown}",
                       *notes])
    behind = used is not None and (upcoming <= used if sequence.increment > 0
                                   else upcoming >= used)
    if behind:
        return (f"{state}: the next insert would reuse a value; SELECT setval('{name}', "
                f"{limit}({sequence.column})) FROM {relation}"), state
    return None, state


def check_sequences(conn: psycopg.Connection, live: LiveTable,
                    swap: LogEntry | None) -> tuple[bool, str]:
    before_swap = None if swap is None else dict(swap.sequences_not_owned)
    found = [_sequence_problem(conn, sequence, live.relation, before_swap)
             for sequence in live.numbering]
    if not found:
        return True, "no sequence numbers this table"
    problems = [problem for problem, _ in found if problem]
    if problems:
        return False, "; ".join(problems)
    return True, "; ".join(state for _, state in found)


def check_archive(conn: psycopg.Connection, swap: LogEntry | None,
                  capture: Registered | None) -> tuple[bool, str]:
    """The original kept by the swap in effect constrains, fires and publishes nothing, and
    whether a rollback can still carry the writes since the swap over to it."""
    if swap is None or swap.action not in ("swap", "in_place"):
        return True, "no archive: no swap that replaced the table is in effect"
    if swap.cleaned_at is not None:
        return True, (f"{swap.archive} was dropped by runner cleanup at "
                      f"{when(swap.cleaned_at)}: the swap can no longer be rolled back")
    if not catalog.exists(conn, swap.archive):
        return False, (f"{swap.archive} is missing, and with it the original rows: it was "
                       "dropped by hand; restore it from a backup if you need them")
    if swap.action == "in_place":
        records = [Relation(swap.archive_schema, r.record) for r in swap.repointed]
        missing = [str(record) for record in records if not catalog.exists(conn, record)]
        if missing:
            return False, (f"{', '.join(missing)} is missing, which recorded where the rows the "
                           "run re-pointed pointed before: it was dropped by hand, and a "
                           "rollback would leave them on the kept rows")
        recorded = (f", and {', '.join(map(str, records))} where the rows it re-pointed "
                    "pointed" if records else "")
        return True, (f"{swap.archive} holds the {swap.rows_before - swap.rows_after:,} rows "
                      f"removed in place{recorded}, which a rollback puts back")
    archive = catalog.read_live_table(conn, swap.archive)
    problems = []
    if archive.foreign_keys:
        problems.append(f"its foreign keys {', '.join(k[0] for k in archive.foreign_keys)} "
                        f"hold rows of their parents: ALTER TABLE {swap.archive} DROP "
                        "CONSTRAINT each")
    firing = [t.name for t in archive.triggers if t.enabled != "D"]
    if firing:
        problems.append(f"its triggers {', '.join(firing)} fire: ALTER TABLE {swap.archive} "
                        "DISABLE TRIGGER each")
    if archive.publications:
        problems.append(f"publications {', '.join(archive.publications)} publish it: ALTER "
                        f"PUBLICATION ... DROP TABLE {swap.archive}")
    if problems:
        return False, f"{swap.archive} is not inert: {'; '.join(problems)}"
    if capture is not None and capture.capture.since_swap_of == swap.archive_table and (
            capture.trigger in ("O", "A")):
        rollback = "the writes since the swap are captured, so it can be rolled back"
    else:
        rollback = "the writes since the swap are not captured, so it cannot be rolled back"
    return True, (f"{swap.archive} holds the original rows and constrains, fires and "
                  f"publishes nothing; {rollback}")


def check_size(conn: psycopg.Connection, live: LiveTable, rows_now: int,
               swap: LogEntry | None, archive_schema: str) -> tuple[bool, str]:
    """Informational: the table now beside the swap's record of it, when there is one."""
    now = size_text(conn.execute("select pg_total_relation_size(%s::regclass)",
                                 (_qualified(live.relation),)).fetchone()[0])
    if swap is None:
        return True, (f"{rows_now:,} rows, {now} now; no swap in effect in "
                      f"{archive_schema}.{SWAP_LOG} to compare with")
    return True, (f"{rows_now:,} rows, {now} now; swap at {when(swap.swapped_at)}: "
                  f"{swap.rows_before:,} rows, {size_text(swap.bytes_before)} before, "
                  f"{swap.rows_after:,} rows, {size_text(swap.bytes_after)} after")


def insert_columns(live: LiveTable) -> list[str]:
    """The columns the ETL sends: all but those the table fills itself."""
    numbered = {sequence.column for sequence in live.numbering}
    return [column.name for column in live.columns
            if not (column.identity or column.generated or column.name in numbered)]


def check_idempotent(conn: psycopg.Connection, target: DedupTarget, columns: list[str],
                     options: VerifyOptions) -> tuple[bool, str]:
    """Replay existing rows through the ETL's statement in a transaction always rolled back."""
    statement = replay_statement(target.live, target.spec, columns, options.sample)
    try:
        with conn.transaction(force_rollback=True):
            conn.execute(lock_timeout(options.lock_timeout_ms))
            replayed, inserted, null_keys = conn.execute(statement).fetchone()
    except psycopg.errors.LockNotAvailable:
        return False, (f"waited {options.lock_timeout_ms} ms for a lock another session holds "
                       "(the ETL?) and gave up: run runner verify again")
    if inserted > null_keys:
        return False, (f"{inserted:,} of {replayed:,} existing rows replayed were inserted "
                       "again: the ETL duplicates them; add the natural key's constraint "
                       "(runner swap)")
    if null_keys and target.spec.alternative_key:
        return False, (f"{null_keys:,} of {replayed:,} existing rows replayed were inserted "
                       "again, each with a NULL in the natural key, which no unique index "
                       f"holds by the alternative key ({', '.join(target.spec.alternative_key)})"
                       ": run runner swap, which adds them")
    if null_keys and target.spec.nulls == NULLS_EQUAL:
        return False, (f"{null_keys:,} of {replayed:,} existing rows replayed were inserted "
                       "again, each with a NULL in the key, which the table's unique "
                       "constraint treats as distinct where nulls: not_distinct makes NULLs "
                       "equal: enforce the key with NULLS NOT DISTINCT (runner swap does)")
    if null_keys:
        return False, (f"{null_keys:,} of {replayed:,} existing rows replayed were inserted "
                       f"again, each with a NULL in the key, which under nulls: "
                       f"{target.spec.nulls} conflicts with nothing, so every re-send adds a "
                       "row: give those rows a key (nulls: backfill), or declare nulls: "
                       "not_distinct")
    return True, f"{replayed:,} existing rows replayed, 0 inserted"


def verify_table(conn: psycopg.Connection, target: DedupTarget, live: LiveTable,
                 swap: LogEntry | None, capture: Registered | None,
                 options: VerifyOptions) -> list[CheckResult]:
    counts = key_counts(conn, target)
    # The sequences are checked before the replay, whose inserts advance them.
    outcomes = [
        ("duplicates", check_duplicates(counts)),
        ("null keys", check_null_keys(counts, target.spec)),
        ("natural key constraint", check_constraint(live, target.spec)),
        ("indexes valid", check_indexes(live)),
        ("foreign keys valid", check_foreign_keys(conn, live)),
        ("sequences", check_sequences(conn, live, swap)),
        ("archive", check_archive(conn, swap, capture)),
        ("size", check_size(conn, live, counts.total_rows, swap, options.archive_schema)),
        ("idempotent", check_idempotent(conn, target, insert_columns(live), options)),
    ]
    return [CheckResult(str(target.live), check, ok, detail)
            for check, (ok, detail) in outcomes]


def verify(conn: psycopg.Connection, targets: list[DedupTarget],
           options: VerifyOptions) -> list[CheckResult]:
    """Every check of every table; a missing table or key column stops it before any check."""
    tables = [(target, read_table(conn, target)) for target in targets]
    try:
        swaps = {entry.live: entry for entry in latest_swaps(conn, options.archive_schema)
                 if entry.rolled_back_at is None}
        captures = {r.capture.live: r
                    for r in registered_captures(conn, options.archive_schema)}
        return [result for target, live in tables
                for result in verify_table(conn, target, live, swaps.get(target.live),
                                           captures.get(target.live), options)]
    except psycopg.errors.InsufficientPrivilege as error:
        reason = str(error).strip().splitlines()[0]
        raise RunnerError(f"{reason}: run runner verify as a role that may read these tables, "
                          f"their sequences and those of {options.archive_schema}, and insert "
                          "into the tables (its inserts are always rolled back)") from error
