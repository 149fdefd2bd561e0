"""Kernel-side eventfd references: the fake holds its own dup, as eventfd_ctx_fdget takes a reference."""

from __future__ import annotations

import errno
import os

from .err import error


def is_eventfd(fd: int) -> bool:
    try:
        return os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[eventfd]"
    except OSError:
        return False


class EventfdCtx:
    """A reference to a user's eventfd that outlives the user's close, as in Linux."""

    __slots__ = ("fd",)

    def __init__(self, user_fd: int):
        if user_fd < 0:
            raise error(errno.EBADF, f"eventfd {user_fd}")
        try:
            os.fstat(user_fd)
        except OSError:
            raise error(errno.EBADF, f"fd {user_fd} is not open") from None
        if not is_eventfd(user_fd):
            raise error(errno.EINVAL, f"fd {user_fd} is not an eventfd")
        self.fd = os.dup(user_fd)

    def signal(self) -> None:
        os.eventfd_write(self.fd, 1)

    def clear(self) -> int:
        try:
            return os.eventfd_read(self.fd)
        except BlockingIOError:
            return 0

    def put(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
