"""What a command says while it works, on stderr, apart from its results on stdout: which
database it works on, its steps as they finish, the scans it waits for. One place, so that
`-q`, `-v` and `--log-format json` hold for all of it.

Levels: quiet says nothing but errors; normal says the database and the steps that take a
while; verbose says every step. As JSON, each is one line: {"at", "event", "message", ...}.
"""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone

QUIET, NORMAL, VERBOSE = 0, 1, 2


@dataclass
class _Settings:
    level: int = NORMAL
    as_json: bool = False


_settings = _Settings()
_writing = threading.Lock()
"""dbt calls back from the threads that run its nodes: one line at a time, whole."""


@contextmanager
def reporting(level: int, as_json: bool) -> Iterator[None]:
    """How the block's command reports, then as before."""
    before = (_settings.level, _settings.as_json)
    _settings.level, _settings.as_json = level, as_json
    try:
        yield
    finally:
        _settings.level, _settings.as_json = before


def shown(level: int = NORMAL) -> bool:
    """Whether a message of `level` is said."""
    return _settings.level >= level


def as_json() -> bool:
    return _settings.as_json


def say(event: str, message: str, level: int = NORMAL, **fields: object) -> None:
    """`message` on stderr, indented, when the command's level says it; as JSON, one object
    with the event, the message and `fields`."""
    if not shown(level):
        return
    if _settings.as_json:
        line = json.dumps({"at": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
                           "event": event, "message": message, **fields}, default=str)
    else:
        line = f"  {message}"
    # One write of the line with its newline: print() writes them apart, and another thread's
    # line could come between.
    with _writing:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
