"""The commands that change the database, each a short orchestration of builders through the
executor: capture, swap, rollback, cleanup."""
