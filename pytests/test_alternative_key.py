"""The incident's alternative key, on a real server: reservation_guests is keyed by
(reservation_pk, guest_email), and where the email is NULL by (reservation_pk, guest_email,
guest_name), several guests without email on some reservations, each re-sent like the rest."""

from __future__ import annotations

from collections import Counter

import psycopg
from conftest import Database
from psycopg.rows import dict_row

from runner.facts import upsert

GUESTS = "breezeway.reservation_guests"
WITHOUT_EMAIL = (f"select reservation_pk, guest_name, count(*) from {GUESTS}"
                 " where guest_email is null group by 1, 2 order by 1, 2")
# What the keep rule keeps of the live table as it is: the latest row of each key.
KEPT_BY_THE_RULE = (f"select array_agg(id order by id) from (select max(id) as id from {GUESTS}"
                    " group by reservation_pk, guest_email,"
                    " case when guest_email is null then guest_name end) as kept")


def _ids(conn: psycopg.Connection) -> list[int]:
    return conn.execute(f"select array_agg(id order by id) from {GUESTS}").fetchone()[0]


def _etl_insert(conn: psycopg.Connection, reservation: int, email: str | None,
                name: str | None) -> int:
    """The incident's ETL statement: how many rows it added."""
    return conn.execute(
        f"insert into {GUESTS} (reservation_pk, guest_email, guest_name) values (%s, %s, %s)"
        " on conflict do nothing", (reservation, email, name)).rowcount


def test_each_guest_without_email_is_kept_once_and_the_constraint_tells_them_apart(
        fresh: Database) -> None:
    with fresh.connect() as conn:
        before = conn.execute(WITHOUT_EMAIL).fetchall()
    assert fresh.runner("swap", "--select", "reservation_guests").exit_code == 0
    with fresh.connect() as conn:
        after = conn.execute(WITHOUT_EMAIL).fetchall()
        # Every guest without email is there, once; every re-sent copy is gone.
        assert [guest for *guest, _ in after] == [guest for *guest, _ in before]
        assert {copies for *_, copies in after} == {1} and max(c for *_, c in before) > 1
        per_reservation = Counter(reservation for reservation, _, _ in after)
        assert max(per_reservation.values()) > 1
        reservation, name, _ = after[0]
        email = conn.execute(f"select guest_email from {GUESTS} where guest_email is not null"
                             " and reservation_pk = %s limit 1", (reservation,)).fetchone()
        # The ETL's own statement: a re-sent guest without email adds nothing, a new one is
        # taken once (under nulls: not_distinct it was silently dropped, INSERT 0 0).
        assert _etl_insert(conn, reservation, None, name) == 0
        assert _etl_insert(conn, reservation, None, "A new guest") == 1
        assert _etl_insert(conn, reservation, None, "A new guest") == 0
        # A guest with neither email nor name is one guest too.
        assert _etl_insert(conn, reservation, None, None) == 1
        assert _etl_insert(conn, reservation, None, None) == 0
        # A guest with an email is that email's, whatever the name says.
        if email is not None:
            assert _etl_insert(conn, reservation, email[0], "Renamed") == 0
        assert fresh.runner("verify", "--select", "reservation_guests").exit_code == 0


def test_the_etls_writes_to_guests_without_email_during_the_swap_follow_the_keep_rule(
        fresh: Database) -> None:
    """Between the build and the swap the ETL re-sends every guest without email, adds one
    twice, deletes a kept copy and renames a guest: the swap replays them by the
    alternative key."""
    with fresh.connect() as conn:
        conn.execute(
            f"insert into {GUESTS} (reservation_pk, guest_email, guest_name, phone)"
            f" select distinct on (reservation_pk, guest_name) reservation_pk, null, guest_name,"
            f" phone from {GUESTS} where guest_email is null order by reservation_pk, guest_name")
        reservation = conn.execute(f"select min(reservation_pk) from {GUESTS}"
                                   " where guest_email is null").fetchone()[0]
        for _ in range(2):
            _etl_insert(conn, reservation, None, "Sent twice during the swap")
        conn.execute(f"delete from {GUESTS} where id = (select max(id) from {GUESTS}"
                     " where guest_email is null and guest_name is not null"
                     " and guest_name <> 'Sent twice during the swap')")
        conn.execute(f"update {GUESTS} set guest_name = 'Renamed during the swap'"
                     f" where id = (select min(id) from {GUESTS} where guest_email is null)")
        expected = conn.execute(KEPT_BY_THE_RULE).fetchone()[0]
    result = fresh.runner("swap", "--select", "reservation_guests")
    assert result.exit_code == 0, result.output
    with fresh.connect() as conn:
        assert _ids(conn) == expected
        names = {name for _, name, _ in conn.execute(WITHOUT_EMAIL)}
    assert {"Sent twice during the swap", "Renamed during the swap"} <= names
    assert fresh.runner("verify", "--select", "reservation_guests").exit_code == 0


def test_upsert_sql_gives_one_statement_per_shape_of_key_and_a_rerun_adds_no_row(
        fresh: Database) -> None:
    assert fresh.runner("swap", "--select", "reservation_guests").exit_code == 0
    printed = fresh.runner("upsert-sql", "reservation_guests", "--touch", "last_sync_time")
    assert printed.exit_code == 0, printed.output
    with fresh.connect() as conn:
        upserts = upsert.manifest_upserts(conn, fresh.target_dir, "reservation_guests",
                                          ["last_sync_time"])
        assert [u.rows for u in upserts] == [
            "rows whose guest_email is not NULL",
            "rows whose guest_email is NULL and guest_name is not NULL",
            "rows whose guest_email, guest_name are NULL"]
        assert printed.output == "".join(f"-- for {u.rows}:\n{u.statement.as_string(conn)};\n"
                                         for u in upserts)
        rows = conn.cursor(row_factory=dict_row).execute(
            f"select reservation_pk, guest_email, guest_name, phone from {GUESTS}").fetchall()
        rows.append({"reservation_pk": 1, "guest_email": None, "guest_name": None,
                     "phone": None})
        counted = conn.execute(f"select count(*) from {GUESTS}").fetchone()[0] + 1
        for _ in range(2):
            for shaped in upserts:
                taken = [row for row in rows if shaped.takes(row)]
                assert taken, shaped.rows
                conn.cursor().executemany(shaped.statement, taken)
            assert conn.execute(f"select count(*) from {GUESTS}").fetchone()[0] == counted
        assert sum(len([r for r in rows if u.takes(r)]) for u in upserts) == len(rows)
        # A guest with an email whom the API renamed is updated in place.
        guest = next(row for row in rows if row["guest_email"] is not None)
        conn.execute(upserts[0].statement, {**guest, "guest_name": "Renamed by the API"})
        assert conn.execute(f"select guest_name from {GUESTS} where guest_email = %s",
                            (guest["guest_email"],)).fetchall() == [("Renamed by the API",)]
