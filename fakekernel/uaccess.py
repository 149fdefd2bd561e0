"""An ioctl's argument as the kernel reads and answers it: copy_from_user of the kernel's minimum,
copy_to_user of the reply. Shared by the container, group and device files."""

from __future__ import annotations

import errno

from .err import error


def int_arg(arg) -> int:
    return arg if isinstance(arg, int) else 0


def buf_arg(arg) -> bytearray:
    if isinstance(arg, int):
        raise error(errno.EFAULT, "the ioctl takes a pointer to a struct")
    return arg


def copy_from_user(layout, buf: bytearray, minsz: int):
    """Read what copy_from_user would: EFAULT when the buffer is shorter than the kernel's minsz."""
    if len(buf) < minsz:
        raise error(errno.EFAULT, f"{layout.name} buffer shorter than {minsz} bytes")
    if len(buf) < layout.size:
        return layout.unpack(bytes(buf) + bytes(layout.size - len(buf)))
    return layout.unpack(buf)


def copy_to_user(buf: bytearray, out: bytearray, layout, argsz: int, minsz: int) -> None:
    """copy_to_user of an info reply: cap_offset is written only when the caller's argsz reaches it."""
    end = layout.offsetof("cap_offset") + 4
    n = end if argsz >= end else minsz
    buf[:n] = out[:n]
