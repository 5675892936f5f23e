"""Names the runner gives to what it creates: deterministic, within PostgreSQL's 63 bytes."""

from __future__ import annotations

import hashlib
from datetime import datetime

MAX_IDENTIFIER_BYTES = 63


def pg_name(*parts: str) -> str:
    """Join parts with "__"; past PostgreSQL's 63-byte limit, cut and add a hash of the whole."""
    name = "__".join(parts)
    encoded = name.encode()
    if len(encoded) <= MAX_IDENTIFIER_BYTES:
        return name
    digest = hashlib.sha1(encoded).hexdigest()[:8]
    head = encoded[: MAX_IDENTIFIER_BYTES - len(digest) - 1].decode(errors="ignore")
    return f"{head}_{digest}"


def constraint_name(table: str) -> str:
    return pg_name(table, "natural_key")


def archive_name(table: str, stamp: datetime) -> str:
    return pg_name(table, stamp.strftime("%Y%m%d%H%M%S"))


def null_key_index_name(table: str, number: int, pending: bool = False) -> str:
    """The partial unique index that, before PostgreSQL 15, makes the `number`th combination
    of NULL key columns one key; `pending` while it is built, before it is the table's."""
    return pg_name(table, "natural_key_new_nulls" if pending else "natural_key_nulls",
                   str(number))


def null_key_index_names(table: str, pending: bool = False) -> set[str]:
    """Every name null_key_index_name can give the table's indexes (keys of up to seven
    nullable columns)."""
    return {null_key_index_name(table, number, pending) for number in range(1, 2 ** 7)}
