"""`runner audit`: how duplicated each live table is, read straight from it, before any build.

Per table: total rows, unique natural keys counted with the table's NULL policy (as the dbt
model audit_duplicates counts them), duplicates, NULL-key rows, its size and the size one row
per key would leave, and the unique indexes it has, which say why `INSERT ... ON CONFLICT DO
NOTHING` never conflicted: none of them is on the natural key.

One scan per table: a single GROUP BY on the narrow key columns, which PostgreSQL runs as a
parallel hash aggregate. Scanning by block ranges instead (TID Range Scans, one statement per
range, two connections, counts merged per key) would report real progress, but took 1.5-1.9x
the time of one sequential scan where this took 1.0-1.3x (bench/audit.py --with-ranges, cold
cache, 1.3 and 10 GB): a TID Range Scan is never parallel, and it reads through shared
buffers without the small ring a sequential scan reuses. So a large table gets an estimate of
its duration instead, from the throughput measured on one block range, and a bar that fills
against that estimate while the one scan runs.

Reads only: every statement runs in a READ ONLY transaction and takes ACCESS SHARE locks, as
any SELECT does. SQL is built by pure functions; `audit` executes them.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import asdict, dataclass
from decimal import ROUND_HALF_UP, Decimal

import psycopg
from psycopg import sql
from rich.console import Console
from rich.progress import Progress, ProgressColumn, Task, TextColumn, TimeElapsedColumn
from rich.progress_bar import ProgressBar

from runner.artifacts import DedupSpec, DedupTarget, Relation
from runner.catalog import Index, LiveTable, read_live_table

# Memory for the one hash aggregate per table, as the dbt project's key-group models get
# (var dedup_work_mem, which says why so little).
WORK_MEM = "16MB"
# Below this much heap a scan takes about a second or less: no estimate, no progress.
PROGRESS_ABOVE_BYTES = 1 << 30
# The block range whose throughput gives the estimate: 1% of the heap, at most 512 MB.
PROBE_SHARE = 0.01
PROBE_MAX_BLOCKS = 65_536


@dataclass(frozen=True)
class KeyCounts:
    """The seed's table 2.1 for one table: rows, unique natural keys, NULL-key rows."""

    total_rows: int
    unique_rows: int
    """Rows left after deduplication: one per key, plus every NULL-key row unless NULLs are
    equal (nulls: not_distinct)."""
    null_key_rows: int

    @property
    def duplicate_rows(self) -> int:
        return self.total_rows - self.unique_rows

    @property
    def duplicate_pct(self) -> float | None:
        return _rounded(100 * self.duplicate_rows, self.total_rows, "0.01")

    @property
    def duplication_factor(self) -> float | None:
        return _rounded(self.total_rows, self.unique_rows, "0.1")

    def __add__(self, other: KeyCounts) -> KeyCounts:
        return KeyCounts(self.total_rows + other.total_rows,
                         self.unique_rows + other.unique_rows,
                         self.null_key_rows + other.null_key_rows)


def _rounded(numerator: int, denominator: int, places: str) -> float | None:
    """numerator / denominator rounded half away from zero, as PostgreSQL's round(numeric)
    rounds it in audit_duplicates, so that both report the same figures."""
    if not denominator:
        return None
    return float((Decimal(numerator) / Decimal(denominator)).quantize(Decimal(places),
                                                                      ROUND_HALF_UP))


@dataclass(frozen=True)
class UniqueIndex:
    name: str
    """The constraint's name where the index backs one, else the index's."""
    definition: str
    enforces_natural_key: bool


@dataclass(frozen=True)
class TableAudit:
    target: DedupTarget
    counts: KeyCounts
    bytes: int
    """pg_total_relation_size: heap, TOAST and indexes (of every partition, if partitioned)."""
    unique_indexes: tuple[UniqueIndex, ...]

    @property
    def bytes_after(self) -> int:
        """Estimated: the size shrinks with the rows, one row per key."""
        if not self.counts.total_rows:
            return self.bytes
        return round(self.bytes * self.counts.unique_rows / self.counts.total_rows)

    @property
    def enforced_by(self) -> str | None:
        return next((i.name for i in self.unique_indexes if i.enforces_natural_key), None)


@dataclass(frozen=True)
class Scan:
    """What the user is told before a long scan starts."""

    relation: Relation
    heap_bytes: int
    estimate_seconds: float | None
    """None where no estimate can be made (a partitioned table has no one block range)."""


# Called before the scan of a table above PROGRESS_ABOVE_BYTES; the scan runs inside the
# context it returns.
Watch = Callable[[Scan], AbstractContextManager]


def count_keys(relation: Relation, spec: DedupSpec,
               blocks: tuple[int, int] | None = None) -> sql.Composed:
    """Total rows, unique keys and NULL-key rows in one GROUP BY on the key columns.

    GROUP BY puts NULLs together, so a group whose key has a NULL is one key only when NULLs
    are equal (not_distinct); under every other policy each of its rows is a key of its own,
    as in a plain UNIQUE constraint and in the dbt models
    (macros/sql_parts/dedup_key_groups_ctes.sql). `blocks` limits the scan to heap blocks
    [first, last), a TID Range Scan.
    """
    key = [sql.Identifier(column) for column in spec.natural_key]
    # The groups' columns are renamed, so no key column can be mistaken for the count.
    grouped = [sql.Identifier(f"key_{number}") for number in range(1, len(key) + 1)]
    any_null = sql.SQL(" or ").join(sql.SQL("{} is null").format(column) for column in grouped)
    null_key_rows = sql.SQL("coalesce(sum(key_rows) filter (where {}), 0)").format(any_null)
    null_keys = (sql.SQL("count(*) filter (where {})").format(any_null)
                 if spec.nulls == "not_distinct" else null_key_rows)
    where = sql.SQL("")
    if blocks is not None:
        where = sql.SQL("\n    where ctid >= {}::tid and ctid < {}::tid").format(
            sql.Literal(f"({blocks[0]},0)"), sql.Literal(f"({blocks[1]},0)"))
    return sql.SQL(
        "select\n"
        "    coalesce(sum(key_rows), 0)::bigint as total_rows,\n"
        "    (count(*) filter (where not ({any_null})) + {null_keys})::bigint as unique_rows,\n"
        "    {null_key_rows}::bigint as null_key_rows\n"
        "from (\n"
        "    select {key}, count(*)\n"
        "    from {table}{where}\n"
        "    group by {key}\n"
        ") as key_groups ({grouped}, key_rows)"
    ).format(
        any_null=any_null, null_keys=null_keys, null_key_rows=null_key_rows,
        key=sql.SQL(", ").join(key), table=sql.Identifier(relation.schema, relation.name),
        where=where, grouped=sql.SQL(", ").join(grouped),
    )


def session_settings() -> list[sql.Composed]:
    """Read only, and room and encouragement for a parallel hash aggregate: the planner cannot
    know how few keys there are, and without these it aggregates in one process; no JIT, which
    costs more than it saves on so simple an aggregate (the same settings as the dbt project's
    pre-hooks). SET LOCAL: this transaction only."""
    return [
        sql.SQL("set transaction read only"),
        sql.SQL("set local work_mem = {}").format(sql.Literal(WORK_MEM)),
        sql.SQL("set local parallel_tuple_cost = 0"),
        sql.SQL("set local jit = off"),
    ]


_SIZES = """
with target as (select format('%%I.%%I', %s::text, %s::text)::regclass as oid)
select
    coalesce((select sum(pg_total_relation_size(relid)) from pg_partition_tree(target.oid)),
             pg_total_relation_size(target.oid))::bigint,
    coalesce((select sum(pg_relation_size(relid)) from pg_partition_tree(target.oid)),
             pg_relation_size(target.oid))::bigint,
    current_setting('block_size')::int
from target
"""


def unique_indexes(live: LiveTable, spec: DedupSpec) -> tuple[UniqueIndex, ...]:
    """The table's unique indexes, and which one (if any) enforces the natural key."""
    enforcing = live.enforcing_index(spec)
    return tuple(
        UniqueIndex(
            name=index.constraint or index.name,
            definition=_definition(index),
            enforces_natural_key=index == enforcing,
        )
        for index in live.indexes
        if index.unique
    )


def _definition(index: Index) -> str:
    definition = index.constraint_definition or f"UNIQUE INDEX {index.method}"
    return definition if index.valid else f"{definition} (INVALID: enforces nothing)"


def planned_processes(plan: list) -> int:
    """The processes an EXPLAIN (FORMAT JSON) plan scans with: its workers and the leader."""
    pending, workers = [plan[0]["Plan"]], 0
    while pending:
        node = pending.pop()
        workers += node.get("Workers Planned", 0)
        pending.extend(node.get("Plans", []))
    return workers + 1


def _estimate(conn: psycopg.Connection, target: DedupTarget, heap_bytes: int,
              block_size: int) -> float:
    """Seconds for the whole scan: one block range's throughput, by one process, times the
    processes the planner gives the whole scan.

    The range starts at a random block: a TID Range Scan leaves what it read in shared buffers,
    so a range probed by an earlier audit would measure a cache the rest of the table is not in.
    """
    blocks = heap_bytes // block_size
    probe_blocks = max(1, min(PROBE_MAX_BLOCKS, int(blocks * PROBE_SHARE)))
    first = random.randrange(max(1, blocks - probe_blocks))
    started = time.perf_counter()
    conn.execute(count_keys(target.live, target.spec, (first, first + probe_blocks))).fetchone()
    per_byte = (time.perf_counter() - started) / (probe_blocks * block_size)
    # EXPLAIN's JSON comes back as type json, which psycopg parses.
    plan = conn.execute(sql.SQL("explain (format json) {}").format(
        count_keys(target.live, target.spec))).fetchone()[0]
    return heap_bytes * per_byte / planned_processes(plan)


def audit_table(conn: psycopg.Connection, target: DedupTarget, live: LiveTable,
                watch: Watch | None = None,
                progress_above_bytes: int = PROGRESS_ABOVE_BYTES) -> TableAudit:
    with conn.transaction():
        for statement in session_settings():
            conn.execute(statement)
        total_bytes, heap_bytes, block_size = conn.execute(
            _SIZES, (live.relation.schema, live.relation.name)).fetchone()
        watching: AbstractContextManager = nullcontext()
        if watch is not None and heap_bytes and heap_bytes >= progress_above_bytes:
            estimate = (_estimate(conn, target, heap_bytes, block_size)
                        if live.kind == "r" else None)
            watching = watch(Scan(live.relation, heap_bytes, estimate))
        with watching:
            row = conn.execute(count_keys(live.relation, target.spec)).fetchone()
    return TableAudit(target, KeyCounts(*row), total_bytes, unique_indexes(live, target.spec))


def audit(conn: psycopg.Connection, targets: list[DedupTarget], watch: Watch | None = None,
          progress_above_bytes: int = PROGRESS_ABOVE_BYTES) -> list[TableAudit]:
    """Audit each target's live table; every table is found in the catalog before any scan,
    so a missing one fails at once."""
    live_tables = [read_live_table(conn, target.live) for target in targets]
    return [audit_table(conn, target, live, watch, progress_above_bytes)
            for target, live in zip(targets, live_tables, strict=True)]


def total(audits: list[TableAudit]) -> tuple[KeyCounts, int, int]:
    """Counts, bytes and estimated bytes after, summed over the tables: the TOTAL row."""
    counts = KeyCounts(0, 0, 0)
    for table in audits:
        counts += table.counts
    return (counts, sum(t.bytes for t in audits), sum(t.bytes_after for t in audits))


class _EstimatedBar(ProgressColumn):
    """Fills with the time elapsed against the estimate, as no running query reports how far
    it got; stops short of full until the scan ends. Pulses where there is no estimate."""

    def render(self, task: Task) -> ProgressBar:
        estimate = task.fields["estimate"]
        if estimate is None:
            return ProgressBar(total=None, width=30)
        return ProgressBar(total=estimate, completed=min(task.elapsed or 0, 0.99 * estimate),
                           width=30)


def progress_on(console: Console, size: Callable[[int], str]) -> Watch:
    """A Watch that says on `console` what a long scan will take, shows a bar while it runs
    (on a terminal), then says what it took."""

    @contextmanager
    def watch(scan: Scan) -> Iterator[None]:
        about = (f"about {_seconds(scan.estimate_seconds)}" if scan.estimate_seconds is not None
                 else "no estimate for a partitioned table")
        console.print(f"{scan.relation}: scanning {size(scan.heap_bytes)}, {about}",
                      highlight=False)
        started = time.perf_counter()
        if console.is_terminal:
            with Progress(TextColumn("{task.description}"), _EstimatedBar(),
                          TimeElapsedColumn(), console=console, transient=True) as progress:
                progress.add_task(str(scan.relation), total=None,
                                  estimate=scan.estimate_seconds)
                yield
        else:
            yield
        console.print(f"{scan.relation}: scanned in {_seconds(time.perf_counter() - started)}",
                      highlight=False)

    return watch


def _seconds(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"


def rows(audits: list[TableAudit], output_format: str,
         size: Callable[[int], str]) -> list[dict]:
    """One row per table and a TOTAL row: for people, sizes readable (the unique indexes
    follow the table, `index_lines`); for machines (json, csv), exact, with the indexes."""
    counts, total_bytes, total_after = total(audits)
    if output_format == "table":
        return [
            _readable_row(table.target.live.name, table.counts, size(table.bytes),
                          size(table.bytes_after))
            for table in audits
        ] + [_readable_row("TOTAL", counts, size(total_bytes), size(total_after))]
    as_text = output_format == "csv"
    machine = [
        {
            "table": str(table.target.live),
            "natural_key": (", ".join(table.target.spec.natural_key) if as_text
                            else list(table.target.spec.natural_key)),
            "nulls": table.target.spec.nulls,
            **_count_fields(table.counts),
            "bytes": table.bytes,
            "bytes_after_estimate": table.bytes_after,
            "natural_key_enforced_by": table.enforced_by,
            "unique_indexes": (
                "; ".join(f"{i.name}: {i.definition}" for i in table.unique_indexes)
                if as_text else [asdict(i) for i in table.unique_indexes]
            ),
        }
        for table in audits
    ]
    machine.append({
        "table": "TOTAL", "natural_key": None, "nulls": None, **_count_fields(counts),
        "bytes": total_bytes, "bytes_after_estimate": total_after,
        "natural_key_enforced_by": None, "unique_indexes": None,
    })
    return machine


def _count_fields(counts: KeyCounts) -> dict:
    """The names and order of the dbt model audit_duplicates."""
    return {
        "total_rows": counts.total_rows,
        "unique_rows": counts.unique_rows,
        "duplicate_rows": counts.duplicate_rows,
        "duplicate_pct": counts.duplicate_pct,
        "duplication_factor": counts.duplication_factor,
        "null_key_rows": counts.null_key_rows,
    }


def _readable_row(table: str, counts: KeyCounts, size_now: str, size_after: str) -> dict:
    return {
        "table": table,
        "rows": counts.total_rows,
        "unique": counts.unique_rows,
        "duplicates": counts.duplicate_rows,
        "dup %": counts.duplicate_pct,
        "factor": counts.duplication_factor,
        "NULL keys": counts.null_key_rows,
        "size": size_now,
        "after (est.)": size_after,
    }


def index_lines(audits: list[TableAudit]) -> str:
    """Per table, its unique indexes: ON CONFLICT DO NOTHING skips a row only when one of
    them conflicts, so a table whose natural key none enforces takes every copy."""
    lines = ["Unique indexes (ON CONFLICT DO NOTHING skips a row only on a conflict in one):"]
    for table in audits:
        key = f"({', '.join(table.target.spec.natural_key)})"
        listed = "; ".join(
            f"{i.name} {i.definition}" + (" <- the natural key" if i.enforces_natural_key else "")
            for i in table.unique_indexes
        ) or "none"
        verdict = "" if table.enforced_by else f"; none enforces the natural key {key}"
        lines.append(f"  {table.target.live.name}: {listed}{verdict}")
    return "\n".join(lines)


def title(audits: list[TableAudit]) -> str:
    schemas = sorted({table.target.live.schema for table in audits})
    return f"runner audit: {', '.join(schemas)}"
