"""The package's version, which is its dbt package's too: macros/spec/dedup_version.sql says
the same, and the runner refuses artifacts built with another."""

VERSION = "0.1.0"
