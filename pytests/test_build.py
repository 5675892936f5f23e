"""runner build: the two steps before the swap as one, on a real server: capture where none is
in place, then dbt build of what deduplicates the chosen tables."""

from __future__ import annotations

from conftest import Database, said


def _captured(database: Database) -> set[str]:
    with database.connect() as conn:
        return {row[0] for row in conn.execute(
            "select live_table from dedup_archive.captures where since_swap_of is null")}


def test_build_captures_what_is_not_captured_then_builds_and_the_swap_follows(
        fresh: Database) -> None:
    stopped = fresh.runner("capture", "--stop", "--select", "task_photos")
    assert stopped.exit_code == 0, stopped.output
    assert "task_photos" not in _captured(fresh)
    built = fresh.runner("build", "--select", "task_photos")
    assert built.exit_code == 0, built.output
    assert "Capturing writes to breezeway.task_photos." in said(built)
    assert said(built)[-1] == ("Built; now run `runner swap --dry-run` to read what the swap "
                               "will do, then `runner swap`.")
    assert "task_photos" in _captured(fresh)
    # The build the swap checks is this one, which tested task_photos' models.
    swapped = fresh.runner("swap", "--select", "task_photos")
    assert swapped.exit_code == 0, swapped.output
    # Captured already: nothing to start, the build runs again.
    again = fresh.runner("build", "--select", "task_tags")
    assert again.exit_code == 0, again.output
    assert not any(line.startswith("Capturing writes") for line in said(again))


def test_a_failed_build_is_one_error_line_after_dbts_own_log(fresh: Database) -> None:
    with fresh.connect() as conn:
        conn.execute("alter table breezeway.task_photos rename column photo_id to picture_id")
    built = fresh.runner("build", "--select", "task_photos")
    assert built.exit_code == 4, built.output
    assert said(built)[-1].startswith("Error: natural key column(s) ['photo_id'] of "
                                      "breezeway.task_photos are not columns of")
