"""A trapped mapping of a register BAR: every access reaches the emulated device at once.

A memfd cannot show a device the moment a register is written, so register BARs are mapped
as objects that trap each access, the way MMIO traps to the device on real hardware.
"""

from __future__ import annotations

import errno
from typing import Callable

from .err import error

_SIZES = (8, 4, 2, 1)


def split_access(offset: int, length: int, sizes=_SIZES) -> list[tuple[int, int]]:
    """Natural-aligned pieces, largest first, as a CPU issues a copy to MMIO. A register access
    is already one piece, and it is by far the most common."""
    if length in sizes and not offset % length:
        return [(offset, length)]
    pieces = []
    end = offset + length
    while offset < end:
        for size in sizes:
            if offset % size == 0 and offset + size <= end:
                pieces.append((offset, size))
                offset += size
                break
    return pieces


class MMIOMapping:
    """What mmap returns for a register BAR; slice it like a memoryview, one device access per piece."""

    def __init__(self, read: Callable[[int, int], int], write: Callable[[int, int, int], None],
                 length: int, enabled: Callable[[], bool]):
        self._read = read
        self._write = write
        self._len = length
        self._enabled = enabled
        self.closed = False

    def __len__(self) -> int:
        return self._len

    def _check(self, start: int, stop: int) -> None:
        if self.closed:
            raise ValueError("mmap closed or invalid")
        if not 0 <= start <= stop <= self._len:
            raise IndexError("mmap index out of range")
        if not self._enabled():
            raise error(errno.EFAULT, "SIGBUS: MMIO access with memory decode disabled in COMMAND")

    def _span(self, key) -> tuple[int, int]:
        if isinstance(key, slice):
            start, stop, step = key.indices(self._len)
            if step != 1:
                raise ValueError("MMIO mappings take contiguous slices only")
            return start, stop
        if key < 0:
            key += self._len
        return key, key + 1

    def __getitem__(self, key):
        start, stop = self._span(key)
        self._check(start, stop)
        out = bytearray()
        for off, size in split_access(start, stop - start):
            out += self._read(off, size).to_bytes(size, "little")
        return out[0] if isinstance(key, int) else bytes(out)

    def __setitem__(self, key, value) -> None:
        start, stop = self._span(key)
        self._check(start, stop)
        data = bytes([value]) if isinstance(key, int) else bytes(value)
        if len(data) != stop - start:
            raise IndexError("mmap slice assignment is wrong size")
        for off, size in split_access(start, stop - start):
            self._write(off, size, int.from_bytes(data[off - start:off - start + size], "little"))

    def read(self, offset: int, size: int) -> int:
        self._check(offset, offset + size)
        return self._read(offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        self._check(offset, offset + size)
        self._write(offset, size, value)

    def close(self) -> None:
        self.closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
