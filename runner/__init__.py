"""Swap deduplicated tables built by dbt into a live PostgreSQL schema, safely."""

from runner.version import VERSION as __version__

__all__ = ["__version__"]
