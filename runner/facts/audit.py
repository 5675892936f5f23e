"""`runner audit`: how duplicated each live table is, read straight from it, before any build.

Per table: total rows, unique natural keys counted with the table's NULL policy (as the dbt
model audit_duplicates counts them), duplicates, NULL-key rows, its size and the size one row
per key would leave, the unique indexes it has, which say why `INSERT ... ON CONFLICT DO
NOTHING` never conflicted: none of them is on the natural key; and the foreign keys of other
tables that point at it, with how many of their rows point at a duplicate (one more scan of
the table for all the keys that point at the same columns, and one of each such table, only
for a table that others reference).

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
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import psycopg
from psycopg import sql

from runner.declaration.artifacts import DedupSpec, DedupTarget, Relation
from runner.server.catalog import Index, LiveTable, read_live_table
from runner.server.references import ReferenceCount, reference_counts
from runner.statements.keys import KeyCounts, count_keys
from runner.statements.plan import check_spec_columns

# Memory for the one hash aggregate per table, as the dbt project's key-group models get
# (var dedup_work_mem, which says why so little).
WORK_MEM = "16MB"
# Below this much heap a scan takes about a second or less: no estimate, no progress.
PROGRESS_ABOVE_BYTES = 1 << 30
# The block range whose throughput gives the estimate: 1% of the heap, at most 512 MB.
PROBE_SHARE = 0.01
PROBE_MAX_BLOCKS = 65_536


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
    references: tuple[ReferenceCount, ...] = ()

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
        references = reference_counts(conn, target.spec, live)
    return TableAudit(target, KeyCounts(*row), total_bytes, unique_indexes(live, target.spec),
                      references)


def audit(conn: psycopg.Connection, targets: list[DedupTarget], watch: Watch | None = None,
          progress_above_bytes: int = PROGRESS_ABOVE_BYTES) -> list[TableAudit]:
    """Audit each target's live table; every table and the columns its YAML names are found
    in the catalog before any scan, so a missing one fails at once."""
    live_tables = [read_live_table(conn, target.live) for target in targets]
    for target, live in zip(targets, live_tables, strict=True):
        check_spec_columns(target, live)
    return [audit_table(conn, target, live, watch, progress_above_bytes)
            for target, live in zip(targets, live_tables, strict=True)]


def total(audits: list[TableAudit]) -> tuple[KeyCounts, int, int]:
    """Counts, bytes and estimated bytes after, summed over the tables: the TOTAL row."""
    counts = KeyCounts(0, 0, 0)
    for table in audits:
        counts += table.counts
    return (counts, sum(t.bytes for t in audits), sum(t.bytes_after for t in audits))
