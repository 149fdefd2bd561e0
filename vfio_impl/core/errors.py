"""One exception family for every VFIO failure, so callers catch one type and still see errno."""

from __future__ import annotations

import errno as _errno
import os


class VFIOError(Exception):
    """A failed VFIO step, worded as QEMU words it, with the errno that caused it (0 if none)."""

    def __init__(self, message: str, errno: int = 0):
        self.errno = errno
        self.message = message
        text = f"{message}: {os.strerror(errno)}" if errno else message
        super().__init__(text)

    @property
    def errno_name(self) -> str:
        return _errno.errorcode.get(self.errno, str(self.errno))

    @classmethod
    def from_oserror(cls, message: str, exc: OSError) -> "VFIOError":
        err = cls(message, exc.errno or 0)
        err.__cause__ = exc
        return err
