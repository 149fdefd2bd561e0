"""What the unit tests need from the machine beyond PyPI, brought in by the tests themselves.

The README's test command must pass on a fresh machine of the kind CI runs on (Debian, root),
so a test that needs a Debian package (chromium for the HTML report, gcc and the kernel
headers for the ABI check) installs it on first use, once per machine, under a lock that xdist
workers share. Elsewhere it fails with the command that installs it.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
from pathlib import Path

import pytest

APT_LOCK = Path("/tmp/vfio-harness-apt.lock")
APT_TIMEOUT = 900


@pytest.fixture(scope="session")
def debian_package():
    """`debian_package(package, provides)`: see `install_debian_package`."""
    return install_debian_package


def install_debian_package(package: str, provides: str) -> str:
    """The path of `provides` (a command on PATH or an absolute file), installing `package`
    with apt-get first if it is missing and this is a Debian machine on which we are root."""
    found = _find(provides)
    if found:
        return found
    how = f"apt-get update && apt-get install -y --no-install-recommends {package}"
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.fail(f"{provides} is missing; install it as root: {how}", pytrace=False)
    with open(APT_LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        found = _find(provides)
        if found:
            return found
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for step in (["apt-get", "update", "-qq"],
                     ["apt-get", "install", "-y", "-qq", "--no-install-recommends", package]):
            done = subprocess.run(step, capture_output=True, text=True, env=env, timeout=APT_TIMEOUT)
            if done.returncode:
                pytest.fail(f"{' '.join(step)} exited {done.returncode}:\n{done.stderr[-2000:]}", pytrace=False)
    found = _find(provides)
    if not found:
        pytest.fail(f"{package} is installed but {provides} is still missing", pytrace=False)
    return found


def _find(provides: str) -> str | None:
    if provides.startswith("/"):
        return provides if os.path.exists(provides) else None
    return shutil.which(provides)
