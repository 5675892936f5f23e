"""The swap as a list of statements, built from facts alone: no database access here.

For each table that has duplicates, a shadow table is built beside the live one with everything
LIKE can copy, filled from dbt's deduplicated table, given the live table's indexes under
temporary names and proven equal to the live rows it keeps. Under the lock (with the parents of
its foreign keys held against writes) the shadow gets those keys NOT VALID, to be validated
after the commit; the live table moves to the archive schema (nothing is copied: the original
rows stay exactly as they were), gives up what would let it constrain or fire anything there
(its foreign keys are dropped, its triggers disabled, both recorded for a rollback), and the
shadow takes its name, indexes, sequence, owner, grants, comment and dependent views, and a
change capture of its own, so that a rollback knows every write made after the swap.

`--dry-run` prints these statements; `runner.jobs.swap` runs them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from datetime import datetime

from psycopg import sql

from runner.declaration.artifacts import DedupSpec, DedupTarget, Relation
from runner.declaration.names import (
    archive_name,
    constraint_name,
    null_key_index_name,
    null_key_index_names,
    pg_name,
)
from runner.errors import RunnerError
from runner.server import swap_log
from runner.server.catalog import ColumnGrant, Grant, Index, LiveTable, Trigger, View
from runner.statements import capture, repoint
from runner.statements.in_place import InPlace
from runner.statements.keys import NULLS_NOT_DISTINCT_VERSION, KeyShape, null_key_shapes

# The share of a table's rows that are duplicates up to which `strategy: auto` removes them in
# place rather than swap in a new table of the kept rows. Measured with bench/strategies.py
# (2 million rows, cold cache, build and swap, a writer writing), since the capture leaves the
# run's own deletes out of its log: in place took 32.8 s against the swap's 43.3 at 10%, 32.0
# against 32.1 at 15%, 39.4 against 45.2 at 20% (the swap's build 11 s slower than in the other
# runs), 40.8 against 32.2 at 25% and 49.9 against 32.2 at 50%; the two meet at 15%.
IN_PLACE_UP_TO = 0.15
# The first version that adds a partitioned table's foreign key NOT VALID.
PARTITIONED_NOT_VALID_VERSION = 180000
PRIVILEGES = {
    "SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE", "REFERENCES", "TRIGGER", "MAINTAIN",
}


@dataclass(frozen=True)
class Step:
    why: str
    statement: sql.Composed
    check: bool = False
    """A query whose first column must be true; the other columns explain a failure."""


@dataclass(frozen=True)
class BuildCounts:
    """What dbt's key groups say of the live table as the build saw it."""

    rows: int
    keys: int
    snapshot: str | None = None
    """The snapshot the build read the live table in; None when it found no row."""

    @property
    def duplicates(self) -> int:
        return self.rows - self.keys


@dataclass
class TablePlan:
    target: DedupTarget
    action: str
    """swap, in_place, constraint (no duplicates, only the constraint is missing), or
    nothing."""
    counts: BuildCounts
    archive: Relation | None = None
    constraint: str = ""
    shadow: Relation | None = None
    capture: capture.Capture | None = None
    """The change capture in place since before the build, which the swap ends."""
    replay: capture.Replay | None = None
    """How to bring the new table up to date with the writes since the build."""
    parents: tuple[Relation, ...] = ()
    """Tables the new table's foreign keys reference: locked against writes for the moment of
    the cut-over, as the keys are added."""
    materialized_views: tuple[Relation, ...] = ()
    """The materialized views the cut-over creates again: their readers can hold it off too."""
    repointings: tuple[repoint.Repointing, ...] = ()
    """The foreign keys of other tables that point at it, whose rows pointing at a removed
    duplicate move to the kept row of its key."""
    concurrent: list[Step] = field(default_factory=list)
    """Run before the transaction, outside it: CREATE INDEX CONCURRENTLY cannot run inside one."""
    built_concurrently: list[sql.Identifier] = field(default_factory=list)
    """The indexes `concurrent` builds: dropped again when a build fails."""
    lookup: list[Step] = field(default_factory=list)
    """Run before the transaction, outside it: the index on the live table's natural key that
    lets a replay under the lock find a key's live rows, built for the swap alone."""
    lookup_built: list[sql.Identifier] = field(default_factory=list)
    """The indexes `lookup` builds, where not the one lookup_index names: a partitioned
    table's, one per partition."""
    rescan_under_lock: bool = False
    """Whether the live table has such an index, so that a replay under the lock may rescan a
    key whose kept row the ETL deleted or re-keyed instead of giving the lock back."""
    prepare: list[Step] = field(default_factory=list)
    """In the transaction, before the live table is locked."""
    cutover: list[Step] = field(default_factory=list)
    """In the transaction, under ACCESS EXCLUSIVE on the live table."""
    validate: list[Step] = field(default_factory=list)
    """After the commit, each in a transaction of its own that blocks no writer."""
    in_place: InPlace | None = None
    """For action in_place: the guard, the keys to visit and the archive, which the steps
    before the unique index's build work with."""
    why: str = ""
    """Why the table gets its strategy."""
    fired_by_deletes: tuple[str, ...] = ()
    """For action in_place: the table's own triggers that its DELETEs fire."""


def _grant(grant: Grant | ColumnGrant, table: sql.Composable, relation: Relation) -> Step:
    if grant.privilege not in PRIVILEGES:
        raise RunnerError(f"unknown privilege {grant.privilege} on {relation}")
    column = getattr(grant, "column", None)
    return Step(
        f"grant {grant.privilege}{f' on column {column}' if column else ''} to "
        f"{grant.grantee or 'PUBLIC'}",
        sql.SQL("grant {}{} on {} to {}{}").format(
            sql.SQL(grant.privilege),
            sql.SQL(" ({})").format(sql.Identifier(column)) if column else sql.SQL(""), table,
            sql.Identifier(grant.grantee) if grant.grantee else sql.SQL("public"),
            sql.SQL(" with grant option" if grant.grantable else "")))


def with_options(options: tuple[str, ...]) -> sql.Composable:
    """ " WITH (k = v, ...)" from pg_class.reloptions, or nothing."""
    if not options:
        return sql.SQL("")
    return sql.SQL(" with ({})").format(sql.SQL(", ").join(
        sql.SQL("{} = {}").format(sql.Identifier(k), sql.Literal(v))
        for k, v in (option.split("=", 1) for option in options)))


def recreate_view(view: View, why: str) -> Step:
    """The view again from its definition, so that it reads whatever table has the name now."""
    return Step(why, sql.SQL("create or replace view {}{} as {}").format(
        sql.Identifier(view.relation.schema, view.relation.name), with_options(view.options),
        sql.SQL(view.definition.rstrip().rstrip(";"))))


def recreate_materialized_views(live: LiveTable, reads: str) -> list[Step]:
    """Each materialized view that reads the table, dropped and created again from its
    definition, so that it reads whatever table has the name now, filled from it as it was
    (its query runs here, while the lock holds writers off), with its owner, grants, comment
    and indexes; and each that reads it through views, refreshed, once they read that table.
    `reads`: which table that is, in words."""
    steps = []
    for view in live.materialized_views:
        view_id = sql.Identifier(view.relation.schema, view.relation.name)
        steps += [
            Step(f"materialized view {view.relation} reads {reads}: dropped",
                 sql.SQL("drop materialized view {}").format(view_id)),
            Step("and created again from its definition, "
                 + ("filled by its query" if view.populated else "unpopulated, as it was"),
                 sql.SQL("create materialized view {}{} as {} with {}data").format(
                     view_id, with_options(view.options),
                     sql.SQL(view.definition.rstrip().rstrip(";")),
                     sql.SQL("" if view.populated else "no "))),
            Step("owned by its owner", sql.SQL("alter materialized view {} owner to {}").format(
                view_id, sql.Identifier(view.owner))),
            *(_grant(grant, view_id, view.relation) for grant in view.grants),
            *([Step("same comment", sql.SQL("comment on materialized view {} is {}").format(
                view_id, sql.Literal(view.comment)))] if view.comment is not None else []),
            *(Step("its index", sql.SQL(index)) for index in view.indexes),
        ]
    return steps + [
        Step(f"materialized view {view} reads {reads} through views: refreshed",
             sql.SQL("refresh materialized view {}").format(
                 sql.Identifier(view.schema, view.name)))
        for view in live.refreshed_through_views]


def _nullable_key(spec: DedupSpec, live: LiveTable) -> list[str]:
    not_null = {column.name for column in live.columns if column.not_null}
    return [column for column in spec.natural_key if column not in not_null]


def refuse_unsupported(live: LiveTable, in_place: bool = False) -> None:
    """What this version cannot carry over to a new table, or (`in_place`) deduplicate where
    it is: stop before changing anything. In place the table stays the one it is, partitions
    and materialized views around it included."""
    name = str(live.relation)
    problems = []
    if live.kind not in ("r", "p") or (live.partitioned and not in_place):
        problems.append("it is not a plain table (partitioned or foreign)")
    if live.is_partition and not in_place:
        problems.append(f"it is a partition of {', '.join(live.parents)}, which a swap would "
                        "take it out of")
    elif live.parents and not live.is_partition:
        problems.append(f"it inherits from {', '.join(live.parents)}")
    if live.children and live.kind == "r":
        problems.append(f"tables inherit from it ({', '.join(live.children)})")
    referencing_itself = [name for name, _, parent in live.foreign_keys
                          if parent == live.relation]
    if referencing_itself:
        # Its rows point at each other: the kept rows would point at the archive's.
        problems.append(f"it references itself ({', '.join(referencing_itself)})")
    if not in_place:
        problems += materialized_views_read(live)
    if problems:
        raise RunnerError(f"runner swap cannot yet carry {name} over: {'; '.join(problems)}; "
                          "deduplicate it by hand or leave it out with --select")


def refuse_references(spec: DedupSpec, live: LiveTable, swapped: set[Relation],
                      captured: set[str],
                      server_version: int = PARTITIONED_NOT_VALID_VERSION,
                      in_place: bool = False) -> None:
    """Whether the rows that point at the duplicates the run removes can be moved to the kept
    rows: stop before changing anything if not. `swapped`: the tables this run replaces;
    `captured`: the foreign keys whose written values `runner capture` logs, which only a swap
    reads; `in_place`: the table stays, and so do its foreign keys."""
    if not live.references:
        return
    doing = "deduplicate" if in_place else "replace"
    if spec.references == "refuse":
        raise RunnerError(f"runner swap does not {doing} {live.relation}: foreign keys point at "
                          f"it ({', '.join(live.referenced_by)}) and its meta.dedup says "
                          "references: refuse; set references: repoint to move their rows to "
                          "the kept rows, or leave it out with --exclude")
    if spec.any_copy:
        raise RunnerError(f"foreign keys point at {live.relation} ({', '.join(live.referenced_by)}"
                          "), so its rows differ in the columns they point at, and keep: any "
                          "removes only copies equal in every column: declare keep with a "
                          "tie-breaker instead")
    for reference in live.references:
        columns = ", ".join(reference.columns)
        if reference.table in swapped:
            raise RunnerError(f"{reference.table} is deduplicated in the same run as "
                              f"{live.relation}, whose rows its foreign key "
                              f"{reference.constraint} re-points: swap {live.relation} first, "
                              f"then {reference.table} (--select)")
        if not reference.indexed:
            raise RunnerError(f"{reference.shown} points at {live.relation}, and no index of "
                              f"{reference.table} starts with ({columns}), without which "
                              "finding the rows that point at each removed row is a scan: "
                              "create one (create index concurrently on "
                              f"{reference.table} ({columns})), then run `runner swap` again")
        if not reference.row_key:
            raise RunnerError(f"{reference.shown} points at {live.relation}, and "
                              f"{reference.table} has no primary key, by which a rollback would "
                              "put back the rows it re-points: add one, or set references: "
                              f"refuse for {live.relation}")
        if in_place:
            continue
        if reference.partitioned and server_version < PARTITIONED_NOT_VALID_VERSION:
            raise RunnerError(f"{reference.table}, whose foreign key {reference.constraint} "
                              f"points at {live.relation}, is partitioned, and before "
                              "PostgreSQL 18 such a key cannot be added NOT VALID: the swap would "
                              "check all its rows under the lock; re-point them by hand, or set "
                              f"references: refuse for {live.relation}")
        if reference.constraint not in captured:
            raise RunnerError(f"the rows written into {reference.shown}, which points at "
                              f"{live.relation}, are not captured, so the swap could miss some "
                              "to re-point: run `runner capture` (it captures the foreign keys "
                              "that point at each table it captures), then `runner swap`")


def materialized_views_read(live: LiveTable) -> list[str]:
    """Materialized views that read the table and are read in turn: created again, they would
    leave their readers reading the dropped one."""
    return [f"{', '.join(view.read_by)} read materialized view {view.relation}, which reads it"
            for view in live.materialized_views if view.read_by]


def check_columns(target: DedupTarget, live: LiveTable, built: list[tuple[str, str]]) -> None:
    if not built:
        raise RunnerError(f"{target.deduplicated} does not exist: run `dbt build`")
    expected = [(c.name, c.type) for c in live.columns]
    if built != expected:
        raise RunnerError(f"{target.deduplicated} has columns {built} but {live.relation} has "
                          f"{expected}: the live table changed since the build; run `dbt build`")
    check_spec_columns(target, live)


def check_spec_columns(target: DedupTarget, live: LiveTable) -> None:
    """The columns the YAML names for the table are columns of it."""
    for what, columns in (("natural key", target.spec.natural_key),
                          ("keep", target.spec.keep_columns),
                          ("alternative key", target.spec.alternative_key)):
        missing = [c for c in columns if c not in live.column_names()]
        if missing:
            raise RunnerError(f"{what} column(s) {missing} of {target.source} are not columns "
                              f"of {live.relation}: fix {what.replace(' ', '_')} in the dbt "
                              "YAML, or the table")


def _nulls_not_distinct(spec: DedupSpec, live: LiveTable, server_version: int) -> bool:
    # With every key column NOT NULL, NULLS NOT DISTINCT changes nothing: leaving it out
    # keeps the statement valid before PostgreSQL 15, where partial_key_shapes does its work. Under
    # an alternative key a NULL in the natural key is for its partial indexes to hold.
    return bool(spec.nulls == "not_distinct" and not spec.alternative_key
                and _nullable_key(spec, live) and server_version >= NULLS_NOT_DISTINCT_VERSION)


def _unique_index(spec: DedupSpec, live: LiveTable, name: str, table: sql.Composable,
                  server_version: int, concurrently: bool = False) -> sql.Composed:
    return sql.SQL("create unique index {concurrently}{name} on {table} ({keys}){nulls}").format(
        concurrently=sql.SQL("concurrently " if concurrently else ""),
        name=sql.Identifier(name),
        table=table,
        keys=sql.SQL(", ").join(sql.Identifier(c) for c in spec.natural_key),
        nulls=sql.SQL(" nulls not distinct" if _nulls_not_distinct(spec, live, server_version)
                      else ""),
    )


def partial_key_shapes(spec: DedupSpec, live: LiveTable, server_version: int) -> list[KeyShape]:
    """The keys with a NULL that the constraint on the natural key leaves to partial unique
    indexes beside it, one per shape: `(a) WHERE b IS NULL`, and `((true)) WHERE a IS NULL AND
    b IS NULL` for a key of NULLs only. Before PostgreSQL 15 no constraint makes NULLs equal;
    an alternative key's columns count only where the natural key has a NULL."""
    return null_key_shapes(spec, {c.name for c in live.columns if c.not_null}, server_version)


def _null_key_names(spec: DedupSpec, live: LiveTable, server_version: int,
                    pending: bool) -> list[str]:
    """The names of the partial unique indexes of partial_key_shapes, in their order."""
    return [null_key_index_name(live.relation.name, number, pending)
            for number in range(1, len(partial_key_shapes(spec, live, server_version)) + 1)]


def _null_key_indexes(spec: DedupSpec, live: LiveTable, server_version: int,
                      table: sql.Composable, concurrently: bool = False) -> list[Step]:
    """The partial unique indexes of partial_key_shapes, under their pending names."""
    steps = []
    for shape, name in zip(partial_key_shapes(spec, live, server_version),
                           _null_key_names(spec, live, server_version, pending=True),
                           strict=True):
        steps.append(Step(
            f"one key for the rows whose {', '.join(shape.nulls)} is NULL",
            sql.SQL("create unique index {concurrently}{name} on {table} ({columns})"
                    " where {nulls}").format(
                concurrently=sql.SQL("concurrently " if concurrently else ""),
                name=sql.Identifier(name),
                table=table,
                columns=sql.SQL(", ").join(sql.Identifier(k) for k in shape.compared)
                if shape.compared else sql.SQL("(true)"),
                nulls=sql.SQL(" and ").join(sql.SQL("{} is null").format(sql.Identifier(k))
                                            for k in shape.nulls))))
    return steps


def _null_key_indexes_taken(spec: DedupSpec, live: LiveTable,
                            server_version: int) -> list[Step]:
    """The partial unique indexes leave their pending names for the table's."""
    return [Step("and keeps its key where it has NULLs", sql.SQL("alter index {} rename to {}")
                 .format(sql.Identifier(live.relation.schema, pending), sql.Identifier(final)))
            for pending, final in zip(_null_key_names(spec, live, server_version, pending=True),
                                      _null_key_names(spec, live, server_version, pending=False),
                                      strict=True)]


def _unseen_rows(log: Relation, snapshot: str | None) -> sql.Composed:
    """Rows the capture's log says were written after the build read the table: inserted
    minus deleted, over the changes the build's snapshot did not see."""
    seen = sql.SQL("") if snapshot is None else sql.SQL(
        " where not pg_visible_in_snapshot(xid, {}::pg_snapshot)").format(sql.Literal(snapshot))
    return sql.SQL(
        "(select count(*) filter (where op = 'I') - count(*) filter (where op = 'D') from {}{})"
    ).format(sql.Identifier(log.schema, log.name), seen)


def _unique_index_concurrently(target: DedupTarget, live: LiveTable, server_version: int
                               ) -> tuple[list[Step], list[sql.Identifier]]:
    """The natural key's unique index (and partial ones for its NULLs) built on the live table
    without blocking writers, and the indexes that builds, which a failed build leaves
    INVALID; a leftover of an interrupted run is dropped first."""
    if live.partitioned:
        return _leaf_unique_indexes(target, live, server_version)
    live_id = sql.Identifier(live.relation.schema, live.relation.name)
    pending_index = pg_name(live.relation.name, "natural_key_new")
    built = [pending_index,
             *_null_key_names(target.spec, live, server_version, pending=True)]
    return [
        *_drop_pending(live.relation, built),
        Step("build the unique index without blocking writers",
             _unique_index(target.spec, live, pending_index, live_id, server_version,
                           concurrently=True)),
        *_null_key_indexes(target.spec, live, server_version, live_id, concurrently=True),
    ], [sql.Identifier(live.relation.schema, n) for n in built]


def _partitioning(live: LiveTable) -> str:
    return ("it is partitioned" if live.partitioned
            else f"it is a partition of {', '.join(live.parents)}")


def refuse_partitioned(spec: DedupSpec, live: LiveTable, server_version: int) -> None:
    """What keeps a partitioned table or a partition from being deduplicated: a swap, which
    would replace it with a plain table; a natural key that no unique constraint on a
    partitioned table can hold."""
    if not (live.partitioned or live.is_partition):
        return
    if spec.strategy == "swap":
        raise RunnerError(f"{live.relation}: {_partitioning(live)}, and a swap would put a plain "
                          "table in its place; set strategy: in_place or auto, which deduplicate "
                          "it where it is")
    if not live.partitioned:
        return
    where = f"{live.relation} is partitioned"
    if None in live.partition_key:
        raise RunnerError(f"{where} by an expression, which no unique constraint can hold: "
                          "declare each partition as a table of its own instead")
    missing = [c for c in live.partition_key if c not in spec.natural_key]
    if missing:
        raise RunnerError(f"{where} by ({', '.join(live.partition_key)}), and PostgreSQL's "
                          "unique constraint on a partitioned table must hold every column it "
                          f"is partitioned by: add {', '.join(missing)} to natural_key, or "
                          "declare each partition as a table of its own")
    if null_key_shapes(spec, {c.name for c in live.columns if c.not_null}, server_version):
        raise RunnerError(f"{where}, and its keys with a NULL would need partial unique indexes "
                          "(alternative_key, or nulls: not_distinct before PostgreSQL 15), which "
                          "runner swap does not yet build on partitions: declare each partition "
                          "as a table of its own, or make the key's columns NOT NULL")


def _leaf_unique_indexes(target: DedupTarget, live: LiveTable, server_version: int
                         ) -> tuple[list[Step], list[sql.Identifier]]:
    """A partitioned table's: each partition with rows gets the natural key's unique index,
    built without blocking writers, as a table of its own would; at the cut-over they become
    the partitions' constraints, which the partitioned table's constraint then takes in."""
    steps, built = [], []
    for leaf in live.leaves:
        name = pg_name(leaf.relation.name, "natural_key_new")
        built.append(sql.Identifier(leaf.relation.schema, name))
        steps += [*_drop_pending(leaf.relation, [name]), Step(
            f"build the unique index of partition {leaf.relation} without blocking writers",
            _unique_index(target.spec, live, name, _table(leaf.relation),
                          server_version, concurrently=True))]
    return steps, built


def _table(relation: Relation) -> sql.Identifier:
    return sql.Identifier(relation.schema, relation.name)


def _partition_constraints(target: DedupTarget, live: LiveTable,
                           server_version: int) -> list[Step]:
    """Each partition's index becomes its constraint; then the partitioned table's constraint,
    added, takes theirs in as its own (and, through them, those of the levels between) without
    building an index."""
    key = sql.SQL(", ").join(sql.Identifier(c) for c in target.spec.natural_key)
    nulls = sql.SQL(" nulls not distinct" if _nulls_not_distinct(target.spec, live,
                                                                 server_version) else "")
    return [
        *(Step(f"the index of partition {leaf.relation} becomes its constraint",
               sql.SQL("alter table {} add constraint {} unique using index {}").format(
                   _table(leaf.relation),
                   sql.Identifier(constraint_name(leaf.relation.name)),
                   sql.Identifier(pg_name(leaf.relation.name, "natural_key_new"))))
          for leaf in live.leaves),
        Step("the natural key's constraint, made of the partitions' own",
             sql.SQL("alter table {} add constraint {} unique{} ({})").format(
                 _table(live.relation),
                 sql.Identifier(constraint_name(live.relation.name)), nulls, key)),
    ]


def _index_becomes_constraint(target: DedupTarget, live: LiveTable,
                              server_version: int) -> list[Step]:
    if live.partitioned:
        return _partition_constraints(target, live, server_version)
    live_id = sql.Identifier(live.relation.schema, live.relation.name)
    return [
        Step("the index becomes the natural key's constraint",
             sql.SQL("alter table {} add constraint {} unique using index {}").format(
                 live_id, sql.Identifier(constraint_name(live.relation.name)),
                 sql.Identifier(pg_name(live.relation.name, "natural_key_new")))),
        *_null_key_indexes_taken(target.spec, live, server_version),
    ]


def _constraint_only(target: DedupTarget, live: LiveTable, counts: BuildCounts,
                     archive_schema: str, captured: capture.Capture | None,
                     server_version: int) -> TablePlan:
    """No duplicates, but nothing enforces the key: build its index concurrently, then make it
    the constraint; the table is never replaced."""
    name = constraint_name(live.relation.name)
    rows = sql.SQL("{} + {}").format(sql.Literal(counts.rows),
                                     _unseen_rows(captured.log, counts.snapshot)
                                     ) if captured else sql.Literal(counts.rows)
    concurrent, built = _unique_index_concurrently(target, live, server_version)
    return TablePlan(
        target, "constraint", counts, constraint=name, capture=captured,
        built_concurrently=built, concurrent=concurrent,
        cutover=[
            *_index_becomes_constraint(target, live, server_version),
            Step(f"record the swap of {live.relation}, with its rows at commit", swap_log.entry(
                archive_schema=archive_schema, live=live.relation, action="constraint",
                archive=None, constraint=name, rows_before=rows, rows_after=rows,
                tiebreaker=target.spec.tiebreaker, backfilled=[], foreign_keys=[],
                triggers=[], sequences_not_owned=_sequences_not_owned(live))),
            *_end_capture(captured),
        ],
    )


def _end_capture(captured: capture.Capture | None) -> list[Step]:
    if captured is None:
        return []
    return [Step("the change capture ends with the swap", statement)
            for statement in capture.remove(captured, captured.live)]


def plan_table(target: DedupTarget, live: LiveTable, counts: BuildCounts, stamp: datetime,
               archive_schema: str, captured: capture.Capture | None,
               swapped_since_build: bool = False,
               server_version: int = NULLS_NOT_DISTINCT_VERSION,
               rows_moved: bool = False, swapped: frozenset[Relation] = frozenset(),
               references_captured: frozenset[str] = frozenset(),
               kept_rows_copied: bool = True, in_place_started: bool = False) -> TablePlan:
    """The plan for one table. `captured`: its change capture from before the build, if in
    place; `swapped_since_build`: a swap the build did not see replaced the table already;
    `rows_moved`: the capture saw the ETL delete or re-key rows; `swapped`: the tables the
    run replaces; `references_captured`: the foreign keys pointing at it whose writes are
    captured; `kept_rows_copied`: the build wrote its kept rows as a table, not a view;
    `in_place_started`: an in-place run began and did not finish, which only in place ends."""
    pending = {pg_name(live.relation.name, "natural_key_new"),
               *null_key_index_names(live.relation.name, pending=True)}
    lookup = _lookup_name(live.relation)
    leftover = [index for index in live.indexes if index.name in pending]
    lookup_left = next((index for index in live.indexes if index.name == lookup), None)
    # The indexes an interrupted run left enforce the key, but they are not the constraint
    # yet: they are dropped and built again. Neither they nor the swap's own lookup index are
    # the table's.
    live = dataclasses.replace(live, indexes=tuple(i for i in live.indexes
                                                   if i.name not in pending | {lookup}))
    if live.enforcing_index(target.spec) is not None and (
            counts.duplicates == 0 or swapped_since_build):
        return TablePlan(target, "nothing", counts, capture=captured,
                         cutover=_end_capture(captured))
    refuse_partitioned(target.spec, live, server_version)
    if counts.duplicates == 0 and not in_place_started:
        # The table is never replaced: only what no strategy handles stops it.
        refuse_unsupported(live, in_place=True)
        return _constraint_only(target, live, counts, archive_schema, captured, server_version)
    strategy, why = choose_strategy(target.spec, counts, live, in_place_started,
                                    kept_rows_copied)
    refuse_unsupported(live, in_place=strategy == "in_place")
    refuse_references(target.spec, live, swapped, references_captured, server_version,
                      in_place=strategy == "in_place")
    if captured is None:
        raise RunnerError(f"{live.relation} has no change capture: run `runner capture`, then "
                          "`dbt build`, then `runner swap`, so that no write between the build "
                          "and the swap is lost")
    if strategy == "in_place":
        planned = _in_place(target, live, counts, stamp, archive_schema, captured,
                            server_version, lookup_left)
    else:
        planned = _swap(target, live, counts, stamp, archive_schema, captured, server_version)
        planned.concurrent += _drop_pending(live.relation, [index.name for index in leftover])
        _plan_lookup(planned, live, lookup_left, rows_moved)
    planned.why = why
    return planned


def choose_strategy(spec: DedupSpec, counts: BuildCounts, live: LiveTable,
                    interrupted: bool, kept_rows_copied: bool = True) -> tuple[str, str]:
    """swap or in_place for a table with duplicates, and why, as `runner plan` says it.
    `interrupted`: an in-place run stopped before its cut-over, which only in place finishes;
    `kept_rows_copied`: the build wrote the kept rows as a table, which a swap needs."""
    if interrupted:
        if spec.strategy == "swap":
            raise RunnerError(f"an in-place run on {live.relation} stopped before it finished "
                              "(its archive of removed rows is there still), and its meta.dedup "
                              "now says strategy: swap; set strategy: in_place or auto, run "
                              "`runner swap` to finish it, then swap if you still want to")
        return "in_place", "an in-place run stopped before it finished: this one finishes it"
    if live.partitioned or live.is_partition:
        return "in_place", f"{_partitioning(live)}, which only in place keeps as it is"
    if spec.any_copy:
        return "in_place", ("its meta.dedup says keep: any, whose equal copies only their place "
                            "in the table tells apart, which only in place keeps")
    if spec.strategy == "in_place":
        return "in_place", "its meta.dedup says strategy: in_place"
    if not kept_rows_copied:
        return "in_place", ("runner build chose it, and built the kept rows as a view, not a "
                            "copy")
    if spec.strategy == "swap":
        return "swap", "its meta.dedup says strategy: swap"
    if spec.nulls == "backfill":
        return "swap", "nulls: backfill gives kept rows new keys, which only a swap does"
    share = counts.duplicates / counts.rows
    if share <= IN_PLACE_UP_TO:
        return "in_place", (f"{share:.1%} of its rows are duplicates, at most "
                            f"{IN_PLACE_UP_TO:.0%}: removing them costs less than copying the "
                            "rest")
    return "swap", (f"{share:.1%} of its rows are duplicates, more than {IN_PLACE_UP_TO:.0%}: "
                    "copying the kept rows costs less than removing the rest")


def _in_place(target: DedupTarget, live: LiveTable, counts: BuildCounts, stamp: datetime,
              archive_schema: str, captured: capture.Capture, server_version: int,
              lookup_left: Index | None) -> TablePlan:
    """The removed rows leave the live table for an archive (runner.statements.in_place), then
    the table gets its constraint as one without duplicates does; it is never replaced."""
    work = InPlace.of(live, target.spec, archive_schema)
    archive = Relation(archive_schema, archive_name(live.relation.name, stamp))
    records = {r: r.dated(archive) for r in work.repointings}
    live_id = sql.Identifier(live.relation.schema, live.relation.name)
    concurrent, built = _unique_index_concurrently(target, live, server_version)
    plan = TablePlan(target, "in_place", counts, archive=archive,
                     constraint=constraint_name(live.relation.name), capture=captured,
                     concurrent=concurrent, built_concurrently=built, in_place=work,
                     fired_by_deletes=fired_by_deletes(live))
    looked_up = live.key_lookup_index(target.spec) is not None
    if live.partitioned and not looked_up:
        # A partitioned table's indexes cannot be built CONCURRENTLY: each partition's is.
        plan.lookup, plan.lookup_built = _leaf_lookup_indexes(target.spec, live)
    elif not looked_up and not (lookup_left and lookup_left.valid):
        plan.lookup = [
            *_drop_pending(live.relation, [lookup_left.name] if lookup_left else []),
            Step("an index on the natural key, for the guard to find a key's rows as each "
                 "lands, built without blocking writers",
                 sql.SQL("create index concurrently {} on {} ({})").format(
                     sql.Identifier(_lookup_name(live.relation)), live_id,
                     sql.SQL(", ").join(sql.Identifier(k) for k in target.spec.natural_key)))]
    plan.prepare = [
        *(Step(f"{live.relation}: {why}", check, check=True)
          for why, check in work.archive_proven(captured.log)),
        Step("the rows removed, counted before the lock", work.count_removed()),
    ]
    # The capture's log holds the ETL's writes since the build, not the run's own deletes
    # (capture.REMOVING_IN_PLACE), which the archive counts.
    rows_written = sql.SQL("{} + {}").format(sql.Literal(counts.rows),
                                             _unseen_rows(captured.log, counts.snapshot))
    rows_after = sql.SQL("{} - {}").format(rows_written, work.removed_rows())
    plan.cutover = [
        *_index_becomes_constraint(target, live, server_version),
        *(Step("the run's own index on the natural key goes: the constraint's serves",
               sql.SQL("drop index if exists {}").format(index))
          for index in (plan.lookup_built or [lookup_index(live.relation)])),
        Step("the removed rows are kept under a name that says what they are and when",
             sql.SQL("alter table {} rename to {}").format(
                 sql.Identifier(work.archive.schema, work.archive.name),
                 sql.Identifier(archive.name))),
        *(Step(f"the rows of {r.reference.table} moved to kept rows are recorded with the "
               "archive's date", statement) for r, (_, renames) in records.items()
          for statement in renames),
        Step(f"record the deduplication of {live.relation} in place, with its rows at commit",
             swap_log.entry(
                 archive_schema=archive_schema, live=live.relation, action="in_place",
                 archive=archive, constraint=plan.constraint,
                 rows_before=rows_written,
                 rows_after=rows_after, tiebreaker=target.spec.tiebreaker, backfilled=[],
                 foreign_keys=[], triggers=[], sequences_not_owned=_sequences_not_owned(live),
                 bytes_before=sql.SQL("pg_total_relation_size({}::regclass)").format(
                     sql.Literal(live_id.as_string())),
                 repointed=[swap_log.Repointed(r.reference, record.name)
                            for r, (record, _) in records.items()])),
        *_end_capture(captured),
    ]
    return plan


def _leaf_lookup_indexes(spec: DedupSpec, live: LiveTable
                         ) -> tuple[list[Step], list[sql.Identifier]]:
    """The run's own index on the natural key in each partition with rows, built without
    blocking writers (an interrupted run's is built again)."""
    steps, built = [], []
    for leaf in live.leaves:
        built.append(lookup_index(leaf.relation))
        steps += [*_drop_pending(leaf.relation, [_lookup_name(leaf.relation)]), Step(
            f"an index on the natural key of partition {leaf.relation}, for the guard to find "
            "a key's rows as each lands, built without blocking writers",
            sql.SQL("create index concurrently {} on {} ({})").format(
                sql.Identifier(_lookup_name(leaf.relation)),
                _table(leaf.relation),
                sql.SQL(", ").join(sql.Identifier(k) for k in spec.natural_key)))]
    return steps, built


def _lookup_name(table: Relation) -> str:
    return pg_name(table.name, "natural_key_lookup")


def lookup_index(table: Relation) -> sql.Identifier:
    """The index on a live table's natural key that a swap builds for itself."""
    return sql.Identifier(table.schema, _lookup_name(table))


def _plan_lookup(plan: TablePlan, live: LiveTable, left: Index | None,
                 rows_moved: bool) -> None:
    """Under the lock, a write that deleted or re-keyed a kept row needs the live rows of its
    key; without an index on the key that is a scan of the whole table, and the lock is given
    back for it. An ETL that only inserts never needs one. One that deletes or re-keys may
    keep doing so until every try ends that way: the swap builds an index of its own for it,
    without blocking writers, and drops it with the original's other belongings under the
    lock, so that the archived table is the original as it was."""
    if live.key_lookup_index(plan.target.spec) is not None:
        plan.rescan_under_lock = True
        return
    index = lookup_index(live.relation)
    if left is not None and not left.valid:
        plan.lookup.append(Step("an index an interrupted run left INVALID would block the name",
                                sql.SQL("drop index concurrently if exists {}").format(index)))
    if not (rows_moved or (left is not None and left.valid)):
        return
    if left is None or not left.valid:
        plan.lookup.append(Step(
            "the ETL deletes or re-keys rows: an index on the natural key lets the replay "
            "under the lock find a key's live rows, and is built without blocking writers",
            sql.SQL("create index concurrently {} on {} ({})").format(
                sql.Identifier(_lookup_name(live.relation)),
                sql.Identifier(live.relation.schema, live.relation.name),
                sql.SQL(", ").join(sql.Identifier(k) for k in plan.target.spec.natural_key))))
    plan.rescan_under_lock = True
    plan.cutover.insert(0, Step("the swap's own index on the natural key goes: the archive "
                                "keeps the original as it was",
                                sql.SQL("drop index {}").format(index)))


def pending_index(table: Relation) -> sql.Identifier:
    """The unique index a table with no duplicates gets before it becomes the constraint."""
    return sql.Identifier(table.schema, pg_name(table.name, "natural_key_new"))


def _drop_pending(relation: Relation, names: list[str]) -> list[Step]:
    return [Step("a leftover of an interrupted run would block the name",
                 sql.SQL("drop index concurrently if exists {}").format(
                     sql.Identifier(relation.schema, name)))
            for name in names]


def _swap(target: DedupTarget, live: LiveTable, counts: BuildCounts, stamp: datetime,
          archive_schema: str, captured: capture.Capture, server_version: int) -> TablePlan:
    schema = live.relation.schema
    shadow = Relation(schema, pg_name(live.relation.name, "dedup_new"))
    archive = Relation(archive_schema, archive_name(live.relation.name, stamp))
    plan = TablePlan(
        target, "swap", counts, archive=archive, constraint=constraint_name(live.relation.name),
        shadow=shadow, capture=captured,
        replay=capture.replay(target.spec, live.relation, shadow, captured.log, live.columns,
                              overriding=bool(live.identity_sequences),
                              snapshot=counts.snapshot,
                              most_rows_kept=2 * counts.keys >= counts.rows),
    )
    identity_prepare, identity_free, identity_take = _identity_steps(live, shadow, archive)
    index_prepare, index_free, index_take = _index_steps(live, shadow, archive)
    plan.parents = tuple(dict.fromkeys(parent for _, _, parent in live.foreign_keys))
    plan.materialized_views = tuple(view.relation for view in live.materialized_views)
    plan.repointings = tuple(
        repoint.Repointing.of(reference, live.relation, shadow, target.spec, live.columns,
                              archive) for reference in live.references)
    plan.prepare = [
        *_shadow_steps(live, shadow),
        *identity_prepare,
        *_fill_steps(target, live, shadow, server_version),
        *index_prepare,
        Step("statistics for the planner, gathered before the lock: a new table has none, and "
             "until autovacuum came by every query on it would be planned blind",
             sql.SQL("analyze {}").format(sql.Identifier(shadow.schema, shadow.name))),
    ]
    plan.cutover = [
        *_end_capture(captured),
        *_foreign_key_steps(live, shadow),
        *identity_free,
        *index_free,
        *(Step(f"{r.reference.shown} follows the original to the archive: it goes, and comes "
               "back against the new table", statement)
          for r in plan.repointings for statement in repoint.cutover(r, drop=True)),
        *_archive_steps(live, shadow, archive),
        Step("the new table takes the live name",
             sql.SQL("alter table {} rename to {}").format(
                 sql.Identifier(shadow.schema, shadow.name),
                 sql.Identifier(live.relation.name))),
        *(Step(f"{r.reference.shown} points at the new table, enforced from now on, its rows "
               "checked after the commit", statement)
          for r in plan.repointings for statement in repoint.cutover(r, drop=False)),
        *index_take,
        *_null_key_indexes_taken(target.spec, live, server_version),
        *identity_take,
        *_takeover_steps(live),
        _log_step(target, live, counts, archive, archive_schema, plan.repointings),
        *(Step("a change capture on the new table from the swap's own commit, so that a "
               "rollback knows every write made after it", statement)
          for statement in capture.install(capture.Capture.since_swap(live.relation, archive))),
    ]
    plan.validate = validate_steps(live.relation, [
        name for name, definition, _ in live.foreign_keys if not_valid(definition)[1]])
    for r in plan.repointings:
        if r.reference.validated:
            plan.validate += validate_steps(r.reference.table, [r.reference.constraint])
    return plan


def _shadow_steps(live: LiveTable, shadow: Relation) -> list[Step]:
    shadow_id = sql.Identifier(shadow.schema, shadow.name)
    return [
        Step("a leftover of an interrupted run would block the name",
             sql.SQL("drop table if exists {}").format(shadow_id)),
        Step("the new table: columns, defaults, NOT NULL, CHECK, storage, statistics, comments",
             sql.SQL("create table {shadow} (like {live} including all excluding indexes"
                     " excluding identity){opts}")
             .format(shadow=shadow_id,
                     live=sql.Identifier(live.relation.schema, live.relation.name),
                     opts=with_options(live.options))),
        # From its start: the sequences it will own must have its owner, and a job that acts
        # as the owner through membership would otherwise own it itself.
        Step("owned by the original's owner",
             sql.SQL("alter table {} owner to {}").format(
                 shadow_id, sql.Identifier(live.owner))),
    ]


def _identity_steps(live: LiveTable, shadow: Relation,
                    archive: Relation) -> tuple[list[Step], list[Step], list[Step]]:
    """Each identity column's sequence: built beside the new table, its name freed on the
    original under the lock, then taken, going on from where the original's was."""
    shadow_id = sql.Identifier(shadow.schema, shadow.name)
    prepare, free, take = [], [], []
    for sequence in live.identity_sequences:
        pending = pg_name(live.relation.name, "dedup_new", sequence.column, "seq")
        kind = next(c.identity for c in live.columns if c.name == sequence.column)
        prepare.append(Step(
            f"identity column {sequence.column}, its sequence under a temporary name",
            sql.SQL("alter table {shadow} alter column {col} add generated {kind} as identity"
                    " (sequence name {seq} increment by {inc} minvalue {min}"
                    " maxvalue {max} start with {start} cache {cache}{cycle})").format(
                shadow=shadow_id, col=sql.Identifier(sequence.column),
                kind=sql.SQL("always" if kind == "a" else "by default"),
                seq=sql.Identifier(shadow.schema, pending),
                inc=sql.Literal(sequence.increment), min=sql.Literal(sequence.minimum),
                max=sql.Literal(sequence.maximum), start=sql.Literal(sequence.start),
                cache=sql.Literal(sequence.cache),
                cycle=sql.SQL(" cycle" if sequence.cycle else ""))))
        archived = pg_name(archive.name, sequence.column, "seq")
        free.append(Step(
            f"free the name of sequence {sequence.name}",
            sql.SQL("alter sequence {} rename to {}").format(
                sql.Identifier(sequence.schema, sequence.name), sql.Identifier(archived))))
        take += [
            Step(f"sequence {sequence.name} keeps its name",
                 sql.SQL("alter sequence {} rename to {}").format(
                     sql.Identifier(shadow.schema, pending), sql.Identifier(sequence.name))),
            Step("and goes on from where the original's was",
                 sql.SQL("select setval({new}::regclass, s.last_value, s.is_called)"
                         " from {old} as s").format(
                     new=sql.Literal(sql.Identifier(sequence.schema, sequence.name)
                                     .as_string()),
                     old=sql.Identifier(archive.schema, archived))),
        ]
    return prepare, free, take


def _fill_steps(target: DedupTarget, live: LiveTable, shadow: Relation,
                server_version: int) -> list[Step]:
    shadow_id = sql.Identifier(shadow.schema, shadow.name)
    columns = sql.SQL(", ").join(sql.Identifier(c.name) for c in live.columns if not c.generated)
    # Rows keep their identity values: the inserts override what the column would generate.
    overriding = sql.SQL(" overriding system value" if live.identity_sequences else "")
    return [
        Step("where the swap counts the new table's rows, and the rows written since the build",
             sql.SQL("insert into pg_temp.{} (live) values ({})").format(
                 sql.Identifier(capture.COUNTS), capture.counts_key(live.relation))),
        Step("fill it with the rows dbt kept", capture.counted(live.relation, sql.SQL(
            "insert into {shadow} ({cols}){overriding} select {cols} from {built}").format(
                shadow=shadow_id, cols=columns, overriding=overriding,
                built=sql.Identifier(target.deduplicated.schema, target.deduplicated.name)))),
        Step("the natural key's unique index, built before the lock",
             _unique_index(target.spec, live, pg_name(live.relation.name, "natural_key_new"),
                           shadow_id, server_version)),
        *_null_key_indexes(target.spec, live, server_version, shadow_id),
    ]


def _index_steps(live: LiveTable, shadow: Relation,
                 archive: Relation) -> tuple[list[Step], list[Step], list[Step]]:
    """The live table's indexes and unique constraints: built on the new table under temporary
    names, the names freed on the original under the lock, then taken."""
    shadow_id = sql.Identifier(shadow.schema, shadow.name)
    live_id = sql.Identifier(live.relation.schema, live.relation.name)
    prepare, free, take = [], [], []
    for position, index in enumerate(live.indexes):
        pending = pg_name(live.relation.name, f"dedup_new_{position}")
        archived = pg_name(archive.name, f"{position}")
        if index.constraint:
            prepare.append(Step(
                f"rebuild {index.constraint} on the new table under a temporary name",
                sql.SQL("alter table {} add constraint {} {}").format(
                    shadow_id, sql.Identifier(pending), sql.SQL(index.constraint_definition))))
            free.append(Step(
                f"free the name {index.constraint} in the live schema",
                sql.SQL("alter table {} rename constraint {} to {}").format(
                    live_id, sql.Identifier(index.constraint), sql.Identifier(archived))))
            take.append(Step(
                f"{index.constraint} keeps its name",
                sql.SQL("alter table {} rename constraint {} to {}").format(
                    live_id, sql.Identifier(pending), sql.Identifier(index.constraint))))
            continue
        if not index.method.startswith("USING "):
            raise RunnerError(f"cannot read the definition of index {index.name} on "
                              f"{live.relation}: recreate it by hand after the swap")
        prepare.append(Step(
            f"rebuild index {index.name} on the new table under a temporary name",
            sql.SQL("create {unique}index {name} on {shadow} {method}").format(
                unique=sql.SQL("unique " if index.unique else ""),
                name=sql.Identifier(pending), shadow=shadow_id, method=sql.SQL(index.method))))
        free.append(Step(
            f"free the name {index.name} in the live schema",
            sql.SQL("alter index {} rename to {}").format(
                sql.Identifier(live.relation.schema, index.name), sql.Identifier(archived))))
        take.append(Step(
            f"{index.name} keeps its name",
            sql.SQL("alter index {} rename to {}").format(
                sql.Identifier(live.relation.schema, pending), sql.Identifier(index.name))))
    take.append(Step(
        "the natural key's constraint, from the index built before the lock",
        sql.SQL("alter table {} add constraint {} unique using index {}").format(
            live_id, sql.Identifier(constraint_name(live.relation.name)),
            sql.Identifier(pg_name(live.relation.name, "natural_key_new")))))
    return prepare, free, take


def not_valid(definition: str) -> tuple[str, bool]:
    """A foreign key's definition to add NOT VALID, and whether it was validated before."""
    suffix = " NOT VALID"
    if definition.endswith(suffix):
        return definition[: -len(suffix)], False
    return definition, True


def _foreign_key_steps(live: LiveTable, shadow: Relation) -> list[Step]:
    # NOT VALID: checking the rows would hold the parents' lock, taken with the live table's,
    # for a scan; they are checked after the commit, without blocking writers.
    return [Step(f"foreign key {name}, enforced from now on, its rows checked after the commit",
                 sql.SQL("alter table {} add constraint {} {} not valid").format(
                     sql.Identifier(shadow.schema, shadow.name), sql.Identifier(name),
                     sql.SQL(not_valid(definition)[0])))
            for name, definition, _ in live.foreign_keys]


def left_to_validate(live: LiveTable, latest: swap_log.LogEntry | None) -> list[Step]:
    """The foreign keys that the latest swap of `live`, or its rollback, added NOT VALID to be
    checked after its commit, and that a run stopped before that left unchecked: those the
    original had validated (its keys are the new table's, and the restored table's again)."""
    if latest is None or latest.action != "swap":
        return []
    validated_before = {key.name for key in latest.archive_foreign_keys
                        if not_valid(key.definition)[1]}
    repointed_before = {r.reference.named_by for r in latest.repointed
                        if r.reference.validated}
    return [*validate_steps(live.relation, [
        name for name, definition, _ in live.foreign_keys
        if name in validated_before and not not_valid(definition)[1]]),
            *(step for reference in live.references
              if reference.named_by in repointed_before
              and not reference.validated
              for step in validate_steps(reference.table, [reference.constraint]))]


def validate_steps(table: Relation, foreign_keys: list[str]) -> list[Step]:
    return [Step(f"foreign key {name} of {table}, checked without blocking writers",
                 sql.SQL("alter table {} validate constraint {}").format(
                     sql.Identifier(table.schema, table.name), sql.Identifier(name)))
            for name in foreign_keys]


def own_triggers(live: LiveTable) -> list[Trigger]:
    """The live table's triggers but the change capture's."""
    return [t for t in live.triggers if t.name not in capture.TRIGGERS]


def fired_by_deletes(live: LiveTable) -> tuple[str, ...]:
    """The table's own triggers that a DELETE in the runner's sessions fires: in place removes
    the duplicates by DELETE, and each fires once for each."""
    return tuple(t.name for t in own_triggers(live)
                 if t.fires_on_delete and t.enabled in ("O", "A"))


def said_of_deletes(triggers: tuple[str, ...]) -> str:
    return (f"its own trigger{'s' if len(triggers) > 1 else ''} {', '.join(triggers)} "
            f"{'fire' if len(triggers) > 1 else 'fires'} on DELETE, as in place removes each "
            "duplicate (a swap fires none)")


def _firing_triggers(live: LiveTable) -> list[swap_log.ArchivedTrigger]:
    """The live table's own triggers (not the capture's), with how each is enabled."""
    return [swap_log.ArchivedTrigger(t.name, t.enabled) for t in own_triggers(live)]


def _archive_steps(live: LiveTable, shadow: Relation, archive: Relation) -> list[Step]:
    """The original moves to the archive untouched, every row of it, and from then on
    constrains and fires nothing: no foreign key of its holds a parent row, no trigger of
    its runs, no publication sends it. What it gave up is in swap_log, for a rollback."""
    live_id = sql.Identifier(live.relation.schema, live.relation.name)
    archive_id = sql.Identifier(archive.schema, archive.name)
    return [
        # Before the move: ALTER TABLE ... SET SCHEMA takes the sequences a table owns along.
        *(Step(f"sequence {seq} stays with the table it numbers, and in its schema",
               sql.SQL("alter sequence {} owned by {}.{}").format(
                   sql.Identifier(seq_schema, seq), sql.Identifier(shadow.schema, shadow.name),
                   sql.Identifier(column)))
          for seq_schema, seq, column, identity in live.owned_sequences if not identity),
        *(Step(f"publication {publication} publishes the new table, not the original",
               sql.SQL("alter publication {} drop table {}").format(
                   sql.Identifier(publication), live_id))
          for publication in live.publications),
        Step("keep the original table, every row of it, in the archive schema",
             sql.SQL("alter table {} set schema {}").format(
                 live_id, sql.Identifier(archive.schema))),
        Step("under a name that says what it is and when",
             sql.SQL("alter table {} rename to {}").format(
                 sql.Identifier(archive.schema, live.relation.name),
                 sql.Identifier(archive.name))),
        *(Step(f"the archive holds no parent row: foreign key {name} goes (swap_log keeps it)",
               sql.SQL("alter table {} drop constraint {}").format(
                   archive_id, sql.Identifier(name)))
          for name, _, _ in live.foreign_keys),
        *(Step(f"the archive fires nothing: trigger {trigger.name} is disabled (swap_log "
               "keeps how it was)",
               sql.SQL("alter table {} disable trigger {}").format(
                   archive_id, sql.Identifier(trigger.name)))
          for trigger in _firing_triggers(live) if trigger.enabled != "D"),
    ]


def _takeover_steps(live: LiveTable) -> list[Step]:
    """Under the live name, the new table gets what else made the original what it was."""
    live_id = sql.Identifier(live.relation.schema, live.relation.name)
    steps = [_grant(grant, live_id, live.relation) for grant in live.grants]
    if live.comment is not None:
        steps.append(Step("same comment", sql.SQL("comment on table {} is {}").format(
            live_id, sql.Literal(live.comment))))
    steps += [_grant(grant, live_id, live.relation) for grant in live.column_grants]
    if live.replica_identity in ("f", "n"):
        steps.append(Step("same replica identity", sql.SQL(
            "alter table {} replica identity {}").format(
                live_id, sql.SQL("full" if live.replica_identity == "f" else "nothing"))))
    if live.replica_identity == "i" and live.replica_identity_index:
        steps.append(Step("same replica identity", sql.SQL(
            "alter table {} replica identity using index {}").format(
                live_id, sql.Identifier(live.replica_identity_index))))
    if live.row_security:
        steps.append(Step("same row-level security", sql.SQL(
            "alter table {} enable row level security").format(live_id)))
    if live.force_row_security:
        steps.append(Step("row-level security binds the owner too", sql.SQL(
            "alter table {} force row level security").format(live_id)))
    commands = {"*": "all", "r": "select", "a": "insert", "w": "update", "d": "delete"}
    for policy in live.policies:
        roles = sql.SQL(", ").join(
            sql.Identifier(role) if role else sql.SQL("public") for role in policy.roles)
        steps.append(Step(f"policy {policy.name}", sql.SQL(
            "create policy {name} on {live} as {kind} for {command} to {roles}{using}{check}"
        ).format(
            name=sql.Identifier(policy.name), live=live_id,
            kind=sql.SQL("permissive" if policy.permissive else "restrictive"),
            command=sql.SQL(commands[policy.command]), roles=roles,
            using=sql.SQL(" using ({})").format(sql.SQL(policy.using))
            if policy.using else sql.SQL(""),
            check=sql.SQL(" with check ({})").format(sql.SQL(policy.with_check))
            if policy.with_check else sql.SQL(""))))
    for trigger in own_triggers(live):
        # Created last, so that none fires while the runner copies and replays rows.
        steps.append(Step(f"trigger {trigger.name}", sql.SQL(trigger.definition)))
        enablement = {"D": "disable trigger", "R": "enable replica trigger",
                      "A": "enable always trigger"}.get(trigger.enabled)
        if enablement:
            steps.append(Step(f"trigger {trigger.name} as it was set", sql.SQL(
                "alter table {} {} {}").format(live_id, sql.SQL(enablement),
                                              sql.Identifier(trigger.name))))
    steps += [Step(f"publication {publication}", sql.SQL(
        "alter publication {} add table {}").format(sql.Identifier(publication), live_id))
        for publication in live.publications]
    steps += [recreate_view(view, f"view {view.relation} reads the new table")
              for view in live.views]
    return steps + recreate_materialized_views(live, "the new table")


def _log_step(target: DedupTarget, live: LiveTable, counts: BuildCounts, archive: Relation,
              archive_schema: str, repointings: tuple[repoint.Repointing, ...]) -> Step:
    """The swap's record, with the rows true at commit: the build's rows and those the capture
    says were written since, and the new table's rows as the swap counted them."""
    counted = sql.SQL("(select {} from pg_temp.{} where live = {})")
    key = capture.counts_key(live.relation)
    return Step(
        f"record the swap of {live.relation}, with its rows at commit",
        swap_log.entry(
            archive_schema=archive_schema, live=live.relation, action="swap", archive=archive,
            constraint=constraint_name(live.relation.name),
            rows_before=sql.SQL("{} + {}").format(
                sql.Literal(counts.rows),
                counted.format(sql.Identifier("unseen_rows"), sql.Identifier(capture.COUNTS),
                               key)),
            rows_after=counted.format(sql.Identifier("kept_rows"),
                                      sql.Identifier(capture.COUNTS), key),
            tiebreaker=target.spec.tiebreaker,
            backfilled=[c.name for c in capture.backfilled(target.spec, live.columns)],
            foreign_keys=[swap_log.ArchivedForeignKey(name, definition)
                          for name, definition, _ in live.foreign_keys],
            triggers=_firing_triggers(live),
            sequences_not_owned=_sequences_not_owned(live),
            repointed=[swap_log.Repointed(r.reference, r.record.name) for r in repointings]))


def _sequences_not_owned(live: LiveTable) -> list[tuple[str, str | None]]:
    return [(f"{s.schema}.{s.name}", s.owner) for s in live.numbering if not s.owned_here]


def referencing(plans: list[TablePlan]) -> list[Relation]:
    """The tables whose foreign keys the cut-over adds again against the new tables."""
    return list(dict.fromkeys(r.reference.table for plan in plans for r in plan.repointings))


def lock_statement(plans: list[TablePlan]) -> sql.Composed:
    """One LOCK for every table, so the runner never holds some while it queues for others."""
    tables = [*(p.target.live for p in plans), *referencing(plans)]
    return sql.SQL("lock table {} in access exclusive mode").format(sql.SQL(", ").join(
        sql.Identifier(table.schema, table.name) for table in dict.fromkeys(tables)))


def parents(plans: list[TablePlan]) -> list[Relation]:
    return sorted({parent for plan in plans for parent in plan.parents},
                  key=lambda parent: (parent.schema, parent.name))


def parents_lock_statement(plans: list[TablePlan]) -> sql.Composed:
    """The tables the new tables' foreign keys reference, kept from changing while the keys are
    added: their writers wait for the cut-over, their readers do not."""
    return sql.SQL("lock table {} in share row exclusive mode").format(sql.SQL(", ").join(
        sql.Identifier(parent.schema, parent.name) for parent in parents(plans)))
