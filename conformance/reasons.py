"""One line a lab engineer can act on for each failed test: what was asserted or which kernel
call failed with which errno, and where, instead of the traceback's last line."""

from __future__ import annotations

import errno
import os
from pathlib import Path

from vfio_impl import uapi
from vfio_impl.core.errors import VFIOError

REPO = Path(__file__).resolve().parent.parent
# The Host calls a kernel error comes out of (vfio_impl.core.host.Host), with the argument naming the target.
HOST_CALLS = {"open": "path", "ioctl": "request", "pread": "offset", "pwrite": "offset", "mmap": "offset",
              "readlink": "path", "read_text": "path", "write_text": "path", "listdir": "path", "eventfd": None}
IOCTL_NAMES = {number: name for name, number in uapi.IOCTLS.items()}
MAX_MESSAGE = 300


def relative(path: str | Path, root: Path | None = None) -> str:
    """A path as the repository (or the user's rootdir) names it, wherever the command ran."""
    path = Path(path).resolve()
    for base in (root, REPO):
        if base and path.is_relative_to(base):
            return str(path.relative_to(base))
    return str(path)


def failure_reason(excinfo, test_path: Path | None = None, root: Path | None = None) -> str:
    """`message (file:line)`, the line being the test's own where the traceback passes through it."""
    message = describe_exception(excinfo.value, excinfo.tb)
    entries = list(excinfo.traceback)
    if not entries:
        return message
    own = [e for e in entries if test_path and Path(e.path) == test_path]
    entry = (own or entries)[-1]
    return f"{message} ({relative(entry.path, root)}:{entry.lineno + 1})"


def describe_exception(exc: BaseException, tb=None) -> str:
    if isinstance(exc, VFIOError):
        text = f"VFIOError {exc.errno_name}: {exc.message}" if exc.errno else f"VFIOError: {exc.message}"
    elif isinstance(exc, OSError) and exc.errno:
        name = errno.errorcode.get(exc.errno, str(exc.errno))
        text = f"{type(exc).__name__} {name}: {exc.strerror or os.strerror(exc.errno)}"
        call = kernel_call(tb)
        if call:
            text += f" from {call}"
    elif isinstance(exc, AssertionError):
        text = _assertion(str(exc)) or "AssertionError"
    else:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        text = f"{type(exc).__name__}: {' / '.join(lines)}" if lines else type(exc).__name__
    return text if len(text) <= MAX_MESSAGE else text[:MAX_MESSAGE - 3] + "..."


def _assertion(text: str) -> str:
    """The assertion and its message, without pytest's `+  where` explanation lines."""
    lines = []
    for line in text.splitlines():
        if line.lstrip().startswith(("+", "-", "?", "At index", "Full diff", "Use -v", "Omitting")):
            break
        lines.append(line.strip())
    return " / ".join(line for line in lines if line)


def kernel_call(tb) -> str:
    """The outermost Host call in the traceback, e.g. `ioctl VFIO_DEVICE_SET_IRQS` or
    `open /dev/vfio/3`: the syscall the kernel (real or fake) refused."""
    while tb is not None:
        frame = tb.tb_frame
        name = frame.f_code.co_name
        owner = frame.f_locals.get("self")
        if name in HOST_CALLS and owner is not None and hasattr(owner, "ioctl") and hasattr(owner, "pread"):
            arg = frame.f_locals.get(HOST_CALLS[name]) if HOST_CALLS[name] else None
            if name == "ioctl" and isinstance(arg, int):
                arg = IOCTL_NAMES.get(arg, f"{arg:#x}")
            elif isinstance(arg, int):
                arg = f"at {arg:#x}"
            return f"{name} {arg}" if arg is not None else name
        tb = tb.tb_next
    return ""
