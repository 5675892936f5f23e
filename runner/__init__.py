"""Swap deduplicated tables built by dbt into a live PostgreSQL schema, safely."""
