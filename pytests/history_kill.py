"""A runner command in a process of its own that kills itself with SIGKILL at its N-th step: how
test_histories.py stops the runner as an operator's `kill -9` would.

    python history_kill.py capture|swap|rollback TARGET_DIR TABLE N

The database is the one the libpq environment names. Prints what the command planned
(capture; swap, constraint or nothing; restore, constraint or finish), and each step's label
on stderr, then exits 0 when it finished before its N-th step, 1 when it refused.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from histories import rollback_action

from runner.declaration.artifacts import load_targets, select_targets
from runner.errors import RunnerError
from runner.execution.locking import LockOptions
from runner.jobs import capturing, rollback, swap
from runner.server import swap_log
from runner.server.connection import connect


def main() -> None:
    command, target_dir, table, steps = sys.argv[1], Path(sys.argv[2]), sys.argv[3], sys.argv[4]
    done = []

    def step_done(label: str) -> None:
        done.append(label)
        print(label, file=sys.stderr, flush=True)
        if len(done) == int(steps):
            os.kill(os.getpid(), signal.SIGKILL)

    try:
        with connect() as conn:
            if command == "capture":
                print("capture", flush=True)
                capturing.start(conn, select_targets(load_targets(target_dir), [table]),
                                LockOptions(swap_log.DEFAULT_ARCHIVE_SCHEMA, 50),
                                step_done=step_done)
            elif command == "swap":
                options = swap.SwapOptions(target_dir, select=[table], lock_timeout_ms=50)
                plans = swap.make_plans(conn, options)
                print(plans[0].action, flush=True)
                swap.execute(conn, plans, options, after_step=step_done)
            else:
                options = rollback.RollbackOptions(select=[table], lock_timeout_ms=50)
                plans = rollback.make_plans(conn, options)
                print(rollback_action(plans[0]), flush=True)
                rollback.execute(conn, plans, options, after_step=step_done)
    except RunnerError as error:
        print(error, file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
