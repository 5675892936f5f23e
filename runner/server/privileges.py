"""What a command must be allowed to do, asked of the server before it changes anything.

Without the check, a command that lacks a privilege fails at the first statement that needs
it: after a capture has started on some tables, or with a lock held and a new table half
built. Each need is a boolean the server evaluates for the role the runner logs in as, and the
statement that would grant it, quoted by the server; a command's needs are asked in one query.

The job's role acts as each table's owner: a member of the owner role (with INHERIT), or the
owner itself. Only an owner may rename, replace and drop a table, and add a trigger that every
writer fires; the README's "Roles" section lists the grants.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import psycopg
from psycopg import sql

from runner.declaration.artifacts import Relation
from runner.errors import RunnerError


@dataclass(frozen=True)
class Need:
    what: str
    held: sql.Composable
    """A boolean expression: true when the current role has it."""
    remedy: sql.Composable
    """A text expression: the statement that gives it."""


def _oid(relation: Relation) -> sql.Composed:
    """The relation's OID, found by name in the catalog, which any role may read (a regclass
    cast would ask for USAGE on its schema first); NULL when there is no such relation."""
    return sql.SQL(
        "(select c.oid from pg_catalog.pg_class as c join pg_catalog.pg_namespace as n"
        " on n.oid = c.relnamespace where n.nspname = {} and c.relname = {})").format(
            sql.Literal(relation.schema), sql.Literal(relation.name))


def _owner(relation: Relation) -> sql.Composed:
    return sql.SQL("(select relowner from pg_catalog.pg_class where oid = {})").format(
        _oid(relation))


def act_as_owner(relation: Relation) -> Need:
    return Need(
        f"to act as the owner of {relation}",
        sql.SQL("pg_catalog.pg_has_role({}, 'USAGE')").format(_owner(relation)),
        sql.SQL("format('grant %I to %I', pg_catalog.pg_get_userbyid({}), current_user)")
        .format(_owner(relation)))


def owner_creates_in(relation: Relation) -> Need:
    """The new table takes the live table's owner, which must be able to own one there."""
    return Need(
        f"the owner of {relation} to have CREATE on schema {relation.schema}",
        sql.SQL("pg_catalog.has_schema_privilege({}, {}, 'CREATE')").format(
            _owner(relation), sql.Literal(relation.schema)),
        sql.SQL("format('grant create on schema %I to %I', {}::text,"
                " pg_catalog.pg_get_userbyid({}))").format(
            sql.Literal(relation.schema), _owner(relation)))


def create_in(schema: str) -> Need:
    return Need(
        f"CREATE on schema {schema}",
        sql.SQL("pg_catalog.has_schema_privilege({}, 'CREATE')").format(sql.Literal(schema)),
        sql.SQL("format('grant create on schema %I to %I', {}::text, current_user)").format(
            sql.Literal(schema)))


def archive_schema(schema: str) -> Need:
    """The schema the runner keeps its archives and logs in: USAGE and CREATE on it, or, while
    there is none, CREATE on the database to make it."""
    there = sql.SQL("exists (select from pg_catalog.pg_namespace where nspname = {})").format(
        sql.Literal(schema))
    return Need(
        f"USAGE and CREATE on schema {schema} (or CREATE on the database, to make it)",
        sql.SQL("case when {there} then pg_catalog.has_schema_privilege({s}, 'USAGE, CREATE')"
                " else pg_catalog.has_database_privilege(current_database(), 'CREATE') end")
        .format(there=there, s=sql.Literal(schema)),
        sql.SQL("case when {there} then format('grant usage, create on schema %I to %I',"
                " {s}::text, current_user) else format('grant create on database %I to %I',"
                " current_database(), current_user) end").format(
            there=there, s=sql.Literal(schema)))


def reference(parent: Relation) -> Need:
    """A foreign key to `parent` is added (REFERENCES) under a lock on it that keeps its rows
    as they are for that moment (LOCK TABLE asks UPDATE, DELETE or TRUNCATE for it)."""
    return Need(
        f"REFERENCES and UPDATE on {parent}, which a foreign key points at",
        sql.SQL("pg_catalog.has_table_privilege({t}, 'REFERENCES') and"
                " pg_catalog.has_table_privilege({t}, 'UPDATE, DELETE, TRUNCATE')")
        .format(t=_oid(parent)),
        sql.SQL("format('grant references, update on %I.%I to %I', {}::text, {}::text,"
                " current_user)").format(sql.Literal(parent.schema), sql.Literal(parent.name)))


def read(relation: Relation) -> Need:
    return Need(
        f"SELECT on {relation}",
        sql.SQL("pg_catalog.has_table_privilege({}, 'SELECT')").format(_oid(relation)),
        sql.SQL("format('grant select on %I.%I to %I', {}::text, {}::text, current_user)")
        .format(sql.Literal(relation.schema), sql.Literal(relation.name)))


def check(conn: psycopg.Connection, command: str, needs: Iterable[Need]) -> None:
    """Refuse, naming the first missing privilege and how to grant it, unless the current role
    has every need."""
    needs = list({need.what: need for need in needs}.values())
    if not needs:
        return
    # A relation that is not there (NULL) is for the command's own checks to name.
    held = conn.execute(sql.SQL("select current_user, array[{}]").format(
        sql.SQL(", ").join(sql.SQL("coalesce({}, true)").format(need.held)
                           for need in needs))).fetchone()
    role, answers = held
    missing = [need for need, answer in zip(needs, answers, strict=True) if not answer]
    if not missing:
        return
    remedy = conn.execute(sql.SQL("select {}").format(missing[0].remedy)).fetchone()[0]
    more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
    raise RunnerError(f"{command} needs {missing[0].what} as role {role}{more}: {remedy}, "
                      "or run as a role that has it; nothing was changed")
