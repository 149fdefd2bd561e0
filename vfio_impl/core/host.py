"""The one syscall surface of vfio_impl, so the same driver code runs on Linux and on the fake kernel."""

from __future__ import annotations

import fcntl
import mmap as _mmap
import os
from typing import Protocol, runtime_checkable

EFD_FLAGS = os.EFD_CLOEXEC | os.EFD_NONBLOCK


@runtime_checkable
class Host(Protocol):
    """What a VFIO user needs from the kernel; errors are OSError with Linux's errno."""

    def open(self, path: str, flags: int = os.O_RDWR) -> int: ...
    def close(self, fd: int) -> None: ...
    def ioctl(self, fd: int, request: int, arg: int | bytearray | bytes = 0) -> int: ...
    def pread(self, fd: int, n: int, offset: int) -> bytes: ...
    def pwrite(self, fd: int, data: bytes, offset: int) -> int: ...
    def mmap(self, fd: int, length: int, offset: int, prot: int = _mmap.PROT_READ | _mmap.PROT_WRITE): ...
    def readlink(self, path: str) -> str: ...
    def exists(self, path: str) -> bool: ...
    def stat(self, path: str) -> os.stat_result: ...
    def listdir(self, path: str) -> list[str]: ...
    def read_text(self, path: str) -> str: ...
    def write_text(self, path: str, text: str) -> None: ...
    def eventfd(self) -> int: ...
    def eventfd_read(self, fd: int) -> int: ...
    def eventfd_write(self, fd: int, value: int = 1) -> None: ...


class EventfdMixin:
    """eventfds are real kernel objects on every backend, so one implementation serves both."""

    def eventfd(self) -> int:
        return os.eventfd(0, EFD_FLAGS)

    def eventfd_read(self, fd: int) -> int:
        """The counter, cleared; 0 when nothing was signalled (the fds are non-blocking)."""
        try:
            return os.eventfd_read(fd)
        except BlockingIOError:
            return 0

    def eventfd_write(self, fd: int, value: int = 1) -> None:
        os.eventfd_write(fd, value)


class RealHost(EventfdMixin):
    """Linux itself: a thin layer over os, fcntl and mmap."""

    kind = "real"

    def open(self, path: str, flags: int = os.O_RDWR) -> int:
        return os.open(path, flags | os.O_CLOEXEC)

    def close(self, fd: int) -> None:
        os.close(fd)

    def ioctl(self, fd: int, request: int, arg: int | bytearray | bytes = 0) -> int:
        if isinstance(arg, bytes):
            arg = bytearray(arg)
        if isinstance(arg, int):
            return fcntl.ioctl(fd, request, arg)
        return fcntl.ioctl(fd, request, arg, True)

    # The trapped path of every region: the syscalls themselves, with no Python frame around them.
    pread = staticmethod(os.pread)
    pwrite = staticmethod(os.pwrite)

    def mmap(self, fd: int, length: int, offset: int, prot: int = _mmap.PROT_READ | _mmap.PROT_WRITE):
        return _mmap.mmap(fd, length, _mmap.MAP_SHARED, prot, offset=offset)

    def readlink(self, path: str) -> str:
        return os.readlink(path)

    def exists(self, path: str) -> bool:
        return os.path.exists(path)

    def stat(self, path: str) -> os.stat_result:
        return os.stat(path)

    def listdir(self, path: str) -> list[str]:
        return sorted(os.listdir(path))

    def read_text(self, path: str) -> str:
        with open(path, encoding="ascii", errors="replace") as f:
            return f.read()

    def write_text(self, path: str, text: str) -> None:
        with open(path, "w", encoding="ascii") as f:
            f.write(text)
