"""Bad input, command by command: one line that says what is wrong and what to do, exit 1, and
the database exactly as it was.

Each case breaks one thing in a private copy of the built demo, then runs every command that
the break concerns; after each, a fingerprint of the database (relations, triggers,
constraints, rows per table) must equal the one taken before.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from conftest import Database, said
from test_in_place import declare_strategy

# Every command that reads the configured tables; upsert-sql takes one of them.
ON_TABLES = [["audit"], ["verify"], ["upsert-sql", "task_photos"], ["swap"], ["plan"],
             ["capture"]]
ALL_COMMANDS = [*ON_TABLES, ["report"], ["rollback"], ["swap", "--dry-run"]]

FINGERPRINT = """
select jsonb_build_object(
    'relations', (select jsonb_agg(array[n.nspname, c.relname, c.relkind::text]
                                   order by n.nspname, c.relname)
                  from pg_class as c join pg_namespace as n on n.oid = c.relnamespace
                  where n.nspname !~ '^(pg_|information_schema)' and c.relkind <> 'S'),
    'triggers', (select jsonb_agg(array[tgrelid::regclass::text, tgname] order by 1, 2)
                 from pg_trigger where not tgisinternal),
    'constraints', (select jsonb_agg(array[conrelid::regclass::text, conname,
                                           convalidated::text] order by 1, 2)
                    from pg_constraint where connamespace::regnamespace::text !~ '^pg_'),
    'invalid_indexes', (select count(*) from pg_index where not indisvalid),
    'rows', (select jsonb_object_agg(c.relname, (xpath('/row/n/text()', query_to_xml(
                 format('select count(*) as n from %I.%I', n.nspname, c.relname),
                 false, true, '')))[1]::text)
             from pg_class as c join pg_namespace as n on n.oid = c.relnamespace
             where n.nspname in ('breezeway', 'dedup', 'dedup_archive') and c.relkind = 'r')
)
"""


def fingerprint(database: Database) -> dict:
    with database.connect() as conn:
        return conn.execute(FINGERPRINT).fetchone()[0]


def _drop_task_photos(db: Database) -> None:
    with db.connect() as conn:
        conn.execute("drop table breezeway.task_photos cascade")


def _drop_a_key_column(db: Database) -> None:
    with db.connect() as conn:
        conn.execute("alter table breezeway.task_photos drop column photo_id cascade")


def _typo_in_the_yaml(db: Database) -> None:
    path = db.target_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    source = manifest["sources"]["source.dedup.breezeway.task_photos"]
    spec = source["config"]["meta"]["dedup"]
    spec["natural_keys"] = spec.pop("natural_key")
    source["meta"] = source["config"]["meta"]
    path.write_text(json.dumps(manifest))


def _results_of_another_run(db: Database) -> None:
    assert db.dbt("parse").success


def _a_role_without_privileges(db: Database) -> None:
    with db.connect() as conn:
        conn.execute("do $$ begin if not exists (select from pg_roles where rolname ="
                     " 'bystander') then create role bystander login; end if; end $$")


def _a_failed_uniqueness_test(db: Database) -> None:
    """What `dbt build` records when a deduplicated model's natural key is not unique (the
    test failing for real on such a model is in test_dedup_models)."""
    path = db.target_dir / "run_results.json"
    results = json.loads(path.read_text())
    for result in results["results"]:
        if result["unique_id"].startswith("test.dedup.dedup_natural_key_unique_task_photos"):
            result["status"] = "fail"
    path.write_text(json.dumps(results))


def _a_tiebreaker_two_rows_share(db: Database) -> None:
    """A build whose tie-breaker test fails for real, so that dbt skips what the swap needs."""
    with db.connect() as conn:
        conn.execute("alter table breezeway.task_photos drop constraint task_photos_pkey")
        conn.execute("insert into breezeway.task_photos overriding system value"
                     " select * from breezeway.task_photos"
                     " where id = (select min(id) from breezeway.task_photos)")
    assert not db.dbt("build", "--select", "source:breezeway.task_photos+").success


def _a_partition_to_swap(db: Database) -> None:
    """A partition configured as a table of its own, which is deduplicated in place, declared
    strategy: swap."""
    with db.connect() as conn:
        conn.execute("create table breezeway.all_task_photos (like breezeway.task_photos)"
                     " partition by range (id)")
        conn.execute("alter table breezeway.all_task_photos attach partition"
                     " breezeway.task_photos for values from (minvalue) to (maxvalue)")
    declare_strategy(db.target_dir, "task_photos", "swap")


@dataclass
class Case:
    name: str
    breaks: Callable[[Database], None] | None
    commands: list[list[str]]
    says: str
    """What the one line must say: the thing that is wrong, by name."""
    env: dict[str, str] = field(default_factory=dict)
    held: str | None = None
    """A statement another session runs and holds, with its locks, while the commands run."""
    exit_code: int = 4
    """Refused; 3: no connection."""


CASES = [
    Case("unreachable database", None, ALL_COMMANDS,
         "cannot connect to PostgreSQL at 127.0.0.1:1", env={"PGPORT": "1"}, exit_code=3),
    Case("missing table", _drop_task_photos, ON_TABLES,
         "breezeway.task_photos does not exist"),
    Case("missing natural key column", _drop_a_key_column, ON_TABLES, "photo_id"),
    Case("typo in the dedup configuration", _typo_in_the_yaml, ON_TABLES,
         'unknown meta.dedup keys ["natural_keys"]'),
    Case("unknown table, a name that needs quoting", None,
         [["audit", "--select", 'Tâsk "Photos" 1'], ["verify", "--select", 'Tâsk "Photos" 1'],
          ["upsert-sql", 'Tâsk "Photos" 1'], ["swap", "--select", 'Tâsk "Photos" 1'],
          ["capture", "--select", 'Tâsk "Photos" 1']],
         'Tâsk "Photos" 1'),
    Case("natural key not unique in a deduplicated model", _a_failed_uniqueness_test,
         [["swap"], ["plan"]], "has status fail in the latest dbt build"),
    Case("a tie-breaker two rows share", _a_tiebreaker_two_rows_share,
         [["swap", "--select", "task_photos"], ["plan", "--select", "task_photos"]],
         "was skipped in the latest dbt build because "
         "source_dedup_tiebreaker_unique_breezeway_task_photos_ failed (Got 1 result"),
    Case("dbt results of another run", _results_of_another_run, [["swap"], ["plan"]],
         "come from different dbt runs"),
    Case("role without the privileges", _a_role_without_privileges,
         [["audit"], ["verify"], ["swap"], ["capture"]],
         "permission denied", env={"PGUSER": "bystander"}),
    Case("nothing swapped yet", None, [["report"], ["rollback"]], "swap"),
    Case("a partition to swap", _a_partition_to_swap,
         [["capture", "--select", "task_photos"], ["swap", "--select", "task_photos"],
          ["plan", "--select", "task_photos"]],
         "it is a partition of breezeway.all_task_photos, and a swap would put a plain table in "
         "its place"),
    Case("no capture to stop", None, [["capture", "--stop", "--archive-schema", "elsewhere"]],
         "no change capture to stop: elsewhere.captures records none"),
    Case("a lock that cannot be had", None,
         [["swap", "--lock-timeout", "50ms", "--lock-wait", "1s"],
          ["swap", "--select", "task_photos", "--lock-timeout", "50ms", "--lock-wait", "1s"]],
         "could not lock", held="lock table breezeway.task_photos in access share mode"),
]


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bad_input_is_one_line_an_exit_of_its_kind_and_no_change(fresh: Database,
                                                                  case: Case) -> None:
    if case.breaks:
        case.breaks(fresh)
    before = fingerprint(fresh)
    broken = Database({**fresh.env, **case.env}, fresh.target_dir)
    for command in case.commands:
        if case.held:
            with fresh.holding(case.held):
                result = broken.runner(*command)
        else:
            result = broken.runner(*command)
        lines = said(result)
        assert result.exit_code == case.exit_code, (command, result.output)
        assert len(lines) == 1 and lines[0].startswith("Error: "), (command, result.output)
        assert case.says in lines[0], (command, lines[0])
        assert fingerprint(fresh) == before, command
