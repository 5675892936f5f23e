"""What the user declared, as dbt records it: the tables to deduplicate, their natural keys, keep
rules and NULL policies (from dbt's manifest), the names derived from them, and dbt itself,
invoked one way. Pure but for reading dbt's files."""
