"""The database: how to reach it (the user's, or the embedded one), every read of its catalog, what
the connected role may do, and the archive's log of swaps."""
