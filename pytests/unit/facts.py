"""Hand-built facts for the builders: what the catalog and dbt's manifest would say of a table
with awkward names, so that the statements can be compared without a server."""

from __future__ import annotations

import dataclasses

from runner.declaration.artifacts import DedupSpec, DedupTarget, KeepColumn, Relation
from runner.server.catalog import Column, Grant, Index, LiveTable

LIVE = Relation("Shop", "order lines")
PARENT = Relation("Shop", "orders")
SPEC = DedupSpec(("order_id", "sku"), (KeepColumn("id", descending=True),), "distinct")
TARGET = DedupTarget("shop.order lines", LIVE, Relation("dedup", "order_lines"),
                     Relation("dedup_work", "int_order_lines_grouped_by_key"), SPEC,
                     "model.shop.order_lines")
PRIMARY_KEY = Index("order lines_pkey", "USING btree (id)", "order lines_pkey",
                    "PRIMARY KEY (id)", ("id",), unique=True, valid=True, partial=False,
                    nulls_not_distinct=False)
NATURAL_KEY = Index("order lines_natural", "USING btree (order_id, sku)", None, None,
                    ("order_id", "sku"), unique=True, valid=True, partial=False,
                    nulls_not_distinct=True)


def column(name: str, type_: str = "text", not_null: bool = False) -> Column:
    return Column(name, type_, not_null, identity="", generated=False)


def table(**changes) -> LiveTable:
    """The live table: a serial id, the natural key (order_id, sku), a note; its primary key,
    a foreign key to its orders, a grant to the ETL, a comment."""
    return dataclasses.replace(LiveTable(
        relation=LIVE, owner="app owner",
        columns=(column("id", "bigint", True), column("order_id", "bigint", True),
                 column("sku"), column("note")),
        indexes=(PRIMARY_KEY,),
        foreign_keys=(("order lines_order_id_fkey",
                       'FOREIGN KEY (order_id) REFERENCES "Shop".orders(id)', PARENT),),
        references=(), views=(), grants=(Grant("app_etl", "INSERT", grantable=False),),
        comment="one row per line", owned_sequences=(("Shop", "order lines_id_seq", "id", False),),
        triggers=(), row_security=False, force_row_security=False, policies=(), options=(),
        kind="r", materialized_views=(), publications=(), replica_identity="d",
        replica_identity_index=None, column_grants=(), identity_sequences=()), **changes)


def text(statement) -> str:
    """A statement as the server would receive it."""
    return statement.as_string()
