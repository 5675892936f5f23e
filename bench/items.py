"""The table the proof and strategy benchmarks work on: public.items, an id, a key, a 256-byte
text and a load time, with a given share of its rows duplicates (copies of a key loaded later,
as the ETL loaded them)."""

from __future__ import annotations

import psycopg


def create(conn: psycopg.Connection, rows: int, share: float) -> int:
    """public.items with `rows` rows of which `share` are duplicates; returns its keys."""
    keys = max(1, round(rows * (1 - share)))
    conn.execute("create table public.items (id bigserial primary key, k bigint not null,"
                 " payload text not null, loaded_at timestamptz not null)")
    # Row i holds key i mod keys, loaded by run i div keys: the copies come later.
    conn.execute("insert into public.items (k, payload, loaded_at)"
                 " select i %% %(keys)s, repeat(md5((i %% %(keys)s)::text), 8),"
                 " timestamptz '2025-01-01' + (i / %(keys)s) * interval '1 hour'"
                 " from generate_series(0, %(last)s) as i", {"keys": keys, "last": rows - 1})
    return keys


def add_notes(conn: psycopg.Connection, every: int) -> None:
    """public.item_notes, a note on every `every`-th item (copies included), by its id: a table
    that references the items, with the index on its foreign key that re-pointing needs."""
    conn.execute("create table public.item_notes (id bigserial primary key,"
                 " item_id bigint not null references public.items (id), body text not null)")
    conn.execute("insert into public.item_notes (item_id, body) select id, 'note ' || id"
                 " from public.items where id %% %(every)s = 0", {"every": every})
    conn.execute("create index on public.item_notes (item_id)")
