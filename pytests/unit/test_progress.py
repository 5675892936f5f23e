"""runner.progress from several threads at once, as dbt calls it back from the threads that run
its nodes: each line reaches stderr whole. No server."""

from __future__ import annotations

import subprocess
import sys

# Threads that switch as often as the interpreter lets them, each saying lines of its own.
SAYING = """
import sys, threading
from runner import progress
sys.setswitchinterval(1e-6)
def say_lines(thread):
    for number in range(2000):
        progress.say("dbt", f"dbt model t{thread}: success in {number} s")
threads = [threading.Thread(target=say_lines, args=(t,)) for t in range(6)]
for t in threads:
    t.start()
for t in threads:
    t.join()
"""


def test_lines_said_from_many_threads_reach_a_pipe_whole() -> None:
    done = subprocess.run([sys.executable, "-c", SAYING], capture_output=True, text=True,
                          check=True)
    lines = done.stderr.splitlines()
    assert len(lines) == 6 * 2000
    assert [line for line in lines if not line.startswith("  dbt model t")
            or line.count("dbt model") != 1] == []
