"""The type1 IOMMU of the fake kernel: IOVA -> process vaddr, so emulated DMA touches real memory.

Mappings are kept sorted by IOVA in flat lists so that lookup, map and unmap are O(log n)
searches; Linux keeps an rbtree for the same reason.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
from bisect import bisect_right
from dataclasses import dataclass

PAGE_SIZE = mmap.PAGESIZE
# intel-iommu on x86 advertises 4K, 2M and 1G pages through type1.
IOVA_PGSIZES = (1 << 12) | (1 << 21) | (1 << 30)
DMA_ENTRY_LIMIT = 65535
IOVA_MAX = (1 << 64) - 1

_libc = ctypes.CDLL(None, use_errno=True)
_libc.msync.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
_MS_ASYNC = 1


def user_range_mapped(vaddr: int, size: int) -> bool:
    """Whether [vaddr, vaddr+size) is mapped in this process; pinning fails with EFAULT otherwise."""
    start = vaddr & ~(PAGE_SIZE - 1)
    return _libc.msync(start, vaddr + size - start, _MS_ASYNC) == 0


def user_range_writable(vaddr: int, size: int) -> bool:
    """Whether every page of the range is mapped writable, as pinning with FOLL_WRITE needs."""
    pos, end = vaddr, vaddr + size
    with open("/proc/self/maps") as f:
        spans = sorted((int(lo, 16), int(hi, 16)) for lo, hi, perms in
                       (line.split(None, 2)[0].split("-") + [line.split(None, 2)[1]] for line in f)
                       if perms[1] == "w")
    for lo, hi in spans:
        if lo <= pos < hi:
            pos = hi
            if pos >= end:
                return True
    return False


_PIN_ERRNO = {"unmapped": errno.EINVAL, "the process unmapped the memory behind the mapping": errno.EFAULT}


@dataclass(slots=True)
class DMAMapping:
    iova: int
    size: int
    vaddr: int
    readable: bool
    writable: bool

    @property
    def end(self) -> int:
        return self.iova + self.size


@dataclass(slots=True, frozen=True)
class IOMMUFault:
    """A DMA the IOMMU refused; Linux logs a DMAR fault and the device sees an abort."""

    iova: int
    size: int
    write: bool
    reason: str


class Type1IOMMU:
    """The DMA mappings of one container, with permission checks and fault recording."""

    def __init__(self, dma_entry_limit: int = DMA_ENTRY_LIMIT):
        self._starts: list[int] = []
        self._maps: list[DMAMapping] = []
        self.dma_entry_limit = dma_entry_limit
        self.faults: list[IOMMUFault] = []

    def __len__(self) -> int:
        return len(self._maps)

    @property
    def dma_avail(self) -> int:
        return self.dma_entry_limit - len(self._maps)

    def mappings(self) -> list[DMAMapping]:
        return list(self._maps)

    def _find(self, iova: int) -> int:
        """Index of the mapping containing iova, or -1."""
        i = bisect_right(self._starts, iova) - 1
        if i >= 0 and iova < self._maps[i].end:
            return i
        return -1

    def overlaps(self, iova: int, size: int) -> bool:
        i = bisect_right(self._starts, iova + size - 1) - 1
        return i >= 0 and self._maps[i].end > iova

    def map(self, iova: int, size: int, vaddr: int, readable: bool, writable: bool) -> None:
        """Checks come in type1's order: overlap, then the entry limit, then pinning."""
        if self.overlaps(iova, size):
            raise OSError(errno.EEXIST, "DMA mapping overlaps an existing one")
        if not self.dma_avail:
            raise OSError(errno.ENOSPC, "dma_entry_limit reached")
        if not user_range_mapped(vaddr, size) or (writable and not user_range_writable(vaddr, size)):
            raise OSError(errno.EFAULT, "vaddr is not mapped in the process, or not writable for a WRITE mapping")
        i = bisect_right(self._starts, iova)
        self._starts.insert(i, iova)
        self._maps.insert(i, DMAMapping(iova, size, vaddr, readable, writable))

    def first_partial(self, iova: int, size: int) -> bool:
        """Whether [iova, iova+size) cuts a mapping in two at either end (type1v2 refuses that)."""
        i = self._find(iova)
        if i >= 0 and self._maps[i].iova != iova:
            return True
        last = iova + size - 1
        j = self._find(last)
        return j >= 0 and self._maps[j].end - 1 != last

    def unmap(self, iova: int, size: int) -> int:
        """Remove every mapping inside the range; returns the bytes unmapped."""
        lo = bisect_right(self._starts, iova - 1) if iova else 0
        hi = bisect_right(self._starts, iova + size - 1)
        unmapped = sum(m.size for m in self._maps[lo:hi])
        del self._starts[lo:hi]
        del self._maps[lo:hi]
        return unmapped

    def unmap_all(self) -> int:
        unmapped = sum(m.size for m in self._maps)
        self._starts.clear()
        self._maps.clear()
        return unmapped

    def _walk(self, iova: int, size: int, read: bool, write: bool) -> tuple[list[tuple[int, int]], str | None]:
        """The (vaddr, length) pieces behind a range, which may span adjacent mappings, and why
        the walk stopped short (None when it did not)."""
        pieces: list[tuple[int, int]] = []
        pos, end = iova, iova + size
        i = self._find(iova)
        while pos < end:
            if i < 0 or i >= len(self._maps) or self._maps[i].iova > pos:
                return pieces, "unmapped"
            m = self._maps[i]
            if write and not m.writable:
                return pieces, "write to a read-only mapping"
            if read and not m.readable:
                return pieces, "read from a write-only mapping"
            n = min(end, m.end) - pos
            vaddr = m.vaddr + (pos - m.iova)
            if not user_range_mapped(vaddr, n):
                return pieces, "the process unmapped the memory behind the mapping"
            pieces.append((vaddr, n))
            pos += n
            i += 1
        return pieces, None

    def segments(self, iova: int, size: int, write: bool) -> list[tuple[int, int]] | None:
        """The pieces behind a device access; None after recording the fault."""
        pieces, reason = self._walk(iova, size, not write, write)
        if reason:
            self.faults.append(IOMMUFault(iova, size, write, reason))
            return None
        return pieces

    def pin(self, iova: int, size: int, write: bool) -> int:
        """vfio_pin_pages for an mdev driver: 0, EINVAL where nothing is mapped, EPERM where the
        mapping lacks a permission asked for (always read, and write when `write`), EFAULT where
        the process's memory is gone. A refused pin is the driver's error, not a DMA fault, so
        nothing is recorded."""
        _, reason = self._walk(iova, size, True, write)
        if reason is None:
            return 0
        return _PIN_ERRNO.get(reason, errno.EPERM)

    def dma_read(self, iova: int, size: int) -> bytes | None:
        pieces = self.segments(iova, size, write=False)
        if pieces is None:
            return None
        if len(pieces) == 1:
            return ctypes.string_at(*pieces[0])
        return b"".join(ctypes.string_at(v, n) for v, n in pieces)

    def dma_write(self, iova: int, data: bytes) -> bool:
        pieces = self.segments(iova, len(data), write=True)
        if pieces is None:
            return False
        done = 0
        for vaddr, n in pieces:
            ctypes.memmove(vaddr, data[done:done + n], n)
            done += n
        return True
