"""Every command with --archive-schema elsewhere: what the runner keeps goes there, end to end."""

from __future__ import annotations

from conftest import Database


def _ok(database: Database, *args: str) -> str:
    result = database.runner(*args)
    assert result.exit_code == 0, (args, result.output)
    return result.output


def _relations(database: Database, schema: str) -> list[str]:
    with database.connect() as conn:
        return [r[0] for r in conn.execute(
            "select c.relname from pg_class as c join pg_namespace as n"
            " on n.oid = c.relnamespace where n.nspname = %s and c.relkind in ('r', 'p')"
            " order by 1", (schema,))]


def test_every_command_keeps_what_it_keeps_in_the_archive_schema_it_is_given(
        fresh: Database) -> None:
    _ok(fresh, "capture", "--stop")
    before = _relations(fresh, "dedup_archive")
    elsewhere = ("--archive-schema", "elsewhere")
    _ok(fresh, "capture", "--select", "task_photos", *elsewhere)
    assert fresh.dbt("build", "--select", "source:breezeway.task_photos+").success
    _ok(fresh, "swap", "--select", "task_photos", *elsewhere)
    kept = _relations(fresh, "elsewhere")
    assert any(name.startswith("task_photos__") for name in kept), kept
    _ok(fresh, "verify", "--select", "task_photos", *elsewhere)
    assert "task_photos" in _ok(fresh, "report", "--no-queries", *elsewhere)
    _ok(fresh, "rollback", "--select", "task_photos", *elsewhere)
    _ok(fresh, "cleanup", "--older-than", "0s", *elsewhere)
    assert _relations(fresh, "dedup_archive") == before
    assert [name for name in _relations(fresh, "elsewhere")
            if name.startswith("task_photos")] == []
