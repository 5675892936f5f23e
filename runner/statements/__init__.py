"""Pure builders of the statements each named step runs, from facts alone: the swap's steps, the
change capture and its replay, the rollback's restore. Nothing here connects."""
