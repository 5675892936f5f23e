"""The one exception the library raises for anything a user can act on."""


class RunnerError(Exception):
    """A problem the user can fix: the message says what is wrong and what to do, in one line."""
