"""The one executor: runs the builders' steps, the online cut-over that a swap and a rollback
share, and the locks, taken one way everywhere."""
