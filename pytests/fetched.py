"""What the suite fetches from the package registries at test time, other PostgreSQL versions
and a browser: unpacked once into a cache outside the clone, for the next runs."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

TIMEOUT_S = 600


class Unobtainable(Exception):
    """What no registry gave: what was tried and what it said."""


def cached(home: Path, fetch: Callable[[Path], None]) -> Path:
    """`home`, filled once by `fetch` in a folder beside it that then takes its name: a run
    stopped halfway leaves no half-filled home, and of two runs at once the first one's stays."""
    if not home.exists():
        home.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f"{home.name}-", dir=home.parent))
        try:
            fetch(staging)
        except BaseException:
            shutil.rmtree(staging)
            raise
        try:
            staging.rename(home)
        except OSError as error:
            shutil.rmtree(staging)
            # Another run filled it first: a rename onto a folder that is not empty fails.
            if error.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
    return home


def run(command: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    """The command's output; Unobtainable, saying why, when it fails or outlasts TIMEOUT_S."""
    try:
        done = subprocess.run(command, cwd=cwd, capture_output=True, text=True,
                              timeout=TIMEOUT_S, env={**os.environ, **(env or {})})
    except (OSError, subprocess.TimeoutExpired) as error:
        raise Unobtainable(f"`{' '.join(command)}` failed: {error}") from error
    if done.returncode != 0:
        raise Unobtainable(f"`{' '.join(command)}` exited {done.returncode}: "
                           f"{(done.stderr or done.stdout).strip()[-1000:]}")
    return done.stdout
