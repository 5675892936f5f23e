"""Debian's Chromium, headless, for the tests that look at a page as a person would: the
machine's own `chromium` where it has one, else Debian's chromium package and the libraries this
machine lacks, fetched at test time with `apt-get download` (no root needed) and unpacked once
into a cache outside the clone ($RUNNER_TEST_BROWSER_CACHE, or ~/.cache/runner-tests/chromium),
for the next runs."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import fetched
from fetched import Unobtainable

CACHE = Path(os.environ.get("RUNNER_TEST_BROWSER_CACHE",
                            Path.home() / ".cache" / "runner-tests" / "chromium"))
PACKAGE = "chromium"
RUN_TIMEOUT_S = 120
# Headless on a machine with no display, no GPU and no network but loopback: nothing that
# would reach out at start, and no sandbox, which needs privileges a root test run lacks.
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars")


@dataclass(frozen=True)
class Browser:
    executable: Path
    library_path: str
    """LD_LIBRARY_PATH for the libraries unpacked beside it; empty for the machine's own."""

    def run(self, url: str, *options: str, width: int = 1280, height: int = 800,
            wait_ms: int = 0) -> str:
        """Chromium's output for one page at that window size, once it loaded (and, for pages
        that render later, once `wait_ms` of the page's own time passed): --dump-dom prints
        the page as its scripts left it."""
        budget = [f"--virtual-time-budget={wait_ms}"] if wait_ms else []
        profile = tempfile.mkdtemp(prefix="chromium-profile-")
        env = {**os.environ, "LD_LIBRARY_PATH": self.library_path} if self.library_path \
            else None
        try:
            done = subprocess.run(
                [str(self.executable), *FLAGS, f"--user-data-dir={profile}",
                 f"--window-size={width},{height}", *budget, *options, url],
                capture_output=True, text=True, timeout=RUN_TIMEOUT_S, env=env)
        finally:
            shutil.rmtree(profile, ignore_errors=True)
        if done.returncode != 0:
            raise AssertionError(f"chromium exited {done.returncode} on {url}: "
                                 f"{done.stderr.strip()[-2000:]}")
        return done.stdout

    def dom(self, url: str, *, width: int = 1280, wait_ms: int = 0) -> str:
        return self.run(url, "--dump-dom", width=width, wait_ms=wait_ms)

    def screenshot(self, url: str, path: Path, *, width: int = 1280, height: int = 800,
                   wait_ms: int = 0) -> Path:
        self.run(url, f"--screenshot={path}", width=width, height=height, wait_ms=wait_ms)
        if not path.is_file() or path.stat().st_size == 0:
            raise AssertionError(f"chromium wrote no screenshot of {url} to {path}")
        return path


def with_script(page: Path, script: str, name: str) -> Path:
    """A copy of the page named `name`, beside it so that what it loads by relative path still
    loads, that also runs `script`: what a person would do on the page, or a measurement."""
    text = page.read_text(encoding="utf-8")
    at = text.lower().rindex("</body>")
    copy = page.with_name(name)
    copy.write_text(f"{text[:at]}<script>{script}</script>{text[at:]}", encoding="utf-8")
    return copy


def chromium() -> Browser:
    """This machine's Chromium, or Debian's unpacked in the cache (fetched now if need be)."""
    own = shutil.which(PACKAGE)
    if own:
        return Browser(Path(own), "")
    home = fetched.cached(CACHE / "unpacked", _unpack_debian_packages)
    executable = home / "usr" / "lib" / "chromium" / "chromium"
    if not executable.is_file():
        raise Unobtainable(f"{home} holds no usr/lib/chromium/chromium: remove it to fetch it "
                           "again")
    libraries = sorted({str(p.parent) for p in home.glob("usr/lib/**/*.so*")})
    return Browser(executable, ":".join(libraries))


def _unpack_debian_packages(into: Path) -> None:
    """Chromium and the packages this machine lacks for it, unpacked under `into`. apt reads
    package lists of its own, fetched now into `into`, so that neither root nor the machine's
    lists (absent on a new machine, until `apt-get update`) are needed."""
    state = into / "apt"
    for folder in ("lists/partial", "cache/archives/partial", "debs"):
        (state / folder).mkdir(parents=True)
    options = ["-o", f"Dir::State::Lists={state / 'lists'}", "-o", f"Dir::Cache={state / 'cache'}",
               "-o", "Debug::NoLocking=1"]
    # apt's words in English, which the lines read below are in.
    english = {"LC_ALL": "C"}
    fetched.run(["apt-get", "update", *options], state, english)
    said = fetched.run(["apt-get", "install", "--simulate", "--no-install-recommends",
                        *options, PACKAGE], state, english)
    packages = re.findall(r"^Inst (\S+)", said, flags=re.MULTILINE)
    if PACKAGE not in packages:
        raise Unobtainable(f"apt-get would not install {PACKAGE}:\n{said}")
    fetched.run(["apt-get", "download", *options, *packages], state / "debs")
    for deb in sorted((state / "debs").glob("*.deb")):
        fetched.run(["dpkg-deb", "--extract", str(deb), str(into)], state)
    shutil.rmtree(state)
