"""How the fake kernel says no: the errno a syscall fails with, and the reason Linux would leave to dmesg."""

from __future__ import annotations

import os

# include/linux/err.h: a syscall's answer in -4095..-1 is an errno, any other is a result.
MAX_ERRNO = 4095


def error(code: int, what: str) -> OSError:
    """The OSError a syscall raises: its strerror reads as the real kernel's, with the fake's reason after it."""
    return OSError(code, f"{os.strerror(code)} ({what})")
