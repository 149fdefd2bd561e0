"""The PyPI distributions the Python of a foreign guest needs (ci/vm/foreign.sh: arm64, s390x):
the project's dependencies and its test extra, and theirs, as the guest's markers select them,
one requirement a line. Each is pinned to the version installed here, since the amd64 guest runs
this very environment; one not installed here is left to pip, within its specifier.

    python3 ci/vm/guest_wheels.py PYPROJECT GUEST_PYTHON_VERSION MACHINE   (e.g. 3.11.2 s390x)
"""

from __future__ import annotations

import sys
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name


def guest_environment(python_full_version: str, machine: str) -> dict[str, str]:
    """Marker values of Debian's python3 on Linux on MACHINE (platform.machine(): aarch64, s390x)."""
    major_minor = ".".join(python_full_version.split(".")[:2])
    return {"python_version": major_minor, "python_full_version": python_full_version,
            "implementation_name": "cpython", "implementation_version": python_full_version,
            "platform_python_implementation": "CPython", "platform_machine": machine,
            "platform_system": "Linux", "sys_platform": "linux", "os_name": "posix"}


def requirements(pyproject: Path, python_full_version: str, machine: str) -> list[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    env = guest_environment(python_full_version, machine)
    todo = [(Requirement(r), "") for r in project["dependencies"]]
    todo += [(Requirement(r), "test") for r in project.get("optional-dependencies", {}).get("test", [])]
    seen: set[tuple[str, str]] = set()
    pins: dict[str, str] = {}
    while todo:
        req, extra = todo.pop()
        if req.marker and not req.marker.evaluate({**env, "extra": extra}):
            continue
        name = canonicalize_name(req.name)
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            pins.setdefault(name, f"{name}{req.specifier}")
            continue
        pins[name] = f"{name}=={dist.version}"
        for want in {""} | set(req.extras):
            if (name, want) in seen:
                continue
            seen.add((name, want))
            todo += [(Requirement(r), want) for r in dist.requires or []]
    return sorted(pins.values())


if __name__ == "__main__":
    print("\n".join(requirements(Path(sys.argv[1]), sys.argv[2], sys.argv[3])))
