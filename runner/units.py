"""Quantities as people read them."""

from __future__ import annotations

import re
from datetime import timedelta


def size_text(num_bytes: float) -> str:
    """Bytes in B, kB, MB or GB, as pg_size_pretty does but with one decimal."""
    for unit in ("B", "kB", "MB", "GB"):
        if abs(num_bytes) < 1024 or unit == "GB":
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1024
    return ""


_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|min|h|d)\s*")
_SECONDS = {"ms": 0.001, "s": 1, "min": 60, "h": 3600, "d": 86400}
LONGEST_DURATION = timedelta(days=1_000_000)


def parse_duration(text: str) -> timedelta:
    """500ms, 5s, 1.5min, 12h or 7d. The unit is required: a bare number is read one way by
    PostgreSQL (milliseconds) and another by people, and 0.5 read as milliseconds is 0."""
    match = _DURATION.fullmatch(text)
    if not match:
        raise ValueError(f"{text!r} is not a duration: give a number and a unit, such as 500ms, "
                         "5s, 30min, 12h or 7d")
    seconds = float(match.group(1)) * _SECONDS[match.group(2)]
    if seconds > LONGEST_DURATION.total_seconds():
        raise ValueError(f"{text!r} is longer than a million days: give a shorter duration")
    return timedelta(seconds=seconds)


def duration_text(duration: timedelta) -> str:
    """A duration as parse_duration reads it: in the largest unit that gives a whole number."""
    milliseconds = round(duration / timedelta(milliseconds=1))
    for unit in ("d", "h", "min", "s"):
        size = round(_SECONDS[unit] * 1000)
        if milliseconds and milliseconds % size == 0:
            return f"{milliseconds // size}{unit}"
    return f"{milliseconds / 1000:g}s" if milliseconds >= 1000 or not milliseconds else (
        f"{milliseconds}ms")


def elapsed_text(milliseconds: float) -> str:
    """A measured time, to three figures: 0.42 ms, 12.3 ms, 4.56 s, 1,234 s."""
    if milliseconds < 999.5:
        return f"{milliseconds:.3g} ms"
    seconds = milliseconds / 1000
    return f"{seconds:.3g} s" if seconds < 99.95 else f"{seconds:,.0f} s"
