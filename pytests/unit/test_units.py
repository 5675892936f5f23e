"""Durations and sizes as people write and read them, and the options that take them: no
server, milliseconds."""

from __future__ import annotations

from datetime import timedelta

import pytest
from click.testing import CliRunner

from runner.cli import cli
from runner.units import duration_text, parse_duration


@pytest.mark.parametrize(("text", "duration"), [
    ("500ms", timedelta(milliseconds=500)), ("0.5s", timedelta(milliseconds=500)),
    (" 5 s ", timedelta(seconds=5)), ("1.5min", timedelta(seconds=90)),
    ("12h", timedelta(hours=12)), ("7d", timedelta(days=7)), ("0s", timedelta(0)),
])
def test_a_duration_is_a_number_and_a_unit(text: str, duration: timedelta) -> None:
    assert parse_duration(text) == duration


@pytest.mark.parametrize(("text", "says"), [
    ("0.5", "'0.5' is not a duration: give a number and a unit"),
    ("5 seconds", "'5 seconds' is not a duration"),
    ("-1s", "'-1s' is not a duration"),
    ("999999999999d", "'999999999999d' is longer than a million days"),
])
def test_what_is_no_duration_is_said(text: str, says: str) -> None:
    with pytest.raises(ValueError, match="^" + says):
        parse_duration(text)


@pytest.mark.parametrize("text", ["7d", "12h", "30min", "5s", "1.5s", "250ms", "0s"])
def test_a_duration_reads_back_as_it_was_written(text: str) -> None:
    assert duration_text(parse_duration(text)) == text


@pytest.mark.parametrize(("args", "says"), [
    (["swap", "--lock-timeout", "0.5"], "Invalid value for '--lock-timeout': '0.5' is not a "
                                        "duration: give a number and a unit"),
    (["swap", "--lock-timeout", "0ms"], "Invalid value for '--lock-timeout': '0ms' is less "
                                        "than 1 ms, which PostgreSQL would read as no timeout"),
    (["rollback", "--lock-timeout", "0.4ms"], "'0.4ms' is less than 1 ms"),
    (["capture", "--lock-wait", "soon"], "Invalid value for '--lock-wait': 'soon' is not a "
                                         "duration"),
    (["report", "--query-timeout", "0s"], "Invalid value for '--query-timeout': '0s' is less "
                                          "than 1 ms"),
    (["cleanup", "--older-than", "999999999999d"], "Invalid value for '--older-than': "
                                                   "'999999999999d' is longer than a million"),
])
def test_a_bad_duration_is_a_usage_error_before_anything_connects(args: list[str],
                                                                   says: str) -> None:
    # PGPORT 1 would make any connection fail with another message: none is tried.
    result = CliRunner().invoke(cli, args, env={"PGHOST": "127.0.0.1", "PGPORT": "1"})
    assert result.exit_code == 2, result.output
    assert says in result.output.strip().splitlines()[-1]
