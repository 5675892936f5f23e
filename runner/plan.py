"""The swap as a list of statements, built from facts alone: no database access here.

For each table that has duplicates, a shadow table is built beside the live one with everything
LIKE can copy, filled from dbt's deduplicated table, given the live table's indexes under
temporary names and proven equal to the live rows it keeps. Under the lock the live table moves
to the archive schema (nothing is copied: the original rows stay exactly as they were) and the
shadow takes its name, indexes, sequence, owner, grants, comment and dependent views.

`--dry-run` prints these statements; `runner.swap` runs them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from psycopg import sql

from runner import capture
from runner.artifacts import DedupTarget, Relation
from runner.catalog import ColumnGrant, Grant, LiveTable, View
from runner.errors import RunnerError
from runner.names import archive_name, constraint_name, pg_name

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

    @property
    def duplicates(self) -> int:
        return self.rows - self.keys


@dataclass
class TablePlan:
    target: DedupTarget
    action: str
    """swap, constraint (no duplicates, only the constraint is missing), or nothing."""
    counts: BuildCounts
    archive: Relation | None = None
    constraint: str = ""
    shadow: Relation | None = None
    capture: capture.Capture | None = None
    replay: capture.Replay | None = None
    """How to bring the new table up to date with the writes since the build."""
    parents: tuple[str, ...] = ()
    """Tables the new table's foreign keys reference: locked briefly as they are added."""
    concurrent: list[Step] = field(default_factory=list)
    """Run before the transaction, outside it: CREATE INDEX CONCURRENTLY cannot run inside one."""
    prepare: list[Step] = field(default_factory=list)
    """In the transaction, before the live table is locked."""
    cutover: list[Step] = field(default_factory=list)
    """In the transaction, under ACCESS EXCLUSIVE on the live table."""


def lock_timeout(milliseconds: int) -> sql.Composed:
    """How long this transaction waits for any lock before it gives up and tries again."""
    return sql.SQL("set local lock_timeout = {}").format(sql.Literal(f"{milliseconds}ms"))


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


def refuse_unsupported(live: LiveTable) -> None:
    """What this version cannot carry over to the new table: stop before changing anything."""
    name = str(live.relation)
    problems = []
    if live.kind != "r":
        problems.append("it is not a plain table (partitioned or foreign)")
    if live.referenced_by:
        # Rows of other tables may point at the duplicates the swap removes: moving them to the
        # kept row of the same key is a decision about their data, not a catalog copy.
        problems.append(f"foreign keys point at it ({', '.join(live.referenced_by)})")
    if live.materialized_views:
        problems.append(f"materialized views read it ({', '.join(live.materialized_views)})")
    if problems:
        raise RunnerError(f"runner swap cannot yet carry {name} over: {'; '.join(problems)}; "
                          "deduplicate it by hand or leave it out with --select")


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
                          ("keep", [entry.column for entry in target.spec.keep])):
        missing = [c for c in columns if c not in live.column_names()]
        if missing:
            raise RunnerError(f"{what} column(s) {missing} of {target.source} are not columns "
                              f"of {live.relation}: fix {what.replace(' ', '_')} in the dbt "
                              "YAML, or the table")


def _unique_index(target: DedupTarget, name: str, table: sql.Composable,
                  concurrently: bool = False) -> sql.Composed:
    return sql.SQL("create unique index {concurrently}{name} on {table} ({keys}){nulls}").format(
        concurrently=sql.SQL("concurrently " if concurrently else ""),
        name=sql.Identifier(name),
        table=table,
        keys=sql.SQL(", ").join(sql.Identifier(c) for c in target.spec.natural_key),
        nulls=sql.SQL(" nulls not distinct" if target.spec.nulls == "not_distinct" else ""),
    )


def plan_table(target: DedupTarget, live: LiveTable, counts: BuildCounts, stamp: datetime,
               archive_schema: str, captured_now: bool) -> TablePlan:
    """The plan for one table; `captured_now`: its change capture is in place."""
    spec = target.spec
    live_id = sql.Identifier(live.relation.schema, live.relation.name)
    name = constraint_name(live.relation.name)
    captured = capture.Capture.of(live.relation, archive_schema)
    stop_capture = [Step("the change capture ends with the swap", statement)
                    for statement in capture.remove(captured)] if captured_now else []
    if live.enforcing_index(spec) is not None and counts.duplicates == 0:
        return TablePlan(target, "nothing", counts, cutover=stop_capture)
    refuse_unsupported(live)
    pending_index = pg_name(live.relation.name, "natural_key_new")
    if counts.duplicates == 0:
        return TablePlan(
            target, "constraint", counts, constraint=name,
            concurrent=[
                Step("a leftover of an interrupted run would block the name",
                     sql.SQL("drop index concurrently if exists {}").format(
                         sql.Identifier(live.relation.schema, pending_index))),
                Step("build the unique index without blocking writers",
                     _unique_index(target, pending_index, live_id, concurrently=True)),
            ],
            cutover=[
                Step("the index becomes the natural key's constraint",
                     sql.SQL("alter table {} add constraint {} unique using index {}").format(
                         live_id, sql.Identifier(name), sql.Identifier(pending_index))),
                *stop_capture,
            ],
        )

    schema = live.relation.schema
    shadow = pg_name(live.relation.name, "dedup_new")
    shadow_id = sql.Identifier(schema, shadow)
    archive = Relation(archive_schema, archive_name(live.relation.name, stamp))
    insert_columns = sql.SQL(", ").join(
        sql.Identifier(c.name) for c in live.columns if not c.generated
    )
    options = with_options(live.options)

    # Rows keep their identity values: the inserts override what the column would generate.
    overriding = bool(live.identity_sequences)
    plan = TablePlan(
        target, "swap", counts, archive=archive, constraint=name,
        shadow=Relation(schema, shadow), capture=captured,
        replay=capture.replay(spec, live.relation, Relation(schema, shadow), captured.log,
                              Relation(archive_schema, kept_rows_name(archive.name)),
                              live.columns, overriding=overriding),
    )
    plan.prepare += [
        Step("a leftover of an interrupted run would block the name",
             sql.SQL("drop table if exists {}").format(shadow_id)),
        Step("the new table: columns, defaults, NOT NULL, CHECK, storage, statistics, comments",
             sql.SQL("create table {shadow} (like {live} including all excluding indexes"
                     " excluding identity){opts}")
             .format(shadow=shadow_id, live=live_id, opts=options)),
    ]
    seq_renames = []
    for sequence in live.identity_sequences:
        pending_seq = pg_name(live.relation.name, "dedup_new", sequence.column, "seq")
        plan.prepare.append(Step(
            f"identity column {sequence.column}, its sequence under a temporary name",
            sql.SQL("alter table {shadow} alter column {col} add generated {kind} as identity"
                    " (sequence name {seq} increment by {inc} minvalue {min}"
                    " maxvalue {max} start with {start} cache {cache}{cycle})").format(
                shadow=shadow_id, col=sql.Identifier(sequence.column),
                kind=sql.SQL("always" if next(
                    c.identity for c in live.columns if c.name == sequence.column) == "a"
                    else "by default"),
                seq=sql.Identifier(schema, pending_seq),
                inc=sql.Literal(sequence.increment), min=sql.Literal(sequence.minimum),
                max=sql.Literal(sequence.maximum), start=sql.Literal(sequence.start),
                cache=sql.Literal(sequence.cache),
                cycle=sql.SQL(" cycle" if sequence.cycle else ""))))
        archived_seq = pg_name(archive.name, sequence.column, "seq")
        plan.cutover.append(Step(
            f"free the name of sequence {sequence.name}",
            sql.SQL("alter sequence {} rename to {}").format(
                sql.Identifier(sequence.schema, sequence.name), sql.Identifier(archived_seq))))
        seq_renames += [
            Step(f"sequence {sequence.name} keeps its name",
                 sql.SQL("alter sequence {} rename to {}").format(
                     sql.Identifier(schema, pending_seq), sql.Identifier(sequence.name))),
            Step("and goes on from where the original's was",
                 sql.SQL("select setval({new}::regclass, s.last_value, s.is_called)"
                         " from {old} as s").format(
                     new=sql.Literal(sql.Identifier(sequence.schema, sequence.name)
                                     .as_string()),
                     old=sql.Identifier(archive_schema, archived_seq))),
        ]
    plan.prepare += [
        Step("fill it with the rows dbt kept",
             sql.SQL("insert into {shadow} ({cols}){overriding} select {cols} from {built}")
             .format(shadow=shadow_id, cols=insert_columns,
                     overriding=sql.SQL(" overriding system value" if overriding else ""),
                     built=sql.Identifier(target.deduplicated.schema, target.deduplicated.name))),
        Step("the natural key's unique index, built before the lock",
             _unique_index(target, pending_index, shadow_id)),
        Step("which rows are kept, so a rollback can tell a row deleted after the swap from a "
             "duplicate the swap removed; each replay keeps it up to date",
             sql.SQL("create table {} as select {} from {}").format(
                 sql.Identifier(archive_schema, kept_rows_name(archive.name)),
                 sql.SQL(", ").join(sql.Identifier(c) for c in
                                    capture.kept_record_columns(spec, live.columns)),
                 shadow_id)),
    ]
    renames = []
    for position, index in enumerate(live.indexes):
        pending = pg_name(live.relation.name, f"dedup_new_{position}")
        archived = pg_name(archive.name, f"{position}")
        if index.constraint:
            plan.prepare.append(Step(
                f"rebuild {index.constraint} on the new table under a temporary name",
                sql.SQL("alter table {} add constraint {} {}").format(
                    shadow_id, sql.Identifier(pending), sql.SQL(index.constraint_definition))))
            plan.cutover.append(Step(
                f"free the name {index.constraint} in the live schema",
                sql.SQL("alter table {} rename constraint {} to {}").format(
                    live_id, sql.Identifier(index.constraint), sql.Identifier(archived))))
            renames.append(Step(
                f"{index.constraint} keeps its name",
                sql.SQL("alter table {} rename constraint {} to {}").format(
                    live_id, sql.Identifier(pending), sql.Identifier(index.constraint))))
        else:
            if not index.method.startswith("USING "):
                raise RunnerError(f"cannot read the definition of index {index.name} on "
                                  f"{live.relation}: recreate it by hand after the swap")
            plan.prepare.append(Step(
                f"rebuild index {index.name} on the new table under a temporary name",
                sql.SQL("create {unique}index {name} on {shadow} {method}").format(
                    unique=sql.SQL("unique " if index.unique else ""),
                    name=sql.Identifier(pending), shadow=shadow_id,
                    method=sql.SQL(index.method))))
            plan.cutover.append(Step(
                f"free the name {index.name} in the live schema",
                sql.SQL("alter index {} rename to {}").format(
                    sql.Identifier(schema, index.name), sql.Identifier(archived))))
            renames.append(Step(
                f"{index.name} keeps its name",
                sql.SQL("alter index {} rename to {}").format(
                    sql.Identifier(schema, pending), sql.Identifier(index.name))))
    plan.parents = tuple(sorted({parent for _, _, parent in live.foreign_keys}))
    for fk_name, definition, _ in live.foreign_keys:
        plan.prepare.append(Step(
            f"foreign key {fk_name}, validated on the few kept rows",
            sql.SQL("alter table {} add constraint {} {}").format(
                shadow_id, sql.Identifier(fk_name), sql.SQL(definition))))

    plan.prepare.append(Step(
        "statistics for the planner, gathered before the lock: a new table has none, and "
        "until autovacuum came by every query on it would be planned blind",
        sql.SQL("analyze {}").format(shadow_id)))

    plan.cutover[:0] = stop_capture
    plan.cutover += [
        Step(f"sequence {seq} stays with the table it numbers",
             sql.SQL("alter sequence {} owned by {}.{}").format(
                 sql.Identifier(seq_schema, seq), shadow_id, sql.Identifier(column)))
        for seq_schema, seq, column, identity in live.owned_sequences if not identity
    ]
    plan.cutover += [
        Step(f"publication {publication} publishes the new table, not the original",
             sql.SQL("alter publication {} drop table {}").format(
                 sql.Identifier(publication), live_id))
        for publication in live.publications
    ]
    plan.cutover += [
        Step("keep the original table, every row of it, in the archive schema",
             sql.SQL("alter table {} set schema {}").format(
                 live_id, sql.Identifier(archive_schema))),
        Step("under a name that says what it is and when",
             sql.SQL("alter table {} rename to {}").format(
                 sql.Identifier(archive_schema, live.relation.name),
                 sql.Identifier(archive.name))),
        Step("the new table takes the live name",
             sql.SQL("alter table {} rename to {}").format(
                 shadow_id, sql.Identifier(live.relation.name))),
        *renames,
        *seq_renames,
        Step("the natural key's constraint, from the index built before the lock",
             sql.SQL("alter table {} add constraint {} unique using index {}").format(
                 live_id, sql.Identifier(name), sql.Identifier(pending_index))),
        Step("same owner",
             sql.SQL("alter table {} owner to {}").format(live_id, sql.Identifier(live.owner))),
    ]
    plan.cutover += [_grant(grant, live_id, live.relation) for grant in live.grants]
    if live.comment is not None:
        plan.cutover.append(Step("same comment", sql.SQL("comment on table {} is {}").format(
            live_id, sql.Literal(live.comment))))
    plan.cutover += [_grant(grant, live_id, live.relation) for grant in live.column_grants]
    if live.replica_identity in ("f", "n"):
        plan.cutover.append(Step("same replica identity", sql.SQL(
            "alter table {} replica identity {}").format(
                live_id, sql.SQL("full" if live.replica_identity == "f" else "nothing"))))
    if live.replica_identity == "i" and live.replica_identity_index:
        plan.cutover.append(Step("same replica identity", sql.SQL(
            "alter table {} replica identity using index {}").format(
                live_id, sql.Identifier(live.replica_identity_index))))
    if live.row_security:
        plan.cutover.append(Step("same row-level security", sql.SQL(
            "alter table {} enable row level security").format(live_id)))
    if live.force_row_security:
        plan.cutover.append(Step("row-level security binds the owner too", sql.SQL(
            "alter table {} force row level security").format(live_id)))
    commands = {"*": "all", "r": "select", "a": "insert", "w": "update", "d": "delete"}
    for policy in live.policies:
        roles = sql.SQL(", ").join(
            sql.Identifier(role) if role else sql.SQL("public") for role in policy.roles)
        plan.cutover.append(Step(f"policy {policy.name}", sql.SQL(
            "create policy {name} on {live} as {kind} for {command} to {roles}{using}{check}"
        ).format(
            name=sql.Identifier(policy.name), live=live_id,
            kind=sql.SQL("permissive" if policy.permissive else "restrictive"),
            command=sql.SQL(commands[policy.command]), roles=roles,
            using=sql.SQL(" using ({})").format(sql.SQL(policy.using))
            if policy.using else sql.SQL(""),
            check=sql.SQL(" with check ({})").format(sql.SQL(policy.with_check))
            if policy.with_check else sql.SQL(""))))
    for trigger in live.triggers:
        if trigger.name == capture.TRIGGER:
            continue
        # Created last, so that none fires while the runner copies and replays rows.
        plan.cutover.append(Step(f"trigger {trigger.name}", sql.SQL(trigger.definition)))
        enablement = {"D": "disable trigger", "R": "enable replica trigger",
                      "A": "enable always trigger"}.get(trigger.enabled)
        if enablement:
            plan.cutover.append(Step(f"trigger {trigger.name} as it was set", sql.SQL(
                "alter table {} {} {}").format(live_id, sql.SQL(enablement),
                                              sql.Identifier(trigger.name))))
    for publication in live.publications:
        plan.cutover.append(Step(f"publication {publication}", sql.SQL(
            "alter publication {} add table {}").format(sql.Identifier(publication), live_id)))
    plan.cutover += [recreate_view(view, f"view {view.relation} reads the new table")
                     for view in live.views]
    return plan


SWAP_LOG = "swap_log"


def kept_rows_name(archive: str) -> str:
    """The table of the tie-breakers the swap kept, beside the archive."""
    return pg_name(archive, "kept")


def log_table(archive_schema: str) -> sql.Composed:
    return sql.SQL(
        "create table if not exists {} ("
        "swapped_at timestamptz not null default now(), live_schema text not null,"
        " live_table text not null, action text not null, archive_table text,"
        " constraint_name text not null, rows_before bigint not null, rows_after bigint not null,"
        " bytes_before bigint not null, bytes_after bigint not null,"
        " rolled_back_at timestamptz, rolled_back_table text, cleaned_at timestamptz)"
    ).format(sql.Identifier(archive_schema, SWAP_LOG))


def log_entry(plan: TablePlan, archive_schema: str) -> sql.Composed:
    live = plan.target.live
    live_id = sql.Identifier(live.schema, live.name)
    before = (
        sql.SQL("pg_total_relation_size({}::regclass)").format(sql.Literal(
            sql.Identifier(plan.archive.schema, plan.archive.name).as_string()))
        if plan.archive else sql.SQL("pg_total_relation_size({}::regclass)").format(
            sql.Literal(live_id.as_string()))
    )
    return sql.SQL(
        "insert into {log} (live_schema, live_table, action, archive_table, constraint_name,"
        " rows_before, rows_after, bytes_before, bytes_after)"
        " values ({schema}, {table}, {action}, {archive}, {constraint}, {before_rows},"
        " {after_rows}, {before}, pg_total_relation_size({live}::regclass))"
    ).format(
        log=sql.Identifier(archive_schema, SWAP_LOG),
        schema=sql.Literal(live.schema), table=sql.Literal(live.name),
        action=sql.Literal(plan.action),
        archive=sql.Literal(plan.archive.name if plan.archive else None),
        constraint=sql.Literal(plan.constraint),
        before_rows=sql.Literal(plan.counts.rows), after_rows=sql.Literal(plan.counts.keys),
        before=before, live=sql.Literal(live_id.as_string()),
    )


def lock_statement(plans: list[TablePlan]) -> sql.Composed:
    """One LOCK for every table, so the runner never holds some while it queues for others."""
    return sql.SQL("lock table {} in access exclusive mode").format(sql.SQL(", ").join(
        sql.Identifier(p.target.live.schema, p.target.live.name) for p in plans))
