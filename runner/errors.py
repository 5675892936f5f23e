"""The exceptions the library raises for anything a user can act on, each kind with the exit
status the command ends with (2, bad usage of the command line, is click's; 1, checks that
failed, is runner verify's)."""

from __future__ import annotations

import psycopg

CHECKS_FAILED = 1
REFUSED = 4


class RunnerError(Exception):
    """A problem the user can fix: the message says what is wrong and what to do, in one line.
    The runner refused, and changed nothing."""

    exit_code = REFUSED


class ConnectionProblem(RunnerError):
    """No connection to PostgreSQL could be had, or it went."""

    exit_code = 3


class DatabaseError(RunnerError):
    """PostgreSQL stopped a command for a reason no check of the runner's foresaw."""

    exit_code = 5


class ConnectionLost(ConnectionProblem):
    """The connection went during a change: `committed` says whether the change was made, as
    the server recorded it (None: the server did not say)."""

    def __init__(self, message: str, committed: bool | None) -> None:
        super().__init__(message)
        self.committed = committed


def from_database(error: psycopg.Error) -> RunnerError:
    """An error PostgreSQL raised that no check of ours foresaw, as one line that names it."""
    said = (error.diag.message_primary or str(error) or type(error).__name__).strip()
    said = said.splitlines()[0]
    if isinstance(error, psycopg.errors.InsufficientPrivilege):
        return RunnerError(f"PostgreSQL refused: {said}: run as a role with that privilege "
                           "(the tables' owner), or grant it, then run again")
    return DatabaseError(f"PostgreSQL stopped the command: {said}: fix the cause and run again "
                         "(the step in progress was rolled back)")
